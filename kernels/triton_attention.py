"""Triton kernels for step 2 of docs/spec.md: span-attention (sinks, window and kept spans).

Two paths (``impl``), both exact against the reference:

``pairs`` (default). The kept spans of each (query, head) are turned into key *pieces*
(``_pieces_kernel``): in ``union`` mode the spans of a query made disjoint (sorted by start, each
minus the ones before it), so a position counts once; in ``gated`` mode span j as is; positions
below the sinks are left to the sinks. The pieces of one kv head are sorted by key footprint
(``sort_keys``, shared with the backward: lo // 64, then hi, ascending and descending in
alternate lo buckets), so 64 consecutive pieces, from any queries and any of the G query heads,
share one contiguous key range: ``_span_pairs_kernel`` runs an online softmax over that range on
the tensor cores, each row masked to its own piece, and writes per-piece partial results (log2
sum of exponentials and normalised output, fp32). Its key-tile loop is a for loop with runtime
bounds (Triton can software-pipeline it, ``pair_stages``; the interpreter cannot take such
bounds, so there the same body runs in a while loop). ``_span_attention_kernel`` (MERGE) then
does the window and the sinks per query block and merges the partials: one softmax over the union, or,
for ``gated``, one softmax per span over span_j ∪ window ∪ sinks mixed by softmax(search scores)
(a query with no kept span gets window ∪ sinks). This is what makes data-dependent routing cheap:
neighbouring queries rarely pick the same spans, but across a kv head about G*k pieces start at
every key position, so the tiles are nearly full.

``tile``. One program per query block visits, in ascending order, only the key tiles that some
interval (sinks, window, spans) of some row touches, and masks each (row, key) by an OR of the
row's intervals. Fast when neighbouring queries choose neighbouring spans; with random routing the
union of a block's spans is most of the prefix (see benchmarks/RESULTS.md).

Extents come from ``geometry.span_extents`` (the reference's float64 table); query head h reads
kv head h // (Hq / Hkv) from the un-repeated K/V. Dense causal attention (T <= dense_below) is
the merge kernel with a window over every key and no spans. No host synchronisation anywhere.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .geometry import next_pow2, span_extents
from .reference import default_positions

_BIGI = tl.constexpr(2 ** 30)


@triton.jit
def _next_tile(cur, sk_ok, sk_hi_t, win_ok, win_lo_t, win_hi_t, sp_ok, sp_lo_t, sp_hi_t):
    c1 = tl.min(tl.where(sk_ok & (sk_hi_t >= cur), cur, _BIGI), axis=0)
    c2 = tl.min(tl.where(win_ok & (win_hi_t >= cur), tl.maximum(win_lo_t, cur), _BIGI), axis=0)
    c3 = tl.min(tl.min(tl.where(sp_ok & (sp_hi_t >= cur), tl.maximum(sp_lo_t, cur), _BIGI),
                       axis=1), axis=0)
    return tl.minimum(tl.minimum(c1, c2), c3)


@triton.jit
def _tile_scores(q, kbase, offn64, nmask, offd, skn, skd, qk_scale, D: tl.constexpr,
                 IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    """Scaled logits of q [BLOCK_M, BLOCK_D] against the key tile at rows offn64 (log2 domain)."""
    kt = tl.load(kbase + offn64[None, :] * skn + offd[:, None] * skd,
                 mask=nmask[None, :] & (offd[:, None] < D), other=0.0)
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    elif DOT_F32:  # the interpreter's bf16 dot is wrong: emulate it in fp32
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    return s * qk_scale


@triton.jit
def _tile_update(s, keep, m_i, l_i, acc, vbase, offn64, nmask, offdv, svn, svd, DV: tl.constexpr,
                 IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    """One online-softmax step: mask the logits s by keep, rescale the running (m, l, acc) and add
    the tile's values. Rows with nothing kept so far stay at m = -inf, l = 0, acc = 0."""
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    vt = tl.load(vbase + offn64[:, None] * svn + offdv[None, :] * svd,
                 mask=nmask[:, None] & (offdv[None, :] < DV), other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
    elif DOT_F32:
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype).to(tl.float32),
                                            vt.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    return acc, l_i, m_new


