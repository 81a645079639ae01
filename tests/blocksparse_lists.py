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



def paged(g, kb, *xs, held=None, spare=3):
    """Paged copies of tensors xs [B, H, T, Dx] (T a multiple of kb; one table for all): each
    batch row and head holds the key blocks ``held`` bool [B, H, nK] (default all) in slots of a
    random order, beside ``spare`` NaN-filled slots no block maps to (a kernel reading a slot it
    was not given fails the test); blocks not held map to -1. Returns (the slots of each x
    [B, H, S * kb, Dx], ..., table int64 [B, H, nK])."""
    B, H, T = xs[0].shape[:3]
    nK = T // kb
    if held is None:
        held = torch.ones(B, H, nK, dtype=torch.bool)
    held = held.cpu()
    S = int(held.sum(-1).max()) + spare
    table = torch.full((B, H, nK), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            blocks = held[b, h].nonzero().flatten()
            table[b, h, blocks] = torch.randperm(S, generator=g)[:len(blocks)]
    out = []
    for x in xs:
        Dx = x.shape[3]
        slots = torch.full((B, H, S, kb, Dx), float("nan"), dtype=x.dtype)
        xb = x.cpu().view(B, H, nK, kb, Dx)
        for b in range(B):
            for h in range(H):
                blocks = held[b, h].nonzero().flatten()
                slots[b, h, table[b, h, blocks]] = xb[b, h, blocks]
        out.append(slots.view(B, H, S * kb, Dx).to(x.device))
    return (*out, table.to(xs[0].device))
