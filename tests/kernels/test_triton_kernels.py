"""The Triton kernels (span_search, span_attention) against the reference, under TRITON_INTERPRET=1.

Small shapes, fresh random inputs, poisoned outputs (the kernels allocate their outputs with
torch.empty; the tests additionally fill the allocator's memory with NaN first). Span-attention is
tested given the reference's anchors, so that a near-tied search score cannot change what is
compared. Span-search is compared robustly: the kept scores must equal the reference's top-k score
values, and every kept anchor must be a legal stripe anchor whose recomputed score is its score.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from triton_env import DEV, poison, require_triton, through_triton

triton = require_triton()

from slcompile.kernels import reference as R  # noqa: E402
from slcompile.kernels.geometry import num_stripes, stripe_deltas  # noqa: E402
from slcompile.kernels import triton_attention as TA  # noqa: E402
from slcompile.kernels import triton_impl as TI  # noqa: E402
from slcompile.kernels import triton_search as TS  # noqa: E402

DEFAULT = dict(window=64, sinks=4, topk=3, search_power=0.5, span_power=0.5,
               backward_factor=2.0, forward_factor=0.0, combine="union", search_key="anchor")


def _inputs(gen, B, Hq, Hkv, Lq, T, D, Dv=None, dtype=torch.float32):
    Dv = Dv or D
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, T, Dv, generator=gen).to(dtype)
    return q.to(DEV), k.to(DEV), v.to(DEV)


def _search_args(cfg, dense_below=0):
    return (cfg["window"], cfg["topk"], cfg["search_power"], cfg["span_power"],
            cfg["backward_factor"], cfg["forward_factor"], cfg["search_key"], dense_below)


def _attn_args(cfg, scale, dense_below=0):
    return (cfg["window"], cfg["sinks"], cfg["span_power"], cfg["backward_factor"],
            cfg["forward_factor"], cfg["combine"], scale, dense_below)


def _key_of(k, kpm, pos, a, cfg):
    """Recompute search keys for anchors a [B, Hq, Lq, kk] (anchor or mean key), float64."""
    B, Hkv, T, D = k.shape
    Hq = a.shape[1]
    g = Hq // Hkv
    kd = k.double()
    if kpm is not None:
        kd = kd * kpm[:, None, :, None]
    out = torch.zeros(*a.shape, D, dtype=torch.float64)
    from slcompile.kernels.geometry import span_extents
    back, fwd = span_extents(T, cfg["span_power"], cfg["backward_factor"], cfg["forward_factor"])
    for b in range(B):
        for h in range(Hq):
            for i in range(a.shape[2]):
                t = int(pos[b, i])
                for j in range(a.shape[3]):
                    x = int(a[b, h, i, j])
                    if x < 0:
                        continue
                    if cfg["search_key"] == "anchor":
                        out[b, h, i, j] = kd[b, h // g, x]
                    else:
                        lo = max(x - int(back[t]), 0)
                        hi = max(min(x + int(fwd[t]), t - min(cfg["window"], T)), 0)
                        n = (kpm[b, lo:hi + 1].sum().item() if kpm is not None else hi - lo + 1)
                        out[b, h, i, j] = kd[b, h // g, lo:hi + 1].sum(0) / max(n, 1)
    return out


def _check_search(qs, k, kpm, qpos, cfg, a, s):
    ra, rs = R.span_search(qs.cpu(), k.cpu(), None if kpm is None else kpm.cpu(),
                           None if qpos is None else qpos.cpu(), *_search_args(cfg))
    a, s = a.cpu(), s.cpu()
    assert a.dtype == torch.int32 and s.dtype == torch.float32
    assert not torch.isnan(s).any(), "unwritten (NaN) score"
    # 1. the kept score values are the reference's top-k values (same order, same empties)
    assert torch.equal(torch.isinf(s), torch.isinf(rs))
    assert torch.equal(a < 0, ra < 0)
    fin = torch.isfinite(rs)
    assert torch.allclose(s[fin], rs[fin], rtol=1e-5, atol=1e-5)
    # 2. every kept anchor is a legal stripe anchor, unique per query, with the score it claims
    B, Hq, Lq, kk = a.shape
    T = k.shape[2]
    pos = R.default_positions(B, Lq, T, "cpu") if qpos is None else qpos.cpu().long()
    deltas = set(stripe_deltas(num_stripes(T, cfg["search_power"]), cfg["search_power"]).tolist())
    W = min(cfg["window"], T)
    off = pos[:, None, :, None] - a.long()
    ok = a >= 0
    legal = torch.tensor([[[[(int(d) in deltas and d >= W) for d in row] for row in hh]
                           for hh in bb] for bb in off.tolist()])
    assert legal[ok].all(), "an anchor is not at a stripe offset past the window"
    if kpm is not None:
        assert kpm.cpu()[torch.arange(B)[:, None, None, None].expand_as(a)[ok], a.long()[ok]].all()
    for j in range(1, kk):
        for jj in range(j):
            assert not ((a[..., j] == a[..., jj]) & ok[..., j]).any(), "duplicate anchor"
    keys = _key_of(k.cpu(), None if kpm is None else kpm.cpu(), pos, a, cfg)
    rec = torch.einsum("bhld,bhlkd->bhlk", qs.cpu().double(), keys)
    assert torch.allclose(s[ok].double(), rec[ok], rtol=1e-5, atol=1e-5)
    # 3. exact agreement wherever the reference's kept scores are not near-tied
    agree = (a == ra) | ~ok
    assert agree.float().mean() > 0.95


SEARCH_CASES = [
    # name, B, Hq, Hkv, Lq, T, D, cfg changes, padding, positions
    ("default_gqa", 1, 4, 2, 110, 110, 32, dict(window=16), False, None),
    ("mean_pad_cache", 2, 2, 1, 48, 140, 24, dict(window=8, search_key="mean", topk=5,
                                                 forward_factor=0.5), True, "cache"),
    ("p_third_random_pos", 1, 2, 2, 40, 130, 16, dict(window=5, search_power=1 / 3, topk=2),
     False, "random"),
]


@pytest.mark.parametrize("case", SEARCH_CASES, ids=[c[0] for c in SEARCH_CASES])
def test_span_search_matches_reference(case):
    name, B, Hq, Hkv, Lq, T, D, ch, pad, posmode = case
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    cfg = {**DEFAULT, **ch}
    qs, k, _ = _inputs(gen, B, Hq, Hkv, Lq, T, D)
    kpm = None
    if pad:
        kpm = torch.rand(B, T, generator=gen) > 0.25
        kpm[0, :7] = False  # left padding too
        kpm = kpm.to(DEV)
    qpos = None
    if posmode == "random":
        qpos = torch.stack([torch.randperm(T, generator=gen)[:Lq] for _ in range(B)]).to(DEV)
    elif posmode == "cache":
        qpos = (torch.arange(Lq) + T - Lq).expand(B, Lq).contiguous().to(DEV)
    poison()
    a, s = TS.span_search(qs, k, kpm, qpos, *_search_args(cfg))
    _check_search(qs, k, kpm, qpos, cfg, a, s)


ATTN_CASES = [
    # name, B, Hq, Hkv, Lq, T, D, Dv, dtype, cfg changes, padding, positions
    ("union_default", 1, 4, 2, 100, 100, 32, None, torch.float32, dict(window=12), False, None),
    ("gated_pad", 1, 2, 1, 96, 96, 32, None, torch.float32,
     dict(window=8, combine="gated", topk=4), True, None),
    ("union_d80_cache_ff", 2, 2, 2, 40, 120, 80, 48, torch.float32,
     dict(window=6, sinks=2, forward_factor=1.0, topk=2), True, "cache"),
    ("gated_random_pos_w0", 1, 2, 1, 33, 100, 16, None, torch.float32,
     dict(window=0, sinks=1, combine="gated", topk=2), False, "random"),
    ("union_w0_s0", 1, 2, 1, 40, 60, 16, None, torch.float32,
     dict(window=0, sinks=0, topk=2), False, None),
    ("bf16_union", 1, 2, 1, 80, 80, 64, None, torch.bfloat16, dict(window=8), False, None),
    ("fp16_gated", 1, 2, 2, 70, 70, 96, None, torch.float16,
     dict(window=8, combine="gated"), False, None),
]


_TILE_CASES = [(c, "tile") for c in ATTN_CASES if c[0] in ("gated_pad", "union_d80_cache_ff")]


@pytest.mark.parametrize("case,impl", [(c, "pairs") for c in ATTN_CASES] + _TILE_CASES,
                         ids=[c[0] for c in ATTN_CASES] + [c[0] + "-tile" for c, _ in _TILE_CASES])
def test_span_attention_matches_reference(case, impl):
    name, B, Hq, Hkv, Lq, T, D, Dv, dtype, ch, pad, posmode = case
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    cfg = {**DEFAULT, **ch}
    q, k, v = _inputs(gen, B, Hq, Hkv, Lq, T, D, Dv, dtype)
    kpm = None
    if pad:
        kpm = torch.rand(B, T, generator=gen) > 0.2
        kpm[0, :5] = False
        kpm = kpm.to(DEV)
    qpos = None
    if posmode == "random":
        qpos = torch.stack([torch.randperm(T, generator=gen)[:Lq] for _ in range(B)]).to(DEV)
    elif posmode == "cache":
        qpos = (torch.arange(Lq) + T - Lq).expand(B, Lq).contiguous().to(DEV)
    scale = 1.0 / math.sqrt(D)
    a, s = R.span_search(q, k, kpm, qpos, *_search_args(cfg))
    assert (a >= 0).any()
    poison()
    out = TA.span_attention(q, k, v, a, s, kpm, qpos, *_attn_args(cfg, scale), impl=impl)
    ref = R.span_attention(q.float(), k.float(), v.float(), a, s, kpm, qpos,
                           *_attn_args(cfg, scale))
    assert out.dtype == dtype and out.shape == ref.shape
    assert not torch.isnan(out).any(), "unwritten (NaN) output"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert err < tol, f"relative error {err:.3g} > {tol}"
    if kpm is not None:  # rows with every key removed give zeros, like the reference
        dead = ref.abs().sum(-1) == 0
        assert (out[dead] == 0).all()


def test_union_pieces_are_disjoint_and_cover_the_spans():
    """span_pieces (union): the pieces of a query are disjoint, avoid sinks and window, and
    their union equals the union of its spans minus the sinks (checked position by position)."""
    from slcompile.kernels.geometry import span_extents
    gen = torch.Generator().manual_seed(3)
    B, Hq, Lq, T, k, W, S = 2, 3, 50, 400, 5, 6, 3
    pos = torch.randint(0, T, (B, Lq), generator=gen)
    anchors = torch.randint(-1, T, (B, Hq, Lq, k), generator=gen).to(torch.int32)
    anchors = torch.minimum(anchors, pos[:, None, :, None].to(torch.int32))
    back, fwd = span_extents(T, 0.5, 2.0, 1.0)
    lo_t, hi_t, ok_t = TA.span_pieces(anchors, pos, T, W, S, back, fwd, union=True)
    lo_k, hi_k = TA.span_pieces_triton(anchors, pos, T, W, S, back, fwd, True)
    for lo, hi in ((lo_t, hi_t), (lo_k, hi_k)):
        _check_pieces(lo, hi, anchors, pos, back, fwd, B, Hq, Lq, k, W, S)
    # gated: span j as is (minus sinks), slot by slot
    lo_g, hi_g = TA.span_pieces_triton(anchors, pos, T, W, S, back, fwd, False)
    a = anchors.long()
    t = pos[:, None, :, None]
    lo_w = torch.maximum(a - back[t], torch.tensor(S))
    hi_w = torch.minimum(a + fwd[t], t - W)
    ok_w = (a >= 0) & (hi_w >= lo_w)
    assert torch.equal(hi_g >= lo_g, ok_w)
    assert torch.equal(lo_g[ok_w].long(), lo_w[ok_w]) and torch.equal(hi_g[ok_w].long(), hi_w[ok_w])


def _check_pieces(lo, hi, anchors, pos, back, fwd, B, Hq, Lq, k, W, S):
    for b in range(B):
        for h in range(Hq):
            for i in range(Lq):
                t = int(pos[b, i])
                want = set()
                for a in anchors[b, h, i].tolist():
                    if a >= 0:
                        want |= set(range(max(a - int(back[t]), 0, S), min(a + int(fwd[t]), t - W) + 1))
                got = []
                for j in range(k):
                    got += list(range(int(lo[b, h, i, j]), int(hi[b, h, i, j]) + 1))
                assert len(got) == len(set(got)) and set(got) == want


@pytest.mark.parametrize("kw", [dict(lo_bucket=16, snake=False, pair_block_m=16, pair_block_n=16),
                                dict(lo_bucket=1, block_m=16, block_n=16)])
def test_pairs_path_options_give_the_same_result(kw):
    """Sort keys and block shapes only change which rows share a tile, never the result."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = _inputs(gen, 1, 2, 1, 64, 64, 32)
    kpm = (torch.rand(1, 64, generator=gen) > 0.1).to(DEV)
    cfg = {**DEFAULT, "window": 6, "topk": 4, "forward_factor": 0.5}
    a, s = R.span_search(q, k, kpm, None, *_search_args(cfg))
    out = TA.span_attention(q, k, v, a, s, kpm, None, *_attn_args(cfg, 0.2), **kw)
    ref = R.span_attention(q, k, v, a, s, kpm, None, *_attn_args(cfg, 0.2))
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("combine,posmode", [("union", None), ("gated", "random")])
def test_query_chunks_bound_memory_and_keep_the_result(monkeypatch, combine, posmode):
    """Past PARTIAL_BYTES of partial outputs the queries run in chunks; the result is unchanged."""
    gen = torch.Generator().manual_seed(29)
    B, Hq, Hkv, Lq, T, D = 2, 2, 1, 70, 90, 16
    q, k, v = _inputs(gen, B, Hq, Hkv, Lq, T, D)
    kpm = (torch.rand(B, T, generator=gen) > 0.1).to(DEV)
    qpos = (torch.stack([torch.randperm(T, generator=gen)[:Lq] for _ in range(B)]).to(DEV)
            if posmode else None)
    cfg = {**DEFAULT, "window": 6, "combine": combine}
    a, s = R.span_search(q, k, kpm, qpos, *_search_args(cfg))
    per_query = B * Hq * cfg["topk"] * D * 4
    monkeypatch.setattr(TA, "PARTIAL_BYTES", 16 * per_query)  # 16 queries per chunk, 5 chunks
    calls = []
    real_launch = TA.launch
    monkeypatch.setattr(TA, "launch", lambda q_, *a_, **k_: calls.append(q_.shape[2]) or
                        real_launch(q_, *a_, **k_))
    poison()
    out = TA.span_attention(q, k, v, a, s, kpm, qpos, *_attn_args(cfg, 0.25))
    ref = R.span_attention(q, k, v, a, s, kpm, qpos, *_attn_args(cfg, 0.25))
    assert calls == [16, 16, 16, 16, 6]
    assert not torch.isnan(out).any()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_dense_path_and_empty_rows():
    """T <= dense_below: exact causal attention through the kernel (CPU has no SDPA route)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = _inputs(gen, 1, 2, 1, 20, 70, 32)
    kpm = torch.ones(1, 70, dtype=torch.bool)
    kpm[0, :60] = False  # the first queries see nothing -> zeros
    qpos = torch.randint(0, 70, (1, 20), generator=gen)
    scale = 0.3
    poison()
    out = TI.span_attention(q, k, v, torch.empty(1, 2, 20, 3, dtype=torch.int32),
                            torch.empty(1, 2, 20, 3), kpm, qpos, 64, 4, 0.5, 2.0, 0.0, "union",
                            scale, 100)
    ref = R.dense_attention(q, k, v, kpm, qpos, scale)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    assert torch.equal(out.abs().sum(-1) == 0, ref.abs().sum(-1) == 0)
    a, s = TI.span_search(q, k, kpm, qpos, 64, 3, 0.5, 0.5, 2.0, 0.0, "anchor", 100)
    assert (a == -1).all() and torch.isinf(s).all()


def test_custom_ops_route_through_triton(monkeypatch):
    """ops.force_triton(True) sends the CPU ops through these kernels; the result equals the
    reference end to end (search + attention), and the Triton module was really called."""
    calls = through_triton(monkeypatch, (TI, "span_search"), (TI, "span_attention"))
    gen = torch.Generator().manual_seed(11)
    q, k, v = _inputs(gen, 1, 2, 1, 70, 70, 16)
    cfg = {**DEFAULT, "window": 8}
    a, s = torch.ops.superlinear.span_search(q, k, None, None, *_search_args(cfg))
    out = torch.ops.superlinear.span_attention(q, k, v, a, s, None, None, *_attn_args(cfg, 0.25))
    assert calls == ["span_search", "span_attention"]
    ref = R.superlinear_attention(q, k, v, dense_below=0, scale=0.25,
                                  **{n: cfg[n] for n in DEFAULT})
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 3, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        TS.span_search(q, k, None, None, 2, 3, 0.5, 0.5, 2.0, 0.0, "anchor", 0)
    with pytest.raises(ValueError, match="search_key"):
        TS.span_search(q, k[:, :1], None, None, 2, 3, 0.5, 0.5, 2.0, 0.0, "median", 0)
    a = torch.full((1, 3, 8, 3), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        TA.span_attention(q, k, k, a, a.float(), None, None, 2, 1, 0.5, 2.0, 0.0, "union", 1.0, 0)
    with pytest.raises(ValueError, match="combine"):
        TA.span_attention(q, k[:, :1], k[:, :1], a, a.float(), None, None, 2, 1, 0.5, 2.0, 0.0,
                          "sum", 1.0, 0)
    with pytest.raises(ValueError, match="dtype"):
        TA.span_attention(q.double(), k[:, :1].double(), k[:, :1].double(), a, a.float(), None,
                          None, 2, 1, 0.5, 2.0, 0.0, "union", 1.0, 0)


def test_gated_without_window_or_sinks():
    """No fixed keys at all (window=0, sinks=0), gated: each span's softmax stands alone.
    (The reference at commit f049c7f raised IndexError here: amax over an empty dim.)"""
    gen = torch.Generator().manual_seed(5)
    q, k, v = _inputs(gen, 1, 2, 1, 30, 50, 16)
    cfg = {**DEFAULT, "window": 0, "sinks": 0, "combine": "gated", "topk": 2}
    a, s = R.span_search(q, k, None, None, *_search_args(cfg))
    out = TA.span_attention(q, k, v, a, s, None, None, *_attn_args(cfg, 0.25))
    ref = R.span_attention(q, k, v, a, s, None, None, *_attn_args(cfg, 0.25))
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_search_options_give_identical_results():
    """Narrow q registers and fewer stripes per iteration change nothing, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    q, k, _ = _inputs(gen, 1, 4, 2, 56, 56, 32, dtype=torch.bfloat16)
    args = (None, None, 8, 3, 0.5, 0.5, 2.0, 0.0, "anchor", 0)
    a1, s1 = TS.span_search(q, k, *args, use_dot=False)
    a2, s2 = TS.span_search(q, k, *args, use_dot=False, q_f32=False, stripes_per_iter=2,
                            block_m=8)
    assert torch.equal(a1, a2) and torch.equal(s1, s2)
    assert (a1 >= 0).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_search_on_tensor_cores_matches_reference(dtype):
    """use_dot=True (bf16/fp16 anchor key): scores from a matrix product's diagonal."""
    gen = torch.Generator().manual_seed(8)
    qs, k, _ = _inputs(gen, 1, 6, 2, 60, 100, 32, dtype=dtype)
    kpm = (torch.rand(1, 100, generator=gen) > 0.2).to(DEV)
    qpos = torch.randperm(100, generator=gen)[:60][None].to(DEV)
    cfg = {**DEFAULT, "window": 8}
    poison()
    a, s = TS.span_search(qs, k, kpm, qpos, *_search_args(cfg), use_dot=True)
    _check_search(qs, k, kpm, qpos, cfg, a, s)


