"""docs/spec.md, executable: the reference implementation of superlinear attention.

Every kernel is tested against this module. It is written for clarity first and for scale second:
it gathers, per query, only the keys that docs/spec.md says the query attends (sinks, window, the kept
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

from typing import Optional, Tuple

import torch

from .searches import kind
from .geometry import keeps_no_span, no_span_outputs, num_stripes, span_extents, stripe_deltas

# Elements of the largest gathered tensor per chunk of span-search ([Hq, chunk, stripes, D]).
_CHUNK_ELEMS = 1 << 25


def default_positions(B: int, Lq: int, T: int, device) -> torch.Tensor:
    return (torch.arange(Lq, device=device, dtype=torch.int64) + (T - Lq)).expand(B, Lq)


def _chunk_size(per_query: int) -> int:
    return int(max(1, min(4096, _CHUNK_ELEMS // max(1, per_query))))


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx [...] of every head of x [H, T, D] -> [H, *idx.shape, D] (index_select on a flat
    view; faster than advanced indexing)."""
    H, T, D = x.shape
    full = (torch.arange(H, device=x.device) * T).view(H, *([1] * idx.dim())) + idx
    return x.reshape(H * T, D).index_select(0, full.reshape(-1)).view(H, *idx.shape, D)


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
    if kind(search_key).family != "stripe":
        raise ValueError(f"span_search: search_key={search_key!r} is not a stripe search "
                         f"(docs/spec.md); {search_key!r} has its own op")
    B, Hq, Lq, D = qs.shape
    Hkv, T = k.shape[1], k.shape[2]
    dev = qs.device
    anchors, scores = no_span_outputs(B, Hq, Lq, topk, dev)
    W = min(window, T)
    if keeps_no_span(T, window, dense_below, Lq):
        return anchors, scores  # dense attention, or no stripe reaches past the window
    pos = default_positions(B, Lq, T, dev) if query_positions is None else query_positions.long()
    n = num_stripes(T, search_power)
    deltas = stripe_deltas(n, search_power, dev)  # ascending: nearest anchor first
    back, fwd = span_extents(T, span_power, backward_factor, forward_factor, dev)
    g = Hq // Hkv

    if kind(search_key).stripe_key == "mean":
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
            c = t.shape[0]
            a = t[:, None] - deltas[None, :]  # [c, n]
            valid = (deltas[None, :] >= W) & (a >= 0)
            a_c = a.clamp(min=0)
            if key_padding_mask is not None:
                valid &= key_padding_mask[b][a_c]
            if kind(search_key).stripe_key == "anchor":
                key = _rows(k[b], a_c).float()  # [Hkv, c, n, D]
            else:
                lo = (a_c - back[t][:, None]).clamp(min=0)
                hi = torch.minimum(a_c + fwd[t][:, None], t[:, None] - W).clamp(min=0)
                tot = prefix[b][:, hi + 1] - prefix[b][:, lo]  # [Hkv, c, n, D]
                c_ = (cnt[b][hi + 1] - cnt[b][lo]).clamp(min=1.0)
                key = (tot / c_[None, :, :, None]).float()
            q_c = qs[b, :, s:s + chunk].float().view(Hkv, g, c, D).transpose(1, 2)  # [Hkv, c, g, D]
            sc = torch.matmul(q_c, key.transpose(-1, -2))  # [Hkv, c, g, n]
            sc = sc.permute(0, 2, 1, 3).reshape(Hq, c, n)
            sc = sc.masked_fill(~valid[None], float("-inf"))
            # top-k by repeated argmax: argmax returns the first maximum, and stripes are
            # ordered nearest anchor first, so ties go to the nearer anchor.
            a_h = a_c[None].expand(Hq, c, n)
            for j in range(min(topk, n)):
                idx = sc.argmax(dim=-1, keepdim=True)  # [Hq, c, 1]
                top_s = torch.gather(sc, -1, idx)[..., 0]
                top_a = torch.gather(a_h, -1, idx)[..., 0]
                empty = torch.isinf(top_s) & (top_s < 0)
                anchors[b, :, s:s + chunk, j] = torch.where(empty, -1, top_a).to(torch.int32)
                scores[b, :, s:s + chunk, j] = top_s
                sc = sc.scatter(-1, idx, float("-inf"))
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


