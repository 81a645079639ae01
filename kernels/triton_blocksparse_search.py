"""Triton kernels of the block-sparse search (docs/blocksparse.md; `blocksparse.block_select` is
the reference they are tested against).

Stage 1, `_bound_kernel`: one program per (query block, batch row x kv head) multiplies the block's
representative rows, split as [q+, q-], by the [kmax, kmin] summaries of tiles of candidate key
blocks (one tensor-core product per tile), keeps the largest bound over the rows, and writes it as an
int64 order key (float order of the score, then the block index: exact ties go to the later block);
non-candidates keep the smallest int64. No [rows, key blocks] tensor is written. Stage 2,
`_exact_kernel`: one program per (query block, batch row x kv head) reads its pool of candidate
blocks straight from the key tensor (no gathered copy) and writes the exact largest logit of the
representative rows in each, again as an order key. `torch.topk` over the keys picks the pool and
the kept blocks. Scores: products in the inputs' dtype, float32 accumulation (IEEE float32 products
for float32 inputs), compared in float32, as the contract says.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import blocksparse as bs

_IDX_MASK = (1 << bs._IDX_BITS) - 1
_NO_KEY = -(1 << 63)  # order key of a non-candidate: below every real key
_KEY_BUDGET = 1 << 26  # int64 stage-1 keys per chunk of query blocks (512 MiB)
_PROGRAMS = 512  # stage-1 programs to aim for when few query blocks are searched (decoding)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


@triton.jit
def _order_key(score, idx, IDX_BITS: tl.constexpr):
    bits = score.to(tl.int32, bitcast=True)
    mono = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (mono.to(tl.int64) << IDX_BITS) | idx.to(tl.int64)


# lengths change with every decoded token: not specialised (no recompilation per length class)
@triton.jit(do_not_specialize=["nK", "sb", "CH"])
def _bound_kernel(QQ, KK, HAS, LIM, OUT,
                  s_qq_bh, s_qq_n, s_qq_r,
                  s_kk_b, s_kk_h, s_kk_k,
                  s_has_b, s_o_bh, s_o_n,
                  Hkv, nK, sb, RG, D2, CH,
                  RGP: tl.constexpr, D2P: tl.constexpr, BN: tl.constexpr,
                  IDX_BITS: tl.constexpr, IEEE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)  # the chunk of CH candidate blocks (a multiple of BN) of this program
    b = bh // Hkv
    h = bh % Hkv
    lim = tl.minimum(tl.load(LIM + n), (c + 1) * CH)
    r = tl.arange(0, RGP)
    d = tl.arange(0, D2P)
    qq = tl.load(QQ + bh * s_qq_bh + n * s_qq_n + r[:, None] * s_qq_r + d[None, :],
                 mask=(r[:, None] < RG) & (d[None, :] < D2), other=0.0)
    row_ok = r[:, None] < RG
    kbase = KK + b * s_kk_b + h * s_kk_h
    for i0 in range(tl.maximum((sb // BN) * BN, c * CH), lim, BN):
        i = i0 + tl.arange(0, BN)
        inside = (i < nK)
        kk = tl.load(kbase + i[:, None] * s_kk_k + d[None, :],
                     mask=inside[:, None] & (d[None, :] < D2), other=0.0)
        if IEEE:
            s = tl.dot(qq, tl.trans(kk), input_precision="ieee")
        else:
            s = tl.dot(qq, tl.trans(kk))
        s = tl.where(row_ok, s, float("-inf"))
        best = tl.max(s, 0)
        has = tl.load(HAS + b * s_has_b + i, mask=inside, other=0)
        ok = (i >= sb) & (i < lim) & (has != 0)
        key = tl.where(ok, _order_key(best, i, IDX_BITS), -9223372036854775808)
        tl.store(OUT + bh * s_o_bh + n * s_o_n + i, key, mask=inside)


@triton.jit(do_not_specialize=["T", "MC"])
def _exact_kernel(REP, K, KPM, CI, OUT,
                  s_rep_bh, s_rep_n, s_rep_r,
                  s_k_b, s_k_h, s_k_t,
                  s_kpm_b, s_ci_bh, s_ci_n, s_o_bh, s_o_n,
                  Hkv, T, RG, D, M, MC,
                  KB: tl.constexpr, RGP: tl.constexpr, DP: tl.constexpr, HAS_KPM: tl.constexpr,
                  IDX_BITS: tl.constexpr, IEEE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hkv
    h = bh % Hkv
    r = tl.arange(0, RGP)
    d = tl.arange(0, DP)
    rep = tl.load(REP + bh * s_rep_bh + n * s_rep_n + r[:, None] * s_rep_r + d[None, :],
                  mask=(r[:, None] < RG) & (d[None, :] < D), other=0.0)
    kk = tl.arange(0, KB)
    kbase = K + b * s_k_b + h * s_k_h
    c = tl.program_id(2)  # this program scores candidates c*MC .. (c+1)*MC - 1 of the pool
    for m in range(c * MC, tl.minimum(M, (c + 1) * MC)):
        idx = tl.load(CI + bh * s_ci_bh + n * s_ci_n + m)
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
        s = tl.where((r[:, None] < RG) & ok[None, :], s, float("-inf"))
        best = tl.max(tl.max(s, 1), 0)
        key = tl.where(best > float("-inf"), _order_key(best, idx, IDX_BITS),
                       -9223372036854775808)
        tl.store(OUT + bh * s_o_bh + n * s_o_n + m, key)


def _top_blocks(keys: Tensor, n: int) -> Tensor:
    """The block indices of the n largest order keys along the last dim, best first; -1 for
    non-candidates. int64."""
    n = min(n, keys.shape[-1])
    top, _ = keys.topk(n, dim=-1)
    return torch.where(top == _NO_KEY, -1, top & _IDX_MASK)


def block_select_triton(q: Tensor, k: Tensor, kpm: Optional[Tensor], p0: int, *, window: int,
                        sinks: int, topk: int, q_block: int, k_block: int, rows: int, pool: int,
                        summary: Optional[Tensor] = None, block_n: int = 64, num_warps: int = 4,
                        split: Optional[int] = None) -> Tensor:
    """`blocksparse.block_select` with the two stages in Triton: int32 [B, Hkv, nQ, topk].

    summary: the key blocks' [kmax | kmin] kept with the cache (`blocksparse.block_summaries`
    of k, at least nK blocks; see `blocksparse.check_summary`), else computed from k here.
    split: stage-1 programs per (query block, kv head), each scanning a share of the candidate
    blocks (default: enough programs to fill the GPU when there are few query blocks, as in
    decoding)."""
    B, Hq, Lq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    nK = bs._ceil_div(T, k_block)
    dev = q.device
    rep, j0 = bs.representatives(q, p0, q_block, rows, Hkv)
    nQ, RG = rep.shape[2], rep.shape[3]
    rep = rep.reshape(B * Hkv, nQ, RG, D).contiguous()
    qq = torch.cat([rep.clamp(min=0), rep.clamp(max=0)], -1)  # [BH, nQ, RG, 2D]
    kk, has = (bs.block_summaries(k, kpm, k_block) if summary is None
               else bs.check_summary(summary, k, kpm, k_block))
    kk = kk if kk.stride(-1) == 1 else kk.contiguous()
    has8 = has.to(torch.int8).contiguous()
    sb, lim = bs.candidate_limits(j0, nQ, T, window, sinks, q_block, k_block, dev)
    lim = lim.clamp(min=0, max=nK).contiguous()
    M = min(pool * topk, nK)
    ieee = q.dtype == torch.float32
    kc = k if k.stride(-1) == 1 else k.contiguous()
    kpm8 = None if kpm is None else kpm.to(torch.int8).contiguous()
    out = torch.full((B, Hkv, nQ, topk), -1, dtype=torch.int32, device=dev)
    chunk = max(1, _KEY_BUDGET // max(1, B * Hkv * nK))
    RGP, DP = _pow2(RG), _pow2(D)
    for s in range(0, nQ, chunk):
        e = min(nQ, s + chunk)
        n = e - s
        keys = torch.full((B * Hkv, n, nK), _NO_KEY, dtype=torch.int64, device=dev)
        qs = qq[:, s:e]
        parts = split or max(1, min(triton.cdiv(nK, 4 * block_n), triton.cdiv(_PROGRAMS, n * B * Hkv)))
        CH = triton.cdiv(triton.cdiv(nK, parts), block_n) * block_n
        _bound_kernel[(n, B * Hkv, triton.cdiv(nK, CH))](
            qs, kk, has8, lim[s:e], keys,
            qs.stride(0), qs.stride(1), qs.stride(2),
            kk.stride(0), kk.stride(1), kk.stride(2),
            has8.stride(0), keys.stride(0), keys.stride(1),
            Hkv, nK, sb, RG, 2 * D, CH,
            RGP=RGP, D2P=_pow2(2 * D), BN=block_n, IDX_BITS=bs._IDX_BITS, IEEE=ieee,
            num_warps=num_warps)
        ci = _top_blocks(keys, M).contiguous()  # [BH, n, M]
        del keys
        ex = torch.empty((B * Hkv, n, M), dtype=torch.int64, device=dev)
        rs = rep[:, s:e]
        parts = max(1, min(M, triton.cdiv(_PROGRAMS, n * B * Hkv)))  # few query blocks: split
        MC = triton.cdiv(M, parts)
        _exact_kernel[(n, B * Hkv, triton.cdiv(M, MC))](
            rs, kc, kpm8 if kpm8 is not None else has8, ci, ex,
            rs.stride(0), rs.stride(1), rs.stride(2),
            kc.stride(0), kc.stride(1), kc.stride(2),
            kpm8.stride(0) if kpm8 is not None else 0, ci.stride(0), ci.stride(1),
            ex.stride(0), ex.stride(1),
            Hkv, T, RG, D, M, MC,
            KB=k_block, RGP=RGP, DP=DP, HAS_KPM=kpm8 is not None, IDX_BITS=bs._IDX_BITS,
            IEEE=ieee, num_warps=num_warps)
        kept = _top_blocks(ex, topk)
        out[:, :, s:e, :kept.shape[-1]] = kept.view(B, Hkv, n, -1).to(torch.int32)
    return out
