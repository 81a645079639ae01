"""Sequence-parallel superlinear attention over ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

The sequence is cut into equal contiguous chunks, one per rank of the process group: group rank r
holds the queries, keys and values of positions [r*C, (r+1)*C). Each query's whole softmax is
computed on the rank that holds the query, by the single-device ops (``torch.ops.superlinear``: the
reference on CPU, the Triton kernels on CUDA) over a local key buffer in which the rank's own chunk
is filled in and, of the earlier chunks, only the rows the query's selection reads (a buffer of
the (r+1)*C positions; for the block-sparse search, paged: see Memory below):

1. **search rows**: the keys span-search scores. With ``search_key="anchor"`` these are the stripe
   anchors t - delta_i of the rank's queries (delta_i >= W), computed from the geometry alone, so
   every rank knows them before any data moves; ``"mean"`` summarises every earlier key, so it
   fetches all earlier K (and no V). ``"blocksparse"`` (docs/blocksparse.md): its
   stage 1 reads summaries of groups of key blocks only, so the ranks all-gather those ([kmax |
   kmin] per group: 2 rows per ``summary_keys`` keys), run stage 1 for their queries and fetch K
   of the candidate groups' blocks, which stage 2 reads. (With a key-padding mask, or chunks
   that cut a stage-1 group, it fetches every earlier K and V instead.)
2. the search runs locally, giving each query its kept anchors (or each query block its kept
   key blocks: the op's own search over the buffer, with the gathered summaries);
3. **attention rows**: K and V of the blocks the kept spans or blocks, the window and the sinks
   (the first keys, on rank 0) touch, per batch row and kv head; K rows already fetched in 1 are
   not fetched again.

Rows travel in blocks of ``block`` rows of one (batch row, kv head); a rank asks each owner for its
blocks with three ``all_to_all_single`` calls (request counts, block indices, block rows). Later
chunks are never read (causality), so rank 0 receives nothing. Since every attended key of a query
is present in the buffer, and the ops see the query at its global position (bottom-right
alignment over the (r+1)*C keys), the result equals single-device superlinear attention on the
whole sequence: no partial softmax crosses a rank, and the exact log-sum-exp merge of the sinks,
window and span partials is the one the ops already do. Rows of the buffer that are not fetched
hold zeros and are never attended.

``comm="all_gather"`` is the baseline: ``all_gather`` every chunk's K and V (and use the first r+1
of them) and run the same local compute.

``layout="zigzag"`` balances the work: the sequence is cut into 2P chunks of h = C/2 and rank r
holds chunks r and 2P-1-r (an early and a late piece), since a late query costs more than an early
one (longer searches, longer spans). Each piece runs as the bottom-right queries of the keys up
to its end, over one key buffer of the (2P-r)*h positions up to the late piece's end. With ``comm="all_gather"`` every chunk's K and V are
gathered. ``comm="selective"`` (the default for ``search_key="blocksparse"``) fills the buffer
with the rank's own two chunks and, fetched from their owners (position p lies in chunk p // h,
held by rank c if c < P, else by rank 2P-1-c as its second piece), the rows the selection reads:
the group summaries are all-gathered, stage 1 runs for both pieces, K of the candidate groups'
blocks is fetched, then K and V of the kept blocks, window and sinks, as above. (With a
key-padding mask, T <= dense_below, or h not a multiple of the stage-1 group, it fetches every row
of the buffer instead.) The span searches (``"anchor"``, ``"mean"``) refuse
selective zigzag (their rows are only worked out for contiguous chunks) and take all_gather by
default. Both are exact against one device.

With ``search_key="blocksparse"`` a query block's rows must sit on one rank (a query block is
chosen from its own last rows): the local length C (contiguous) or C/2 (zigzag) must be a
multiple of ``q_block``, else every rank raises.

Bytes are counted as logical payload exchanged with other ranks (a rank's own chunk is not
counted); see `CommStats`.

Memory. The block-sparse selective path (the default's, both layouts) holds paged buffers
(`_Pages`: slots of ``k_block`` rows and a block table, read by the search and attention kernels
as `blocksparse.check_table` describes): the rank's own rows and the key blocks its selection
reads, first K of stage 2's candidate blocks, then K and V of the attended ones. Per-rank memory
then follows the selection (at most C + the rank's query blocks x (candidate + kept + window +
sink blocks) rows a kv head) instead of the length, beside the group summaries of the whole
sequence (2 rows per ``summary_keys`` keys). ``CommStats.held_rows`` reports it. Elsewhere (the
span searches' selective path, and block-sparse with a padding mask, T <= dense_below or chunks
that cut a stage-1 group) the K and V buffers are allocated at full length, zeros where a row was
not fetched: (r+1)*C positions (contiguous; the last rank: the whole T) or (2P-r)*C/2 (zigzag;
rank 0: the whole T), O(T) in the worst rank as for all_gather (which in zigzag also holds the P
gathered chunks beside their concatenation: 2T rows); with a padding mask, the whole mask (one
bool per key).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import lowering
from .config import SuperlinearConfig
from .geometry import num_stripes, stripe_deltas, span_extents

COMM_MODES = ("selective", "all_gather")
LAYOUTS = ("contiguous", "zigzag")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NAME = "sequence_parallel_superlinear_attention"
# Meta vector every rank shares before any data moves (validation across ranks).
_META = ("ok", "B", "Hq", "Hkv", "C", "D", "Dv", "dtype", "cuda", "has_mask", "has_search_query")


@dataclass
class CommStats:
    """Bytes one rank exchanged with the other ranks of the group in one call.

    Logical payload: what the rank put into collectives for other ranks (``sent``) and took out of
    them from other ranks (``received``); its own chunk is not counted (an ``all_gather`` of n bytes
    over P ranks counts (P-1)*n each way). Categories: ``"meta"`` (shape check), ``"mask"`` (key
    padding mask), ``"summary"`` (block-sparse stage-1 group summaries), ``"count"`` and
    ``"index"`` (block requests), ``"k"`` and ``"v"`` (rows of K and V; a block at the end of a
    chunk that is not a multiple of ``block`` travels padded).
    ``k_blocks``/``v_blocks``: blocks of (block rows, one batch row, one kv head) this rank
    requested. ``held_rows``: the key rows per (batch row, kv head) of its largest key buffer
    (the paged path keeps two in turn, stage 2's candidates and the attended blocks, with a
    value buffer as long as the second; elsewhere the buffer length)."""

    rank: int
    world_size: int
    block: int
    sent: Dict[str, int] = field(default_factory=dict)
    received: Dict[str, int] = field(default_factory=dict)
    k_blocks: int = 0
    v_blocks: int = 0
    held_rows: int = 0

    def add(self, category: str, sent: int, received: int) -> None:
        self.sent[category] = self.sent.get(category, 0) + int(sent)
        self.received[category] = self.received.get(category, 0) + int(received)

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.received.values())


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

def _meta_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local_problem(q, k, v, qs, kpm, backend) -> Optional[str]:
    """What is wrong with this rank's inputs, or None."""
    for name, t in (("q_local", q), ("k_local", k), ("v_local", v)):
        if not isinstance(t, Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() != 4:
            return f"{name} must be 4-D [B, H, C, D], got shape {tuple(t.shape)}"
        if t.dtype not in _FLOAT_DTYPES:
            return f"{name} dtype {t.dtype} is not a floating type"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q_local, k_local, v_local must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"q_local, k_local, v_local must be on one device, got {q.device}, {k.device}, {v.device}"
    if backend == "nccl" and q.device.type != "cuda":
        return f"the NCCL backend needs CUDA tensors, got {q.device}"
    B, Hq, C, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        return f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}"
    if k.shape[2] != C or v.shape[2] != C:
        return f"queries and keys/values must cover the same chunk: q {C}, k {k.shape[2]}, v {v.shape[2]} positions"
    if k.shape[1] != v.shape[1]:
        return f"k_local and v_local head counts differ: {k.shape[1]} vs {v.shape[1]}"
    if k.shape[3] != D:
        return f"query head dim {D} != key head dim {k.shape[3]}"
    if C == 0 or Hq == 0 or k.shape[1] == 0 or D == 0 or v.shape[3] == 0:
        return f"empty chunk, heads or head dim: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if Hq % k.shape[1] != 0:
        return f"query heads {Hq} are not a multiple of key/value heads {k.shape[1]}"
    if qs is not None:
        if not isinstance(qs, Tensor) or tuple(qs.shape) != tuple(q.shape) or qs.dtype != q.dtype \
                or qs.device != q.device:
            got = tuple(qs.shape) if isinstance(qs, Tensor) else type(qs).__name__
            return f"search_query_local must match q_local (shape {tuple(q.shape)}, {q.dtype}, {q.device}), got {got}"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, qs)):
        return ("gradients do not flow across ranks (the collectives are not differentiable): "
                "call it under torch.no_grad() or with inputs that do not require grad")
    if kpm is not None:
        if not isinstance(kpm, Tensor) or kpm.dtype != torch.bool:
            return "key_padding_mask_local must be a bool tensor (True = key present)"
        if tuple(kpm.shape) != (B, C) or kpm.device != q.device:
            return f"key_padding_mask_local must be [B, C] = {(B, C)} on {q.device}, got {tuple(kpm.shape)} on {kpm.device}"
    return None


