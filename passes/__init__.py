"""slcompile.passes: FX analysis and rewriting of attention sites.

`rewrite_graph(gm, config)` finds dense attention in a dynamo graph (torch-level) or an ATen graph
(torch.export's ``graph_module`` or ``ep.module()``, AOTAutograd), proves each mask causal from the
graph (`maskproof`), and replaces every proven site with the superlinear ops its config lowers to
(``superlinear::block_sparse_attention`` by default; kernels/lowering.py). It returns a
`RewriteReport`; sites it leaves alone carry the reason. Both graph levels are read through one
canonical vocabulary (`canon`), so no re-tracing is needed (the rewrite of a 30-layer model's graph
takes a few hundred milliseconds).

Modules: `canon` (the vocabulary), `maskproof` (the abstract evaluator of masks), `graph` (node
readers and the emitter), `sites` (the site forms and their parsers), `emit` (a proven site's op
calls), `rewrite` (the driver: find, prove, emit, report).

Sites:
    * SDPA (``F.scaled_dot_product_attention``, ``aten.scaled_dot_product_attention`` and the fused
      ATen variants) with ``is_causal=True`` or a mask, any ``scale`` (constant or runtime),
      ``enable_gqa``;
    * ``softmax(q @ k^T)`` ``@ v`` written by hand: matmul / bmm / ``baddbmm(beta=0)`` / einsum
      (explicit subscripts in any order, e.g. ``'bqhd,bkhd->bhqk'``) / AOTAutograd's
      view(bmm(view(expand))), keys pre-permuted to [B, H, D, T] (``permute(0, 2, 3, 1)``),
      scaling on either side (constants or runtime scalars), masks by ``masked_fill`` / ``where`` /
      added biases (any number) / a 0/1 mask multiplied in when a later mask removes what it zeroes
      (``w * b + -1e4 * (1 - b)``), floors ``max(w, finfo.min)``, views of the leading dims
      ([B*H, L, T] <-> [B, H, L, T]), float32 upcasts, inactive dropout; any softmax spelling
      (``torch.ops.aten._safe_softmax`` with or without an overload);
    * ``nn.MultiheadAttention`` self-attention (``F.multi_head_attention_forward``), its
      ``key_padding_mask`` carried; ``nn.TransformerEncoderLayer``'s fused fast path
      (``torch._transformer_encoder_layer_fwd``, eval mode), re-emitted around the rewrite;
    * 3-D [B*H, L, D] attention: over views of [B, H, L, D] tensors it runs as 4-D (padding carried),
      otherwise as B*H heads (no padding carried).
    K/V are read un-repeated through ``repeat_kv`` (unsqueeze + expand + reshape),
    ``repeat_interleave`` on the head dim, or ``enable_gqa``.

Causality is proven, never guessed: mask subgraphs are evaluated abstractly (aranges, offsets,
comparisons, gathers, tril/triu with constant or size diagonals, transposes (``.T``, ``.mT``),
``repeat`` of broadcast dims, constant buffers read concretely, and/or/not/where/masked_fill,
additive 0/-inf biases); an op on positions that the evaluator does not read is named in the
reason. A fill value (``masked_fill``, ``where``, an additive bias) counts as removing keys only if
it reaches the softmax still effectively -inf: the scales, floors and sign changes between the
mask and the softmax are followed, and a finite fill must arrive at or below -1e4 (``-1e4 / 2000``
does not; ``-inf`` scaled by a positive runtime scalar does). The only runtime data allowed in a
mask is a per-(batch, key) factor,
which becomes ``key_padding_mask``, and integer scalars that offset positions. A causal comparison with an offset becomes ``query_positions``
when the offset is not the bottom-right one: a constant (checked against the key length at run time
when lengths are symbolic) or one holding runtime integer scalars, such as a StaticCache's fill
level, in which case the graph's own tensor of query positions (the one the mask was built from) is
passed to the ops, so the positions are read from the graph at run time, never assumed; a run-time
check raises a clear error before the ops run if any such position lies outside the keys (the mask
would then look ahead, e.g. ``k <= q + shift`` with ``shift = 1``). A constant offset under symbolic
lengths is decided as under static ones when the lengths' relation is known (``tril(1)`` over
queries and keys of one length is left alone either way), else checked at run time. One query
without any mask is a decode step only when its keys and values are ``cat([past, new])`` with
``new`` computed from the query's own input (a DynamicCache step); then it sits at the bottom-right.
In-place writes (a static cache's ``index_copy_``) are never removed as dead code. Left alone, with
the reason:
bidirectional and cross attention, sliding-window and prefix-LM masks, masks that are runtime data
(e.g. the 4-D mask ``generate()`` builds outside the compiled forward for a StaticCache),
additive position biases (ALiBi), logit soft-capping, probabilities used elsewhere (returned
weights), dropout in training.

Assumptions: module buffers keep their contents (their values are read at compile time, as for
any module constant); runtime masks index keys from 0 (no negative index wrap-around).
"""

from .report import RewriteReport, SiteReport
from .rewrite import exported_constants, rewrite_graph

__all__ = ["rewrite_graph", "exported_constants", "RewriteReport", "SiteReport"]
