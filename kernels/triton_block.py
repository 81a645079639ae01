"""Triton kernel for ``search_key="block"`` (docs/routing.md): coarse-to-fine Quest bounds.

Two parts:

* ``_pyramid`` (PyTorch, O(T D) work and memory): the per-dimension key minimum and maximum of
  every aligned block of 2^j keys, for the levels j a query can use (from the finest block of the
  first query past the window up to log2(T)), stored in the keys' dtype (a minimum or maximum of
  bf16/fp16 values is exact in that dtype) in one buffer per bound, level after level. Absent keys
  (key-padding mask) enter as -inf/+inf; a block without present keys is recognised by the
  last-present-key table (``LP``), never loaded, and scores -inf.
* ``_block_search_kernel``: a persistent grid; one work item = ``QB`` consecutive queries x the G
  query heads of one kv head (``QB * GP`` rows, GP = G rounded up to a power of two), the longest
  query blocks first. Rows that share a block geometry (fine level, coarse level, number of whole
  coarse blocks: all rows of an item but at geometry boundaries or with arbitrary query positions)
  form a group, and per group:
  - coarse step: the bounds of all rows against the whole coarse blocks, two tensor-core products
    [rows, D] x [D, blocks] (q+ against the block maxima, q- against the minima, fp32
    accumulation), then per row the 2 topk best by repeated argmax (ties: the later block), each
    given a slot;
  - refinement: for every coarse block that some row of the group kept, the bounds of its R fine
    blocks for all rows (two products [rows, D] x [D, R]), written to the slot of the rows that kept
    it (in a per-program scratch, as int64 keys: the order-preserving bits of the score above the
    anchor, so the largest key is the best bound, ties to the nearer anchor);
  - tail: its fine blocks the same way (one product); the partial last block of each row from its
    (at most 32) keys.
  Then the greedy of docs/routing.md as topk rounds of "keep the best remaining candidate, drop
  every candidate its span covers", over per-slot maxima kept in registers: a kept span covers a
  contiguous run of fine blocks, so a round rereads and rescans only the one or two slots holding
  that run. A candidate skipped by the greedy is exactly one covered by a span kept before it, so
  the same anchors come out in the same order.

Cost per row: the coarse bounds, the fine bounds of the union U of the coarse blocks the item's rows
kept (U <= min(n, rows * 2 topk)) and of the tail, each 2 D multiply-adds on tensor cores; the
greedy O(topk (R + slots)). U R <= rows 2 topk R = O(sqrt(t)) per row: O(L^1.5) per prefill, with
rows times the constant of scoring one row's candidates alone; at today's lengths U is most of the
n <= 64 coarse blocks (rows of different heads and queries keep different ones), i.e. tensor cores
score nearly every fine block before the window, which costs less than gathering each row's own.
No O(L^2) tensor and no host synchronisation. Default launch: 32 rows, 4 warps (the fastest shape
measured at 128K on an H200: benchmarks/RESULTS.md, which also gives the roofline; the kernel is
latency-bound, far from both the tensor-core and the memory floor).

Bounds are sum_d q+_d kmax_d + sum_d q-_d kmin_d with fp32 accumulation (q+ = max(q, 0),
q- = min(q, 0)); products of bf16/fp16 values are exact in fp32 (fp32 inputs use IEEE fp32
products), so only the order (and the tensor cores' internal rounding) of the sums differs from the
reference: scores agree to fp32 rounding and anchors are identical unless two bounds differ by less
than that rounding (two fine bounds: the order or choice of two spans; two coarse bounds at the
2 topk-th place: which coarse block is refined, and so possibly a span of another score; see
docs/routing.md). On integer-valued inputs every bound is exact, so scores are bitwise equal and
the tie rules decide; the tests check that. Under the Triton interpreter (whose bf16 products are
wrong) the products run in fp32, which gives the same exact values.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import searches
from .geometry import check_search_inputs, keeps_no_span, no_span_outputs, span_extents
from .reference import COARSE_FANOUT
from .triton_search import _next_pow2

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# int64 key of a -inf score: below every finite score's key, so "no candidate"
_NO_KEY = ((0xFF800000 ^ 0x7FFFFFFF) - (1 << 32)) << 32
PROGRAMS_PER_SM = 4  # persistent grid: programs per multiprocessor (each owns a scratch area)


@triton.jit
def _level_row(j, JLO, JTOP, T):
    """First row of level j in the pyramid buffers (levels JLO .. JTOP - 1 stored one after the
    other, level i holding T >> i blocks)."""
    off = j.to(tl.int64) * 0
    i = JLO
    while i < JTOP:
        off += tl.where(i < j, T >> i, 0)
        i += 1
    return off


@triton.jit
def _anchors(LP, lpb, slpn, last, ok, HAS_KPM: tl.constexpr):
    """Last present key <= last (masked by ok; -1 where none)."""
    if HAS_KPM:
        a = tl.load(LP + lpb + last.to(tl.int64) * slpn, mask=ok, other=-1)
    else:
        a = tl.where(ok, last, -1)
    return a


@triton.jit
def _key(score, a, ok, NO_KEY: tl.constexpr):
    """int64 keys ordered like (score, anchor): the flipped float bits of the score (-0 as +0)
    above the anchor (>= 0); NO_KEY where not ok."""
    bits = tl.where(score == 0.0, 0, score.to(tl.int32, bitcast=True))
    o = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return tl.where(ok, (o.to(tl.int64) << 32) | a.to(tl.int64), NO_KEY)


@triton.jit
def _key_score(key):
    o = (key >> 32).to(tl.int32)
    return tl.where(o >= 0, o, o ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _tile_bounds(qrow, rok, sqd, PMIN, PMAX, rows, ok, spn, spd, ROWS: tl.constexpr,
                 RP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, KC: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """Bounds [ROWS, RP] of the query rows (row pointers qrow, masked by rok) against the pyramid
    rows ``rows`` [RP] (masked by ok, not loaded where not ok): q+ . kmax + q- . kmin, as
    tensor-core products accumulated over chunks of KC dimensions (small address tiles: few
    registers); the query chunks are reloaded (cache hits) rather than held across the item."""
    sp = tl.zeros([ROWS, RP], tl.float32)
    sn = tl.zeros([ROWS, RP], tl.float32)
    roff = rows.to(tl.int32) * spn  # int32: within one (batch row, kv head)
    for d0 in tl.static_range(0, BLOCK_D, KC):
        od = d0 + tl.arange(0, KC)
        dm = od < D
        q = tl.load(qrow[:, None] + od[None, :] * sqd, mask=rok[:, None] & dm[None, :], other=0.0)
        off = roff[:, None] + od[None, :] * spd
        m = ok[:, None] & dm[None, :]
        mx = tl.load(PMAX + off, mask=m, other=0.0)
        mn = tl.load(PMIN + off, mask=m, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            sp = tl.dot(tl.maximum(q, 0.0), tl.trans(mx.to(tl.float32)), sp, input_precision="ieee")
            sn = tl.dot(tl.minimum(q, 0.0), tl.trans(mn.to(tl.float32)), sn, input_precision="ieee")
        else:
            sp = tl.dot(tl.maximum(q, 0.0).to(q.dtype), tl.trans(mx), sp)
            sn = tl.dot(tl.minimum(q, 0.0).to(q.dtype), tl.trans(mn), sn)
    return sp + sn


@triton.jit
def _fine_level(back_t, LOG_BLOCK: tl.constexpr):
    """jf of docs/routing.md step 1: fine blocks of 2^jf = min(BLOCK, 2^floor(log2(back + 1)))."""
    jf = back_t * 0
    for _ in tl.static_range(LOG_BLOCK):
        jf = tl.where((2 << jf) <= back_t + 1, jf + 1, jf)
    return jf


# sizes and counts are not specialised (a runtime loop counter starts at JLO, which may be 1; one
# compiled kernel serves every length and query slice of a head geometry)
@triton.jit(do_not_specialize=["Hkv", "G", "Lq", "T", "W", "JLO", "JTOP", "NQB", "NITEMS", "NPROG",
                               "NPER"])
def _block_search_kernel(
    QS, K, KPM, KMIN, KMAX, LP, POS, BACK, FWD, A_OUT, S_OUT, SCR,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    skpb, skpn,
    spb_, sph, spn, spd,
    slpb, slpn,
    sposb, sposm,
    sab, sah, sam, sak,
    Hkv, G, Lq, T, W, JLO, JTOP, NQB, NITEMS, NPROG, NPER,
    D: tl.constexpr, HAS_KPM: tl.constexpr, HAS_POS: tl.constexpr, TOPK: tl.constexpr,
    M: tl.constexpr, MP: tl.constexpr, RP: tl.constexpr, LOG_BLOCK: tl.constexpr,
    QB: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr, DC: tl.constexpr,
    KC: tl.constexpr, DOT_F32: tl.constexpr, NO_KEY: tl.constexpr, NR: tl.constexpr,
):
    ROWS: tl.constexpr = QB * GP
    pid = tl.program_id(0)
    rr = tl.arange(0, ROWS)
    col = tl.arange(0, RP)
    scol = tl.arange(0, MP)
    g = rr % GP
    nbh = NITEMS // NQB  # batch rows x kv heads
    # this program's scratch: [ROWS, M + 1 slots, RP] int64 keys (slot M: the tail)
    scr = SCR + pid.to(tl.int64) * (ROWS * (M + 1) * RP) + rr[:, None].to(tl.int64) * ((M + 1) * RP)
    w = pid  # items pid, pid + NPROG, ... (past NITEMS: no rows)
    while w < NPER * NPROG:
        tl.debug_barrier()  # the previous item's scratch reads are done before it is rewritten
        bh = w % nbh
        b = (bh // Hkv).to(tl.int64)
        kvh = (bh % Hkv).to(tl.int64)
        qi = (NQB - 1 - w // nbh) * QB + rr // GP
        # != 0: a bool mask also where w is a Python int (Triton 3.9's interpreter makes it int32)
        rok = ((qi < Lq) & (g < G) & (w < NITEMS)) != 0
        h = kvh * G + g
        if HAS_POS:
            t = tl.load(POS + b * sposb + qi * sposm, mask=rok, other=0).to(tl.int32)
        else:
            t = (T - Lq + qi).to(tl.int32)
        t = tl.where(rok, t, 0)
        e = t - W
        live = rok & (e >= 0)
        e = tl.maximum(e, 0)
        back_t = tl.load(BACK + t).to(tl.int32)
        fwd_t = tl.load(FWD + t).to(tl.int32)
        # block sizes (docs/routing.md, step 1): bs = 2^jf, coarse blocks of R = 2^c fine blocks
        jf = _fine_level(back_t, LOG_BLOCK)
        nf = tl.maximum((e + 1) >> jf, 1)
        c = jf * 0
        while tl.max(((1 << (2 * c)) < nf).to(tl.int32), axis=0) > 0:
            c = tl.where((1 << (2 * c)) < nf, c + 1, c)
        n_full = tl.where(live, (e + 1) >> (jf + c), 0)

        qrow = QS + b * sqb + h.to(tl.int64) * sqh + qi * sqm
        PMIN = KMIN + b * spb_ + kvh * sph
        PMAX = KMAX + b * spb_ + kvh * sph
        kbase = K + b * skb + kvh * skh
        lpb = b * slpb

        slot_ci = tl.full([ROWS, MP], -1, tl.int32)  # coarse block held by each slot, per row
        smax = tl.full([ROWS, MP], NO_KEY, tl.int64)  # best remaining key per slot
        tmax = tl.full([ROWS], NO_KEY, tl.int64)  # ... of the tail
        gkey = tl.where(live, (jf << 27) | (c << 22) | n_full, -1)  # n_full < 2^22
        todo = live
        while tl.max(todo.to(tl.int32), axis=0) > 0:
            gk = tl.max(tl.where(todo, gkey, -1), axis=0)
            grp = todo & (gkey == gk)
            todo = todo & ~grp
            gjf = gk >> 27
            gjc = gjf + ((gk >> 22) & 0x1F)
            gn = gk & 0x3FFFFF
            gR = 1 << (gjc - gjf)
            gbs = 1 << gjf
            row_f = _level_row(gjf, JLO, JTOP, T)

            # coarse step: the gn whole coarse blocks, the 2 topk best per row get slots
            if gn > 0:
                cok = col < gn
                if HAS_KPM:
                    cok = cok & (_anchors(LP, lpb, slpn, ((col + 1) << gjc) - 1, cok, HAS_KPM)
                                 >= (col << gjc))
                csc = _tile_bounds(qrow, rok, sqd, PMIN, PMAX, _level_row(gjc, JLO, JTOP, T) + col,
                                   cok, spn, spd, ROWS, RP, D, BLOCK_D, KC, DOT_F32)
                csc = tl.where(grp[:, None] & cok[None, :], csc, float("-inf"))
                for sl in range(M):
                    best = tl.max(csc, axis=1)
                    ci = tl.max(tl.where(csc == best[:, None], col[None, :], -1), axis=1)
                    slot_ci = tl.where((scol[None, :] == sl) & (best > float("-inf"))[:, None],
                                       ci[:, None], slot_ci)
                    csc = tl.where(col[None, :] == ci[:, None], float("-inf"), csc)
                # refinement: the fine blocks of every coarse block some row kept
                ci = gn * 0
                while ci < gn:
                    cr = tl.max(tl.where(grp[:, None] & (slot_ci == ci), scol[None, :], -1), axis=1)
                    if tl.max(cr, axis=0) >= 0:
                        b0 = (ci * gR + col) << gjf
                        fok = col < gR
                        a = _anchors(LP, lpb, slpn, b0 + gbs - 1, fok, HAS_KPM)
                        fok = fok & (a >= b0)
                        s = _tile_bounds(qrow, rok, sqd, PMIN, PMAX, row_f + ci * gR + col, fok,
                                         spn, spd, ROWS, RP, D, BLOCK_D, KC, DOT_F32)
                        key = _key(s, a[None, :], (cr >= 0)[:, None] & fok[None, :], NO_KEY)
                        tl.store(scr + cr[:, None] * RP + col[None, :], key, mask=(cr >= 0)[:, None])
                        smax = tl.where(scol[None, :] == cr[:, None], tl.max(key, axis=1)[:, None],
                                        smax)
                    ci += 1

            # the tail [gn G, e]: whole fine blocks from the pyramid, the partial last one from
            # its keys (e differs per row)
            tb = (gn * gR + col) << gjf
            e2 = e[:, None]
            emax = tl.max(tl.where(grp, e, -1), axis=0)
            wok = (col < gR) & (tb + gbs - 1 <= emax)
            if HAS_KPM:
                wok = wok & (_anchors(LP, lpb, slpn, tb + gbs - 1, wok, HAS_KPM) >= tb)
            ts = _tile_bounds(qrow, rok, sqd, PMIN, PMAX, row_f + gn * gR + col, wok, spn, spd, ROWS,
                              RP, D, BLOCK_D, KC, DOT_F32)
            tin = grp[:, None] & (col < gR)[None, :] & (tb[None, :] <= e2)
            ta = _anchors(LP, lpb, slpn, tl.minimum(tb[None, :] + gbs - 1, e2), tin, HAS_KPM)
            tin = tin & (ta >= tb[None, :])
            pb = (e >> gjf) << gjf  # first key of each row's last fine block
            part = grp & (pb + gbs - 1 > e)
            if tl.max(part.to(tl.int32), axis=0) > 0:
                psc = tl.zeros([ROWS], tl.float32)
                for d0 in tl.static_range(0, BLOCK_D, DC):  # DC dims at a time: few registers
                    odc = d0 + tl.arange(0, DC)
                    dmc = odc < D
                    mx = tl.full([ROWS, DC], float("-inf"), tl.float32)
                    mn = tl.full([ROWS, DC], float("inf"), tl.float32)
                    j = gbs * 0
                    while j < gbs:
                        p = pb + j
                        pm = part & (p <= e)
                        if HAS_KPM:
                            pm = pm & (tl.load(KPM + b * skpb + p.to(tl.int64) * skpn, mask=pm,
                                               other=0) != 0)
                        kk = tl.load(kbase + p[:, None] * skn + odc[None, :] * skd,
                                     mask=pm[:, None] & dmc[None, :], other=0.0).to(tl.float32)
                        mx = tl.maximum(mx, tl.where(pm[:, None], kk, float("-inf")))
                        mn = tl.minimum(mn, tl.where(pm[:, None], kk, float("inf")))
                        j += 1
                    qc = tl.load(qrow[:, None] + odc[None, :] * sqd, mask=rok[:, None] & dmc[None, :],
                                 other=0.0).to(tl.float32)
                    mx = tl.where(mx == float("-inf"), 0.0, mx)  # no present key: unused (anchor
                    mn = tl.where(mn == float("inf"), 0.0, mn)  # check), keep finite
                    psc += tl.sum(tl.maximum(qc, 0.0) * mx, axis=1) + \
                        tl.sum(tl.minimum(qc, 0.0) * mn, axis=1)
                ts = tl.where((tb[None, :] == pb[:, None]) & part[:, None], psc[:, None], ts)
            key = _key(ts, ta, tin, NO_KEY)
            tl.store(scr + M * RP + col[None, :], key, mask=grp[:, None])
            tmax = tl.where(grp, tl.max(key, axis=1), tmax)

        tl.debug_barrier()  # scratch written by other threads' layouts above
        obase = b * sab + h * sah + qi * sam
        if NR > 0:
            # "block_rerank": the NR best candidates by key (bound, ties: the nearer block) in
            # order, their anchors to A_OUT (-1 past the last candidate); nothing is dropped.
            # Each slot's keys are sorted once (best first), then an NR-round merge of the slots'
            # heads reads one key per round and row (a slot's head is its smax / tmax). Slots no
            # row holds (smax = NO_KEY) may hold an earlier item's keys: they are never merged.
            for sl in tl.static_range(M + 1):
                ptr = scr + sl * RP + col[None, :]
                tl.store(ptr, tl.sort(tl.load(ptr), dim=1, descending=True))
            tl.debug_barrier()  # sorted rows written by other threads' layouts
            head = tl.zeros([ROWS, MP], tl.int32)  # index of each slot's head in its sorted row
            thead = tl.zeros([ROWS], tl.int32)
            for j in range(NR):
                best = tl.maximum(tl.max(smax, axis=1), tmax)
                found = best > NO_KEY
                tl.store(A_OUT + obase + j * sak,
                         tl.where(found, (best & 0xFFFFFFFF).to(tl.int32), -1), mask=rok)
                in_t = tmax == best
                slot = tl.where(in_t, M,
                                tl.max(tl.where(smax == best[:, None], scol[None, :], -1), axis=1))
                here = found[:, None] & (scol[None, :] == slot[:, None])
                nxt = tl.where(in_t, thead, tl.max(tl.where(here, head, 0), axis=1)) + 1
                key = tl.load(scr + (slot * RP + nxt)[:, None], mask=(found & (nxt < RP))[:, None],
                              other=NO_KEY)
                key = tl.max(key, axis=1)  # [ROWS, 1] -> [ROWS]
                smax = tl.where(here, key[:, None], smax)
                head = tl.where(here, nxt[:, None], head)
                tmax = tl.where(found & in_t, key, tmax)
                thead = tl.where(found & in_t, nxt, thead)
        else:
            # greedy keep: topk rounds of best remaining (ties: nearer anchor), then drop every
            # candidate whose [first slot, anchor] the kept span covers: fine blocks [flo, fhi],
            # in the slots of coarse blocks flo >> c .. fhi >> c (coarse index n_full: the tail)
            for j in range(TOPK):
                best = tl.maximum(tl.max(smax, axis=1), tmax)
                found = best > NO_KEY
                a = tl.where(found, (best & 0xFFFFFFFF).to(tl.int32), -1)
                tl.store(A_OUT + obase + j * sak, a, mask=rok)
                tl.store(S_OUT + obase + j * sak, tl.where(found, _key_score(best), float("-inf")),
                         mask=rok)
                lo = tl.maximum(a - back_t, 0)
                hi = tl.minimum(a + fwd_t, e)
                clo = ((lo + (1 << jf) - 1) >> jf) >> c
                chi = (hi >> jf) >> c
                ci = clo
                while tl.max(tl.where(found, chi - ci, -1), axis=0) >= 0:
                    slot = tl.where(ci == n_full, M,
                                    tl.max(tl.where(slot_ci == ci[:, None], scol[None, :], -1),
                                           axis=1))
                    act = found & (ci <= chi) & (slot >= 0)
                    ptr = scr + slot[:, None] * RP + col[None, :]
                    key = tl.load(ptr, mask=act[:, None], other=NO_KEY)
                    ka = (key & 0xFFFFFFFF).to(tl.int32)
                    cov = (((ka >> jf[:, None]) << jf[:, None]) >= lo[:, None]) & \
                        (ka <= hi[:, None])
                    key = tl.where(cov | (ka == a[:, None]), NO_KEY, key)
                    tl.store(ptr, key, mask=act[:, None])
                    km = tl.max(key, axis=1)
                    smax = tl.where(act[:, None] & (scol[None, :] == slot[:, None]), km[:, None],
                                    smax)
                    tmax = tl.where(act & (slot == M), km, tmax)
                    ci += 1
        w += NPROG


@triton.jit(do_not_specialize=["Hq", "G", "Lq", "T", "W"])
def _rerank_kernel(
    QS, K, KPM, CAND, EX, POS, BACK, FWD, A_OUT, S_OUT,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    skpb, skpn,
    sposb, sposm,
    scb, sch, scm, sck,
    sab, sah, sam, sak,
    Hq, G, Lq, T, W,
    D: tl.constexpr, HAS_KPM: tl.constexpr, HAS_POS: tl.constexpr, TOPK: tl.constexpr,
    NR: tl.constexpr, NRP: tl.constexpr, BS: tl.constexpr, LOG_BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr, NO_KEY: tl.constexpr, CH: tl.constexpr,
):
    """search_key="block_rerank", steps 3b and 4 for one (query, head) row: the exact largest
    q.k over the present keys <= e of each of its NR candidate blocks (CAND: their anchors, best
    bound first, -1 = none), then the greedy keep on these scores (ties: the nearer anchor).
    CH candidate blocks are gathered per step (one [CH * BS, D] load: more bytes in flight); their
    scores go to EX (CAND's memory seen as float32: each step overwrites only the anchors it has
    read, and every anchor was read into registers first)."""
    qi = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    kvh = h // G
    if HAS_POS:
        t = tl.load(POS + b * sposb + qi.to(tl.int64) * sposm).to(tl.int32)
    else:
        t = T - Lq + qi
    e = tl.maximum(t - W, 0)
    back_t = tl.load(BACK + t).to(tl.int32)
    fwd_t = tl.load(FWD + t).to(tl.int32)
    jf = _fine_level(back_t, LOG_BLOCK)
    od = tl.arange(0, BLOCK_D)
    dm = od < D
    q = tl.load(QS + b * sqb + h * sqh + qi.to(tl.int64) * sqm + od * sqd, mask=dm,
                other=0.0).to(tl.float32)
    crow = CAND + b * scb + h * sch + qi.to(tl.int64) * scm
    erow = EX + b * scb + h * sch + qi.to(tl.int64) * scm
    ms = tl.arange(0, NRP)
    ca = tl.load(crow + ms * sck, mask=ms < NR, other=-1)
    tl.debug_barrier()  # every anchor is in registers before EX (the same memory) is written
    kbase = K + b * skb + kvh * skh
    r = tl.arange(0, CH * BS)  # row r: slot r % BS of the step's candidate r // BS
    jb = r % BS
    for m0 in range(0, NR, CH):
        mi = m0 + r // BS
        a = tl.load(crow + mi * sck, mask=mi < NR, other=-1)
        p = ((a >> jf) << jf) + jb  # the candidate's block, cut at e
        pm = (a >= 0) & (jb < (1 << jf)) & (p <= e)
        if HAS_KPM:
            pm = pm & (tl.load(KPM + b * skpb + p.to(tl.int64) * skpn, mask=pm, other=0) != 0)
        kk = tl.load(kbase + p[:, None].to(tl.int64) * skn + od[None, :] * skd,
                     mask=pm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        lg = tl.where(pm, tl.sum(kk * q[None, :], axis=1), float("-inf"))
        mx = tl.max(tl.reshape(lg, [CH, BS]), axis=1)
        mc = m0 + tl.arange(0, CH)
        tl.store(erow + mc * sck, mx, mask=mc < NR)
    tl.debug_barrier()  # EX written by other threads' layouts above
    ex = tl.load(erow + ms * sck, mask=ms < NR, other=float("-inf"))  # -inf where ca < 0
    key = _key(ex, ca, ca >= 0, NO_KEY)
    b0 = (ca >> jf) << jf
    obase = b * sab + h * sah + qi.to(tl.int64) * sam
    for j in range(TOPK):
        best = tl.max(key, axis=0)
        found = best > NO_KEY
        a = tl.where(found, (best & 0xFFFFFFFF).to(tl.int32), -1)
        tl.store(A_OUT + obase + j * sak, a)
        tl.store(S_OUT + obase + j * sak, tl.where(found, _key_score(best), float("-inf")))
        lo = tl.maximum(a - back_t, 0)
        hi = tl.minimum(a + fwd_t, e)
        key = tl.where(found & (((b0 >= lo) & (ca <= hi)) | (ca == a)), NO_KEY, key)


def _pyramid(k: torch.Tensor, key_padding_mask, jlo: int):
    """Min/max of aligned blocks of 2^j keys for j = jlo .. log2(T), levels stacked along dim 2:
    kmin, kmax [B, Hkv, rows, D] in k's dtype; absent keys enter as +inf/-inf."""
    B, Hkv, T, D = k.shape
    n = T >> jlo
    x = k[:, :, :n << jlo]
    xmin = xmax = x
    if key_padding_mask is not None:
        pm = key_padding_mask[:, None, :n << jlo, None]
        xmax = x.masked_fill(~pm, float("-inf"))
        xmin = x.masked_fill(~pm, float("inf"))
    cur_max = xmax.reshape(B, Hkv, n, 1 << jlo, D).amax(3)
    cur_min = xmin.reshape(B, Hkv, n, 1 << jlo, D).amin(3)
    maxs, mins = [cur_max], [cur_min]
    while n > 1:
        n >>= 1
        cur_max = cur_max[:, :, :2 * n].reshape(B, Hkv, n, 2, D).amax(3)
        cur_min = cur_min[:, :, :2 * n].reshape(B, Hkv, n, 2, D).amin(3)
        maxs.append(cur_max)
        mins.append(cur_min)
    return torch.cat(mins, 2), torch.cat(maxs, 2)


