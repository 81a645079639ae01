"""Triton kernel of the N-step search (docs/nstep.md): ``superlinear::nstep_search`` on CUDA.

One program owns a block of BLOCK_M queries and the G query heads of one kv head; its rows are
(head, query) pairs. Each row walks the tree of docs/nstep.md: it scores every top-level region
(shared by the G heads of a query, so those loads hit the same key row; UNROLL regions per loop
step so that their loads are in flight together), keeps the best ``topk`` in registers, then,
level by level, scores the children of its kept regions (child c of every kept region per loop
step) and keeps the best ``topk`` again. The kept set is maintained by "replace the worst slot if the candidate is better",
with the total order (score descending, index ascending) of docs/nstep.md, so the result does not
depend on the visiting order; the slots are written sorted. A region's score reads one key row
(``"anchor"``: the last present key of the region, from a last-present table when there is a key
padding mask) or two rows of float64 prefix sums (``"mean"``), like ``nstep.py``, whose tables
(``nstep.tables``: cell size, cell count, fan-out per position) fix every rounding decision.
Span-attention needs no new kernel: ``triton_attention`` takes any span power (its extents come
from the same float64 table), here 1/N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import nstep, searches
from .geometry import check_search_inputs, keeps_no_span, next_pow2, no_span_outputs

_BIGI = tl.constexpr(2 ** 30)


@triton.jit
def _region_scores(q, kbase, pbase, cbase, lpbase, e, s, n, gid, P, ok, T,
                   skn, skd, sln, spn, spd, scn, offd, dmask,
                   HAS_KPM: tl.constexpr, MEAN: tl.constexpr):
    """Scores [R] of the regions gid [R] of P [R] cells each (-inf where not ok or empty)."""
    hi = e - gid * P * s
    lo = tl.maximum(e - tl.minimum((gid + 1) * P, n) * s + 1, 0)
    hi_c = tl.minimum(tl.maximum(hi, 0), T - 1)
    if MEAN:
        lo_c = tl.minimum(lo, T - 1)
        c_hi = tl.load(cbase + (hi_c + 1).to(tl.int64) * scn, mask=ok, other=0.0)
        c_lo = tl.load(cbase + lo_c.to(tl.int64) * scn, mask=ok, other=0.0)
        cn = c_hi - c_lo
        ok = ok & (cn > 0)
        m2 = ok[:, None] & dmask[None, :]
        p_hi = tl.load(pbase + (hi_c + 1).to(tl.int64)[:, None] * spn + offd[None, :] * spd,
                       mask=m2, other=0.0)
        p_lo = tl.load(pbase + lo_c.to(tl.int64)[:, None] * spn + offd[None, :] * spd,
                       mask=m2, other=0.0)
        key = ((p_hi - p_lo) / tl.maximum(cn, 1.0)[:, None]).to(tl.float32)
    else:
        if HAS_KPM:
            rep = tl.load(lpbase + hi_c.to(tl.int64) * sln, mask=ok, other=-1).to(tl.int32)
        else:
            rep = hi_c
        ok = ok & (rep >= lo)
        key = tl.load(kbase + tl.maximum(rep, 0).to(tl.int64)[:, None] * skn + offd[None, :] * skd,
                      mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    sc = tl.sum(q * key, axis=1)
    return tl.where(ok, sc, float("-inf"))


@triton.jit
def _offer(bsc, bid, sc, gid, cols, KP: tl.constexpr):
    """Put candidate (sc, gid) [R] into the kept slots [R, KP] if it beats the worst one (lowest
    score, then largest index); slots past topk hold +inf and are never the worst."""
    wmin = tl.min(bsc, axis=1)
    is_min = bsc == wmin[:, None]
    wid = tl.max(tl.where(is_min, bid, -1), axis=1)
    wcol = tl.min(tl.where(is_min & (bid == wid[:, None]), cols[None, :], KP), axis=1)
    better = (sc > float("-inf")) & ((sc > wmin) | ((sc == wmin) & (gid < wid)))
    repl = (cols[None, :] == wcol[:, None]) & better[:, None]
    return tl.where(repl, sc[:, None], bsc), tl.where(repl, gid[:, None], bid)


@triton.jit
def _nstep_search_kernel(
    QS, K, LASTP, POS, FWD, CELL, NCELL, FAN, PREF, CNT, A_OUT, S_OUT,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    slb, sln,
    spb, spm,
    spfb, spfh, spfn, spfd,
    scb, scn,
    sab, sah, sam, sak,
    Hkv, G, Lq, T, W,
    D: tl.constexpr, STEPS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_POS: tl.constexpr,
    MEAN: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, GP: tl.constexpr,
    UNROLL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nqb = tl.cdiv(Lq, BLOCK_M)
    nbk = tl.num_programs(0) // nqb
    bk = pid % nbk
    qb = nqb - 1 - pid // nbk  # the longest query blocks start first
    b = (bk // Hkv).to(tl.int64)
    kvh = (bk % Hkv).to(tl.int64)

    r = tl.arange(0, GP * BLOCK_M)
    hl = r // BLOCK_M
    qrow = qb * BLOCK_M + r % BLOCK_M
    rmask = (hl < G) & (qrow < Lq)
    h64 = kvh * G + hl.to(tl.int64)
    if HAS_POS:
        t = tl.load(POS + b * spb + qrow.to(tl.int64) * spm, mask=rmask, other=0).to(tl.int32)
    else:
        t = T - Lq + qrow
    t = tl.where(rmask, t, 0)
    e = t - W
    live = rmask & (e >= 0)
    s = tl.load(CELL + t, mask=live, other=1).to(tl.int32)
    n = tl.load(NCELL + t, mask=live, other=0).to(tl.int32)
    f = tl.load(FAN + t, mask=live, other=1).to(tl.int32)
    fw = tl.load(FWD + t, mask=live, other=0).to(tl.int32)
    offd = tl.arange(0, BLOCK_D)
    dmask = offd < D
    q = tl.load(QS + b * sqb + h64[:, None] * sqh + qrow.to(tl.int64)[:, None] * sqm
                + offd[None, :] * sqd, mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    kbase = K + b * skb + kvh * skh
    pbase = PREF + b * spfb + kvh * spfh
    cbase = CNT + b * scb
    lpbase = LASTP + b * slb

    cols = tl.arange(0, KP)
    empty_s = tl.where(cols[None, :] < TOPK, float("-inf"), float("inf")) + \
        tl.zeros([GP * BLOCK_M, KP], tl.float32)
    empty_i = tl.where(cols[None, :] < TOPK, _BIGI, -1) + tl.zeros([GP * BLOCK_M, KP], tl.int32)

    # top level (N-2): P = f^(N-2) cells per region, ceil(n / P) regions
    P = tl.full([GP * BLOCK_M], 1, tl.int32)
    for _ in tl.static_range(STEPS - 2):
        P = P * f
    ntop = tl.where(live, (n + P - 1) // P, 0)
    bsc = empty_s
    bid = empty_i
    gmax = tl.max(ntop, axis=0)
    g = 0
    while g < gmax:
        for u in tl.static_range(UNROLL):  # independent loads in flight together
            gid = tl.zeros([GP * BLOCK_M], tl.int32) + (g + u)
            ok = gid < ntop
            sc = _region_scores(q, kbase, pbase, cbase, lpbase, e, s, n, gid, P, ok, T,
                                skn, skd, sln, spfn, spfd, scn, offd, dmask, HAS_KPM, MEAN)
            bsc, bid = _offer(bsc, bid, sc, gid, cols, KP)
        g += UNROLL

    # the levels below: children of the kept regions; child c of every kept region per step
    fmax = tl.max(tl.where(live, f, 0), axis=0)
    for _ in tl.static_range(STEPS - 2):
        P = P // f
        nreg = (n + P - 1) // P
        nsc = empty_s
        nid = empty_i
        c = 0
        while c < fmax:
            for j in tl.static_range(TOPK):
                pj = cols[None, :] == j
                par = tl.sum(tl.where(pj, bid, 0), axis=1)
                pok = live & (tl.sum(tl.where(pj, bsc, 0.0), axis=1) > float("-inf"))
                gid = par * f + c
                ok = pok & (c < f) & (gid < nreg)
                gid = tl.where(ok, gid, 0)
                sc = _region_scores(q, kbase, pbase, cbase, lpbase, e, s, n, gid, P, ok, T,
                                    skn, skd, sln, spfn, spfd, scn, offd, dmask, HAS_KPM, MEAN)
                nsc, nid = _offer(nsc, nid, sc, gid, cols, KP)
            c += 1
        bsc = nsc
        bid = nid

    # write the kept cells sorted: score descending, nearer (smaller index) first
    obase = b * sab + h64 * sah + qrow.to(tl.int64) * sam
    taken = cols[None, :] >= TOPK
    for j in tl.static_range(TOPK):
        sv = tl.where(taken, float("-inf"), bsc)
        smax = tl.max(sv, axis=1)
        is_max = (sv == smax[:, None]) & (~taken)
        imin = tl.min(tl.where(is_max, bid, 2147483647), axis=1)
        pcol = tl.min(tl.where(is_max & (bid == imin[:, None]), cols[None, :], KP), axis=1)
        pick = cols[None, :] == pcol[:, None]
        taken = taken | pick
        best_s = tl.sum(tl.where(pick, bsc, 0.0), axis=1)
        best_i = tl.sum(tl.where(pick, bid, 0), axis=1)
        valid = (pcol < KP) & (best_s > float("-inf")) & live
        a = tl.maximum(e - best_i * s - fw, 0)
        tl.store(A_OUT + obase + j * sak, tl.where(valid, a, -1).to(tl.int32), mask=rmask)
        tl.store(S_OUT + obase + j * sak, tl.where(valid, best_s, float("-inf")), mask=rmask)



def nstep_search(qs, k, key_padding_mask, query_positions, window, topk, steps, backward_factor,
                 forward_factor, search_key, dense_below, block_rows: int = 64, num_warps: int = 4,
                 unroll: int = 4):
    """Same contract as ``nstep.nstep_search``."""
    B, Hq, Lq, D = qs.shape
    Hkv, T = k.shape[1], k.shape[2]
    dev = qs.device
    check_search_inputs("nstep_search", Hq, Hkv, topk, search_key, searches.names(nstep=True),
                        max_topk=8)
    nstep.check_steps(steps)
    W = min(window, T)
    if keeps_no_span(T, window, dense_below, Lq):
        return no_span_outputs(B, Hq, Lq, topk, dev)
    fwd, cell, ncell, fan = nstep.tables(T, window, steps, backward_factor, forward_factor, dev)
    anchors = torch.empty((B, Hq, Lq, topk), dtype=torch.int32, device=dev)
    scores = torch.empty((B, Hq, Lq, topk), dtype=torch.float32, device=dev)
    mean = searches.kind(search_key).stripe_key == "mean"
    dummy = cell
    if mean:
        pref, cnt = nstep._mean_tables(k, key_padding_mask)
    else:
        pref = torch.zeros(1, 1, 1, 1, dtype=torch.float64, device=dev)
        cnt = torch.zeros(1, 1, dtype=torch.float64, device=dev)
    lastp = nstep._last_present(key_padding_mask) if key_padding_mask is not None and not mean else None
    pos = query_positions.long() if query_positions is not None else None
    G = Hq // Hkv
    GP = next_pow2(G)
    BM = max(1, min(next_pow2(Lq), max(1, block_rows // GP)))
    grid = (triton.cdiv(Lq, BM) * B * Hkv,)
    _nstep_search_kernel[grid](
        qs, k, lastp if lastp is not None else dummy, pos if pos is not None else dummy,
        fwd, cell, ncell, fan, pref, cnt, anchors, scores,
        *qs.stride(), *k.stride(),
        *(lastp.stride() if lastp is not None else (0, 0)),
        *(pos.stride() if pos is not None else (0, 0)),
        *pref.stride(), *cnt.stride(), *anchors.stride(),
        Hkv, G, Lq, T, W,
        D=D, STEPS=steps, HAS_KPM=lastp is not None, HAS_POS=pos is not None, MEAN=mean,
        TOPK=topk, KP=max(2, next_pow2(topk)), GP=GP, UNROLL=unroll, BLOCK_M=BM,
        BLOCK_D=max(16, next_pow2(D)), num_warps=num_warps,
    )
    return anchors, scores
