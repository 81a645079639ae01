"""Triton kernels for step 1 of docs/spec.md: span-search (stripe scores and an in-register top-k).

One program owns a block of queries and all G query heads of one kv head, so each key row is read
once for the G heads. It walks the stripes in ascending order (nearest anchor first): for stripe i
every query t of the block reads the key row at its anchor a = t - delta_i; with bottom-right
positions these rows are contiguous, so the loads of a block are coalesced. Each (head, query)
keeps its best ``topk`` (score, anchor) pairs in registers; because stripes arrive nearest-first,
a candidate replaces the current worst only if its score is strictly greater, which gives the spec's
tie rule (the nearer anchor wins). The slots are sorted (descending score, nearer anchor first)
when written.

Two ways to form the scores:

* ``_span_search_dot_kernel`` (bf16/fp16, anchor key; the default): per stripe, the
  [G*16 rows, 16 keys] product Q . K[anchors]^T on the tensor cores, of which the entry of each
  row's own query is its score. 16x the necessary FLOPs, but products of bf16/fp16 values are
  exact in fp32 and the sums are fp32, as in the reference; measured 3.4-3.7x faster than the
  FMA path on the H200 (benchmarks/RESULTS.md).
* ``_span_search_kernel`` (fp32 inputs, the mean search key, many heads per kv head):
  elementwise products and fp32 sums on the CUDA cores.

Every rounding decision comes from the float64 tables of ``geometry.py`` (stripe offsets, span
extents), passed in as device tensors. No host synchronisation: the first usable stripe index is a
device scalar and the stripe loop is bounded inside the kernel, so the launch can be captured in a
CUDA graph.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
import torch

from .geometry import (check_search_inputs, keeps_no_span, next_pow2, no_span_outputs, num_stripes,
                       span_extents, stripe_deltas)
from . import searches

_BIG = tl.constexpr(2 ** 30)


@triton.jit
def _span_search_kernel(
    QS, K, KPM, POS, DELTAS, I0, BACK, FWD, PREF, CNT, A_OUT, S_OUT,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    skpb, skpn,
    spb, spm,
    spfb, spfh, spfn, spfd,
    scb, scn,
    sab, sah, sam, sak,
    Hkv, G, Lq, T, W, NSTR,
    D: tl.constexpr, HAS_KPM: tl.constexpr, HAS_POS: tl.constexpr, MEAN: tl.constexpr,
    TOPK: tl.constexpr, KP: tl.constexpr, GP: tl.constexpr, NS: tl.constexpr,
    Q_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program: BLOCK_M queries x the G query heads of one kv head (each key row read once)
    pid = tl.program_id(0)
    nqb = tl.cdiv(Lq, BLOCK_M)
    nbk = tl.num_programs(0) // nqb
    bk = pid % nbk
    qb = nqb - 1 - pid // nbk  # the longest query blocks start first
    b = (bk // Hkv).to(tl.int64)
    kvh = (bk % Hkv).to(tl.int64)

    hg = tl.arange(0, GP)
    hmask = hg < G
    h64 = (kvh * G + hg).to(tl.int64)
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Lq
    rows64 = rows.to(tl.int64)
    if HAS_POS:
        t = tl.load(POS + b * spb + rows64 * spm, mask=rmask, other=0).to(tl.int32)
    else:
        t = T - Lq + rows
    t = tl.where(rmask, t, 0)
    offd = tl.arange(0, BLOCK_D)
    dmask = offd < D
    q = tl.load(QS + b * sqb + h64[:, None, None] * sqh + rows64[None, :, None] * sqm
                + offd[None, None, :] * sqd,
                mask=hmask[:, None, None] & rmask[None, :, None] & dmask[None, None, :], other=0.0)
    if Q_F32:
        q = q.to(tl.float32)  # [GP, BLOCK_M, BLOCK_D]; else kept narrow (fewer registers)
    kbase = K + b * skb + kvh * skh

    if MEAN:
        back_t = tl.load(BACK + t, mask=rmask, other=0).to(tl.int32)
        fwd_t = tl.load(FWD + t, mask=rmask, other=0).to(tl.int32)
        pbase = PREF + b * spfb + kvh * spfh
        cbase = CNT + b * scb

    cols = tl.arange(0, KP)
    # slots past TOPK hold +inf so that they are never the worst slot
    ts = tl.where(cols[None, None, :] < TOPK, float("-inf"), float("inf")) + \
        tl.zeros([GP, BLOCK_M, KP], tl.float32)
    ta = tl.full([GP, BLOCK_M, KP], -1, tl.int32)

    tmax = tl.max(tl.where(rmask, t, -1), axis=0)
    i = tl.load(I0).to(tl.int32)
    dlt = tl.load(DELTAS + i, mask=i < NSTR, other=_BIG).to(tl.int32)
    while dlt <= tmax:
        for st in tl.static_range(NS):
            ds = tl.load(DELTAS + i + st, mask=i + st < NSTR, other=_BIG).to(tl.int32)
            a = t - ds
            ok = rmask & (a >= 0)
            a_c = tl.where(ok, a, 0)
            if HAS_KPM:
                kp = tl.load(KPM + b * skpb + a_c.to(tl.int64) * skpn, mask=ok, other=0)
                ok = ok & (kp != 0)
            if MEAN:
                lo = tl.maximum(a_c - back_t, 0).to(tl.int64)
                hi = tl.maximum(tl.minimum(a_c + fwd_t, t - W), 0).to(tl.int64)
                m2 = ok[:, None] & dmask[None, :]
                p_hi = tl.load(pbase + (hi + 1)[:, None] * spfn + offd[None, :] * spfd, mask=m2,
                               other=0.0)
                p_lo = tl.load(pbase + lo[:, None] * spfn + offd[None, :] * spfd, mask=m2,
                               other=0.0)
                c_hi = tl.load(cbase + (hi + 1) * scn, mask=ok, other=1.0)
                c_lo = tl.load(cbase + lo * scn, mask=ok, other=0.0)
                c = tl.maximum(c_hi - c_lo, 1.0)
                key = ((p_hi - p_lo) / c[:, None]).to(tl.float32)
            else:
                key = tl.load(kbase + a_c.to(tl.int64)[:, None] * skn + offd[None, :] * skd,
                              mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            s = tl.sum(q.to(tl.float32) * key[None, :, :], axis=2)  # [GP, BLOCK_M]
            s = tl.where(ok[None, :], s, float("-inf"))
            # worst slot: lowest score, then farthest anchor (smallest), then first column
            wmin = tl.min(ts, axis=2)
            is_min = ts == wmin[:, :, None]
            amin = tl.min(tl.where(is_min, ta, 2147483647), axis=2)
            cand = is_min & (ta == amin[:, :, None])
            wcol = tl.min(tl.where(cand, cols[None, None, :], KP), axis=2)
            repl = (cols[None, None, :] == wcol[:, :, None]) & (s > wmin)[:, :, None]
            ts = tl.where(repl, s[:, :, None], ts)
            ta = tl.where(repl, a[None, :, None], ta)
        i += NS
        dlt = tl.load(DELTAS + i, mask=i < NSTR, other=_BIG).to(tl.int32)

    # write the slots sorted by descending score, nearer (larger) anchor first among equals
    obase = b * sab + h64[:, None] * sah + rows64[None, :] * sam
    omask = hmask[:, None] & rmask[None, :]
    taken = cols[None, None, :] >= TOPK
    for j in tl.static_range(TOPK):
        sv = tl.where(taken, float("-inf"), ts)
        smax = tl.max(sv, axis=2)
        is_max = (sv == smax[:, :, None]) & (~taken)
        amax = tl.max(tl.where(is_max, ta, -2147483647), axis=2)
        cand = is_max & (ta == amax[:, :, None])
        pcol = tl.min(tl.where(cand, cols[None, None, :], KP), axis=2)
        pick = cols[None, None, :] == pcol[:, :, None]
        taken = taken | pick
        best_s = tl.sum(tl.where(pick, ts, 0.0), axis=2)
        best_a = tl.sum(tl.where(pick, ta, 0), axis=2)
        is_inf = (best_s == float("-inf")) | (best_s == float("inf"))
        best_a = tl.where(is_inf, -1, best_a)
        best_s = tl.where(pcol < KP, best_s, float("-inf"))
        tl.store(A_OUT + obase + j * sak, best_a.to(tl.int32), mask=omask)
        tl.store(S_OUT + obase + j * sak, best_s, mask=omask)


@triton.jit
def _span_search_dot_kernel(
    QS, K, KPM, POS, DELTAS, I0, A_OUT, S_OUT,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    skpb, skpn,
    spb, spm,
    sab, sah, sam, sak,
    Hkv, G, Lq, T, NSTR,
    D: tl.constexpr, HAS_KPM: tl.constexpr, HAS_POS: tl.constexpr, DOT_F32: tl.constexpr,
    TOPK: tl.constexpr, KP: tl.constexpr, GP: tl.constexpr, NS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Anchor-key search on the tensor cores (bf16/fp16: exact products, fp32 sums, like the
    reference). Rows r = (head h, query m) of one kv head; per stripe, S = Q[rows] . K[anchors]^T
    is a [GP*BLOCK_M, BLOCK_M] product whose entries (r, m(r)) are the scores; the other
    entries are wasted work (BLOCK_M x the FLOPs) traded for matrix-unit throughput."""
    pid = tl.program_id(0)
    nqb = tl.cdiv(Lq, BLOCK_M)
    nbk = tl.num_programs(0) // nqb
    bk = pid % nbk
    qb = nqb - 1 - pid // nbk
    b = (bk // Hkv).to(tl.int64)
    kvh = (bk % Hkv).to(tl.int64)

    r = tl.arange(0, GP * BLOCK_M)
    hl = r // BLOCK_M
    mr = r % BLOCK_M
    qrow = qb * BLOCK_M + mr
    rmask = (hl < G) & (qrow < Lq)
    h64 = kvh * G + hl.to(tl.int64)
    if HAS_POS:
        t = tl.load(POS + b * spb + qrow.to(tl.int64) * spm, mask=rmask, other=0).to(tl.int32)
    else:
        t = T - Lq + qrow
    t = tl.where(rmask, t, 0)
    # the key side: one row per query of the block
    mk = tl.arange(0, BLOCK_M)
    kq = qb * BLOCK_M + mk
    kmask = kq < Lq
    if HAS_POS:
        tk = tl.load(POS + b * spb + kq.to(tl.int64) * spm, mask=kmask, other=0).to(tl.int32)
    else:
        tk = T - Lq + kq
    tk = tl.where(kmask, tk, 0)
    offd = tl.arange(0, BLOCK_D)
    dmask = offd < D
    q = tl.load(QS + b * sqb + h64[:, None] * sqh + qrow.to(tl.int64)[:, None] * sqm
                + offd[None, :] * sqd, mask=rmask[:, None] & dmask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    kbase = K + b * skb + kvh * skh
    diag = mr[:, None] == mk[None, :]

    cols = tl.arange(0, KP)
    ts = tl.where(cols[None, :] < TOPK, float("-inf"), float("inf")) + tl.zeros([GP * BLOCK_M, KP], tl.float32)
    ta = tl.full([GP * BLOCK_M, KP], -1, tl.int32)
    tmax = tl.max(tl.where(kmask, tk, -1), axis=0)
    i = tl.load(I0).to(tl.int32)
    dlt = tl.load(DELTAS + i, mask=i < NSTR, other=_BIG).to(tl.int32)
    while dlt <= tmax:
        for st in tl.static_range(NS):
            ds = tl.load(DELTAS + i + st, mask=i + st < NSTR, other=_BIG).to(tl.int32)
            ak = tk - ds
            okk = kmask & (ak >= 0)
            akc = tl.where(okk, ak, 0)
            key = tl.load(kbase + akc.to(tl.int64)[:, None] * skn + offd[None, :] * skd,
                          mask=okk[:, None] & dmask[None, :], other=0.0)
            if DOT_F32:
                sfull = tl.dot(q, tl.trans(key.to(tl.float32)), input_precision="ieee")
            else:
                sfull = tl.dot(q, tl.trans(key))
            s = tl.sum(tl.where(diag, sfull, 0.0), axis=1)  # one score per row
            a = t - ds
            ok = rmask & (a >= 0)
            if HAS_KPM:
                kp = tl.load(KPM + b * skpb + tl.where(ok, a, 0).to(tl.int64) * skpn, mask=ok,
                             other=0)
                ok = ok & (kp != 0)
            s = tl.where(ok, s, float("-inf"))
            wmin = tl.min(ts, axis=1)
            is_min = ts == wmin[:, None]
            amin = tl.min(tl.where(is_min, ta, 2147483647), axis=1)
            cand = is_min & (ta == amin[:, None])
            wcol = tl.min(tl.where(cand, cols[None, :], KP), axis=1)
            repl = (cols[None, :] == wcol[:, None]) & (s > wmin)[:, None]
            ts = tl.where(repl, s[:, None], ts)
            ta = tl.where(repl, a[:, None], ta)
        i += NS
        dlt = tl.load(DELTAS + i, mask=i < NSTR, other=_BIG).to(tl.int32)

    obase = b * sab + h64 * sah + qrow.to(tl.int64) * sam
    taken = cols[None, :] >= TOPK
    for j in tl.static_range(TOPK):
        sv = tl.where(taken, float("-inf"), ts)
        smax = tl.max(sv, axis=1)
        is_max = (sv == smax[:, None]) & (~taken)
        amax = tl.max(tl.where(is_max, ta, -2147483647), axis=1)
        cand = is_max & (ta == amax[:, None])
        pcol = tl.min(tl.where(cand, cols[None, :], KP), axis=1)
        pick = cols[None, :] == pcol[:, None]
        taken = taken | pick
        best_s = tl.sum(tl.where(pick, ts, 0.0), axis=1)
        best_a = tl.sum(tl.where(pick, ta, 0), axis=1)
        is_inf = (best_s == float("-inf")) | (best_s == float("inf"))
        best_a = tl.where(is_inf, -1, best_a)
        best_s = tl.where(pcol < KP, best_s, float("-inf"))
        tl.store(A_OUT + obase + j * sak, best_a.to(tl.int32), mask=rmask)
        tl.store(S_OUT + obase + j * sak, best_s, mask=rmask)


# Measured on the H200 (benchmarks/RESULTS.md, 2026-11-28): 3.4-3.7x faster than the FMA path at
# 128K-1M with identical anchors; the FMA path stays for fp32 inputs and the mean search key.
DOT_SEARCH_DEFAULT = True


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"



def span_search(qs, k, key_padding_mask, query_positions, window, topk, search_power,
                span_power, backward_factor, forward_factor, search_key, dense_below,
                block_m: int = 16, num_warps: int = 4, stripes_per_iter: int = 4,
                q_f32: bool = True, use_dot=None):
    """Same contract as ``reference.span_search``."""
    B, Hq, Lq, D = qs.shape
    Hkv, T = k.shape[1], k.shape[2]
    dev = qs.device
    check_search_inputs("span_search", Hq, Hkv, topk, search_key, searches.names(family="stripe"),
                        max_topk=8)
    W = min(window, T)
    if keeps_no_span(T, window, dense_below, Lq):
        return no_span_outputs(B, Hq, Lq, topk, dev)
    anchors = torch.empty((B, Hq, Lq, topk), dtype=torch.int32, device=dev)
    scores = torch.empty((B, Hq, Lq, topk), dtype=torch.float32, device=dev)
    n = num_stripes(T, search_power)
    deltas = stripe_deltas(n, search_power, dev)
    i0 = (deltas < W).sum().reshape(1)  # device scalar: first stripe past the window
    mean = searches.kind(search_key).stripe_key == "mean"
    if mean:
        back, fwd = span_extents(T, span_power, backward_factor, forward_factor, dev)
        kf = k.double()
        if key_padding_mask is not None:
            kf = kf * key_padding_mask[:, None, :, None]
        pref = torch.zeros(B, Hkv, T + 1, D, dtype=torch.float64, device=dev)
        pref[:, :, 1:] = torch.cumsum(kf, dim=2)
        ones = key_padding_mask.double() if key_padding_mask is not None else \
            torch.ones(B, T, dtype=torch.float64, device=dev)
        cnt = torch.zeros(B, T + 1, dtype=torch.float64, device=dev)
        cnt[:, 1:] = torch.cumsum(ones, dim=1)
    else:
        back = fwd = deltas  # unused
        pref = torch.zeros(1, 1, 1, 1, dtype=torch.float64, device=dev)
        cnt = torch.zeros(1, 1, dtype=torch.float64, device=dev)
    kpm = key_padding_mask.to(torch.uint8) if key_padding_mask is not None else None
    pos = query_positions.long() if query_positions is not None else None
    dummy = deltas
    G = Hq // Hkv
    GP = next_pow2(G)
    if use_dot is None:  # tensor cores for narrow dtypes; fp32 stays exact on the FMA path
        use_dot = DOT_SEARCH_DEFAULT
    if use_dot and not mean and qs.dtype in (torch.bfloat16, torch.float16) and \
            qs.dtype == k.dtype and GP <= 8:
        BMd = 16
        grid = (triton.cdiv(Lq, BMd) * B * Hkv,)
        _span_search_dot_kernel[grid](
            qs, k, kpm if kpm is not None else dummy, pos if pos is not None else dummy,
            deltas, i0, anchors, scores,
            *qs.stride(), *k.stride(),
            *(kpm.stride() if kpm is not None else (0, 0)),
            *(pos.stride() if pos is not None else (0, 0)),
            *anchors.stride(),
            Hkv, G, Lq, T, n,
            D=D, HAS_KPM=kpm is not None, HAS_POS=pos is not None,
            DOT_F32=_interpreted() and qs.dtype == torch.bfloat16,
            TOPK=topk, KP=max(2, next_pow2(topk)), GP=GP, NS=stripes_per_iter,
            BLOCK_M=BMd, BLOCK_D=max(16, next_pow2(D)), num_warps=num_warps,
        )
        return anchors, scores
    BM = max(1, min(block_m, next_pow2(Lq), max(1, 64 // GP)))
    BLOCK_D = max(16, next_pow2(D))
    if GP * BM * BLOCK_D > 8192:
        num_warps = max(num_warps, 8)
    grid = (triton.cdiv(Lq, BM) * B * Hkv,)
    _span_search_kernel[grid](
        qs, k, kpm if kpm is not None else dummy, pos if pos is not None else dummy,
        deltas, i0, back, fwd, pref, cnt, anchors, scores,
        *qs.stride(), *k.stride(),
        *(kpm.stride() if kpm is not None else (0, 0)),
        *(pos.stride() if pos is not None else (0, 0)),
        *pref.stride(), *cnt.stride(), *anchors.stride(),
        Hkv, G, Lq, T, W, n,
        D=D, HAS_KPM=kpm is not None, HAS_POS=pos is not None, MEAN=mean,
        TOPK=topk, KP=max(2, next_pow2(topk)), GP=GP, NS=stripes_per_iter,
        Q_F32=bool(q_f32) or qs.dtype == torch.float32, BLOCK_M=BM,
        BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )
    return anchors, scores
