"""The custom ops the graph pass emits: ``superlinear::span_search`` and ``superlinear::span_attention``.

Registered with ``torch.library.custom_op``: a schema, a fake (meta) implementation for tracing and
torch.export, the reference as the CPU implementation, and a CUDA implementation that runs the
Triton kernels when they are available (the reference otherwise; kernels/dispatch.py decides, and
its ``force_triton`` sends the CPU ops through the Triton kernels under the interpreter).

Config fields travel as plain scalars so that graphs holding these ops export and serialise.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import blocksparse as bs
from . import dispatch, reference
from .dispatch import force_triton  # noqa: F401  (public: tests route the CPU ops through Triton)

_triton_module = dispatch.triton_module
_use_triton = dispatch.use_triton
_PLAIN = {}  # op name -> its Python implementation


def _custom_op(name: str):
    """``torch.library.custom_op(name)``, keeping the implementation for `direct`."""
    def wrap(fn):
        _PLAIN[name] = fn
        return torch.library.custom_op(name, mutates_args=())(fn)
    return wrap


def _in_dispatch_mode() -> bool:
    from torch.utils import _python_dispatch as pd
    probe = getattr(pd, "is_in_torch_dispatch_mode", None)
    return probe() if probe is not None else pd._get_current_dispatch_mode() is not None


def direct(op, args: tuple):
    """The Python implementation of the custom op ``op`` (an OpOverload of these ops) where
    calling it directly is what the dispatcher would run anyway, else None: plain eager tensors
    (no subclass, fake or functional tensor, no object with ``__torch_function__`` such as an fx
    proxy), none needing a gradient, no tracing (fx, jit, export), compiling, dispatch or
    function mode and no functorch transform. It saves the dispatcher and the autograd wrapper
    of ``torch.library.custom_op``: about 40 of the 240 us of host time a decoded token took on an
    H100 host (benchmarks/RESULTS.md)."""
    fn = _PLAIN.get(op.name())
    if fn is None or torch.compiler.is_compiling() or torch._C._len_torch_function_stack() \
            or torch._C._are_functorch_transforms_active() or _in_dispatch_mode() \
            or torch._C._get_tracing_state() is not None \
            or torch.overrides.has_torch_function(args):  # (fx proxies, tensor subclasses)
        return None
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor
                                            or (grad and a.requires_grad)):
            return None
    return fn


# --------------------------------------------------------------------------------------------
# span_search
# --------------------------------------------------------------------------------------------

@_custom_op("superlinear::span_search")
def span_search(
    search_query: Tensor,
    key: Tensor,
    key_padding_mask: Optional[Tensor],
    query_positions: Optional[Tensor],
    window: int,
    topk: int,
    search_power: float,
    span_power: float,
    backward_factor: float,
    forward_factor: float,
    search_key: str,
    dense_below: int,
) -> Tuple[Tensor, Tensor]:
    """Step 1 of docs/spec.md: anchors int32 [B, Hq, Lq, topk] and scores float32
    [B, Hq, Lq, topk]."""
    args = (search_query, key, key_padding_mask, query_positions, window, topk, search_power,
            span_power, backward_factor, forward_factor, search_key, dense_below)
    if _use_triton(search_query.device):
        return _triton_module().span_search(*args)
    return reference.span_search(*args)


def _search_outputs_like(search_query: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """Fake outputs of a search op: anchors int32 and scores float32 [B, Hq, Lq, topk]."""
    B, Hq, Lq, _ = search_query.shape
    return (search_query.new_empty((B, Hq, Lq, topk), dtype=torch.int32),
            search_query.new_empty((B, Hq, Lq, topk), dtype=torch.float32))


@span_search.register_fake
def _(search_query, key, key_padding_mask, query_positions, window, topk, search_power,
      span_power, backward_factor, forward_factor, search_key, dense_below):
    return _search_outputs_like(search_query, topk)


# --------------------------------------------------------------------------------------------
# span_attention
# --------------------------------------------------------------------------------------------

@_custom_op("superlinear::span_attention")
def span_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    anchors: Tensor,
    scores: Tensor,
    key_padding_mask: Optional[Tensor],
    query_positions: Optional[Tensor],
    window: int,
    sinks: int,
    span_power: float,
    backward_factor: float,
    forward_factor: float,
    combine: str,
    scale: float,
    dense_below: int,
) -> Tensor:
    """Step 2 of docs/spec.md: attention over sinks, window and the kept spans; [B, Hq, Lq, Dv]."""
    args = (query, key, value, anchors, scores, key_padding_mask, query_positions, window, sinks,
            span_power, backward_factor, forward_factor, combine, scale, dense_below)
    if _use_triton(query.device):
        return _triton_module().span_attention(*args)
    return reference.span_attention(*args)


@span_attention.register_fake
def _(query, key, value, anchors, scores, key_padding_mask, query_positions, window, sinks,
      span_power, backward_factor, forward_factor, combine, scale, dense_below):
    B, Hq, Lq, _ = query.shape
    return query.new_empty((B, Hq, Lq, value.shape[-1]))


# --------------------------------------------------------------------------------------------
# nstep_search: the N-step search of docs/nstep.md (SuperlinearConfig(steps=N), N >= 3)
# --------------------------------------------------------------------------------------------

def _triton_nstep():
    """The Triton N-step search, or None when Triton is unavailable."""
    try:
        from . import triton_nstep
    except ImportError:
        return None
    return triton_nstep


@_custom_op("superlinear::nstep_search")
def nstep_search(
    search_query: Tensor,
    key: Tensor,
    key_padding_mask: Optional[Tensor],
    query_positions: Optional[Tensor],
    window: int,
    topk: int,
    steps: int,
    backward_factor: float,
    forward_factor: float,
    search_key: str,
    dense_below: int,
) -> Tuple[Tensor, Tensor]:
    """docs/nstep.md: anchors int32 [B, Hq, Lq, topk] and scores float32 of the kept cells, for
    ``span_attention`` with ``span_power = 1/steps``."""
    from . import nstep

    args = (search_query, key, key_padding_mask, query_positions, window, topk, steps,
            backward_factor, forward_factor, search_key, dense_below)
    if _use_triton(search_query.device) and _triton_nstep() is not None:
        return _triton_nstep().nstep_search(*args)
    return nstep.nstep_search(*args)


@nstep_search.register_fake
def _(search_query, key, key_padding_mask, query_positions, window, topk, steps, backward_factor,
      forward_factor, search_key, dense_below):
    return _search_outputs_like(search_query, topk)


# Autograd (kernels/autograd.py): gradients for query, key, value, the gate's scores and, through
# the scores, the search query; the backward passes are ops of their own.
from . import autograd as _autograd  # noqa: E402

_autograd.register(span_search, span_attention, nstep_search)


# --------------------------------------------------------------------------------------------
# block_sparse_attention: search and attention of docs/blocksparse.md in one op
# --------------------------------------------------------------------------------------------

def _positions(query_positions: Optional[Tensor], B: int, Lq: int) -> Optional[Tensor]:
    """[B, Lq] positions of the queries, or None (bottom-right)."""
    return None if query_positions is None else query_positions.reshape(-1, Lq).expand(B, Lq)


def _first_position(query_positions: Optional[Tensor], Lq: int, T: int) -> int:
    """The block-sparse layout needs the queries at p0..p0+Lq-1, one p0 for the whole batch."""
    if query_positions is None:
        return T - Lq
    qp = query_positions.reshape(-1, Lq)
    p0 = int(qp[0, 0])
    want = torch.arange(Lq, device=qp.device, dtype=qp.dtype) + p0
    if not bool((qp == want).all()):
        raise ValueError("superlinear block_sparse_attention: query positions must be p0..p0+Lq-1, "
                         "the same for every batch row (search_key='blocksparse')")
    return p0


@functools.lru_cache(maxsize=None)
def _blocksparse_kernels():
    """(triton_blocksparse, triton_blocksparse_search, blocksparse_decode), imported once (Triton
    loads with them)."""
    from . import blocksparse_decode, triton_blocksparse, triton_blocksparse_search
    return triton_blocksparse, triton_blocksparse_search, blocksparse_decode


@_custom_op("superlinear::block_sparse_attention")
def block_sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor],
    query_positions: Optional[Tensor],
    window: int,
    sinks: int,
    topk: int,
    scale: float,
    dense_below: int,
    q_block: int,
    k_block: int,
    block_rows: int,
    block_pool: int,
    block_summary: Optional[Tensor] = None,
    exact_rows: int = 0,
    block_group: int = 1,
    spread_rows: bool = False,
) -> Tensor:
    """docs/blocksparse.md: [B, Hq, Lq, Dv]. The Triton search and attention where Triton runs
    (CUDA, or forced), the torch reference (kernels/blocksparse.py) otherwise. block_summary: the
    key blocks' summaries kept with the cache (`blocksparse.BlockSummaryCache`), so that a decoded
    token does not summarise the whole cache again (summaries of stage 1's groups of block_group
    key blocks); None computes them from the keys. exact_rows: stage 2's representative rows
    (0: block_rows); block_group: key blocks per stage-1 group; spread_rows: representative rows
    spread over the query block (last, with defaults that give the semantics of graphs exported
    before them, so that those load and run unchanged)."""
    if key.shape[2] <= dense_below:  # exact dense attention: any query positions (padded rows)
        from .reference import dense_attention
        return dense_attention(query, key, value, key_padding_mask, _positions(
            query_positions, query.shape[0], query.shape[2]), scale)
    p0 = _first_position(query_positions, query.shape[2], key.shape[2])
    kw = dict(window=window, sinks=sinks, q_block=q_block, k_block=k_block)
    if not _use_triton(query.device):
        # the reference attends whole query blocks and returns a view: the op's output is dense
        # (the fake kernel's strides)
        return bs.superlinear_block_attention(
            query, key, value, key_padding_mask, p0, topk=topk, rows=block_rows, pool=block_pool,
            scale=scale, dense_below=dense_below, summary=block_summary, exact_rows=exact_rows,
            group=block_group, spread=spread_rows, **kw).contiguous()
    tba, tss, decode = _blocksparse_kernels()
    Lq = query.shape[2]
    # one query block (a decoded token, a short chunk): the attention picks the kept blocks from
    # stage 2's keys itself, so that no torch op runs between the launches
    one_block = (p0 % q_block) + Lq <= q_block and key_padding_mask is None
    if one_block and block_summary is None and key.dtype in tss._SUMMARY_DTYPES:
        # no summaries kept with the cache (a compiled model's decoded token): one pass over the
        # keys builds them, then the prepared launches as with kept ones
        block_summary = tss.summaries_triton(key, bs.summary_keys(window, k_block, block_group))
    if one_block and block_summary is not None:  # the same launches, prepared per call shape
        out = decode.attention(query, key, value, block_summary, p0, window=window, sinks=sinks,
                               topk=topk, scale=scale, q_block=q_block, k_block=k_block,
                               rows=block_rows, pool=block_pool, exact_rows=exact_rows,
                               group=block_group, spread=spread_rows)
        if out is not None:
            return out
    kept = tss.block_select_triton(query, key, key_padding_mask, p0, topk=topk, rows=block_rows,
                                   pool=block_pool, summary=block_summary, exact_rows=exact_rows,
                                   group=block_group, spread=spread_rows, exact_keys=one_block,
                                   **kw)
    if key_padding_mask is not None:  # the Triton attention has no key-padding mask
        return bs.block_attention(query, key, value, kept, key_padding_mask, p0, scale=scale,
                                  **kw).contiguous()
    _, sb, wb, _ = bs.geometry(key.shape[2], window, sinks, q_block, k_block)
    return tba.block_attention_triton(query, key, value, kept, p0, q_block=q_block,
                                      k_block=k_block, scale=scale, sink_blocks=sb,
                                      window_blocks=wb, keys_topk=topk if one_block else 0)


@block_sparse_attention.register_fake
def _(query, key, value, *rest):
    B, Hq, Lq, _ = query.shape
    return query.new_empty((B, Hq, Lq, value.shape[3]))


def _block_select(query, key, kpm, p0, **kw):
    """The search of docs/blocksparse.md: the Triton kernels where Triton runs, else the reference."""
    if _use_triton(query.device):
        from . import triton_blocksparse_search as tss
        return tss.block_select_triton(query, key, kpm, p0, **kw)
    return bs.block_select(query, key, kpm, p0, **kw)


def _block_attend(query, key, value, kept, p0, *, window, sinks, q_block, k_block, scale,
                  table=None):
    """The attention of docs/blocksparse.md over given kept blocks (no key-padding mask): the
    Triton kernel where Triton runs, else the reference. table: paged keys and values
    (`blocksparse.check_table`)."""
    kw = dict(window=window, sinks=sinks, q_block=q_block, k_block=k_block)
    if not _use_triton(query.device):
        return bs.block_attention(query, key, value, kept, None, p0, scale=scale, table=table,
                                  **kw)
    from . import triton_blocksparse as tba
    T = key.shape[2] if table is None else table.shape[2] * k_block  # (checked by the kernel's)
    _, sb, wb, _ = bs.geometry(T, window, sinks, q_block, k_block)
    return tba.block_attention_triton(query, key, value, kept, p0, q_block=q_block,
                                      k_block=k_block, scale=scale, sink_blocks=sb,
                                      window_blocks=wb, table=table)


def _block_sparse_recompute(query, key, value, kpm, qpos, window, sinks, topk, scale,
                            dense_below, q_block, k_block, block_rows, block_pool,
                            block_summary=None, exact_rows=0, block_group=1, spread_rows=False):
    """The op's output as differentiable torch code (the search under no_grad: the selection is
    discrete, no gradient flows through it, as in the contract; it is deterministic, so it
    returns the forward's blocks), attended by the reference (`_bsa_backward` sends prefills to
    the Triton backward where Triton runs)."""
    from .reference import dense_attention

    B, Hq, Lq, _ = query.shape
    T = key.shape[2]
    if T <= dense_below:
        return dense_attention(query, key, value, kpm, _positions(qpos, B, Lq), scale)
    p0 = _first_position(qpos, Lq, T)
    kw = dict(window=window, sinks=sinks, q_block=q_block, k_block=k_block)
    with torch.no_grad():
        kept = _block_select(query, key, kpm, p0, topk=topk, rows=block_rows, pool=block_pool,
                             summary=block_summary, exact_rows=exact_rows, group=block_group,
                             spread=spread_rows, **kw)
    return bs.block_attention(query, key, value, kept, kpm, p0, scale=scale, **kw)


def _bsa_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.params = tuple(inputs[5:])


def _bsa_backward_triton(query, key, value, grad, window, sinks, topk, scale, q_block, k_block,
                         block_rows, block_pool, exact_rows, block_group, spread_rows):
    """Gradients of a prefill through the Triton kernels: the search again (deterministic: the
    forward's blocks), the forward again for its log-sum-exp, then the backward kernels."""
    from . import triton_blocksparse as tba
    from .triton_blocksparse_backward import block_attention_backward_triton

    B, Hq, L, _ = query.shape
    kw = dict(window=window, sinks=sinks, q_block=q_block, k_block=k_block)
    _, sb, wb, _ = bs.geometry(L, window, sinks, q_block, k_block)
    kept = _block_select(query, key, None, 0, topk=topk, rows=block_rows, pool=block_pool,
                         exact_rows=exact_rows, group=block_group, spread=spread_rows, **kw)
    lse = torch.empty(B, Hq, L, dtype=torch.float32, device=query.device)
    lists = dict(q_block=q_block, k_block=k_block, scale=scale, sink_blocks=sb, window_blocks=wb)
    out = tba.block_attention_triton(query, key, value, kept, 0, lse=lse, **lists)
    return block_attention_backward_triton(query, key, value, out, lse,
                                           grad.to(query.dtype).contiguous(), kept, **lists)


def _bsa_backward(ctx, grad):
    """Gradients for query, key and value: the Triton backward for a prefill without padding where
    Triton runs, else by recomputing the attention under autograd."""
    query, key, value, kpm, qpos = ctx.saved_tensors
    (window, sinks, topk, scale, dense_below, q_block, k_block, block_rows,
     block_pool) = ctx.params[:9]
    exact_rows = ctx.params[10] if len(ctx.params) > 10 else 0
    block_group = ctx.params[11] if len(ctx.params) > 11 else 1
    spread_rows = ctx.params[12] if len(ctx.params) > 12 else False
    Lq, T = query.shape[2], key.shape[2]
    if (_use_triton(query.device) and kpm is None and Lq == T and T > dense_below
            and _first_position(qpos, Lq, T) == 0):
        grads = _bsa_backward_triton(query, key, value, grad, window, sinks, topk, scale,
                                     q_block, k_block, block_rows, block_pool, exact_rows,
                                     block_group, spread_rows)
        return tuple(grads) + (None,) * (2 + len(ctx.params))
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (query, key, value)]
        out = _block_sparse_recompute(*leaves, kpm, qpos, *ctx.params)
        dq, dk, dv = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return (dq, dk, dv) + (None,) * (2 + len(ctx.params))


block_sparse_attention.register_autograd(_bsa_backward, setup_context=_bsa_setup)
