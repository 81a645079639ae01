"""Triton kernels for decoding: span-search and span-attention for a few queries over a long cache.

The prefill kernels (``triton_search``, ``triton_attention``) give one program a block of queries;
with one query per sequence (a decode step) that is one program per kv head or query head, a few
dozen programs walking O(sqrt(T)) stripes and O(sqrt(T)) keys each, and most of the GPU idles.
Here the work of every (query, head) is split into many programs and merged exactly:

* search (``_search_part_kernel``): one program per (chunk of ``BS`` stripes, query, kv head),
  scoring its stripes for the G query heads of that kv head (each key row read once) and keeping a
  local top-k; ``_search_merge_kernel`` takes the top-k of all chunks' candidates per (query,
  head). A top-k of local top-k's is the global top-k; ties go to the nearer (larger) anchor at
  both levels, as in docs/spec.md.
* attention (``_attend_part_kernel``): the keys a (query, head) attends are cut into segments
  (sinks, window, then one per kept span: in ``union`` mode the spans made disjoint, each minus
  the ones that start before it), and every segment into chunks of ``BN`` keys; one program per
  (chunk, query, head) writes the chunk's softmax partial (max, sum of exponentials, weighted sum
  of values, fp32). ``_attend_merge_kernel`` merges them by log-sum-exp: one softmax over all
  chunks (``union``), or per span j over sinks ∪ window ∪ span_j mixed by softmax(search scores)
  (``gated``). Dense attention (T <= dense_below) is the same kernel with a window over every key.

The number of programs depends only on shapes (T, Lq, heads) and the config, never on data, and no
value is read back to the host, so a decode step can be captured in a CUDA graph
(``torch.compile(..., mode="reduce-overhead")`` with a static cache). The geometry tables of
``geometry.py`` (stripe offsets, span extents) are built once per power-of-two bucket of T and
reused (outside a graph capture), so a step launches four kernels and allocates its buffers.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .geometry import (check_search_inputs, keeps_no_span, next_pow2, no_span_outputs, num_stripes,
                       span_extents, stripe_deltas)
from . import searches

_BIG = tl.constexpr(2 ** 30)

DECODE_ROWS = 16
"""The decode kernels run when Lq * (Hq / Hkv) <= DECODE_ROWS (query rows per kv head)."""


def use_decode(q: torch.Tensor, k: torch.Tensor) -> bool:
    Lq, Hq, Hkv = q.shape[2], q.shape[1], k.shape[1]
    return 0 < Lq and Hkv > 0 and Lq * (Hq // Hkv) <= DECODE_ROWS



# --------------------------------------------------------------------------------------------
# geometry tables, cached per power-of-two bucket (entries past T are never read by a query < T)
# --------------------------------------------------------------------------------------------

_TABLES: dict = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _deltas(T: int, p: float, device):
    n = next_pow2(num_stripes(T, p))
    key = ("deltas", n, float(p), str(device))
    t = _TABLES.get(key)
    if t is None:
        t = stripe_deltas(n, p, device)
        if not _capturing(torch.device(device)):  # a table built in a capture holds no values yet
            _TABLES[key] = t
    return t


def _extents(T: int, r: float, bf: float, ff: float, device):
    n = next_pow2(max(T, 1))
    key = ("extents", n, float(r), float(bf), float(ff), str(device))
    t = _TABLES.get(key)
    if t is None:
        t = span_extents(n, r, bf, ff, device)
        if not _capturing(torch.device(device)):
            _TABLES[key] = t
    return t


# --------------------------------------------------------------------------------------------
# span-search
# --------------------------------------------------------------------------------------------

@triton.jit
def _query_position(POS, b, qi, spb, spm, T, Lq, HAS_POS: tl.constexpr):
    if HAS_POS:
        t = tl.load(POS + b * spb + qi * spm).to(tl.int32)
    else:
        t = (T - Lq + qi).to(tl.int32)
    return t


@triton.jit
def _search_part_kernel(
    QS, K, KPM, POS, DELTAS, CS, CA,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    skpb, skpn,
    spb, spm,
    Hkv, G, Lq, T, W, NSTR, NC,
    D: tl.constexpr, HAS_KPM: tl.constexpr, HAS_POS: tl.constexpr, TOPK: tl.constexpr,
    GP: tl.constexpr, BS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    c = tl.program_id(0)  # chunk of stripes
    r = tl.program_id(1)  # (b, kv head, query)
    qi = (r % Lq).to(tl.int64)
    bk = r // Lq
    kvh = (bk % Hkv).to(tl.int64)
    b = (bk // Hkv).to(tl.int64)
    t = _query_position(POS, b, qi, spb, spm, T, Lq, HAS_POS)

    idx = c * BS + tl.arange(0, BS)
    dl = tl.load(DELTAS + idx, mask=idx < NSTR, other=_BIG).to(tl.int32)
    a = t - dl
    ok = (idx < NSTR) & (dl >= W) & (a >= 0)
    a_c = tl.where(ok, a, 0).to(tl.int64)
    if HAS_KPM:
        kp = tl.load(KPM + b * skpb + a_c * skpn, mask=ok, other=0)
        ok = ok & (kp != 0)

    hg = tl.arange(0, GP)
    h64 = kvh * G + hg
    offd = tl.arange(0, BLOCK_D)
    dmask = offd < D
    q = tl.load(QS + b * sqb + h64[:, None] * sqh + qi * sqm + offd[None, :] * sqd,
                mask=(hg < G)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    key = tl.load(K + b * skb + kvh * skh + a_c[:, None] * skn + offd[None, :] * skd,
                  mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    s = tl.sum(q[:, None, :] * key[None, :, :], axis=2)  # [GP, BS]
    s = tl.where(ok[None, :], s, float("-inf"))

    # local top-k: highest score, the nearer (larger) anchor among equal scores
    rows = (b * Hkv * G + h64) * Lq + qi  # flat (b, head, query)
    obase = rows * NC + c * TOPK
    for j in tl.static_range(TOPK):
        m = tl.max(s, axis=1)
        is_m = (s == m[:, None]) & (m[:, None] > float("-inf"))
        ab = tl.max(tl.where(is_m, a[None, :], -1), axis=1)
        tl.store(CS + obase + j, m, mask=hg < G)
        tl.store(CA + obase + j, ab, mask=hg < G)
        s = tl.where(is_m & (a[None, :] == ab[:, None]), float("-inf"), s)


@triton.jit
def _search_merge_kernel(CS, CA, A_OUT, S_OUT, NC, TOPK: tl.constexpr, CP: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, CP)
    s = tl.load(CS + r * NC + idx, mask=idx < NC, other=float("-inf"))
    a = tl.load(CA + r * NC + idx, mask=idx < NC, other=-1)
    for j in tl.static_range(TOPK):
        m = tl.max(s, axis=0)
        is_m = (s == m) & (s > float("-inf"))
        ab = tl.max(tl.where(is_m, a, -1), axis=0)
        tl.store(S_OUT + r * TOPK + j, m)
        tl.store(A_OUT + r * TOPK + j, ab)
        s = tl.where(is_m & (a == ab), float("-inf"), s)


def span_search(qs, k, key_padding_mask, query_positions, window, topk, search_power,
                span_power, backward_factor, forward_factor, search_key, dense_below,
                block_stripes: int = 16, num_warps: int = 4):
    """Same contract as ``reference.span_search`` for ``search_key="anchor"``."""
    B, Hq, Lq, D = qs.shape
    Hkv, T = k.shape[1], k.shape[2]
    dev = qs.device
    check_search_inputs("span_search (decode)", Hq, Hkv, topk, search_key,
                        searches.names(stripe_key="anchor"), max_topk=8)
    W = min(window, T)
    if keeps_no_span(T, window, dense_below, Lq):
        return no_span_outputs(B, Hq, Lq, topk, dev)
    deltas = _deltas(T, search_power, dev)
    nstr = num_stripes(T, search_power)  # stripes past this bound have delta > T - 1
    BS = block_stripes
    nsc = triton.cdiv(nstr, BS)
    NC = nsc * topk
    G = Hq // Hkv
    rows = B * Hq * Lq
    cs = torch.empty((rows, NC), dtype=torch.float32, device=dev)
    ca = torch.empty((rows, NC), dtype=torch.int32, device=dev)
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    pos = query_positions if query_positions is not None else None
    _search_part_kernel[(nsc, B * Hkv * Lq)](
        qs, k, kpm if kpm is not None else deltas, pos if pos is not None else deltas, deltas,
        cs, ca,
        *qs.stride(), *k.stride(),
        *(kpm.stride() if kpm is not None else (0, 0)),
        *(pos.stride() if pos is not None else (0, 0)),
        Hkv, G, Lq, T, W, nstr, NC,
        D=D, HAS_KPM=kpm is not None, HAS_POS=pos is not None, TOPK=topk, GP=next_pow2(G),
        BS=BS, BLOCK_D=max(16, next_pow2(D)), num_warps=num_warps,
    )
    anchors = torch.empty((B, Hq, Lq, topk), dtype=torch.int32, device=dev)
    scores = torch.empty((B, Hq, Lq, topk), dtype=torch.float32, device=dev)
    _search_merge_kernel[(rows,)](cs, ca, anchors, scores, NC, TOPK=topk,
                                  CP=max(16, next_pow2(NC)), num_warps=4)
    return anchors, scores


# --------------------------------------------------------------------------------------------
# span-attention
# --------------------------------------------------------------------------------------------

@triton.jit
def _attend_part_kernel(
    Q, K, V, ANCH, KPM, POS, BACK, FWD, PM, PL, PO,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sab, sah, sam, sak,
    skpb, skpn,
    spb, spm,
    Hq, G, Lq, T, W, S, qk_scale, NSK, NWC, NPC, NCH,
    D: tl.constexpr, DV: tl.constexpr, HAS_KPM: tl.constexpr, HAS_POS: tl.constexpr,
    TOPK: tl.constexpr, KP: tl.constexpr, UNION: tl.constexpr, BN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    c = tl.program_id(0)  # chunk: [sinks chunks | window chunks | span 0 chunks | span 1 ... ]
    r = tl.program_id(1)  # flat (b, query head, query)
    qi = (r % Lq).to(tl.int64)
    bh = r // Lq
    h = (bh % Hq).to(tl.int64)
    b = (bh // Hq).to(tl.int64)
    kvh = h // G
    t = _query_position(POS, b, qi, spb, spm, T, Lq, HAS_POS)

    # the segment [lo, hi] this chunk belongs to, and the chunk's index inside it
    in_sk = c < NSK
    lo = tl.where(in_sk, 0, tl.maximum(S, t - W + 1))
    hi = tl.where(in_sk, tl.minimum(S, t + 1) - 1, t)
    cc = tl.where(in_sk, c, c - NSK)
    if TOPK > 0:  # span j: [max(a - back, S), min(a + fwd, t - W)]
        cs = c - NSK - NWC
        in_sp = cs >= 0
        j = tl.maximum(cs, 0) // NPC
        slot = tl.arange(0, KP)
        abase = ANCH + b * sab + h * sah + qi * sam
        aa = tl.load(abase + slot * sak, mask=slot < TOPK, other=-1).to(tl.int32)
        back = tl.load(BACK + t).to(tl.int32)
        fwd = tl.load(FWD + t).to(tl.int32)
        los = tl.maximum(aa - back, S)
        his = tl.minimum(aa + fwd, t - W)
        oks = (aa >= 0) & (his >= los)
        lo_j = tl.sum(tl.where(slot == j, los, 0), axis=0)
        hi_j = tl.sum(tl.where(slot == j, his, 0), axis=0)
        ok_j = tl.sum(tl.where((slot == j) & oks, 1, 0), axis=0) > 0
        if UNION:  # minus the spans that start before it (ties: lower slot first)
            before = oks & ((los < lo_j) | ((los == lo_j) & (slot < j)))
            prev = tl.max(tl.where(before, his, -1), axis=0)
            lo_j = tl.maximum(lo_j, prev + 1)
        lo = tl.where(in_sp, lo_j, lo)
        hi = tl.where(in_sp, tl.where(ok_j, hi_j, lo_j - 1), hi)
        cc = tl.where(in_sp, cs - j * NPC, cc)

    offs = lo + cc * BN + tl.arange(0, BN)
    keep = (offs <= hi) & (offs >= 0) & (offs < T)
    offs64 = tl.where(keep, offs, 0).to(tl.int64)
    if HAS_KPM:
        kp = tl.load(KPM + b * skpb + offs64 * skpn, mask=keep, other=0)
        keep = keep & (kp != 0)
    offd = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + qi * sqm + offd * sqd, mask=offd < D, other=0.0).to(tl.float32)
    kt = tl.load(K + b * skb + kvh * skh + offs64[:, None] * skn + offd[None, :] * skd,
                 mask=keep[:, None] & (offd[None, :] < D), other=0.0).to(tl.float32)
    s = tl.sum(kt * q[None, :], axis=1) * qk_scale  # log2 domain
    s = tl.where(keep, s, float("-inf"))
    m = tl.max(s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s - m_safe)
    l = tl.sum(p, axis=0)
    offdv = tl.arange(0, BLOCK_DV)
    vt = tl.load(V + b * svb + kvh * svh + offs64[:, None] * svn + offdv[None, :] * svd,
                 mask=keep[:, None] & (offdv[None, :] < DV), other=0.0).to(tl.float32)
    acc = tl.sum(p[:, None] * vt, axis=0)
    base = r.to(tl.int64) * NCH + c
    tl.store(PM + base, m)
    tl.store(PL + base, l)
    tl.store(PO + base * DV + offdv, acc, mask=offdv < DV)


@triton.jit
def _merge_range(PM, PL, PO, base, c0, c1, m_i, l_i, acc, offdv, DV: tl.constexpr, CB: tl.constexpr):
    """Fold the partials of chunks [c0, c1) into (m_i, l_i, acc), CB chunks per step (the loads
    of a step are independent, so their latencies overlap)."""
    c = c0
    while c < c1:
        cc = c + tl.arange(0, CB)
        cm = cc < c1
        mc = tl.load(PM + base + cc, mask=cm, other=float("-inf"))
        lc = tl.load(PL + base + cc, mask=cm, other=0.0)
        oc = tl.load(PO + (base + cc)[:, None] * DV + offdv[None, :],
                     mask=cm[:, None] & (offdv[None, :] < DV), other=0.0)
        m_new = tl.maximum(m_i, tl.max(mc, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a1 = tl.exp2(m_i - m_safe)
        w = tl.exp2(mc - m_safe)  # 0 for empty chunks (m = -inf)
        l_i = l_i * a1 + tl.sum(lc * w, axis=0)
        acc = acc * a1 + tl.sum(oc * w[:, None], axis=0)
        m_i = m_new
        c += CB
    return m_i, l_i, acc


@triton.jit
def _attend_merge_kernel(
    PM, PL, PO, ANCH, SCO, O,
    sab, sah, sam, sak,
    ssb, ssh, ssm, ssk,
    sob, soh, som, sod,
    Hq, Lq, NSK, NWC, NPC, NCH,
    DV: tl.constexpr, TOPK: tl.constexpr, GATED: tl.constexpr, BLOCK_DV: tl.constexpr,
    CB: tl.constexpr,
):
    r = tl.program_id(0)
    qi = (r % Lq).to(tl.int64)
    bh = r // Lq
    h = (bh % Hq).to(tl.int64)
    b = (bh // Hq).to(tl.int64)
    base = r.to(tl.int64) * NCH
    offdv = tl.arange(0, BLOCK_DV)
    m0 = tl.full([], float("-inf"), tl.float32)
    l0 = tl.zeros([], tl.float32)
    a0 = tl.zeros([BLOCK_DV], tl.float32)
    if GATED:
        # sinks ∪ window, shared by every span's softmax
        m_b, l_b, acc_b = _merge_range(PM, PL, PO, base, 0, NSK + NWC, m0, l0, a0, offdv, DV, CB)
        gmax = tl.full([], float("-inf"), tl.float32)
        for j in tl.static_range(TOPK):
            aj = tl.load(ANCH + b * sab + h * sah + qi * sam + j * sak)
            sj = tl.load(SCO + b * ssb + h * ssh + qi * ssm + j * ssk)
            gmax = tl.maximum(gmax, tl.where(aj >= 0, sj, float("-inf")))
        gsum = tl.zeros([], tl.float32)
        out = tl.zeros([BLOCK_DV], tl.float32)
        for j in tl.static_range(TOPK):
            aj = tl.load(ANCH + b * sab + h * sah + qi * sam + j * sak)
            sj = tl.load(SCO + b * ssb + h * ssh + qi * ssm + j * ssk)
            gj = tl.where(aj >= 0, tl.exp(sj - gmax), 0.0)
            c0 = NSK + NWC + j * NPC
            m_j, l_j, acc_j = _merge_range(PM, PL, PO, base, c0, c0 + NPC, m_b, l_b, acc_b, offdv, DV, CB)
            out += gj * (acc_j / tl.where(l_j > 0, l_j, 1.0))
            gsum += gj
        plain = acc_b / tl.where(l_b > 0, l_b, 1.0)
        out = tl.where(gsum > 0, out / tl.where(gsum > 0, gsum, 1.0), plain)
    else:
        m_i, l_i, acc = _merge_range(PM, PL, PO, base, 0, NCH, m0, l0, a0, offdv, DV, CB)
        out = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(O + b * sob + h * soh + qi * som + offdv * sod, out.to(O.dtype.element_ty),
             mask=offdv < DV)


def _attend(q, k, v, anchors, scores, key_padding_mask, query_positions, W, S, back, fwd, NPC,
            gated, scale, block_n, num_warps):
    B, Hq, Lq, D = q.shape
    Hkv, T, DV = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    out = torch.empty((B, Hq, Lq, DV), dtype=q.dtype, device=dev)
    BN = block_n
    NSK, NWC = triton.cdiv(S, BN), triton.cdiv(W, BN)
    topk = anchors.shape[-1] if NPC > 0 else 0
    NCH = NSK + NWC + topk * NPC
    rows = B * Hq * Lq
    pm = torch.empty((rows, NCH), dtype=torch.float32, device=dev)
    pl = torch.empty((rows, NCH), dtype=torch.float32, device=dev)
    po = torch.empty((rows, NCH, DV), dtype=torch.float32, device=dev)
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    pos = query_positions
    BLOCK_D, BLOCK_DV = max(16, next_pow2(D)), max(16, next_pow2(DV))
    _attend_part_kernel[(NCH, rows)](
        q, k, v, anchors, kpm if kpm is not None else back, pos if pos is not None else back,
        back, fwd, pm, pl, po,
        *q.stride(), *k.stride(), *v.stride(), *anchors.stride(),
        *(kpm.stride() if kpm is not None else (0, 0)),
        *(pos.stride() if pos is not None else (0, 0)),
        Hq, Hq // Hkv, Lq, T, W, S, float(scale) * math.log2(math.e), NSK, NWC, NPC, NCH,
        D=D, DV=DV, HAS_KPM=kpm is not None, HAS_POS=pos is not None, TOPK=topk,
        KP=max(2, next_pow2(max(topk, 1))), UNION=not gated, BN=BN, BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV, num_warps=num_warps,
    )
    _attend_merge_kernel[(rows,)](
        pm, pl, po, anchors, scores, out,
        *anchors.stride(), *scores.stride(), *out.stride(),
        Hq, Lq, NSK, NWC, NPC, NCH,
        DV=DV, TOPK=topk, GATED=bool(gated) and topk > 0, BLOCK_DV=BLOCK_DV,
        CB=min(32, max(2, next_pow2(NCH))), num_warps=4,
    )
    return out


def dense_attention(q, k, v, key_padding_mask, query_positions, scale, block_n: int = 64,
                    num_warps: int = 4):
    """Exact causal attention of a few queries (flash-decoding: the keys split across programs)."""
    B, Hq, Lq, _ = q.shape
    T = k.shape[2]
    none = torch.full((1, 1, 1, 1), -1, dtype=torch.int32, device=q.device).expand(B, Hq, Lq, 1)
    nos = torch.full((1, 1, 1, 1), float("-inf"), dtype=torch.float32, device=q.device).expand(B, Hq, Lq, 1)
    zeros = torch.zeros(1, dtype=torch.int64, device=q.device)
    return _attend(q, k, v, none, nos, key_padding_mask, query_positions, max(T, 1), 0, zeros, zeros,
                   0, False, scale, block_n, num_warps)


def span_attention(q, k, v, anchors, scores, key_padding_mask, query_positions, window, sinks,
                   span_power, backward_factor, forward_factor, combine, scale, dense_below,
                   block_n: int = 64, num_warps: int = 4):
    """Same contract as ``reference.span_attention`` (the T <= dense_below case included); the
    caller (``triton_impl``) has validated shapes and dtypes."""
    if combine not in ("union", "gated"):
        raise ValueError(f"span_attention: combine={combine!r} is not 'union' or 'gated'")
    B, Hq, Lq, _ = q.shape
    T = k.shape[2]
    if T <= dense_below:
        return dense_attention(q, k, v, key_padding_mask, query_positions, scale, block_n, num_warps)
    if anchors.shape[:3] != (B, Hq, Lq) or scores.shape != anchors.shape:
        raise ValueError(f"span_attention: anchors {tuple(anchors.shape)} / scores "
                         f"{tuple(scores.shape)} must be [B, Hq, Lq, topk] = [{B}, {Hq}, {Lq}, k]")
    if not 1 <= anchors.shape[-1] <= 8:
        raise ValueError(f"span_attention: topk={anchors.shape[-1]} must be in [1, 8]")
    W = min(window, T)
    S = min(sinks, T)
    back, fwd = _extents(T, span_power, backward_factor, forward_factor, q.device)
    # longest span any query < T can have: back + fwd + 1 keys at t = T - 1 (tables non-decreasing)
    span_max = math.ceil(backward_factor * T ** span_power) + math.ceil(forward_factor * T ** span_power) + 2
    NPC = triton.cdiv(max(1, min(span_max, T)), block_n)
    return _attend(q, k, v, anchors, scores, key_padding_mask, query_positions, W, S, back, fwd, NPC,
                   combine == "gated", scale, block_n, num_warps)
