"""The brute-force oracles of the tests, one section per search kind, each written from its contract
only: Python loops over queries, explicit position sets, float64. Independent of the references in
kernels/ except for the geometry tables (which only fix how i^(1/p) and (t+1)^r are rounded).

* docs/spec.md (stripe searches "anchor", "mean"): `candidate_spans`, `oracle_attention`;
* docs/nstep.md (steps >= 3): `oracle_cells`, `oracle_nstep_search`, `oracle_nstep_attention`;
* docs/blocksparse.md (the default): `oracle_blocksparse`.
"""

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


# ------------------------------------------------------------------------------------------------
# docs/nstep.md: the N-step search (steps >= 3)
# ------------------------------------------------------------------------------------------------

def oracle_cells(t, T, W, N, bf, ff):
    """(s, n, f, fwd, [(j, lo, hi, anchor)]) of the query at t, straight from the definition."""
    back, fwd = span_extents(T, 1.0 / N, bf, ff)
    b, fw = int(back[t]), int(fwd[t])
    e = t - W
    s = b + fw + 1
    if e < 0:
        return s, 0, 1, fw, []
    n = e // s + 1
    f = 1
    while f ** (N - 1) < n:
        f += 1
    cells = [(j, max(0, e - (j + 1) * s + 1), e - j * s, max(0, e - j * s - fw)) for j in range(n)]
    return s, n, f, fw, cells