def test_unsupported_inputs_fall_back_to_the_reference():
    """float64 and head dims above 256 are not kernel cases: triton_impl runs the reference."""
    gen = torch.Generator().manual_seed(9)
    for dtype, D in ((torch.float64, 16), (torch.float32, 288)):
        q, k, v = _inputs(gen, 1, 2, 1, 40, 40, D, dtype=dtype)
        cfg = {**DEFAULT, "window": 4}
        a, s = TI.span_search(q, k, None, None, *_search_args(cfg))
        ra, rs = R.span_search(q, k, None, None, *_search_args(cfg))
        assert torch.equal(a, ra) and torch.equal(s, rs)
        out = TI.span_attention(q, k, v, a, s, None, None, *_attn_args(cfg, 0.1))
        ref = R.span_attention(q, k, v, a, s, None, None, *_attn_args(cfg, 0.1))
        assert out.dtype == dtype and torch.equal(out, ref)


@pytest.mark.parametrize("bucket,snake,sinks", [(64, True, True), (16, False, False),
                                                (4, True, False)])
def test_sort_keys_order_pieces_as_described(bucket, snake, sinks):
    """sort_keys against Python's sorted on the documented tuple: sinks slot first (by hi),
    then lo // bucket, then hi (descending in odd buckets with snake), empty pieces last."""
    gen = torch.Generator().manual_seed(5)
    T, n = 300, 7
    lo = torch.randint(0, T, (40, n), generator=gen)
    hi = torch.minimum(lo + torch.randint(-5, 60, (40, n), generator=gen), torch.tensor(T - 1))
    key = TA.sort_keys(lo.int(), hi.int(), T, sinks=sinks, bucket=bucket, snake=snake)

    def want(i, j):
        lo_, hi_ = int(lo.flatten()[i * n + j]), int(hi.flatten()[i * n + j])
        if hi_ < lo_:
            return (3, 0, 0)
        if sinks and j == n - 1:
            return (0, hi_, 0)
        c = lo_ // bucket
        return (1, c, -hi_ if snake and c % 2 else hi_)

    for i in range(lo.shape[0]):
        ranks = sorted(range(n), key=lambda j: want(i, j))
        got = sorted(range(n), key=lambda j: int(key[i, j]))
        assert [want(i, j) for j in got] == [want(i, j) for j in ranks]
