"""`superlinear_attention`: the functional form, shaped like `F.scaled_dot_product_attention`."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from slcompile.kernels import lowering as _lowering
from slcompile.kernels.config import SuperlinearConfig

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_tracing() -> bool:
    try:
        if torch.compiler.is_compiling():
            return True
    except AttributeError:  # pragma: no cover
        pass
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check(cond: bool, msg) -> None:
    """A ValueError of msg (a string, or a function that makes it: formatting every message of a
    call's checks cost more host time than the checks) unless cond."""
    if not cond:
        raise ValueError(f"superlinear_attention: {msg() if callable(msg) else msg}")


def validate_inputs(query, key, value, *, enable_gqa, key_padding_mask, query_positions,
                    search_query):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"superlinear_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        _check(t.dim() == 4, lambda: f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        _check(t.dtype in _FLOAT_DTYPES, lambda: f"{name} dtype {t.dtype} is not a floating type "
               f"({', '.join(str(d) for d in _FLOAT_DTYPES)})")
    _check(query.dtype == key.dtype == value.dtype,
           lambda: f"query, key, value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    _check(query.device == key.device == value.device,
           lambda: f"query, key, value must be on one device, got {query.device}, {key.device}, {value.device}")
    B, Hq, Lq, D = query.shape
    Bk, Hkv, T, Dk = key.shape
    _check(value.shape[:3] == key.shape[:3],
           lambda: f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in [B, H, L]")
    _check(Bk == B, lambda: f"batch sizes differ: query {B}, key {Bk}")
    _check(Dk == D, lambda: f"query head dim {D} != key head dim {Dk}")
    _check(Lq > 0, "query has an empty sequence (Lq = 0)")
    _check(T > 0, "key/value have an empty sequence (T = 0)")
    _check(Hq > 0 and Hkv > 0 and D > 0, lambda: f"empty heads or head dim: query {tuple(query.shape)}, key {tuple(key.shape)}")
    if enable_gqa:
        _check(Hq % Hkv == 0, lambda: f"query heads {Hq} are not divisible by key/value heads {Hkv}")
    else:
        _check(Hq == Hkv, lambda: f"query heads {Hq} != key/value heads {Hkv}; pass enable_gqa=True for GQA/MQA")
    if key_padding_mask is not None:
        _check(isinstance(key_padding_mask, Tensor) and key_padding_mask.dtype == torch.bool,
               "key_padding_mask must be a bool tensor (True = key present)")
        _check(tuple(key_padding_mask.shape) == (B, T),
               lambda: f"key_padding_mask shape {tuple(key_padding_mask.shape)} != (B, T) = {(B, T)}")
        _check(key_padding_mask.device == query.device,
               lambda: f"key_padding_mask is on {key_padding_mask.device}, query on {query.device}")
    if search_query is not None:
        _check(isinstance(search_query, Tensor) and search_query.dim() == 4,
               "search_query must be a 4-D tensor [B, Hq, Lq, D]")
        _check(tuple(search_query.shape) == (B, Hq, Lq, D),
               lambda: f"search_query shape {tuple(search_query.shape)} != {(B, Hq, Lq, D)}")
        _check(search_query.dtype == query.dtype and search_query.device == query.device,
               lambda: f"search_query must match query's dtype/device ({query.dtype}, {query.device})")


def normalize_positions(query_positions, B: int, Lq: int, T: int, device) -> Optional[Tensor]:
    """None, an int offset, or an integer tensor [Lq] / [B, Lq] -> None or int64 [B, Lq]."""
    if query_positions is None:
        _check(Lq <= T, f"{Lq} queries but only {T} keys: pass query_positions for this layout")
        return None
    if isinstance(query_positions, int) and not isinstance(query_positions, bool):
        _check(0 <= query_positions and query_positions + Lq <= T,
               f"query offset {query_positions} with {Lq} queries exceeds {T} keys")
        return (torch.arange(Lq, device=device, dtype=torch.int64) + query_positions).expand(B, Lq)
    _check(isinstance(query_positions, Tensor), "query_positions must be None, an int or an integer tensor")
    _check(not query_positions.is_floating_point() and query_positions.dtype != torch.bool,
           f"query_positions must be an integer tensor, got {query_positions.dtype}")
    _check(query_positions.device == device, f"query_positions is on {query_positions.device}, query on {device}")
    qp = query_positions
    if qp.dim() == 1:
        _check(qp.shape[0] == Lq, f"query_positions has {qp.shape[0]} entries for {Lq} queries")
        qp = qp.expand(B, Lq)
    _check(tuple(qp.shape) == (B, Lq), f"query_positions shape {tuple(qp.shape)} is not [Lq] or [B, Lq] = {(B, Lq)}")
    if not _is_tracing():
        lo, hi = int(qp.min()), int(qp.max())
        _check(lo >= 0 and hi < T, f"query_positions must lie in [0, {T}), got [{lo}, {hi}]")
    return qp.to(torch.int64)


def superlinear_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    config: Optional[SuperlinearConfig] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    query_positions: Union[None, int, Tensor] = None,
    search_query: Optional[Tensor] = None,
    block_summary: Optional[Tensor] = None,
) -> Tensor:
    """Superlinear causal attention (docs/spec.md), shaped like ``F.scaled_dot_product_attention``.

    Args:
        query: [B, Hq, Lq, D].
        key: [B, Hkv, T, D].
        value: [B, Hkv, T, Dv].
        config: `SuperlinearConfig` (defaults if None); ``steps=3`` (or more) runs the N-step
            search of docs/nstep.md, O(L^(1+1/N)).
        scale: softmax scale; overrides ``config.scale``; default 1/sqrt(D).
        enable_gqa: allow Hq to be a multiple of Hkv (query head h reads kv head h // (Hq/Hkv)).
        key_padding_mask: bool [B, T], True where a key exists.
        query_positions: absolute positions of the queries: None (bottom-right: T-Lq..T-1),
            an int offset, or an integer tensor [Lq] or [B, Lq].
        search_query: the query used to score spans (default: ``query``).
        block_summary: ``search_key="blocksparse"`` only: the key blocks' summaries kept with the
            cache (`slcompile.kernels.blocksparse.BlockSummaryCache`), so that a decoded token does
            not summarise the whole cache again (docs/blocksparse.md).

    Returns:
        [B, Hq, Lq, Dv] in query's dtype. Causal is implied: query at t sees keys 0..t.
    """
    if config is None:
        config = SuperlinearConfig()
    if not isinstance(config, SuperlinearConfig):
        raise TypeError(f"superlinear_attention: config must be a SuperlinearConfig, got {type(config).__name__}")
    validate_inputs(query, key, value, enable_gqa=enable_gqa, key_padding_mask=key_padding_mask,
                    query_positions=query_positions, search_query=search_query)
    B, Hq, Lq, D = query.shape
    T = key.shape[2]
    if scale is None:
        scale = config.scale if config.scale is not None else 1.0 / math.sqrt(D)
    _check(isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0,
           f"scale must be a finite number > 0, got {scale!r}")
    qpos = normalize_positions(query_positions, B, Lq, T, query.device)
    if config.kind.block_sparse:
        _check(search_query is None, "search_key='blocksparse' selects with the attention query; "
               "search_query is not supported")
    else:
        _check(block_summary is None, "block_summary is for search_key='blocksparse'")
    return _lowering.attention(config, query, key, value, key_padding_mask, qpos, scale,
                               search_query=search_query, block_summary=block_summary)
