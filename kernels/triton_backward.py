"""Triton kernels for the backward pass of span-attention (dq, dk, dv and, gated, d scores).

Every (query, head) attends disjoint key *pieces*: its span pieces (``triton_attention``'s
``span_pieces_triton``: union pieces made disjoint, gated pieces one per slot, all above the sinks
and below the window), its window [max(S, t-W+1), t] and its sinks [0, min(S, t+1)). Within a piece
every key's softmax weight is p = exp2(s - lse) and its logit gradient p * (dO.v - delta) for one
per-piece pair (lse, delta):

* union: lse = the row's log-sum-exp over all its pieces, delta = dO . out.
* gated, span piece j: lse = LSE_j - log2 g_j, delta = dO . O_j (O_j, LSE_j: the softmax over
  span j, window and sinks; g the gate); window and sinks belong to every O_j, which makes their
  weight sum_j g_j exp2(s - LSE_j) = exp2(s - lse_F), lse_F = -log2 sum_j g_j 2^-LSE_j, and their
  delta the same mix of the dO . O_j. d score_j = g_j (dO . O_j - dO . out). A row without a kept
  span is window and sinks alone.

Passes (no host synchronisation except one count of the key-major work list):

1. Sort the pieces of each kv head by ``sort_keys`` (``triton_attention``'s, the forward's order:
   sinks first; then by lo // BUCKET, and within a bucket by hi, ascending in even buckets and
   descending in odd ones, so that a block of consecutive pieces straddling two buckets still
   holds pieces of similar extent).
2. (lse, delta) per piece.
   * union: ``_stats_kernel`` runs over the sorted pieces (64 share one key range) computing only
     each piece's log-sum-exp (q.k, no P.V); ``_union_rows_kernel`` merges a row's pieces and
     takes delta = dO . out from the forward's output (recomputed by the forward kernels when
     the caller does not pass it).
   * gated: ``_prep_kernel`` recomputes the forward's span partials (``pair_partials`` of
     ``triton_attention``), window and sinks per query block (its ``_attend``), and from them
     the per-piece (lse, delta) and d scores.
3. ``_dq_kernel``: 64 consecutive pieces share one key range; dq per piece, atomically added to
   its query row (a row has up to topk + 2 pieces).
4. ``_dkdv_kernel``: key-major. For a key tile, the pieces that can touch it lie in one contiguous
   range of the sorted order (lo >= tile start - longest piece + 1); of its blocks of
   ``kv_block_m`` pieces, those whose extents can reach the tile become the tile's work list,
   cut into runs of at most ``chunk`` pieces, one program each, accumulating dk, dv of the tile
   in registers and adding them atomically once at the end (few atomics: about one tile per run).

The key-tile loops of the stats and dq kernels and the block loop of the dk/dv kernel are for
loops with runtime bounds, which Triton can software-pipeline (``*_stages`` > 1; measured slower
on the H200, so off by default); the interpreter cannot take such bounds, so there the same
bodies run in while loops.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import triton_attention as TA
from .geometry import span_extents
from .launch import refit

_attend = TA._attend
_gate_weights = TA._gate_weights
_span_partials = TA._span_partials
_with_span_partial = TA._with_span_partial
_piece_tile = TA._piece_tile
_piece_keep = TA._piece_keep
_BIGI = TA._BIGI


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT_F32:  # the interpreter's bf16 dot is wrong: emulate it in fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _prep_kernel(
    Q, K, V, DO, ANCH, SCO, KPM, POS, BACK, FWD, PLO, PHI, PLSE, POUT, LSE, DELTA, DSC,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    sab, sah, sam, sak,
    ssb, ssh, ssm, ssk,
    skpb, skpn,
    spb, spm,
    Hq, G, Lq, T, W, S, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, HAS_KPM: tl.constexpr, HAS_POS: tl.constexpr,
    TOPK: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, IEEE: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Gated mode, per query block and head: (lse, delta) of every piece (slots 0..TOPK-1 spans,
    TOPK window, TOPK+1 sinks; log2 domain, +inf where nothing is attended) and d scores."""
    pid = tl.program_id(0)
    nqb = tl.cdiv(Lq, BLOCK_M)
    bh = pid // nqb
    qb = pid % nqb
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
    offdv = tl.arange(0, BLOCK_DV)
    dvmask = offdv < DV
    q = tl.load(Q + b * sqb + h64 * sqh + rows64[:, None] * sqm + offd[None, :] * sqd,
                mask=rmask[:, None] & (offd[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdb + h64 * sdh + rows64[:, None] * sdm + offdv[None, :] * sdd,
                 mask=rmask[:, None] & dvmask[None, :], other=0.0).to(tl.float32)
    sk_hi = tl.minimum(S, t + 1) - 1
    sk_ok = rmask & (sk_hi >= 0)
    win_lo = tl.maximum(t - W + 1, 0)
    win_ok = rmask & (W > 0)
    cols = tl.arange(0, KP)
    cmask = rmask[:, None] & (cols[None, :] < TOPK)
    kbase = K + b * skb + kvh * skh
    vbase = V + b * svb + kvh * svh
    kpbase = KPM + b * skpb
    nosp = cmask & (cols[None, :] < 0)
    zi = tl.zeros([BLOCK_M, KP], tl.int32)
    acc, l_f, m_f = _attend(q, kbase, vbase, kpbase, t, sk_ok, sk_hi, win_ok, win_lo,
                            nosp, zi, zi, T, qk_scale, skn, skd, svn, svd, skpn,
                            HAS_KPM, IEEE, DOT_F32, D, DV, False, BLOCK_M, BLOCK_N, BLOCK_D,
                            BLOCK_DV)
    lpos = l_f > 0
    lse_f = tl.where(lpos, m_f + tl.log2(tl.where(lpos, l_f, 1.0)), float("-inf"))
    o_f = acc / tl.where(lpos, l_f, 1.0)[:, None]
    roff = ((b * Hq + h64) * Lq + rows64)
    poff = roff[:, None] * TOPK + cols[None, :]
    pok, lse_p = _span_partials(PLO, PHI, PLSE, poff, cmask)
    aoff = b * sab + h64 * sah + rows64[:, None] * sam + cols[None, :] * sak
    a = tl.load(ANCH + aoff, mask=cmask, other=-1)
    aval = cmask & (a >= 0)
    soff = b * ssb + h64 * ssh + rows64[:, None] * ssm + cols[None, :] * ssk
    gw, any_a = _gate_weights(SCO + soff, cmask, aval)
    out = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    dj_all = tl.zeros([BLOCK_M, KP], tl.float32)
    lse_sp = tl.full([BLOCK_M, KP], float("inf"), tl.float32)
    delta_sp = tl.zeros([BLOCK_M, KP], tl.float32)
    # window and sinks: lse_F = -log2 sum_j g_j 2^-LSE_j, delta_F = the same mix of dO.O_j
    mu = tl.full([BLOCK_M], float("-inf"), tl.float32)
    csum = tl.zeros([BLOCK_M], tl.float32)
    cdel = tl.zeros([BLOCK_M], tl.float32)
    for j in tl.static_range(TOPK):
        selj = cols[None, :] == j
        oj, mj_s, den = _with_span_partial(lse_f, o_f, lse_p, pok, poff, selj, POUT,
                                           offdv, dvmask, DV)
        lse_j = tl.where(den > 0, mj_s + tl.log2(tl.where(den > 0, den, 1.0)), float("-inf"))
        gj = tl.sum(tl.where(selj, gw, 0.0), axis=1)
        out += gj[:, None] * oj
        dj = tl.sum(do * oj, axis=1)
        dj_all = tl.where(selj, dj[:, None], dj_all)
        # piece j: weight g_j 2^(s - LSE_j)
        live = (gj > 0) & (lse_j > float("-inf"))
        lg = tl.log2(tl.where(live, gj, 1.0))
        eff = tl.where(live, lse_j - lg, float("inf"))
        lse_sp = tl.where(selj, eff[:, None], lse_sp)
        delta_sp = tl.where(selj, dj[:, None], delta_sp)
        u = tl.where(live, lg - lse_j, float("-inf"))
        mu_new = tl.maximum(mu, u)
        mu_s = tl.where(mu_new == float("-inf"), 0.0, mu_new)
        sc_old = tl.exp2(mu - mu_s)
        wu = tl.exp2(u - mu_s)
        csum = csum * sc_old + wu
        cdel = cdel * sc_old + wu * dj
        mu = mu_new
    delta_o = tl.sum(do * out, axis=1)
    dsc = tl.where(aval, gw * (dj_all - delta_o[:, None]), 0.0)
    dsc = tl.where(any_a[:, None], dsc, 0.0)
    tl.store(DSC + roff[:, None] * TOPK + cols[None, :], dsc, mask=cmask)
    has_c = csum > 0
    lse_F = tl.where(has_c, -(mu + tl.log2(tl.where(has_c, csum, 1.0))), float("inf"))
    del_F = cdel / tl.where(has_c, csum, 1.0)
    # a row without a kept span: window and sinks alone
    lse_rows = tl.where(any_a, lse_F, lse_f)
    delta_rows = tl.where(any_a, del_F, tl.sum(do * o_f, axis=1))
    lse_sp = tl.where(any_a[:, None], lse_sp, float("inf"))
    lse_rows = tl.where(lse_rows == float("-inf"), float("inf"), lse_rows)
    lse_sp = tl.where(lse_sp == float("-inf"), float("inf"), lse_sp)
    ooff = roff[:, None] * NP + cols[None, :]
    tl.store(LSE + ooff, lse_sp, mask=cmask)
    tl.store(DELTA + ooff, delta_sp, mask=cmask)
    tl.store(LSE + roff * NP + TOPK, lse_rows, mask=rmask)
    tl.store(LSE + roff * NP + TOPK + 1, lse_rows, mask=rmask)
    tl.store(DELTA + roff * NP + TOPK, delta_rows, mask=rmask)
    tl.store(DELTA + roff * NP + TOPK + 1, delta_rows, mask=rmask)


@triton.jit
def _piece_rows(loc, kvh, G, Lq, NP):
    """(query head, query row) of pieces with local index loc in their kv head's list."""
    hl = loc // (Lq * NP)
    qi = (loc // NP) % Lq
    return kvh * G + hl.to(tl.int64), qi.to(tl.int64)


@triton.jit
def _piece_block(Q, IDX, PLO, PHI, sqb, sqh, sqm, sqd, Hkv, G, Lq, NPAIR, NP,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_M consecutive pieces (sorted order) of kv group program_id(1):
    batch, kv head, index into the piece tables, extents, validity, query head and row, the
    query rows and the block's key range [lo_min, hi_max]."""
    grp = tl.program_id(1)
    b = (grp // Hkv).to(tl.int64)
    kvh = (grp % Hkv).to(tl.int64)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = r < NPAIR
    gbase = grp.to(tl.int64) * NPAIR
    loc = tl.load(IDX + gbase + r, mask=rm, other=0)
    gidx = gbase + loc.to(tl.int64)
    lo = tl.load(PLO + gidx, mask=rm, other=1)
    hi = tl.load(PHI + gidx, mask=rm, other=0)
    ok = rm & (hi >= lo)
    h64, qi = _piece_rows(loc, kvh, G, Lq, NP)
    offd = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h64[:, None] * sqh + qi[:, None] * sqm + offd[None, :] * sqd,
                mask=ok[:, None] & (offd[None, :] < D), other=0.0)
    lo_min = tl.min(tl.where(ok, lo, _BIGI), axis=0)
    hi_max = tl.max(tl.where(ok, hi, -1), axis=0)
    return b, kvh, gidx, lo, hi, ok, h64, qi, q, lo_min, hi_max


@triton.jit
def _stats_tile(ks, m_i, l_i, q, kbase, lo, hi, hi_max, KPM, b, skpb, skpn, skn, skd, qk_scale,
                D: tl.constexpr, HAS_KPM: tl.constexpr, IEEE: tl.constexpr,
                DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key tile of ``_stats_kernel``: the running (max, sum) of 2^s per piece."""
    s, keep, _, _ = _piece_tile(ks, q, kbase, lo, hi, hi_max, KPM, b, skpb, skpn, skn, skd,
                                qk_scale, D, HAS_KPM, IEEE, DOT_F32, BLOCK_N, BLOCK_D)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _stats_kernel(
    Q, K, KPM, IDX, PLO, PHI, LSE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    skpb, skpn,
    Hkv, G, Lq, NPAIR, NP, qk_scale,
    D: tl.constexpr, HAS_KPM: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
    PIPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Union mode: the log2-sum-exp of each of BLOCK_M consecutive pieces (sorted order) over
    its keys (q.k only, no values), written to LSE; pieces with no present key are not written."""
    b, kvh, gidx, lo, hi, ok, h64, qi, q, lo_min, hi_max = _piece_block(
        Q, IDX, PLO, PHI, sqb, sqh, sqm, sqd, Hkv, G, Lq, NPAIR, NP, D, BLOCK_M, BLOCK_D)
    kbase = K + b * skb + kvh * skh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    ks0 = (lo_min // BLOCK_N) * BLOCK_N
    if PIPE:  # module docstring
        for ks in range(ks0, hi_max + 1, BLOCK_N):
            m_i, l_i = _stats_tile(ks, m_i, l_i, q, kbase, lo, hi, hi_max, KPM, b, skpb, skpn,
                                   skn, skd, qk_scale, D, HAS_KPM, IEEE, DOT_F32, BLOCK_N,
                                   BLOCK_D)
    else:
        ks = ks0
        while ks <= hi_max:
            m_i, l_i = _stats_tile(ks, m_i, l_i, q, kbase, lo, hi, hi_max, KPM, b, skpb, skpn,
                                   skn, skd, qk_scale, D, HAS_KPM, IEEE, DOT_F32, BLOCK_N,
                                   BLOCK_D)
            ks += BLOCK_N
    lpos = l_i > 0
    tl.store(LSE + gidx, m_i + tl.log2(tl.where(lpos, l_i, 1.0)), mask=ok & lpos)


@triton.jit
def _union_rows_kernel(
    LSE, DELTA, DO, O,
    sdb, sdh, sdm, sdd,
    sob, soh, som, sod,
    Hq, Lq, NROWS,
    NP: tl.constexpr, KP: tl.constexpr, DV: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Union mode, BLOCK_R (batch, head, query) rows: the row's log-sum-exp over its pieces'
    (LSE, -inf for pieces that attend nothing) and delta = dO . out, written to every piece of
    the row (lse +inf where the row attends nothing)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < NROWS
    b = r // (Hq * Lq)
    h = (r // Lq) % Hq
    qi = r % Lq
    cols = tl.arange(0, KP)
    cm = rm[:, None] & (cols[None, :] < NP)
    off = r[:, None] * NP + cols[None, :]
    lp = tl.load(LSE + off, mask=cm, other=float("-inf"))
    mx = tl.max(lp, axis=1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    den = tl.sum(tl.exp2(lp - mx[:, None]), axis=1)
    lse = tl.where(den > 0, mx + tl.log2(tl.where(den > 0, den, 1.0)), float("inf"))
    offdv = tl.arange(0, BLOCK_DV)
    dm = rm[:, None] & (offdv[None, :] < DV)
    do = tl.load(DO + (b * sdb + h * sdh + qi * sdm)[:, None] + offdv[None, :] * sdd, mask=dm,
                 other=0.0).to(tl.float32)
    o = tl.load(O + (b * sob + h * soh + qi * som)[:, None] + offdv[None, :] * sod, mask=dm,
                other=0.0).to(tl.float32)
    delta = tl.sum(do * o, axis=1)
    zero = tl.zeros([BLOCK_R, KP], tl.float32)
    tl.store(LSE + off, zero + lse[:, None], mask=cm)
    tl.store(DELTA + off, zero + delta[:, None], mask=cm)


@triton.jit
def _dq_tile(ks, dq, q, do, lo, hi, hi_max, lse, delta, kbase, vbase, KPM, b, skpb, skpn, skn,
             skd, svn, svd, qk_scale, D: tl.constexpr, DV: tl.constexpr, HAS_KPM: tl.constexpr,
             IEEE: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One key tile of ``_dq_kernel``: dq += dS . K over the tile."""
    offd = tl.arange(0, BLOCK_D)
    offdv = tl.arange(0, BLOCK_DV)
    offn = ks + tl.arange(0, BLOCK_N)
    offn64 = offn.to(tl.int64)
    nmask = offn <= hi_max
    kt = tl.load(kbase + offn64[None, :] * skn + offd[:, None] * skd,
                 mask=nmask[None, :] & (offd[:, None] < D), other=0.0)  # [BD, BN]
    vt = tl.load(vbase + offn64[None, :] * svn + offdv[:, None] * svd,
                 mask=nmask[None, :] & (offdv[:, None] < DV), other=0.0)  # [BDV, BN]
    s = _mm(q, kt, IEEE, DOT_F32) * qk_scale
    keep = _piece_keep(offn, offn64, nmask, lo, hi, KPM, b, skpb, skpn, HAS_KPM)
    p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
    dp = _mm(do, vt, IEEE, DOT_F32)
    ds = p * (dp - delta[:, None])
    return dq + _mm(ds.to(kt.dtype), tl.trans(kt), IEEE, DOT_F32)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, KPM, IDX, PLO, PHI, LSE, DELTA, DQ,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    skpb, skpn,
    Hq, Hkv, G, Lq, NPAIR, NP, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, HAS_KPM: tl.constexpr, IEEE: tl.constexpr,
    DOT_F32: tl.constexpr, PIPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """BLOCK_M consecutive pieces (sorted order) of one kv head share one key range: dq of each
    piece, added atomically to its query row of DQ (fp32 [B, Hq, Lq, D])."""
    b, kvh, gidx, lo, hi, ok, h64, qi, q, lo_min, hi_max = _piece_block(
        Q, IDX, PLO, PHI, sqb, sqh, sqm, sqd, Hkv, G, Lq, NPAIR, NP, D, BLOCK_M, BLOCK_D)
    offd = tl.arange(0, BLOCK_D)
    offdv = tl.arange(0, BLOCK_DV)
    do = tl.load(DO + b * sdb + h64[:, None] * sdh + qi[:, None] * sdm + offdv[None, :] * sdd,
                 mask=ok[:, None] & (offdv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + gidx, mask=ok, other=float("inf"))
    delta = tl.load(DELTA + gidx, mask=ok, other=0.0)
    kbase = K + b * skb + kvh * skh
    vbase = V + b * svb + kvh * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ks0 = (lo_min // BLOCK_N) * BLOCK_N
    if PIPE:  # a pipelined for loop; the interpreter: a while loop (module docstring)
        for ks in range(ks0, hi_max + 1, BLOCK_N):
            dq = _dq_tile(ks, dq, q, do, lo, hi, hi_max, lse, delta, kbase, vbase, KPM, b, skpb,
                          skpn, skn, skd, svn, svd, qk_scale, D, DV, HAS_KPM, IEEE, DOT_F32,
                          BLOCK_N, BLOCK_D, BLOCK_DV)
    else:
        ks = ks0
        while ks <= hi_max:
            dq = _dq_tile(ks, dq, q, do, lo, hi, hi_max, lse, delta, kbase, vbase, KPM, b, skpb,
                          skpn, skn, skd, svn, svd, qk_scale, D, DV, HAS_KPM, IEEE, DOT_F32,
                          BLOCK_N, BLOCK_D, BLOCK_DV)
            ks += BLOCK_N
    rowoff = ((b * Hq + h64) * Lq + qi) * D
    tl.atomic_add(DQ + rowoff[:, None] + offd[None, :], dq * sm_scale,
                  mask=ok[:, None] & (offd[None, :] < D))


@triton.jit
def _dkdv_block(c, dk, dv, kt, vt, offn, present, n0, n1, Q, DO, IDX, PLO, PHI, LSE, DELTA,
                gbase, b, kvh, sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, G, Lq, NPAIR, NP,
                qk_scale, D: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr,
                DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """One block of ``_dkdv_kernel``: the sorted pieces [c, c + BLOCK_M) against the key tile."""
    offd = tl.arange(0, BLOCK_D)
    offdv = tl.arange(0, BLOCK_DV)
    r = c + tl.arange(0, BLOCK_M)
    rm = r < NPAIR
    loc = tl.load(IDX + gbase + r, mask=rm, other=0)
    gidx = gbase + loc.to(tl.int64)
    lo = tl.load(PLO + gidx, mask=rm, other=1)
    hi = tl.load(PHI + gidx, mask=rm, other=0)
    ok = rm & (hi >= lo) & (hi >= n0) & (lo <= n1)
    h64, qi = _piece_rows(loc, kvh, G, Lq, NP)
    q = tl.load(Q + b * sqb + h64[:, None] * sqh + qi[:, None] * sqm + offd[None, :] * sqd,
                mask=ok[:, None] & (offd[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdb + h64[:, None] * sdh + qi[:, None] * sdm + offdv[None, :] * sdd,
                 mask=ok[:, None] & (offdv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + gidx, mask=ok, other=float("inf"))
    delta = tl.load(DELTA + gidx, mask=ok, other=0.0)
    s = _mm(q, kt, IEEE, DOT_F32) * qk_scale  # [BM, BN]
    keep = ok[:, None] & (offn[None, :] >= lo[:, None]) & (offn[None, :] <= hi[:, None]) \
        & present[None, :]
    p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
    dp = _mm(do, vt, IEEE, DOT_F32)
    ds = p * (dp - delta[:, None])
    dv += _mm(tl.trans(p.to(do.dtype)), do, IEEE, DOT_F32)
    dk += _mm(tl.trans(ds.to(q.dtype)), q, IEEE, DOT_F32)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, KPM, IDX, PLO, PHI, LSE, DELTA, ITEMS, BLIST, DK, DV_,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    skpb, skpn,
    Hkv, G, Lq, T, NPAIR, NP, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, HAS_KPM: tl.constexpr, IEEE: tl.constexpr,
    DOT_F32: tl.constexpr, PIPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One work item (kv group, key tile, entries [j0, j1) of BLIST, the sorted-order blocks
    of BLOCK_M pieces that can touch the tile): dk, dv of the tile from those pieces, added
    atomically to DK/DV_ (fp32 [B, Hkv, T, D])."""
    w = tl.program_id(0).to(tl.int64)
    grp = tl.load(ITEMS + w * 4).to(tl.int64)
    n0 = tl.load(ITEMS + w * 4 + 1).to(tl.int32) * BLOCK_N
    j0 = tl.load(ITEMS + w * 4 + 2)
    j1 = tl.load(ITEMS + w * 4 + 3)
    b = grp // Hkv
    kvh = grp % Hkv
    offn = n0 + tl.arange(0, BLOCK_N)
    nmask = offn < T
    offn64 = offn.to(tl.int64)
    offd = tl.arange(0, BLOCK_D)
    offdv = tl.arange(0, BLOCK_DV)
    kbase = K + b * skb + kvh * skh
    vbase = V + b * svb + kvh * svh
    kt = tl.load(kbase + offn64[None, :] * skn + offd[:, None] * skd,
                 mask=nmask[None, :] & (offd[:, None] < D), other=0.0)  # [BD, BN]
    vt = tl.load(vbase + offn64[None, :] * svn + offdv[:, None] * svd,
                 mask=nmask[None, :] & (offdv[:, None] < DV), other=0.0)  # [BDV, BN]
    present = nmask
    if HAS_KPM:
        kp = tl.load(KPM + b * skpb + offn64 * skpn, mask=nmask, other=0)
        present = present & (kp != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    gbase = grp * NPAIR
    n1 = n0 + BLOCK_N - 1
    if PIPE:  # module docstring
        for j in range(j0, j1):
            c = tl.load(BLIST + j) * BLOCK_M
            dk, dv = _dkdv_block(c, dk, dv, kt, vt, offn, present, n0, n1, Q, DO, IDX, PLO, PHI,
                                 LSE, DELTA, gbase, b, kvh, sqb, sqh, sqm, sqd, sdb, sdh, sdm,
                                 sdd, G, Lq, NPAIR, NP, qk_scale, D, DV, IEEE, DOT_F32, BLOCK_M,
                                 BLOCK_D, BLOCK_DV)
    else:
        j = j0
        while j < j1:
            c = tl.load(BLIST + j) * BLOCK_M
            dk, dv = _dkdv_block(c, dk, dv, kt, vt, offn, present, n0, n1, Q, DO, IDX, PLO, PHI,
                                 LSE, DELTA, gbase, b, kvh, sqb, sqh, sqm, sqd, sdb, sdh, sdm,
                                 sdd, G, Lq, NPAIR, NP, qk_scale, D, DV, IEEE, DOT_F32, BLOCK_M,
                                 BLOCK_D, BLOCK_DV)
            j += 1
    tl.atomic_add(DK + (grp * T + offn64)[:, None] * D + offd[None, :], dk * sm_scale,
                  mask=nmask[:, None] & (offd[None, :] < D))
    tl.atomic_add(DV_ + (grp * T + offn64)[:, None] * DV + offdv[None, :], dv,
                  mask=nmask[:, None] & (offdv[None, :] < DV))


def _settings(dtype, Dmax, tuning=None):
    """Block sizes, warps and pipelining depths of the stats, dq and dk/dv kernels, then the
    call's ``tuning`` overrides (keys as below). H200 tunings at 128K (bf16, union fwd+bwd; benchmarks/RESULTS.md):
    kv_block_m=128 (231.9 ms against 261.6 ms with 64, earlier kernels); no software pipelining
    (154.9 ms against 162.8 ms with 2 stages for dq and dk/dv and 3 for stats, 185.0 ms with 3
    everywhere)."""
    small = dtype == torch.float32 or Dmax > 128
    s = dict(dq_block_m=32 if small else 64, dq_block_n=32 if small else 64, dq_warps=4,
             dq_stages=1, kv_block_m=32 if small else 128, kv_block_n=32 if small else 64,
             kv_warps=8 if Dmax >= 128 else 4, kv_stages=1, chunk=2048,
             st_block_m=32 if small else 64, st_block_n=32 if small else 64, st_warps=4,
             st_stages=1)
    unknown = set(tuning or {}) - set(s)
    if unknown:
        raise ValueError(f"span_attention_backward: unknown tuning key(s) {sorted(unknown)}; "
                         f"known: {sorted(s)}")
    s.update(tuning or {})
    return s


def piece_tables(anchors, pos, T, W, S, back, fwd, union, spans, B, Hq, Lq, device):
    """lo, hi int32 [B, Hq, Lq, topk + 2]: span pieces (slots < topk), window, sinks."""
    topk = anchors.shape[-1]
    if spans:
        plo, phi = TA.span_pieces_triton(anchors, pos, T, W, S, back, fwd, union)
    else:
        plo = torch.ones((B, Hq, Lq, topk), dtype=torch.int32, device=device)
        phi = torch.zeros_like(plo)
    if pos is None:
        t = (torch.arange(Lq, device=device, dtype=torch.int64) + (T - Lq)).expand(B, Lq)
    else:
        t = pos
    t = t[:, None, :].expand(B, Hq, Lq)
    wlo = torch.clamp(t - W + 1, min=S)
    whi = t if W > 0 else wlo - 1
    shi = torch.clamp(t + 1, max=S) - 1
    slo = torch.zeros_like(shi)
    lo = torch.cat([plo, wlo[..., None].int(), slo[..., None].int()], -1)
    hi = torch.cat([phi, whi[..., None].int(), shi[..., None].int()], -1)
    empty = hi < lo
    lo = torch.where(empty, 1, lo).to(torch.int32).contiguous()
    hi = torch.where(empty, 0, hi).to(torch.int32).contiguous()
    return lo, hi, plo, phi


def _key_major_work(lo, hi, idx, skey, T, S, NG, npair, cfg):
    """The dk/dv kernel's work: per kv group, key tiles of kv_block_n keys and blocks of
    kv_block_m consecutive sorted pieces. A tile's candidate pieces lie in one range [c0, c1)
    of the sorted order (lo bucket from that of tile start - longest piece + 1 to that of the
    tile end; sinks: the tiles below S); of the blocks overlapping it, those whose smallest lo
    and largest hi can reach the tile are the tile's work, in runs of at most chunk // kv_block_m
    blocks. Returns items int32 [n, 4] (group, tile, first, end into blist) and blist int32
    (block numbers)."""
    bm, bn = cfg["kv_block_m"], cfg["kv_block_n"]
    dev = lo.device
    ntile = triton.cdiv(T, bn)
    nblk = triton.cdiv(npair, bm)
    # smallest lo and largest hi of the present pieces of each block
    srt = idx.long()
    lo_s = lo.view(NG, npair).gather(1, srt)
    hi_s = hi.view(NG, npair).gather(1, srt)
    real = hi_s >= lo_s
    pad = nblk * bm - npair
    lo_b = torch.nn.functional.pad(torch.where(real, lo_s, T), (0, pad), value=T)
    hi_b = torch.nn.functional.pad(torch.where(real, hi_s, -1), (0, pad), value=-1)
    lo_b = lo_b.view(NG, nblk, bm).amin(-1)
    hi_b = hi_b.view(NG, nblk, bm).amax(-1)
    # candidate range per (group, tile), see TA.sort_keys
    maxlen = (hi.long() - lo.long() + 1).clamp(min=0).amax()  # device scalar
    n0 = torch.arange(ntile, device=dev, dtype=torch.int64) * bn
    n1 = torch.clamp(n0 + bn - 1, max=T - 1)
    lower = torch.where(n0 < S, n0 - (T + 1),
                        torch.clamp(n0 - maxlen + 1, min=0) // TA.BUCKET * (T + 1))
    upper = (n1 // TA.BUCKET + 1) * (T + 1)
    c0 = torch.searchsorted(skey, lower.expand(NG, ntile).contiguous()).reshape(-1)
    c1 = torch.searchsorted(skey, upper.expand(NG, ntile).contiguous()).reshape(-1)
    j0 = c0 // bm
    cnt = torch.where(c1 > c0, (c1 + bm - 1) // bm - j0, 0)
    ncand = int(cnt.sum().item())
    pair = torch.repeat_interleave(torch.arange(NG * ntile, device=dev), cnt, output_size=ncand)
    j = j0[pair] + torch.arange(ncand, device=dev) - (torch.cumsum(cnt, 0) - cnt)[pair]
    g, tile = pair // ntile, pair % ntile
    live = (lo_b[g, j] <= n1[tile]) & (hi_b[g, j] >= n0[tile])
    pair, j = pair[live], j[live]
    # runs of at most cb live blocks per (group, tile)
    cb = max(1, cfg["chunk"] // bm)
    nlive = torch.bincount(pair, minlength=NG * ntile)
    nch = (nlive + cb - 1) // cb
    total = int(nch.sum().item())
    item = torch.repeat_interleave(torch.arange(NG * ntile, device=dev), nch, output_size=total)
    sub = torch.arange(total, device=dev) - (torch.cumsum(nch, 0) - nch)[item]
    first = (torch.cumsum(nlive, 0) - nlive)[item]
    s0 = first + sub * cb
    s1 = torch.minimum(s0 + cb, first + nlive[item])
    items = torch.stack([item // ntile, item % ntile, s0, s1], 1).to(torch.int32).contiguous()
    return items, j.to(torch.int32).contiguous()


def span_attention_backward(grad_out, q, k, v, anchors, scores, key_padding_mask, query_positions,
                            window, sinks, span_power, backward_factor, forward_factor, combine,
                            scale, dense_below, out=None, tuning=None):
    """(dq, dk, dv, dscores) with the contract of ``autograd.span_attention_backward``. ``out``:
    the forward's output (union mode uses it for delta = dO . out; recomputed when None).
    ``tuning``: launch overrides for this call (benchmarks/train.py --tune-L): dq_block_m,
    dq_block_n, dq_warps, dq_stages, kv_block_m, kv_block_n, kv_warps, kv_stages, chunk (pieces
    per dk/dv work item at most), st_block_m, st_block_n, st_warps, st_stages (union statistics
    pass); *_stages: the software-pipelining depth of the kernel's main loop."""
    TA._check(q, k, v)
    B, Hq, Lq, D = q.shape
    Hkv, T, DV = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    G = Hq // Hkv
    topk = anchors.shape[-1]
    dsc = torch.zeros((B, Hq, Lq, topk), dtype=torch.float32, device=dev)
    if Lq == 0 or T == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dsc
    gated = combine == "gated"
    spans = T > dense_below
    if spans:
        W, S = min(window, T), min(sinks, T)
        back, fwd = span_extents(T, span_power, backward_factor, forward_factor, dev)
    else:  # dense: a window over every key
        W, S = T, 0
        back = fwd = torch.zeros(T, dtype=torch.int64, device=dev)
    gated = gated and spans
    do = grad_out.contiguous()
    kpm = key_padding_mask.to(torch.uint8) if key_padding_mask is not None else None
    pos = query_positions.long() if query_positions is not None else None
    BLOCK_D = max(16, TA.next_pow2(D))
    BLOCK_DV = max(16, TA.next_pow2(DV))
    ieee = q.dtype == torch.float32
    dot_f32 = TA._interpreted() and q.dtype == torch.bfloat16
    pipe = not TA._interpreted()
    qk_scale = float(scale) * math.log2(math.e)
    NP = topk + 2
    cfg = _settings(q.dtype, max(BLOCK_D, BLOCK_DV), tuning)
    kpm_arg = kpm if kpm is not None else back
    kpm_st = kpm.stride() if kpm is not None else (0, 0)
    lo, hi, plo, phi = piece_tables(anchors, pos, T, W, S, back, fwd, not gated, spans, B, Hq,
                                    Lq, dev)
    # 1. sort every kv head's pieces
    npair = G * Lq * NP
    skey, idx = torch.sort(TA.sort_keys(lo, hi, T).view(B * Hkv, npair), dim=-1)
    idx = idx.to(torch.int32)
    # 2. (lse, delta) per piece
    lse = torch.empty((B, Hq, Lq, NP), dtype=torch.float32, device=dev)
    delta = torch.empty((B, Hq, Lq, NP), dtype=torch.float32, device=dev)
    if gated:
        # the forward's span partials (its pairs kernel), then _prep_kernel
        plse, pout = TA.pair_partials(q, k, v, kpm, plo, phi, T, qk_scale)
        bm = min(32, max(16, TA.next_pow2(Lq)))
        _prep_kernel[(triton.cdiv(Lq, bm) * B * Hq,)](
            q, k, v, do, anchors, scores, kpm_arg, pos if pos is not None else back, back, fwd,
            plo, phi, plse, pout, lse, delta, dsc,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *anchors.stride(),
            *scores.stride(), *kpm_st, *(pos.stride() if pos is not None else (0, 0)),
            Hq, G, Lq, T, W, S, qk_scale,
            D=D, DV=DV, HAS_KPM=kpm is not None, HAS_POS=pos is not None, TOPK=topk,
            KP=max(2, TA.next_pow2(NP)), NP=NP, IEEE=ieee, DOT_F32=dot_f32, BLOCK_M=bm,
            BLOCK_N=64 if D <= 128 else 32, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, num_warps=4)
        del plse, pout
    else:
        # union: each piece's log-sum-exp (q.k only), merged per row; delta from the output
        if out is None:
            out = TA.span_attention(q, k, v, anchors, scores, key_padding_mask, query_positions,
                                    window, sinks, span_power, backward_factor, forward_factor,
                                    combine, scale, dense_below)
        lse.fill_(float("-inf"))
        _stats_kernel[(triton.cdiv(npair, cfg["st_block_m"]), B * Hkv)](
            q, k, kpm_arg, idx, lo, hi, lse,
            *q.stride(), *k.stride(), *kpm_st,
            Hkv, G, Lq, npair, NP, qk_scale,
            D=D, HAS_KPM=kpm is not None, IEEE=ieee, DOT_F32=dot_f32, PIPE=pipe,
            BLOCK_M=cfg["st_block_m"], BLOCK_N=cfg["st_block_n"], BLOCK_D=BLOCK_D,
            num_warps=cfg["st_warps"], num_stages=cfg["st_stages"])
        br = max(16, 8192 // BLOCK_DV)
        _union_rows_kernel[(triton.cdiv(B * Hq * Lq, br),)](
            lse, delta, do, out, *do.stride(), *out.stride(), Hq, Lq, B * Hq * Lq,
            NP=NP, KP=max(2, TA.next_pow2(NP)), DV=DV, BLOCK_R=br, BLOCK_DV=BLOCK_DV,
            num_warps=4)
    # 3. dq
    bm, bn = cfg["dq_block_m"], cfg["dq_block_n"]
    dq = torch.zeros((B, Hq, Lq, D), dtype=torch.float32, device=dev)
    _dq_kernel[(triton.cdiv(npair, bm), B * Hkv)](
        q, k, v, do, kpm_arg, idx, lo, hi, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *kpm_st,
        Hq, Hkv, G, Lq, npair, NP, qk_scale, float(scale),
        D=D, DV=DV, HAS_KPM=kpm is not None, IEEE=ieee, DOT_F32=dot_f32, PIPE=pipe, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, num_warps=cfg["dq_warps"],
        num_stages=cfg["dq_stages"])
    # 4. dk, dv: key-major work list
    dk = torch.zeros((B, Hkv, T, D), dtype=torch.float32, device=dev)
    dv = torch.zeros((B, Hkv, T, DV), dtype=torch.float32, device=dev)
    def dkdv_launch(cfg):
        items, blist = _key_major_work(lo, hi, idx, skey, T, S, B * Hkv, npair, cfg)
        if items.shape[0] > 0:
            _dkdv_kernel[(items.shape[0],)](
                q, k, v, do, kpm_arg, idx, lo, hi, lse, delta, items, blist, dk, dv,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *kpm_st,
                Hkv, G, Lq, T, npair, NP, qk_scale, float(scale),
                D=D, DV=DV, HAS_KPM=kpm is not None, IEEE=ieee, DOT_F32=dot_f32, PIPE=pipe,
                BLOCK_M=cfg["kv_block_m"], BLOCK_N=cfg["kv_block_n"], BLOCK_D=BLOCK_D,
                BLOCK_DV=BLOCK_DV, num_warps=cfg["kv_warps"], num_stages=cfg["kv_stages"])

    # a GPU with less shared memory than the key tile needs: half the pieces a tile (the launch
    # is refused before any atomic add runs)
    refit(dkdv_launch, cfg, lambda cfg, refusal: dict(cfg, kv_block_m=cfg["kv_block_m"] // 2)
          if cfg["kv_block_m"] > 16 else None)
    return dq, dk, dv, dsc
