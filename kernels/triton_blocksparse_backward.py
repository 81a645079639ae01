"""Triton backward of block-sparse attention (``search_key="blocksparse"``) for a prefill.

A prefill: queries 0..L-1 over keys 0..L-1 (p0 = 0, no key-padding mask), the attention of
triton_blocksparse.py (docs/blocksparse.md): query t of query block j = t // q_block attends, in one
softmax, the key blocks listed for j (sinks, window, kept blocks; keys >= L never count) and,
causally, the keys j*q_block..t. Given the forward's output O and log-sum-exp
(`block_attention_triton(..., lse=...)`: natural log, float32), FlashAttention-2's backward with
the scores recomputed tile by tile: P = exp(scale q.k - lse), dV = P^T dO, dP = dO V^T,
dS = P (dP - delta) with delta = rowsum(dO O), dQ = scale dS K, dK = scale dS^T Q. Products in
the inputs' dtype (P and dS rounded to it), IEEE float32 products for float32 inputs, float32
accumulation; under Triton's interpreter, whose bf16 products are wrong, bf16 products run in
float32. A row with lse = -inf (no key) gets P = 0, hence zero gradients. Head dims up to 256,
padded to powers of two with masks.

Launch: the forward's `_compact_kernel` lists, a few torch ops, two kernels; no host
synchronisation, no atomics.

* delta = rowsum(dO O) and lse * log2(e) (exp2 inside the kernels), float32 [B, Hq, L], by torch.
* The transposed lists, by torch: every (batch row x kv head, query block, listed key block) entry
  of the compacted lists (whole blocks and the partial last block) sorted by (batch row x kv head,
  key block, query block); per key block the query blocks that attend it in full are a slice of
  the sorted query blocks, its start and end in CSR offsets (counts by scatter_add, cumsum).
* ``_dq_kernel``: the forward's structure, one program per (tile of BLOCK_M query rows inside one
  query block, query head of a kv group) on axis 0, batch row x kv head on axis 1: the whole
  listed blocks (no mask; block index picked out of the list row held in registers), the partial
  block (keys >= L masked), then the diagonal, key tiles wholly below the tile's first query
  unmasked and the rest causally; dQ accumulated in float32, scaled and stored once.
* ``_dkdv_kernel``: one program per (tile of BLOCK_N keys inside one key block, batch row x kv
  head): K and V tiles held, dK and dV accumulated in float32 over every query head of the kv group
  (GQA) and (i) the query blocks of its transposed list, all their rows (< L), then (ii) the rows
  of the one query block holding the key block from the tile's first key on: the BLOCK_M-row tiles
  that hold the tile's keys with key <= query, the later ones unmasked. Keys >= L (partial block)
  are loaded as zeros and never stored (their rows of dK and dV depend on no other key).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import refit
from .triton_blocksparse import _LOG2E, _interpreted, _pow2, check_arguments, compact_lists


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + a @ b (float32): IEEE products, float32 products (the interpreter's bf16), or the
    inputs' dtype."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT_F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dq_step(dq, q, do, lse2, delta, kbase, vbase, kpos, qpos, T, skn, svn, qk_scale,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_T: tl.constexpr,
             CAUSAL: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    """dq += dS K over the BLOCK_N keys at kpos (int64); dS unscaled. MASK_T: keys >= T masked;
    CAUSAL: also keys after each row's query."""
    offd = tl.arange(0, BLOCK_D)
    offdv = tl.arange(0, BLOCK_DV)
    kmask = kpos < T
    kptr = kbase + kpos[:, None] * skn + offd[None, :]
    vptr = vbase + kpos[:, None] * svn + offdv[None, :]
    if MASK_T or CAUSAL:
        k = tl.load(kptr, mask=kmask[:, None] & (offd[None, :] < D), other=0.0)
        v = tl.load(vptr, mask=kmask[:, None] & (offdv[None, :] < DV), other=0.0)
    else:
        k = tl.load(kptr, mask=offd[None, :] < D, other=0.0)
        v = tl.load(vptr, mask=offdv[None, :] < DV, other=0.0)
    zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    s = _mm(q, tl.trans(k), zero, IEEE, DOT_F32)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if CAUSAL:
        p = tl.where((kpos[None, :] <= qpos[:, None]) & kmask[None, :], p, 0.0)
    elif MASK_T:
        p = tl.where(kmask[None, :], p, 0.0)
    dp = _mm(do, tl.trans(v), zero, IEEE, DOT_F32)
    ds = p * (dp - delta[:, None])
    return _mm(ds.to(k.dtype), k, dq, IEEE, DOT_F32)