def _max_fine_per_coarse(T: int, W: int, t0: int, r: float, bf: float, log_block: int) -> int:
    """A power of two >= R = 2^c (fine blocks per coarse block, also >= the number of whole coarse
    blocks) of every query at t in [t0, T), on the host without a synchronisation: from a lower
    bound of back(t) (the float64 formula less 1e-6 relative), so it is never below the kernel's."""
    t = np.arange(max(t0, W), T, dtype=np.float64)
    x = bf * (t + 1) ** r
    back_low = np.maximum(np.ceil(x - 1e-6 * np.maximum(x, 1.0)), 0.0)
    jf = np.minimum(np.frexp(back_low + 1)[1] - 1, log_block).astype(np.int64)
    nf = int(np.max(np.maximum((t.astype(np.int64) - W + 1) >> jf, 1)))
    return 1 << (((nf - 1).bit_length() + 1) // 2)


def span_search(qs, k, key_padding_mask, query_positions, window, topk, search_power,
                span_power, backward_factor, forward_factor, search_key, dense_below,
                fine_block=16, rerank=32, block_q=None, num_warps=4, rerank_warps=4,
                rerank_chunk=4):
    """Same contract as ``reference.span_search`` for ``search_key="block"`` and
    ``"block_rerank"`` (the block kernel selects the rerank * topk best candidates, then
    ``_rerank_kernel`` rescores them and keeps the spans). ``block_q``: queries
    per work item (default: 32 rows of queries x heads, at least 16 rows); the default launch shape
    (32 rows, 4 warps) was the fastest of those measured at 128K on an H200 (RESULTS.md).
    ``rerank_chunk``: candidate blocks ``_rerank_kernel`` gathers per step (a power of two)."""
    if rerank_chunk < 1 or rerank_chunk & (rerank_chunk - 1):
        raise ValueError(f"span_search (block): rerank_chunk={rerank_chunk} is not a power of two")
    B, Hq, Lq, D = qs.shape
    Hkv, T = k.shape[1], k.shape[2]
    dev = qs.device
    check_search_inputs("span_search (block)", Hq, Hkv, topk, search_key,
                        searches.names(family="block"), max_topk=8)
    if qs.dtype not in _DTYPES or k.dtype != qs.dtype or D > 256:
        raise ValueError(f"span_search (block): the Triton kernel takes fp32/bf16/fp16 query and key "
                         f"of one dtype and head dim <= 256, got {qs.dtype}/{k.dtype}, D={D}")
    if keeps_no_span(T, window, dense_below, Lq):
        return no_span_outputs(B, Hq, Lq, topk, dev)
    W = window  # < T here
    back, fwd = span_extents(T, span_power, backward_factor, forward_factor, dev)
    # the finest level any query uses: that of the first query past the window (back grows with t);
    # the same float64 table, evaluated on the host for t = W only
    back_w = int(span_extents(W + 1, span_power, backward_factor, forward_factor)[0][W])
    log_block = fine_block.bit_length() - 1
    jlo = min(log_block, (back_w + 1).bit_length() - 1)
    t0 = W if query_positions is not None else T - Lq
    RP = max(16, _max_fine_per_coarse(T, W, t0, span_power, backward_factor, log_block))
    kmin, kmax = _pyramid(k, key_padding_mask, jlo)
    if key_padding_mask is not None:
        idx = torch.arange(T, device=dev)
        lp = torch.cummax(torch.where(key_padding_mask, idx, -1), dim=1).values.to(torch.int32)
        kpm = key_padding_mask.view(torch.uint8)
    else:
        lp = kpm = back  # unused
    pos = query_positions if query_positions is not None else back
    anchors = torch.empty((B, Hq, Lq, topk), dtype=torch.int32, device=dev)
    scores = torch.empty((B, Hq, Lq, topk), dtype=torch.float32, device=dev)
    nr = rerank * topk if searches.kind(search_key).pool else 0
    cand = torch.empty((B, Hq, Lq, nr), dtype=torch.int32, device=dev) if nr else anchors
    G = Hq // Hkv
    GP = _next_pow2(G)
    QB = _next_pow2(max(block_q or 32 // GP, -(-16 // GP), 1))  # tensor-core tiles: >= 16 rows
    QB = min(QB, max(_next_pow2(Lq), -(-16 // GP)))
    M = COARSE_FANOUT * topk
    nqb = triton.cdiv(Lq, QB)
    items = B * Hkv * nqb
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        progs = min(items, PROGRAMS_PER_SM * sms)
    else:  # the interpreter runs programs one after the other: a few, for a small scratch
        progs = min(items, 4)
    scratch = torch.empty((progs, QB * GP, M + 1, RP), dtype=torch.int64, device=dev)
    _block_search_kernel[(progs,)](
        qs, k, kpm, kmin, kmax, lp, pos, back, fwd, cand, scores, scratch,
        *qs.stride(), *k.stride(),
        *(kpm.stride() if key_padding_mask is not None else (0, 0)),
        kmin.stride(0), kmin.stride(1), kmin.stride(2), kmin.stride(3),
        *(lp.stride() if key_padding_mask is not None else (0, 0)),
        *(pos.stride() if query_positions is not None else (0, 0)),
        *cand.stride(),
        Hkv, G, Lq, T, W, jlo, T.bit_length(), nqb, items, progs, triton.cdiv(items, progs),
        D=D, HAS_KPM=key_padding_mask is not None, HAS_POS=query_positions is not None,
        TOPK=topk, M=M, MP=_next_pow2(M), RP=RP, LOG_BLOCK=log_block, QB=QB, GP=GP,
        BLOCK_D=max(16, _next_pow2(D)), DC=min(32, max(16, _next_pow2(D))),
        KC=min(32, max(16, _next_pow2(D))),
        DOT_F32=qs.dtype == torch.float32 or dev.type != "cuda", NO_KEY=_NO_KEY, NR=nr,
        num_warps=num_warps,
    )
    if nr:
        _rerank_kernel[(Lq, B * Hq)](
            qs, k, kpm, cand, cand.view(torch.float32), pos, back, fwd, anchors, scores,
            *qs.stride(), *k.stride(),
            *(kpm.stride() if key_padding_mask is not None else (0, 0)),
            *(pos.stride() if query_positions is not None else (0, 0)),
            *cand.stride(), *anchors.stride(),
            Hq, G, Lq, T, W,
            D=D, HAS_KPM=key_padding_mask is not None, HAS_POS=query_positions is not None,
            TOPK=topk, NR=nr, NRP=_next_pow2(nr), BS=fine_block, LOG_BLOCK=log_block,
            BLOCK_D=max(16, _next_pow2(D)), NO_KEY=_NO_KEY, CH=min(rerank_chunk, _next_pow2(nr)),
            num_warps=rerank_warps,
        )
    return anchors, scores
