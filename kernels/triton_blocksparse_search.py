"""Triton kernels of the block-sparse search (docs/blocksparse.md; `blocksparse.block_select` is
the reference they are tested against).

Stage 1, `_bound_kernel`: one program per (query block, batch row x kv head, tile of candidate
groups of key blocks) multiplies the [kmax, kmin] summaries of its tile by the block's
representative rows, split as [q+, q-] (tensor-core products in slices of the 2D dim), and writes
the largest bound over the rows as an int64 order key (float order of the score, then the group
index: exact ties go to the later group); `torch.topk` keeps the pool, chunked over query blocks
so that the keys tensor stays within 512 MiB. A call of one query block (decoding) keeps no
torch op between launches: each stage-1 program sorts its tile and writes its best pool-size
keys, and every stage-2 program sorts those tops and takes the pool itself. (A running top-P x
topk kept inside the kernel with `tl.topk`, so that no keys tensor exists, was measured 2.5x
slower at 1M on an H100 for a prefill: the bitonic merge ran on nearly every tile and cost about
25x the tile's products; benchmarks/RESULTS.md.)

Stage 2, `_exact_kernel`: one program per (query block, batch row x kv head, share of the pool)
reads stage 1's order keys, decodes their group indices and scores several candidate blocks of
those groups a step, read straight from the key tensor (no gathered copy), as one tensor-core
tile; it writes the exact largest logit of the representative rows in each, again as an order key;
`torch.topk` picks the kept blocks. Both kernels read the representative rows straight from q
and compute the candidate limits themselves (no gathered copies, few launches per decoded token).
Scores: products in the inputs' dtype, float32 accumulation (IEEE float32 products for float32
inputs), compared in float32, as the contract says.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from torch import Tensor

from . import blocksparse as bs
from .launch import launch
from .triton_blocksparse import _pow2, kernel_table

_IDX_MASK = (1 << bs._IDX_BITS) - 1
_NO_KEY = -(1 << 63)  # order key of a non-candidate: below every real key
_KEY_BUDGET = 1 << 26  # int64 stage-1 keys per chunk of query blocks (512 MiB)
_STAGE1_SMEM = 160 * 1024  # shared memory stage 1's pipelined [kmax | kmin] tiles may take
_PROGRAMS = 512  # stage-2 programs to aim for when few query blocks are searched (decoding)
_FUSED_PROGRAMS = 128  # ... when each also sorts the stage-1 tops (about one wave)
_SUMMARY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # `summaries_triton`'s
_MERGE_KEYS = 4096  # stage-1 tile tops a stage-2 program may merge (sorted in registers)


@triton.jit
def _order_key(score, idx, IDX_BITS: tl.constexpr):
    bits = score.to(tl.int32, bitcast=True)
    mono = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (mono.to(tl.int64) << IDX_BITS) | idx.to(tl.int64)


@triton.jit
def _rep_rows(n, front, Lq, RG, ROWS, STEP, RGP: tl.constexpr, Q_BLOCK: tl.constexpr):
    """The representative rows of query block n of the call (`blocksparse.representatives`): for
    lane r < RG, the query head within the kv group (r // ROWS) and the index among the call's
    queries of the row (r % ROWS) * STEP before the block's last row in the call (its last row
    where that row is not in the call)."""
    r = tl.arange(0, RGP)
    last = tl.minimum(front + Lq - 1 - n * Q_BLOCK, Q_BLOCK - 1)
    first = tl.maximum(front - n * Q_BLOCK, 0)
    row = last - (r % ROWS) * STEP
    row = tl.where(row >= first, row, last)
    return r // ROWS, n * Q_BLOCK + row - front, r < RG


# lengths change with every decoded token: not specialised (no recompilation per length class)
@triton.jit(do_not_specialize=["nK", "sb", "Lq", "front", "n0", "before0"])
def _bound_kernel(Q, KK, HAS, OUT,
                  s_q_b, s_q_h, s_q_t,
                  s_kk_b, s_kk_h, s_kk_k,
                  s_has_b, s_o_bh, s_o_n, s_o_c,
                  Hkv, nK, nG, sb, Lq, front, n0, before0, per_q, wb, RG, ROWS, STEP, D,
                  G: tl.constexpr, Q_BLOCK: tl.constexpr, RGP: tl.constexpr, DP: tl.constexpr,
                  DK: tl.constexpr, MP: tl.constexpr, F: tl.constexpr, HAS_MASK: tl.constexpr,
                  IDX_BITS: tl.constexpr, IEEE: tl.constexpr, TOPS: tl.constexpr):
    n = n0 + tl.program_id(0).to(tl.int64)  # query block of the call
    bh = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)  # the tile of MP candidate groups of this program
    b = bh // Hkv
    h = bh % Hkv
    # candidate blocks: sb <= i < (blocks before the query block) - window blocks; a group of F
    # blocks is a candidate if it holds one
    lim = tl.minimum(tl.maximum(before0 + n * per_q - wb, 0), nK)
    g, t, row_ok = _rep_rows(n, front, Lq, RG, ROWS, STEP, RGP, Q_BLOCK)
    dk = tl.arange(0, DK)
    qrow = Q + b * s_q_b + (h * G + g)[None, :] * s_q_h + t.to(tl.int64)[None, :] * s_q_t
    kbase = KK + b * s_kk_b + h * s_kk_h
    i = c * MP + tl.arange(0, MP)  # this program's tile of candidate groups
    o = tl.arange(0, MP)
    ok = (i * F + F - 1 >= sb) & (i * F < lim)
    if HAS_MASK:
        ok = ok & (tl.load(HAS + b * s_has_b + i, mask=i < nG, other=0) != 0)
    key = tl.full([MP], -9223372036854775808, tl.int64)
    if (c * MP * F < lim) & ((c * MP + MP) * F > sb):  # a tile with candidates
        s = tl.zeros([MP, RGP], dtype=tl.float32)
        for d0 in range(0, DP, DK):  # bound = kmax . q+ + kmin . q-, DK dims a step (a loop,
            # not unrolled: the pipeliner keeps only one step's tiles in flight per stage)
            d = d0 + dk
            qt = tl.load(qrow + d[:, None], mask=row_ok[None, :] & (d[:, None] < D), other=0.0)
            kmask = ok[:, None] & (d[None, :] < D)
            kx = tl.load(kbase + i[:, None] * s_kk_k + d[None, :], mask=kmask, other=0.0)
            kn = tl.load(kbase + i[:, None] * s_kk_k + D + d[None, :], mask=kmask, other=0.0)
            if IEEE:
                s = tl.dot(kx, tl.maximum(qt, 0.0), s, input_precision="ieee")
                s = tl.dot(kn, tl.minimum(qt, 0.0), s, input_precision="ieee")
            else:
                s = tl.dot(kx, tl.maximum(qt, 0.0).to(qt.dtype), s)
                s = tl.dot(kn, tl.minimum(qt, 0.0).to(qt.dtype), s)
        best = tl.max(tl.where(row_ok[None, :], s, float("-inf")), 1)
        key = tl.where(ok, _order_key(best, i, IDX_BITS), key)
    if TOPS > 0:  # only the tile's TOPS best, best first (the pool is among them)
        key = tl.sort(key, descending=True)
        tl.store(OUT + bh * s_o_bh + (n - n0) * s_o_n + c * s_o_c + o, key, mask=o < TOPS)
    else:
        tl.store(OUT + bh * s_o_bh + (n - n0) * s_o_n + c * s_o_c + o, key)


@triton.jit(do_not_specialize=["T", "nK", "sb", "MC", "Lq", "front", "n0", "before0", "NT"])
def _exact_kernel(Q, K, KPM, CI, OUT,
                  s_q_b, s_q_h, s_q_t,
                  s_k_b, s_k_h, s_k_t,
                  s_kpm_b, s_ci_bh, s_ci_n, s_o_bh, s_o_n,
                  Hkv, T, nK, sb, M, MC, Lq, front, n0, before0, per_q, wb, RG, ROWS, STEP, D,
                  G: tl.constexpr, Q_BLOCK: tl.constexpr, KB: tl.constexpr, CB: tl.constexpr,
                  F: tl.constexpr, RGP: tl.constexpr, DP: tl.constexpr, HAS_KPM: tl.constexpr,
                  IDX_BITS: tl.constexpr, IEEE: tl.constexpr, TOPS_IN, s_t_bh, s_t_n, NT,
                  TP: tl.constexpr, TAB, s_tab_bh, HAS_TAB: tl.constexpr):
    n = n0 + tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hkv
    h = bh % Hkv
    lim = tl.minimum(tl.maximum(before0 + n * per_q - wb, 0), nK)  # candidate blocks: sb..lim-1
    g, t, row_ok = _rep_rows(n, front, Lq, RG, ROWS, STEP, RGP, Q_BLOCK)
    d = tl.arange(0, DP)
    rep = tl.load(Q + b * s_q_b + (h * G + g)[:, None] * s_q_h + t.to(tl.int64)[:, None] * s_q_t
                  + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    kbase = K + b * s_k_b + h * s_k_h
    c = tl.program_id(2)  # this program scores candidates c*MC .. (c+1)*MC - 1 of the pool
    end = tl.minimum(M, (c + 1) * MC)
    j = tl.arange(0, CB * KB)  # CB candidates a step, KB keys each: lane j is key j % KB of
    cb = tl.arange(0, CB)  # candidate j // KB (whole tensor-core tiles, CB loads in flight)
    ci = CI + bh * s_ci_bh + (n - n0) * s_ci_n
    if TP > 0:  # the pool is the M // F best of stage 1's NT tile tops: picked here, into CI
        tp = tl.arange(0, TP)
        tops = tl.load(TOPS_IN + bh * s_t_bh + (n - n0) * s_t_n + tp, mask=tp < NT,
                       other=-9223372036854775808)
        tops = tl.sort(tops, descending=True)
        # every program of (n, bh) writes the same values; each reads back its own
        tl.store(ci + tp, tops, mask=tp < M // F)
        tl.debug_barrier()  # written by other threads of this program
    for m0 in range(c * MC, end, CB):
        m = m0 + j // KB  # candidate m is block m % F of the pool's group m // F
        live = m < end
        # the pool holds stage 1's order keys: group index in the low bits, none for an empty slot
        lane_key = tl.load(ci + m // F, mask=live, other=-9223372036854775808)
        grp = tl.where(lane_key == -9223372036854775808, -1, lane_key & ((1 << IDX_BITS) - 1))
        blk = grp * F + m % F
        live = live & (grp >= 0) & (blk >= sb) & (blk < lim)
        pos = blk * KB + j % KB
        ok = live & (pos < T)
        if HAS_KPM:
            pres = tl.load(KPM + b * s_kpm_b + pos, mask=ok, other=0)
            ok = ok & (pres != 0)
        if HAS_TAB:  # paged keys: block blk sits in slot TAB[bh, blk], read once a candidate
            # (a lane-wise read masked by ok failed Triton 3.6's layout pass on sm_90)
            mc = m0 + cb
            key_c = tl.load(ci + mc // F, mask=mc < end, other=-9223372036854775808)
            blk_c = tl.where(key_c == -9223372036854775808, -1,
                             key_c & ((1 << IDX_BITS) - 1)) * F + mc % F
            use = (mc < end) & (blk_c >= sb) & (blk_c < lim)
            slot = tl.load(TAB + bh * s_tab_bh + tl.where(use, blk_c, 0)).to(tl.int64)
            slot = tl.reshape(tl.broadcast_to(tl.maximum(slot, 0)[:, None], (CB, KB)), (CB * KB,))
            row = slot * KB + j % KB
        else:
            row = pos
        kt = tl.load(kbase + row[:, None] * s_k_t + d[None, :],
                     mask=ok[:, None] & (d[None, :] < D), other=0.0)
        if IEEE:
            s = tl.dot(rep, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(rep, tl.trans(kt))
        s = tl.where(row_ok[:, None] & ok[None, :], s, float("-inf"))
        best = tl.max(tl.reshape(tl.max(s, 0), [CB, KB]), 1)  # [CB]
        mc = m0 + cb
        idx = (tl.load(ci + mc // F, mask=mc < end, other=0) & ((1 << IDX_BITS) - 1)) * F + mc % F
        key = tl.where(best > float("-inf"), _order_key(best, idx, IDX_BITS),
                       -9223372036854775808)
        tl.store(OUT + bh * s_o_bh + (n - n0) * s_o_n + m0 + cb, key, mask=m0 + cb < end)


def _blocks_of(keys: Tensor) -> Tensor:
    """The block indices of order keys, -1 for non-candidates. int64."""
    return torch.where(keys == _NO_KEY, -1, keys & _IDX_MASK)


def _top_keys(keys: Tensor, n: int) -> Tensor:
    """The n largest order keys along the last dim, best first. Few long rows (one query block
    whose tile tops are more than stage 2 merges, or sequence parallelism's candidates: one row
    per kv head over every candidate) are cut into pieces first: `torch.topk` runs one thread
    block per row, so 8 rows of 32768 keys used 8 SMs; the n best of each piece hold the n best of
    the row (order keys are unique), and a second topk picks them."""
    n = min(n, keys.shape[-1])
    L = keys.shape[-1]
    piece = max(4 * n, 2048)
    if keys.numel() // L < 256 and L >= 4 * piece:
        pad = -L % piece
        if pad:
            keys = torch.nn.functional.pad(keys, (0, pad), value=_NO_KEY)
        keys = keys.unflatten(-1, (-1, piece)).topk(n, dim=-1)[0].flatten(-2)
    return keys.topk(n, dim=-1)[0]


def block_select_triton(q: Tensor, k: Tensor, kpm: Optional[Tensor], p0: int, *, window: int,
                        sinks: int, topk: int, q_block: int, k_block: int, rows: int, pool: int,
                        summary: Optional[Tensor] = None, num_warps: int = 4,
                        exact_rows: int = 0, group: int = 1, spread: bool = False,
                        candidates_only: bool = False, exact_keys: bool = False,
                        table: Optional[Tensor] = None) -> Tensor:
    """`blocksparse.block_select` with the two stages in Triton: int32 [B, Hkv, nQ, topk]
    (candidates_only: stage 1's groups [B, Hkv, nQ, MG], -1 where none).

    summary: the stage-1 groups' [kmax | kmin] kept with the cache (`blocksparse.block_summaries`
    of k with group * k_block keys a group, at least that many groups; see
    `blocksparse.check_summary`), else computed from k here. exact_rows: stage 2's
    representative rows (0: ``rows``). group: key blocks per stage-1 group. spread: each stage's
    rows q_block // rows apart over the query block (else its last rows). exact_keys: return
    stage 2's order keys int64 [B, Hkv, nQ, M] instead (the kept blocks are the topk largest,
    -1 past the candidates: what `triton_blocksparse.block_attention_triton` picks with
    ``keys_topk``).
    table: paged keys (`blocksparse.check_table`; needs ``summary``): stage 2 reads each block
    from its slot.

    A call of one query block (a decoded token, a short chunk) picks stage 1's pool inside the
    kernels: each stage-1 program keeps its tile's best groups, and every stage-2 program merges
    those tops itself, so that no torch op runs between the launches."""
    group = bs.stage1_group(window, k_block, group)
    B, Hq, Lq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    if table is not None:
        T, table = kernel_table(table, k, kpm, k_block, "block_select_triton")
        if summary is None:
            raise ValueError("block_select_triton: paged keys need the group summaries")
    G = Hq // Hkv
    nK = bs._ceil_div(T, k_block)
    gspan = group * k_block
    nG = bs._ceil_div(T, gspan)
    dev = q.device
    j0 = p0 // q_block
    front = p0 - j0 * q_block
    nQ = bs._ceil_div(front + Lq, q_block)
    RG = G * rows
    if summary is None and kpm is None and k.dtype in _SUMMARY_DTYPES:
        kk, has8 = summaries_triton(k, gspan), None  # one pass over the keys
    elif summary is None:
        kk, has = bs.block_summaries(k, kpm, gspan)
        has8 = None if kpm is None else has.to(torch.int8).contiguous()
    else:
        kk = bs.check_summary(summary, k, kpm, gspan, T)  # every group has keys
        has8 = None
    kk = kk if kk.stride(-1) == 1 else kk.contiguous()
    _, sb, wb, per_q = bs.geometry(T, window, sinks, q_block, k_block)
    MG = min(bs._ceil_div(pool * topk, group), nG)  # groups kept by stage 1
    M = MG * group  # blocks scored by stage 2
    ieee = q.dtype == torch.float32
    qc = q if q.stride(-1) == 1 else q.contiguous()
    kc = k if k.stride(-1) == 1 else k.contiguous()
    kpm8 = None if kpm is None else kpm.to(torch.int8).contiguous()
    if exact_keys and candidates_only:
        raise ValueError("block_select_triton: exact_keys and candidates_only exclude each other")
    if exact_keys:  # stage 2 writes its keys straight into the result
        out = torch.empty((B * Hkv, nQ, M), dtype=torch.int64, device=dev)
    else:
        out = torch.empty((B, Hkv, nQ, MG if candidates_only else topk), dtype=torch.int32,
                          device=dev)
    # stage 1's tile of candidate groups, one a program (one query block: wider tiles, so that
    # stage 2's programs merge fewer tile tops)
    MP = max(_pow2(MG), min(256 if nQ == 1 else 128, _pow2(nG)))
    parts = bs._ceil_div(nG, MP)
    chunk = max(1, _KEY_BUDGET // max(1, B * Hkv * parts * MP))
    RGP, DP = _pow2(RG), _pow2(D)
    qstr = (qc.stride(0), qc.stride(1), qc.stride(2))
    DK = min(64, DP)  # stage 1's pipelined [kmax | kmin] tiles: 2 x MP x DK a stage
    stages = max(1, min(3, _STAGE1_SMEM // (MP * DK * 2 * kk.element_size())))
    rows2 = exact_rows or rows  # stage 2's representative rows
    RGP2 = _pow2(G * rows2)
    # stage 2's candidates a step: 128 keys with 32 rows, fewer with more rows (registers)
    CB = max(1, (128 * 32 // max(32, RGP2)) // k_block)
    # one query block: stage 1 keeps each tile's MG best, stage 2 merges them (no torch top-k)
    fused = nQ == 1 and not candidates_only and parts * MG <= _MERGE_KEYS
    for s in range(0, nQ, chunk):
        e = min(nQ, s + chunk)
        n = e - s
        keys = torch.empty((B * Hkv, n, parts, MG if fused else MP), dtype=torch.int64, device=dev)
        args = (qc, kk, has8 if has8 is not None else kk, keys, *qstr,
                kk.stride(0), kk.stride(1), kk.stride(2),
                has8.stride(0) if has8 is not None else 0, keys.stride(0), keys.stride(1),
                keys.stride(2),
                Hkv, nK, nG, sb, Lq, front, s, j0 * per_q, per_q, wb, RG, rows,
                q_block // rows if spread else 1, D)
        meta = dict(G=G, Q_BLOCK=q_block, RGP=RGP, DP=DP, MP=MP, F=group,
                    HAS_MASK=has8 is not None, IDX_BITS=bs._IDX_BITS, IEEE=ieee,
                    TOPS=MG if fused else 0, num_warps=num_warps if MP <= 128 else 2 * num_warps)
        try:
            launch(_bound_kernel, (n, B * Hkv, parts), *args, DK=DK, num_stages=stages, **meta)
        except OutOfResources:  # a compiler that needs more shared memory than estimated
            DK, stages = min(32, DP), 1
            launch(_bound_kernel, (n, B * Hkv, parts), *args, DK=DK, num_stages=stages, **meta)
        if fused:  # stage 2's programs pick the pool from the tops (into ci)
            ci = torch.empty((B * Hkv, n, MG), dtype=torch.int64, device=dev)
            merge = dict(TOPS_IN=keys, s_t_bh=keys.stride(0), s_t_n=keys.stride(1), NT=parts * MG,
                         TP=_pow2(parts * MG))
        else:
            ci = _top_keys(keys.view(B * Hkv, n, parts * MP), MG).contiguous()  # stage 2 decodes them
            del keys
            merge = dict(TOPS_IN=ci, s_t_bh=0, s_t_n=0, NT=0, TP=0)
        if candidates_only:
            out[:, :, s:e] = _blocks_of(ci).to(torch.int32).view(B, Hkv, n, -1)
            continue
        ex = out[:, s:e] if exact_keys else torch.empty((B * Hkv, n, M), dtype=torch.int64,
                                                          device=dev)
        # few query blocks: split the pool (fewer programs where each also merges the tops)
        mparts = max(1, min(M, bs._ceil_div(_FUSED_PROGRAMS if fused else _PROGRAMS,
                                            n * B * Hkv)))
        MC = bs._ceil_div(bs._ceil_div(M, mparts), CB) * CB
        launch(
            _exact_kernel, (n, B * Hkv, bs._ceil_div(M, MC)),
            qc, kc, kpm8 if kpm8 is not None else kc, ci, ex, *qstr,
            kc.stride(0), kc.stride(1), kc.stride(2),
            kpm8.stride(0) if kpm8 is not None else 0, ci.stride(0), ci.stride(1),
            ex.stride(0), ex.stride(1),
            Hkv, T, nK, sb, M, MC, Lq, front, s, j0 * per_q, per_q, wb, G * rows2, rows2,
            q_block // rows2 if spread else 1, D,
            G=G, Q_BLOCK=q_block, KB=k_block, CB=CB, F=group, RGP=RGP2, DP=DP,
            HAS_KPM=kpm8 is not None, IDX_BITS=bs._IDX_BITS, IEEE=ieee, **merge,
            TAB=kc if table is None else table, s_tab_bh=0 if table is None else table.stride(0),
            HAS_TAB=table is not None, num_warps=num_warps if RGP2 <= 64 else 8)
        if exact_keys:
            continue
        kept = _blocks_of(_top_keys(ex, topk)).to(torch.int32).view(B, Hkv, n, -1)
        out[:, :, s:e, :kept.shape[-1]] = kept
        if kept.shape[-1] < topk:
            out[:, :, s:e, kept.shape[-1]:] = -1
    return out.view(B, Hkv, nQ, M) if exact_keys else out


@triton.jit(do_not_specialize=["T", "i0"])
def _summary_kernel(K, BUF, s_k_b, s_k_h, s_k_t, s_u_b, s_u_h, s_u_g, H, T, i0, D,
                    SPAN: tl.constexpr, DP: tl.constexpr, KT: tl.constexpr):
    """Group i0 + program 0 of (batch row x head) program 1: [max | min] over its SPAN keys (those
    below T) into BUF's row: `blocksparse.block_summaries` of the group."""
    grp = i0 + tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    d = tl.arange(0, DP)
    kbase = K + b * s_k_b + h * s_k_h
    hi = tl.full([DP], float("-inf"), tl.float32)
    lo = tl.full([DP], float("inf"), tl.float32)
    for t0 in range(0, SPAN, KT):
        t = grp * SPAN + t0 + tl.arange(0, KT)
        m = (t < T)[:, None] & (d < D)[None, :]
        x = tl.load(kbase + t[:, None] * s_k_t + d[None, :], mask=m, other=0.0).to(tl.float32)
        hi = tl.maximum(hi, tl.max(tl.where(m, x, float("-inf")), 0))
        lo = tl.minimum(lo, tl.min(tl.where(m, x, float("inf")), 0))
    row = BUF + b * s_u_b + h * s_u_h + grp * s_u_g
    tl.store(row + d, hi.to(BUF.dtype.element_ty), mask=d < D)
    tl.store(row + D + d, lo.to(BUF.dtype.element_ty), mask=d < D)


