"""Triton kernel for step 2 of SPEC.md: span-attention (sinks, window and kept spans, one pass).

One program owns ``BLOCK_M`` queries of one (batch, query head); query head h reads kv head
h // (Hq / Hkv) straight from the un-repeated K/V tensors. Each query row brings up to topk + 2
key intervals: the sinks [0, min(S, t+1)), the window [t-W+1, t] and its kept spans
[max(0, a - back[t]), min(a + fwd[t], t - W)] (extents from ``geometry.span_extents``, the same
float64 table as the reference). The program visits, in ascending order, only the key tiles of
``BLOCK_N`` keys that some interval of some row touches: the next tile is the smallest tile index
>= the current one covered by any interval (a vector min over the intervals, no sort, no host
work). On each tile it computes q.K^T on the tensor cores, masks every (row, key) that is not in
that row's set A (a position counts once: the mask is an OR of the intervals, so overlapping spans,
window and sinks never double-count), and updates an online softmax (exp2, running max, running
sum) and the P.V accumulator.

``union`` is one such pass. ``gated`` runs one pass per span slot j over span_j ∪ window ∪ sinks
and mixes the normalised outputs with softmax over the kept spans' search scores; a query with no
kept span gets attention over window ∪ sinks (pass 0 without a span).

Dense causal attention (T <= dense_below) is the same kernel with the window covering every key.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .geometry import span_extents

_BIGI = tl.constexpr(2 ** 30)


@triton.jit
def _next_tile(cur, sk_ok, sk_hi_t, win_ok, win_lo_t, win_hi_t, sp_ok, sp_lo_t, sp_hi_t):
    c1 = tl.min(tl.where(sk_ok & (sk_hi_t >= cur), cur, _BIGI), axis=0)
    c2 = tl.min(tl.where(win_ok & (win_hi_t >= cur), tl.maximum(win_lo_t, cur), _BIGI), axis=0)
    c3 = tl.min(tl.min(tl.where(sp_ok & (sp_hi_t >= cur), tl.maximum(sp_lo_t, cur), _BIGI),
                       axis=1), axis=0)
    return tl.minimum(tl.minimum(c1, c2), c3)


@triton.jit
def _attend(q, kbase, vbase, kpbase, t, sk_ok, sk_hi, win_ok, win_lo, sp_ok, sp_lo, sp_hi,
            T, qk_scale, skn, skd, svn, svd, skpn,
            HAS_KPM: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr, D: tl.constexpr,
            DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
        kt = tl.load(kbase + offn64[None, :] * skn + offd[:, None] * skd,
                     mask=nmask[None, :] & (offd[:, None] < D), other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        elif DOT_F32:  # the interpreter's bf16 dot is wrong: emulate it in fp32
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale
        keep = (offn[None, :] <= t[:, None]) & nmask[None, :]
        fixed = (sk_ok[:, None] & (offn[None, :] <= sk_hi[:, None])) | \
                (win_ok[:, None] & (offn[None, :] >= win_lo[:, None]))
        insp = sp_ok[:, :, None] & (offn[None, None, :] >= sp_lo[:, :, None]) & \
            (offn[None, None, :] <= sp_hi[:, :, None])
        insp = tl.max(insp.to(tl.int32), axis=1) > 0
        keep = keep & (fixed | insp)
        if HAS_KPM:
            kp = tl.load(kpbase + offn64 * skpn, mask=nmask, other=0)
            keep = keep & (kp != 0)[None, :]
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
        m_i = m_new
        nxt = _next_tile(nxt + 1, sk_ok, sk_hi_t, win_ok, win_lo_t, win_hi_t, sp_ok, sp_lo_t,
                         sp_hi_t)
    return acc, l_i


@triton.jit
def _span_attention_kernel(
    Q, K, V, O, ANCH, SCO, KPM, POS, BACK, FWD,
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
    DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
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
        sc = tl.load(SCO + soff, mask=cmask, other=float("-inf")).to(tl.float32)
        sc = tl.where(aval, sc, float("-inf"))
        gmax = tl.max(sc, axis=1)
        gmax = tl.where(gmax == float("-inf"), 0.0, gmax)
        e = tl.where(aval, tl.exp(sc - gmax[:, None]), 0.0)
        esum = tl.sum(e, axis=1)
        gw = tl.where(esum[:, None] > 0, e / tl.where(esum > 0, esum, 1.0)[:, None], 0.0)
        any_a = tl.max(aval.to(tl.int32), axis=1) > 0
        out = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        o0 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for j in tl.static_range(TOPK):
            spj = sp_ok & (cols[None, :] == j)
            acc, l_i = _attend(q, kbase, vbase, kpbase, t, sk_ok, sk_hi, win_ok, win_lo,
                               spj, sp_lo, sp_hi, T, qk_scale, skn, skd, svn, svd, skpn,
                               HAS_KPM, IEEE, DOT_F32, D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
            oj = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            gj = tl.sum(tl.where(cols[None, :] == j, gw, 0.0), axis=1)
            out += gj[:, None] * oj
            if j == 0:
                o0 = oj
        out = tl.where(any_a[:, None], out, o0)
    else:
        acc, l_i = _attend(q, kbase, vbase, kpbase, t, sk_ok, sk_hi, win_ok, win_lo,
                           sp_ok, sp_lo, sp_hi, T, qk_scale, skn, skd, svn, svd, skpn,
                           HAS_KPM, IEEE, DOT_F32, D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]

    offdv = tl.arange(0, BLOCK_DV)
    tl.store(O + b * sob + h64 * soh + rows64[:, None] * som + offdv[None, :] * sod,
             out.to(O.dtype.element_ty), mask=rmask[:, None] & (offdv[None, :] < DV))


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("span_attention: q, k, v must be 4-D [B, H, L, D]")
    B, Hq, Lq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
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


def _block_sizes(q, Dmax):
    if q.dtype == torch.float32:
        return (32, 32) if Dmax > 128 else (32, 64)
    if Dmax > 128:
        return 32, 32
    return 32, 64


def launch(q, k, v, anchors, scores, key_padding_mask, query_positions, W, S, back, fwd,
           gated, scale, block_m=None, block_n=None, num_warps=4, num_stages=None):
    """Run the kernel; ``W``/``S`` already clipped to T; ``back``/``fwd`` int64 [T] tables."""
    B, Hq, Lq, D = q.shape
    Hkv, T, DV = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((B, Hq, Lq, DV), dtype=q.dtype, device=q.device)
    if Lq == 0:
        return out
    topk = anchors.shape[-1]
    kpm = key_padding_mask.to(torch.uint8) if key_padding_mask is not None else None
    pos = query_positions.long() if query_positions is not None else None
    BLOCK_D = max(16, _next_pow2(D))
    BLOCK_DV = max(16, _next_pow2(DV))
    bm, bn = _block_sizes(q, max(BLOCK_D, BLOCK_DV))
    bm = block_m or bm
    bn = block_n or bn
    bm = min(bm, max(16, _next_pow2(Lq)))
    grid = (triton.cdiv(Lq, bm) * B * Hq,)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _span_attention_kernel[grid](
        q, k, v, out, anchors, scores,
        kpm if kpm is not None else back, pos if pos is not None else back, back, fwd,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *anchors.stride(), *scores.stride(),
        *(kpm.stride() if kpm is not None else (0, 0)),
        *(pos.stride() if pos is not None else (0, 0)),
        Hq, Hq // Hkv, Lq, T, W, S, float(scale) * math.log2(math.e),
        D=D, DV=DV, HAS_KPM=kpm is not None, HAS_POS=pos is not None,
        TOPK=topk, KP=max(2, _next_pow2(topk)), GATED=bool(gated),
        IEEE=q.dtype == torch.float32,
        DOT_F32=_interpreted() and q.dtype == torch.bfloat16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV, num_warps=num_warps, **extra,
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
                  zeros, zeros, False, scale, **kw)


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
    return launch(q, k, v, anchors, scores, key_padding_mask, query_positions, W, S, back, fwd,
                  combine == "gated", scale, **kw)