def _check_group(q, k, v, qs, kpm, group, stats) -> Tuple[int, int]:
    """Validate every rank's inputs together (so that all ranks raise, none hangs in a collective).
    Returns (rank, world size)."""
    rank, P = dist.get_rank(group), dist.get_world_size(group)
    problem = _local_problem(q, k, v, qs, kpm, dist.get_backend(group))
    if problem is None:
        B, Hq, C, D = q.shape
        meta = [1, B, Hq, k.shape[1], C, D, v.shape[3], _FLOAT_DTYPES.index(q.dtype),
                int(q.device.type == "cuda"), int(kpm is not None), int(qs is not None)]
    else:
        meta = [0] * len(_META)
    mine = torch.tensor(meta, dtype=torch.int64, device=_meta_device(group))
    every = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(every, mine, group=group)
    stats.add("meta", (P - 1) * mine.numel() * 8, (P - 1) * mine.numel() * 8)
    rows = [e.tolist() for e in every]
    if problem is not None:
        raise ValueError(f"{_NAME}: rank {rank}: {problem}")
    bad = [i for i, m in enumerate(rows) if m[0] == 0]
    if bad:
        raise ValueError(f"{_NAME}: rank(s) {bad} of the group passed invalid inputs (see their error)")
    if any(m != rows[0] for m in rows):
        desc = "; ".join(f"rank {i}: " + ", ".join(f"{n}={x}" for n, x in zip(_META[1:], m[1:]))
                         for i, m in enumerate(rows))
        raise ValueError(f"{_NAME}: every rank must hold an equal contiguous chunk with the same "
                         f"shapes, dtype, device type and optional inputs; got {desc}")
    return rank, P


# --------------------------------------------------------------------------------------------
# moving rows
# --------------------------------------------------------------------------------------------

def _all_to_all(out: Tensor, inp: Tensor, out_splits: List[int], in_splits: List[int], group) -> None:
    dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits,
                           group=group)


