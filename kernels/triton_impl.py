"""Triton implementation of the superlinear custom ops (see ``ops.py``).

Importing this module raises ImportError when Triton is unavailable, so that ``ops`` falls back to
the reference. The functions take exactly the argument lists of ``reference.span_search`` and
``reference.span_attention``. The kernels live one per module: ``triton_search`` (step 1) and
``triton_attention`` (step 2); decoding (a few query rows per kv head,
``triton_decode.use_decode``) runs ``triton_decode``, which splits each (query, head) over many
programs. A search kind without a Triton kernel (``triton=False`` in kernels/searches.py) runs the
reference. On CUDA, the dense case (T <= dense_below) goes to
``F.scaled_dot_product_attention`` (flash) when its causal alignment matches docs/spec.md (Lq == T, no
explicit positions, no key padding, same q/v head dim; or a single bottom-right query); otherwise it runs the Triton kernel with
a window over every key. Dtypes other than fp32/bf16/fp16 and head dims above 256 run the
reference.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"triton is unavailable: {e}") from e

import torch
import torch.nn.functional as F

from . import reference, triton_attention, triton_decode, triton_search
from .searches import REGISTRY

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _supported(*tensors) -> bool:
    """Shapes and dtypes the kernels handle (head dims up to 256, fp32/bf16/fp16); anything
    else runs the reference, which is slow but exact."""
    return len({t.dtype for t in tensors}) == 1 and \
        all(t.dtype in _DTYPES and t.shape[-1] <= 256 for t in tensors)


__all__ = ["span_search", "span_attention", "dense_attention"]


def span_search(search_query, key, key_padding_mask, query_positions, window, topk,
                search_power, span_power, backward_factor, forward_factor, search_key,
                dense_below):
    kind = REGISTRY.get(search_key)
    if not _supported(search_query, key) or kind is None or kind.block_sparse or not kind.triton:
        return reference.span_search(search_query, key, key_padding_mask, query_positions, window,
                                     topk, search_power, span_power, backward_factor,
                                     forward_factor, search_key, dense_below)
    if kind.stripe_key == "anchor" and triton_decode.use_decode(search_query, key):
        return triton_decode.span_search(search_query, key, key_padding_mask, query_positions,
                                         window, topk, search_power, span_power, backward_factor,
                                         forward_factor, search_key, dense_below)
    return triton_search.span_search(search_query, key, key_padding_mask, query_positions,
                                     window, topk, search_power, span_power, backward_factor,
                                     forward_factor, search_key, dense_below)


def _sdpa_ok(q, k, v, key_padding_mask, query_positions) -> bool:
    # Lq == T: causal SDPA; Lq == 1 at the bottom-right (a decode step): it sees every key, so
    # SDPA without a mask (flash decoding, GQA-aware) is exactly causal attention
    return (q.is_cuda and key_padding_mask is None and query_positions is None
            and q.shape[2] in (k.shape[2], 1) and q.shape[3] == v.shape[3]
            and q.dtype == k.dtype == v.dtype and k.shape[2] > 0)


def dense_attention(q, k, v, key_padding_mask, query_positions, scale):
    """Exact causal attention: SDPA (flash) where it applies, the Triton kernel otherwise."""
    if _sdpa_ok(q, k, v, key_padding_mask, query_positions):
        Hq, Hkv = q.shape[1], k.shape[1]
        if Hq % Hkv != 0:
            raise ValueError(f"dense attention: query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale,
                                              enable_gqa=Hq != Hkv)
    return triton_attention.dense_attention(q, k, v, key_padding_mask, query_positions, scale)


def span_attention(query, key, value, anchors, scores, key_padding_mask, query_positions, window,
                   sinks, span_power, backward_factor, forward_factor, combine, scale,
                   dense_below):
    T, Lq = key.shape[2], query.shape[2]
    if not _supported(query, key, value):
        return reference.span_attention(query, key, value, anchors, scores, key_padding_mask,
                                        query_positions, window, sinks, span_power,
                                        backward_factor, forward_factor, combine, scale,
                                        dense_below)
    if (T <= dense_below or Lq == 0) and _sdpa_ok(query, key, value, key_padding_mask,
                                                  query_positions):
        return dense_attention(query, key, value, key_padding_mask, query_positions, scale)
    if triton_decode.use_decode(query, key):
        triton_attention._check(query, key, value)
        return triton_decode.span_attention(query, key, value, anchors, scores, key_padding_mask,
                                            query_positions, window, sinks, span_power,
                                            backward_factor, forward_factor, combine, scale,
                                            dense_below)
    return triton_attention.span_attention(query, key, value, anchors, scores, key_padding_mask,
                                           query_positions, window, sinks, span_power,
                                           backward_factor, forward_factor, combine, scale,
                                           dense_below)
