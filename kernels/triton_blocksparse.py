"""Triton forward kernel of block-sparse attention (``search_key="blocksparse"``).

It computes what `blocksparse.block_attention` computes; docs/blocksparse.md is the contract. The
queries of a call sit at the absolute positions p0..p0+Lq-1; query block j = t // q_block holds the
query at t. Each query attends, in one softmax, the key blocks (``k_block`` keys each) that ``full``
lists for its query block (sinks, window and kept blocks, as `blocksparse.attended_blocks` builds
them; -1 = empty slot) and, causally, the keys j*q_block..t of its own block (the diagonal). Keys
>= T never count (the last key block may be partial); the listed blocks are taken as given (no
causal check: the lists hold blocks before the query block). output = softmax(scale q.k) v in q's
dtype, float32 accumulation; a query with no key gives zeros. No key-padding mask. On request the
forward also writes each query's log-sum-exp, the natural log of sum exp(scale q.k) over its keys
(float32; -inf for a query with no key), which the backward of a prefill
(triton_blocksparse_backward.py) reads.

Launch: two kernels a call, no host synchronisation: the list compaction and the attention or,
given the search's order keys, the attention and (where its tiles are split) their merge.

* ``_compact_kernel`` (one program per 32 list rows) rewrites each row of ``full`` (one per batch
  row, kv head and query block, F slots), after the sink and window blocks it may be asked to put
  first, as the blocks lying wholly below T first, in list order, then their count and the partial
  last block (or -1): O(B Hkv nQ F) int32, read and written once. Given the search's stage-2
  order keys instead (``keys_topk``: a call of one query block, such as a decoded token) there is
  no list: each program of ``_fwd_kernel`` attends the sink and window key ranges, then sorts its
  row's keys and attends the blocks of the top keys_topk (one launch, no list written, no torch op
  between the search's launches and this one). A decoded token has few tiles (B * Hkv: the G
  heads of a kv head stacked in one, G valid rows), each of ~1,100 keys that one program would
  walk alone (27 us at 1M on an H100 with a tile a head, the token's largest kernel): ``split``
  programs share a tile's key blocks, every split-th one
  block a step, the last program also the diagonal, each storing its unnormalised accumulator,
  running max and sum (float32, valid rows only); ``_combine_kernel`` (one program a tile) merges
  them as flash-decoding does and stores the output and log-sum-exp as an unsplit tile would.
* ``_fwd_kernel``: one program per (tile of BLOCK_M query rows, HP query heads of a kv group) on
  grid axis 0, the programs of one group consecutive, so that those that read the same key blocks
  run together and share them in L2; batch row x kv head on axis 1. The HP heads' rows are stacked
  in one tile of HP * BLOCK_M rows: they share positions, lists, masks and every key and value
  loaded, so a query block of 64 rows fills a 256-row tile with the 4 heads of a kv head. A tile
  lies inside one query block (BLOCK_M divides q_block) and reads its block's row. FlashAttention-2
  online softmax (running max and sum in float32, exp2 with scale*log2(e) folded in, float32
  accumulator, tl.dot on the inputs' dtype; IEEE float32 products for float32 inputs): first the
  whole listed blocks (no mask), BLOCK_N keys per step (k_block / BLOCK_N steps per block, or
  BLOCK_N / k_block blocks per step, then the blocks left over one a step), the key offset idx *
  k_block in int64, idx picked out of the list row loaded once into registers (an index loaded
  inside the loop makes the key loads indirect, which Triton's pipeliner prefetches only one step
  ahead: 14% slower, measured); then the partial block, keys >= T masked; then the diagonal, the
  key tiles below the tile's first query without a mask and the rest with key <= query and key <
  T. Rows outside the call's queries are masked on load and store. With WRITE_LSE (a constexpr:
  the default launch compiles without it) the tile also stores (m + log2 l) ln 2 of its rows.

Default launch (`block_attention_triton`'s keyword arguments, `_BLOCK_M` and the rest): BLOCK_M =
128 rows of a head, BLOCK_N = 64 keys, up to 16 warps, 3 pipeline stages (the Hopper
FlashAttention forward shape); BLOCK_M shrinks to the call's rows and to q_block, HP grows to fill
256 rows where a head's rows are 32 to 64 and to fill 16 rows where they are fewer (one decoded
token: the 4 heads of a kv head share a 16-row tile and every key block it reads), the warps
follow the tile's rows/16 (4 to 16: a 256-row tile with 8 warps spilled registers, 380 bytes a
thread, and ran 6% slower than with 16), and stages and tiles shrink where a wide head dimension
or a GPU with less shared memory (99 KB a block on consumer Ampere and Ada, 163 KB on an A100)
would exceed it, to Triton's own limit for the device (and further where a compiled kernel needs more than estimated: Triton refuses its launch, the call
retries with a smaller budget and keeps it). Measured on an H100 (Triton 3.6, bf16, B=1, Hq=32,
Hkv=8, D=128): 128x64 blocks with F=14 listed per query block, one head a program, 330-350 TFLOP/s
of attended pairs (4 D pairs Hq / time) at 128K and 1M tokens (BLOCK_N = 128, two listed blocks per
step, and one loop masking whole blocks and diagonal alike were slower); the default's 64x32 blocks
at 128K, 354 TFLOP/s with 4 heads a program and 8 warps, 383 with 16 (an H100). Head dims up to
256 (padded to a power of two with masks). Under Triton's interpreter, whose bf16 products are
wrong, bf16 products run in float32.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from .blocksparse import _IDX_BITS, _ceil_div
from .geometry import next_pow2
from .launch import launch

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634
# bytes of shared memory a launch may plan for where no device is asked (the interpreter): Hopper's
# 227 KB less 1 KB; on a GPU, what Triton's launch allows there, less 1 KB (`_smem_budget`)
_SMEM_BUDGET = 226 * 1024
_SMEM: dict = {}  # device index -> the budget there
_FIT: dict = {}  # (device, `_launch_shape`'s arguments) -> a budget found to fit by compiling
_COMPACT_ROWS = 32  # list rows per program of _compact_kernel
# rows of a tile of stacked query heads: at 128K (H200, bf16, 32/8 heads of 128, the default's
# 64-row query blocks) the attention took 6.9 ms with 4 heads a program, 7.5 with 2, 8.0 with 1
_STACK_ROWS = 256
# one query block given the search's keys (a decoded token: B * Hkv tiles of the G heads' rows):
# the tiles' key blocks are shared out until the launch has about this many programs, each tile
# among at most _MAX_SPLIT (a token of 32/8 heads on an H100, its 4 heads a tile: attention and
# merge 11.3 us split 16 ways, 13.7 split 8, 19.5 split 4, 24.5 unsplit)
_SPLIT_PROGRAMS = 256
_MAX_SPLIT = 16
# `block_attention_triton`'s launch shape for a long call (fitted to short calls): rows, keys a
# step, warps, pipeline stages
_BLOCK_M, _BLOCK_N, _WARPS, _STAGES = 128, 64, 16, 3
_COMBINE_VALUES = 8192  # partial accumulator values a program of _combine_kernel loads at once


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, next_pow2(x))


def kernel_table(table: Tensor, k: Tensor, kpm: Optional[Tensor], k_block: int,
                 name: str) -> Tuple[int, Tensor]:
    """A block table of paged keys (`blocksparse.check_table`) checked and laid out for the
    kernels: (T, int32 rows [B * Hkv, nK], one per batch row and kv head)."""
    from .blocksparse import check_table
    T = check_table(table, k, kpm, k_block, name)
    return T, table.to(torch.int32).reshape(-1, table.shape[2]).contiguous()


# lengths change with every decoded token: not specialised (no recompilation per length class)
@triton.jit(do_not_specialize=["NROWS", "T", "NK", "J0", "NQ"])
def _compact_kernel(FULL, OUT, s_fr, s_ff, NROWS, F, W, T, NK, SB, WB, PER_Q, J0, NQ,
                    K_BLOCK: tl.constexpr, FP: tl.constexpr, BLOCK_R: tl.constexpr):
    """Row r of OUT [NROWS, W = SB + WB + F + 2] (r = batch row x kv head x NQ + query block n):
    the whole blocks (below T) of [the SB sink blocks, the WB blocks before query block J0 + n,
    list row r of FULL] in that order, their count at column W - 2, the partial block (or -1) at
    column W - 1. Sinks and window as `blocksparse.attended_blocks` lists them."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < NROWS
    f = tl.arange(0, FP)
    before = (J0 + r % NQ) * PER_Q  # key blocks wholly before the row's query block
    lf = f - SB - WB  # slot in FULL
    m = rm[:, None] & (lf[None, :] >= 0) & (lf[None, :] < F)
    x = tl.load(FULL + r[:, None] * s_fr + lf[None, :] * s_ff, mask=m, other=-1).to(tl.int64)
    sink = f[None, :] + 0 * before[:, None]
    sink = tl.where(sink < before[:, None], sink, -1)
    win = before[:, None] - WB + (f[None, :] - SB)
    win = tl.where((win >= SB) & (win >= 0), win, -1)  # sink blocks are listed once, as sinks
    x = tl.where(f[None, :] < SB, sink, tl.where(f[None, :] < SB + WB, win, x))
    ok = rm[:, None] & (f[None, :] < SB + WB + F) & (x >= 0) & (x < NK)
    whole = ok & ((x + 1) * K_BLOCK <= T)
    part = tl.max(tl.where(ok & ((x + 1) * K_BLOCK > T), x, -1), axis=1)
    wi = whole.to(tl.int32)
    pos = tl.cumsum(wi, axis=1) - 1
    tl.store(OUT + r[:, None] * W + pos, x.to(tl.int32), mask=whole)
    tl.store(OUT + r * W + W - 2, tl.sum(wi, axis=1), mask=rm)
    tl.store(OUT + r * W + W - 1, part.to(tl.int32), mask=rm)


