"""SPEC.md, executable: the reference implementation of superlinear attention.

Every kernel is tested against this module. It is written for clarity first and for scale second:
it gathers, per query, only the keys that SPEC.md says the query attends (sinks, window, the kept
spans), chunked over queries so that memory stays O(chunk * budget) and a 32K-token prefill runs on
a laptop CPU. Nothing here knows about graphs.

Conventions (shared with `ops.py` and the kernels):

* ``q``/``qs`` [B, Hq, Lq, D], ``k`` [B, Hkv, T, D], ``v`` [B, Hkv, T, Dv]; query head h reads kv
  head h // (Hq // Hkv); nothing is repeated in memory.
* ``query_positions`` [B, Lq] int64, absolute positions in [0, T) (None: bottom-right, T-Lq..T-1).
* ``key_padding_mask`` [B, T] bool, True where the key exists (False: never attended, never an
  anchor, counts for nothing).
* ``anchors`` int32 [B, Hq, Lq, topk] (-1: empty slot), ``scores`` float32 (-inf: empty slot),
  ordered by descending score; ties go to the nearer anchor.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .geometry import num_stripes, span_extents, stripe_deltas

# Elements of the largest gathered tensor per chunk ([Hq, chunk, budget, D]).
_CHUNK_ELEMS = 1 << 25


def default_positions(B: int, Lq: int, T: int, device) -> torch.Tensor:
    return (torch.arange(Lq, device=device, dtype=torch.int64) + (T - Lq)).expand(B, Lq)


def _chunk_size(per_query: int) -> int:
    return int(max(1, min(4096, _CHUNK_ELEMS // max(1, per_query))))


def _kv_index(Hq: int, Hkv: int, device) -> torch.Tensor:
    return torch.arange(Hq, device=device) // (Hq // Hkv)


# --------------------------------------------------------------------------------------------
# Step 1: span-search
# --------------------------------------------------------------------------------------------

def span_search(
    qs: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    query_positions: Optional[torch.Tensor],
    window: int,
    topk: int,
    search_power: float,
    span_power: float,
    backward_factor: float,
    forward_factor: float,
    search_key: str,
    dense_below: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    B, Hq, Lq, D = qs.shape
    Hkv, T = k.shape[1], k.shape[2]
    dev = qs.device
    anchors = torch.full((B, Hq, Lq, topk), -1, dtype=torch.int32, device=dev)
    scores = torch.full((B, Hq, Lq, topk), float("-inf"), dtype=torch.float32, device=dev)
    W = min(window, T)
    if T <= dense_below or W >= T or Lq == 0:
        return anchors, scores  # dense attention, or no stripe reaches past the window
    pos = default_positions(B, Lq, T, dev) if query_positions is None else query_positions.long()
    n = num_stripes(T, search_power)
    deltas = stripe_deltas(n, search_power, dev)  # ascending: nearest anchor first
    back, fwd = span_extents(T, span_power, backward_factor, forward_factor, dev)
    kvh = _kv_index(Hq, Hkv, dev)
    g = Hq // Hkv

    if search_key == "mean":
        kf = k.double()
        if key_padding_mask is not None:
            kf = kf * key_padding_mask[:, None, :, None]
        prefix = torch.zeros(B, Hkv, T + 1, D, dtype=torch.float64, device=dev)
        prefix[:, :, 1:] = torch.cumsum(kf, dim=2)
        ones = torch.ones(B, T, dtype=torch.float64, device=dev)
        if key_padding_mask is not None:
            ones = key_padding_mask.double()
        cnt = torch.zeros(B, T + 1, dtype=torch.float64, device=dev)
        cnt[:, 1:] = torch.cumsum(ones, dim=1)

    chunk = _chunk_size(Hq * n * D)
    for b in range(B):
        for s in range(0, Lq, chunk):
            t = pos[b, s:s + chunk]  # [c]
            a = t[:, None] - deltas[None, :]  # [c, n]
            valid = (deltas[None, :] >= W) & (a >= 0)
            a_c = a.clamp(min=0)
            if key_padding_mask is not None:
                valid &= key_padding_mask[b][a_c]
            if search_key == "anchor":
                key = k[b][:, a_c].float()  # [Hkv, c, n, D]
            else:
                lo = (a_c - back[t][:, None]).clamp(min=0)
                hi = torch.minimum(a_c + fwd[t][:, None], t[:, None] - W).clamp(min=0)
                tot = prefix[b][:, hi + 1] - prefix[b][:, lo]  # [Hkv, c, n, D]
                c_ = (cnt[b][hi + 1] - cnt[b][lo]).clamp(min=1.0)
                key = (tot / c_[None, :, :, None]).float()
            q_c = qs[b, :, s:s + chunk].float().view(Hkv, g, -1, D)
            sc = torch.einsum("hgcd,hcnd->hgcn", q_c, key).reshape(Hq, -1, n)
            sc = sc.masked_fill(~valid[None], float("-inf"))
            # stable sort keeps the nearer anchor first among equal scores
            order = torch.sort(sc, dim=-1, descending=True, stable=True).indices[..., :topk]
            kk = order.shape[-1]
            top_s = torch.gather(sc, -1, order)
            top_a = torch.gather(a_c[None].expand(Hq, -1, -1), -1, order)
            top_a = torch.where(torch.isinf(top_s), torch.full_like(top_a, -1), top_a)
            anchors[b, :, s:s + chunk, :kk] = top_a.to(torch.int32)
            scores[b, :, s:s + chunk, :kk] = top_s
    return anchors, scores


# --------------------------------------------------------------------------------------------
# Step 2: span-attention
# --------------------------------------------------------------------------------------------

def dense_attention(q, k, v, key_padding_mask, query_positions, scale) -> torch.Tensor:
    """Exact causal attention (bottom-right or explicit positions), chunked over queries.
    Rows with no visible key give zeros."""
    B, Hq, Lq, D = q.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    pos = default_positions(B, Lq, T, dev) if query_positions is None else query_positions.long()
    g = Hq // Hkv
    out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=dev)
    chunk = _chunk_size(Hq * T)
    j = torch.arange(T, device=dev)
    for b in range(B):
        kb, vb = k[b].float(), v[b].float()
        for s in range(0, Lq, chunk):
            t = pos[b, s:s + chunk]
            m = j[None, :] <= t[:, None]  # [c, T]
            if key_padding_mask is not None:
                m = m & key_padding_mask[b][None, :]
            qc = q[b, :, s:s + chunk].float().view(Hkv, g, -1, D)
            logits = torch.einsum("hgcd,htd->hgct", qc, kb) * scale
            logits = logits.masked_fill(~m, float("-inf"))
            p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
            o = torch.einsum("hgct,htd->hgcd", p, vb)
            out[b, :, s:s + chunk] = o.reshape(Hq, -1, Dv).to(q.dtype)
    return out


def span_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    anchors: torch.Tensor,
    scores: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    query_positions: Optional[torch.Tensor],
    window: int,
    sinks: int,
    span_power: float,
    backward_factor: float,
    forward_factor: float,
    combine: str,
    scale: float,
    dense_below: int,
) -> torch.Tensor:
    B, Hq, Lq, D = q.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    if T <= dense_below or Lq == 0:
        return dense_attention(q, k, v, key_padding_mask, query_positions, scale)
    pos = default_positions(B, Lq, T, dev) if query_positions is None else query_positions.long()
    W = min(window, T)
    S = min(sinks, T)
    kk = anchors.shape[-1]
    back, fwd = span_extents(T, span_power, backward_factor, forward_factor, dev)
    maxlen_all = int((back + fwd).max().item()) + 1 if T > 0 else 1
    g = Hq // Hkv
    kvh = _kv_index(Hq, Hkv, dev)
    nF = S + W
    fixed_off = torch.arange(nF, device=dev)
    out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=dev)
    chunk = _chunk_size(Hq * (nF + kk * maxlen_all) * max(D, Dv))
    ninf = float("-inf")

    for b in range(B):
        kb, vb = k[b], v[b]
        kpm = key_padding_mask[b] if key_padding_mask is not None else None
        for s in range(0, Lq, chunk):
            t = pos[b, s:s + chunk]  # [c]
            c = t.shape[0]
            # ---- fixed part: sinks [0, S) and window [t-W+1, t], deduplicated ----------
            fpos = torch.where(fixed_off[None, :] < S, fixed_off[None, :].expand(c, -1),
                               t[:, None] - W + 1 + (fixed_off[None, :] - S))  # [c, nF]
            fval = torch.where(fixed_off[None, :] < S, fpos <= t[:, None],
                               (fpos >= S) & (fpos >= 0))
            fpos = fpos.clamp(0, T - 1)
            if kpm is not None:
                fval &= kpm[fpos]
            qc = q[b, :, s:s + chunk].float()  # [Hq, c, D]
            kf = kb[:, fpos].float()  # [Hkv, c, nF, D]
            vf = vb[:, fpos].float()
            lf = torch.einsum("hgcd,hcnd->hgcn", qc.view(Hkv, g, c, D), kf).reshape(Hq, c, nF)
            lf = (lf * scale).masked_fill(~fval[None], ninf)
            # ---- spans ---------------------------------------------------------------
            a = anchors[b, :, s:s + chunk].long()  # [Hq, c, kk]
            aval = a >= 0
            a_c = a.clamp(min=0)
            lo = (a_c - back[t][None, :, None]).clamp(min=0)
            hi = torch.minimum(a_c + fwd[t][None, :, None], t[None, :, None] - W)
            span_len = torch.where(aval, (hi - lo + 1).clamp(min=0), torch.zeros_like(lo))
            maxlen = max(1, int(span_len.max().item()))
            off = torch.arange(maxlen, device=dev)
            sp = lo[..., None] + off  # [Hq, c, kk, maxlen]
            sval = off < span_len[..., None]
            sval &= sp >= S  # sinks are counted once, in the fixed part
            sp = sp.clamp(0, T - 1)
            if kpm is not None:
                sval &= kpm[sp]
            if combine == "union":
                for j in range(1, kk):  # a position counts once: drop it from later spans
                    for jj in range(j):
                        inside = (sp[:, :, j] >= lo[:, :, jj, None]) & (sp[:, :, j] <= hi[:, :, jj, None])
                        sval[:, :, j] &= ~(inside & aval[:, :, jj, None])
            flat = sp.reshape(Hq, -1)
            ks = kb[kvh[:, None], flat].float().view(Hq, c, kk, maxlen, D)
            vs = vb[kvh[:, None], flat].float().view(Hq, c, kk, maxlen, Dv)
            ls = torch.einsum("hcd,hcjmd->hcjm", qc, ks) * scale
            ls = ls.masked_fill(~sval, ninf)
            vfh = vf[kvh]  # [Hq, c, nF, Dv] (a view-expand per head group)
            if combine == "union":
                logits = torch.cat([lf, ls.reshape(Hq, c, -1)], dim=-1)
                p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
                o = torch.einsum("hcn,hcnd->hcd", p[..., :nF], vfh) + \
                    torch.einsum("hcn,hcnd->hcd", p[..., nF:], vs.reshape(Hq, c, -1, Dv))
            else:
                # per span j: softmax over span_j ∪ window ∪ sinks, mixed by softmax(scores)
                m = torch.maximum(lf.amax(-1)[..., None], ls.amax(-1))  # [Hq, c, kk]
                m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
                ef = torch.exp(lf[:, :, None, :] - m[..., None])  # [Hq, c, kk, nF]
                es = torch.exp(ls - m[..., None])  # [Hq, c, kk, maxlen]
                z = ef.sum(-1) + es.sum(-1)
                num = torch.einsum("hcjn,hcnd->hcjd", ef, vfh) + torch.einsum("hcjm,hcjmd->hcjd", es, vs)
                oj = num / torch.where(z > 0, z, torch.ones_like(z))[..., None]  # [Hq, c, kk, Dv]
                sc = scores[b, :, s:s + chunk].float().masked_fill(~aval, ninf)
                gate = torch.softmax(sc, dim=-1).nan_to_num(0.0)  # [Hq, c, kk]
                o = (gate[..., None] * oj).sum(-2)
                # no kept span: attention over window ∪ sinks alone
                pf = torch.softmax(lf, dim=-1).nan_to_num(0.0)
                o_fixed = torch.einsum("hcn,hcnd->hcd", pf, vfh)
                o = torch.where(aval.any(-1)[..., None], o, o_fixed)
            out[b, :, s:s + chunk] = o.to(q.dtype)
    return out


def superlinear_attention(q, k, v, *, window, sinks, topk, search_power, span_power,
                          backward_factor, forward_factor, combine, search_key, dense_below,
                          scale, key_padding_mask=None, query_positions=None, search_query=None):
    """Both steps, no validation: the whole of SPEC.md in one call (for tests and tools)."""
    qs = q if search_query is None else search_query
    anchors, sc = span_search(qs, k, key_padding_mask, query_positions, window, topk, search_power,
                              span_power, backward_factor, forward_factor, search_key, dense_below)
    return span_attention(q, k, v, anchors, sc, key_padding_mask, query_positions, window, sinks,
                          span_power, backward_factor, forward_factor, combine, scale, dense_below)
