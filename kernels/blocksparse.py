"""Block-sparse superlinear attention (``search_key="blocksparse"``), docs/blocksparse.md executable.

A block of ``q_block`` consecutive queries shares, per kv head, its choice of ``topk`` key blocks of
``k_block`` keys; it attends them, the sink blocks, the window blocks and (causally) its own
diagonal. Scores are matrix products in the inputs' dtype (float32 accumulation), compared in
float32. Selection is two-staged: a bound of the largest logit in every earlier group of ``group``
key blocks against each of the block's last ``rows`` queries (two tensor-core matmuls against
per-group key maxima and minima) keeps ``pool * topk / group`` groups; the exact largest logit of
the representative rows against each candidate block of those groups ranks the blocks. Every
earlier key block lies in a candidate group, so every position stays reachable.

`block_select` is the search, `block_attention` the attention (gather-based, O(Lq * kept keys)
memory), both torch ops only: the executable contract that the Triton kernels
(triton_blocksparse_search.py, triton_blocksparse.py, triton_blocksparse_backward.py) are tested
against; `block_attention_flex` lowers the attention of a prefill onto FlexAttention's forward
(measured beside the Triton kernel). Nothing here knows graphs; the custom op in ops.py calls
these.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_IDX_BITS = 24  # block indices below 2^24 (2^30 keys at 64-key blocks)
_CHUNK_ELEMS = 1 << 26  # elements of the largest temporary per chunk


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def geometry(T: int, window: int, sinks: int, q_block: int, k_block: int):
    """(number of key blocks, sink blocks, window blocks, key blocks per query block)."""
    nK = _ceil_div(T, k_block)
    return (nK, min(_ceil_div(sinks, k_block), nK), _ceil_div(min(window, T), k_block),
            q_block // k_block)


def _order_key(score: Tensor, idx: Tensor) -> Tensor:
    """int64 keys ordering (score descending, then block index descending): exact ties go to the
    later block whatever the top-k implementation does."""
    bits = score.float().contiguous().view(torch.int32).to(torch.int64)
    mono = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed int order
    return (mono << _IDX_BITS) | idx.to(torch.int64)


def _top(score: Tensor, idx: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """The n best (score, idx) along the last dim, best first; -inf scores give idx -1. An entry
    with idx -1 (no block) ranks below every block whatever its score."""
    n = min(n, score.shape[-1])
    score = score.masked_fill(idx < 0, float("-inf"))
    key = _order_key(score, idx.clamp(min=0))
    _, pos = key.topk(n, dim=-1)
    s, i = score.gather(-1, pos), idx.gather(-1, pos)
    return s, torch.where(torch.isneginf(s), torch.full_like(i, -1), i)


def _key_blocks(k: Tensor, kpm: Optional[Tensor], k_block: int):
    """k [B, H, T, D] -> blocks [B, H, nK, k_block, D] (zero-padded) and present [B, nK, k_block]."""
    B, H, T, D = k.shape
    nK = _ceil_div(T, k_block)
    pad = nK * k_block - T
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(B, H, nK, k_block, D)
    present = torch.arange(nK * k_block, device=k.device) < T
    present = present.expand(B, -1)
    if kpm is not None:
        present = present & torch.nn.functional.pad(kpm, (0, pad), value=False)
    return kb, present.reshape(B, nK, k_block)


def check_table(table: Tensor, k: Tensor, kpm: Optional[Tensor], k_block: int, name: str) -> int:
    """Paged keys: ``k`` [B, Hkv, S * k_block, D] holds S slots of ``k_block`` keys each and
    ``table`` int32/int64 [B, Hkv, nK] gives, per batch row and kv head, the slot of each of the
    sequence's nK key blocks (-1: not held; such a block must never be read). The sequence has
    T = nK * k_block keys (whole blocks; no key-padding mask). Returns T. Sequence parallelism
    holds only the blocks a rank's selection reads this way (kernels/distributed.py)."""
    B, H = k.shape[0], k.shape[1]
    if kpm is not None:
        raise ValueError(f"{name}: paged keys (a block table) cannot be combined with a "
                         f"key-padding mask")
    if (table.dim() != 3 or tuple(table.shape[:2]) != (B, H)
            or table.dtype not in (torch.int32, torch.int64) or table.device != k.device):
        raise ValueError(f"{name}: block table {table.dtype} {tuple(table.shape)} on "
                         f"{table.device} does not fit keys {tuple(k.shape)} on {k.device} "
                         f"(want int32/int64 [{B}, {H}, nK])")
    if k.shape[2] % k_block:
        raise ValueError(f"{name}: paged keys of length {k.shape[2]} are not whole slots of "
                         f"k_block={k_block}")
    return table.shape[2] * k_block


