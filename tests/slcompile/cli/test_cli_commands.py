"""`slcompile` commands that succeed, run in a subprocess as a user runs them, with their results
checked against independent oracles: eager PyTorch (dense) and the eager model with its attention
swapped for `slcompile.superlinear_attention` (the functional form, not the graph pass)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import slcompile
from cli_helpers import HERE, TINY, assert_one_line_error, listing, run_cli

# Small enough that a query at t >= ~24 cannot see all its keys: results really differ from dense.
SMALL = ["--search-key", "anchor", "--window", "8", "--sinks", "2", "--topk", "1", "--dense-below", "0"]


def _functional_oracle(model, ids, config, monkeypatch):
    """The eager model with every SDPA call replaced by slcompile.superlinear_attention."""

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        assert attn_mask is None and is_causal
        return slcompile.superlinear_attention(q, k, v, config=config, scale=scale,
                                               enable_gqa=enable_gqa)

    with monkeypatch.context() as m:
        m.setattr(F, "scaled_dot_product_attention", sdpa)
        with torch.no_grad():
            return model(ids)


def _ids(L, seed):
    return torch.randint(0, TINY["vocab_size"], (1, L), generator=torch.Generator().manual_seed(seed))


def test_convert_archive_then_load_it_back(tiny_files, workdir, monkeypatch):
    out = workdir / "tiny.sl.pt2"
    res = run_cli("convert", tiny_files["dir"] / "tiny.pt2", "-o", out, *SMALL, "--json")
    assert res.rc == 0, res
    d = res.json()
    assert d["ok"] and d["report"]["found"] == 1 and d["report"]["rewritten"] == 1
    assert d["dynamic"] is True and d["verify_max_abs_err"] == 0.0
    assert listing(workdir) == ["tiny.sl.pt2"]  # no temporary file left beside it

    ep = torch.export.load(out)  # works because slcompile is imported (it registers the ops)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.superlinear.span_search.default in targets
    assert torch.ops.superlinear.span_attention.default in targets
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets

    config = slcompile.SuperlinearConfig(search_key="anchor", window=8, sinks=2, topk=1, dense_below=0)
    model = tiny_files["model"]
    from slcompile.passes import rewrite_graph

    source = torch.export.load(tiny_files["dir"] / "tiny.pt2")
    original, rewritten = source.module(), source.module()  # two independent copies
    rewrite_graph(rewritten, config)
    for L, seed in ((40, 1), (72, 2)):  # the sample length and another: the length stays dynamic
        ids = _ids(L, seed)
        with torch.no_grad():
            got = ep.module()(ids)
            dense = model(ids)
            assert torch.equal(got, rewritten(ids))  # same as running the rewritten module
            assert torch.allclose(original(ids), dense, atol=1e-5)
        want = _functional_oracle(model, ids, config, monkeypatch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (got - dense).abs().max() > 1e-3  # window 8 << L: really approximated


# the default search (block-sparse, docs/blocksparse.md) on geometry small enough to be sparse
BLOCKS = ["--q-block", "16", "--k-block", "16", "--window", "16", "--sinks", "0", "--topk", "1",
          "--block-rows", "4", "--block-pool", "1", "--dense-below", "0"]


def test_convert_with_the_default_search_then_load_and_check_it(tiny_files, workdir, monkeypatch):
    """A model converted with the default (block-sparse) search loads with torch.export.load after
    `import slcompile`, runs at other lengths as the functional form does, and `check` passes."""
    out = workdir / "tiny.bs.pt2"
    res = run_cli("convert", tiny_files["dir"] / "tiny.pt2", "-o", out, *BLOCKS, "--json")
    assert res.rc == 0, res
    d = res.json()
    assert d["ok"] and d["report"]["rewritten"] == 1 and d["dynamic"] is True
    ep = torch.export.load(out)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.superlinear.block_sparse_attention.default in targets
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    config = slcompile.SuperlinearConfig(q_block=16, k_block=16, window=16, sinks=0, topk=1,
                                         block_rows=4, block_pool=1, dense_below=0)
    model = tiny_files["model"]
    for L, seed in ((40, 3), (96, 4)):
        ids = _ids(L, seed)
        with torch.no_grad():
            got, dense = ep.module()(ids), model(ids)
        want = _functional_oracle(model, ids, config, monkeypatch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if L == 96:
            assert (got - dense).abs().max() > 1e-3  # window 16 + one block << 96: sparse
    # check runs on the original model: the rewrite with the default search is wired exactly
    res = run_cli("check", tiny_files["dir"] / "tiny.pt2", "--lengths", "48,96", *BLOCKS, "--json")
    assert res.rc == 0, res
    d = res.json()
    assert d["ok"] and d["exact"]["passed"] and d["exact"]["max_abs_err"] < 1e-4
    assert d["lengths"][-1]["max_abs_err"] > 1e-4  # sparse at 96 tokens


def test_convert_pickle_exact_config_matches_dense(tiny_files, workdir):
    out = workdir / "exact.pt2"
    res = run_cli("convert", tiny_files["dir"] / "tiny.pt", "--trust-pickle", "-o", out,
                  "--seq-len", 24, "--static", "--search-key", "anchor", "--window", 100000,
                  "--dense-below", 0, "--no-verify", "--json")
    assert res.rc == 0, res
    d = res.json()
    assert d["input_format"] == "torch-save" and d["dynamic"] is False
    assert d["report"]["rewritten"] == 1
    assert d["verify_max_abs_err"] is None and d["vs_dense"] is None  # --no-verify
    ep = torch.export.load(out)
    assert any(n.target is torch.ops.superlinear.span_attention.default for n in ep.graph.nodes)
    ids = _ids(24, 5)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids), tiny_files["model"](ids), atol=1e-5, rtol=1e-5)


def test_inspect_lists_the_site(tiny_files):
    res = run_cli("inspect", tiny_files["dir"] / "tiny.pt", "--trust-pickle", "--seq-len", 16, "--json")
    assert res.rc == 0, res
    d = res.json()
    assert (d["found"], d["rewritten"], d["skipped"]) == (1, 1, 0)
    site = d["sites"][0]
    assert site["module_path"] == "layers.0.attn"
    assert site["causal_proven"] is True and site["rewritten"] is True and site["reason"] == ""
    head_dim = TINY["dim"] // TINY["n_heads"]
    assert site["q_shape"][1] == str(TINY["n_heads"]) and site["q_shape"][-1] == str(head_dim)
    assert site["kv_shape"][1] == str(TINY["n_kv_heads"])
    assert "demo.py" in site["source"]


def test_check_reports_exactness_and_errors_per_length(tiny_files):
    res = run_cli("check", tiny_files["dir"] / "tiny.pt2", "--lengths", "32,72", *SMALL, "--json")
    assert res.rc == 0, res
    d = res.json()
    assert d["ok"] and d["exact"]["passed"] and d["exact"]["max_abs_err"] < 1e-4
    assert [r["seq_len"] for r in d["lengths"]] == [32, 72]
    assert all(r["max_abs_err"] > 1e-4 for r in d["lengths"])  # window 8 < L: approximations


def test_check_exits_1_when_not_exact(tiny_files):
    # sabotage_ops adds 1e-2 to every span_attention output: the wiring check must catch it.
    res = run_cli("check", tiny_files["dir"] / "tiny.pt2", "--import", "sabotage_ops",
                  "--search-key", "anchor", "--json", env_extra={"PYTHONPATH": str(HERE)})
    assert_one_line_error(res, 1, "not exact")
    d = res.json()  # one JSON document: the full result, marked not ok
    assert d["ok"] is False and d["exact"]["passed"] is False
    assert 5e-3 < d["exact"]["max_abs_err"]


def test_bench_attention_op_alone_with_plot(workdir):
    png = workdir / "bench.png"
    res = run_cli("bench", "--lengths", "32,64", "--heads", 2, "--kv-heads", 1, "--head-dim", 8,
                  "--repeat", 1, "--warmup", 0, "--search-key", "anchor", "--window", 8, "--topk", 1,
                  "--sinks", 0, "--plot", png, "--json")
    assert res.rc == 0, res
    d = res.json()
    assert [r["seq_len"] for r in d["rows"]] == [32, 64]
    assert all(r["dense_ms"] > 0 and r["superlinear_ms"] > 0 for r in d["rows"])
    assert all(r["max_abs_err"] > 1e-3 for r in d["rows"])  # the superlinear path really ran
    assert d["config"]["dense_below"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert listing(workdir) == ["bench.png"]


def test_demo_tiny(workdir):
    res = run_cli("demo", "--seq-len", 48, "--search-key", "anchor", "--window", 8, "--repeat", 1,
                  "--compiler", "eager", "--json", cwd=workdir)
    assert res.rc == 0, res
    d = res.json()
    assert d["report"]["found"] == 2 and d["report"]["rewritten"] == 2
    assert d["exact"]["passed"] and d["exact"]["max_abs_err"] < 1e-4
    assert d["approx"]["max_abs_err"] > 1e-3
    assert d["timing"]["dense_ms"] > 0 and d["timing"]["superlinear_ms"] > 0


def test_check_with_three_search_steps(tiny_files):
    res = run_cli("check", tiny_files["dir"] / "tiny.pt2", "--lengths", "72", *SMALL, "--steps", 3, "--json")
    assert res.rc == 0, res
    d = res.json()
    assert d["ok"] and d["exact"]["passed"] and d["exact"]["max_abs_err"] < 1e-4
    assert d["lengths"][0]["max_abs_err"] > 1e-4  # window 8 < L: the 3-step approximation ran
    bad = run_cli("check", tiny_files["dir"] / "tiny.pt2", "--steps", 1)
    assert_one_line_error(bad, 7, "steps")
