"""Attended lists for the block-sparse kernel tests (tests/kernels/test_triton_blocksparse*.py):
random kept blocks that obey the contract's candidate range, and the full lists the reference
builds from them."""

from __future__ import annotations

import torch
from triton_env import DEV

from slcompile.kernels import blocksparse as bs


def n_query_blocks(p0, Lq, qb):
    """Query blocks holding the queries at p0..p0+Lq-1."""
    return -(-(p0 % qb + Lq) // qb)


def random_kept(g, B, Hkv, T, *, window, sinks, topk, qb, kb, p0=0, Lq=None):
    """Random kept lists [B, Hkv, nQ, topk] of the queries at p0..p0+Lq-1 (a prefill by default):
    distinct candidate blocks of each query block (sb <= i < blocks before it - wb) in random
    slots, -1 in the others."""
    nK, sb, wb, per_q = bs.geometry(T, window, sinks, qb, kb)
    j0, nQ = p0 // qb, n_query_blocks(p0, T - p0 if Lq is None else Lq, qb)
    kept = torch.full((B, Hkv, nQ, topk), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            for n in range(nQ):
                cand = torch.arange(sb, max(sb, (j0 + n) * per_q - wb))
                cand = cand[torch.randperm(len(cand), generator=g)][:topk]
                slots = torch.randperm(topk, generator=g)[:len(cand)]
                kept[b, h, n, slots] = cand.int()
    return kept.to(DEV)


def full_lists(kept, p0, T, *, window, sinks, qb, kb):
    """The attended lists of block_attention (sinks, window, kept)."""
    nK, sb, wb, per_q = bs.geometry(T, window, sinks, qb, kb)
    return bs.attended_blocks(kept, p0 // qb, nK, sb, wb, per_q)[0]
