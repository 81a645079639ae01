"""docs/nstep.md, executable: the N-step search (``SuperlinearConfig(steps=N)``, N >= 3).

The past [0, t-W] of a query is cut into cells of about t^(1/N) keys, grouped into a tree of
fan-out about t^(1/N) and depth N-1; a beam search keeps ``topk`` regions per level and returns the
kept cells as anchors for the unchanged ``span_attention`` (run with ``span_power = 1/N``).
This module is the reference of the op ``superlinear::nstep_search`` and the oracle of
``triton_nstep``. Conventions as ``reference.py`` (q/k [B, H, L, D], anchors -1 / scores -inf for
an empty slot, key_padding_mask True = present, query_positions None = bottom-right).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import reference, searches
from .geometry import check_search_inputs, keeps_no_span, no_span_outputs, span_extents

_CHUNK_ELEMS = 1 << 24  # elements of the largest gathered tensor per query chunk


def span_power(steps: int) -> float:
    """The span power of the N-step geometry: cells (and spans) grow as (t+1)^(1/N)."""
    return 1.0 / steps


def tables(T: int, window: int, steps: int, backward_factor: float, forward_factor: float,
           device=None):
    """Per query position t < T (int64 [T] each): fwd[t] (span reach after the anchor), the cell
    size s[t] = back + fwd + 1, the number of cells n[t] (0 when t - W < 0) and the fan-out f[t]
    (the smallest f >= 1 with f^(N-1) >= n). Every rounding decision of docs/nstep.md, made once."""
    back, fwd = span_extents(T, span_power(steps), backward_factor, forward_factor, device)
    W = min(window, T)
    s = back + fwd + 1
    e = torch.arange(T, device=device, dtype=torch.int64) - W
    n = torch.where(e >= 0, torch.div(e.clamp(min=0), s, rounding_mode="floor") + 1, 0)
    m = steps - 1
    f = torch.ceil(n.double().clamp(min=1) ** (1.0 / m)).to(torch.int64).clamp(min=1)
    f = torch.where(f ** m < n, f + 1, f)  # exact integer fix-ups of the float root
    f = torch.where((f > 1) & ((f - 1) ** m >= n), f - 1, f)
    return fwd, s, n, f


def _last_present(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """int64 [B, T]: the last present position <= x (-1 if none)."""
    T = key_padding_mask.shape[1]
    idx = torch.arange(T, device=key_padding_mask.device)
    return torch.cummax(torch.where(key_padding_mask, idx, -1), dim=1).values


def _mean_tables(k, key_padding_mask):
    """float64 prefix sums of the present keys [B, Hkv, T+1, D] and counts [B, T+1]."""
    B, Hkv, T, D = k.shape
    kf = k.double()
    ones = torch.ones(B, T, dtype=torch.float64, device=k.device)
    if key_padding_mask is not None:
        kf = kf * key_padding_mask[:, None, :, None]
        ones = key_padding_mask.double()
    pref = torch.zeros(B, Hkv, T + 1, D, dtype=torch.float64, device=k.device)
    pref[:, :, 1:] = torch.cumsum(kf, dim=2)
    cnt = torch.zeros(B, T + 1, dtype=torch.float64, device=k.device)
    cnt[:, 1:] = torch.cumsum(ones, dim=1)
    return pref, cnt


def check_steps(steps) -> None:
    if not isinstance(steps, int) or steps < 3:
        raise ValueError(f"nstep_search: steps={steps!r} must be an int >= 3 (steps=2 is span_search)")


def nstep_search(
    qs: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    query_positions: Optional[torch.Tensor],
    window: int,
    topk: int,
    steps: int,
    backward_factor: float,
    forward_factor: float,
    search_key: str,
    dense_below: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The N-step search of docs/nstep.md: anchors int32 [B, Hq, Lq, topk], scores float32."""
    B, Hq, Lq, D = qs.shape
    Hkv, T = k.shape[1], k.shape[2]
    dev = qs.device
    check_search_inputs("nstep_search", Hq, Hkv, topk, search_key, searches.names(nstep=True))
    check_steps(steps)
    anchors, scores = no_span_outputs(B, Hq, Lq, topk, dev)
    if keeps_no_span(T, window, dense_below, Lq):
        return anchors, scores
    W = min(window, T)
    pos = reference.default_positions(B, Lq, T, dev) if query_positions is None else query_positions.long()
    fwd, cell, ncell, fan = tables(T, window, steps, backward_factor, forward_factor, dev)
    g = Hq // Hkv
    kvh = (torch.arange(Hq, device=dev) // g)[:, None, None]  # [Hq, 1, 1]
    lastp = _last_present(key_padding_mask) if key_padding_mask is not None else None
    if searches.kind(search_key).stripe_key == "mean":
        pref, cnt = _mean_tables(k, key_padding_mask)
    ninf = float("-inf")
    big = torch.iinfo(torch.int64).max

    fmax_all = int(fan[pos].max().item())
    chunk = max(1, min(4096, _CHUNK_ELEMS // max(1, Hq * topk * fmax_all * D)))
    for b in range(B):
        k2 = k[b].reshape(Hkv * T, D)
        for c0 in range(0, Lq, chunk):
            t = pos[b, c0:c0 + chunk]  # [c]
            e = t - W
            s, n, f, fw = cell[t], ncell[t], fan[t], fwd[t]  # [c]
            q = qs[b, :, c0:c0 + chunk].float()  # [Hq, c, D]

            def score(gid, P, ok):
                """Scores [Hq, c, m] of the level regions gid [Hq, c, m] of P [c] cells each."""
                hi = e[:, None] - gid * (P * s)[:, None]
                lo = (e[:, None] - torch.minimum((gid + 1) * P[:, None], n[:, None]) * s[:, None] + 1).clamp(min=0)
                hi_c = hi.clamp(min=0, max=T - 1)
                if searches.kind(search_key).stripe_key == "anchor":
                    rep = hi_c if lastp is None else lastp[b][hi_c]
                    ok = ok & (rep >= lo)
                    key = k2.index_select(0, (kvh * T + rep.clamp(min=0)).reshape(-1))
                    key = key.view(*gid.shape, D).float()
                else:
                    lo_c = lo.clamp(max=T - 1)
                    tot = pref[b][kvh, hi_c + 1] - pref[b][kvh, lo_c]  # [Hq, c, m, D]
                    cn = cnt[b][hi_c + 1] - cnt[b][lo_c]
                    ok = ok & (cn > 0)
                    key = (tot / cn.clamp(min=1.0)[..., None]).float()
                sc = torch.matmul(key, q[..., None])[..., 0]  # [Hq, c, m]
                return sc.masked_fill(~ok, ninf)

            def keep(gid, sc):
                """The best topk by score, ties to the smaller index; -inf never kept (-1)."""
                o1 = torch.sort(torch.where(sc > ninf, gid, big), dim=-1, stable=True).indices
                sc1, g1 = torch.gather(sc, -1, o1), torch.gather(gid, -1, o1)
                o2 = torch.sort(sc1, dim=-1, descending=True, stable=True).indices[..., :topk]
                sc2, g2 = torch.gather(sc1, -1, o2), torch.gather(g1, -1, o2)
                live = sc2 > ninf
                return torch.where(live, g2, -1), torch.where(live, sc2, ninf)

            P = f ** (steps - 2)  # cells per top-level region
            ntop = torch.where(n > 0, -(-n // P), 0)
            m = max(1, int(ntop.max().item()))
            gid = torch.arange(m, device=dev).expand(Hq, t.shape[0], m)
            kept, ksc = keep(gid, score(gid, P, gid < ntop[None, :, None]))
            fm = int(f.max().item())
            child = torch.arange(fm, device=dev)
            for _ in range(steps - 2):  # down to the cells
                P = torch.div(P, f, rounding_mode="floor")
                nreg = -(-n // P)
                gid = (kept[..., None] * f[None, :, None, None] + child).flatten(-2)  # [Hq, c, k*fm]
                ok = ((kept[..., None] >= 0) & (child < f[None, :, None, None])).flatten(-2) & \
                    (gid < nreg[None, :, None])
                gid = torch.where(ok, gid, 0)
                kept, ksc = keep(gid, score(gid, P, ok))
            a = (e[None, :, None] - kept * s[None, :, None] - fw[None, :, None]).clamp(min=0)
            kk = kept.shape[-1]
            anchors[b, :, c0:c0 + chunk, :kk] = torch.where(kept >= 0, a, -1).to(torch.int32)
            scores[b, :, c0:c0 + chunk, :kk] = ksc
    return anchors, scores


def cells_of_anchors(anchors, pos, T, window, steps, backward_factor, forward_factor):
    """The cell [lo, hi] (int64, like anchors) behind each kept anchor (docs/nstep.md: hi =
    a + fwd unless the anchor was clamped at 0, which only the last cell can be)."""
    fwd, cell, ncell, _ = tables(T, window, steps, backward_factor, forward_factor, anchors.device)
    t = pos[:, None, :, None]
    a = anchors.long()
    e = t - min(window, T)
    hi = torch.where(a > 0, a + fwd[t], e - (ncell[t] - 1) * cell[t])
    return (hi - cell[t] + 1).clamp(min=0), hi


def nstep_search_backward(grad_scores, qs, k, key_padding_mask, query_positions, anchors, window,
                          steps, backward_factor, forward_factor, search_key, dense_below):
    """(d search_query, d key) of the kept scores s_j = q_s . key(cell_j) (docs/nstep.md):
    "anchor": key = k[last present key of the cell]; "mean": the mean of its present keys.
    Anchors are piecewise constant in the inputs, so this is the exact gradient where they do
    not change. Empty slots and the dense case contribute nothing."""
    B, Hq, Lq, D = qs.shape
    Hkv, T = k.shape[1], k.shape[2]
    dev = qs.device
    cd = torch.float64 if torch.float64 in (qs.dtype, k.dtype) else torch.float32
    dqs = torch.zeros(B, Hq, Lq, D, dtype=cd, device=dev)
    dk = torch.zeros(B * Hkv * T, D, dtype=cd, device=dev)
    if keeps_no_span(T, window, dense_below, Lq):
        return dqs.to(qs.dtype), dk.view(B, Hkv, T, D).to(k.dtype)
    pos = reference.default_positions(B, Lq, T, dev) if query_positions is None else query_positions.long()
    valid = anchors >= 0
    lo, hi = cells_of_anchors(anchors, pos, T, window, steps, backward_factor, forward_factor)
    lo, hi = torch.where(valid, lo, 0), torch.where(valid, hi, 0)
    gs = torch.where(valid, grad_scores.to(cd), torch.zeros((), dtype=cd, device=dev))
    q = qs.to(cd)
    kvrow = (torch.arange(B, device=dev)[:, None] * Hkv
             + torch.arange(Hq, device=dev)[None, :] // (Hq // Hkv))[:, :, None, None]  # [B, Hq, 1, 1]
    kf = k.to(cd).reshape(B * Hkv * T, D)
    if searches.kind(search_key).stripe_key == "anchor":
        rep = hi if key_padding_mask is None else \
            _last_present(key_padding_mask)[torch.arange(B, device=dev)[:, None, None, None], hi]
        flat = (kvrow * T + rep.clamp(min=0)).reshape(-1)
        dqs = (gs[..., None] * kf.index_select(0, flat).view(*rep.shape, D)).sum(-2)
        dk.index_add_(0, flat, (gs[..., None] * q[..., None, :]).reshape(-1, D))
        return dqs.to(qs.dtype), dk.view(B, Hkv, T, D).to(k.dtype)
    present = torch.ones(B, T, dtype=cd, device=dev) if key_padding_mask is None else key_padding_mask.to(cd)
    kp = kf.view(B, Hkv, T, D) * present[:, None, :, None]
    pre = torch.cat([torch.zeros(B, Hkv, 1, D, dtype=cd, device=dev), kp.cumsum(2)], 2).reshape(-1, D)
    cpre = torch.cat([torch.zeros(B, 1, dtype=cd, device=dev), present.cumsum(1)], 1)
    bidx = torch.arange(B, device=dev)[:, None, None, None]
    cnt = (cpre[bidx, hi + 1] - cpre[bidx, lo]).clamp(min=1.0)
    prow = kvrow * (T + 1)
    mean = (pre[(prow + hi + 1).reshape(-1)] - pre[(prow + lo).reshape(-1)]).view(*lo.shape, D) / cnt[..., None]
    dqs = (gs[..., None] * mean).sum(-2)
    c = ((gs / cnt)[..., None] * q[..., None, :]).reshape(-1, D)  # to every present key of the cell
    diff = torch.zeros(B * Hkv * (T + 1), D, dtype=cd, device=dev)
    diff.index_add_(0, (prow + lo).reshape(-1), c)
    diff.index_add_(0, (prow + hi + 1).reshape(-1), -c)
    dk = diff.view(B, Hkv, T + 1, D).cumsum(2)[:, :, :T] * present[:, None, :, None]
    return dqs.to(qs.dtype), dk.to(k.dtype)


def superlinear_attention(q, k, v, *, window, sinks, topk, steps, backward_factor, forward_factor,
                          combine, search_key, dense_below, scale, key_padding_mask=None,
                          query_positions=None, search_query=None):
    """The N-step search plus docs/spec.md's span-attention (span_power = 1/N), no validation."""
    qs = q if search_query is None else search_query
    anchors, sc = nstep_search(qs, k, key_padding_mask, query_positions, window, topk, steps,
                               backward_factor, forward_factor, search_key, dense_below)
    return reference.span_attention(q, k, v, anchors, sc, key_padding_mask, query_positions, window,
                                     sinks, span_power(steps), backward_factor, forward_factor,
                                     combine, scale, dense_below)