def _segment_partials(q2, k2, v2, seg_q, seg_h, lo, hi, valid_fn, scale, maxlen, T, bucket=64):
    """Softmax partials of contiguous key segments, computed by grouping segments by key footprint.

    A segment is (query row seg_q of q2, kv head seg_h, keys [lo, hi], further masked by
    valid_fn(seg_index [n], positions [n, w]) -> bool [n, w]). Segments are bucketed by lo // bucket;
    all segments of a bucket share one contiguous key window [j*bucket, j*bucket + bucket + maxlen),
    so their logits come from one GEMM against a strided view of K (no gathered copy of K or V),
    which is what makes this reference fast on a CPU. Returns, per segment, the running max m,
    the sum of exponentials l and the unnormalised output o (all float32; m = -inf, l = 0, o = 0
    for a segment with no valid key).

    q2 [Nq, D]; k2 [H, T, D], v2 [H, T, Dv] (float32); seg_* int64 [N]."""
    N = seg_q.shape[0]
    H, _, D = k2.shape
    Dv = v2.shape[-1]
    dev = q2.device
    m_out = torch.full((N,), float("-inf"), device=dev)
    l_out = torch.zeros(N, device=dev)
    o_out = torch.zeros(N, Dv, device=dev)
    if N == 0:
        return m_out, l_out, o_out
    nbk = -(-T // bucket)
    width = bucket + maxlen
    R = nbk * bucket + maxlen  # padded rows per head: every window lies inside its own head
    kp = torch.zeros(H * R, D, device=dev)
    vp = torch.zeros(H * R, Dv, device=dev)
    kp.view(H, R, D)[:, :T] = k2
    vp.view(H, R, Dv)[:, :T] = v2
    # windows starting at every row (overlapping strided views; nothing is copied here)
    kwin = kp.as_strided((H * R - width + 1, width, D), (D, D, 1))
    vwin = vp.as_strided((H * R - width + 1, width, Dv), (Dv, Dv, 1))
    # an empty segment may start past the keys (lo > hi, e.g. sinks >= T): keep its bucket in range
    key = seg_h * nbk + torch.div(lo, bucket, rounding_mode="floor").clamp(0, nbk - 1)
    order = torch.argsort(key, stable=True)
    key_s = key[order]
    counts = torch.bincount(key_s, minlength=H * nbk)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(N, device=dev) - starts[key_s]
    # split crowded buckets (spans clamped at the sinks pile up in bucket 0) into virtual buckets
    # of at most `cap` segments, so that padding stays small
    nonempty = int((counts > 0).sum().item())
    cap = max(16, -(-N // max(1, nonempty)))
    nv = -(-counts // cap)
    vstart = torch.cumsum(nv, 0) - nv
    vb = vstart[key_s] + torch.div(rank, cap, rounding_mode="floor")  # virtual bucket per segment
    row = rank % cap
    NV = int(nv.sum().item())
    vkey = torch.zeros(NV, dtype=torch.int64, device=dev)
    vkey[vb] = key_s
    vh = torch.div(vkey, nbk, rounding_mode="floor")
    vbase = (vkey - vh * nbk) * bucket  # first key position of each virtual bucket's window
    vrow0 = vh * R + vbase  # its first row in kp / vp
    woff = torch.arange(width, device=dev)
    per_chunk = max(1, (1 << 23) // (cap * width))
    # segments sorted by virtual bucket are contiguous: chunk over virtual buckets
    vcounts = torch.bincount(vb, minlength=NV)
    vend = torch.cumsum(vcounts, 0)
    for v0 in range(0, NV, per_chunk):
        v1 = min(NV, v0 + per_chunk)
        s0 = int(vend[v0 - 1].item()) if v0 > 0 else 0
        s1 = int(vend[v1 - 1].item())
        idx = order[s0:s1]  # segments in these virtual buckets
        bj = vb[s0:s1] - v0
        rk = row[s0:s1]
        nb = v1 - v0
        qb = torch.zeros(nb, cap, D, device=dev)
        qb[bj, rk] = q2[seg_q[idx]]
        kw = kwin[vrow0[v0:v1]]  # [nb, width, D] (copy of nb windows)
        vw = vwin[vrow0[v0:v1]]
        logits = torch.bmm(qb, kw.transpose(1, 2)).mul_(scale)  # [nb, cap, width]
        pos_seg = vbase[v0:v1][bj][:, None] + woff[None, :]  # [n, width]
        ok = (pos_seg >= lo[idx, None]) & (pos_seg <= hi[idx, None]) & valid_fn(idx, pos_seg)
        okb = torch.zeros(nb, cap, width, dtype=torch.bool, device=dev)
        okb[bj, rk] = ok
        logits.masked_fill_(~okb, float("-inf"))
        m = logits.amax(-1)  # [nb, cap]
        m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        logits.sub_(m_safe[..., None]).exp_()
        o = torch.bmm(logits, vw)  # [nb, cap, Dv]
        m_out[idx] = m[bj, rk]
        l_out[idx] = logits.sum(-1)[bj, rk]
        o_out[idx] = o[bj, rk]
    return m_out, l_out, o_out


def _merge(parts):
    """Merge softmax partials [(m, l, o)] over disjoint key sets -> normalised output (zeros where
    no key is valid)."""
    m = parts[0][0]
    for pm, _, _ in parts[1:]:
        m = torch.maximum(m, pm)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    l_tot = 0.0
    o_tot = 0.0
    for pm, pl, po in parts:
        w = torch.exp(pm - m_safe)  # 0 for an empty part (m = -inf)
        l_tot = l_tot + pl * w
        o_tot = o_tot + po * w[..., None]
    return o_tot / torch.where(l_tot > 0, l_tot, torch.ones_like(l_tot))[..., None]


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
    """Step 2 of docs/spec.md. Every query attends three kinds of disjoint segments: the sinks
    [0, min(S, t+1)), the window [max(S, t-W+1), t] and its kept spans [lo_j, hi_j] minus the sinks
    (union mode: also minus earlier kept spans, so a position counts once). Each segment's softmax
    partial is computed separately (see _segment_partials) and the partials are merged exactly."""
    B, Hq, Lq, D = q.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    if T <= dense_below or Lq == 0:
        return dense_attention(q, k, v, key_padding_mask, query_positions, scale)
    pos = default_positions(B, Lq, T, dev) if query_positions is None else query_positions.long()
    W = min(window, T)
    S = min(sinks, T)
    kk = anchors.shape[-1]
    g = Hq // Hkv
    back, fwd = span_extents(T, span_power, backward_factor, forward_factor, dev)
    out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=dev)
    ninf = float("-inf")
    for b in range(B):
        q2 = q[b].float().reshape(Hq * Lq, D)  # row = h * Lq + i
        k2, v2 = k[b].float(), v[b].float()
        kpm = key_padding_mask[b] if key_padding_mask is not None else None
        t = pos[b]  # [Lq]
        rows = torch.arange(Hq * Lq, device=dev)
        t_row = t.repeat(Hq)
        h_row = torch.div(rows, Lq, rounding_mode="floor") // g  # kv head of each row

        def present(idx, p, _kpm=kpm):
            return _kpm[p.clamp(max=T - 1)] if _kpm is not None else torch.ones_like(p, dtype=torch.bool)

        # sinks: tiny, dense
        if S > 0:
            ls = torch.einsum("hgld,hsd->hgls", q[b].float().view(Hkv, g, Lq, D), k2[:, :S]) * scale
            ok = torch.arange(S, device=dev)[None, :] <= t[:, None]  # [Lq, S]
            if kpm is not None:
                ok = ok & kpm[:S][None, :]
            ls = ls.masked_fill(~ok, ninf).reshape(Hq * Lq, S)
            ms = ls.amax(-1)
            ms_safe = torch.where(torch.isinf(ms), torch.zeros_like(ms), ms)
            es = torch.exp(ls - ms_safe[:, None])
            os_ = torch.einsum("hgls,hsd->hgld", es.view(Hkv, g, Lq, S), v2[:, :S]).reshape(Hq * Lq, Dv)
            sink_part = (ms, es.sum(-1), os_)
        else:
            sink_part = (torch.full((Hq * Lq,), ninf, device=dev), torch.zeros(Hq * Lq, device=dev),
                         torch.zeros(Hq * Lq, Dv, device=dev))
        # window
        if W > 0:
            wlo = torch.clamp(t_row - W + 1, min=S)
            win_part = _segment_partials(q2, k2, v2, rows, h_row, wlo, t_row, present, scale, W, T)
        else:
            win_part = sink_part[0].new_full(sink_part[0].shape, ninf), sink_part[1] * 0, sink_part[2] * 0
        # spans
        a = anchors[b].long().reshape(Hq * Lq, kk)
        aval = a >= 0
        a_c = a.clamp(min=0)
        lo = torch.clamp(a_c - back[t_row][:, None], min=S)  # sinks are counted in the sink part
        hi = torch.minimum(a_c + fwd[t_row][:, None], t_row[:, None] - W)
        hi = torch.where(aval, hi, lo - 1)  # an empty slot is an empty segment
        span_len = (hi - lo + 1).clamp(min=0)
        maxlen = max(1, int(span_len.max().item()))
        seg_row = rows[:, None].expand(-1, kk).reshape(-1)
        seg_j = torch.arange(kk, device=dev).repeat(Hq * Lq)
        lo_f, hi_f = lo.reshape(-1), hi.reshape(-1)
        live = span_len.reshape(-1) > 0
        if combine == "union":
            def span_valid(idx, p, _lo=lo, _hi=hi, _kpm=kpm):
                ok = present(idx, p)
                r, j = seg_row[idx], seg_j[idx]
                for jj in range(kk - 1):  # drop positions already in an earlier kept span
                    earlier = (jj < j)[:, None]
                    inside = (p >= _lo[r, jj][:, None]) & (p <= _hi[r, jj][:, None])
                    ok = ok & ~(earlier & inside)
                return ok
        else:
            span_valid = present
        sel = torch.nonzero(live).flatten()
        m_sp = torch.full((Hq * Lq * kk,), ninf, device=dev)
        l_sp = torch.zeros(Hq * Lq * kk, device=dev)
        o_sp = torch.zeros(Hq * Lq * kk, Dv, device=dev)
        pm, pl, po = _segment_partials(q2, k2, v2, seg_row[sel], h_row[seg_row[sel]], lo_f[sel],
                                       hi_f[sel], lambda idx, p: span_valid(sel[idx], p), scale,
                                       maxlen, T)
        m_sp[sel], l_sp[sel], o_sp[sel] = pm, pl, po
        m_sp, l_sp, o_sp = m_sp.view(-1, kk), l_sp.view(-1, kk), o_sp.view(-1, kk, Dv)
        if combine == "union":
            parts = [sink_part, win_part] + [(m_sp[:, j], l_sp[:, j], o_sp[:, j]) for j in range(kk)]
            o = _merge(parts)
        else:
            oj = torch.stack([_merge([sink_part, win_part, (m_sp[:, j], l_sp[:, j], o_sp[:, j])])
                              for j in range(kk)], dim=1)  # [rows, kk, Dv]
            sc = scores[b].float().reshape(-1, kk).masked_fill(~aval, ninf)
            gate = torch.softmax(sc, dim=-1).nan_to_num(0.0)
            o = (gate[..., None] * oj).sum(1)
            # no kept span: attention over window ∪ sinks alone
            o = torch.where(aval.any(-1)[:, None], o, _merge([sink_part, win_part]))
        out[b] = o.view(Hq, Lq, Dv).to(q.dtype)
    return out


def superlinear_attention(q, k, v, *, window, sinks, topk, search_power, span_power,
                          backward_factor, forward_factor, combine, search_key, dense_below,
                          scale, key_padding_mask=None, query_positions=None, search_query=None):
    """Both steps, no validation: the whole of docs/spec.md in one call (for tests and tools)."""
    qs = q if search_query is None else search_query
    anchors, sc = span_search(qs, k, key_padding_mask, query_positions, window, topk, search_power,
                              span_power, backward_factor, forward_factor, search_key, dense_below)
    return span_attention(q, k, v, anchors, sc, key_padding_mask, query_positions, window, sinks,
                          span_power, backward_factor, forward_factor, combine, scale, dense_below)
