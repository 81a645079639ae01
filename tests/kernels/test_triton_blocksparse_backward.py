"""The block-sparse attention backward (kernels/triton_blocksparse_backward.py) and the forward's
log-sum-exp output against torch, under TRITON_INTERPRET=1 on CPU.

Gradients are compared with torch autograd through the reference `blocksparse.block_attention`
(float32 copies of the inputs), or through a dense float64 masked softmax where the attended lists
are written by hand. Every test draws fresh random inputs and upstream gradients; the kernels write
into NaN-filled buffers after the allocator has been poisoned, and no NaN may survive.
"""

from __future__ import annotations

import pytest
import torch
from blocksparse_lists import full_lists, n_query_blocks, random_kept
from triton_env import DEV, poison, require_triton

triton = require_triton()

from slcompile.kernels import blocksparse as bs  # noqa: E402
from slcompile.kernels import triton_blocksparse as TB  # noqa: E402
from slcompile.kernels import triton_blocksparse_backward as TBB  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _inputs(seed, B, Hq, Hkv, T, D, Dv, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, Dv, generator=g)
    do = torch.randn(B, Hq, T, Dv, generator=g)
    return g, *(x.to(dtype).to(DEV) for x in (q, k, v, do))


def _dense(q, k, v, full, p0, qb, kb, scale):
    """float64 (output, natural-log lse) of the queries at p0.. attending the blocks of ``full``
    [B, Hkv, nQ, F] (keys >= T never) and causally their own query block, as a masked softmax."""
    B, Hq, Lq, _ = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    t = torch.arange(p0, p0 + Lq, device=q.device)
    key = torch.arange(T, device=q.device)
    nK = -(-T // kb)
    table = torch.zeros(B, Hkv, full.shape[2], nK + 1, dtype=torch.bool, device=q.device)
    table.scatter_(3, torch.where((full >= 0) & (full < nK), full, nK).long(), True)
    listed = table[:, :, t // qb - p0 // qb][..., key // kb]  # [B, Hkv, Lq, T]
    diag = (key[None, :] >= (t[:, None] // qb) * qb) & (key[None, :] <= t[:, None])
    allowed = (listed | diag).repeat_interleave(G, 1)
    lg = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(G, 1)) * scale
    lg = lg.masked_fill(~allowed, float("-inf"))
    return torch.softmax(lg, -1) @ v.double().repeat_interleave(G, 1), lg.logsumexp(-1)


def _forward(q, k, v, kept, *, sb, wb, qb, kb, scale):
    """The forward's output and lse, the lse written into a NaN-filled buffer."""
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    out = TB.block_attention_triton(q, k, v, kept, 0, q_block=qb, k_block=kb, scale=scale,
                                    sink_blocks=sb, window_blocks=wb, lse=lse)
    assert not torch.isnan(lse).any()
    return out, lse


def _backward(q, k, v, out, lse, do, kept, **kw):
    """The kernels' gradients, written into NaN-filled buffers: every element must be written."""
    poison()
    bufs = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    got = TBB.block_attention_backward_triton(q, k, v, out, lse, do, kept, dq=bufs[0],
                                              dk=bufs[1], dv=bufs[2], **kw)
    assert all(a is b for a, b in zip(got, bufs))
    assert not any(torch.isnan(x).any() for x in got)
    return got


def _reference_grads(q, k, v, do, kept, *, window, sinks, qb, kb, scale):
    """Autograd through blocksparse.block_attention on float32 copies of the inputs."""
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out = bs.block_attention(*leaves, kept, None, 0, window=window, sinks=sinks, q_block=qb,
                             k_block=kb, scale=scale)
    out.backward(do.float())
    return [x.grad for x in leaves]


def _close(got, want, tol):
    """Elementwise closeness relative to the largest reference gradient."""
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        bound = tol * max(1.0, b.abs().max().item())
        err = (a.double() - b.double()).abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def _against_reference(q, k, v, do, kept, *, window, sinks, qb, kb, scale):
    T = k.shape[2]
    _, sb, wb, _ = bs.geometry(T, window, sinks, qb, kb)
    out, lse = _forward(q, k, v, kept, sb=sb, wb=wb, qb=qb, kb=kb, scale=scale)
    got = _backward(q, k, v, out, lse, do, kept, window_blocks=wb, sink_blocks=sb, q_block=qb,
                    k_block=kb, scale=scale)
    want = _reference_grads(q, k, v, do, kept, window=window, sinks=sinks, qb=qb, kb=kb,
                            scale=scale)
    _close(got, want, TOL[q.dtype])
    return got, want


PREFILL = [  # B, Hq, Hkv, T, D, Dv, qb, kb, window, sinks, topk, dtype
    (1, 4, 2, 200, 32, 32, 32, 16, 32, 16, 3, torch.float32),    # GQA, T not a block multiple
    (2, 2, 2, 161, 48, 40, 64, 32, 64, 0, 2, torch.float32),     # MHA, D=48, Dv != D
    (1, 4, 2, 250, 32, 32, 32, 16, 48, 20, 3, torch.bfloat16),
    (1, 2, 1, 200, 64, 32, 64, 32, 32, 32, 2, torch.float16),    # MQA
]


@pytest.mark.parametrize("case", PREFILL, ids=["gqa-fp32", "mha-d48-dv40", "bf16", "fp16-mqa"])
def test_prefill_gradients_match_the_reference(case):
    B, Hq, Hkv, T, D, Dv, qb, kb, W, S, K, dtype = case
    g, q, k, v, do = _inputs(T + D + Hq, B, Hq, Hkv, T, D, Dv, dtype)
    kw = dict(window=W, sinks=S, qb=qb, kb=kb)
    kept = random_kept(g, B, Hkv, T, topk=K, **kw)
    assert (kept < 0).any() and (kept >= 0).any()  # holes and kept blocks both
    _against_reference(q, k, v, do, kept, scale=D ** -0.5, **kw)


@pytest.mark.parametrize("window,sinks,topk", [(0, 48, 0), (64, 0, 2)],
                         ids=["sinks-only", "window-only"])
def test_sink_only_and_window_only_geometries(window, sinks, topk):
    T, qb, kb = 180, 32, 16
    g, q, k, v, do = _inputs(71 + window, 1, 4, 2, T, 32, 32, torch.float32)
    kept = torch.full((1, 2, n_query_blocks(0, T, qb), topk), -1, dtype=torch.int64, device=DEV)
    _against_reference(q, k, v, do, kept, window=window, sinks=sinks, qb=qb, kb=kb, scale=0.2)


def test_empty_kept_lists_give_block_diagonal_gradients():
    T, qb, kb = 150, 32, 16
    g, q, k, v, do = _inputs(81, 1, 4, 2, T, 32, 32, torch.float32)
    kw = dict(window=0, sinks=0, qb=qb, kb=kb, scale=0.25)
    empty = torch.empty(1, 2, n_query_blocks(0, T, qb), 0, dtype=torch.int32, device=DEV)
    got, _ = _against_reference(q, k, v, do, empty, **kw)
    # no list: each query block's gradients are those of causal attention inside it alone
    lo, hi = 2 * qb, 3 * qb
    alone = torch.empty(1, 2, 1, 0, dtype=torch.int32, device=DEV)
    part = _reference_grads(*(x[:, :, lo:hi] for x in (q, k, v, do)), alone, **kw)
    _close([x[:, :, lo:hi] for x in got], part, 1e-4)


def test_kept_blocks_from_block_select_strided_inputs_and_negative_scale():
    T, qb, kb = 192, 64, 32
    g, q, k, v, do = _inputs(91, 1, 4, 2, T, 32, 32, torch.float32)
    # [B, L, H, D] storage seen as [B, H, L, D]
    q, k, v, do = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, do))
    kept = bs.block_select(q, k, None, 0, window=32, sinks=32, topk=2, q_block=qb, k_block=kb,
                           rows=8, pool=8)
    assert (kept >= 0).any()
    for scale in (0.2, -0.2):
        _against_reference(q, k, v, do, kept, window=32, sinks=32, qb=qb, kb=kb, scale=scale)


def test_wide_heads():
    T, qb, kb = 80, 32, 16
    g, q, k, v, do = _inputs(101, 1, 2, 1, T, 256, 160, torch.float32)
    kept = random_kept(g, 1, 1, T, window=16, sinks=16, topk=1, qb=qb, kb=kb)
    _against_reference(q, k, v, do, kept, window=16, sinks=16, qb=qb, kb=kb, scale=0.06)


def test_listed_partial_block_against_a_dense_softmax():
    """Whole attended lists (no sinks or window added) holding the partial last key block, a block
    past the keys and a later block; checked in float64 against a masked dense softmax."""
    T, qb, kb = 200, 32, 16  # key block 12 holds keys 192..199 only, block 13 none
    g, q, k, v, do = _inputs(111, 1, 4, 2, T, 32, 32, torch.float32)
    nQ = n_query_blocks(0, T, qb)
    full = torch.full((1, 2, nQ, 4), -1, dtype=torch.int64, device=DEV)
    full[:, :, :nQ - 1, 0] = 12
    full[:, 1, :nQ - 1, 2] = 13
    full[:, 0, 3, 3] = 9
    full[:, :, 5, 1] = 0
    out, lse = _forward(q, k, v, full, sb=0, wb=0, qb=qb, kb=kb, scale=0.3)
    got = _backward(q, k, v, out, lse, do, full, window_blocks=0, sink_blocks=0, q_block=qb,
                    k_block=kb, scale=0.3)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want, want_lse = _dense(*leaves, full, 0, qb, kb, 0.3)
    want.backward(do.double())
    torch.testing.assert_close(lse.double(), want_lse.detach(), atol=1e-5, rtol=1e-5)
    _close(got, [x.grad for x in leaves], 1e-5)


@pytest.mark.parametrize("p0,Lq,dtype", [(0, 200, torch.float32), (150, 37, torch.float32),
                                         (0, 200, torch.bfloat16)])
def test_forward_lse_matches_torch(p0, Lq, dtype):
    T, qb, kb = 200, 32, 16
    g, q, k, v, _ = _inputs(121 + p0, 1, 4, 2, T, 32, 32, dtype)
    q = q[:, :, p0:p0 + Lq]
    kw = dict(window=32, sinks=16, qb=qb, kb=kb)
    kept = random_kept(g, 1, 2, T, topk=2, p0=p0, Lq=Lq, **kw)
    full = full_lists(kept, p0, T, **kw)
    lse = torch.full((1, 4, Lq), float("nan"), device=DEV)
    out = TB.block_attention_triton(q, k, v, full, p0, q_block=qb, k_block=kb, scale=0.2, lse=lse)
    want, want_lse = _dense(q, k, v, full, p0, qb, kb, 0.2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), want, atol=10 * tol, rtol=10 * tol)
    # the same output as without lse
    same = TB.block_attention_triton(q, k, v, full, p0, q_block=qb, k_block=kb, scale=0.2)
    assert torch.equal(same, out)


