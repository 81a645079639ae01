"""One lowering of a `SuperlinearConfig` into calls of the custom ops (``torch.ops.superlinear``).

The functional form, the graph rewrite and sequence parallelism all state a config as op
arguments through this module, so the three cannot drift apart. ``call(op, args)`` makes one call:
eagerly (the default) it runs the op; the graph rewrite passes its emitter's ``call``, which adds a
node. ``getitem(result, i)`` picks a tuple output the same way.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Tuple

import torch

from . import ops as _ops  # registers torch.ops.superlinear
from .config import SuperlinearConfig

Call = Callable[[Any, tuple], Any]


def eager_call(op, args: tuple):
    fn = _ops.direct(op, args)  # eager inference: the implementation without the dispatcher
    return op(*args) if fn is None else fn(*args)


_TRAILING_DEFAULTS = (None, 0, 1, False)


def block_sparse_trailing(c: SuperlinearConfig, block_summary=None) -> tuple:
    """block_sparse_attention's optional last arguments (block_summary, exact_rows, block_group,
    spread_rows), as many as needed to state them: the op's defaults (None, 0, 1, False) are the
    semantics of graphs exported before those arguments existed, so a graph states only what
    differs."""
    args = (block_summary, c.exact_rows, c.block_group, c.spread_rows)
    n = len(args)
    while n > 1 and args[n - 1] == _TRAILING_DEFAULTS[n - 1]:
        n -= 1
    if n == 1 and block_summary is None:
        n = 0
    return args[:n]


def block_select_kwargs(c: SuperlinearConfig) -> dict:
    """The block-sparse search's keyword arguments (`blocksparse.block_select` and its Triton
    twin) for a config: what block_sparse_attention searches with."""
    return dict(window=c.window, sinks=c.sinks, topk=c.topk, q_block=c.q_block, k_block=c.k_block,
                rows=c.block_rows, pool=c.block_pool, exact_rows=c.exact_rows,
                group=c.block_group, spread=c.spread_rows)


def search(c: SuperlinearConfig, search_query, key, kpm, qpos, dense_below: int,
           call: Call = eager_call):
    """The span search of a stripe search kind (steps=2: docs/spec.md; steps>2: docs/nstep.md):
    the op call that returns (anchors, scores)."""
    if c.kind.block_sparse:
        raise ValueError("lowering.search: search_key='blocksparse' searches inside "
                         "block_sparse_attention")
    if c.steps == 2:
        return call(torch.ops.superlinear.span_search.default,
                    (search_query, key, kpm, qpos, c.window, c.topk, c.search_power, c.span_power,
                     c.backward_factor, c.forward_factor, c.search_key, dense_below))
    return call(torch.ops.superlinear.nstep_search.default,
                (search_query, key, kpm, qpos, c.window, c.topk, c.steps, c.backward_factor,
                 c.forward_factor, c.search_key, dense_below))


def attention(c: SuperlinearConfig, q, k, v, kpm, qpos, scale: float, *,
              dense_below: Optional[int] = None, search_query=None, searched: Optional[Tuple] = None,
              block_summary=None, call: Call = eager_call,
              getitem: Callable[[Any, int], Any] = operator.getitem):
    """Superlinear attention of q over k, v as the config says: block_sparse_attention (search
    and attention in one op), or the stripe search then span_attention. ``dense_below`` overrides
    the config's (sequence parallelism passes 0 for a rank whose own prefix is short);
    ``searched`` is an (anchors, scores) pair already searched (stripe kinds only);
    ``search_query`` scores spans instead of q (stripe kinds only)."""
    db = c.dense_below if dense_below is None else dense_below
    scale = float(scale)
    if c.kind.block_sparse:  # docs/blocksparse.md
        if search_query is not None or searched is not None:
            raise ValueError("search_key='blocksparse' selects with the attention query; a "
                             "separate search query or search result is not supported")
        return call(torch.ops.superlinear.block_sparse_attention.default,
                    (q, k, v, kpm, qpos, c.window, c.sinks, c.topk, scale, db, c.q_block,
                     c.k_block, c.block_rows, c.block_pool) + block_sparse_trailing(c, block_summary))
    if block_summary is not None:
        raise ValueError("block_summary is for search_key='blocksparse'")
    if searched is None:
        ss = search(c, q if search_query is None else search_query, k, kpm, qpos, db, call)
        searched = (getitem(ss, 0), getitem(ss, 1))
    anchors, scores = searched
    return call(torch.ops.superlinear.span_attention.default,
                (q, k, v, anchors, scores, kpm, qpos, c.window, c.sinks, c.attention_span_power,
                 c.backward_factor, c.forward_factor, c.combine, scale, db))