@triton.jit
def _attend(q, kbase, vbase, kpbase, t, sk_ok, sk_hi, win_ok, win_lo, sp_ok, sp_lo, sp_hi,
            T, qk_scale, skn, skd, svn, svd, skpn,
            HAS_KPM: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr, D: tl.constexpr,
            DV: tl.constexpr, HAS_SPANS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_DV: tl.constexpr):
    offd = tl.arange(0, BLOCK_D)
    offdv = tl.arange(0, BLOCK_DV)
    sk_hi_t = sk_hi // BLOCK_N
    win_lo_t = win_lo // BLOCK_N
    win_hi_t = t // BLOCK_N
    sp_lo_t = sp_lo // BLOCK_N
    sp_hi_t = sp_hi // BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    nxt = _next_tile(0, sk_ok, sk_hi_t, win_ok, win_lo_t, win_hi_t, sp_ok, sp_lo_t, sp_hi_t)
    while nxt < _BIGI:
        offn = nxt * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offn < T
        offn64 = offn.to(tl.int64)
        s = _tile_scores(q, kbase, offn64, nmask, offd, skn, skd, qk_scale, D, IEEE, DOT_F32)
        keep = (offn[None, :] <= t[:, None]) & nmask[None, :]
        fixed = (sk_ok[:, None] & (offn[None, :] <= sk_hi[:, None])) | \
                (win_ok[:, None] & (offn[None, :] >= win_lo[:, None]))
        if HAS_SPANS:
            insp = sp_ok[:, :, None] & (offn[None, None, :] >= sp_lo[:, :, None]) & \
                (offn[None, None, :] <= sp_hi[:, :, None])
            insp = tl.max(insp.to(tl.int32), axis=1) > 0
            keep = keep & (fixed | insp)
        else:
            keep = keep & fixed
        if HAS_KPM:
            kp = tl.load(kpbase + offn64 * skpn, mask=nmask, other=0)
            keep = keep & (kp != 0)[None, :]
        acc, l_i, m_i = _tile_update(s, keep, m_i, l_i, acc, vbase, offn64, nmask, offdv, svn, svd,
                                     DV, IEEE, DOT_F32)
        nxt = _next_tile(nxt + 1, sk_ok, sk_hi_t, win_ok, win_lo_t, win_hi_t, sp_ok, sp_lo_t,
                         sp_hi_t)
    return acc, l_i, m_i


@triton.jit
def _gate_weights(sco_ptrs, cmask, aval):
    """Gated mode: softmax of the kept spans' scores per row (0 for empty slots) and whether the
    row kept any span."""
    sc = tl.load(sco_ptrs, mask=cmask, other=float("-inf")).to(tl.float32)
    sc = tl.where(aval, sc, float("-inf"))
    gmax = tl.max(sc, axis=1)
    gmax = tl.where(gmax == float("-inf"), 0.0, gmax)
    e = tl.where(aval, tl.exp(sc - gmax[:, None]), 0.0)
    esum = tl.sum(e, axis=1)
    gw = tl.where(esum[:, None] > 0, e / tl.where(esum > 0, esum, 1.0)[:, None], 0.0)
    return gw, tl.max(aval.to(tl.int32), axis=1) > 0


@triton.jit
def _span_partials(PLO, PHI, PLSE, poff, cmask):
    """Which span slots hold a piece computed by the pairs kernel, and its log2-sum-exp."""
    plo = tl.load(PLO + poff, mask=cmask, other=1)
    phi = tl.load(PHI + poff, mask=cmask, other=0)
    pok = cmask & (phi >= plo)
    lse_p = tl.load(PLSE + poff, mask=pok, other=float("-inf"))
    return pok, tl.where(pok, lse_p, float("-inf"))


@triton.jit
def _span_partial_out(pok, poff, selj, POUT, offdv, dvmask, DV: tl.constexpr):
    okj = tl.max((selj & pok).to(tl.int32), axis=1) > 0
    pj = tl.sum(tl.where(selj, poff, 0), axis=1)
    return tl.load(POUT + pj[:, None] * DV + offdv[None, :], mask=okj[:, None] & dvmask[None, :],
                   other=0.0)


@triton.jit
def _with_span_partial(lse_f, o_f, lse_p, pok, poff, selj, POUT, offdv, dvmask, DV: tl.constexpr):
    """Gated mode: (window + sinks) merged with span slot j alone; returns the normalised output,
    the shift and the denominator (lse = shift + log2 den)."""
    lj = tl.max(tl.where(selj, lse_p, float("-inf")), axis=1)
    oj_p = _span_partial_out(pok, poff, selj, POUT, offdv, dvmask, DV)
    mj = tl.maximum(lse_f, lj)
    mj = tl.where(mj == float("-inf"), 0.0, mj)
    wf = tl.exp2(lse_f - mj)
    wj = tl.exp2(lj - mj)
    den = wf + wj
    return (wf[:, None] * o_f + wj[:, None] * oj_p) / tl.where(den > 0, den, 1.0)[:, None], mj, den