def test_transposed_lists():
    T, qb, kb = 200, 32, 16
    g = torch.Generator().manual_seed(131)
    kw = dict(window=32, sinks=16, qb=qb, kb=kb)
    kept = random_kept(g, 2, 2, T, topk=3, **kw)
    _, sb, wb, _ = bs.geometry(T, 32, 16, qb, kb)
    nQ, nK = n_query_blocks(0, T, qb), -(-T // kb)
    lst = TB.compact_lists(kept, T, qb, kb, 0, sb, wb)
    offsets, qblk = TBB.transposed_lists(lst, 4, nQ, nK)
    full = full_lists(kept, 0, T, **kw).view(4, nQ, -1)
    for bh in range(4):
        for i in range(nK):
            want = [n for n in range(nQ) if i in full[bh, n].tolist()]
            got = qblk[offsets[bh * nK + i]:offsets[bh * nK + i + 1]].tolist()
            assert got == want


def test_rejects_bad_arguments():
    g, q, k, v, do = _inputs(141, 1, 4, 2, 64, 16, 16, torch.float32)
    kept = torch.full((1, 2, 2, 1), -1, dtype=torch.int32, device=DEV)
    lse = torch.zeros(1, 4, 64, device=DEV)
    kw = dict(window_blocks=0, sink_blocks=0, q_block=32, k_block=16, scale=0.25)
    f = TBB.block_attention_backward_triton
    with pytest.raises(ValueError, match="prefill"):
        f(q[:, :, :32], k, v, do[:, :, :32], lse[:, :, :32], do[:, :, :32], kept[:, :, :1], **kw)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        f(q[:, :3], k, v, do[:, :3], lse[:, :3], do[:, :3], kept, **kw)
    with pytest.raises(ValueError, match="dtypes"):
        f(q, k.half(), v, do, lse, do, kept, **kw)
    with pytest.raises(ValueError, match="lse"):
        f(q, k, v, do, lse.double(), do, kept, **kw)
    with pytest.raises(ValueError, match="nQ"):
        f(q, k, v, do, lse, do, kept[:, :, :1], **kw)
    with pytest.raises(ValueError, match="multiple of k_block"):
        f(q, k, v, do, lse, do, kept, **{**kw, "q_block": 16, "k_block": 32})
    with pytest.raises(ValueError, match="dk must be"):
        f(q, k, v, do, lse, do, kept, dk=torch.empty_like(q), **kw)


def test_the_op_backward_runs_these_kernels_for_a_prefill(monkeypatch):
    """Gradients of the custom op (as a rewritten model calls it) for a prefill: the search and the
    forward run again, then these kernels; equal to autograd through the reference search and
    attention in float64."""
    from triton_env import through_triton

    import slcompile
    from slcompile.kernels.config import SuperlinearConfig

    calls = through_triton(monkeypatch, (TBB, "block_attention_backward_triton"))
    _, q, k, v, do = _inputs(31, 1, 4, 2, 200, 16, 16, torch.float32)
    cfg = SuperlinearConfig(search_key="blocksparse", window=32, sinks=4, topk=2, dense_below=0,
                            q_block=32, k_block=16, block_rows=4, block_pool=2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = slcompile.superlinear_attention(*leaves, config=cfg, enable_gqa=True)
    poison()
    got = torch.autograd.grad(out, leaves, do)
    assert calls == ["block_attention_backward_triton"]
    kept = bs.block_select(q, k, None, 0, window=32, sinks=4, topk=2, q_block=32, k_block=16,
                           rows=4, pool=2, group=cfg.block_group, spread=cfg.spread_rows,
                           exact_rows=cfg.exact_rows)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = bs.block_attention(*ref_leaves, kept, None, 0, window=32, sinks=4, q_block=32,
                             k_block=16, scale=0.25)
    want = torch.autograd.grad(ref, ref_leaves, do.double())
    for a, b in zip(got, want):
        assert not torch.isnan(a).any() and b.abs().max() > 0
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_launches_refused_for_shared_memory_shrink_until_they_fit():
    """Where Triton refuses a launch for its shared memory (a GPU with less than the H100's), the
    backward retries (`launch.refit`) with one stage, then halved tiles, and gives up below 16 or
    on another refusal."""
    from triton.runtime.errors import OutOfResources
    from slcompile.kernels.launch import refit
    tried = []

    def launch(tiles):
        bm, bn, warps, stages = tiles
        tried.append((bm, bn, stages))
        if bm * bn * stages > 32 * 32:
            raise OutOfResources(bm * bn * stages, 32 * 32, "shared memory")

    refit(launch, (64, 64, 4, 2), TBB._smaller_tiles)
    assert tried == [(64, 64, 2), (64, 64, 1), (32, 32, 1)]
    tried.clear()

    def refused(name):
        def launch(tiles):
            tried.append(tiles)
            raise OutOfResources(1, 0, name)
        return launch

    with pytest.raises(OutOfResources):
        refit(refused("shared memory"), (32, 32, 4, 1), TBB._smaller_tiles)
    assert tried == [(32, 32, 4, 1), (16, 16, 4, 1)]
    with pytest.raises(OutOfResources, match="threads"):
        refit(refused("threads"), (64, 64, 4, 2), TBB._smaller_tiles)
