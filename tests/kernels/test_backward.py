"""Gradients of the superlinear ops (kernels/autograd.py) and the Triton backward kernels
(kernels/triton_backward.py).

Oracles: the brute-force oracle of tests/oracle.py differentiated by autograd (float64, its own
loops over explicit key sets), finite differences (torch.autograd.gradcheck in float64), and an
autograd-differentiated float64 recomputation of the search scores. The Triton kernels run under
TRITON_INTERPRET=1 on CPU against the CPU backward, on tiny shapes, with poisoned memory.
"""

from __future__ import annotations

import os

import pytest
import torch

from triton_env import DEV, poison, require_triton
from oracle import oracle_attention  # noqa: E402

from slcompile.kernels import autograd as AG  # noqa: E402
from slcompile.kernels import ops  # noqa: E402
from slcompile.kernels import reference as R  # noqa: E402
from slcompile.kernels.geometry import span_extents  # noqa: E402

F64 = torch.float64


def _cfg(**kw):
    c = dict(window=6, sinks=2, topk=3, search_power=0.5, span_power=0.5, backward_factor=2.0,
             forward_factor=0.0, combine="union", search_key="anchor", dense_below=0)
    c.update(kw)
    return c


def _inputs(seed, B, Hq, Hkv, Lq, T, D, dtype=F64, pad=False, pos=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    qs = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    kpm = (torch.rand(B, T, generator=g) > 0.25) if pad else None
    qp = torch.randint(0, T, (B, Lq), generator=g) if pos else None
    return q, qs, k, v, kpm, qp


def _search(qs, k, kpm, qp, c):
    return torch.ops.superlinear.span_search(
        qs, k, kpm, qp, c["window"], c["topk"], c["search_power"], c["span_power"],
        c["backward_factor"], c["forward_factor"], c["search_key"], c["dense_below"])


def _attn_args(c, scale):
    return (c["window"], c["sinks"], c["span_power"], c["backward_factor"], c["forward_factor"],
            c["combine"], scale, c["dense_below"])


# --------------------------------------------------------------------------------------------
# CPU backward (the op's registered autograd)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("combine,pad,pos,Hkv,dense_below", [
    ("union", False, False, 2, 0),
    ("gated", True, True, 2, 0),
    ("gated", False, True, 1, 0),
    ("union", True, False, 4, 100),
])
def test_qkv_gradients_match_bruteforce_oracle(combine, pad, pos, Hkv, dense_below):
    """d q, d k, d v of span_attention (anchors from a search on other tensors) against autograd
    through the brute-force oracle, float64; also the forward."""
    c = _cfg(combine=combine, dense_below=dense_below)
    q, qs, k, v, kpm, qp = _inputs(11 + Hkv, 1, 4, Hkv, 16, 40, 8, pad=pad, pos=pos)
    a, s = _search(qs, k, kpm, qp, c)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = torch.ops.superlinear.span_attention(q, k, v, a, s, kpm, qp, *_attn_args(c, 0.4))
    ref = oracle_attention(q, k, v, c, 0.4, key_padding_mask=kpm, query_positions=qp,
                           search_query=qs)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)  # the forward runs in float32
    go = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), go)
    exp = torch.autograd.grad(ref, (q, k, v), go)
    # union: exact in float64; gated: the gate sees the search's float32 scores, the oracle
    # recomputes them in float64
    tol = 1e-10 if combine == "union" or dense_below else 1e-6
    for x, y in zip(got, exp):
        assert x.dtype == F64
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


class _Gathered(torch.autograd.Function):
    """The CPU forward/backward pair of span_attention as one autograd.Function, so that
    gradcheck holds the explicit backward (incl. d scores) to finite differences in float64."""

    @staticmethod
    def forward(ctx, q, k, v, scores, anchors, kpm, qp, params):
        ctx.save_for_backward(q, k, v, scores)
        ctx.rest = (anchors, kpm, qp, params)
        return AG.gathered_attention(q, k, v, anchors, scores, kpm, qp, *params)

    @staticmethod
    def backward(ctx, go):
        q, k, v, scores = ctx.saved_tensors
        anchors, kpm, qp, params = ctx.rest
        _, dq, dk, dv, ds = AG.gathered_attention(q, k, v, anchors, scores, kpm, qp, *params,
                                                  grad_out=go)
        return dq, dk, dv, ds, None, None, None, None