def _fetch_blocks(buf: Tensor, x: Tensor, need: Tensor, block: int, group, stats: CommStats,
                  category: str, place=None, pages: Optional["_Pages"] = None) -> int:
    """Copy into ``buf`` [B, H, Tl, Dx] the blocks ``need`` [P, B, H, nb] (owner rank, batch
    row, head, block of the owner's chunk) from their owners; serve the blocks other ranks ask of
    this rank's ``x`` [B, H, C, Dx]. ``place(owner, row)`` gives the sequence position of row
    ``row`` of ``owner``'s chunk (int64 tensors; default: the contiguous owner * C + row); rows
    at or past Tl are dropped. With ``pages``, buf holds their slots and a row goes to its key
    block's slot (rows of blocks not held are dropped). Collective: every rank of the group calls
    it. Returns the number of blocks requested."""
    rank, P = dist.get_rank(group), dist.get_world_size(group)
    B, H, C, Dx = x.shape
    nb = need.shape[-1]
    dev = x.device
    # 1. how many blocks each rank asks of each owner
    reqs = [torch.nonzero(need[q].reshape(-1)).flatten() for q in range(P)]
    send_counts = [int(r_.numel()) for r_ in reqs]
    counts_in = torch.tensor(send_counts, dtype=torch.int64, device=dev)
    counts_out = torch.empty_like(counts_in)
    _all_to_all(counts_out, counts_in, [1] * P, [1] * P, group)
    recv_counts = counts_out.tolist()
    stats.add("count", 8 * (P - 1), 8 * (P - 1))
    # 2. which blocks (flat index into [B, H, nb] of the owner)
    send_idx = torch.cat(reqs)
    recv_idx = torch.empty(sum(recv_counts), dtype=torch.int64, device=dev)
    _all_to_all(recv_idx, send_idx, recv_counts, send_counts, group)
    stats.add("index", 8 * (sum(send_counts) - send_counts[rank]),
              8 * (sum(recv_counts) - recv_counts[rank]))
    # 3. the rows, as raw bytes (any dtype over any backend)
    padded = x
    if nb * block != C:
        padded = torch.zeros(B, H, nb * block, Dx, dtype=x.dtype, device=dev)
        padded[:, :, :C] = x
    blocks = padded.reshape(B * H * nb, block, Dx)
    row_bytes = block * Dx * x.element_size()
    payload = blocks.index_select(0, recv_idx).view(torch.uint8).reshape(recv_idx.numel(), row_bytes)
    got = torch.empty(sum(send_counts), row_bytes, dtype=torch.uint8, device=dev)
    _all_to_all(got, payload, send_counts, recv_counts, group)
    stats.add(category, row_bytes * (sum(recv_counts) - recv_counts[rank]),
              row_bytes * (sum(send_counts) - send_counts[rank]))
    # 4. into place: owner q's block j holds its rows j*block + [0, block) (< C), at positions
    # q*C + row (contiguous) or place(q, row)
    if got.numel():
        data = got.view(x.dtype).view(-1, block, Dx)
        owner = torch.repeat_interleave(torch.arange(P, device=dev),
                                        torch.tensor(send_counts, device=dev))
        j = send_idx % nb
        bh = torch.div(send_idx, nb, rounding_mode="floor")  # b * H + h
        off = j[:, None] * block + torch.arange(block, device=dev)[None, :]  # [n, block]
        Tl = buf.shape[2]
        if place is None:
            pos = owner[:, None] * C + off
        else:
            pos = place(owner[:, None].expand_as(off), off)
        if pages is not None:
            keep = (off < C) & (pos < pages.length)
            row = pages.rows(bh[:, None].expand_as(pos), torch.where(keep, pos, 0))
            keep &= row >= 0
            flat, data = (bh[:, None] * Tl + row)[keep], data[keep]
        elif place is None and nb * block == C:  # no padded rows
            flat, data = (bh[:, None] * Tl + pos).reshape(-1), data.reshape(-1, Dx)
        else:
            keep = (off < C) & (pos < Tl)
            flat, data = (bh[:, None] * Tl + pos)[keep], data[keep]
        buf.view(B * H * Tl, Dx).index_copy_(0, flat, data)
    return sum(send_counts)


