"""The reference against the brute-force oracle, dense attention and docs/spec.md's properties."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import slcompile
from slcompile import SuperlinearConfig, superlinear_attention
from slcompile.kernels import reference as R
from slcompile.kernels.geometry import num_stripes, span_extents, stripe_deltas
from oracle import candidate_spans, oracle_attention


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, dtype=dtype, generator=gen)


def dense_causal(q, k, v, scale=None):
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


@pytest.mark.parametrize("combine", ["union", "gated"])
@pytest.mark.parametrize("search_key", ["anchor", "mean"])
def test_exact_when_window_covers_everything(combine, search_key):
    torch.manual_seed(0)
    q, k, v = rand(2, 4, 300, 32), rand(2, 4, 300, 32), rand(2, 4, 300, 32)
    cfg = SuperlinearConfig(window=300, dense_below=0, combine=combine, search_key=search_key)
    out = superlinear_attention(q, k, v, config=cfg)
    assert (out - dense_causal(q, k, v)).abs().max() < 1e-5


def test_exact_below_dense_below():
    torch.manual_seed(1)
    q, k, v = rand(1, 6, 257, 64), rand(1, 2, 257, 64), rand(1, 2, 257, 64)
    cfg = SuperlinearConfig(search_key="anchor", window=8, dense_below=257)
    out = superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
    assert (out - dense_causal(q, k, v)).abs().max() < 1e-5
    # one key more and the sparse path is taken: no longer dense
    cfg2 = cfg.replace(dense_below=256)
    out2 = superlinear_attention(q, k, v, config=cfg2, enable_gqa=True)
    assert (out2 - dense_causal(q, k, v)).abs().max() > 1e-3


def test_exact_config_helper_is_dense():
    torch.manual_seed(2)
    q, k, v = rand(1, 2, 200, 16), rand(1, 2, 200, 16), rand(1, 2, 200, 16)
    out = superlinear_attention(q, k, v, config=SuperlinearConfig.exact(), scale=0.3)
    assert (out - dense_causal(q, k, v, scale=0.3)).abs().max() < 1e-5


CFG = st.fixed_dictionaries({
    "window": st.integers(0, 12),
    "sinks": st.integers(0, 5),
    "topk": st.integers(1, 8),
    "search_power": st.sampled_from([0.5, 0.4, 0.6, 1.0 / 3.0]),
    "span_power": st.sampled_from([0.5, 0.3, 0.0]),
    "backward_factor": st.sampled_from([2.0, 1.0, 0.5, 3.0]),
    "forward_factor": st.sampled_from([0.0, 0.5, 1.0]),
    "combine": st.sampled_from(["union", "gated"]),
    "search_key": st.sampled_from(["anchor", "mean"]),
})


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(cfg=CFG, T=st.integers(1, 90), lq=st.integers(1, 5), groups=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
       pad=st.booleans(), seed=st.integers(0, 2**31 - 1), sep_search=st.booleans())
def test_reference_matches_oracle(cfg, T, lq, groups, pad, seed, sep_search):
    gen = torch.Generator().manual_seed(seed)
    Hq, Hkv = groups
    B, D = 2, 8
    Lq = min(lq, T)
    q, k, v = rand(B, Hq, Lq, D, gen=gen), rand(B, Hkv, T, D, gen=gen), rand(B, Hkv, T, 6, gen=gen)
    qs = rand(B, Hq, Lq, D, gen=gen) if sep_search else None
    kpm = (torch.rand(B, T, generator=gen) > 0.25) if pad else None
    pos = torch.stack([torch.randperm(T, generator=gen)[:Lq] for _ in range(B)])
    c = SuperlinearConfig(dense_below=0, **cfg)
    out = superlinear_attention(q, k, v, config=c, enable_gqa=True, key_padding_mask=kpm,
                                query_positions=pos, search_query=qs, scale=0.7)
    ref = oracle_attention(q, k, v, c.to_dict(), 0.7, key_padding_mask=kpm, query_positions=pos,
                           search_query=qs)
    assert out.shape == ref.shape
    assert (out.double() - ref).abs().max() < 1e-5


def test_search_scores_and_tie_break():
    # all keys equal: every anchor ties, the nearest ones must win, in order
    k = torch.ones(1, 1, 200, 4)
    q = torch.ones(1, 1, 1, 4)
    a, s = R.span_search(q, k, None, None, 8, 3, 0.5, 0.5, 2.0, 0.0, "anchor", 0)
    t = 199
    near = [t - d for d in stripe_deltas(20, 0.5).tolist() if 8 <= d <= t][:3]
    assert a[0, 0, 0].tolist() == near
    assert torch.all(s == 4.0)
    # fewer valid anchors than topk: empty slots are -1 / -inf
    a, s = R.span_search(q[:, :, :1], k[:, :, :12], None, None, 8, 3, 0.5, 0.5, 2.0, 0.0, "anchor", 0)
    assert a[0, 0, 0].tolist() == [11 - 8, -1, -1]
    assert torch.isinf(s[0, 0, 0, 1:]).all()


def _uncovered(t, T, cfg, back, fwd, deltas):
    covered = set(range(max(0, t - cfg["window"] + 1), t + 1))
    for a, lo, hi in candidate_spans(t, T, cfg, back, fwd, deltas):
        covered |= set(range(lo, hi + 1))
    return set(range(t + 1)) - covered


def test_coverage_of_candidate_spans():
    T = 3000
    back, fwd = span_extents(T, 0.5, 2.0, 0.0)
    deltas = stripe_deltas(num_stripes(T, 0.5), 0.5)
    ts = list(range(0, 300)) + list(range(2900, 3000))
    # W = 63 = 8^2 - 1 is a stripe offset: the first anchor touches the window and the
    # backward reach 2*sqrt(t+1) exceeds every gap between anchors, so spans + window cover 0..t.
    cfg = SuperlinearConfig(search_key="anchor", window=63).to_dict()
    for t in ts:
        assert _uncovered(t, T, cfg, back, fwd, deltas) == set(), t
    # docs/spec.md's default W = 64 is not a stripe offset: the first anchor sits at t - 80, and
    # with forward_factor 0 the 16 keys (t-80, t-64] between it and the window lie in no
    # candidate span (before t = 80 the keys [0, t-64] are reachable only through sinks).
    cfg = SuperlinearConfig(search_key="anchor").to_dict()
    for t in ts:
        gap = set(range(max(0, t - 80 + 1), max(0, t - 64 + 1)))
        assert _uncovered(t, T, cfg, back, fwd, deltas) == gap, t
    # a forward reach closes that gap
    cfg = SuperlinearConfig(search_key="anchor", forward_factor=1.0).to_dict()
    back, fwd = span_extents(T, 0.5, 2.0, 1.0)
    for t in ts[300:]:
        assert _uncovered(t, T, cfg, back, fwd, deltas) == set(), t


def test_union_covering_all_is_dense():
    # T=60, W=8 (a stripe offset): stripes with delta in {8, 15, 24, 35, 48} (<= 5 per query)
    # all fit in topk=8, so every query's union covers [0, t]: attention must be exactly dense.
    torch.manual_seed(3)
    q, k, v = rand(1, 2, 60, 16), rand(1, 2, 60, 16), rand(1, 2, 60, 16)
    cfg = SuperlinearConfig(search_key="anchor", window=8, sinks=0, topk=8, dense_below=0)
    out = superlinear_attention(q, k, v, config=cfg)
    assert (out - dense_causal(q, k, v)).abs().max() < 1e-5


@pytest.mark.parametrize("combine", ["union", "gated"])
def test_causality(combine):
    torch.manual_seed(4)
    q, k, v = rand(1, 4, 400, 16), rand(1, 2, 400, 16), rand(1, 2, 400, 16)
    cfg = SuperlinearConfig(window=16, dense_below=0, combine=combine, search_key="mean")
    base = superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
    t = 250
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1:] = rand(1, 2, 400 - t - 1, 16) * 5
    v2[:, :, t + 1:] = rand(1, 2, 400 - t - 1, 16) * 5
    out = superlinear_attention(q, k2, v2, config=cfg, enable_gqa=True)
    assert torch.equal(out[:, :, :t + 1], base[:, :, :t + 1])
    assert not torch.allclose(out[:, :, t + 1:], base[:, :, t + 1:])


@pytest.mark.parametrize("combine", ["union", "gated"])
def test_gqa_equals_repeated_kv(combine):
    torch.manual_seed(5)
    q, k, v = rand(2, 6, 500, 32), rand(2, 2, 500, 32), rand(2, 2, 500, 32)
    cfg = SuperlinearConfig(search_key="anchor", window=32, dense_below=0, combine=combine)
    out = superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
    rep = superlinear_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), config=cfg)
    assert (out - rep).abs().max() < 1e-6


def test_chunked_prefill_and_decode_equal_one_prefill():
    torch.manual_seed(6)
    L = 700
    q, k, v = rand(1, 4, L, 32), rand(1, 2, L, 32), rand(1, 2, L, 32)
    cfg = SuperlinearConfig(window=32, dense_below=0, search_key="mean")
    full = superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
    parts = []
    for s, e in [(0, 100), (100, 450), (450, 699)]:
        parts.append(superlinear_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], config=cfg,
                                           enable_gqa=True, query_positions=s))
    # the decoded token: one query over the whole cache, bottom-right aligned
    parts.append(superlinear_attention(q[:, :, -1:], k, v, config=cfg, enable_gqa=True))
    assert (torch.cat(parts, dim=2) - full).abs().max() < 1e-6


def test_padding_removes_keys():
    torch.manual_seed(7)
    q, k, v = rand(2, 2, 300, 16), rand(2, 2, 300, 16), rand(2, 2, 300, 16)
    kpm = torch.ones(2, 300, dtype=torch.bool)
    kpm[0, :40] = False  # left padding
    kpm[1, 100:180] = False
    cfg = SuperlinearConfig(search_key="anchor", window=16, dense_below=0)
    out = superlinear_attention(q, k, v, config=cfg, key_padding_mask=kpm)
    k2, v2 = k.clone(), v.clone()
    k2[~kpm[:, None, :, None].expand_as(k)] = 1e3  # garbage in removed keys changes nothing
    v2[~kpm[:, None, :, None].expand_as(v)] = 1e3
    out2 = superlinear_attention(q, k2, v2, config=cfg, key_padding_mask=kpm)
    assert torch.equal(out, out2)
    # queries that see no key at all give zeros
    assert torch.all(out[0, :, :40] == 0)
    # fully dense config with padding equals masked dense attention
    cfgd = SuperlinearConfig.exact()
    outd = superlinear_attention(q, k, v, config=cfgd, key_padding_mask=kpm)
    mask = torch.tril(torch.ones(300, 300, dtype=torch.bool))[None, None] & kpm[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).nan_to_num(0.0)
    ref[0, :, :40] = 0
    assert (outd - ref).abs().max() < 1e-5


def test_half_precision_runs_and_is_close():
    torch.manual_seed(8)
    q, k, v = rand(1, 2, 300, 32), rand(1, 2, 300, 32), rand(1, 2, 300, 32)
    cfg = SuperlinearConfig.exact()
    for dt in (torch.bfloat16, torch.float16):
        out = superlinear_attention(q.to(dt), k.to(dt), v.to(dt), config=cfg)
        assert out.dtype == dt
        assert (out.float() - dense_causal(q, k, v)).abs().max() < 2e-2


def test_reference_scales_to_long_sequences():
    # memory is O(L * budget): a 4K prefill never builds an L x L matrix
    torch.manual_seed(9)
    L = 4096
    q, k, v = rand(1, 2, L, 32), rand(1, 1, L, 32), rand(1, 1, L, 32)
    cfg = SuperlinearConfig(search_key="anchor", dense_below=0)
    out = superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
    assert out.shape == (1, 2, L, 32) and torch.isfinite(out).all()
    # spot-check a few late queries against the oracle
    idx = torch.tensor([[L - 1, L - 500, 3000]])
    sub = oracle_attention(q[:, :, idx[0]], k, v, cfg.to_dict(),
                           1 / math.sqrt(32), query_positions=idx)
    assert (out[:, :, idx[0]].double() - sub).abs().max() < 1e-5
