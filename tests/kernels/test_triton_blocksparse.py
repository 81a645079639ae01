"""The block-sparse attention kernel (kernels/triton_blocksparse.py) against the reference
`blocksparse.block_attention` (docs/blocksparse.md), under TRITON_INTERPRET=1 on CPU.

Small blocks (q_block 32/64, k_block 16/32) keep the interpreter quick. Every test draws fresh
random inputs; the attended lists are built by `attended_blocks` exactly as block_attention builds
them, from random kept lists (with -1 holes) or from `block_select`. The kernel writes into a
NaN-filled output buffer after the allocator has been poisoned, and no NaN may survive.
"""

from __future__ import annotations

import pytest
import torch
from blocksparse_lists import full_lists, n_query_blocks, random_kept
from triton_env import DEV, INTERPRETED, poison, require_triton

triton = require_triton()

from slcompile.kernels import blocksparse as bs  # noqa: E402
from slcompile.kernels import triton_blocksparse as TB  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _inputs(seed, B, Hq, Hkv, T, Lq, D, Dv, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, Dv, generator=g)
    return g, q.to(dtype).to(DEV), k.to(dtype).to(DEV), v.to(dtype).to(DEV)


def _kernel(q, k, v, full, p0, **kw):
    """The kernel's output, written into a NaN-filled buffer: every element must be written."""
    poison()
    out = torch.full((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), float("nan"),
                     dtype=q.dtype, device=q.device)
    got = TB.block_attention_triton(q, k, v, full, p0, out=out, **kw)
    assert got is out
    assert not torch.isnan(got).any()
    return got