def oracle_nstep_search(qs, k, kpm, pos, cfg):
    """anchors / scores [B, Hq, Lq, topk] as lists, float64 scores of float32-rounded keys."""
    B, Hq, Lq, D = qs.shape
    Hkv, T = k.shape[1], k.shape[2]
    W, N, topk = min(cfg["window"], T), cfg["steps"], cfg["topk"]
    keep = torch.ones(B, T, dtype=torch.bool) if kpm is None else kpm
    out_a = torch.full((B, Hq, Lq, topk), -1, dtype=torch.int64)
    out_s = torch.full((B, Hq, Lq, topk), float("-inf"), dtype=torch.float64)
    if T <= cfg["dense_below"] or W >= T:
        return out_a, out_s
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Lq):
                t = int(pos[b, i])
                s, n, f, fw, cells = oracle_cells(t, T, W, N, cfg["backward_factor"], cfg["forward_factor"])
                if n == 0:
                    continue
                e = t - W

                def region(level, g):
                    P = f ** level
                    lo, hi = max(0, e - min((g + 1) * P, n) * s + 1), e - g * P * s
                    present = [x for x in range(lo, hi + 1) if keep[b, x]]
                    if not present:
                        return float("-inf")
                    if cfg["search_key"] == "anchor":
                        key = k[b, kh, present[-1]].double()
                    else:
                        key = k[b, kh, present].double().mean(0).float().double()
                    return float(qs[b, h, i].double() @ key)

                level = N - 2
                cands = list(range(-(-n // f ** level)))
                while True:
                    scored = sorted(((region(level, g), g) for g in cands), key=lambda x: (-x[0], x[1]))
                    kept = [(sc, g) for sc, g in scored if sc > float("-inf")][:topk]
                    if level == 0:
                        break
                    level -= 1
                    nreg = -(-n // f ** level)
                    cands = [g * f + c for _, g in kept for c in range(f) if g * f + c < nreg]
                for j, (sc, g) in enumerate(kept):
                    out_a[b, h, i, j] = cells[g][3]
                    out_s[b, h, i, j] = sc
    return out_a, out_s


def oracle_nstep_attention(q, k, v, cfg, scale, kpm, pos, anchors, scores):
    """docs/spec.md step 2 over explicit sets, given the oracle's anchors (span power 1/N)."""
    B, Hq, Lq, D = q.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    W, S = min(cfg["window"], T), cfg["sinks"]
    keep = torch.ones(B, T, dtype=torch.bool) if kpm is None else kpm
    back, fwd = span_extents(T, 1.0 / cfg["steps"], cfg["backward_factor"], cfg["forward_factor"])
    out = torch.zeros(B, Hq, Lq, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Lq):
                t = int(pos[b, i])
                if T <= cfg["dense_below"]:
                    sets, gates = [set(range(t + 1))], [1.0]
                else:
                    fixed = set(range(min(S, t + 1))) | set(range(max(0, t - W + 1), t + 1))
                    spans = []
                    for a, sc in zip(anchors[b, h, i].tolist(), scores[b, h, i].tolist()):
                        if a >= 0:
                            spans.append((set(range(max(0, a - int(back[t])), min(a + int(fwd[t]), t - W) + 1)), sc))
                    if cfg["combine"] == "union" or not spans:
                        sets, gates = [fixed.union(*[sp for sp, _ in spans])], [1.0]
                    else:
                        sets = [fixed | sp for sp, _ in spans]
                        gates = torch.softmax(torch.tensor([sc for _, sc in spans], dtype=torch.float64), 0).tolist()
                for st, gate in zip(sets, gates):
                    idx = sorted(x for x in st if keep[b, x])
                    if idx:
                        p = torch.softmax((k[b, kh, idx].double() @ q[b, h, i].double()) * scale, 0)
                        out[b, h, i] += gate * (p @ v[b, kh, idx].double())
    return out


# ------------------------------------------------------------------------------------------------
# docs/blocksparse.md: search_key="blocksparse" (the default)
# ------------------------------------------------------------------------------------------------

def oracle_blocksparse(q, k, v, kpm, p0, *, window, sinks, topk, qb, kb, scale, r2=0, F=1,
                       spread=False, R=8, P=8):
    """Python loops over the contract, float64: (kept sets {(b, h, j): set}, scores, output). R:
    representative rows of stage 1 (r2: of stage 2, 0: R); P: the pool; F: key blocks per
    stage-1 group; spread: representative rows qb // rows apart."""
    B, Hq, Lq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    q64, k64, v64 = q.double(), k.double(), v.double()
    present = torch.ones(B, T, dtype=torch.bool) if kpm is None else kpm
    sb, wb = math.ceil(sinks / kb), math.ceil(min(window, T) / kb)
    out = torch.zeros(B, Hq, Lq, v.shape[3], dtype=torch.float64)
    kept_all, scores_all = {}, {}
    pos = list(range(p0, p0 + Lq))

    def keys_of(b, first, last):  # present keys of key blocks first..last-1
        return [x for x in range(first * kb, min(T, last * kb)) if present[b, x]]

    for b in range(B):
        for h in range(Hkv):
            heads = list(range(h * G, (h + 1) * G))
            for j in sorted({t // qb for t in pos}):
                inblk = [t for t in pos if t // qb == j]

                def reps(n):  # the block's last row in the call and the n - 1 before it
                    step = qb // n if spread else 1
                    return [t - p0 if t >= inblk[0] else inblk[-1] - p0
                            for t in (inblk[-1] - step * r for r in range(n))]

                ri, ri2 = reps(R), reps(r2 or R)
                before = j * qb // kb
                cand_blocks = [i for i in range(sb, before - wb) if keys_of(b, i, i + 1)]
                groups = []  # stage 1: (bound, group) of every group holding a candidate block
                for g in sorted({i // F for i in cand_blocks}):
                    keys = keys_of(b, g * F, (g + 1) * F)
                    assert max(keys) < j * qb  # the contract's window rule: nothing of the block
                    kk = k64[b, h, keys]
                    kmax, kmin = kk.max(0).values, kk.min(0).values
                    bound = max(float(torch.maximum(qr * kmax, qr * kmin).sum())
                                for hh in heads for qr in q64[b, hh, ri])
                    groups.append((bound, g))
                groups.sort(reverse=True)
                kept_groups = {g for _, g in groups[:math.ceil(P * topk / F)]}
                cands, pool = [(bd, g) for bd, g in groups], []
                for i in cand_blocks:
                    if i // F in kept_groups:
                        kk = k64[b, h, keys_of(b, i, i + 1)]
                        exact = max(float((q64[b, hh, ri2] @ kk.T).max()) for hh in heads)
                        pool.append((exact, i))
                pool.sort(reverse=True)
                kept = [c[1] for c in pool[:topk]]
                kept_all[(b, h, j)] = set(kept)
                scores_all[(b, h, j)] = (cands, pool)
                blocks = set(range(min(sb, before))) | set(range(max(sb, before - wb), before))
                blocks |= set(kept)
                for t in [t for t in pos if t // qb == j]:
                    keys = [x for blk in blocks for x in range(blk * kb, min(T, (blk + 1) * kb))]
                    keys += list(range(j * qb, t + 1))
                    keys = sorted(x for x in set(keys) if present[b, x])
                    if not keys:
                        continue
                    for hh in heads:
                        lg = (q64[b, hh, t - p0] @ k64[b, h, keys].T) * scale
                        out[b, hh, t - p0] = torch.softmax(lg, 0) @ v64[b, h, keys]
    return kept_all, scores_all, out