@pytest.mark.parametrize("combine,pad,pos", [
    ("gated", True, True),
    ("union", False, True),
    ("gated", False, False),
])
def test_gradcheck_float64(combine, pad, pos):
    c = _cfg(combine=combine, window=3)
    q, qs, k, v, kpm, qp = _inputs(5, 1, 2, 1, 12, 30, 4, pad=pad, pos=pos)
    a, s = _search(qs, k, kpm, qp, c)
    assert (a >= 0).sum() > 12  # spans are really in play
    s = s.double().masked_fill(a < 0, 0.0)  # finite everywhere (empty slots are masked anyway)
    s = s + 0.3 * torch.randn_like(s)
    ins = tuple(x.clone().requires_grad_() for x in (q, k, v, s))
    params = _attn_args(c, 0.5)
    assert torch.autograd.gradcheck(lambda *x: _Gathered.apply(*x, a, kpm, qp, params), ins,
                                    fast_mode=True)
    # the op's registered backward is this same backward: same numbers
    out = torch.ops.superlinear.span_attention(*ins[:3], a, ins[3], kpm, qp, *params)
    go = torch.randn_like(out)
    g_op = torch.autograd.grad(out, ins, go, allow_unused=True)
    g_ref = torch.autograd.grad(_Gathered.apply(*ins, a, kpm, qp, params), ins, go)
    for x, y, name in zip(g_op, g_ref, "qkvs"):
        if name == "s" and combine == "union":
            assert x is None  # union: scores get no gradient
            continue
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("search_key", ["anchor", "mean"])
def test_search_gradient_matches_float64_autograd(search_key):
    """span_search's backward against autograd through an explicit float64 recomputation of the
    kept scores (anchor key or mean of the present keys of the search span)."""
    c = _cfg(search_key=search_key)
    B, Hq, Hkv, Lq, T, D = 1, 4, 2, 14, 36, 6
    q, qs, k, v, kpm, qp = _inputs(3, B, Hq, Hkv, Lq, T, D, pad=True, pos=True)
    a, _ = _search(qs, k, kpm, qp, c)
    assert (a >= 0).sum() > 20
    qs_, k_ = qs.clone().requires_grad_(), k.clone().requires_grad_()
    back, fwd = span_extents(T, 0.5, 2.0, 0.0)
    scores = []
    for h in range(Hq):
        for i in range(Lq):
            t = int(qp[0, i])
            for j in range(c["topk"]):
                aj = int(a[0, h, i, j])
                if aj < 0:
                    continue
                if search_key == "anchor":
                    key = k_[0, h // 2, aj]
                else:
                    lo, hi = max(0, aj - int(back[t])), min(aj + int(fwd[t]), t - c["window"])
                    rows = [p for p in range(lo, hi + 1) if kpm[0, p]]
                    key = k_[0, h // 2, rows].mean(0)
                scores.append((h, i, j, qs_[0, h, i] @ key))
    gs = torch.randn(B, Hq, Lq, c["topk"], dtype=F64)
    total = sum(gs[0, h, i, j] * sc for h, i, j, sc in scores)
    e_qs, e_k = torch.autograd.grad(total, (qs_, k_))
    d_qs, d_k = AG.search_backward(gs.float(), qs, k, kpm, qp, a, c["window"], 0.5, 2.0, 0.0,
                                   search_key, 0)
    torch.testing.assert_close(d_qs, e_qs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d_k, e_k, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("search_key", ["anchor", "mean"])
def test_gradcheck_whole_chain_search_query(search_key):
    """search -> gated attention as ops, float64 in, float32 inside: finite differences (eps
    1e-3, tolerance to match) agree with the gradients of q, k, v and the search query."""
    c = _cfg(combine="gated", search_key=search_key)
    q, qs, k, v, kpm, qp = _inputs(17, 1, 2, 1, 10, 28, 4, pad=True, pos=True)
    params = _attn_args(c, 0.5)

    def chain(q, k, v, qs):
        a, s = _search(qs, k, kpm, qp, c)
        return torch.ops.superlinear.span_attention(q, k, v, a, s, kpm, qp, *params)

    ins = tuple(x.clone().requires_grad_() for x in (q, k, v, qs))
    out = chain(*ins)
    g = torch.autograd.grad(out.sum(), ins[3])[0]
    assert g.abs().max() > 1e-3  # the search query really learns through the gate
    assert torch.autograd.gradcheck(chain, ins, eps=1e-3, atol=3e-3, rtol=3e-3, fast_mode=True)


def test_what_gets_no_gradient(monkeypatch):
    """No gradient reaches the search query in union mode, nor in gated mode through a search
    kind without ``search_grad`` (a registered copy of "anchor": every stripe kind has one)."""
    import dataclasses

    from slcompile.kernels import searches

    nograd = dataclasses.replace(searches.kind("anchor"), name="anchor_nograd", search_grad=False)
    monkeypatch.setitem(searches.REGISTRY, nograd.name, nograd)
    q, qs, k, v, kpm, qp = _inputs(2, 1, 2, 1, 10, 30, 4)
    for combine, search_key in (("union", "anchor"), ("union", "mean"), ("gated", nograd.name)):
        c = _cfg(combine=combine, search_key=search_key)
        qs_ = qs.clone().requires_grad_()
        q_ = q.clone().requires_grad_()
        a, s = _search(qs_, k, kpm, qp, c)
        out = torch.ops.superlinear.span_attention(q_, k, v, a, s, kpm, qp, *_attn_args(c, 0.5))
        dq, dqs = torch.autograd.grad(out.sum(), (q_, qs_), allow_unused=True)
        assert dq is not None and dq.abs().max() > 0
        assert dqs is None or bool((dqs == 0).all())


# --------------------------------------------------------------------------------------------
# Triton backward (interpreter on CPU, CUDA when present)
# --------------------------------------------------------------------------------------------

def _triton():
    require_triton()
    from slcompile.kernels import triton_backward

    return triton_backward


@pytest.mark.parametrize("combine,pad,pos,dtype,dense_below,Hq,Hkv,T,give_out", [
    ("union", False, False, torch.float32, 0, 2, 1, 40, False),
    ("union", True, True, torch.bfloat16, 0, 4, 2, 400, True),
    ("gated", True, True, torch.float32, 0, 4, 2, 40, False),
    ("gated", False, True, torch.float32, 0, 2, 1, 400, False),
    ("union", True, True, torch.float32, 100, 2, 1, 40, True),
    ("gated", False, False, torch.bfloat16, 0, 2, 1, 40, False),
])
def test_triton_backward_matches_cpu_backward(combine, pad, pos, dtype, dense_below, Hq, Hkv, T,
                                              give_out):
    """T=400 with queries spread over it: pieces in several lo buckets of the backward's sort
    (its key-major candidate ranges); give_out: union's delta from the forward's output, else
    the backward recomputes the forward."""
    TB = _triton()
    from slcompile.kernels import triton_attention as TA
    c = _cfg(window=8, combine=combine, dense_below=dense_below)
    q, qs, k, v, kpm, qp = _inputs(23, 1, Hq, Hkv, 24, T, 16, dtype=dtype, pad=pad, pos=pos)
    a, s = R.span_search(qs, k, kpm, qp, 8, 3, 0.5, 0.5, 2.0, 0.0, "anchor", dense_below)
    if T > 100:
        assert (a[a >= 0] // TA.BUCKET).unique().numel() >= 3  # spans in several lo buckets
    go = torch.randn(q.shape).to(dtype)
    args = (q, k, v, a, s, kpm, qp, *_attn_args(c, 0.35))
    out, *ref = AG.gathered_attention(*args, grad_out=go)
    poison()
    got = TB.span_attention_backward(*(x.to(DEV) if torch.is_tensor(x) else x
                                       for x in (go, *args)),
                                     out=out.to(dtype).to(DEV) if give_out else None)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for x, y in zip(got, ref):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x.cpu().float(), y.float(), atol=tol * max(1.0, y.abs().max()),
                                   rtol=0)
    if combine == "gated" and dense_below == 0:
        assert ref[3].abs().max() > 1e-3


@pytest.mark.parametrize("combine", ["union", "gated"])
def test_triton_backward_tuning_is_a_per_call_option(combine):
    """Launch overrides travel with the call (no module state): other block sizes, warps and a
    small dk/dv chunk give the oracle's gradients too; an unknown key is refused."""
    TB = _triton()
    c = _cfg(window=8, combine=combine, dense_below=0)
    q, qs, k, v, kpm, qp = _inputs(31, 1, 4, 2, 24, 300, 16, dtype=torch.float32, pad=True,
                                   pos=True)
    a, s = R.span_search(qs, k, kpm, qp, 8, 3, 0.5, 0.5, 2.0, 0.0, "anchor", 0)
    go = torch.randn(q.shape)
    args = (q, k, v, a, s, kpm, qp, *_attn_args(c, 0.35))
    _, *ref = AG.gathered_attention(*args, grad_out=go)
    dev = [x.to(DEV) if torch.is_tensor(x) else x for x in (go, *args)]
    tuning = dict(dq_block_m=16, dq_block_n=16, kv_block_m=16, kv_block_n=16, st_block_m=16,
                  st_block_n=16, chunk=1, kv_warps=2)
    poison()
    got = TB.span_attention_backward(*dev, tuning=tuning)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x.cpu().float(), y.float(), atol=2e-5 * max(1.0, y.abs().max()),
                                   rtol=0)
    with pytest.raises(ValueError, match="unknown tuning key"):
        TB.span_attention_backward(*dev, tuning={"dq_blockm": 32})


@pytest.mark.parametrize("combine", ["union", "gated"])
def test_key_major_work_covers_each_touching_piece_once(combine):
    """The dk/dv work list (plain torch, no kernel) against brute force: for every kv group and
    key tile, the pieces of its listed blocks include every piece that reaches the tile, and no
    block is listed twice for a tile (that would add its dk, dv twice)."""
    TB = _triton()
    from slcompile.kernels import triton_attention as TA
    B, Hq, Hkv, L, W, S, topk = 1, 4, 2, 2000, 16, 4, 3
    g = torch.Generator().manual_seed(7)
    t = torch.arange(L)
    back, fwd = span_extents(L, 0.5, 2.0, 0.0)
    a = (t[None, None, :, None] - W - (torch.rand(B, Hq, L, topk, generator=g)
                                        * (t[None, None, :, None] - W + 1)).long())
    a = torch.where(a >= 0, a, -1).int()
    lo, hi, _, _ = TB.piece_tables(a, None, L, W, S, back, fwd, combine == "union", True, B, Hq,
                                   L, "cpu")
    NG, npair = B * Hkv, (Hq // Hkv) * L * (topk + 2)
    skey, idx = torch.sort(TA.sort_keys(lo, hi, L).view(NG, npair), dim=-1)
    cfg = dict(TB._settings(torch.bfloat16, 128), kv_block_m=64, kv_block_n=64, chunk=256)
    items, blist = TB._key_major_work(lo, hi, idx.int(), skey, L, S, NG, npair, cfg)
    ntile = -(-L // 64)
    cover = torch.zeros(NG, ntile, npair, dtype=torch.int64)  # by position in sorted order
    for grp, tile, j0, j1 in items.tolist():
        for blk in blist[j0:j1].tolist():
            cover[grp, tile, blk * 64:(blk + 1) * 64] += 1
    lo_s, hi_s = (x.view(NG, npair).gather(1, idx) for x in (lo, hi))
    n0 = torch.arange(ntile) * 64
    touch = ((hi_s >= lo_s)[:, None] & (hi_s[:, None] >= n0[None, :, None])
             & (lo_s[:, None] <= n0[None, :, None] + 63))
    assert touch.sum() > 2 * npair  # pieces reach several tiles
    assert bool((cover[touch] == 1).all())
    assert int(cover.max()) == 1
    assert cover.sum() < 4 * touch.sum()  # and the list is not everything


@pytest.mark.parametrize("combine", ["gated", "union"])
def test_ops_route_backward_through_triton_when_forced(combine):
    _triton()
    c = _cfg(window=8, combine=combine)
    q, qs, k, v, kpm, qp = _inputs(29, 1, 2, 1, 20, 36, 16, dtype=torch.float32)
    a, s = R.span_search(qs, k, kpm, qp, 8, 3, 0.5, 0.5, 2.0, 0.0, "anchor", 0)
    params = _attn_args(c, 0.3)
    grads = []
    for forced in (False, True):
        ops.force_triton(forced)
        try:
            ins = [x.clone().requires_grad_() for x in (q, k, v, s)]
            out = torch.ops.superlinear.span_attention(*ins[:3], a, ins[3], kpm, qp, *params)
            grads.append(torch.autograd.grad(out.square().sum(), ins, allow_unused=True))
        finally:
            ops.force_triton(os.environ.get("SLCOMPILE_FORCE_TRITON", "") == "1")
    for x, y in zip(*grads):
        if combine == "union" and x is None:  # the scores
            assert y is None
            continue
        torch.testing.assert_close(x, y, atol=3e-5, rtol=1e-4)