@triton.jit
def _load2(ptr, rmask, cmask, HAS_R: tl.constexpr, HAS_C: tl.constexpr):
    """Load a 2-D tile, masked by rows and/or columns only where asked (zeros outside)."""
    if HAS_R:
        if HAS_C:
            x = tl.load(ptr, mask=rmask[:, None] & cmask[None, :], other=0.0)
        else:
            x = tl.load(ptr, mask=rmask[:, None], other=0.0)
    else:
        if HAS_C:
            x = tl.load(ptr, mask=cmask[None, :], other=0.0)
        else:
            x = tl.load(ptr)
    return x


@triton.jit
def _attend(acc, l_i, m_i, q, kbase, vbase, kpos, qpos, T, skn, svn, qk_scale, tbase,
            D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_DV: tl.constexpr, MASK_T: tl.constexpr, CAUSAL: tl.constexpr,
            IEEE: tl.constexpr, DOT_F32: tl.constexpr, K_BLOCK: tl.constexpr,
            HAS_TAB: tl.constexpr):
    """One online-softmax step over the BLOCK_N keys at kpos (int64). MASK_T: keys >= T masked;
    CAUSAL: also keys after each row's query. Unmasked steps need every key present. HAS_TAB:
    paged keys and values, key block i in slot tbase[i]."""
    MASKED: tl.constexpr = MASK_T or CAUSAL
    offd = tl.arange(0, BLOCK_D)
    offdv = tl.arange(0, BLOCK_DV)
    kmask = kpos < T
    if HAS_TAB:
        slot = tl.load(tbase + kpos // K_BLOCK, mask=kmask, other=0).to(tl.int64)
        row = tl.maximum(slot, 0) * K_BLOCK + kpos % K_BLOCK
    else:
        row = kpos
    k = _load2(kbase + row[:, None] * skn + offd[None, :], kmask, offd < D, MASKED, D < BLOCK_D)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    elif DOT_F32:  # the interpreter's bf16 dot is wrong: the same products in float32
        s = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if MASKED:
        if CAUSAL:
            keep = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
        else:
            keep = kmask[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key so far
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = m_new
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load2(vbase + row[:, None] * svn + offdv[None, :], kmask, offdv < DV, MASKED,
               DV < BLOCK_DV)
    if IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    elif DOT_F32:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _span(acc, l_i, m_i, q, kbase, vbase, lo, hi, qpos, skn, svn, qk_scale, tbase,
          D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
          BLOCK_DV: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
          K_BLOCK: tl.constexpr, HAS_TAB: tl.constexpr):
    """Online-softmax steps over the keys lo..hi-1 (whole key blocks, all before every query of
    the tile): unmasked BLOCK_N at a time, then the rest with the keys >= hi masked."""
    lane = tl.arange(0, BLOCK_N)
    end = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    for start in range(lo, end, BLOCK_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, kbase, vbase, start + lane, qpos, hi, skn, svn,
                                qk_scale, tbase, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False, False,
                                IEEE, DOT_F32, K_BLOCK, HAS_TAB)
    if end < hi:
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, kbase, vbase, end + lane, qpos, hi, skn, svn,
                                qk_scale, tbase, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, False,
                                IEEE, DOT_F32, K_BLOCK, HAS_TAB)
    return acc, l_i, m_i


@triton.jit
def _tile_rows(pid, bh, Hkv, Lq, front, tile0, G: tl.constexpr, HP: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """The rows of program pid's tile (HP heads of BLOCK_M rows, head-major): (batch row, kv
    head, each row's query head, the tile's first row r0 among the rows from q0 on, each row's
    index among the call's queries, whether it is one of them)."""
    g0 = (pid % (G // HP)) * HP
    tile = tile0 + pid // (G // HP)
    b = bh // Hkv
    hkv = bh % Hkv
    lane_m = tl.arange(0, HP * BLOCK_M)
    hq = (hkv * G + g0 + lane_m // BLOCK_M).to(tl.int64)
    r0 = tile * BLOCK_M
    qi = r0 + lane_m % BLOCK_M - front
    return b, hkv, hq, r0, qi, (qi >= 0) & (qi < Lq)


@triton.jit(do_not_specialize=["Lq", "T", "nQ", "front", "q0", "tile0", "NKEYS"])
def _fwd_kernel(Q, K, V, O, LST, LSE,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh,
                Hkv, Lq, T, nQ, F, W, front, q0, tile0, qk_scale,
                G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr,
                BLOCK_M: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SUB: tl.constexpr,
                NB: tl.constexpr, FP: tl.constexpr, IEEE: tl.constexpr,
                DOT_F32: tl.constexpr, WRITE_LSE: tl.constexpr, TAB, stab,
                HAS_TAB: tl.constexpr, KEYS, s_kbh, s_kn, NKEYS, SB, WB, PER_Q,
                KEYS_TOPK: tl.constexpr, KP: tl.constexpr, IDX_BITS: tl.constexpr,
                SPLIT: tl.constexpr, PACC, ML0):
    """SUB steps per listed block (BLOCK_N <= K_BLOCK) or NB listed blocks per step. HP query
    heads of the kv group per program: the tile stacks their BLOCK_M rows (head-major), which
    share positions, lists and every key and value loaded. HAS_TAB: paged keys and values (row
    bh of TAB: the slot of each key block). KEYS_TOPK > 0: no list; the query block attends its
    SB sink and WB window blocks (two key ranges) and the blocks of the KEYS_TOPK largest of its
    NKEYS order keys in KEYS (the search's ``exact_keys``), every one whole and before the
    block. SPLIT > 1 (with KEYS_TOPK): SPLIT programs share a tile's key blocks (sinks, window,
    kept: one block a step, every SPLIT-th) and the last also the diagonal; each writes its
    running max and sum (at PACC + ML0) and accumulator (PACC) for `_combine_kernel`."""
    pid = tl.program_id(0)
    sp = pid % SPLIT  # this program's share of the tile's key blocks
    pid = pid // SPLIT
    bh = tl.program_id(1).to(tl.int64)  # batch row x kv head
    b, hkv, hq, r0, qi, row_ok = _tile_rows(pid, bh, Hkv, Lq, front, tile0, G, HP, BLOCK_M)
    n = r0 // Q_BLOCK  # query block (in the call) of the whole tile
    qpos = q0 + qi + front
    offd = tl.arange(0, BLOCK_D)
    offdv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + hq[:, None] * sqh + qi.to(tl.int64)[:, None] * sqm + offd[None, :],
                mask=row_ok[:, None] & (offd[None, :] < D), other=0.0)
    kbase = K + b * skb + hkv * skh
    vbase = V + b * svb + hkv * svh
    tbase = TAB + bh * stab
    m_i = tl.full([HP * BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([HP * BLOCK_M], tl.float32)
    acc = tl.zeros([HP * BLOCK_M, BLOCK_DV], tl.float32)
    lane = tl.arange(0, BLOCK_N)
    if KEYS_TOPK > 0:  # sinks, window, then the kept blocks: the best keys, sorted here
        before = (q0 // Q_BLOCK + n).to(tl.int64) * PER_Q  # key blocks wholly before the block
        n_sink = tl.minimum(SB, before)
        w_lo = tl.maximum(tl.maximum(SB, before - WB), 0)
        if SPLIT == 1:
            acc, l_i, m_i = _span(acc, l_i, m_i, q, kbase, vbase, 0, n_sink * K_BLOCK, qpos, skn,
                                  svn, qk_scale, tbase, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, IEEE,
                                  DOT_F32, K_BLOCK, HAS_TAB)
            acc, l_i, m_i = _span(acc, l_i, m_i, q, kbase, vbase, w_lo * K_BLOCK,
                                  before * K_BLOCK, qpos, skn, svn, qk_scale, tbase, D, DV,
                                  BLOCK_N, BLOCK_D, BLOCK_DV, IEEE, DOT_F32, K_BLOCK, HAS_TAB)
        slot = tl.arange(0, KP)
        keys = tl.load(KEYS + bh * s_kbh + n * s_kn + slot, mask=slot < NKEYS,
                       other=-9223372036854775808)
        keys = tl.sort(keys, descending=True)  # candidates first, best first
        ok = (slot < KEYS_TOPK) & (keys != -9223372036854775808)
        ids = tl.where(ok, keys & ((1 << IDX_BITS) - 1), 0)
        cnt = tl.sum(ok.to(tl.int32))
        part = -1
    else:
        lrow = LST + (bh * nQ + n) * W
        cnt = tl.load(lrow + F)
        part = tl.load(lrow + F + 1)
        slot = tl.arange(0, FP)
        ids = tl.load(lrow + slot, mask=slot < F, other=0)  # slots >= cnt are never picked
    # whole listed blocks: no mask
    if SPLIT > 1:  # blocks u = sp, sp + SPLIT, ... of sinks, window and kept blocks, one a step
        n_win = tl.maximum(before - w_lo, 0)
        lane_k = tl.arange(0, K_BLOCK)
        for u in range(sp, n_sink + n_win + cnt, SPLIT):
            kth = tl.sum(tl.where(slot == u - n_sink - n_win, ids, 0)).to(tl.int64)
            idx = tl.where(u < n_sink, u, tl.where(u < n_sink + n_win, w_lo + u - n_sink, kth))
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, kbase, vbase, idx * K_BLOCK + lane_k, qpos,
                                    T, skn, svn, qk_scale, tbase, D, DV, K_BLOCK, BLOCK_D,
                                    BLOCK_DV, False, False, IEEE, DOT_F32, K_BLOCK, HAS_TAB)
    elif NB == 1:
        for it in range(0, cnt * SUB):
            idx = tl.sum(tl.where(slot == it // SUB, ids, 0)).to(tl.int64)
            kpos = idx * K_BLOCK + (it % SUB) * BLOCK_N + lane
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, kbase, vbase, kpos, qpos, T, skn, svn,
                                    qk_scale, tbase, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False, False,
                                    IEEE, DOT_F32, K_BLOCK, HAS_TAB)
    else:  # NB blocks per step: lane l reads slot it * NB + l // K_BLOCK
        for it in range(0, cnt // NB):
            j = it * NB + lane // K_BLOCK
            idx = tl.sum(tl.where(slot[None, :] == j[:, None], ids[None, :], 0), 1)
            kpos = idx.to(tl.int64) * K_BLOCK + lane % K_BLOCK
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, kbase, vbase, kpos, qpos, T, skn, svn,
                                    qk_scale, tbase, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False, False,
                                    IEEE, DOT_F32, K_BLOCK, HAS_TAB)
        # the last cnt % NB blocks one at a time, unmasked (a step of NB blocks with lanes
        # masked would compute keys it throws away: 33 blocks at 64 keys a step wasted 32 keys)
        lane_k = tl.arange(0, K_BLOCK)
        for r in range((cnt // NB) * NB, cnt):
            idx = tl.sum(tl.where(slot == r, ids, 0)).to(tl.int64)
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, kbase, vbase, idx * K_BLOCK + lane_k, qpos,
                                    T, skn, svn, qk_scale, tbase, D, DV, K_BLOCK, BLOCK_D,
                                    BLOCK_DV, False, False, IEEE, DOT_F32, K_BLOCK, HAS_TAB)
    # the partial last block, if listed: keys >= T masked
    if part >= 0:
        for s in range(0, SUB):
            kpos = part.to(tl.int64) * K_BLOCK + s * BLOCK_N + lane
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, kbase, vbase, kpos, qpos, T, skn, svn,
                                    qk_scale, tbase, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, False,
                                    IEEE, DOT_F32, K_BLOCK, HAS_TAB)
    # the diagonal: keys lo .. the tile's last query; tiles wholly <= the tile's first query
    # (< T: the tile holds a query of the call) unmasked, then the causal ones
    lo = (q0 + n * Q_BLOCK).to(tl.int64)
    first = q0 + r0
    free_end = lo + ((first + 1 - lo) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(q0 + r0 + BLOCK_M, T)
    if SPLIT > 1:  # the diagonal is the last program's (it has the fewest blocks)
        free_end = tl.where(sp == SPLIT - 1, free_end, lo)
        hi = tl.where(sp == SPLIT - 1, hi, lo)
    for start in range(lo, free_end, BLOCK_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, kbase, vbase, start + lane, qpos, T, skn, svn,
                                qk_scale, tbase, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False, False,
                                IEEE, DOT_F32, K_BLOCK, HAS_TAB)
    for start in range(free_end, hi, BLOCK_N):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, kbase, vbase, start + lane, qpos, T, skn, svn,
                                qk_scale, tbase, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV, False, True,
                                IEEE, DOT_F32, K_BLOCK, HAS_TAB)
    if SPLIT > 1:
        r = ((bh * (tl.num_programs(0) // SPLIT) + pid) * SPLIT + sp) * (HP * BLOCK_M) + \
            tl.arange(0, HP * BLOCK_M)
        tl.store(PACC + r[:, None] * BLOCK_DV + offdv[None, :], acc, mask=row_ok[:, None])
        tl.store(PACC + ML0 + 2 * r, m_i, mask=row_ok)
        tl.store(PACC + ML0 + 2 * r + 1, l_i, mask=row_ok)
    else:
        _finish(acc, l_i, m_i, O, LSE, b, hq, qi, row_ok, sob, soh, som, slb, slh, 0, DV,
                BLOCK_DV, WRITE_LSE)


@triton.jit
def _finish(acc, l_i, m_i, O, LSE, b, hq, qi, row_ok, sob, soh, som, slb, slh, c0,
            DV: tl.constexpr, BLOCK_C: tl.constexpr, WRITE_LSE: tl.constexpr):
    """Store acc / l (zeros for a row with no key) into the output's columns c0..c0+BLOCK_C-1
    and, with WRITE_LSE (where c0 == 0), (m + log2 l) ln 2."""
    offc = c0 + tl.arange(0, BLOCK_C)
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(O + b * sob + hq[:, None] * soh + qi.to(tl.int64)[:, None] * som + offc[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offc[None, :] < DV))
    if WRITE_LSE:
        if c0 == 0:
            lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0)))
                           * 0.6931471805599453, float("-inf"))
            tl.store(LSE + b * slb + hq * slh + qi.to(tl.int64), lse, mask=row_ok)


@triton.jit(do_not_specialize=["Lq", "front", "tile0"])
def _combine_kernel(PACC, ML0, O, LSE, sob, soh, som, slb, slh, Hkv, Lq, front, tile0,
                    G: tl.constexpr, BLOCK_M: tl.constexpr, HP: tl.constexpr, DV: tl.constexpr,
                    BLOCK_DV: tl.constexpr, SPLIT: tl.constexpr, WRITE_LSE: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """Columns c0..c0+BLOCK_C-1 (grid axis 2) of one tile of `_fwd_kernel` with SPLIT > 1: its
    SPLIT partial softmaxes merged (running maxima in the exp2 domain), then stored as the
    forward stores an unsplit tile. Every partial is loaded at once ([SPLIT, rows] maxima and
    sums, [SPLIT, rows, BLOCK_C] accumulators): a loop over the partials, one dependent load
    after another, took 9 us for a decoded token on an H100, more than the split forward."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    c0 = tl.program_id(2) * BLOCK_C
    b, hkv, hq, r0, qi, row_ok = _tile_rows(pid, bh, Hkv, Lq, front, tile0, G, HP, BLOCK_M)
    R: tl.constexpr = HP * BLOCK_M
    r = ((bh * tl.num_programs(0) + pid) * SPLIT * R + tl.arange(0, SPLIT)[:, None] * R
         + tl.arange(0, R)[None, :])  # [SPLIT, R]: the partial rows
    ok = tl.broadcast_to(row_ok[None, :], (SPLIT, R))
    mp = tl.load(PACC + ML0 + 2 * r, mask=ok, other=float("-inf"))
    lp = tl.load(PACC + ML0 + 2 * r + 1, mask=ok, other=0.0)
    m = tl.max(mp, 0)
    w = tl.math.exp2(mp - tl.where(m == float("-inf"), 0.0, m)[None, :])
    l_i = tl.sum(w * lp, 0)
    offc = c0 + tl.arange(0, BLOCK_C)  # BLOCK_C divides BLOCK_DV: every column is in the row
    part = tl.load(PACC + r[:, :, None] * BLOCK_DV + offc[None, None, :], mask=ok[:, :, None],
                   other=0.0)
    acc = tl.sum(w[:, :, None] * part, 0)
    _finish(acc, l_i, m, O, LSE, b, hq, qi, row_ok, sob, soh, som, slb, slh, c0, DV, BLOCK_C,
            WRITE_LSE)


def compact_lists(full: Tensor, T: int, q_block: int, k_block: int, j0: int, sink_blocks: int,
                  window_blocks: int) -> Tensor:
    """`_compact_kernel`'s rows, int32 [B * Hkv * nQ, W = sink_blocks + window_blocks + F + 2], of
    the lists ``full`` [B, Hkv, nQ, F] of the query blocks j0..j0+nQ-1 (arguments checked by the
    caller)."""
    B, Hkv, nQ, F0 = full.shape
    rows = B * Hkv * nQ
    flat = full.reshape(rows, F0)
    W = sink_blocks + window_blocks + F0 + 2
    lst = torch.empty(rows, W, dtype=torch.int32, device=full.device)
    _compact_kernel[(_ceil_div(rows, _COMPACT_ROWS),)](
        flat, lst, flat.stride(0) if F0 else 1, flat.stride(1) if F0 else 1, rows, F0, W, T,
        -(-T // k_block), sink_blocks, window_blocks, q_block // k_block, j0, nQ,
        K_BLOCK=k_block, FP=_pow2(W - 2, 2), BLOCK_R=_COMPACT_ROWS)
    return lst


def fitted_budget(device: torch.device, shape_args: tuple) -> int:
    """The shared memory budget `_launch_shape` gets for ``shape_args`` on ``device``: one a
    refused launch has fitted (`block_attention_triton`), else `_smem_budget`."""
    return _FIT.get((device, shape_args)) or _smem_budget(device)


def _smem_budget(device: torch.device) -> int:
    """Shared memory a launch on ``device`` may plan for: the limit Triton checks at launch
    (`triton.compiler.max_shared_mem`: 227 KB on an H100, 163 KB on an A100, 99 KB on Ada and
    consumer Ampere) less 1 KB; `_SMEM_BUDGET` off CUDA."""
    if device.type != "cuda":
        return _SMEM_BUDGET
    index = device.index if device.index is not None else torch.cuda.current_device()
    budget = _SMEM.get(index)
    if budget is None:
        from triton.runtime import driver
        limit = driver.active.utils.get_device_properties(index)["max_shared_mem"]
        budget = _SMEM[index] = int(limit) - 1024
    return budget


@functools.lru_cache(maxsize=256)  # a pure function of ints, called at every decoded token
def _launch_shape(Lq: int, q_block: int, k_block: int, bd: int, bdv: int, elem: int,
                  block_m: int, block_n: int, num_warps: int, num_stages: int, G: int = 1,
                  heads: Optional[int] = None, budget: int = _SMEM_BUDGET):
    """(BLOCK_M, HP, BLOCK_N, warps, stages): the requested shape fitted to the call and to shared
    memory. BLOCK_M rows of one query head; HP heads of a kv group per program (tiles of HP *
    BLOCK_M rows): by default, where a head's rows are 32 to 64, as many as fill _STACK_ROWS rows
    (a query block of 64 rows: four heads a 256-row tile; heads of 128 rows keep one head a
    program), and where they are fewer than 16 (a decoded token, a short chunk), as many as fill
    tl.dot's 16 rows (one token of 4 heads: BLOCK_M = 4, its 4 valid rows in one tile, so that the
    group's key and value blocks are read once, not once a head); ``heads`` to ask for another
    power of two dividing G. BLOCK_M is then raised to 16 // HP where below it. budget:
    the bytes of shared memory the launch may take, estimated as q's tile plus the key and value
    tiles of every stage (`_smem_budget`; a compiler that takes more is met by a smaller budget,
    see `block_attention_triton`)."""
    for name, x in (("block_m", block_m), ("block_n", block_n)):
        if x < 16 or x & (x - 1):
            raise ValueError(f"block_attention_triton: {name}={x} is not a power of two >= 16")
    bm = min(block_m, q_block, _pow2(Lq, 1))
    if heads is None:
        hp = 1
        while G % (2 * hp) == 0 and (hp * bm < 16
                                     or (32 <= bm <= 64 and 2 * hp * bm <= _STACK_ROWS)):
            hp *= 2
    elif heads < 1 or heads & (heads - 1) or G % heads:
        raise ValueError(f"block_attention_triton: heads={heads} is not a power of two dividing "
                         f"the {G} query heads of a kv head")
    else:
        hp = heads
    bn = block_n
    stages = max(1, num_stages)
    if bdv > 128:  # a [rows, 256] float32 accumulator per 4 warps at most
        bm = min(bm, 64)
        hp = max(1, min(hp, 64 // bm))

    def smem(bm, hp, bn, stages):
        return elem * (hp * bm * bd + stages * bn * (bd + bdv))

    # what to give up, in order, until the launch fits: stacked heads, stages down to 2, rows to
    # 64, keys to 32, then the last stage, rows to 16, keys to 16 (halving, one stage at a time)
    shape = dict(bm=bm, hp=hp, bn=bn, stages=stages)
    for name, floor in (("hp", 1), ("stages", 2), ("bm", 64), ("bn", 32), ("stages", 1),
                        ("bm", 16), ("bn", 16)):
        while smem(**shape) > budget and shape[name] > floor:
            shape[name] = shape[name] - 1 if name == "stages" else shape[name] // 2
    bm, hp, bn, stages = shape["bm"], shape["hp"], shape["bn"], shape["stages"]
    bm = max(bm, 16 // hp)  # tl.dot's 16 rows a tile at least
    warps = min(num_warps, max(4, hp * bm // 16))
    return bm, hp, bn, warps, stages


def check_arguments(name: str, q: Tensor, k: Tensor, v: Tensor, q_block: int, k_block: int,
                    **same_dtype: Tensor) -> None:
    """The checks the forward and the backward share (4-D q, k, v of one call): shapes that fit,
    query heads a multiple of kv heads, one supported dtype (also of ``same_dtype``'s tensors),
    head dims up to 256, blocks that are powers of two >= 16 with q_block a multiple of k_block.
    One-line ValueErrors that start with ``name``."""
    B, Hq, _, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ValueError(f"{name}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not fit together")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{name}: Hq={Hq} is not a multiple of Hkv={Hkv}")
    dt = q.dtype
    if (dt not in _DTYPES or k.dtype != dt or v.dtype != dt
            or any(x.dtype != dt for x in same_dtype.values())):
        tensors = dict(q=q, k=k, v=v, **same_dtype)
        raise ValueError(f"{name}: dtypes {', '.join(str(x.dtype) for x in tensors.values())}: "
                         f"{', '.join(tensors)} must share one of float32, bfloat16, float16")
    if D > 256 or Dv > 256:
        raise ValueError(f"{name}: head dims {D}, {Dv} above 256")
    for what, x in (("q_block", q_block), ("k_block", k_block)):
        if x < 16 or x & (x - 1):
            raise ValueError(f"{name}: {what}={x} is not a power of two >= 16")
    if q_block % k_block:
        raise ValueError(f"{name}: q_block={q_block} is not a multiple of k_block={k_block}")


def block_attention_triton(q: Tensor, k: Tensor, v: Tensor, full: Tensor, p0: int, *,
                           q_block: int = 128, k_block: int = 64, scale: float,
                           block_m: int = _BLOCK_M, block_n: int = _BLOCK_N,
                           num_warps: int = _WARPS, num_stages: int = _STAGES,
                           out: Optional[Tensor] = None,
                           sink_blocks: int = 0, window_blocks: int = 0,
                           lse: Optional[Tensor] = None, keys_topk: int = 0,
                           table: Optional[Tensor] = None, heads: Optional[int] = None,
                           split: Optional[int] = None) -> Tensor:
    """Block-sparse attention of the queries at p0..p0+Lq-1 (module docstring; docs/blocksparse.md).

    q [B, Hq, Lq, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] (one dtype: fp32, bf16 or fp16; Hq a
    multiple of Hkv); full int32/int64 [B, Hkv, nQ, F]: per query block j0+n (j0 = p0 // q_block),
    the key blocks it attends in full (-1 = empty slot), as `blocksparse.attended_blocks` gives;
    or only the kept blocks, with ``sink_blocks`` and ``window_blocks`` the sinks and window that
    `blocksparse.attended_blocks` puts before them (built on the GPU: no list written by torch);
    or, with keys_topk > 0, the search's order keys int64 [B, Hkv, nQ, M] (`exact_keys`) whose
    keys_topk largest are the kept blocks (picked on the GPU too).
    Returns [B, Hq, Lq, Dv] in q's dtype (written into ``out`` when given). ``lse``, if given, a
    float32 [B, Hq, Lq] tensor with unit stride in the last dim, receives each query's natural-log
    log-sum-exp of its scaled logits (-inf for a query with no key). block_m, block_n, num_warps,
    num_stages: the launch shape for a long call (fitted to short calls); heads: query heads of a
    kv group stacked in one program's tile (`_launch_shape` picks by default). table: paged keys and
    values (`blocksparse.check_table`; k and v share the slots): T = table.shape[2] * k_block.
    split: with keys_topk, programs sharing each tile's key blocks, a power of two (`_split`
    picks by default: a decoded token's 8 tiles would each walk ~1,100 keys alone); their
    partial softmaxes are merged by a second launch."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or full.dim() != 4:
        raise ValueError("block_attention_triton: q, k, v and full must be 4-D")
    check_arguments("block_attention_triton", q, k, v, q_block, k_block)
    B, Hq, Lq, D = q.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    if table is not None:
        T, table = kernel_table(table, k, None, k_block, "block_attention_triton")
    if p0 < 0 or p0 + Lq > T:
        raise ValueError(f"block_attention_triton: queries p0={p0}..{p0 + Lq - 1} outside the "
                         f"{T} keys")
    j0 = p0 // q_block
    front = p0 - j0 * q_block
    nQ = -(-(front + Lq) // q_block)
    if keys_topk < 0 or (keys_topk and full.dtype != torch.int64):
        raise ValueError(f"block_attention_triton: keys_topk={keys_topk} needs int64 order keys "
                         f"(got {full.dtype})")
    if full.dtype not in (torch.int32, torch.int64) or tuple(full.shape[:3]) != (B, Hkv, nQ):
        raise ValueError(f"block_attention_triton: full must be int32/int64 [B, Hkv, nQ, F] = "
                         f"[{B}, {Hkv}, {nQ}, F], got {full.dtype} {tuple(full.shape)}")
    if full.device != q.device:
        raise ValueError("block_attention_triton: full is on another device than q")
    if sink_blocks < 0 or window_blocks < 0:
        raise ValueError(f"block_attention_triton: sink_blocks={sink_blocks} and "
                         f"window_blocks={window_blocks} must be >= 0")
    if out is None:
        out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
    elif out.shape != (B, Hq, Lq, Dv) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("block_attention_triton: out must be [B, Hq, Lq, Dv] in q's dtype with "
                         "unit stride in the last dim")
    if lse is not None and (lse.shape != (B, Hq, Lq) or lse.dtype != torch.float32
                            or (Lq > 1 and lse.stride(-1) != 1) or lse.device != q.device):
        raise ValueError("block_attention_triton: lse must be float32 [B, Hq, Lq] on q's device "
                         "with unit stride in the last dim")
    if Lq == 0 or B == 0 or Hq == 0 or Dv == 0:
        return out
    if scale < 0:  # the kernel folds the scale into the running maximum: keep it >= 0
        q, scale = -q, -scale
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if keys_topk:  # the kernel picks and sorts the kept blocks itself: no list
        full = full.reshape(B * Hkv, nQ, full.shape[3])
        lst, F = full, keys_topk
    else:
        lst = compact_lists(full, T, q_block, k_block, j0, sink_blocks, window_blocks)
        F = lst.shape[1] - 2
    BD, BDV = _pow2(D), _pow2(Dv)
    G = Hq // Hkv
    shape_args = (Lq, q_block, k_block, BD, BDV, q.element_size(), block_m, block_n, num_warps,
                  num_stages, G, heads)
    fit_key = (q.device, shape_args)
    budget = fitted_budget(*fit_key)
    if split is not None and (split < 1 or split & (split - 1) or (split > 1 and not keys_topk)):
        raise ValueError(f"block_attention_triton: split={split} is not a power of two >= 1 "
                         f"(above 1 only with keys_topk)")
    # until the compiled kernel's shared memory fits (`_launch_shape`'s estimate); inline rather
    # than through `launch.refit`, whose closures cost a decoded token 2-3 us of host time
    while True:
        BM, HP, BN, warps, stages = _launch_shape(*shape_args, budget)
        tile0 = front // BM
        ntiles = (front + Lq - 1) // BM - tile0 + 1
        grid = (ntiles * (G // HP), B * Hkv)
        sp = split if split is not None else _split(grid[0] * grid[1]) if keys_topk else 1
        pacc, ml0 = out, 0  # split: the partial accumulators, then (max, sum) pairs from ml0 on
        if sp > 1:
            ml0 = B * Hkv * grid[0] * sp * HP * BM * BDV
            pacc = torch.empty(ml0 + 2 * ml0 // BDV, dtype=torch.float32, device=q.device)
        try:
            launch(
                _fwd_kernel, (grid[0] * sp, grid[1]), q, k, v, out, lst,
                out if lse is None else lse,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                *((0, 0) if lse is None else lse.stride()[:2]),
                Hkv, Lq, T, nQ, F, F + 2, front, j0 * q_block, tile0, float(scale) * _LOG2E,
                G=G, D=D, DV=Dv, Q_BLOCK=q_block, K_BLOCK=k_block, BLOCK_M=BM, HP=HP, BLOCK_N=BN,
                BLOCK_D=BD, BLOCK_DV=BDV, SUB=max(1, k_block // BN), NB=max(1, BN // k_block),
                FP=_pow2(F, 2),
                IEEE=q.dtype == torch.float32, DOT_F32=q.dtype == torch.bfloat16 and _interpreted(),
                WRITE_LSE=lse is not None, TAB=lst if table is None else table,
                stab=0 if table is None else table.stride(0), HAS_TAB=table is not None,
                KEYS=full, s_kbh=full.stride(0) if keys_topk else 0,
                s_kn=full.stride(1) if keys_topk else 0,
                NKEYS=full.shape[-1] if keys_topk else 0,
                SB=sink_blocks, WB=window_blocks, PER_Q=q_block // k_block, KEYS_TOPK=keys_topk,
                KP=_pow2(full.shape[-1]) if keys_topk else 1, IDX_BITS=_IDX_BITS,
                SPLIT=sp, PACC=pacc, ML0=ml0,
                num_warps=warps, num_stages=stages)
            break
        except OutOfResources as e:  # the compiler took more than estimated: a smaller budget
            smaller = budget * int(e.limit) // max(1, int(e.required)) - 1024
            if e.name != "shared memory" or smaller >= budget or smaller < 4096:
                raise
            budget = _FIT[fit_key] = smaller
    if sp > 1:  # about 8K partial values a program: columns shared out over grid axis 2
        bc = min(BDV, max(16, _COMBINE_VALUES // (sp * HP * BM)))
        launch(_combine_kernel, (grid[0], grid[1], BDV // bc), pacc, ml0, out,
               out if lse is None else lse, *out.stride()[:3],
               *((0, 0) if lse is None else lse.stride()[:2]), Hkv, Lq, front, tile0, G=G,
               BLOCK_M=BM, HP=HP, DV=Dv, BLOCK_DV=BDV, SPLIT=sp, WRITE_LSE=lse is not None,
               BLOCK_C=bc, num_warps=4)
    return out


def _split(programs: int) -> int:
    """Programs sharing a tile's key blocks where the search's keys are given: a power of two
    that brings the launch to about _SPLIT_PROGRAMS programs, at most _MAX_SPLIT."""
    split = 1
    while split < _MAX_SPLIT and 2 * split * programs <= _SPLIT_PROGRAMS:
        split *= 2
    return split