def _against_reference(q, k, v, kept, p0, *, window, sinks, qb, kb, scale, list_dtype=None,
                       **launch):
    T = k.shape[2]
    full = full_lists(kept, p0, T, window=window, sinks=sinks, qb=qb, kb=kb)
    if list_dtype is not None:
        full = full.to(list_dtype)
    want = bs.block_attention(q, k, v, kept, None, p0, window=window, sinks=sinks, q_block=qb,
                              k_block=kb, scale=scale)
    got = _kernel(q, k, v, full, p0, q_block=qb, k_block=kb, scale=scale, **launch)
    tol = TOL[q.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # the kept blocks alone, the kernel putting the sinks and window first: the same lists
    _, sb, wb, _ = bs.geometry(T, window, sinks, qb, kb)
    alone = _kernel(q, k, v, kept if list_dtype is None else kept.to(list_dtype), p0, q_block=qb,
                    k_block=kb, scale=scale, sink_blocks=sb, window_blocks=wb, **launch)
    assert torch.equal(alone, got)
    return got, want


def _dense(q, k, v, p0, scale):
    """Dense causal attention of the queries at p0.., float64."""
    G = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    lg = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scale
    t = torch.arange(p0, p0 + q.shape[2], device=q.device)
    lg = lg.masked_fill(torch.arange(k.shape[2], device=q.device)[None, :] > t[:, None], float("-inf"))
    return torch.softmax(lg, -1) @ vv


def _select(q, k, p0, **kw):
    """block_select with the config's default representative rows and pool (8, 8)."""
    return bs.block_select(q, k, None, p0, rows=8, pool=8, **kw)


PREFILL = [  # B, Hq, Hkv, T, D, Dv, qb, kb, window, sinks, topk, dtype
    (1, 4, 2, 200, 32, 32, 32, 16, 32, 16, 3, torch.float32),    # GQA, T not a block multiple
    (2, 2, 2, 333, 48, 40, 64, 32, 64, 0, 2, torch.float32),     # MHA, D=48, Dv != D
    (1, 4, 2, 333, 32, 32, 32, 16, 48, 20, 3, torch.bfloat16),
    (1, 4, 1, 200, 64, 32, 64, 32, 32, 32, 2, torch.float16),    # MQA
]


@pytest.mark.parametrize("case", PREFILL, ids=["gqa-fp32", "mha-d48-dv40", "bf16", "fp16-mqa"])
def test_prefill_matches_the_reference(case):
    B, Hq, Hkv, T, D, Dv, qb, kb, W, S, K, dtype = case
    g, q, k, v = _inputs(T + D + Hq, B, Hq, Hkv, T, T, D, Dv, dtype)
    kw = dict(window=W, sinks=S, qb=qb, kb=kb)
    kept = random_kept(g, B, Hkv, T, topk=K, **kw)
    assert (kept < 0).any() and (kept >= 0).any()  # holes and kept blocks both
    got, want = _against_reference(q, k, v, kept, 0, scale=D ** -0.5, **kw)
    # the sparse sets are really sparse: the output differs from dense attention
    assert (want.double() - _dense(q, k, v, 0, D ** -0.5)).abs().max() > 1e-2


@pytest.mark.parametrize("p0,Lq,dtype,list_dtype", [
    (150, 37, torch.float32, torch.int64),   # a chunk starting inside a query block
    (299, 1, torch.float32, torch.int32),    # decoding the last token
    (101, 1, torch.bfloat16, torch.int64),   # one token in the middle of the cache
    (70, 90, torch.bfloat16, torch.int32),
])
def test_chunks_and_decoding_match_the_reference(p0, Lq, dtype, list_dtype):
    T = 300
    g, q, k, v = _inputs(p0 + Lq, 1, 4, 2, T, Lq, 32, 32, dtype)
    kw = dict(window=32, sinks=16, qb=32, kb=16)
    kept = random_kept(g, 1, 2, T, p0=p0, Lq=Lq, topk=3, **kw)
    _against_reference(q, k, v, kept, p0, scale=0.2, list_dtype=list_dtype, **kw)


@pytest.mark.parametrize("launch", [
    dict(block_m=16, block_n=16),                              # tiles inside a query block
    dict(block_m=32, block_n=32, num_warps=4, num_stages=2),
])
def test_smaller_tiles_than_the_blocks(launch):
    T = 290
    g, q, k, v = _inputs(11 + launch["block_m"], 1, 2, 1, T, T, 32, 32, torch.float32)
    kw = dict(window=64, sinks=32, qb=64, kb=32)
    kept = random_kept(g, 1, 1, T, topk=2, **kw)
    _against_reference(q, k, v, kept, 0, scale=0.18, **kw, **launch)


def test_empty_lists_attend_the_diagonal_only():
    T, qb, kb = 150, 32, 16
    g, q, k, v = _inputs(21, 1, 4, 2, T, T, 32, 32, torch.float32)
    kw = dict(window=0, sinks=0, qb=qb, kb=kb)
    kept = torch.full((1, 2, n_query_blocks(0, T, qb), 3), -1, dtype=torch.int32, device=DEV)
    kept[:, :, 3, 1] = 2  # one query block with a kept block, the others all -1
    got, _ = _against_reference(q, k, v, kept, 0, scale=0.25, **kw)
    # rows of an all -1 list: causal attention inside the query block alone
    for j in (0, 1, 4):
        lo, hi = j * qb, min(T, (j + 1) * qb)
        want = _dense(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], 0, 0.25)
        torch.testing.assert_close(got[:, :, lo:hi].double(), want, atol=1e-5, rtol=1e-5)
    # lists without any slot (F = 0)
    empty = torch.empty(1, 2, n_query_blocks(0, T, qb), 0, dtype=torch.int64, device=DEV)
    none = _kernel(q, k, v, empty, 0, q_block=qb, k_block=kb, scale=0.25)
    torch.testing.assert_close(none[:, :, :3 * qb], got[:, :, :3 * qb], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("p0,dtype", [(0, torch.float32), (45, torch.float32),
                                      (0, torch.float16)])
def test_lists_covering_the_past_give_dense_attention(p0, dtype):
    T = 230
    g, q, k, v = _inputs(31 + p0, 1, 4, 2, T, T - p0, 48, 48, dtype)
    none = torch.full((1, 2, n_query_blocks(p0, T - p0, 32), 1), -1, dtype=torch.int32, device=DEV)
    # the window: every earlier block
    full = full_lists(none, p0, T, window=T, sinks=0, qb=32, kb=16)
    got = _kernel(q, k, v, full, p0, q_block=32, k_block=16, scale=0.15)
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(got.double(), _dense(q, k, v, p0, 0.15), atol=tol, rtol=tol)


def test_listed_partial_block_and_blocks_past_the_keys():
    """Blocks are taken as listed (no causal check); keys >= T never count, blocks past T hold
    none; checked against a float64 loop over the kernel's definition."""
    T, qb, kb = 200, 32, 16  # key block 12 holds keys 192..199 only, block 13 none
    g, q, k, v = _inputs(41, 1, 2, 1, T, T, 32, 32, torch.float32)
    nQ = n_query_blocks(0, T, qb)
    full = torch.full((1, 1, nQ, 4), -1, dtype=torch.int64, device=DEV)
    for n in range(nQ - 1):
        full[0, 0, n, 0] = 12
        full[0, 0, n, 2] = 13
    full[0, 0, 3, 3] = 9  # after the query block: attended in full all the same
    full[0, 0, 5, 1] = 0
    got = _kernel(q, k, v, full, 0, q_block=qb, k_block=kb, scale=0.3)
    want = torch.empty(1, 2, T, 32, dtype=torch.float64, device=DEV)
    for t in range(T):
        j = t // qb
        keys = {x for i in full[0, 0, j].tolist() if i >= 0
                for x in range(i * kb, min(T, (i + 1) * kb))} | set(range(j * qb, t + 1))
        keys = sorted(keys)
        for h in range(2):
            p = torch.softmax(q[0, h, t].double() @ k[0, 0, keys].double().T * 0.3, 0)
            want[0, h, t] = p @ v[0, 0, keys].double()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_kept_blocks_from_block_select_and_strided_inputs():
    T, qb, kb = 260, 32, 16
    g, q, k, v = _inputs(51, 1, 4, 2, T, T, 32, 32, torch.float32)
    # [B, L, H, D] storage seen as [B, H, L, D]
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    kw = dict(window=32, sinks=16, q_block=qb, k_block=kb)
    kept = _select(q, k, 0, topk=2, **kw)
    assert (kept >= 0).any()
    _against_reference(q, k, v, kept, 0, window=32, sinks=16, qb=qb, kb=kb, scale=0.2)
    # a negative scale, the same lists
    _against_reference(q, k, v, kept, 0, window=32, sinks=16, qb=qb, kb=kb, scale=-0.2)


def test_launch_shape_fits_short_calls_and_wide_heads():
    # (BLOCK_M rows of a head, HP heads a tile, BLOCK_N, warps, stages)
    assert TB._launch_shape(1 << 20, 128, 64, 128, 128, 2, 128, 64, 8, 3, 4) == (128, 1, 64, 8, 3)
    # a decoded token: the group's heads share a 16-row tile (4 heads of 4 rows, 8 of 2); a
    # chunk of 8 queries: 2 heads of 8; no group (or one head asked for): 16 rows of one head
    assert TB._launch_shape(1, 128, 64, 128, 128, 2, 128, 64, 8, 3, 4) == (4, 4, 64, 4, 3)
    assert TB._launch_shape(1, 64, 32, 128, 128, 2, 128, 64, 8, 3, 8) == (2, 8, 64, 4, 3)
    assert TB._launch_shape(8, 64, 32, 128, 128, 2, 128, 64, 8, 3, 4) == (8, 2, 64, 4, 3)
    assert TB._launch_shape(1, 64, 32, 128, 128, 2, 128, 64, 8, 3, 1) == (16, 1, 64, 4, 3)
    assert TB._launch_shape(1, 64, 32, 128, 128, 2, 128, 64, 8, 3, 4, 1) == (16, 1, 64, 4, 3)
    assert TB._launch_shape(1, 64, 32, 128, 128, 2, 128, 64, 8, 3, 4, 2) == (8, 2, 64, 4, 3)
    assert TB._launch_shape(1000, 32, 16, 64, 64, 4, 128, 64, 8, 3) == (32, 1, 64, 4, 3)
    # query blocks of 64 rows: the four heads of a group stacked in a 256-row tile; eight of 32
    assert TB._launch_shape(1 << 17, 64, 32, 128, 128, 2, 128, 64, 8, 3, 4) == (64, 4, 64, 8, 3)
    assert TB._launch_shape(1 << 17, 64, 32, 128, 128, 2, 128, 64, 8, 3, 8) == (64, 4, 64, 8, 3)
    # the default's 16 warps: a 256-row tile gets all 16, a 128-row tile 8, a decoded token 4
    assert TB._launch_shape(1 << 17, 64, 32, 128, 128, 2, 128, 64, 16, 3, 4) == (64, 4, 64, 16, 3)
    assert TB._launch_shape(1 << 20, 128, 64, 128, 128, 2, 128, 64, 16, 3, 4) == (128, 1, 64, 8, 3)
    assert TB._launch_shape(1, 64, 32, 128, 128, 2, 128, 64, 16, 3, 4) == (4, 4, 64, 4, 3)
    assert TB._launch_shape(1000, 32, 16, 64, 64, 4, 128, 64, 8, 3, 8) == (32, 8, 64, 8, 3)
    # float32 at d=128: stacked heads are given up first to fit shared memory
    bm, hp, bn, warps, stages = TB._launch_shape(1 << 17, 64, 32, 128, 128, 4, 128, 64, 8, 3, 4)
    assert (bm, stages) == (64, 3) and 4 * (hp * bm * 128 + stages * bn * 256) <= TB._SMEM_BUDGET
    assert TB._launch_shape(1000, 32, 16, 64, 64, 4, 128, 64, 8, 3, 6) == (32, 2, 64, 4, 3)
    assert TB._launch_shape(1 << 17, 64, 32, 128, 128, 2, 128, 64, 8, 3, 4, 1)[:2] == (64, 1)
    with pytest.raises(ValueError, match="heads=3"):
        TB._launch_shape(1 << 17, 64, 32, 128, 128, 2, 128, 64, 8, 3, 6, 3)
    bm, hp, bn, warps, stages = TB._launch_shape(1 << 20, 128, 64, 256, 256, 2, 128, 64, 8, 3)
    assert bm <= 64 and 2 * (bm * 256 + stages * bn * 512) <= TB._SMEM_BUDGET
    bm, hp, bn, warps, stages = TB._launch_shape(1 << 20, 64, 64, 256, 256, 4, 128, 64, 8, 3, 4)
    assert hp * bm <= 64 and 4 * (hp * bm * 256 + stages * bn * 512) <= TB._SMEM_BUDGET
    # the default's tile (estimated 160 KB) on an A100 (163 KB a block) and, shrunk to fit, on
    # consumer Ampere and Ada (99 KB)
    shape = (1 << 17, 64, 32, 128, 128, 2, 128, 64, 8, 3, 4, None)
    assert TB._launch_shape(*shape, 162 * 1024) == (64, 4, 64, 8, 3)
    bm, hp, bn, warps, stages = TB._launch_shape(*shape, 98 * 1024)
    assert hp < 4 and 2 * (hp * bm * 128 + stages * bn * 256) <= 98 * 1024
    assert TB._smem_budget(torch.device("cpu")) == TB._SMEM_BUDGET


@pytest.mark.parametrize("p0,Lq", [(0, 200), (45, 130), (170, 1), (161, 3)])
def test_stacked_heads_give_what_one_head_a_program_gives(p0, Lq):
    """Query heads of a kv group stacked in one tile (1, 2 or 4 of them) attend exactly what
    they attend one head a program, and match the reference."""
    T, qb, kb = p0 + Lq, 32, 16
    g, q, k, v = _inputs(71 + p0, 1, 8, 2, T, Lq, 32, 32, torch.float32)
    kw = dict(window=32, sinks=16, qb=qb, kb=kb)
    kept = random_kept(g, 1, 2, T, p0=p0, Lq=Lq, topk=3, **kw)
    one, _ = _against_reference(q, k, v, kept, p0, scale=0.2, heads=1, **kw)
    for heads in (2, 4):
        got, _ = _against_reference(q, k, v, kept, p0, scale=0.2, heads=heads, **kw)
        torch.testing.assert_close(got, one, atol=1e-6, rtol=1e-6)


def test_rejects_bad_arguments():
    g, q, k, v = _inputs(61, 1, 4, 2, 64, 64, 16, 16, torch.float32)
    full = torch.full((1, 2, 2, 1), -1, dtype=torch.int32, device=DEV)
    kw = dict(q_block=32, k_block=16, scale=0.25)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        TB.block_attention_triton(q[:, :3], k, v, full, 0, **kw)
    with pytest.raises(ValueError, match="dtypes"):
        TB.block_attention_triton(q, k.half(), v, full, 0, **kw)
    with pytest.raises(ValueError, match="outside"):
        TB.block_attention_triton(q, k, v, full, 1, **kw)
    with pytest.raises(ValueError, match="nQ"):
        TB.block_attention_triton(q, k, v, full[:, :, :1], 0, **kw)
    with pytest.raises(ValueError, match="multiple of k_block"):
        TB.block_attention_triton(q, k, v, full, 0, q_block=16, k_block=32, scale=0.25)
    with pytest.raises(ValueError, match="power of two"):
        TB.block_attention_triton(q, k, v, full, 0, q_block=48, k_block=16, scale=0.25)


@pytest.mark.parametrize("p0,Lq,dtype", [
    (1799, 1, torch.float32), (1605, 5, torch.float32), (1664, 1, torch.float32),
    pytest.param(1799, 1, torch.bfloat16, marks=pytest.mark.skipif(
        INTERPRETED, reason="the interpreter's bf16 products steer the search elsewhere"))])
def test_op_decoding_picks_the_kept_blocks_on_the_gpu(monkeypatch, p0, Lq, dtype):
    """The op on the Triton path for one query block (a decoded token, a short chunk; stage 2's
    keys handed to the attention, which picks the kept blocks itself) equals the reference op."""
    from triton_env import through_triton
    T = p0 + Lq
    g, q, k, v = _inputs(p0, 1, 4, 2, T, Lq, 32, 32, dtype)
    args = (64, 4, 3, 32 ** -0.5, 0, 32, 16, 4, 2)  # window sinks topk scale dense_below qb kb R P
    want = bs.superlinear_block_attention(
        q, k, v, None, p0, window=64, sinks=4, topk=3, q_block=32, k_block=16, rows=4, pool=2,
        scale=32 ** -0.5, dense_below=0)
    from slcompile.kernels import blocksparse_decode as BD
    calls = through_triton(monkeypatch, (TB, "block_attention_triton"))
    prepared = BD.attention
    monkeypatch.setattr(BD, "attention", lambda *a, **kw: calls.append(
        "prepared" if (out := prepared(*a, **kw)) is not None else "general") or out)
    poison()
    got = torch.ops.superlinear.block_sparse_attention(q, k, v, None, None, *args)
    # the prepared launches where the queries fill one tile of rows, else the general path
    assert calls in (["prepared"], ["general", "block_attention_triton"])
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert (want.double() - _dense(q, k, v, p0, 32 ** -0.5)).abs().max() > 1e-2


@pytest.mark.parametrize("p0,Lq,dtype", [(0, 256, torch.float32), (150, 37, torch.float32),
                                         (255, 1, torch.bfloat16)])
def test_paged_keys_and_values_match_the_reference(p0, Lq, dtype):
    """Paged keys and values (a block table, as sequence parallelism holds them): the kernel reads
    each listed, window, sink and diagonal block from its slot (shuffled, beside NaN slots it must
    never read) and equals the reference over the whole keys."""
    from blocksparse_lists import paged
    T = 256
    g, q, k, v = _inputs(p0 + 5, 1, 4, 2, T, Lq, 32, 32, dtype)
    kw = dict(window=32, sinks=16, qb=32, kb=16)
    kept = random_kept(g, 1, 2, T, p0=p0, Lq=Lq, topk=3, **kw)
    want = bs.block_attention(q, k, v, kept, None, p0, window=32, sinks=16, q_block=32,
                              k_block=16, scale=0.25)
    kp, vp, table = paged(g, 16, k, v)
    _, sb, wb, _ = bs.geometry(T, 32, 16, 32, 16)
    got = _kernel(q, kp, vp, kept, p0, q_block=32, k_block=16, scale=0.25, sink_blocks=sb,
                  window_blocks=wb, table=table)
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("p0,Lq,kb,launch", [
    (299, 1, 16, dict()),                        # a decoded token: 4 key blocks a step
    (300, 20, 16, dict(block_n=16)),             # a chunk, one step a block
    (1023, 1, 32, dict(block_n=32, block_m=16)),
    (512, 64, 32, dict(block_n=64)),             # a whole query block, 2 blocks a step
])
def test_order_keys_pick_the_kept_blocks_in_the_kernel(p0, Lq, kb, launch):
    """Given the search's stage-2 order keys (keys_topk: no list), the kernel attends the sink and
    window key ranges and the blocks of each row's keys_topk largest keys (empty slots and
    candidates past them ignored): what the list path attends for those kept blocks, also over
    paged keys."""
    from blocksparse_lists import paged
    from slcompile.kernels.triton_blocksparse_search import _NO_KEY
    T, qb, W, S, K = p0 + Lq, 64, 96, 40, 3
    g, q, k, v = _inputs(p0 * 7 + kb, 1, 4, 2, T, Lq, 32, 32, torch.float32)
    nK, sb, wb, per_q = bs.geometry(T, W, S, qb, kb)
    j0, nQ = p0 // qb, n_query_blocks(p0, Lq, qb)
    M = 12
    keys = torch.full((1, 2, nQ, M), _NO_KEY, dtype=torch.int64)
    kept = torch.full((1, 2, nQ, K), -1, dtype=torch.int32)
    for h in range(2):
        for n in range(nQ):
            cand = torch.arange(sb, max(sb, (j0 + n) * per_q - wb))
            cand = cand[torch.randperm(len(cand), generator=g)][:M - 2]  # 2 empty slots
            score = torch.randn(len(cand), generator=g)
            keys[0, h, n, torch.randperm(M, generator=g)[:len(cand)]] = bs._order_key(score, cand)
            kept[0, h, n, :min(K, len(cand))] = cand[score.argsort(descending=True)[:K]].int()
    assert (kept >= 0).sum() > 2
    kw = dict(q_block=qb, k_block=kb, scale=0.3, sink_blocks=sb, window_blocks=wb, **launch)
    want = _kernel(q, k, v, kept.to(DEV), p0, **kw)
    ref = bs.block_attention(q, k, v, kept.to(DEV), None, p0, window=W, sinks=S, q_block=qb,
                             k_block=kb, scale=0.3)
    torch.testing.assert_close(want, ref, atol=1e-4, rtol=1e-4)
    got = _kernel(q, k, v, keys.to(DEV), p0, keys_topk=K, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if T % kb == 0:
        kp, vp, table = paged(g, kb, k, v)
        got = _kernel(q, kp, vp, keys.to(DEV), p0, keys_topk=K, table=table, **kw)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p0,Lq,kb,launch,with_lse", [
    (1299, 1, 16, dict(), False),                  # a decoded token: the default split
    (1299, 1, 32, dict(split=4), True),
    (1300, 20, 16, dict(block_n=16, split=8), True),   # a chunk
    (1024, 64, 32, dict(block_n=64, split=2), False),  # a whole query block, stacked heads
    (90, 1, 16, dict(split=16), True),             # fewer blocks than programs sharing them
    (1299, 1, 16, dict(split=8, combine_values=128), True),  # the merge's columns in 2 programs
])
def test_split_tiles_give_what_one_program_gives(monkeypatch, p0, Lq, kb, launch, with_lse):
    """With the search's keys, programs that share a tile's key blocks (every split-th block, the
    last program the diagonal) and the launch that merges their partial softmaxes give what one
    program a tile gives, log-sum-exp included, and match the reference."""
    from slcompile.kernels.triton_blocksparse_search import _NO_KEY
    T, qb, W, S, K, Hq, Hkv = p0 + Lq, 64, 96, 40, 5, 8, 2
    g, q, k, v = _inputs(p0 + kb + Lq, 1, Hq, Hkv, T, Lq, 32, 32, torch.float32)
    nK, sb, wb, per_q = bs.geometry(T, W, S, qb, kb)
    j0, nQ = p0 // qb, n_query_blocks(p0, Lq, qb)
    M = 12
    keys = torch.full((1, Hkv, nQ, M), _NO_KEY, dtype=torch.int64)
    kept = torch.full((1, Hkv, nQ, K), -1, dtype=torch.int32)
    for h in range(Hkv):
        for n in range(nQ):
            cand = torch.arange(sb, max(sb, (j0 + n) * per_q - wb))
            cand = cand[torch.randperm(len(cand), generator=g)][:M - 1]
            score = torch.randn(len(cand), generator=g)
            keys[0, h, n, torch.randperm(M, generator=g)[:len(cand)]] = bs._order_key(score, cand)
            kept[0, h, n, :min(K, len(cand))] = cand[score.argsort(descending=True)[:K]].int()
    kw = dict(q_block=qb, k_block=kb, scale=0.3, sink_blocks=sb, window_blocks=wb)
    launch = dict(launch)
    split = launch.pop("split", None)
    if "combine_values" in launch:  # fewer values a merge program: its columns shared out
        monkeypatch.setattr(TB, "_COMBINE_VALUES", launch.pop("combine_values"))
    if split is None:  # the default: 32 tiles of one row here, shared out
        assert TB._split(Hq * 1) > 1
    lses = []
    outs = []
    for sp in (1, split):
        lse = torch.full((1, Hq, Lq), float("nan"), device=DEV) if with_lse else None
        outs.append(_kernel(q, k, v, keys.to(DEV), p0, keys_topk=K, split=sp, lse=lse, **kw,
                            **launch))
        lses.append(lse)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    if lses[0] is not None:
        assert not torch.isnan(lses[1]).any()
        torch.testing.assert_close(lses[1], lses[0], atol=1e-5, rtol=1e-5)
    ref = bs.block_attention(q, k, v, kept.to(DEV), None, p0, window=W, sinks=S, q_block=qb,
                             k_block=kb, scale=0.3)
    torch.testing.assert_close(outs[1], ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="split=3"):
        TB.block_attention_triton(q, k, v, keys.to(DEV), p0, keys_topk=K, split=3, **kw)
    with pytest.raises(ValueError, match="split=2"):
        TB.block_attention_triton(q, k, v, kept.to(DEV), p0, split=2, **kw)


