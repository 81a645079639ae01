"""examples/train_retrieval.py: the task is honest (every answer lies farther back than the window,
the tokens say what the targets say), its routing diagnostic agrees with a brute-force reading of
docs/spec.md's span rule, and a tiny run writes the curve with chance level and routing recall."""

import importlib.util
import json
import math
import os

import pytest
import torch

from slcompile.kernels.config import SuperlinearConfig

_path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_retrieval.py")
_spec = importlib.util.spec_from_file_location("train_retrieval_example", _path)
tr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tr)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batches_put_every_answer_outside_the_window(seed):
    gen = torch.Generator().manual_seed(seed)
    L, P, Q, K, V, Fl, W = 160, 6, 4, 16, 12, 20, 24
    tok, qpos, ans, vpos = tr.make_batch(gen, 5, L, P, Q, K, V, Fl, W, "cpu")
    for b in range(5):
        row = tok[b].tolist()
        keys_in_context = [x for x in row[:L - 2 * Q] if Fl <= x < Fl + K]
        assert len(keys_in_context) == P == len(set(keys_in_context))  # distinct keys, P pairs
        for j in range(Q):
            t, v = int(qpos[b, j]), int(vpos[b, j])
            assert t == L - 2 * Q + 2 * j
            assert Fl <= row[t] < Fl + K
            assert row[v - 1] == row[t]  # the asked key sits just before its value
            assert row[v] == Fl + K + int(ans[b, j]) == row[t + 1]
            assert row.index(row[t]) == v - 1  # the key occurs once before the query tail
            assert v < t - W + 1  # never inside any query's window
    with pytest.raises(ValueError, match="too short"):
        tr.make_batch(gen, 1, 40, P, Q, K, V, Fl, W, "cpu")


def test_routing_hits_match_the_span_rule():
    torch.manual_seed(0)
    L, W, topk, B, Hq, Hkv, D = 120, 10, 3, 2, 4, 2, 8
    cfg = SuperlinearConfig(window=W, sinks=0, topk=topk, combine="gated", search_key="mean",
                            dense_below=0, backward_factor=1.5, forward_factor=0.5)
    qs, k = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, L, D)
    anchors, _ = torch.ops.superlinear.span_search(
        qs, k, None, None, W, topk, cfg.search_power, cfg.span_power, cfg.backward_factor,
        cfg.forward_factor, cfg.search_key, cfg.dense_below)
    qpos = torch.tensor([[100, 110, 119], [105, 111, 118]])
    vpos = torch.randint(0, 90, (B, 3))
    vpos[0, 0] = int(anchors[0, 1, 100, 0])  # at least one certain hit
    got = tr.routing_hits(anchors, qpos, vpos, cfg, L)
    for b in range(B):
        for h in range(Hq):
            for j in range(3):
                t, v = int(qpos[b, j]), int(vpos[b, j])
                back = math.ceil(cfg.backward_factor * math.sqrt(t + 1) - 1e-9)
                fwd = math.ceil(cfg.forward_factor * math.sqrt(t + 1) - 1e-9)
                spans = [range(max(0, a - back), min(a + fwd, t - W) + 1)
                         for a in anchors[b, h, t].tolist() if a >= 0]
                assert bool(got[b, h, j]) == any(v in s for s in spans), (b, h, j)
    assert bool(got[0, 1, 0])


def test_lr_factor_warms_up_then_decays_to_the_floor():
    f = [tr.lr_factor(s, 0.0, 10, 100.0, 0.1) for s in range(10)]
    assert f == pytest.approx([(s + 1) / 10 for s in range(10)])
    decay = [tr.lr_factor(50, e, 10, 100.0, 0.1) for e in range(0, 101, 10)]
    assert decay[0] == pytest.approx(1.0) and decay[-1] == pytest.approx(0.1)
    assert all(x > y for x, y in zip(decay, decay[1:]))
    assert tr.lr_factor(50, 500.0, 10, 100.0, 0.1) == pytest.approx(0.1)


def test_tiny_run_writes_curve_with_chance_and_recall(tmp_path):
    res = tr.main(["--device", "cpu", "--steps", "2", "--seq-len", "72", "--window", "8",
                   "--pairs", "3", "--queries", "2", "--d-model", "16", "--layers", "1",
                   "--batch", "2", "--eval-every", "1", "--eval-batches", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "train_retrieval.json").read_text())
    assert saved["chance"] == pytest.approx(1 / 32)
    assert [c["step"] for c in saved["curve"]] == [0, 1, 2] and saved["steps"] == 2
    for c in saved["curve"]:
        assert 0 <= c["accuracy"] <= 1 and 0 <= c["recall_per_head"] <= c["recall_any_head"] <= 1
    assert saved["final"]["queries"] == 4 * 2 * 2
    assert saved["reached_target"] == res["reached_target"]
    assert (tmp_path / "train_retrieval.png").exists()