@triton.jit(do_not_specialize=["T", "nQ"])
def _dq_kernel(Q, K, V, DO, LSE2, DELTA, LST, GRAD_Q,
               sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
               sdqb, sdqh, sdqm, Hkv, T, nQ, F, W, qk_scale, scale,
               G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
               Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SUB: tl.constexpr,
               FP: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    """SUB = K_BLOCK // BLOCK_N steps per listed block. LSE2, DELTA: contiguous [B, Hq, T]."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    g = pid % G
    r0 = (pid // G) * BLOCK_M
    n = r0 // Q_BLOCK
    b = bh // Hkv
    hkv = bh % Hkv
    hq = hkv * G + g
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    offd = tl.arange(0, BLOCK_D)
    offdv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + hq * sqh + rows64[:, None] * sqm + offd[None, :],
                mask=row_ok[:, None] & (offd[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdob + hq * sdoh + rows64[:, None] * sdom + offdv[None, :],
                 mask=row_ok[:, None] & (offdv[None, :] < DV), other=0.0)
    srow = (b * (Hkv * G) + hq) * T + rows64
    lse2 = tl.load(LSE2 + srow, mask=row_ok, other=float("inf"))  # rows past T: P = 0
    delta = tl.load(DELTA + srow, mask=row_ok, other=0.0)
    kbase = K + b * skb + hkv * skh
    vbase = V + b * svb + hkv * svh
    lrow = LST + (bh * nQ + n) * W
    cnt = tl.load(lrow + F)
    part = tl.load(lrow + F + 1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lane = tl.arange(0, BLOCK_N)
    slot = tl.arange(0, FP)
    ids = tl.load(lrow + slot, mask=slot < F, other=0)
    for it in range(0, cnt * SUB):
        idx = tl.sum(tl.where(slot == it // SUB, ids, 0)).to(tl.int64)
        kpos = idx * K_BLOCK + (it % SUB) * BLOCK_N + lane
        dq = _dq_step(dq, q, do, lse2, delta, kbase, vbase, kpos, rows, T, skn, svn, qk_scale,
                      D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, False, False, IEEE, DOT_F32)
    if part >= 0:
        for s in range(0, SUB):
            kpos = part.to(tl.int64) * K_BLOCK + s * BLOCK_N + lane
            dq = _dq_step(dq, q, do, lse2, delta, kbase, vbase, kpos, rows, T, skn, svn,
                          qk_scale, D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, True, False,
                          IEEE, DOT_F32)
    lo = (n * Q_BLOCK).to(tl.int64)
    free_end = lo + ((r0 + 1 - lo) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(r0 + BLOCK_M, T)
    for start in range(lo, free_end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, kbase, vbase, start + lane, rows, T, skn, svn,
                      qk_scale, D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, False, False,
                      IEEE, DOT_F32)
    for start in range(free_end, hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, kbase, vbase, start + lane, rows, T, skn, svn,
                      qk_scale, D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, False, True,
                      IEEE, DOT_F32)
    tl.store(GRAD_Q + b * sdqb + hq * sdqh + rows64[:, None] * sdqm + offd[None, :],
             (dq * scale).to(GRAD_Q.dtype.element_ty), mask=row_ok[:, None] & (offd[None, :] < D))


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, LSE2, DELTA, qoff, dooff, soff, r0, kpos, T, sqm, sdom,
               qk_scale, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               CAUSAL: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    """dv += P^T dO, dk += dS^T Q (unscaled) over the BLOCK_M query rows from r0 (rows >= T
    masked: P = 0); CAUSAL: only keys <= each row's query."""
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    offd = tl.arange(0, BLOCK_D)
    offdv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + qoff + rows64[:, None] * sqm + offd[None, :],
                mask=row_ok[:, None] & (offd[None, :] < D), other=0.0)
    do = tl.load(DO + dooff + rows64[:, None] * sdom + offdv[None, :],
                 mask=row_ok[:, None] & (offdv[None, :] < DV), other=0.0)
    lse2 = tl.load(LSE2 + soff + rows64, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + soff + rows64, mask=row_ok, other=0.0)
    zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    s = _mm(q, tl.trans(k), zero, IEEE, DOT_F32)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if CAUSAL:
        p = tl.where(kpos[None, :] <= rows[:, None], p, 0.0)
    dv = _mm(tl.trans(p.to(do.dtype)), do, dv, IEEE, DOT_F32)
    dp = _mm(do, tl.trans(v), zero, IEEE, DOT_F32)
    ds = p * (dp - delta[:, None])
    dk = _mm(tl.trans(ds.to(q.dtype)), q, dk, IEEE, DOT_F32)
    return dk, dv