@triton.jit
def _union_with_span_partials(lse_f, o_f, lse_p, pok, poff, cols, POUT, offdv, dvmask,
                              DV: tl.constexpr, TOPK: tl.constexpr):
    """Union mode: (window + sinks) merged exactly with every span piece; returns the normalised
    output, the shift and the denominator (lse = shift + log2 den)."""
    mx = tl.maximum(lse_f, tl.max(lse_p, axis=1))
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    wf = tl.exp2(lse_f - mx)
    wp = tl.exp2(lse_p - mx[:, None])
    num = wf[:, None] * o_f
    den = wf + tl.sum(wp, axis=1)
    for j in tl.static_range(TOPK):
        selj = cols[None, :] == j
        oj_p = _span_partial_out(pok, poff, selj, POUT, offdv, dvmask, DV)
        num += tl.sum(tl.where(selj, wp, 0.0), axis=1)[:, None] * oj_p
    return num / tl.where(den > 0, den, 1.0)[:, None], mx, den


@triton.jit
def _span_attention_kernel(
    Q, K, V, O, ANCH, SCO, KPM, POS, BACK, FWD, PLO, PHI, PLSE, POUT,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    sab, sah, sam, sak,
    ssb, ssh, ssm, ssk,
    skpb, skpn,
    spb, spm,
    Hq, G, Lq, T, W, S, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, HAS_KPM: tl.constexpr, HAS_POS: tl.constexpr,
    TOPK: tl.constexpr, KP: tl.constexpr, GATED: tl.constexpr, IEEE: tl.constexpr,
    DOT_F32: tl.constexpr, MERGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    nqb = tl.cdiv(Lq, BLOCK_M)
    nbh = tl.num_programs(0) // nqb
    bh = pid % nbh
    qb = nqb - 1 - pid // nbh  # the longest query blocks start first
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    kvh = (h // G).to(tl.int64)
    h64 = h.to(tl.int64)

    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Lq
    rows64 = rows.to(tl.int64)
    if HAS_POS:
        t = tl.load(POS + b * spb + rows64 * spm, mask=rmask, other=0).to(tl.int32)
    else:
        t = T - Lq + rows
    t = tl.where(rmask, t, 0)
    offd = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h64 * sqh + rows64[:, None] * sqm + offd[None, :] * sqd,
                mask=rmask[:, None] & (offd[None, :] < D), other=0.0)

    # the intervals of each row: sinks, window, spans
    sk_hi = tl.minimum(S, t + 1) - 1
    sk_ok = rmask & (sk_hi >= 0)
    win_lo = tl.maximum(t - W + 1, 0)
    win_ok = rmask & (W > 0)
    cols = tl.arange(0, KP)
    cmask = rmask[:, None] & (cols[None, :] < TOPK)
    aoff = b * sab + h64 * sah + rows64[:, None] * sam + cols[None, :] * sak
    a = tl.load(ANCH + aoff, mask=cmask, other=-1).to(tl.int32)
    back_t = tl.load(BACK + t, mask=rmask, other=0).to(tl.int32)
    fwd_t = tl.load(FWD + t, mask=rmask, other=0).to(tl.int32)
    aval = cmask & (a >= 0)
    a_c = tl.where(aval, a, 0)
    sp_lo = tl.maximum(a_c - back_t[:, None], 0)
    sp_hi = tl.minimum(a_c + fwd_t[:, None], t[:, None] - W)
    sp_ok = aval & (sp_hi >= sp_lo)

    kbase = K + b * skb + kvh * skh
    vbase = V + b * svb + kvh * svh
    kpbase = KPM + b * skpb

    if GATED:
        soff = b * ssb + h64 * ssh + rows64[:, None] * ssm + cols[None, :] * ssk
        gw, any_a = _gate_weights(SCO + soff, cmask, aval)

    offdv = tl.arange(0, BLOCK_DV)
    dvmask = offdv < DV
    if MERGE:
        # window and sinks here; the spans were done by _span_pairs_kernel as partial softmaxes
        nosp = sp_ok & (cols[None, :] < 0)
        acc, l_f, m_f = _attend(q, kbase, vbase, kpbase, t, sk_ok, sk_hi, win_ok, win_lo,
                                nosp, sp_lo, sp_hi, T, qk_scale, skn, skd, svn, svd, skpn,
                                HAS_KPM, IEEE, DOT_F32, D, DV, False, BLOCK_M, BLOCK_N, BLOCK_D,
                                BLOCK_DV)
        lpos = l_f > 0
        lse_f = tl.where(lpos, m_f + tl.log2(tl.where(lpos, l_f, 1.0)), float("-inf"))
        o_f = acc / tl.where(lpos, l_f, 1.0)[:, None]
        poff = ((b * Hq + h64) * Lq + rows64)[:, None] * TOPK + cols[None, :]
        pok, lse_p = _span_partials(PLO, PHI, PLSE, poff, cmask)
        if GATED:
            out = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
            for j in tl.static_range(TOPK):
                selj = cols[None, :] == j
                oj, _, _ = _with_span_partial(lse_f, o_f, lse_p, pok, poff, selj, POUT, offdv,
                                              dvmask, DV)
                gj = tl.sum(tl.where(selj, gw, 0.0), axis=1)
                out += gj[:, None] * oj
            out = tl.where(any_a[:, None], out, o_f)
        else:
            out, _, _ = _union_with_span_partials(lse_f, o_f, lse_p, pok, poff, cols, POUT, offdv,
                                                  dvmask, DV, TOPK)
    elif GATED:
        soff = b * ssb + h64 * ssh + rows64[:, None] * ssm + cols[None, :] * ssk
        gw, any_a = _gate_weights(SCO + soff, cmask, aval)
        out = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        o0 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for j in tl.static_range(TOPK):
            spj = sp_ok & (cols[None, :] == j)
            acc, l_i, _ = _attend(q, kbase, vbase, kpbase, t, sk_ok, sk_hi, win_ok, win_lo,
                               spj, sp_lo, sp_hi, T, qk_scale, skn, skd, svn, svd, skpn,
                               HAS_KPM, IEEE, DOT_F32, D, DV, True, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
            oj = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            gj = tl.sum(tl.where(cols[None, :] == j, gw, 0.0), axis=1)
            out += gj[:, None] * oj
            if j == 0:
                o0 = oj
        out = tl.where(any_a[:, None], out, o0)
    else:
        acc, l_i, _ = _attend(q, kbase, vbase, kpbase, t, sk_ok, sk_hi, win_ok, win_lo,
                           sp_ok, sp_lo, sp_hi, T, qk_scale, skn, skd, svn, svd, skpn,
                           HAS_KPM, IEEE, DOT_F32, D, DV, True, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]

    tl.store(O + b * sob + h64 * soh + rows64[:, None] * som + offdv[None, :] * sod,
             out.to(O.dtype.element_ty), mask=rmask[:, None] & (offdv[None, :] < DV))


@triton.jit
def _piece_keep(offn, offn64, nmask, lo, hi, KPM, b, skpb, skpn, HAS_KPM: tl.constexpr):
    """Which (piece, key) pairs of a key tile a piece attends."""
    keep = (offn[None, :] >= lo[:, None]) & (offn[None, :] <= hi[:, None])
    if HAS_KPM:
        kp = tl.load(KPM + b * skpb + offn64 * skpn, mask=nmask, other=0)
        keep = keep & (kp != 0)[None, :]
    return keep


@triton.jit
def _piece_tile(ks, q, kbase, lo, hi, hi_max, KPM, b, skpb, skpn, skn, skd, qk_scale,
                D: tl.constexpr, HAS_KPM: tl.constexpr, IEEE: tl.constexpr,
                DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Key tile [ks, ks + BLOCK_N) of a block of pieces (none past hi_max): the logits, which
    (piece, key) pairs count, the key rows (int64) and which of them exist."""
    offn = ks + tl.arange(0, BLOCK_N)
    offn64 = offn.to(tl.int64)
    nmask = offn <= hi_max
    s = _tile_scores(q, kbase, offn64, nmask, tl.arange(0, BLOCK_D), skn, skd, qk_scale, D, IEEE,
                     DOT_F32)
    keep = _piece_keep(offn, offn64, nmask, lo, hi, KPM, b, skpb, skpn, HAS_KPM)
    return s, keep, offn64, nmask


@triton.jit
def _pairs_tile(ks, acc, l_i, m_i, q, lo, hi, hi_max, kbase, vbase, KPM, b, skpb, skpn, skn, skd,
                svn, svd, qk_scale, D: tl.constexpr, DV: tl.constexpr, HAS_KPM: tl.constexpr,
                IEEE: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One key tile [ks, ks + BLOCK_N) of ``_span_pairs_kernel``, each row masked to its piece."""
    s, keep, offn64, nmask = _piece_tile(ks, q, kbase, lo, hi, hi_max, KPM, b, skpb, skpn, skn,
                                         skd, qk_scale, D, HAS_KPM, IEEE, DOT_F32, BLOCK_N,
                                         BLOCK_D)
    return _tile_update(s, keep, m_i, l_i, acc, vbase, offn64, nmask, tl.arange(0, BLOCK_DV), svn,
                        svd, DV, IEEE, DOT_F32)


@triton.jit
def _span_pairs_kernel(
    Q, K, V, KPM, IDX, PLO, PHI, PLSE, POUT,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    skpb, skpn,
    Hkv, G, Lq, NPAIR, qk_scale,
    TOPK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HAS_KPM: tl.constexpr,
    IEEE: tl.constexpr, DOT_F32: tl.constexpr, PIPE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """BLOCK_M (query, head, span piece) rows of one kv head, consecutive in key-footprint order:
    the rows share one contiguous key range, read once per tile for all of them. Writes each
    row's partial softmax (log2-sum-exp and normalised output)."""
    cb = tl.program_id(0)
    grp = tl.program_id(1)  # b * Hkv + kvh
    b = (grp // Hkv).to(tl.int64)
    kvh = (grp % Hkv).to(tl.int64)
    r = cb * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = r < NPAIR
    gbase = grp.to(tl.int64) * NPAIR
    loc = tl.load(IDX + gbase + r, mask=rm, other=0)
    gidx = gbase + loc.to(tl.int64)  # pair index in [B, Hq, Lq, TOPK]
    lo = tl.load(PLO + gidx, mask=rm, other=1)
    hi = tl.load(PHI + gidx, mask=rm, other=0)
    ok = rm & (hi >= lo)
    hl = loc // (Lq * TOPK)
    qi = (loc // TOPK) % Lq
    h64 = kvh * G + hl.to(tl.int64)
    offd = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h64[:, None] * sqh + qi.to(tl.int64)[:, None] * sqm
                + offd[None, :] * sqd, mask=ok[:, None] & (offd[None, :] < D), other=0.0)
    lo_min = tl.min(tl.where(ok, lo, _BIGI), axis=0)
    hi_max = tl.max(tl.where(ok, hi, -1), axis=0)
    kbase = K + b * skb + kvh * skh
    vbase = V + b * svb + kvh * svh
    offdv = tl.arange(0, BLOCK_DV)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    ks0 = (lo_min // BLOCK_N) * BLOCK_N
    if PIPE:  # a pipelined for loop; the interpreter: a while loop (module docstring)
        for ks in range(ks0, hi_max + 1, BLOCK_N):
            acc, l_i, m_i = _pairs_tile(ks, acc, l_i, m_i, q, lo, hi, hi_max, kbase, vbase, KPM, b,
                                        skpb, skpn, skn, skd, svn, svd, qk_scale, D, DV, HAS_KPM,
                                        IEEE, DOT_F32, BLOCK_N, BLOCK_D, BLOCK_DV)
    else:
        ks = ks0
        while ks <= hi_max:
            acc, l_i, m_i = _pairs_tile(ks, acc, l_i, m_i, q, lo, hi, hi_max, kbase, vbase, KPM, b,
                                        skpb, skpn, skn, skd, svn, svd, qk_scale, D, DV, HAS_KPM,
                                        IEEE, DOT_F32, BLOCK_N, BLOCK_D, BLOCK_DV)
            ks += BLOCK_N
    lpos = l_i > 0
    lse = tl.where(lpos, m_i + tl.log2(tl.where(lpos, l_i, 1.0)), float("-inf"))
    o = acc / tl.where(lpos, l_i, 1.0)[:, None]
    tl.store(PLSE + gidx, lse, mask=ok)
    tl.store(POUT + gidx[:, None] * DV + offdv[None, :], o,
             mask=ok[:, None] & (offdv[None, :] < DV))


@triton.jit
def _pieces_kernel(
    ANCH, POS, BACK, FWD, PLO, PHI,
    sab, sah, sam, sak, spb, spm,
    Hq, Lq, T, W, S, NROWS,
    HAS_POS: tl.constexpr, UNION: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Span pieces of BLOCK_R (batch, head, query) rows (see span_pieces)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < NROWS
    b = r // (Hq * Lq)
    h = (r // Lq) % Hq
    qi = r % Lq
    if HAS_POS:
        t = tl.load(POS + b * spb + qi * spm, mask=rm, other=0).to(tl.int32)
    else:
        t = (T - Lq + qi).to(tl.int32)
    cols = tl.arange(0, KP)
    cm = rm[:, None] & (cols[None, :] < TOPK)
    a = tl.load(ANCH + b[:, None] * sab + h[:, None] * sah + qi[:, None] * sam + cols[None, :] * sak,
                mask=cm, other=-1).to(tl.int32)
    back_t = tl.load(BACK + t, mask=rm, other=0).to(tl.int32)
    fwd_t = tl.load(FWD + t, mask=rm, other=0).to(tl.int32)
    ac = tl.maximum(a, 0)
    lo = tl.maximum(ac - back_t[:, None], S)
    hi = tl.minimum(ac + fwd_t[:, None], t[:, None] - W)
    ok = cm & (a >= 0) & (hi >= lo)
    if UNION:
        # the part of interval j not covered by the intervals before it in (lo, slot) order
        lo_i = lo[:, None, :]
        before = ok[:, None, :] & ((lo_i < lo[:, :, None]) |
                                   ((lo_i == lo[:, :, None]) & (cols[None, None, :] < cols[None, :, None])))
        prev = tl.max(tl.where(before, hi[:, None, :], -1), axis=2)
        lo = tl.maximum(lo, prev + 1)
        ok = ok & (hi >= lo)
    lo = tl.where(ok, lo, 1)
    hi = tl.where(ok, hi, 0)
    off = r[:, None] * TOPK + cols[None, :]
    tl.store(PLO + off, lo, mask=cm)
    tl.store(PHI + off, hi, mask=cm)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"



def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("span_attention: q, k, v must be 4-D [B, H, L, D]")
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"span_attention: query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if v.shape[:3] != k.shape[:3] or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"span_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not match")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"span_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"span_attention: dtype {q.dtype} is not float32, bfloat16 or float16")
    if max(D, v.shape[3]) > 256:
        raise ValueError(f"span_attention: head dim {max(D, v.shape[3])} > 256 is not supported")


IMPLS = ["pairs", "tile"]
"""``pairs`` (default): spans as (query, head, piece) rows sorted by key footprint, one
tensor-core pass over each group's shared key range, merged with window and sinks in a second
kernel. ``tile``: one kernel per query block that visits the union of its rows' key tiles (fast
only when neighbouring queries choose neighbouring spans)."""


# The pairs kernel keeps an fp32 partial output per (query head, query, span): B*Hq*Lq*topk*DV*4
# bytes (96 GiB for 2M queries, 32 heads, topk 3, DV 128). Past this many bytes span_attention
# runs the queries in chunks, so its memory stays bounded at any length.
PARTIAL_BYTES = 16 << 30


def _block_sizes(q, Dmax):
    if q.dtype == torch.float32:
        return (32, 32) if Dmax > 128 else (32, 64)
    if Dmax > 128:
        return 32, 32
    return 32, 64


def _pair_blocks(q, Dmax):
    """Rows, key tile and pipelining depth of ``_span_pairs_kernel``. H200, bf16, d=128, 128K
    (benchmarks/RESULTS.md): 3 stages 23.6 ms, 2 stages 23.9 ms, 1 stage 26.1 ms; the other
    shapes are not measured and stay unpipelined, as before the loop could be pipelined."""
    if q.dtype == torch.float32:
        return (32, 32, 1) if Dmax > 64 else (64, 32, 1)
    return (64, 32, 1) if Dmax > 128 else (64, 64, 3)


def span_pieces(anchors, query_positions, T, W, S, back, fwd, union):
    """int32 [B, Hq, Lq, topk] lo, hi of the key pieces the spans add beyond sinks and window
    (empty: lo=1, hi=0). ``union``: the kept spans of a query made disjoint (sorted by start,
    each minus the earlier ones), so a position counts once; ``gated``: span j as is (slot j)."""
    Lq = anchors.shape[2]
    dev = anchors.device
    if query_positions is None:
        t = (torch.arange(Lq, device=dev, dtype=torch.int64) + (T - Lq))[None, None, :, None]
    else:
        t = query_positions.long()[:, None, :, None]
    a = anchors.long()
    ok = a >= 0
    ac = a.clamp(min=0)
    lo = (ac - back[t]).clamp(min=max(S, 0))
    hi = torch.minimum(ac + fwd[t], t - W)
    ok = ok & (hi >= lo)
    if union:
        big = 2 ** 62
        lo, order = torch.sort(torch.where(ok, lo, big), dim=-1)
        hi = torch.gather(torch.where(ok, hi, -1), -1, order)
        prev = torch.cummax(hi, dim=-1).values
        prev = torch.cat([torch.full_like(prev[..., :1], -1), prev[..., :-1]], dim=-1)
        valid = lo < big
        lo = torch.maximum(lo, prev + 1)
        ok = valid & (hi >= lo)
    lo = torch.where(ok, lo, 1).to(torch.int32).contiguous()
    hi = torch.where(ok, hi, 0).to(torch.int32).contiguous()
    return lo, hi, ok


def span_pieces_triton(anchors, query_positions, T, W, S, back, fwd, union):
    """The Triton version of ``span_pieces`` (the same pieces as a set per query): lo, hi."""
    B, Hq, Lq, topk = anchors.shape
    pos = query_positions.long() if query_positions is not None else None
    nrows = B * Hq * Lq
    plo = torch.empty((B, Hq, Lq, topk), dtype=torch.int32, device=anchors.device)
    phi = torch.empty_like(plo)
    if nrows == 0:
        return plo, phi
    _pieces_kernel[(triton.cdiv(nrows, 128),)](
        anchors, pos if pos is not None else back, back, fwd, plo, phi,
        *anchors.stride(), *(pos.stride() if pos is not None else (0, 0)),
        Hq, Lq, T, W, S, nrows,
        HAS_POS=pos is not None, UNION=bool(union), TOPK=topk, KP=max(2, next_pow2(topk)),
        BLOCK_R=128, num_warps=4,
    )
    return plo, phi


BUCKET = 64  # lo // BUCKET orders the pieces (sort_keys)


def sort_keys(lo, hi, T, sinks=True, bucket=BUCKET, snake=True):
    """int64 sort keys of pieces (lo, hi [..., n]), the one piece order of the forward's pairs
    kernel and of every backward pass: by lo // bucket, within a bucket by hi, ascending in even
    buckets and descending in odd ones with ``snake`` (a block of consecutive pieces that
    straddles two buckets then holds pieces of similar extent, not the longest of one bucket
    with the shortest of the next), else always ascending; with ``sinks`` the last slot (the
    sinks piece) sorts before all others, by hi; empty pieces (hi < lo) last. Pieces of lo
    bucket c have keys in [c * (T + 1), c * (T + 1) + T]."""
    lo64, hi64 = lo.long(), hi.long()
    bkt = lo64 // bucket
    key = bkt * (T + 1) + (torch.where(bkt % 2 == 1, T - hi64, hi64) if snake else hi64)
    if sinks:
        key[..., -1] = hi64[..., -1] - (T + 1)
    return torch.where(hi64 >= lo64, key, torch.iinfo(torch.int64).max)


def pair_partials(q, k, v, kpm, plo, phi, T, qk_scale, lo_bucket=BUCKET, snake=True,
                  block_m=None, block_n=None, num_warps=4, num_stages=None):
    """The partial softmax of every span piece (plo, phi int32 [B, Hq, Lq, topk]) over its
    keys: log2-sum-exp [B, Hq, Lq, topk] and normalised output [B, Hq, Lq, topk, DV], fp32
    (written for non-empty pieces only). The pieces of each kv head are sorted by ``sort_keys``,
    then ``_span_pairs_kernel`` runs over blocks of consecutive ones. kpm: uint8 [B, T] or None."""
    B, Hq, Lq, topk = plo.shape
    Hkv, D, DV = k.shape[1], q.shape[3], v.shape[3]
    G = Hq // Hkv
    npair = G * Lq * topk
    key = sort_keys(plo, phi, T, sinks=False, bucket=lo_bucket, snake=snake)
    idx = torch.argsort(key.view(B * Hkv, npair), dim=-1).to(torch.int32)
    del key
    plse = torch.empty((B, Hq, Lq, topk), dtype=torch.float32, device=q.device)
    pout = torch.empty((B, Hq, Lq, topk, DV), dtype=torch.float32, device=q.device)
    BLOCK_D = max(16, next_pow2(D))
    BLOCK_DV = max(16, next_pow2(DV))
    bm, bn, stages = _pair_blocks(q, max(BLOCK_D, BLOCK_DV))
    bm = block_m or bm
    bn = block_n or bn
    _span_pairs_kernel[(triton.cdiv(npair, bm), B * Hkv)](
        q, k, v, kpm if kpm is not None else plo, idx, plo, phi, plse, pout,
        *q.stride(), *k.stride(), *v.stride(),
        *(kpm.stride() if kpm is not None else (0, 0)),
        Hkv, G, Lq, npair, qk_scale,
        TOPK=topk, D=D, DV=DV, HAS_KPM=kpm is not None, IEEE=q.dtype == torch.float32,
        DOT_F32=_interpreted() and q.dtype == torch.bfloat16, PIPE=not _interpreted(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, num_warps=num_warps,
        num_stages=num_stages or stages,
    )
    return plse, pout


def launch(q, k, v, anchors, scores, key_padding_mask, query_positions, W, S, back, fwd,
           gated, scale, block_m=None, block_n=None, num_warps=4, num_stages=None,
           impl="pairs", pair_block_m=None, pair_block_n=None, pair_warps=4, pair_stages=None,
           lo_bucket=BUCKET, snake=True, spans=True):
    """Run the kernels; ``W``/``S`` already clipped to T; ``back``/``fwd`` int64 [T] tables.
    ``lo_bucket``, ``snake``: the pairs path's piece order (``sort_keys``); ``pair_stages``: the
    software-pipelining depth of its key-tile loop."""
    if impl not in IMPLS:
        raise ValueError(f"span_attention: impl={impl!r} is not one of {IMPLS}")
    if not (isinstance(lo_bucket, int) and lo_bucket >= 1):
        raise ValueError(f"span_attention: lo_bucket={lo_bucket!r} is not an integer >= 1")
    B, Hq, Lq, D = q.shape
    Hkv, T, DV = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((B, Hq, Lq, DV), dtype=q.dtype, device=q.device)
    if Lq == 0:
        return out
    topk = anchors.shape[-1]
    kpm = key_padding_mask.to(torch.uint8) if key_padding_mask is not None else None
    pos = query_positions.long() if query_positions is not None else None
    BLOCK_D = max(16, next_pow2(D))
    BLOCK_DV = max(16, next_pow2(DV))
    ieee = q.dtype == torch.float32
    dot_f32 = _interpreted() and q.dtype == torch.bfloat16
    qk_scale = float(scale) * math.log2(math.e)
    merge = spans and impl == "pairs"
    if merge:
        plo, phi = span_pieces_triton(anchors, pos, T, W, S, back, fwd, not gated)
        plse, pout = pair_partials(q, k, v, kpm, plo, phi, T, qk_scale, lo_bucket, snake,
                                   pair_block_m, pair_block_n, pair_warps, pair_stages)
    else:
        plo = phi = plse = pout = back
    bm, bn = _block_sizes(q, max(BLOCK_D, BLOCK_DV))
    bm = block_m or bm
    bn = block_n or bn
    bm = min(bm, max(16, next_pow2(Lq)))
    grid = (triton.cdiv(Lq, bm) * B * Hq,)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _span_attention_kernel[grid](
        q, k, v, out, anchors, scores,
        kpm if kpm is not None else back, pos if pos is not None else back, back, fwd,
        plo, phi, plse, pout,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *anchors.stride(), *scores.stride(),
        *(kpm.stride() if kpm is not None else (0, 0)),
        *(pos.stride() if pos is not None else (0, 0)),
        Hq, Hq // Hkv, Lq, T, W, S, qk_scale,
        D=D, DV=DV, HAS_KPM=kpm is not None, HAS_POS=pos is not None,
        TOPK=topk, KP=max(2, next_pow2(topk)), GATED=bool(gated), IEEE=ieee, DOT_F32=dot_f32,
        MERGE=merge, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        num_warps=num_warps, **extra,
    )
    return out


def dense_attention(q, k, v, key_padding_mask, query_positions, scale, **kw):
    """Exact causal attention through the same kernel (window over every key, no spans)."""
    _check(q, k, v)
    B, Hq, Lq, _ = q.shape
    T = k.shape[2]
    dev = q.device
    anchors = torch.full((1, 1, 1, 1), -1, dtype=torch.int32, device=dev).expand(B, Hq, Lq, 1)
    scores = torch.full((1, 1, 1, 1), float("-inf"), dtype=torch.float32, device=dev).expand(B, Hq, Lq, 1)
    zeros = torch.zeros(max(T, 1), dtype=torch.int64, device=dev)
    return launch(q, k, v, anchors, scores, key_padding_mask, query_positions, max(T, 1), 0,
                  zeros, zeros, False, scale, **{**kw, "spans": False})


def span_attention(q, k, v, anchors, scores, key_padding_mask, query_positions, window, sinks,
                   span_power, backward_factor, forward_factor, combine, scale, dense_below,
                   **kw):
    """Same contract as ``reference.span_attention`` (the T <= dense_below case included)."""
    _check(q, k, v)
    if combine not in ("union", "gated"):
        raise ValueError(f"span_attention: combine={combine!r} is not 'union' or 'gated'")
    B, Hq, Lq, D = q.shape
    T = k.shape[2]
    if T <= dense_below or Lq == 0:
        return dense_attention(q, k, v, key_padding_mask, query_positions, scale, **kw)
    if anchors.shape[:3] != (B, Hq, Lq) or scores.shape != anchors.shape:
        raise ValueError(f"span_attention: anchors {tuple(anchors.shape)} / scores "
                         f"{tuple(scores.shape)} must be [B, Hq, Lq, topk] = [{B}, {Hq}, {Lq}, k]")
    if not 1 <= anchors.shape[-1] <= 8:
        raise ValueError(f"span_attention: topk={anchors.shape[-1]} must be in [1, 8]")
    W = min(window, T)
    S = min(sinks, T)
    back, fwd = span_extents(T, span_power, backward_factor, forward_factor, q.device)
    gated = combine == "gated"
    rows = max(1, PARTIAL_BYTES // (B * Hq * anchors.shape[-1] * v.shape[3] * 4))
    if Lq <= rows:
        return launch(q, k, v, anchors, scores, key_padding_mask, query_positions, W, S, back, fwd,
                      gated, scale, **kw)
    # Query chunks with explicit positions: every query's result is computed as in one launch.
    pos = (query_positions.long() if query_positions is not None else
           default_positions(B, Lq, T, q.device))
    out = torch.empty((B, Hq, Lq, v.shape[3]), dtype=q.dtype, device=q.device)
    for s in range(0, Lq, rows):
        e = min(Lq, s + rows)
        out[:, :, s:e] = launch(q[:, :, s:e], k, v, anchors[:, :, s:e], scores[:, :, s:e],
                                key_padding_mask, pos[:, s:e], W, S, back, fwd, gated, scale, **kw)
    return out
