"""search_key="block" (docs/routing.md): the reference against a brute-force oracle, and its
properties (causality, decode = prefill, reachability of every position)."""

from __future__ import annotations

import random

import pytest
import torch

from slcompile import SuperlinearConfig, superlinear_attention
from slcompile.kernels import reference as ref
from slcompile.kernels.geometry import span_extents

from oracle import oracle_block_search


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The oracle runs thousands of tiny ops; intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



CASES = [
    # B, Hq, Hkv, T, D, W, topk, span_power, bf, ff, padding
    (2, 4, 2, 333, 8, 16, 3, 0.5, 2.0, 0.0, False),
    (1, 3, 1, 260, 8, 8, 2, 0.5, 1.0, 1.0, True),
    (2, 2, 2, 200, 4, 0, 4, 0.5, 0.5, 0.0, True),
    (1, 2, 1, 300, 8, 32, 1, 0.6, 3.0, 0.5, False),
    (1, 4, 4, 150, 8, 4, 5, 0.5, 0.0, 0.0, False),  # one-key spans: fine blocks of one key
    (1, 2, 1, 420, 8, 24, 8, 0.5, 0.35, 0.0, True),  # the pretrained preset's short spans, topk 8
]


@pytest.mark.parametrize("search_key,rerank,fine_block", [
    ("block", 32, 16), ("block_rerank", 32, 16),
    # a rerank pool of topk candidates (the default, 32, rescores every candidate of these small
    # cases, so the cut at the pool is only exercised with a smaller one)
    ("block_rerank", 1, 16),
    ("block", 32, 4), ("block_rerank", 2, 32)])  # other fine blocks (config.fine_block)
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_block_search_matches_oracle(case, search_key, rerank, fine_block):
    B, Hq, Hkv, T, D, W, topk, r, bf, ff, padded = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    qs = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    kpm = None
    if padded:
        kpm = torch.rand(B, T, generator=gen) > 0.25
        kpm[:, :8] = False  # left padding as well as holes
    pos = ref.default_positions(B, T, T, "cpu")
    a, s = ref.span_search(qs, k, kpm, None, W, topk, 0.5, r, bf, ff, search_key, 0, fine_block,
                           rerank)
    rng = random.Random(0)
    triples = [(b, h, i) for b in range(B) for h in range(Hq) for i in range(T)]
    triples = rng.sample(triples, min(len(triples), 120)) + [(0, 0, T - 1), (B - 1, Hq - 1, W)]
    want = oracle_block_search(qs, k, kpm, pos, W, topk, r, bf, ff, triples,
                               rerank if search_key == "block_rerank" else 0, fine_block)
    n_nonempty = 0
    for key, (wa, ws) in want.items():
        b, h, i = key
        assert a[b, h, i].tolist() == wa, (key, a[b, h, i].tolist(), wa, s[b, h, i].tolist(), ws)
        torch.testing.assert_close(s[b, h, i].double(), torch.tensor(ws, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-4)
        n_nonempty += wa[0] >= 0
    assert n_nonempty > len(want) // 2
    if kpm is not None:  # an absent key is never an anchor
        ok = a >= 0
        assert bool(kpm[torch.arange(B)[:, None, None, None].expand_as(a)[ok], a.long()[ok]].all())


def test_block_search_is_causal_and_decode_equals_prefill():
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, T, D, W = 1, 4, 2, 400, 8, 16
    qs = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    a, s = ref.span_search(qs, k, None, None, W, 3, 0.5, 0.5, 2.0, 0.0, "block", 0)
    for t in [W, 57, 130, 255, 256, 399]:
        # perturbing the future changes nothing for query t
        k2 = k.clone()
        k2[:, :, t + 1:] = torch.randn_like(k2[:, :, t + 1:]) * 10
        a2, s2 = ref.span_search(qs, k2, None, None, W, 3, 0.5, 0.5, 2.0, 0.0, "block", 0)
        assert torch.equal(a2[:, :, t], a[:, :, t])
        # decoding the query at t against keys 0..t gives the prefill's row
        a3, s3 = ref.span_search(qs[:, :, t:t + 1], k[:, :, :t + 1], None, None, W, 3, 0.5, 0.5, 2.0,
                                 0.0, "block", 0)
        assert torch.equal(a3[:, :, 0], a[:, :, t])
        torch.testing.assert_close(s3[:, :, 0], s[:, :, t])


@pytest.mark.parametrize("seed", range(3))
def test_every_position_is_reachable(seed):
    """A key that stands out for the query is found wherever it lies before the window."""
    rng = random.Random(seed)
    T, D, W = 700, 16, 32
    back, fwd = span_extents(T, 0.5, 2.0, 0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(12):
        t = rng.randrange(W, T)
        p = rng.randrange(0, t - W + 1)
        q = torch.randn(1, 1, 1, D, generator=gen)
        k = torch.randn(1, 1, t + 1, D, generator=gen) * 0.3
        k[0, 0, p] = q[0, 0, 0] * 8.0
        a, _ = ref.span_search(q, k, None, None, W, 2, 0.5, 0.5, 2.0, 0.0, "block", 0)
        spans = [(max(0, x - int(back[t])), min(x + int(fwd[t]), t - W)) for x in a[0, 0, 0].tolist() if x >= 0]
        assert any(lo <= p <= hi for lo, hi in spans), (t, p, spans)


def test_block_config_through_the_public_function():
    """search_key="block" is a valid config; with a window covering everything the result is dense
    attention, and with a small window it differs from the anchor search (it is really used)."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 200, 16, generator=gen)
    k = torch.randn(2, 2, 200, 16, generator=gen)
    v = torch.randn(2, 2, 200, 16, generator=gen)
    cfg = SuperlinearConfig(window=16, sinks=2, topk=2, dense_below=0, search_key="block")
    out = superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
    assert torch.isfinite(out).all()
    out_anchor = superlinear_attention(q, k, v, config=cfg.replace(search_key="anchor"), enable_gqa=True)
    assert (out - out_anchor).abs().max() > 1e-3
    exact = superlinear_attention(q, k, v, config=SuperlinearConfig.exact(search_key="block"), enable_gqa=True)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(exact, dense, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="search_key"):
        SuperlinearConfig(search_key="blocks")


def test_for_pretrained_preset():
    """The preset of issue 7 (README "Quality"): block search with exact rescoring, window 768, 8
    spans of ~0.35 sqrt(t) keys; docs/spec.md's field defaults are untouched; at 8K every query attends
    at most 15% of keys."""
    p = SuperlinearConfig.for_pretrained()
    assert (p.search_key, p.window, p.sinks, p.topk, p.backward_factor, p.forward_factor, p.combine) \
        == ("block_rerank", 768, 4, 8, 0.35, 0.0, "union")
    d = SuperlinearConfig()
    assert p.dense_below == d.dense_below and p.span_power == d.span_power == 0.5
    assert (d.window, d.sinks, d.topk, d.backward_factor, d.search_key) == (256, 4, 24, 2.0, "blocksparse")
    s = SuperlinearConfig(search_key="anchor")  # docs/spec.md's stripe search and its defaults
    assert (s.window, s.sinks, s.topk, s.backward_factor, s.search_key) == (64, 4, 3, 2.0, "anchor")
    assert SuperlinearConfig.for_pretrained(window=512).window == 512
    with pytest.raises(ValueError, match="topk"):
        SuperlinearConfig.for_pretrained(topk=9)
    back, _ = span_extents(8192, p.span_power, p.backward_factor, p.forward_factor)
    t = torch.arange(7168, 8192)
    worst = (p.window + p.sinks + p.topk * (back[t] + 1)).double() / (t + 1)
    assert float(worst.max()) <= 0.15
    # fine blocks are the largest power of two <= back + 1 keys: 16 over most of 2K..8K
    assert int(back[t].min()) + 1 >= 16


def _quality_module():
    """benchmarks/quality.py (the needle/perplexity evaluation), imported from its path."""
    pytest.importorskip("transformers")
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "quality.py")
    if "quality_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("quality_bench", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["quality_bench"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["quality_bench"]


@pytest.mark.parametrize("spec", ["window=8,sinks=2,topk=2,backward_factor=0.5,search_key=block_rerank",
                                  "window=8,sinks=2,topk=2,search_key=block",
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


def test_quality_flat_pool_is_block_rerank_flat():
    """flat ``pool=N``: only the N // bs blocks best by bound compete, each scored by its exact
    largest logit (block_rerank's rule over every block): checked against a brute force."""
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


def test_block_sparse_preset():
    """The block-sparse preset: docs/blocksparse.md's search with its measured geometry; overrides
    validated; at 8K the last 1024 queries attend at most 15% of the keys on average (on random
    inputs, counted from the op's own lists), each of them at most 16%."""
    from slcompile.kernels import blocksparse as bs

    p = SuperlinearConfig.block_sparse()
    assert (p.search_key, p.window, p.sinks, p.topk, p.q_block, p.k_block) == \
        ("blocksparse", 256, 4, 24, 64, 32)
    assert p.dense_below == SuperlinearConfig().dense_below
    assert SuperlinearConfig.block_sparse(topk=40).topk == 40
    with pytest.raises(ValueError, match="k_block"):
        SuperlinearConfig.block_sparse(k_block=128)  # q_block 64 is not a multiple
    torch.manual_seed(0)
    T = 8192
    q, k = torch.randn(1, 2, 1024, 16), torch.randn(1, 1, T, 16)
    kw = dict(window=p.window, sinks=p.sinks, q_block=p.q_block, k_block=p.k_block)
    kept = bs.block_select(q, k, None, T - 1024, topk=p.topk, rows=p.block_rows,
                           pool=p.block_pool, group=p.block_group, spread=p.spread_rows,
                           exact_rows=p.exact_rows, **kw)
    keys = bs.keys_attended(kept, T - 1024, 1024, T, **kw).double()
    share = keys / torch.arange(T - 1024 + 1, T + 1)
    assert float(share.mean()) <= 0.15 and float(share.max()) <= 0.16 and float(share.min()) > 0.1