def _slots(table: Optional[Tensor], idx: Tensor, live: Tensor) -> Tensor:
    """The slots of key blocks idx [B, Hkv, n] (int64, >= 0) in the paged keys (idx itself where
    the keys are not paged); every live block must be held."""
    if table is None:
        return idx
    slot = table.gather(2, idx).long()
    if bool((live & (slot < 0)).any()):
        raise ValueError("blocksparse: a block the selection reads is not held by the paged keys")
    return slot.clamp(min=0)


def _blocks(k: Tensor, kpm: Optional[Tensor], k_block: int, table: Optional[Tensor], T: int):
    """`_key_blocks`, or for paged keys their slots [B, H, S, k_block, D] and the presence of the
    sequence's T keys (all present) [B, nK, k_block]."""
    if table is None:
        return _key_blocks(k, kpm, k_block)
    B, H, Tk, D = k.shape
    present = torch.ones(B, T // k_block, k_block, dtype=torch.bool, device=k.device)
    return k.view(B, H, Tk // k_block, k_block, D), present


def _blocks_before(j0: int, nQ: int, per_q: int, device) -> Tensor:
    """[nQ]: the number of key blocks wholly before each query block j0..j0+nQ-1."""
    return (j0 + torch.arange(nQ, device=device)) * per_q


def _query_blocks(q: Tensor, p0: int, q_block: int, n_rows: int = 1, spread: bool = False):
    """Queries at p0..p0+Lq-1 -> padded [B, H, nQ, q_block, D], first block j0, and the
    representative rows [nQ, n_rows] (local row indices, all in the call): the block's last row in
    the call and the n_rows - 1 before it, every row (spread=False) or every q_block // n_rows-th
    (spread=True, covering the whole block)."""
    B, H, Lq, D = q.shape
    j0 = p0 // q_block
    front = p0 - j0 * q_block
    nQ = _ceil_div(front + Lq, q_block)
    qp = torch.nn.functional.pad(q, (0, 0, front, nQ * q_block - front - Lq))
    n = torch.arange(nQ, device=q.device)
    last = torch.clamp(front + Lq - 1 - n * q_block, max=q_block - 1)  # last row of the call
    first = torch.clamp(front - n * q_block, min=0)
    step = q_block // n_rows if spread else 1
    rows = last[:, None] - step * torch.arange(n_rows, device=q.device)[None, :]
    # fewer than n_rows rows in the call: repeat the last one (a maximum over rows is unchanged)
    rows = torch.where(rows >= first[:, None], rows, last[:, None])
    return qp.view(B, H, nQ, q_block, D), j0, rows


def representatives(q: Tensor, p0: int, q_block: int, rows: int, Hkv: int, spread: bool = False):
    """The representative rows of every query block, grouped by kv head: [B, Hkv, nQ, G*rows, D]
    (head-major within the group), and the first query block j0. spread: rows q_block // rows
    apart (`_query_blocks`)."""
    B, Hq, Lq, D = q.shape
    G = Hq // Hkv
    qb, j0, ri = _query_blocks(q, p0, q_block, rows, spread)
    nQ = qb.shape[2]
    ridx = ri.view(1, 1, nQ, rows, 1).expand(B, Hq, nQ, rows, D)
    rep = qb.gather(3, ridx).view(B, Hkv, G, nQ, rows, D).transpose(2, 3)
    return rep.reshape(B, Hkv, nQ, G * rows, D), j0


def block_summaries(k: Tensor, kpm: Optional[Tensor], k_block: int) -> Tuple[Tensor, Tensor]:
    """Per key block, [kmax, kmin] of its present keys, [B, Hkv, nK, 2D] in k's dtype (zeros for
    a block without present keys), and which blocks have present keys, bool [B, nK]."""
    B, H, T, D = k.shape
    nK = _ceil_div(T, k_block)
    if kpm is None:  # whole blocks by a view, the partial last block apart (no padded copy of k)
        whole = T // k_block
        body = k[:, :, :whole * k_block].reshape(B, H, whole, k_block, D)
        hi, lo = [body.amax(3)], [body.amin(3)]
        if whole < nK:
            tail = k[:, :, whole * k_block:]
            hi.append(tail.amax(2, keepdim=True))
            lo.append(tail.amin(2, keepdim=True))
        kk = torch.cat([torch.cat(hi, 2), torch.cat(lo, 2)], -1)
        return kk, torch.ones(B, nK, dtype=torch.bool, device=k.device)
    kb, present = _key_blocks(k, kpm, k_block)
    pm = present[:, None, :, :, None]
    kmax = torch.where(pm, kb, float("-inf")).amax(3)
    kmin = torch.where(pm, kb, float("inf")).amin(3)
    has = present.any(-1)  # [B, nK]
    return torch.where(has[:, None, :, None], torch.cat([kmax, kmin], -1), 0.0), has


def check_summary(summary: Tensor, k: Tensor, kpm: Optional[Tensor], k_block: int,
                  T: Optional[int] = None) -> Tensor:
    """The first nK blocks of summaries kept with a cache ([B, Hkv, >= nK, 2D], what
    `block_summaries(k, None, k_block)` gives for the keys k), checked for shape. Every block has
    keys. A key-padding mask is refused (kept summaries cover every key). T: the number of keys
    where k is paged (`check_table`), else k's length."""
    B, H, Tk, D = k.shape
    T = Tk if T is None else T
    nK = _ceil_div(T, k_block)
    if kpm is not None:
        raise ValueError("blocksparse: block summaries kept with the cache cannot be combined with "
                         "a key-padding mask")
    if (summary.dim() != 4 or tuple(summary.shape[:2]) != (B, H) or summary.shape[2] < nK
            or summary.shape[3] != 2 * D or summary.device != k.device):
        raise ValueError(f"blocksparse: block summaries of shape {tuple(summary.shape)} on "
                         f"{summary.device} do not fit keys {tuple(k.shape)} on {k.device} "
                         f"(want [{B}, {H}, >= {nK}, {2 * D}])")
    return summary[:, :, :nK]


class BlockSummaryCache:
    """`block_summaries` of a growing key tensor, kept beside a KV cache and updated from the keys
    that changed only: O((new keys) D) per update, never a pass over the whole cache.

    ``update(k, start)``: k [B, Hkv, T, D] holds the keys now; those before ``start`` are the same
    as at the previous update (the caller vouches for it: a cache that only appends passes the old
    ``length``). The whole blocks from ``start // k_block`` on are summarised (one Triton launch
    where the kernels run; none while the new keys only fill the last, partial block). Returns
    the summaries of the nK blocks of k (a view of a buffer grown by doubling), of which a
    partial last block's row is not kept up to date: the search never reads it (stage 1 reads
    only groups that end before the query block, every one whole, `stage1_group`).
    ``length``: the keys summarised, the whole blocks' (what the next update may pass as start)."""

    def __init__(self, k_block: int):
        self.k_block = k_block
        self.buf: Optional[Tensor] = None
        self.length = 0  # keys of the whole blocks summarised

    def update(self, k: Tensor, start: int) -> Tensor:
        B, H, T, D = k.shape
        kb = self.k_block
        nK = _ceil_div(T, kb)
        buf = self.buf
        if (buf is None or tuple(buf.shape[:2]) != (B, H) or buf.shape[3] != 2 * D
                or buf.dtype != k.dtype or buf.device != k.device):
            buf, start = None, 0
        start = max(0, min(start, self.length, T))
        if buf is None or buf.shape[2] < nK:
            grown = k.new_zeros(B, H, max(nK, 2 * (buf.shape[2] if buf is not None else 0), 64),
                                2 * D)
            if buf is not None:
                grown[:, :, :buf.shape[2]] = buf
            buf = grown
        i0, whole = start // kb, T // kb  # blocks i0..whole-1: whole, to summarise
        if i0 < whole:
            from . import dispatch
            if dispatch.use_triton(k.device) and k.dtype in (torch.float32, torch.bfloat16,
                                                             torch.float16):
                from .triton_blocksparse_search import summary_update_triton
                summary_update_triton(k[:, :, :whole * kb], buf, i0, kb)  # one launch
            else:  # written in place: no temporary per update
                body = k[:, :, i0 * kb:whole * kb].reshape(B, H, whole - i0, kb, D)
                torch.amax(body, 3, out=buf[:, :, i0:whole, :D])
                torch.amin(body, 3, out=buf[:, :, i0:whole, D:])
        self.buf, self.length = buf, whole * kb
        return buf[:, :, :nK]


def candidate_limits(j0: int, nQ: int, T: int, window: int, sinks: int, q_block: int,
                     k_block: int, device) -> Tuple[int, Tensor]:
    """Candidates of query block j0+n are the key blocks sb <= i < lim[n]: (sb, lim int64 [nQ])."""
    _, sb, wb, per_q = geometry(T, window, sinks, q_block, k_block)
    return sb, _blocks_before(j0, nQ, per_q, device) - wb


def _stage1(rep, kk):
    """Stage-1 scores [B, Hkv, n, nK] (float32): for each representative row q (of every head of
    the group), the bound sum_d max(q_d kmax_d, q_d kmin_d) = q+ . kmax + q- . kmin of its largest
    logit in the block, as one matrix product against kk = [kmax, kmin]; the largest over rows.
    rep [B, Hkv, n, G*R, D]. Products of the inputs' dtype are exact in float32, so the product
    runs in float32 (no rounding of the scores to a 16-bit dtype)."""
    B, H, n, GR, D = rep.shape
    rep = rep.float()
    qq = torch.cat([rep.clamp(min=0), rep.clamp(max=0)], -1).view(B, H, n * GR, 2 * D)
    # one product per kv head (a broadcast over n would copy kk for every query block)
    return torch.matmul(qq, kk.float().transpose(-1, -2)).view(B, H, n, GR, -1).amax(3)


def stage1_group(window: int, k_block: int, group: int) -> int:
    """The key blocks per stage-1 group (docs/blocksparse.md): ``group`` (a power of two), at most
    the largest power of two <= wb + 1 (wb = ceil(window / k_block)), so that a group holding a
    candidate block ends before the query block: no key at or after it steers the choice."""
    if not isinstance(group, int) or group < 1 or group & (group - 1):
        raise ValueError(f"blocksparse: block_group must be a power of two >= 1, got {group!r}")
    cap = 1 << (_ceil_div(window, k_block) + 1).bit_length() - 1
    return min(group, cap)


def summary_keys(window: int, k_block: int, group: int) -> int:
    """Keys per stage-1 group: the unit of the summaries a cache keeps (`BlockSummaryCache`)."""
    return stage1_group(window, k_block, group) * k_block


def block_select(q: Tensor, k: Tensor, kpm: Optional[Tensor], p0: int, *, window: int, sinks: int,
                 topk: int, q_block: int, k_block: int, rows: int, pool: int,
                 summary: Optional[Tensor] = None, exact_rows: int = 0, group: int = 1,
                 spread: bool = False, candidates_only: bool = False,
                 table: Optional[Tensor] = None) -> Tensor:
    """Kept key blocks int32 [B, Hkv, nQ, topk] of the query blocks j0..j0+nQ-1 that hold the
    queries at p0..p0+Lq-1 (best first, -1 where fewer candidates exist). group: key blocks per
    stage-1 group (1: stage 1 bounds every key block; capped by `stage1_group`). summary: the
    groups' summaries kept with the cache (`check_summary` with group * k_block keys a group),
    else computed from k.
    exact_rows: the representative rows of stage 2 (0: the ``rows`` of stage 1). spread: each
    stage's rows spread over the query block (q_block // rows apart) instead of its last rows.
    candidates_only: return stage 1's choice instead, the groups int32 [B, Hkv, nQ, MG] (-1: none)
    whose key blocks stage 2 reads; with ``summary`` given, stage 1 reads no key (sequence
    parallelism fetches the keys of these groups only). table: paged keys (`check_table`; needs
    ``summary``): stage 2 reads each block from its slot."""
    group = stage1_group(window, k_block, group)
    B, Hq, Lq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    if table is not None:
        T = check_table(table, k, kpm, k_block, "block_select")
        if summary is None:
            raise ValueError("block_select: paged keys need the group summaries")
    G = Hq // Hkv
    nK = _ceil_div(T, k_block)
    gspan = group * k_block
    nG = _ceil_div(T, gspan)
    dev = q.device
    rep, j0 = representatives(q, p0, q_block, rows, Hkv, spread)
    rep2 = representatives(q, p0, q_block, exact_rows, Hkv, spread)[0] if exact_rows else rep
    nQ = rep.shape[2]
    if summary is None:
        kk, has = block_summaries(k, kpm, gspan)
    else:
        kk, has = check_summary(summary, k, kpm, gspan, T), torch.ones(B, nG, dtype=torch.bool,
                                                                          device=dev)
    kb, present = _blocks(k, kpm, k_block, table, T)
    bhas = present.any(-1)  # [B, nK]
    sb, lim = candidate_limits(j0, nQ, T, window, sinks, q_block, k_block, dev)
    grp = torch.arange(nG, device=dev)
    # a group is a candidate if it holds a candidate block (sb <= i < lim)
    gcand = (grp[None, :] * group + group - 1 >= sb) & (grp[None, :] * group < lim[:, None])
    MG = min(_ceil_div(pool * topk, group), nG)  # groups kept by stage 1
    M = MG * group  # blocks scored by stage 2
    sub = torch.arange(group, device=dev)
    out = torch.full((B, Hkv, nQ, MG if candidates_only else topk), -1, dtype=torch.int32,
                     device=dev)
    chunk = max(1, _CHUNK_ELEMS // max(1, B * Hkv * G * max(rows, exact_rows)
                                        * max(nG, M * k_block)))
    for s in range(0, nQ, chunk):
        e = min(nQ, s + chunk)
        n = e - s
        bound = _stage1(rep[:, :, s:e], kk)
        ok = gcand[None, None, s:e] & has[:, None, None, :]
        bound = bound.masked_fill(~ok, float("-inf"))  # [B, Hkv, n, nG]
        _, cg = _top(bound, grp.expand_as(bound), MG)  # [B, Hkv, n, MG]
        if candidates_only:
            out[:, :, s:e, :cg.shape[-1]] = cg.to(torch.int32)
            continue
        # stage 2: the candidate blocks of the kept groups, by the exact largest logit of the
        # representative rows in each
        ci = (cg[..., None] * group + sub).view(B, Hkv, n, M)
        live = (cg >= 0)[..., None].expand(B, Hkv, n, MG, group).reshape(B, Hkv, n, M)
        live = live & (ci >= sb) & (ci < lim[s:e, None]) & (ci < nK)
        safe = torch.where(live, ci, 0).long()
        live = live & bhas[:, None, None, :].expand(B, Hkv, n, nK).gather(3, safe)
        ci = torch.where(live, ci, -1)
        safe = safe.reshape(B, Hkv, n * M)
        slot = _slots(table, safe, live.reshape(B, Hkv, n * M))
        gk = kb.gather(2, slot[..., None, None].expand(B, Hkv, n * M, k_block, D))
        gk = gk.view(B, Hkv, n, M * k_block, D)
        lg = torch.matmul(rep2[:, :, s:e].float(), gk.float().transpose(-1, -2)).amax(3)
        kp = present[:, None].expand(B, Hkv, nK, k_block).gather(
            2, safe[..., None].expand(B, Hkv, n * M, k_block)).view(B, Hkv, n, M * k_block)
        exact = lg.masked_fill(~kp, float("-inf")).view(B, Hkv, n, M, k_block).amax(-1)
        exact = exact.masked_fill(ci < 0, float("-inf"))
        _, kept = _top(exact, ci, topk)
        if kept.shape[-1] < topk:
            kept = torch.nn.functional.pad(kept, (0, topk - kept.shape[-1]), value=-1)
        out[:, :, s:e] = kept.to(torch.int32)
    return out


def attended_blocks(kept: Tensor, j0: int, nK: int, sb: int, wb: int, per_q: int):
    """Per query block, the key blocks attended in full (sinks, window, kept) [B, Hkv, nQ, F] and
    the diagonal ones [nQ, per_q]; -1 marks an empty slot. The lists never repeat a block."""
    B, Hkv, nQ, _ = kept.shape
    dev = kept.device
    before = _blocks_before(j0, nQ, per_q, dev)
    sink = torch.arange(sb, device=dev)[None, :].expand(nQ, sb)
    sink = torch.where(sink < before[:, None], sink, -1)
    win = before[:, None] - wb + torch.arange(wb, device=dev)[None, :]
    win = torch.where((win >= sb) & (win >= 0), win, -1)  # sink blocks are listed once, as sinks
    diag = before[:, None] + torch.arange(per_q, device=dev)[None, :]
    diag = torch.where(diag < nK, diag, -1)
    fixed = torch.cat([sink, win], 1)[None, None].expand(B, Hkv, nQ, sb + wb)
    return torch.cat([fixed, kept.long()], -1), diag


def keys_attended(kept: Tensor, p0: int, Lq: int, T: int, *, window: int, sinks: int,
                  q_block: int, k_block: int) -> Tensor:
    """Keys each query attends (padding not subtracted), int64 [B, Hkv, Lq]."""
    nK, sb, wb, per_q = geometry(T, window, sinks, q_block, k_block)
    j0 = p0 // q_block
    full, _ = attended_blocks(kept, j0, nK, sb, wb, per_q)
    size = (torch.clamp((full + 1) * k_block, max=T) - full * k_block) * (full >= 0)
    per_block = size.sum(-1)  # [B, Hkv, nQ]
    t = torch.arange(p0, p0 + Lq, device=kept.device)
    n = t // q_block - j0
    return per_block[..., n] + t % q_block + 1  # + the diagonal keys j*QB..t


def block_attention(q: Tensor, k: Tensor, v: Tensor, kept: Tensor, kpm: Optional[Tensor], p0: int,
                    *, window: int, sinks: int, q_block: int, k_block: int, scale: float,
                    table: Optional[Tensor] = None) -> Tensor:
    """Union softmax over each query's attended keys (docs/blocksparse.md), float32 inside;
    [B, Hq, Lq, Dv] in q's dtype. A query with no present key outputs zeros. table: paged keys
    and values (`check_table`: k and v share the slots)."""
    B, Hq, Lq, D = q.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    if table is not None:
        T = check_table(table, k, kpm, k_block, "block_attention")
        if v.shape[2] != k.shape[2]:
            raise ValueError(f"block_attention: paged values of length {v.shape[2]} do not share "
                             f"the keys' {k.shape[2]} slots")
    G = Hq // Hkv
    nK, sb, wb, per_q = geometry(T, window, sinks, q_block, k_block)
    qb, j0, _ = _query_blocks(q, p0, q_block)
    nQ = qb.shape[2]
    full, diag = attended_blocks(kept, j0, nK, sb, wb, per_q)
    kb, present = _blocks(k, kpm, k_block, table, T)
    vb, _ = _blocks(v, None, k_block, table, T)
    F_ = full.shape[-1] + per_q
    lists = torch.cat([full, diag[None, None].expand(B, Hkv, nQ, per_q)], -1)  # [B, Hkv, nQ, F_]
    out = torch.empty(B, Hkv, G, nQ, q_block, Dv, dtype=torch.float32, device=q.device)
    qpos = (j0 + torch.arange(nQ, device=q.device))[:, None] * q_block \
        + torch.arange(q_block, device=q.device)[None, :]  # [nQ, q_block]
    chunk = max(1, _CHUNK_ELEMS // max(1, Hq * q_block * F_ * k_block))
    for s in range(0, nQ, chunk):
        e = min(nQ, s + chunk)
        li = lists[:, :, s:e]
        safe = li.clamp(min=0)
        n = e - s
        ix = _slots(table, safe.reshape(B, Hkv, n * F_),
                    (li >= 0).reshape(B, Hkv, n * F_))[..., None, None]
        gk = kb.gather(2, ix.expand(B, Hkv, n * F_, k_block, D)).view(B, Hkv, n, F_ * k_block, D)
        gv = vb.gather(2, ix.expand(B, Hkv, n * F_, k_block, Dv)).view(B, Hkv, n, F_ * k_block, Dv)
        kpos = (safe[..., None] * k_block + torch.arange(k_block, device=q.device)).view(
            B, Hkv, n, F_ * k_block)
        kp = present.view(B, 1, -1).expand(B, Hkv, -1).gather(2, kpos.view(B, Hkv, -1)).view(
            B, Hkv, n, F_ * k_block)
        ok = kp & (li >= 0)[..., None].expand(B, Hkv, n, F_, k_block).reshape(B, Hkv, n, -1)
        allowed = ok[:, :, :, None, :] & (kpos[:, :, :, None, :] <= qpos[None, None, s:e, :, None])
        qc = qb[:, :, s:e].view(B, Hkv, G, n, q_block, D).float()
        lg = torch.einsum("bhgnqd,bhnkd->bhgnqk", qc, gk.float()) * scale
        lg = lg.masked_fill(~allowed[:, :, None], float("-inf"))
        p = torch.softmax(lg, -1).nan_to_num(0.0)
        out[:, :, :, s:e] = torch.einsum("bhgnqk,bhnkd->bhgnqd", p, gv.float())
    front = p0 - j0 * q_block
    out = out.view(B, Hq, nQ * q_block, Dv)[:, :, front:front + Lq]
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------
# FlexAttention lowering (a prefill: queries 0..L-1 over keys 0..L-1, no padding)
# --------------------------------------------------------------------------------------------

_FLEX = {}


def _flex_fn(compiled: bool):
    if compiled not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX[compiled] = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return _FLEX[compiled]


def _heads(x: Tensor, G: int) -> Tensor:
    """Per-kv-head BlockMask rows [B, Hkv, ...] repeated for the G query heads of each."""
    return x.repeat_interleave(G, dim=1).contiguous()


def flex_block_mask(kept: Tensor, L: int, *, window: int, sinks: int, q_block: int, k_block: int,
                    Hq: int):
    """The FlexAttention BlockMask of a prefill of L tokens: sinks, window and kept blocks as full
    blocks, the diagonal as partial (causal) blocks. Heads expanded from kv heads to Hq. Forward
    only (no query-block indices)."""
    from torch.nn.attention.flex_attention import BlockMask

    B, Hkv, nQ, _ = kept.shape
    nK, sb, wb, per_q = geometry(L, window, sinks, q_block, k_block)
    full, diag = attended_blocks(kept, 0, nK, sb, wb, per_q)
    big = torch.iinfo(torch.int32).max
    srt, _ = torch.where(full >= 0, full, big).sort(-1)
    full_num = (full >= 0).sum(-1).to(torch.int32)
    full_idx = torch.where(srt == big, 0, srt).to(torch.int32)
    d = diag[None, None].expand(B, Hkv, nQ, per_q)
    part_num = (d >= 0).sum(-1).to(torch.int32)
    part_idx = d.clamp(min=0).to(torch.int32)
    # FlexAttention's kernels (Triton on CUDA, Inductor's CPU template) read index rows as wide as
    # the number of key blocks: narrower rows gave wrong outputs on an H100 (measured). Entries
    # past each row's count are never used. Cost: 2 x B*Hq*nQ*nK int32 (268 MB each at 128K).
    full_idx = torch.nn.functional.pad(full_idx, (0, max(0, nK - full_idx.shape[-1])))
    part_idx = torch.nn.functional.pad(part_idx, (0, max(0, nK - part_idx.shape[-1])))
    G = Hq // Hkv

    def causal(b, h, qi, ki):
        return qi >= ki

    return BlockMask.from_kv_blocks(_heads(part_num, G), _heads(part_idx, G), _heads(full_num, G),
                                    _heads(full_idx, G), BLOCK_SIZE=(q_block, k_block),
                                    mask_mod=causal, seq_lengths=(L, L),
                                    compute_q_blocks=False)


def block_attention_flex(q: Tensor, k: Tensor, v: Tensor, kept: Tensor, *, window: int,
                         sinks: int, q_block: int, k_block: int, scale: float,
                         compiled: bool = True) -> Tensor:
    """`block_attention` of a prefill (Lq == T, no padding) through FlexAttention's forward (the
    lowering measured beside the Triton kernel)."""
    L = q.shape[2]
    mask = flex_block_mask(kept, L, window=window, sinks=sinks, q_block=q_block, k_block=k_block,
                           Hq=q.shape[1])
    enable_gqa = q.shape[1] != k.shape[1]
    return _flex_fn(compiled)(q, k, v, block_mask=mask, scale=scale, enable_gqa=enable_gqa,
                              kernel_options=flex_kernel_options(q_block, k_block))


def flex_kernel_options(q_block: int, k_block: int) -> dict:
    """Tiles that divide the sparse blocks (the kernel's defaults may be larger than 64)."""
    return {"BLOCK_M": min(q_block, 128), "BLOCK_N": min(k_block, 64)}


def superlinear_block_attention(q, k, v, kpm, p0: int, *, window: int, sinks: int, topk: int,
                                q_block: int, k_block: int, rows: int, pool: int, scale: float,
                                dense_below: int, summary: Optional[Tensor] = None,
                                exact_rows: int = 0, group: int = 1,
                                spread: bool = False) -> Tensor:
    """Search and attention of docs/blocksparse.md, the reference: dense causal attention when
    T <= dense_below, else `block_select` and `block_attention`."""
    from .reference import dense_attention
    B, Hq, Lq, D = q.shape
    T = k.shape[2]
    if T <= dense_below:
        pos = (torch.arange(Lq, device=q.device) + p0).expand(B, Lq)
        return dense_attention(q, k, v, kpm, pos, scale)
    kept = block_select(q, k, kpm, p0, window=window, sinks=sinks, topk=topk, q_block=q_block,
                        k_block=k_block, rows=rows, pool=pool, summary=summary,
                        exact_rows=exact_rows, group=group, spread=spread)
    return block_attention(q, k, v, kept, kpm, p0, window=window, sinks=sinks, q_block=q_block,
                           k_block=k_block, scale=scale)
