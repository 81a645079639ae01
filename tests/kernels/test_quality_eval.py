"""benchmarks/quality.py's evaluation paths (the needle/perplexity/routing evaluation of converted
models) against the kernels: the masked path of a config equals superlinear attention, its key
counters agree, and the flat selection rules (oracle, exact, bound pool) do what they say."""

from __future__ import annotations

import pytest
import torch

from slcompile import superlinear_attention


def _quality_module():
    """benchmarks/quality_rules.py (the variants, selection rules and attention functions of the
    needle/perplexity evaluation), imported from its path."""
    pytest.importorskip("transformers")
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "quality_rules.py")
    if "quality_rules_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("quality_rules_bench", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["quality_rules_bench"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["quality_rules_bench"]


@pytest.mark.parametrize("spec", ["window=8,sinks=2,topk=2,backward_factor=0.5,search_key=mean",
                                  "window=8,sinks=2,topk=2,search_key=anchor",
                                  "window=6,sinks=1,topk=2,steps=3,search_key=mean"])
def test_quality_masked_path_and_key_count_match_the_kernels(spec):
    """The evaluation's masked path ("mask:<config>": dense attention restricted to the attended
    set) equals superlinear attention (union), and both key counters (the masked one and the
    probe's, which must use the N-step search for steps >= 3) give the same exact fraction."""
    Q = _quality_module()
    gen = torch.Generator().manual_seed(hash(spec) % 2**31)
    B, Hq, Hkv, T, D = 1, 4, 2, 96, 8
    q = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    cfg = Q.variant_config(spec)
    want = superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
    m = Q.masked_attention()
    m.name, m.chunk = Q.MASKED + spec, 40  # several query chunks
    m.reset()
    out, _ = m._forward(None, q, k, v, None)
    torch.testing.assert_close(out.transpose(1, 2), want, atol=1e-5, rtol=1e-5)
    kc = Q.KeyCounter.instance()
    kc.reset()
    kc._count(cfg, q, k, None)
    for a, b in zip(m.result(), kc.result()):
        assert abs(a - b) < 1e-9 and 0 < a < 1


def test_quality_flat_oracle_with_every_block_is_dense():
    """A flat selection that keeps every block before the window is dense attention; keeping fewer
    blocks by true mass keeps the needle key a query attends to (the oracle of the evaluation)."""
    Q = _quality_module()
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, T, D = 1, 2, 1, 64, 8
    q = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    m = Q.masked_attention()
    m.name, m.chunk = Q.FLAT + "score=mass,window=8,blocks=100,bs=4", 1024
    out, _ = m._forward(None, q, k, v, None)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out.transpose(1, 2), dense, atol=1e-5, rtol=1e-5)
    k2 = k.clone()
    k2[0, 0, 13] = q[0, 1, T - 1] * 6.0  # key 13 dominates the last query of head 1
    t = torch.tensor([T - 1])
    logits = (q[0, :, -1:] @ k2[0].repeat_interleave(2, 0).transpose(1, 2)) * D ** -0.5
    for score in ("mass", "max", "bound"):
        A = Q.flat_mask(Q.flat_spec(f"{Q.FLAT}score={score},window=8,blocks=1,bs=4"), q[0, :, -1:],
                        k2[0], t, logits)
        assert bool(A[1, 0, 13]) and int(A[1, 0].sum()) == 8 + 4 + 4, score


def test_quality_flat_pool_rescores_the_best_blocks_by_bound():
    """flat ``pool=N``: only the N // bs blocks best by bound compete, each scored by its exact
    largest logit (a bound pool rescored exactly, over every block): checked against a brute
    force."""
    Q = _quality_module()
    gen = torch.Generator().manual_seed(5)
    Hq, Hkv, T, D, bs, W, pool = 4, 2, 200, 8, 4, 16, 24
    q = torch.randn(Hq, 3, D, generator=gen)
    k = torch.randn(Hkv, T, D, generator=gen)
    t = torch.tensor([T - 1, T - 30, 120])
    logits = (q @ k.repeat_interleave(2, 0).transpose(1, 2)) * D ** -0.5
    sc = Q.flat_scores(Q.flat_spec(f"{Q.FLAT}score=max,window={W},bs={bs},pool={pool}"), q, k, t,
                       logits)
    for h in range(Hq):
        for i in range(3):
            e, kv = int(t[i]) - W, h // 2
            blocks = [b for b in range(-(-T // bs)) if b * bs <= e]
            bound = {b: float(sum(max(float(q[h, i, d]) * float(k[kv, b * bs:b * bs + bs, d].min()),
                                      float(q[h, i, d]) * float(k[kv, b * bs:b * bs + bs, d].max()))
                                  for d in range(D))) for b in blocks}
            kept = sorted(blocks, key=lambda b: -bound[b])[:pool // bs]
            for b in blocks:
                if b in kept:
                    keys = [j for j in range(b * bs, min(b * bs + bs, e + 1)) if j >= 4]
                    want = max(float(logits[h, i, j]) for j in keys) if keys else float("-inf")
                    assert abs(float(sc[h, i, b]) - want) < 1e-4 or want == float(sc[h, i, b])
                else:
                    assert sc[h, i, b] == float("-inf")
