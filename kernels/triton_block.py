"""Triton kernel for ``search_key="block"`` (docs/routing.md): coarse-to-fine Quest bounds.

Two parts:

* ``_pyramid`` (PyTorch, O(T D) work and memory): the per-dimension key minimum and maximum of
  every aligned block of 2^j keys, for the levels j a query can use (from the finest block of the
  first query past the window up to log2(T)), stored in the keys' dtype (a minimum or maximum of
  bf16/fp16 values is exact in that dtype) in one buffer per bound, level after level. Absent keys
  (key-padding mask) enter as -inf/+inf; a block without present keys is recognised by the
  last-present-key table (``LP``) and scores -inf, its summary is never used.
* ``_block_search_kernel``: one program per (batch row, query head, ``block_q`` queries; 1 on the
  GPU, where it was measured; the interpreter tests use more to cut per-op overhead), the longest
  queries first. Per query it scores the coarse blocks (at most 2^c <= RP of them, one [RP, D]
  tile), picks the 2 topk best by repeated argmax (ties: the later block) and, in the same loop,
  scores each picked block's R fine blocks (one [RP, D] tile of the fine level); then the tail's
  R fine blocks, the partial last one from its (at most BLOCK) keys. The greedy keep of
  docs/routing.md is run
  as topk rounds of "take the best remaining candidate (ties: the nearer anchor), drop every
  candidate its span covers", which keeps the same anchors in the same order (a candidate skipped
  by the greedy is exactly one covered by a span kept before it). Per query: O((2 topk + 1) R D)
  with R <= 2 sqrt(t / bs), no O(L^2) tensor, no host synchronisation.

Bounds are sum_d q+_d kmax_d + sum_d q-_d kmin_d in fp32 (q+ = max(q, 0), q- = min(q, 0)), like the
reference's two matrix products; only the summation order differs, so scores agree to fp32 rounding
and anchors are identical unless two bounds differ by less than that rounding. Exactly equal bounds
follow the reference's tie rules (coarse: the later block; fine: the nearer anchor), which the tests
check on integer-valued inputs, where every bound is exact in any summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .geometry import check_search_inputs, keeps_no_span, no_span_outputs, span_extents
from .reference import BLOCK, COARSE_FANOUT
from .triton_search import _next_pow2

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG_BLOCK = BLOCK.bit_length() - 1


@triton.jit
def _level_row(j, JLO, JTOP, T):
    """First row of level j [Q] in the pyramid buffers (levels JLO .. JTOP - 1 stored one after the
    other, level i holding T >> i blocks)."""
    off = j.to(tl.int64) * 0
    i = JLO
    while i < JTOP:
        off += tl.where(i < j, T >> i, 0)
        i += 1
    return off


@triton.jit
def _bounds(QROW, qok, sqd, KMIN, KMAX, rows, ok, spn, spd,
            D: tl.constexpr, BLOCK_D: tl.constexpr, DC: tl.constexpr):
    """Quest bounds [Q, RP] of the queries (row pointers QROW [Q]) against pyramid rows ``rows``
    [Q, RP] (masked by ok): sum_d q+ kmax + sum_d q- kmin, fp32, in chunks of DC dimensions."""
    accp = tl.zeros(rows.shape, tl.float32)
    accn = tl.zeros(rows.shape, tl.float32)
    for d0 in tl.static_range(0, BLOCK_D, DC):
        od = d0 + tl.arange(0, DC)
        dm = od < D
        q = tl.load(QROW[:, None] + od[None, :] * sqd, mask=qok[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        m3 = ok[:, :, None] & dm[None, None, :]
        off = rows[:, :, None] * spn + od[None, None, :] * spd
        mx = tl.load(KMAX + off, mask=m3, other=0.0).to(tl.float32)
        mn = tl.load(KMIN + off, mask=m3, other=0.0).to(tl.float32)
        accp += tl.sum(tl.maximum(q, 0.0)[:, None, :] * mx, axis=2)
        accn += tl.sum(tl.minimum(q, 0.0)[:, None, :] * mn, axis=2)
    return accp + accn


@triton.jit
def _anchors(LP, lpb, slpn, last, ok, HAS_KPM: tl.constexpr):
    """Last present key <= last (masked by ok; -1 where none)."""
    if HAS_KPM:
        a = tl.load(LP + lpb + last.to(tl.int64) * slpn, mask=ok, other=-1)
    else:
        a = tl.where(ok, last, -1)
    return a


@triton.jit(do_not_specialize=["JLO"])  # a runtime loop counter starts at JLO (may be 1)
def _block_search_kernel(
    QS, K, KPM, KMIN, KMAX, LP, POS, BACK, FWD, A_OUT, S_OUT,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    skpb, skpn,
    spb_, sph, spn, spd,
    slpb, slpn,
    sposb, sposm,
    sab, sah, sam, sak,
    Hq, G, Lq, T, W, JLO, JTOP,
    D: tl.constexpr, HAS_KPM: tl.constexpr, HAS_POS: tl.constexpr, TOPK: tl.constexpr,
    M: tl.constexpr, MP: tl.constexpr, RP: tl.constexpr, LOG_BLOCK: tl.constexpr,
    BLK: tl.constexpr, QB: tl.constexpr, BLOCK_D: tl.constexpr, DC: tl.constexpr,
):
    # one program: QB queries of one query head (the longest query blocks first)
    pid = tl.program_id(0)
    nqb = tl.cdiv(Lq, QB)
    nbh = tl.num_programs(0) // nqb
    bh = pid % nbh
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    kvh = h // G
    qi = ((nqb - 1 - pid // nbh) * QB + tl.arange(0, QB)).to(tl.int64)
    qok = qi < Lq
    if HAS_POS:
        t = tl.load(POS + b * sposb + qi * sposm, mask=qok, other=0).to(tl.int32)
    else:
        t = (T - Lq + qi).to(tl.int32)
    t = tl.where(qok, t, 0)
    e = t - W
    live = qok & (e >= 0)
    e = tl.maximum(e, 0)
    back_t = tl.load(BACK + t).to(tl.int32)
    fwd_t = tl.load(FWD + t).to(tl.int32)

    # block sizes (docs/routing.md, step 1): bs = 2^jf, coarse blocks of R = 2^c fine blocks
    jf = back_t * 0
    for _ in tl.static_range(LOG_BLOCK):
        jf = tl.where((2 << jf) <= back_t + 1, jf + 1, jf)
    nf = tl.maximum((e + 1) >> jf, 1)
    c = jf * 0
    while tl.max(((1 << (2 * c)) < nf).to(tl.int32), axis=0) > 0:
        c = tl.where((1 << (2 * c)) < nf, c + 1, c)
    jc = jf + c
    R = 1 << c
    bs = 1 << jf
    n_full = tl.where(live, (e + 1) >> jc, 0)

    QROW = QS + b * sqb + h * sqh + qi * sqm
    PMIN = KMIN + b * spb_ + kvh * sph
    PMAX = KMAX + b * spb_ + kvh * sph
    lpb = b * slpb
    row_f = _level_row(jf, JLO, JTOP, T)[:, None]
    r = tl.arange(0, RP)[None, :]
    jf2, bs2, R2, e2 = jf[:, None], bs[:, None], R[:, None], e[:, None]

    # coarse step: the n_full whole coarse blocks, scored by their bound
    # (blocks without present keys are masked before loading: their summaries hold +-inf)
    cok = r < n_full[:, None]
    if HAS_KPM:
        jc2 = jc[:, None]
        cok = cok & (_anchors(LP, lpb, slpn, ((r + 1) << jc2) - 1, cok, HAS_KPM) >= (r << jc2))
    csc = _bounds(QROW, qok, sqd, PMIN, PMAX, _level_row(jc, JLO, JTOP, T)[:, None] + r, cok,
                  spn, spd, D, BLOCK_D, DC)
    csc = tl.where(cok, csc, float("-inf"))

    # the best M coarse blocks (ties: the later block), each refined into its R fine blocks
    gi = tl.arange(0, MP)[None, :, None]
    cs = tl.full([QB, MP, RP], float("-inf"), tl.float32)
    ca = tl.full([QB, MP, RP], -1, tl.int32)
    cb = tl.zeros([QB, MP, RP], tl.int32)
    for g in range(M):  # a runtime loop: short compiles
        best = tl.max(csc, axis=1)
        ci = tl.max(tl.where(csc == best[:, None], r, -1), axis=1)
        csc = tl.where(r == ci[:, None], float("-inf"), csc)
        f = ci[:, None] * R2 + r
        ok = (best > float("-inf"))[:, None] & (r < R2)
        b0 = f << jf2
        a = _anchors(LP, lpb, slpn, b0 + bs2 - 1, ok, HAS_KPM)
        ok = ok & (a >= b0)
        s = _bounds(QROW, qok, sqd, PMIN, PMAX, row_f + f, ok, spn, spd, D, BLOCK_D, DC)
        here = gi == g
        cs = tl.where(here, tl.where(ok, s, float("-inf"))[:, None, :], cs)
        ca = tl.where(here, a[:, None, :], ca)
        cb = tl.where(here, b0[:, None, :], cb)

    # the tail [n_full G, e]: whole fine blocks from the pyramid, the partial last one from its keys
    f = n_full[:, None] * R2 + r
    tb = f << jf2
    tok = live[:, None] & (tb <= e2)
    ta = _anchors(LP, lpb, slpn, tl.minimum(tb + bs2 - 1, e2), tok, HAS_KPM)
    tok = tok & (ta >= tb)
    whole = tok & (tb + bs2 - 1 <= e2)
    ts = _bounds(QROW, qok, sqd, PMIN, PMAX, row_f + f, whole, spn, spd, D, BLOCK_D, DC)
    pb = (e >> jf) << jf  # first key of the last fine block
    part = live & (pb + bs - 1 > e)
    p = pb[:, None] + tl.arange(0, BLK)[None, :]  # [QB, BLK]
    pm = part[:, None] & (p <= e2)
    if HAS_KPM:
        pm = pm & (tl.load(KPM + b * skpb + p.to(tl.int64) * skpn, mask=pm, other=0) != 0)
    kbase = K + b * skb + kvh * skh
    accp = tl.zeros([QB], tl.float32)
    accn = tl.zeros([QB], tl.float32)
    for d0 in tl.static_range(0, BLOCK_D, DC):
        od = d0 + tl.arange(0, DC)
        dm = od < D
        q = tl.load(QROW[:, None] + od[None, :] * sqd, mask=qok[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        kk = tl.load(kbase + p.to(tl.int64)[:, :, None] * skn + od[None, None, :] * skd,
                     mask=pm[:, :, None] & dm[None, None, :], other=0.0).to(tl.float32)
        mx = tl.max(tl.where(pm[:, :, None], kk, float("-inf")), axis=1)  # [QB, DC]
        mn = tl.min(tl.where(pm[:, :, None], kk, float("inf")), axis=1)
        some = tl.max(pm.to(tl.int32), axis=1)[:, None] > 0  # else +-inf: not used, keep finite
        mx = tl.where(some, mx, 0.0)
        mn = tl.where(some, mn, 0.0)
        accp += tl.sum(tl.where(dm[None, :], tl.maximum(q, 0.0) * mx, 0.0), axis=1)
        accn += tl.sum(tl.where(dm[None, :], tl.minimum(q, 0.0) * mn, 0.0), axis=1)
    ts = tl.where((tb == pb[:, None]) & part[:, None], (accp + accn)[:, None], ts)
    ts = tl.where(tok, ts, float("-inf"))

    # greedy keep: topk rounds of best remaining candidate (ties: nearer anchor), then drop every
    # candidate whose [first slot, anchor] the kept span covers
    obase = b * sab + h * sah + qi * sam
    for j in range(TOPK):
        best = tl.maximum(tl.max(tl.max(cs, axis=2), axis=1), tl.max(ts, axis=1))
        b3 = best[:, None, None]
        a1 = tl.max(tl.max(tl.where(cs == b3, ca, -1), axis=2), axis=1)
        a = tl.maximum(a1, tl.max(tl.where(ts == best[:, None], ta, -1), axis=1))
        found = best > float("-inf")
        tl.store(A_OUT + obase + j * sak, tl.where(found, a, -1).to(tl.int32), mask=qok)
        tl.store(S_OUT + obase + j * sak, best, mask=qok)
        lo = tl.maximum(a - back_t, 0)
        hi = tl.minimum(a + fwd_t, e)
        lo3, hi3, a3 = lo[:, None, None], hi[:, None, None], a[:, None, None]
        cs = tl.where(((cb >= lo3) & (ca <= hi3)) | (ca == a3), float("-inf"), cs)
        ts = tl.where(((tb >= lo[:, None]) & (ta <= hi[:, None])) | (ta == a[:, None]),
                      float("-inf"), ts)


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


def span_search(qs, k, key_padding_mask, query_positions, window, topk, search_power,
                span_power, backward_factor, forward_factor, search_key, dense_below,
                block_q: int = 1, num_warps: int = 4):
    """Same contract as ``reference.span_search`` for ``search_key="block"``."""
    B, Hq, Lq, D = qs.shape
    Hkv, T = k.shape[1], k.shape[2]
    dev = qs.device
    check_search_inputs("span_search (block)", Hq, Hkv, topk, search_key, ("block",), max_topk=8)
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
    jlo = min(_LOG_BLOCK, (back_w + 1).bit_length() - 1)
    nf_max = max(1, (T - W) >> jlo)
    c_max = 0
    while (1 << (2 * c_max)) < nf_max:
        c_max += 1
    RP = max(2, 1 << c_max)  # >= every query's R and number of coarse blocks
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
    BLOCK_D = max(16, _next_pow2(D))
    QB = _next_pow2(max(1, min(block_q, Lq)))
    DC = max(1, min(BLOCK_D, 4096 // (RP * QB)))
    M = COARSE_FANOUT * topk
    _block_search_kernel[(B * Hq * triton.cdiv(Lq, QB),)](
        qs, k, kpm, kmin, kmax, lp, pos, back, fwd, anchors, scores,
        *qs.stride(), *k.stride(),
        *(kpm.stride() if key_padding_mask is not None else (0, 0)),
        kmin.stride(0), kmin.stride(1), kmin.stride(2), kmin.stride(3),
        *(lp.stride() if key_padding_mask is not None else (0, 0)),
        *(pos.stride() if query_positions is not None else (0, 0)),
        *anchors.stride(),
        Hq, Hq // Hkv, Lq, T, W, jlo, T.bit_length(),
        D=D, HAS_KPM=key_padding_mask is not None, HAS_POS=query_positions is not None,
        TOPK=topk, M=M, MP=_next_pow2(M), RP=RP, LOG_BLOCK=_LOG_BLOCK, BLK=BLOCK, QB=QB,
        BLOCK_D=BLOCK_D, DC=DC,
        num_warps=num_warps,
    )
    return anchors, scores