def summaries_triton(k: Tensor, span: int) -> Tensor:
    """`blocksparse.block_summaries(k, None, span)[0]`, [B, H, nK, 2D] in k's dtype (float32,
    bfloat16 or float16), in one launch that reads the keys once (the torch form reads them twice,
    for the maxima and the minima, then concatenates): what a search without summaries kept with
    the cache (a compiled model's decoded token) computes at every call."""
    B, H, T, D = k.shape
    buf = torch.empty(B, H, -(-T // span), 2 * D, dtype=k.dtype, device=k.device)
    summary_update_triton(k, buf, 0, span)
    return buf


def summary_update_triton(k: Tensor, buf: Tensor, i0: int, span: int) -> None:
    """`blocksparse.BlockSummaryCache`'s update on the GPU: rows i0..nK-1 of buf [B, H, >= nK, 2D]
    (k's dtype, unit stride in the last dim) become the [max | min] summaries of k's groups of
    ``span`` keys (the last one partial), in one launch."""
    B, H, T, D = k.shape
    nK = -(-T // span)
    if i0 >= nK or B * H == 0:
        return
    kc = k if k.stride(-1) == 1 else k.contiguous()
    launch(_summary_kernel, (nK - i0, B * H),
           kc, buf, kc.stride(0), kc.stride(1), kc.stride(2), buf.stride(0), buf.stride(1),
           buf.stride(2), H, T, i0, D, SPAN=span, DP=_pow2(D), KT=min(64, _pow2(span)),
           num_warps=4)