@triton.jit(do_not_specialize=["T", "nK"])
def _dkdv_kernel(Q, K, V, DO, LSE2, DELTA, OFFS, QBLK, GRAD_K, GRAD_V,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                 sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, Hkv, T, nK, qk_scale, scale,
                 G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                 Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    """OFFS [B * Hkv * nK + 1]: key block (bh, i)'s query blocks are QBLK[OFFS[bh nK + i] ..
    OFFS[bh nK + i + 1]]."""
    k0 = tl.program_id(0) * BLOCK_N  # first key of the tile
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hkv
    hkv = bh % Hkv
    kpos = k0 + tl.arange(0, BLOCK_N)
    kpos64 = kpos.to(tl.int64)
    kmask = kpos < T
    offd = tl.arange(0, BLOCK_D)
    offdv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * skb + hkv * skh + kpos64[:, None] * skn + offd[None, :],
                mask=kmask[:, None] & (offd[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + hkv * svh + kpos64[:, None] * svn + offdv[None, :],
                mask=kmask[:, None] & (offdv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    entry = bh * nK + k0 // K_BLOCK
    e0 = tl.load(OFFS + entry)
    e1 = tl.load(OFFS + entry + 1)
    for g in range(0, G):
        hq = hkv * G + g
        qoff = b * sqb + hq * sqh
        dooff = b * sdob + hq * sdoh
        soff = (b * (Hkv * G) + hq) * T
        # (i) the query blocks attending the key block in full
        for e in range(e0, e1):
            r1 = tl.load(QBLK + e) * Q_BLOCK
            for r0 in range(r1, tl.minimum(r1 + Q_BLOCK, T), BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE2, DELTA, qoff, dooff, soff, r0,
                                    kpos, T, sqm, sdom, qk_scale, D, DV, BLOCK_M, BLOCK_N,
                                    BLOCK_D, BLOCK_DV, False, IEEE, DOT_F32)
        # (ii) the diagonal: row tiles holding the tile's keys causally, the later ones unmasked
        first = (k0 // BLOCK_M) * BLOCK_M
        masked_end = ((k0 + BLOCK_N - 1) // BLOCK_M + 1) * BLOCK_M
        block_end = tl.minimum((k0 // Q_BLOCK + 1) * Q_BLOCK, T)
        for r0 in range(first, tl.minimum(masked_end, block_end), BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE2, DELTA, qoff, dooff, soff, r0, kpos,
                                T, sqm, sdom, qk_scale, D, DV, BLOCK_M, BLOCK_N, BLOCK_D,
                                BLOCK_DV, True, IEEE, DOT_F32)
        for r0 in range(masked_end, block_end, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE2, DELTA, qoff, dooff, soff, r0, kpos,
                                T, sqm, sdom, qk_scale, D, DV, BLOCK_M, BLOCK_N, BLOCK_D,
                                BLOCK_DV, False, IEEE, DOT_F32)
    tl.store(GRAD_K + b * sdkb + hkv * sdkh + kpos64[:, None] * sdkn + offd[None, :],
             (dk * scale).to(GRAD_K.dtype.element_ty), mask=kmask[:, None] & (offd[None, :] < D))
    tl.store(GRAD_V + b * sdvb + hkv * sdvh + kpos64[:, None] * sdvn + offdv[None, :],
             dv.to(GRAD_V.dtype.element_ty), mask=kmask[:, None] & (offdv[None, :] < DV))


def transposed_lists(lst: Tensor, BH: int, nQ: int, nK: int) -> Tuple[Tensor, Tensor]:
    """From `compact_lists` rows [BH * nQ, W]: (offsets int32 [BH * nK + 1], query blocks int32
    [entries]); the query blocks listing key block i of batch row x kv head bh (whole or partial)
    are qblk[offsets[bh * nK + i]:offsets[bh * nK + i + 1]], ascending. Torch ops, no host sync."""
    W = lst.shape[1]
    F = W - 2
    dev = lst.device
    blocks = torch.cat([lst[:, :F], lst[:, W - 1:]], 1).long()  # whole ones, then the partial
    listed = torch.cat([torch.arange(F, device=dev)[None, :] < lst[:, F:F + 1],
                        lst[:, W - 1:] >= 0], 1)
    row = torch.arange(BH * nQ, device=dev)[:, None]
    nb = BH * nK
    key = torch.where(listed, (row // nQ) * nK + blocks, nb).flatten()  # nb: not listed
    order = (key * nQ + (row % nQ).expand(-1, F + 1).flatten()).sort().values
    counts = torch.zeros(nb + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    offsets = torch.zeros(nb + 1, dtype=torch.int32, device=dev)
    offsets[1:] = counts[:nb].cumsum(0)
    return offsets, (order % nQ).to(torch.int32)


def _tiles(q_block: int, k_block: int, bd: int, bdv: int):
    """(BLOCK_M, BLOCK_N, warps, stages) of _dq_kernel and of _dkdv_kernel: 64 x 64 tiles (32 x 32
    beyond 128-wide heads), fitted to the blocks."""
    t = 32 if max(bd, bdv) > 128 else 64
    shape = (min(t, q_block), min(t, k_block), 4, 2)
    return shape, shape


def _smaller_tiles(shape, refusal):
    """`launch.refit`'s next (BLOCK_M, BLOCK_N, warps, stages) where Triton refuses a backward
    launch for its shared memory (a GPU with less than the H100's, such as a T4's 64 KB): one
    pipeline stage, then halved tiles down to 16; None below that."""
    bm, bn, warps, stages = shape
    if stages > 1:
        return bm, bn, warps, 1
    if max(bm, bn) <= 16:
        return None
    return max(16, bm // 2), max(16, bn // 2), warps, 1


def block_attention_backward_triton(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                    grad_out: Tensor, kept: Tensor, *, window_blocks: int,
                                    sink_blocks: int, q_block: int, k_block: int, scale: float,
                                    dq: Optional[Tensor] = None, dk: Optional[Tensor] = None,
                                    dv: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of a prefill's block-sparse attention (module docstring).

    q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] (one dtype: fp32, bf16 or fp16; Hq a
    multiple of Hkv); out and grad_out [B, Hq, L, Dv] in that dtype: the forward's output and its
    gradient; lse float32 [B, Hq, L]: the forward's log-sum-exp (`block_attention_triton(...,
    lse=...)`, natural log); kept int32/int64 [B, Hkv, nQ, F]: the kept blocks of each query block
    (-1 = empty slot) with the ``sink_blocks`` and ``window_blocks`` that
    `blocksparse.attended_blocks` puts before them (or whole attended lists with both 0). Returns
    gradients in q's dtype, written into dq, dk, dv when given (unit stride in the last dim)."""
    name = "block_attention_backward_triton"
    if any(x.dim() != 4 for x in (q, k, v, out, grad_out, kept)) or lse.dim() != 3:
        raise ValueError(f"{name}: q, k, v, out, grad_out and kept must be 4-D, lse 3-D")
    check_arguments(name, q, k, v, q_block, k_block, out=out, grad_out=grad_out)
    B, Hq, L, D = q.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    if T != L:
        raise ValueError(f"{name}: a prefill only: {L} queries over {T} keys")
    if out.shape != (B, Hq, L, Dv) or grad_out.shape != (B, Hq, L, Dv):
        raise ValueError(f"{name}: out {tuple(out.shape)} and grad_out {tuple(grad_out.shape)} "
                         f"must be [B, Hq, L, Dv] = [{B}, {Hq}, {L}, {Dv}]")
    if lse.shape != (B, Hq, L) or lse.dtype != torch.float32:
        raise ValueError(f"{name}: lse must be float32 [B, Hq, L], got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    if any(x.device != q.device for x in (k, v, out, grad_out, lse, kept)):
        raise ValueError(f"{name}: inputs on different devices")
    nQ, nK = -(-L // q_block), -(-L // k_block)
    if kept.dtype not in (torch.int32, torch.int64) or tuple(kept.shape[:3]) != (B, Hkv, nQ):
        raise ValueError(f"{name}: kept must be int32/int64 [B, Hkv, nQ, F] = [{B}, {Hkv}, "
                         f"{nQ}, F], got {kept.dtype} {tuple(kept.shape)}")
    if sink_blocks < 0 or window_blocks < 0:
        raise ValueError(f"{name}: sink_blocks={sink_blocks} and window_blocks={window_blocks} "
                         "must be >= 0")
    grads = []
    for gname, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if buf is None:
            buf = torch.empty_like(like, memory_format=torch.contiguous_format)
        elif buf.shape != like.shape or buf.dtype != q.dtype or buf.stride(-1) != 1:
            raise ValueError(f"{name}: {gname} must be {list(like.shape)} in q's dtype with unit "
                             "stride in the last dim")
        grads.append(buf)
    dq, dk, dv = grads
    if L == 0 or B == 0 or Hq == 0:
        return dq, dk, dv
    q, k, v, out, grad_out = (x if x.stride(-1) == 1 else x.contiguous()
                              for x in (q, k, v, out, grad_out))
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    lse2 = torch.where(lse == float("-inf"), float("inf"), lse * _LOG2E).contiguous()
    lst = compact_lists(kept, T, q_block, k_block, 0, sink_blocks, window_blocks)
    F = lst.shape[1] - 2
    offsets, qblk = transposed_lists(lst, B * Hkv, nQ, nK)
    G = Hq // Hkv
    BD, BDV = _pow2(D), _pow2(Dv)
    dq_shape, dkdv_shape = _tiles(q_block, k_block, BD, BDV)
    consts = dict(G=G, D=D, DV=Dv, Q_BLOCK=q_block, K_BLOCK=k_block, BLOCK_D=BD, BLOCK_DV=BDV,
                  IEEE=q.dtype == torch.float32,
                  DOT_F32=_interpreted() and q.dtype == torch.bfloat16)
    qk_scale = float(scale) * _LOG2E
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    def dq_launch(tiles):
        BM, BN, warps, stages = tiles
        _dq_kernel[(triton.cdiv(L, BM) * G, B * Hkv)](
            q, k, v, grad_out, lse2, delta, lst, dq, *strides,
            dq.stride(0), dq.stride(1), dq.stride(2), Hkv, T, nQ, F, F + 2, qk_scale,
            float(scale), BLOCK_M=BM, BLOCK_N=BN, SUB=k_block // BN, FP=_pow2(F, 2),
            num_warps=warps, num_stages=stages, **consts)

    def dkdv_launch(tiles):
        BM, BN, warps, stages = tiles
        _dkdv_kernel[(triton.cdiv(L, BN), B * Hkv)](
            q, k, v, grad_out, lse2, delta, offsets, qblk, dk, dv, *strides,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            Hkv, T, nK, qk_scale, float(scale), BLOCK_M=BM, BLOCK_N=BN, num_warps=warps,
            num_stages=stages, **consts)

    refit(dq_launch, dq_shape, _smaller_tiles)
    refit(dkdv_launch, dkdv_shape, _smaller_tiles)
    return dq, dk, dv