def test_a_launch_refused_for_shared_memory_retries_smaller_and_remembers(monkeypatch):
    """A GPU whose shared memory is less than the compiled tile needs (Triton refuses the launch
    with OutOfResources): the attention plans again for what the refusal allows, gets the same
    output, and starts from that budget on the next call of the shape."""
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(TB, "_FIT", {})
    real = TB.launch
    tiles = []

    def small_gpu(kernel, grid, *args, **kw):  # a stand-in GPU: 64 rows a tile at the most
        if kernel is TB._fwd_kernel:
            rows = kw["HP"] * kw["BLOCK_M"]
            tiles.append(rows)
            if rows > 64:
                raise OutOfResources(rows * 1000, 64 * 1000, "shared memory")
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(TB, "launch", small_gpu)
    T, qb, kb = 300, 64, 32
    g, q, k, v = _inputs(7, 1, 8, 2, T, T, 32, 32, torch.float32)
    kept = random_kept(g, 1, 2, T, p0=0, Lq=T, topk=2, window=64, sinks=16, qb=qb, kb=kb)
    got, _ = _against_reference(q, k, v, kept, 0, window=64, sinks=16, qb=qb, kb=kb, scale=0.3)
    assert tiles[0] == 256 and tiles[-1] <= 64 and len(TB._FIT) == 1
    tiles.clear()
    _kernel(q, k, v, full_lists(kept, 0, T, window=64, sinks=16, qb=qb, kb=kb), 0, q_block=qb,
            k_block=kb, scale=0.3)
    assert tiles == [tiles[0]] and tiles[0] <= 64  # the remembered budget: no refusal