class _Pages:
    """The key blocks a rank holds (the block-sparse selective path): per (batch row, kv head),
    slots of ``k_block`` rows and ``table`` int64 [B, H, nK] giving each key block of the
    positions [0, nK * k_block) its slot, -1 where not held (`blocksparse.check_table`). Buffers
    are [B, H, slots * k_block, Dx], so a rank holds what its selection reads, not the whole
    prefix."""

    def __init__(self, held: Tensor, k_block: int):
        self.k_block = k_block
        self.length = held.shape[2] * k_block
        self.table = torch.cumsum(held.long(), -1) - 1
        self.table.masked_fill_(~held, -1)

    @property
    def slots(self) -> int:
        return int(self.table.max()) + 1 if self.table.numel() else 0

    def buffer(self, like: Tensor, Dx: int) -> Tensor:
        B, H = self.table.shape[:2]
        return like.new_zeros(B, H, self.slots * self.k_block, Dx)

    def rows(self, bh: Tensor, pos: Tensor) -> Tensor:
        """Buffer rows of positions pos (int64, < length) of the flat (batch row, head) bh; -1
        where the block is not held."""
        nK = self.table.shape[2]
        slot = self.table.reshape(-1)[bh * nK + torch.div(pos, self.k_block, rounding_mode="floor")]
        return torch.where(slot >= 0, slot * self.k_block + pos % self.k_block, -1)

    def put(self, buf: Tensor, x: Tensor, start: int) -> None:
        """Write x [B, H, n, Dx] (whole blocks) as the rows of positions start.. (held)."""
        B, H, n, Dx = x.shape
        kb = self.k_block
        S = buf.shape[2] // kb
        slot = self.table[:, :, start // kb:(start + n) // kb]
        flat = (torch.arange(B * H, device=x.device).view(B, H, 1) * S + slot).reshape(-1)
        buf.view(B * H * S, kb, Dx).index_copy_(0, flat, x.reshape(-1, kb, Dx))

    def copy_held(self, buf: Tensor, other: "_Pages", obuf: Tensor) -> None:
        """Copy into buf the blocks both these pages and ``other`` (buffer obuf) hold."""
        B, H, nK = self.table.shape
        kb, Dx = self.k_block, buf.shape[3]
        both = (self.table >= 0) & (other.table >= 0)
        bh = torch.arange(B * H, device=buf.device).view(B, H, 1).expand(B, H, nK)[both]
        src = bh * (obuf.shape[2] // kb) + other.table[both]
        dst = bh * (buf.shape[2] // kb) + self.table[both]
        buf.view(-1, kb, Dx).index_copy_(0, dst, obuf.view(-1, kb, Dx).index_select(0, src))


def _held_blocks(need: Tensor, C: int, block: int, nK: int, k_block: int, place) -> Tensor:
    """bool [B, H, nK]: the key blocks that rows of the transfer blocks ``need`` [P, B, H, nb]
    (owner's rows j*block.., placed by ``place(owner, row)``) fall in."""
    P, B, H, nb = need.shape
    dev = need.device
    rows = need.repeat_interleave(block, -1)[..., :C].permute(1, 2, 0, 3).reshape(B, H, P * C)
    owner = torch.arange(P, device=dev)[:, None].expand(P, C)
    pos = place(owner, torch.arange(C, device=dev)[None, :].expand(P, C)).reshape(-1)
    blk = torch.where(pos < nK * k_block, torch.div(pos, k_block, rounding_mode="floor"), nK)
    hit = torch.zeros(B, H, nK + 1, dtype=torch.int32, device=dev)
    hit.index_add_(2, blk, rows.to(torch.int32))
    return hit[:, :, :nK] > 0


def _positions_to_blocks(need_pos: Tensor, C: int, block: int, P: int) -> Tensor:
    """need_pos bool [B, H, r*C] (earlier positions) -> need bool [P, B, H, nb] per owner block."""
    B, H, L = need_pos.shape
    r = L // C
    nb = -(-C // block)
    x = need_pos.view(B, H, r, C)
    if nb * block != C:
        x = torch.nn.functional.pad(x, (0, nb * block - C))
    blocks = x.view(B, H, r, nb, block).any(-1).permute(2, 0, 1, 3)  # [r, B, H, nb]
    out = torch.zeros(P, B, H, nb, dtype=torch.bool, device=need_pos.device)
    out[:r] = blocks
    return out


def _mark_ranges(diff: Tensor, lo: Tensor, hi: Tensor) -> None:
    """Difference array of ranges: diff int32 [N, L+1], lo/hi int64 [N, n]. Adds +1 at lo and -1
    at hi+1 of every range of row i with lo <= hi < L, so that cumsum(diff[i, :L]) > 0 exactly on
    the union of row i's ranges."""
    ok = lo <= hi
    ones = ok.to(diff.dtype)
    diff.scatter_add_(-1, torch.where(ok, lo, 0), ones)
    diff.scatter_add_(-1, torch.where(ok, hi + 1, 0), -ones)


def _search_need(B: int, Hkv: int, rank: int, C: int, T: int, cfg: SuperlinearConfig,
                 dev) -> Tensor:
    """bool [B, Hkv, rank*C]: earlier key positions span-search reads for this rank's queries."""
    L = rank * C
    if cfg.kind.stripe_key != "anchor":  # "mean" summarises every earlier key
        return torch.ones(B, Hkv, L, dtype=torch.bool, device=dev)
    deltas = stripe_deltas(num_stripes(T, cfg.search_power), cfg.search_power, dev)
    deltas = deltas[deltas >= cfg.window]
    # queries t in [L, L + C) read anchors t - delta: the range [L - delta, L + C - 1 - delta]
    lo = (L - deltas).clamp(min=0)
    hi = (L + C - 1 - deltas).clamp(max=L - 1)
    diff = torch.zeros(1, L + 1, dtype=torch.int32, device=dev)
    _mark_ranges(diff, lo[None], hi[None])
    need = torch.cumsum(diff[:, :L], dim=-1) > 0
    return need.expand(B, Hkv, L)


def _attention_need(anchors: Tensor, B: int, Hkv: int, rank: int, C: int, T: int,
                    cfg: SuperlinearConfig) -> Tensor:
    """bool [B, Hkv, rank*C]: earlier key positions span-attention reads for this rank's queries
    (kept spans, window, sinks), per batch row and kv head."""
    dev = anchors.device
    L = rank * C
    W, S = min(cfg.window, T), min(cfg.sinks, T)
    g = anchors.shape[1] // Hkv
    back, fwd = span_extents(L + C, cfg.span_power, cfg.backward_factor, cfg.forward_factor, dev)
    t = torch.arange(L, L + C, device=dev)
    diff = torch.zeros(B * Hkv, L + 1, dtype=torch.int32, device=dev)
    for b in range(B):
        for h in range(Hkv):
            a = anchors[b, h * g:(h + 1) * g].long()  # [g, C, k]
            lo = (a - back[t][None, :, None]).clamp(min=S)  # sinks are marked below
            hi = torch.minimum(a + fwd[t][None, :, None], t[None, :, None] - W).clamp(max=L - 1)
            hi = torch.where(a >= 0, hi, lo - 1)
            _mark_ranges(diff[b * Hkv + h:b * Hkv + h + 1], lo.reshape(1, -1), hi.reshape(1, -1))
    need = torch.cumsum(diff[:, :L], dim=-1) > 0
    if W > 0:  # the window of the first query, L, reaches furthest back
        need[:, max(S, L - W + 1):L] = True
    need[:, :min(S, L)] = True
    return need.view(B, Hkv, L)


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------

def sequence_parallel_superlinear_attention(
    q_local: Tensor,
    k_local: Tensor,
    v_local: Tensor,
    *,
    config: Optional[SuperlinearConfig] = None,
    group=None,
    scale: Optional[float] = None,
    search_query_local: Optional[Tensor] = None,
    key_padding_mask_local: Optional[Tensor] = None,
    comm: Optional[str] = None,
    block: int = 64,
    return_stats: bool = False,
    layout: str = "contiguous",
):
    """Superlinear causal attention (docs/spec.md) of a sequence split across the ranks of ``group``.

    With ``layout="contiguous"`` group rank r holds positions [r*C, (r+1)*C) of the sequence; with
    ``layout="zigzag"`` the sequence is cut into 2 * world_size chunks of C/2 and rank r holds
    chunks r and 2*world_size - 1 - r, concatenated (an early and a late piece: every rank does
    about the same work, where contiguous chunks leave the last rank the most). Every rank holds C
    positions, so the sequence has T = world_size * C tokens. Collective: every rank calls it
    with the same config and options.

    Args:
        q_local: [B, Hq, C, D] queries of this rank's chunk.
        k_local, v_local: [B, Hkv, C, D] / [B, Hkv, C, Dv] keys and values of the chunk; Hq must
            be a multiple of Hkv (query head h reads kv head h // (Hq / Hkv)).
        config: `SuperlinearConfig` (defaults if None); ``dense_below`` applies to T.
        group: process group (default: the world).
        scale: softmax scale; overrides ``config.scale``; default 1/sqrt(D).
        search_query_local: [B, Hq, C, D] search queries (default: ``q_local``).
        key_padding_mask_local: bool [B, C], True where the key exists.
        comm: ``"selective"`` (move only the rows the selection reads; with zigzag, for
            search_key="blocksparse" only: a span search raises ValueError) or
            ``"all_gather"`` (gather every chunk's K and V). None: selective, except for zigzag
            with a span search (all_gather).
        layout: ``"contiguous"`` or ``"zigzag"`` (above). With zigzag and
            search_key="blocksparse", C/2 must be a multiple of ``q_block`` (a query block is
            chosen from its own last rows, so its rows must sit on one rank).
        block: rows per transferred block (selective).
        return_stats: also return a `CommStats` of the bytes this rank exchanged.

    Returns:
        [B, Hq, C, Dv] in q's dtype, equal to the rows this rank holds (in its layout) of
        single-device ``superlinear_attention`` over the whole sequence; with ``return_stats``,
        (out, stats).
    """
    if config is None:
        config = SuperlinearConfig()
    if not isinstance(config, SuperlinearConfig):
        raise TypeError(f"{_NAME}: config must be a SuperlinearConfig, got {type(config).__name__}")
    if config.steps != 2:
        raise ValueError(f"{_NAME}: config.steps={config.steps} (the N-step search of docs/nstep.md) is "
                         f"not supported across ranks yet; only steps=2 (docs/spec.md's stripe search)")
    bsp = config.kind.block_sparse
    if bsp and search_query_local is not None:
        raise ValueError(f"{_NAME}: search_key='blocksparse' selects with the attention query; "
                         "search_query_local is not supported")
    if layout not in LAYOUTS:
        raise ValueError(f"{_NAME}: layout={layout!r} is invalid: expected one of {LAYOUTS}")
    if comm is None:  # selective wherever it is built
        comm = "selective" if layout == "contiguous" or bsp else "all_gather"
    if comm not in COMM_MODES:
        raise ValueError(f"{_NAME}: comm={comm!r} is invalid: expected one of {COMM_MODES}")
    if layout == "zigzag" and comm == "selective" and not bsp:
        raise ValueError(f"{_NAME}: layout='zigzag' with comm='selective' needs "
                         f"search_key='blocksparse' (the rows a span search reads are only "
                         f"worked out for contiguous chunks); search_key="
                         f"{config.search_key!r} with zigzag takes comm='all_gather'")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{_NAME}: block={block!r} is invalid: expected an int >= 1")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"{_NAME}: scale must be None or a finite number > 0, got {scale!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_NAME}: torch.distributed is not initialised (call init_process_group first)")
    stats = CommStats(rank=dist.get_rank(group), world_size=dist.get_world_size(group), block=block)
    rank, P = _check_group(q_local, k_local, v_local, search_query_local, key_padding_mask_local,
                           group, stats)
    B, Hq, C, D = q_local.shape
    Hkv, Dv = k_local.shape[1], v_local.shape[3]
    T, L = P * C, rank * C
    if scale is None:
        scale = config.scale if config.scale is not None else 1.0 / math.sqrt(D)
    dev = q_local.device
    dense = T <= config.dense_below  # decided on the whole sequence, as on one device
    if layout == "zigzag":
        return _zigzag(q_local, k_local, v_local, search_query_local, key_padding_mask_local,
                       config, float(scale), dense, comm, block, group, rank, P, stats,
                       return_stats)

    if bsp and not dense and C % config.q_block:
        raise ValueError(f"{_NAME}: search_key='blocksparse' needs the local length C = {C} to be "
                         f"a multiple of q_block={config.q_block} (a query block is chosen from "
                         f"its own last rows, so its rows must sit on one rank)")
    mask = None
    if key_padding_mask_local is not None:  # [B, T]: one bit per key, cheap next to K/V
        parts = [torch.empty_like(key_padding_mask_local) for _ in range(P)]
        dist.all_gather(parts, key_padding_mask_local.contiguous(), group=group)
        stats.add("mask", (P - 1) * B * C, (P - 1) * B * C)
        mask = torch.cat(parts[:rank + 1], dim=1)

    gspan = _summary_keys(config)
    if comm == "all_gather":
        ks = [torch.empty_like(k_local) for _ in range(P)]
        vs = [torch.empty_like(v_local) for _ in range(P)]
        dist.all_gather(ks, k_local.contiguous(), group=group)
        dist.all_gather(vs, v_local.contiguous(), group=group)
        stats.add("k", (P - 1) * k_local.nbytes, (P - 1) * k_local.nbytes)
        stats.add("v", (P - 1) * v_local.nbytes, (P - 1) * v_local.nbytes)
        kbuf, vbuf = torch.cat(ks[:rank + 1], dim=2), torch.cat(vs[:rank + 1], dim=2)
        if not bsp:
            anchors, scores = _search(q_local, search_query_local, kbuf, mask, config, dense)
    elif bsp and not dense and mask is None and C % gspan == 0:
        # the block-sparse selection, read from gathered group summaries: paged buffers
        summary = _gather_summaries(k_local, gspan, group, stats)[:, :, :(L + C) // gspan]
        out = _blocksparse_paged(
            q_local, k_local, v_local, config, float(scale), [(slice(0, C), L)], L + C, summary,
            lambda pos: _positions_to_blocks(pos[:, :, :L], C, block, P),
            lambda owner, row: owner * C + row, block, group, stats)
        return (out, stats) if return_stats else out
    else:
        kbuf = k_local.new_zeros(B, Hkv, L + C, D)
        vbuf = v_local.new_zeros(B, Hkv, L + C, Dv)
        kbuf[:, :, L:] = k_local
        vbuf[:, :, L:] = v_local
        nb = -(-C // block)
        have_k = torch.zeros(P, B, Hkv, nb, dtype=torch.bool, device=dev)
        if not dense and not bsp:  # 1. the keys span-search reads
            need = _positions_to_blocks(_search_need(B, Hkv, rank, C, T, config, dev), C, block, P)
            stats.k_blocks += _fetch_blocks(kbuf, k_local, need, block, group, stats, "k")
            have_k = need
        if not bsp:
            anchors, scores = _search(q_local, search_query_local, kbuf, mask, config, dense)
        # 2. K and V of what is attended: the kept spans, the window and the sinks (dense, and
        # block-sparse with a padding mask or chunks that cut a stage-1 group: every earlier key)
        if dense or bsp:
            need = torch.ones(P, B, Hkv, nb, dtype=torch.bool, device=dev)
            need[rank:] = False
        else:
            need = _positions_to_blocks(_attention_need(anchors, B, Hkv, rank, C, T, config),
                                        C, block, P)
        stats.k_blocks += _fetch_blocks(kbuf, k_local, need & ~have_k, block, group, stats, "k")
        stats.v_blocks += _fetch_blocks(vbuf, v_local, need, block, group, stats, "v")
    stats.held_rows = kbuf.shape[2]
    out = _attend(q_local, kbuf, vbuf, mask, config, float(scale), dense,
                  None if bsp else (anchors, scores))
    return (out, stats) if return_stats else out


def _summary_keys(c: SuperlinearConfig) -> int:
    from .blocksparse import summary_keys
    return summary_keys(c.window, c.k_block, c.block_group)


def _units_to_positions(idx: Tensor, n: int, unit: int) -> Tensor:
    """bool [B, H, n * unit]: the positions of the units (groups or blocks of ``unit`` keys)
    listed in idx [B, H, ...] that lie before unit n (-1 and units >= n are ignored)."""
    B, H = idx.shape[0], idx.shape[1]
    hit = torch.zeros(B, H, n + 1, dtype=torch.bool, device=idx.device)
    hit.scatter_(2, torch.where((idx >= 0) & (idx < n), idx, n).flatten(2), True)
    return hit[:, :, :-1, None].expand(B, H, n, unit).reshape(B, H, n * unit)


def _gather_summaries(k: Tensor, gspan: int, group, stats: CommStats) -> Tensor:
    """The stage-1 group summaries ([kmax | kmin] per group of ``gspan`` keys: 1/(gspan/2) of K)
    of every rank's chunk, all-gathered: [P, B, Hkv, C / gspan, 2D] as a list in rank order."""
    from .blocksparse import block_summaries
    local = block_summaries(k, None, gspan)[0].contiguous()  # [B, Hkv, C / gspan, 2D]
    P = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(P)]
    dist.all_gather(parts, local, group=group)
    stats.add("summary", (P - 1) * local.nbytes, (P - 1) * local.nbytes)
    return torch.cat(parts, dim=2)


def _blocksparse_paged(q, k, v, c: SuperlinearConfig, scale: float, pieces, Tb: int,
                       summary: Tensor, to_blocks, place, block: int, group,
                       stats: CommStats) -> Tensor:
    """The block-sparse selective path (docs/blocksparse.md), both layouts. ``pieces``: (slice of
    the local rows, first sequence position) of the rank's pieces; each piece's queries are the
    last of the keys up to its end (bottom-right, as one device runs them). ``summary``: the group
    summaries of the keys [0, Tb). ``to_blocks(need_pos)``: bool [B, Hkv, Tb] of positions ->
    the owners' transfer blocks [P, B, Hkv, nb] (this rank's own rows never), ``place(owner,
    row)``: the position of an owner's row.

    1. Stage 1 runs from the summaries alone; K of its candidate groups' blocks is fetched into
       paged buffers (`_Pages`: the blocks the rank holds, any order) and stage 2 runs over them
       (the op's own search, given the block table).
    2. K and V of the kept blocks, window and sinks are fetched (K only where step 1 did not
       move it) into a second pair of paged buffers, and the attention reads those.
    The buffers hold the rank's own rows and the blocks its selection reads, so per-rank memory
    follows the selection, not the whole length (the summaries excepted: 2 rows a group)."""
    from . import ops
    B, Hq, C, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    kb = c.k_block
    nK = Tb // kb
    dev = q.device
    sel = lowering.block_select_kwargs(c)
    pieces = [(sl, p0, p0 + sl.stop - sl.start) for sl, p0 in pieces]  # + each piece's end
    own = torch.zeros(B, Hkv, nK, dtype=torch.bool, device=dev)
    for _, p0, end in pieces:
        own[:, :, p0 // kb:end // kb] = True

    def earlier(fn) -> Tensor:  # the union over pieces of fn(piece, first, end): [B, Hkv, first]
        pos = torch.zeros(B, Hkv, Tb, dtype=torch.bool, device=dev)
        for i, (sl, p0, end) in enumerate(pieces):
            pos[:, :, :p0] |= fn(i, q[:, :, sl], p0, end)
        return pos

    # 1. stage 1 (the summaries, no key), then K of its candidate groups, then stage 2. With
    # only its own blocks held, in order, the rank's keys k are their paged buffer.
    search = _Pages(own, kb)
    need_k = to_blocks(earlier(lambda i, qp, p0, end: _blocksparse_search_need(
        qp, k, search.table[:, :, :end // kb], summary, c, p0)))
    search = _Pages(own | _held_blocks(need_k, C, block, nK, kb, place), kb)
    k1 = search.buffer(k, D)
    for sl, p0, _ in pieces:
        search.put(k1, k[:, :, sl], p0)
    stats.k_blocks += _fetch_blocks(k1, k, need_k, block, group, stats, "k", place, search)
    kept = [ops._block_select(q[:, :, sl], k1, None, p0, summary=summary,
                              table=search.table[:, :, :end // kb], **sel)
            for sl, p0, end in pieces]
    # 2. K and V of the kept blocks, the window and the sinks
    need = to_blocks(earlier(lambda i, qp, p0, end: _attended_positions(kept[i], c, p0, end)))
    attend = _Pages(own | _held_blocks(need, C, block, nK, kb, place), kb)
    k2, v2 = attend.buffer(k, D), attend.buffer(v, Dv)
    stats.held_rows = max(stats.held_rows, k1.shape[2], k2.shape[2])
    attend.copy_held(k2, search, k1)  # own rows and step 1's, then the rest
    del k1
    for sl, p0, _ in pieces:
        attend.put(v2, v[:, :, sl], p0)
    stats.k_blocks += _fetch_blocks(k2, k, need & ~need_k, block, group, stats, "k", place, attend)
    stats.v_blocks += _fetch_blocks(v2, v, need, block, group, stats, "v", place, attend)
    out = q.new_empty(B, Hq, C, Dv)
    for (sl, p0, end), kp in zip(pieces, kept):
        out[:, :, sl] = ops._block_attend(
            q[:, :, sl], k2, v2, kp, p0, table=attend.table[:, :, :end // kb], window=c.window,
            sinks=c.sinks, q_block=c.q_block, k_block=kb, scale=scale)
    return out


def _blocksparse_search_need(q, kbuf, table, summary, c: SuperlinearConfig, L: int) -> Tensor:
    """bool [B, Hkv, L]: the key positions before L that stage 2 of the block-sparse search reads
    for the queries at L.. (the last of the table's keys): the key blocks of the groups stage 1
    keeps (the op's own stage 1, from the group summaries alone; kbuf, paged by ``table``, is not
    read)."""
    from .ops import _block_select
    if L == 0:
        return torch.zeros(kbuf.shape[0], kbuf.shape[1], 0, dtype=torch.bool, device=kbuf.device)
    cand = _block_select(q, kbuf, None, L, summary=summary, candidates_only=True, table=table,
                         **lowering.block_select_kwargs(c)).long()  # groups [B, Hkv, nQ, MG]
    gspan = _summary_keys(c)
    return _units_to_positions(cand, L // gspan, gspan)


def _attended_positions(kept: Tensor, c: SuperlinearConfig, L: int, T: int) -> Tensor:
    """bool [B, Hkv, L]: the key positions before L that block-sparse attention reads for the
    queries at L..T-1 that kept the blocks ``kept`` (kept blocks, window, sinks)."""
    from .blocksparse import attended_blocks, geometry
    nK, sb, wb, per_q = geometry(T, c.window, c.sinks, c.q_block, c.k_block)
    full, _ = attended_blocks(kept, L // c.q_block, nK, sb, wb, per_q)  # [B, Hkv, nQ, F]
    # whole blocks before L (L is a multiple of the stage-1 group, so of k_block)
    return _units_to_positions(full, L // c.k_block, c.k_block)


def _attend(q, kbuf, vbuf, mask, c: SuperlinearConfig, scale: float, dense: bool, searched,
            qs: Optional[Tensor] = None) -> Tensor:
    """The single-device ops for queries that are the last of the keys in kbuf (bottom-right, at
    their global positions): block-sparse attention, or span attention over ``searched`` (anchors,
    scores; searched here when None). ``dense`` (T <= dense_below on the whole sequence) is passed
    on as dense_below; otherwise dense_below=0, so a rank whose own prefix is short still runs as
    the whole sequence would."""
    db = c.dense_below if dense else 0
    if c.kind.block_sparse:  # docs/blocksparse.md
        return lowering.attention(c, q, kbuf, vbuf, mask, None, scale, dense_below=db)
    if searched is None:
        searched = _search(q, qs, kbuf, mask, c, dense)
    return lowering.attention(c, q, kbuf, vbuf, mask, None, scale, dense_below=db,
                              searched=tuple(searched))


def _zigzag(q, k, v, qs, kpm, c: SuperlinearConfig, scale: float, dense: bool, comm: str,
            block: int, group, rank: int, P: int, stats: CommStats, return_stats: bool):
    """layout="zigzag": rank r holds chunks r and 2P-1-r of h = C/2 positions. Each of its two
    pieces runs as the bottom-right queries of the keys up to its end, as one device would run
    them, over a key buffer of the (2P-r)*h positions up to the late piece's end: the whole
    sequence's K, V (and padding mask) gathered (``comm="all_gather"``), or (``"selective"``,
    block-sparse search) the rank's own rows and, from their owners, the rows the selection reads
    (`_blocksparse_paged`: paged buffers that hold what the rank's selection reads)."""
    B, Hq, C, D = q.shape
    if C % 2:
        raise ValueError(f"{_NAME}: layout='zigzag' needs an even local length, got C={C}")
    h = C // 2
    if c.kind.block_sparse and h % c.q_block:
        raise ValueError(f"{_NAME}: layout='zigzag' with search_key='blocksparse' needs C/2 = {h} "
                         f"to be a multiple of q_block={c.q_block} (a query block's rows on one "
                         f"rank)")

    def gathered(x: Tensor, dim: int, category: str) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(P)]
        dist.all_gather(parts, x.contiguous(), group=group)
        nbytes = x.numel() * x.element_size()
        stats.add(category, (P - 1) * nbytes, (P - 1) * nbytes)
        # chunk i < P is the first half of rank i's piece, chunk i >= P the second half of rank
        # 2P-1-i's: the sequence in order
        first = [p.narrow(dim, 0, parts[0].shape[dim] // 2) for p in parts]
        second = [p.narrow(dim, parts[0].shape[dim] // 2, parts[0].shape[dim] // 2)
                  for p in reversed(parts)]
        return torch.cat(first + second, dim=dim)

    from .blocksparse import block_summaries
    mall = None if kpm is None else gathered(kpm, 1, "mask")  # one bit per key: cheap
    gspan = _summary_keys(c)
    if comm == "selective" and not dense and kpm is None and h % gspan == 0:
        # the block-sparse selection, read from gathered group summaries: paged buffers
        summary = gathered(block_summaries(k, None, gspan)[0], 2, "summary")
        pieces = [(slice(piece * h, (piece + 1) * h), chunk * h)
                  for piece, chunk in ((0, rank), (1, 2 * P - 1 - rank))]
        out = _blocksparse_paged(q, k, v, c, scale, pieces, (2 * P - rank) * h,
                                 summary[:, :, :(2 * P - rank) * h // gspan],
                                 lambda pos: _zigzag_blocks(pos, h, block, P, rank),
                                 _zigzag_place(P, h), block, group, stats)
        return (out, stats) if return_stats else out
    if comm == "all_gather":
        kall, vall = gathered(k, 2, "k"), gathered(v, 2, "v")
    else:  # every row of the buffer: a padding mask, dense, or pieces that cut a stage-1 group
        kall, vall = _zigzag_every_row(q, k, v, block, group, rank, P, stats)
    stats.held_rows = kall.shape[2]
    out = q.new_empty(B, Hq, C, v.shape[3])
    for piece, chunk in ((0, rank), (1, 2 * P - 1 - rank)):
        end = (chunk + 1) * h
        sl = slice(piece * h, (piece + 1) * h)
        out[:, :, sl] = _attend(q[:, :, sl], kall[:, :, :end], vall[:, :, :end],
                                None if mall is None else mall[:, :end], c, scale, dense, None,
                                None if qs is None else qs[:, :, sl])
    return (out, stats) if return_stats else out


def _zigzag_place(P: int, h: int):
    """Sequence position of row ``row`` of ``owner``'s zigzag chunk (its pieces owner, 2P-1-owner
    of h rows each)."""
    def place(owner: Tensor, row: Tensor) -> Tensor:
        return torch.where(row < h, owner * h + row, (2 * P - 1 - owner) * h + row - h)
    return place


def _zigzag_blocks(need_pos: Tensor, h: int, block: int, P: int, rank: int) -> Tensor:
    """need_pos bool [B, H, n] (sequence positions 0..n-1) -> need bool [P, B, H, nb] per owner
    block of the zigzag chunks (owner q's rows: chunk q, then chunk 2P-1-q); this rank's own
    blocks are never needed."""
    B, H, n = need_pos.shape
    C, nb = 2 * h, -(-2 * h // block)
    x = torch.zeros(B, H, 2 * P * h, dtype=torch.bool, device=need_pos.device)
    x[:, :, :n] = need_pos
    x = x.view(B, H, 2 * P, h)
    order = torch.tensor([i for q in range(P) for i in (q, 2 * P - 1 - q)], device=x.device)
    x = x.index_select(2, order).reshape(B, H, P, C)
    padded = torch.zeros(B, H, P, nb * block, dtype=torch.bool, device=x.device)
    padded[..., :C] = x
    need = padded.view(B, H, P, nb, block).any(-1).permute(2, 0, 1, 3).contiguous()
    need[rank] = False
    return need


def _zigzag_every_row(q, k, v, block: int, group, rank: int, P: int, stats: CommStats):
    """comm="selective" for layout="zigzag" where the selection cannot narrow the rows (a padding
    mask, T <= dense_below, or pieces that cut a stage-1 group): every row of the buffers
    [B, Hkv, (2P-r)*h, D / Dv] (the positions up to the late piece's end), fetched from the
    owners of the zigzag chunks."""
    B, Hq, C, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    h = C // 2
    Tb = (2 * P - rank) * h
    kbuf = k.new_zeros(B, Hkv, Tb, D)
    vbuf = v.new_zeros(B, Hkv, Tb, Dv)
    for piece, chunk in ((0, rank), (1, 2 * P - 1 - rank)):
        kbuf[:, :, chunk * h:(chunk + 1) * h] = k[:, :, piece * h:(piece + 1) * h]
        vbuf[:, :, chunk * h:(chunk + 1) * h] = v[:, :, piece * h:(piece + 1) * h]
    need = _zigzag_blocks(torch.ones(B, Hkv, Tb, dtype=torch.bool, device=q.device), h, block, P,
                          rank)
    place = _zigzag_place(P, h)
    stats.k_blocks += _fetch_blocks(kbuf, k, need, block, group, stats, "k", place)
    stats.v_blocks += _fetch_blocks(vbuf, v, need, block, group, stats, "v", place)
    return kbuf, vbuf


def _search(q, qs, kbuf, mask, c: SuperlinearConfig, dense: bool):
    """Span-search of this rank's queries over its key buffer (positions [0, (r+1)*C)); the
    queries sit bottom-right, i.e. at their global positions. ``dense`` (T <= dense_below on the
    whole sequence) is passed on as dense_below; otherwise dense_below=0, so a rank whose own
    prefix is short still searches as the whole sequence would."""
    return lowering.search(c, q if qs is None else qs, kbuf, mask, None,
                           c.dense_below if dense else 0)
