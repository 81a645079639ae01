"""Brute-force oracle of docs/spec.md for tests only: Python loops over queries, explicit position sets,
float64. Independent of kernels/reference.py except for the geometry tables (which only fix how
i^(1/p) and (t+1)^r are rounded)."""

from __future__ import annotations

import math

import torch

from slcompile.kernels.geometry import num_stripes, span_extents, stripe_deltas


def candidate_spans(t, T, cfg, back, fwd, deltas):
    """[(anchor, lo, hi)] for every stripe the query at t uses, nearest first."""
    W = min(cfg["window"], T)
    out = []
    for d in deltas.tolist():
        if d > t:
            break
        if d < W:
            continue
        a = t - d
        lo = max(0, a - int(back[t]))
        hi = min(a + int(fwd[t]), t - W)
        out.append((a, lo, hi))
    return out


def oracle_attention(q, k, v, cfg, scale, key_padding_mask=None, query_positions=None,
                     search_query=None):
    B, Hq, Lq, D = q.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    g = Hq // Hkv
    qs = q if search_query is None else search_query
    q64, k64, v64, qs64 = q.double(), k.double(), v.double(), qs.double()
    keep = torch.ones(B, T, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.cpu()
    pos = (torch.arange(Lq) + T - Lq).expand(B, Lq) if query_positions is None else query_positions
    back, fwd = span_extents(T, cfg["span_power"], cfg["backward_factor"], cfg["forward_factor"])
    deltas = stripe_deltas(num_stripes(T, cfg["search_power"]), cfg["search_power"])
    W = min(cfg["window"], T)
    S = cfg["sinks"]
    out = torch.zeros(B, Hq, Lq, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // g
            for i in range(Lq):
                t = int(pos[b, i])
                visible = [j for j in range(t + 1) if keep[b, j]]
                if T <= cfg["dense_below"]:
                    sets, gates = [set(visible)], [1.0]
                else:
                    fixed = {j for j in range(min(S, t + 1))} | set(range(max(0, t - W + 1), t + 1))
                    cands = []
                    for a, lo, hi in candidate_spans(t, T, cfg, back, fwd, deltas):
                        if not keep[b, a]:
                            continue
                        if cfg["search_key"] == "anchor":
                            key = k64[b, kh, a]
                        else:
                            rows = [j for j in range(lo, hi + 1) if keep[b, j]]
                            key = k64[b, kh, rows].mean(0)
                        cands.append((float(qs64[b, h, i] @ key), t - a, lo, hi))
                    cands.sort(key=lambda x: (-x[0], x[1]))  # higher score, then nearer anchor
                    kept = cands[:cfg["topk"]]
                    if cfg["combine"] == "union" or not kept:
                        s = set(fixed)
                        for _, _, lo, hi in kept:
                            s |= set(range(lo, hi + 1))
                        sets, gates = [s], [1.0]
                    else:
                        sets = [set(fixed) | set(range(lo, hi + 1)) for _, _, lo, hi in kept]
                        sc = torch.tensor([c[0] for c in kept], dtype=torch.float64)
                        gates = torch.softmax(sc, 0).tolist()
                for s, gate in zip(sets, gates):
                    idx = sorted(j for j in s if keep[b, j])
                    if not idx:
                        continue
                    logits = (k64[b, kh, idx] @ q64[b, h, i]) * scale
                    p = torch.softmax(logits, 0)
                    out[b, h, i] += gate * (p @ v64[b, kh, idx])
    return out
