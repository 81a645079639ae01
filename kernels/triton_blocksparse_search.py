"""Triton kernels of the block-sparse search (docs/blocksparse.md; `blocksparse.block_select` is
the reference they are tested against).

Stage 1, `_bound_kernel`: one program per (query block, batch row x kv head, share of the
candidate blocks) multiplies the [kmax, kmin] summaries of a tile of candidate key blocks by the
block's representative rows, split as [q+, q-] (tensor-core products in slices of the 2D dim), keeps
the largest bound over the rows as an int64 order key (float order of the score, then the block
index: exact ties go to the later block) and merges the tile into a running top-MP of keys
(`tl.topk` of the two, skipped when no key of the tile beats the current last). It writes only its
MP best keys: no [query blocks, key blocks] tensor exists; where the scan is split over programs,
`torch.topk` merges their few lists. Stage 2, `_exact_kernel`: one program per (query block, batch
row x kv head, share of the pool) reads its candidate blocks straight from the key tensor (no
gathered copy) and writes the exact largest logit of the representative rows in each, again as an
order key; `torch.topk` picks the kept blocks. Both kernels read the representative rows straight
from q and compute the candidate limits themselves (no gathered copies, few launches per decoded
token). Scores: products in the inputs' dtype, float32 accumulation (IEEE float32 products for
float32 inputs), compared in float32, as the contract says.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from torch import Tensor

from . import blocksparse as bs

_IDX_MASK = (1 << bs._IDX_BITS) - 1
_NO_KEY = -(1 << 63)  # order key of a non-candidate: below every real key
_KEY_BUDGET = 1 << 26  # int64 stage-1 keys per chunk of query blocks (512 MiB)
# tl.topk takes `descending` (largest first by default) in recent Triton; earlier releases have
# no such argument and always return the largest
_TOPK_DESCENDING_ARG = "descending" in inspect.signature(getattr(tl.topk, "fn", tl.topk)).parameters
_STAGE1_SMEM = 160 * 1024  # shared memory stage 1's pipelined [kmax | kmin] tiles may take
_PROGRAMS = 512  # stage-1 programs to aim for when few query blocks are searched (decoding)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


@triton.jit
def _order_key(score, idx, IDX_BITS: tl.constexpr):
    bits = score.to(tl.int32, bitcast=True)
    mono = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (mono.to(tl.int64) << IDX_BITS) | idx.to(tl.int64)


@triton.jit
def _rep_rows(n, front, Lq, RG, ROWS, RGP: tl.constexpr, Q_BLOCK: tl.constexpr):
    """The representative rows of query block n of the call (`blocksparse.representatives`): for
    lane r < RG, the query head within the kv group (r // ROWS) and the index among the call's
    queries of the block's (r % ROWS)-th last row in the call (its last row where fewer are)."""
    r = tl.arange(0, RGP)
    last = tl.minimum(front + Lq - 1 - n * Q_BLOCK, Q_BLOCK - 1)
    first = tl.maximum(front - n * Q_BLOCK, 0)
    row = last - r % ROWS
    row = tl.where(row >= first, row, last)
    return r // ROWS, n * Q_BLOCK + row - front, r < RG


# lengths change with every decoded token: not specialised (no recompilation per length class)
@triton.jit(do_not_specialize=["nK", "sb", "CH", "Lq", "front", "n0", "before0"])
def _bound_kernel(Q, KK, HAS, OUT,
                  s_q_b, s_q_h, s_q_t,
                  s_kk_b, s_kk_h, s_kk_k,
                  s_has_b, s_o_bh, s_o_n, s_o_c,
                  Hkv, nK, sb, CH, Lq, front, n0, before0, per_q, wb, RG, ROWS, D,
                  G: tl.constexpr, Q_BLOCK: tl.constexpr, RGP: tl.constexpr, DP: tl.constexpr,
                  DK: tl.constexpr, MP: tl.constexpr, HAS_MASK: tl.constexpr,
                  IDX_BITS: tl.constexpr, IEEE: tl.constexpr, TOPK_DESCENDING_ARG: tl.constexpr):
    n = n0 + tl.program_id(0).to(tl.int64)  # query block of the call
    bh = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)  # the chunk of CH candidate blocks (a multiple of MP) of this program
    b = bh // Hkv
    h = bh % Hkv
    # candidates: key blocks sb <= i < (blocks before the query block) - window blocks
    lim = tl.minimum(tl.minimum(tl.maximum(before0 + n * per_q - wb, 0), nK), (c + 1) * CH)
    g, t, row_ok = _rep_rows(n, front, Lq, RG, ROWS, RGP, Q_BLOCK)
    dk = tl.arange(0, DK)
    qrow = Q + b * s_q_b + (h * G + g)[None, :] * s_q_h + t.to(tl.int64)[None, :] * s_q_t
    kbase = KK + b * s_kk_b + h * s_kk_h
    # the MP best order keys seen so far, best first (a running top-MP: no keys tensor written)
    top = tl.full([MP], -9223372036854775808, tl.int64)
    for i0 in range(tl.maximum((sb // MP) * MP, c * CH), lim, MP):
        i = i0 + tl.arange(0, MP)
        inside = (i < nK)
        s = tl.zeros([MP, RGP], dtype=tl.float32)
        for d0 in range(0, DP, DK):  # bound = kmax . q+ + kmin . q-, DK dims a step (a loop,
            # not unrolled: the pipeliner keeps only one step's tiles in flight per stage)
            d = d0 + dk
            qt = tl.load(qrow + d[:, None], mask=row_ok[None, :] & (d[:, None] < D), other=0.0)
            kmask = inside[:, None] & (d[None, :] < D)
            kx = tl.load(kbase + i[:, None] * s_kk_k + d[None, :], mask=kmask, other=0.0)
            kn = tl.load(kbase + i[:, None] * s_kk_k + D + d[None, :], mask=kmask, other=0.0)
            if IEEE:
                s = tl.dot(kx, tl.maximum(qt, 0.0), s, input_precision="ieee")
                s = tl.dot(kn, tl.minimum(qt, 0.0), s, input_precision="ieee")
            else:
                s = tl.dot(kx, tl.maximum(qt, 0.0).to(qt.dtype), s)
                s = tl.dot(kn, tl.minimum(qt, 0.0).to(qt.dtype), s)
        best = tl.max(tl.where(row_ok[None, :], s, float("-inf")), 1)
        ok = (i >= sb) & (i < lim)
        if HAS_MASK:
            ok = ok & (tl.load(HAS + b * s_has_b + i, mask=inside, other=0) != 0)
        key = tl.where(ok, _order_key(best, i, IDX_BITS), -9223372036854775808)
        if tl.max(key, 0) > tl.min(top, 0):  # some block of the tile enters the running top
            both = tl.reshape(tl.join(top, key), [2 * MP])
            if TOPK_DESCENDING_ARG:  # Triton releases differ in tl.topk's default direction
                top = tl.topk(both, MP, descending=True)
            else:
                top = tl.topk(both, MP)
    o = tl.arange(0, MP)
    tl.store(OUT + bh * s_o_bh + (n - n0) * s_o_n + c * s_o_c + o, top)


@triton.jit(do_not_specialize=["T", "MC", "Lq", "front", "n0"])
def _exact_kernel(Q, K, KPM, CI, OUT,
                  s_q_b, s_q_h, s_q_t,
                  s_k_b, s_k_h, s_k_t,
                  s_kpm_b, s_ci_bh, s_ci_n, s_o_bh, s_o_n,
                  Hkv, T, M, MC, Lq, front, n0, RG, ROWS, D,
                  G: tl.constexpr, Q_BLOCK: tl.constexpr, KB: tl.constexpr, RGP: tl.constexpr,
                  DP: tl.constexpr, HAS_KPM: tl.constexpr, IDX_BITS: tl.constexpr,
                  IEEE: tl.constexpr):
    n = n0 + tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hkv
    h = bh % Hkv
    g, t, row_ok = _rep_rows(n, front, Lq, RG, ROWS, RGP, Q_BLOCK)
    d = tl.arange(0, DP)
    rep = tl.load(Q + b * s_q_b + (h * G + g)[:, None] * s_q_h + t.to(tl.int64)[:, None] * s_q_t
                  + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    kk = tl.arange(0, KB)
    kbase = K + b * s_k_b + h * s_k_h
    c = tl.program_id(2)  # this program scores candidates c*MC .. (c+1)*MC - 1 of the pool
    for m in range(c * MC, tl.minimum(M, (c + 1) * MC)):
        idx = tl.load(CI + bh * s_ci_bh + (n - n0) * s_ci_n + m)
        pos = idx * KB + kk
        ok = (pos >= 0) & (pos < T)  # idx = -1 gives pos < 0
        if HAS_KPM:
            pres = tl.load(KPM + b * s_kpm_b + pos, mask=ok, other=0)
            ok = ok & (pres != 0)
        kt = tl.load(kbase + pos[:, None] * s_k_t + d[None, :],
                     mask=ok[:, None] & (d[None, :] < D), other=0.0)
        if IEEE:
            s = tl.dot(rep, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(rep, tl.trans(kt))
        s = tl.where(row_ok[:, None] & ok[None, :], s, float("-inf"))
        best = tl.max(tl.max(s, 1), 0)
        key = tl.where(best > float("-inf"), _order_key(best, idx, IDX_BITS),
                       -9223372036854775808)
        tl.store(OUT + bh * s_o_bh + (n - n0) * s_o_n + m, key)


def _blocks_of(keys: Tensor) -> Tensor:
    """The block indices of order keys, -1 for non-candidates. int64."""
    return torch.where(keys == _NO_KEY, -1, keys & _IDX_MASK)


def _top_blocks(keys: Tensor, n: int) -> Tensor:
    """The block indices of the n largest order keys along the last dim, best first; -1 for
    non-candidates. int64."""
    return _blocks_of(keys.topk(min(n, keys.shape[-1]), dim=-1)[0])


def block_select_triton(q: Tensor, k: Tensor, kpm: Optional[Tensor], p0: int, *, window: int,
                        sinks: int, topk: int, q_block: int, k_block: int, rows: int, pool: int,
                        summary: Optional[Tensor] = None, num_warps: int = 4,
                        split: Optional[int] = None) -> Tensor:
    """`blocksparse.block_select` with the two stages in Triton: int32 [B, Hkv, nQ, topk].

    summary: the key blocks' [kmax | kmin] kept with the cache (`blocksparse.block_summaries`
    of k, at least nK blocks; see `blocksparse.check_summary`), else computed from k here.
    split: stage-1 programs per (query block, kv head), each scanning a share of the candidate
    blocks (default: enough programs to fill the GPU when there are few query blocks, as in
    decoding)."""
    B, Hq, Lq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nK = bs._ceil_div(T, k_block)
    dev = q.device
    j0 = p0 // q_block
    front = p0 - j0 * q_block
    nQ = bs._ceil_div(front + Lq, q_block)
    RG = G * rows
    if summary is None:
        kk, has = bs.block_summaries(k, kpm, k_block)
        has8 = None if kpm is None else has.to(torch.int8).contiguous()
    else:
        kk = bs.check_summary(summary, k, kpm, k_block)  # every block has keys
        has8 = None
    kk = kk if kk.stride(-1) == 1 else kk.contiguous()
    _, sb, wb, per_q = bs.geometry(T, window, sinks, q_block, k_block)
    M = min(pool * topk, nK)
    ieee = q.dtype == torch.float32
    qc = q if q.stride(-1) == 1 else q.contiguous()
    kc = k if k.stride(-1) == 1 else k.contiguous()
    kpm8 = None if kpm is None else kpm.to(torch.int8).contiguous()
    out = torch.empty((B, Hkv, nQ, topk), dtype=torch.int32, device=dev)
    MP = _pow2(M)
    parts = split or max(1, min(triton.cdiv(nK, 2 * MP), triton.cdiv(_PROGRAMS, nQ * B * Hkv)))
    CH = triton.cdiv(triton.cdiv(nK, parts), MP) * MP
    parts = triton.cdiv(nK, CH)
    chunk = max(1, _KEY_BUDGET // max(1, B * Hkv * parts * MP))
    RGP, DP = _pow2(RG), _pow2(D)
    qstr = (qc.stride(0), qc.stride(1), qc.stride(2))
    DK = min(64, DP)  # stage 1's pipelined [kmax | kmin] tiles: 2 x MP x DK a stage
    stages = max(1, min(3, _STAGE1_SMEM // (MP * DK * 2 * kk.element_size())))
    for s in range(0, nQ, chunk):
        e = min(nQ, s + chunk)
        n = e - s
        keys = torch.empty((B * Hkv, n, parts, MP), dtype=torch.int64, device=dev)
        args = (qc, kk, has8 if has8 is not None else kk, keys, *qstr,
                kk.stride(0), kk.stride(1), kk.stride(2),
                has8.stride(0) if has8 is not None else 0, keys.stride(0), keys.stride(1),
                keys.stride(2),
                Hkv, nK, sb, CH, Lq, front, s, j0 * per_q, per_q, wb, RG, rows, D)
        meta = dict(G=G, Q_BLOCK=q_block, RGP=RGP, DP=DP, MP=MP, HAS_MASK=has8 is not None,
                    IDX_BITS=bs._IDX_BITS, IEEE=ieee, TOPK_DESCENDING_ARG=_TOPK_DESCENDING_ARG,
                    num_warps=num_warps)
        try:
            _bound_kernel[(n, B * Hkv, parts)](*args, DK=DK, num_stages=stages, **meta)
        except OutOfResources:  # a compiler that needs more shared memory than estimated
            DK, stages = min(32, DP), 1
            _bound_kernel[(n, B * Hkv, parts)](*args, DK=DK, num_stages=stages, **meta)
        # each program's keys are sorted best first: one program needs no second selection
        keys = keys.view(B * Hkv, n, parts * MP)
        ci = (_blocks_of(keys[..., :M]) if parts == 1 else _top_blocks(keys, M)).contiguous()
        del keys
        ex = torch.empty((B * Hkv, n, M), dtype=torch.int64, device=dev)
        mparts = max(1, min(M, triton.cdiv(_PROGRAMS, n * B * Hkv)))  # few query blocks: split
        MC = triton.cdiv(M, mparts)
        _exact_kernel[(n, B * Hkv, triton.cdiv(M, MC))](
            qc, kc, kpm8 if kpm8 is not None else kc, ci, ex, *qstr,
            kc.stride(0), kc.stride(1), kc.stride(2),
            kpm8.stride(0) if kpm8 is not None else 0, ci.stride(0), ci.stride(1),
            ex.stride(0), ex.stride(1),
            Hkv, T, M, MC, Lq, front, s, RG, rows, D,
            G=G, Q_BLOCK=q_block, KB=k_block, RGP=RGP, DP=DP, HAS_KPM=kpm8 is not None,
            IDX_BITS=bs._IDX_BITS, IEEE=ieee, num_warps=num_warps)
        kept = _top_blocks(ex, topk).to(torch.int32).view(B, Hkv, n, -1)
        out[:, :, s:e, :kept.shape[-1]] = kept
        if kept.shape[-1] < topk:
            out[:, :, s:e, kept.shape[-1]:] = -1
    return out
