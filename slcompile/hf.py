"""Hugging Face transformers without compiling: ``attn_implementation="superlinear"``.

After ``import slcompile``, transformers models that dispatch attention through its
``AttentionInterface`` (Llama, Mistral, Qwen2, SmolLM, ... in transformers 5.x) run superlinear
attention eagerly, ``generate()`` included::

    import slcompile
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="superlinear")
    slcompile.hf.configure(model, window=256, dense_below=0)   # optional; defaults otherwise

    # or, on a model that is already loaded (this also switches it over)
    slcompile.hf.configure(model, window=256, dense_below=0)
    model.set_attn_implementation("superlinear")               # the same, keeping the config

Registration. The name ``"superlinear"`` is registered with transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` when ``transformers.modeling_utils`` is imported, at once if it already was
(importing it ourselves would cost seconds, so ``import slcompile`` never does).

Config. The `SuperlinearConfig` is the model config's attribute ``superlinear``: a dict of its
fields, which ``save_pretrained`` writes to config.json and ``from_pretrained`` reads back.
`configure` sets it. Unknown fields
or a value of the wrong type raise at the first forward. A model whose rotary embedding is
stretched past its trained length (YaRN, linear or dynamic scaling by a factor f in its config)
keeps f times the default key blocks where ``topk`` is left out (`for_model`): past its trained
length a model's attention is flatter, and the default's 24 blocks lost retrieval there.

Masks. transformers hands a custom attention function ``attention_mask=None`` unless a mask function
is registered under the same name, which would silently drop padding. Ours builds a small
`SuperlinearMask` (never a [Lq, T] tensor): the key-padding mask, the query positions and, when the
batch is padded, the per-row order that packs each row's present keys to the front. Positions are
therefore *token* positions within each sequence, not slots of the padded buffer, and the choice
between exact dense and superlinear attention (``dense_below``) is made per sequence on its own
length: a left-padded row attends exactly as the same sequence alone would, which is what makes
batched generation equal one sequence at a time. Only plain causal masks are supported: packed
sequences, sliding windows, bidirectional or custom mask functions raise.

Caches. DynamicCache (keys are the whole past, queries bottom-right) and StaticCache (queries sit
at the cache position; unwritten slots lie after every query and are never seen) both work through
the query positions carried by the mask; so do chunked prefills. Caches that drop keys (sliding
window layers) raise.

Routers. When an attention module carries a buffer ``superlinear_router`` [Hq, D, D] (set by
`slcompile.calibrate.attach_routers`), span-search scores with ``query[b, h] @ router[h]`` instead
of the query itself.

Block summaries (``search_key="blocksparse"``). With a DynamicCache, each layer's key-block
summaries are kept beside the cache and updated from the new keys only, so a decoded token does not
read the whole cache to search it. The attention function finds the cache through a forward
pre-hook it puts on the attention module at its first call, and watches the layer's ``update``: the
summaries are reused only while the layer's keys grew by ``update`` alone (a crop, a beam reorder or
any other change of the keys rebuilds them from the keys). A padded batch, other caches, and
``torch.compile`` summarise the keys at every call instead (same results, O(T) per token).

Cost. A padded batch is packed by a gather of each layer's keys and values (O(T) per layer and
forward, as much memory traffic as reading the cache once); an unpadded batch is not copied.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from slcompile.functional import superlinear_attention
from slcompile.kernels.blocksparse import BlockSummaryCache, summary_keys
from slcompile.kernels.config import SuperlinearConfig

NAME = "superlinear"
CONFIG_ATTR = "superlinear"
ROUTER_ATTR = "superlinear_router"

__all__ = ["NAME", "CONFIG_ATTR", "ROUTER_ATTR", "SuperlinearMask", "configure", "for_model",
           "get_config", "register", "rope_stretch", "superlinear_attention_forward", "superlinear_mask"]

# keyword arguments of transformers' attention calls that change the attention itself; we cannot
# honour them, so they raise instead of being ignored
_UNSUPPORTED_KWARGS = {
    "sliding_window": "sliding-window attention layers",
    "softcap": "attention logit soft-capping",
    "s_aux": "learned attention sinks (s_aux)",
    "cu_seq_lens_q": "packed sequences (cu_seq_lens_q)",
    "cu_seq_lens_k": "packed sequences (cu_seq_lens_k)",
}


@dataclass
class SuperlinearMask:
    """What the mask function hands the attention function (shared by all layers of a forward).

    Attributes:
        key_padding_mask: bool [B, T] in the attention's key order (after packing), True = key
            present; None when every key a query can see is present.
        query_positions: int64 [B, Lq], positions of the queries in that key order.
        gather_index: int64 [B, T] or None: key slot j of row b in the attention's order is slot
            ``gather_index[b, j]`` of the cache (present keys first, in order). None: identity.
        kv_length: T, checked against the keys the attention receives.
        lengths: per row, the number of keys of its sequence up to its last query (what T would be
            for that sequence alone); decides dense or superlinear per row. None: T for every row.
        first_position: the first query's position when every row's queries sit at
            first_position..first_position+Lq-1 (no packing), as a Python int; else None. Lets the
            attention pass no position tensor for bottom-right queries (no device-to-host reads
            per layer).
    """

    key_padding_mask: Optional[Tensor]
    query_positions: Tensor
    gather_index: Optional[Tensor]
    kv_length: int
    lengths: Optional[Tuple[int, ...]] = None
    first_position: Optional[int] = None

    # transformers reads ``ndim`` of a prepared mask (generate() builds masks ahead of the forward
    # for static caches and passes them back in) and leaves one that is not 2-D alone.
    @property
    def shape(self) -> tuple:
        return (self.query_positions.shape[0], 1, self.query_positions.shape[1], self.kv_length)

    @property
    def ndim(self) -> int:
        return 4

    def dim(self) -> int:
        return 4

    @property
    def device(self) -> torch.device:
        return self.query_positions.device


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _config_from_items(items: tuple, stretch: float) -> SuperlinearConfig:
    return _stretched(SuperlinearConfig.from_dict(dict(items)), stretch)


# rope scalings that stretch a model's positions past the length it was trained at, by their
# ``factor``; "llama3" and "longrope" describe models trained at their long length
_STRETCHING_ROPE = ("yarn", "linear", "dynamic")


def rope_stretch(hf_config) -> float:
    """How far past its trained length a transformers config stretches the rotary embedding: the
    largest ``factor`` of a YaRN, linear or dynamic-NTK scaling in ``rope_parameters`` (or the
    ``rope_scaling`` of older configs; per layer type where it is a dict of them); 1.0 if none."""
    stretch = 1.0
    for attr in ("rope_parameters", "rope_scaling"):
        p = getattr(hf_config, attr, None)
        if not isinstance(p, dict):
            continue
        for params in [p] if ("rope_type" in p or "type" in p) else p.values():
            if not isinstance(params, dict):
                continue
            factor = params.get("factor")
            if (params.get("rope_type", params.get("type")) in _STRETCHING_ROPE
                    and isinstance(factor, (int, float)) and not isinstance(factor, bool)
                    and math.isfinite(factor)):
                stretch = max(stretch, float(factor))
    return stretch


def _stretched(cfg: SuperlinearConfig, stretch: float) -> SuperlinearConfig:
    if cfg.is_given("topk") or stretch <= 1.0 or not cfg.kind.block_sparse:
        return cfg
    return cfg.replace(topk=min(cfg.kind.topk_max, math.ceil(cfg.kind.topk * stretch)))


def for_model(cfg: SuperlinearConfig, hf_config) -> SuperlinearConfig:
    """``cfg`` with the defaults that depend on the model: on a model whose rope is stretched by f
    past its trained length (`rope_stretch`), a block-sparse search whose ``topk`` was left out
    keeps f times its kind's default (at most its bound). Stretched attention is flatter: SmolLM2
    with YaRN x2 at 16K found 0 of dense's 2 needles with 24 blocks, 2 of 2 with 48
    (benchmarks/RESULTS.md, quality past 8K). A topk given is kept."""
    return _stretched(cfg, rope_stretch(hf_config))


def _config_of(hf_config) -> SuperlinearConfig:
    """The config `get_config` gives, `for_model` applied; built once per (fields, stretch), since
    every attention call asks for it (not keyed on a config object: equal configs may differ in
    which fields were given)."""
    raw = getattr(hf_config, CONFIG_ATTR, None) if hf_config is not None else None
    stretch = rope_stretch(hf_config)
    if raw is None:
        return _config_from_items((), stretch)
    if isinstance(raw, SuperlinearConfig):
        return _stretched(raw, stretch)
    if isinstance(raw, dict):
        try:
            return _config_from_items(tuple(sorted(raw.items())), stretch)
        except TypeError as e:  # an unhashable value: validate it uncached for the message
            if "unhashable" not in str(e):
                raise
            return _stretched(SuperlinearConfig.from_dict(raw), stretch)
    raise TypeError(f"model config attribute {CONFIG_ATTR!r} must be a dict of SuperlinearConfig "
                    f"fields or a SuperlinearConfig, got {type(raw).__name__}")


def get_config(module_or_model) -> SuperlinearConfig:
    """The `SuperlinearConfig` of a model or attention module: its ``config.superlinear``
    (defaults when absent). Raises ValueError on unknown fields or invalid values, TypeError on a
    value that is neither a dict nor a `SuperlinearConfig`."""
    return _config_of(getattr(module_or_model, "config", None))


def configure(model, config: Optional[SuperlinearConfig] = None, *, enable: bool = True,
              **fields: Any) -> SuperlinearConfig:
    """Set the `SuperlinearConfig` a transformers model uses under ``attn_implementation="superlinear"``.

    Args:
        model: a transformers ``PreTrainedModel``.
        config: a full config (default: the model's current one, or the defaults).
        enable: also switch the model to the superlinear attention implementation
            (``model.set_attn_implementation("superlinear")``).
        **fields: `SuperlinearConfig` fields to change (validated; unknown names raise ValueError).

    Returns the config now in effect. It is stored as a dict in ``model.config.superlinear`` (and in
    every sub-config that the model's modules read), so ``save_pretrained`` keeps it.
    """
    register()
    if config is not None and not isinstance(config, SuperlinearConfig):
        raise TypeError(f"configure: config must be a SuperlinearConfig, got {type(config).__name__}")
    base = config if config is not None else get_config(model)
    new = for_model(base.replace(**fields) if fields else base, getattr(model, "config", None))
    d = new.to_dict()
    seen = set()
    for m in [model, *model.modules()]:
        cfg = getattr(m, "config", None)
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "to_dict"):
            continue
        seen.add(id(cfg))
        setattr(cfg, CONFIG_ATTR, dict(d))
    if enable:
        model.set_attn_implementation(NAME)
        # transformers only logs a warning for models whose attention does not dispatch through
        # AttentionInterface; they would keep their own attention
        if model.config._attn_implementation != NAME:
            raise NotImplementedError(
                f"{type(model).__name__} does not dispatch attention through transformers' "
                "AttentionInterface, so attn_implementation='superlinear' cannot take effect; use "
                "torch.compile(model, backend='superlinear') instead")
    return new


# --------------------------------------------------------------------------------------------
# Mask function
# --------------------------------------------------------------------------------------------

def superlinear_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[Tensor] = None,
    device="cpu",
    **kwargs: Any,
) -> SuperlinearMask:
    """transformers mask function for ``"superlinear"``: a `SuperlinearMask`, O(B*T) memory."""
    from transformers.masking_utils import causal_mask_function

    if isinstance(attention_mask, SuperlinearMask):  # prepared ahead (generate with a static cache)
        return attention_mask
    if mask_function is not None and mask_function is not causal_mask_function:
        raise NotImplementedError(
            "superlinear attention supports plain causal masks only; this model/input asked for a "
            f"custom mask function ({getattr(mask_function, '__name__', mask_function)!r}: packed "
            "sequences, sliding windows, bidirectional (non-causal) attention, or extra and/or "
            "masks are not supported)")
    if kv_offset != 0:
        raise NotImplementedError(
            f"superlinear attention needs the whole past in the cache (kv_offset={kv_offset}); "
            "sliding-window caches are not supported")
    device = torch.device(device)
    offset = int(q_offset)  # a tensor for static caches
    end = offset + q_length  # keys up to the last query, unpadded
    qpos = (torch.arange(q_length, device=device, dtype=torch.int64) + offset).expand(batch_size, q_length)

    present = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError("superlinear attention takes a 2-D padding mask [B, T]; got shape "
                                      f"{tuple(attention_mask.shape)}")
        present = attention_mask.to(device=device, dtype=torch.bool)
        if present.shape[-1] < kv_length:  # static caches: slots not yet written are absent
            present = torch.nn.functional.pad(present, (0, kv_length - present.shape[-1]))
        elif present.shape[-1] > kv_length:
            present = present[:, :kv_length]
        if present.shape[0] != batch_size:
            present = present.expand(batch_size, kv_length)
        # Slots after the last query (unwritten static-cache slots) change no position; only absent
        # keys before some query matter.
        if bool(present[:, :end].all()):
            present = None
    if present is None:
        return SuperlinearMask(None, qpos.contiguous(), None, kv_length, (end,) * batch_size,
                               offset)

    # Pack present keys to the front of each row (stable) and renumber the queries.
    idx = torch.arange(kv_length, device=device, dtype=torch.int64)
    sort_key = (~present).to(torch.int64) * kv_length + idx  # present first, in order
    gather_index = torch.argsort(sort_key, dim=1)
    count = present.sum(dim=1, keepdim=True)  # [B, 1]
    kpm = idx[None, :] < count
    before = torch.cumsum(present.to(torch.int64), dim=1)  # present keys at or before each slot
    new_q = torch.gather(before, 1, qpos.clamp(max=kv_length - 1)) - 1
    # a query at a padding slot (its output is never used) gets some valid position
    new_q = new_q.clamp(min=0)
    lengths = tuple(int(n) for n in (new_q.amax(dim=1) + 1).tolist())
    return SuperlinearMask(kpm, new_q.contiguous(), gather_index, kv_length, lengths)


# --------------------------------------------------------------------------------------------
# Attention function
# --------------------------------------------------------------------------------------------

def _where(module) -> str:
    layer = getattr(module, "layer_idx", None)
    return type(module).__name__ + (f" (layer {layer})" if layer is not None else "")


def _search_query(module, query: Tensor) -> Optional[Tensor]:
    """query @ router per head when the module carries a calibrated router, else None."""
    router = getattr(module, ROUTER_ATTR, None)
    if router is None:
        return None
    B, Hq, Lq, D = query.shape
    if not isinstance(router, Tensor) or not router.is_floating_point():
        raise TypeError(f"{_where(module)}.{ROUTER_ATTR} must be a floating-point tensor "
                        f"[Hq, D, D], got {type(router).__name__}"
                        + (f" of dtype {router.dtype}" if isinstance(router, Tensor) else ""))
    if tuple(router.shape) != (Hq, D, D):
        raise ValueError(f"{_where(module)}.{ROUTER_ATTR} has shape {tuple(router.shape)}; this "
                         f"layer has {Hq} query heads of dimension {D}, so it must be [{Hq}, {D}, {D}]")
    if router.device != query.device:
        raise ValueError(f"{_where(module)}.{ROUTER_ATTR} is on {router.device}, the query on "
                         f"{query.device}")
    return torch.einsum("bhld,hde->bhle", query.float(), router.float()).to(query.dtype)


@functools.lru_cache(maxsize=64)
@functools.lru_cache(maxsize=64)  # per layer and token: a config is 30 us to build and check
def _forced(cfg: SuperlinearConfig, dense: bool) -> SuperlinearConfig:
    # dense_below decides per call on the key tensor's length; we decide per sequence instead and
    # hand the kernels a value that forces that decision
    return cfg.replace(dense_below=2**62 if dense else 0)


class _KeptSummaries:
    """Block summaries of one cache layer's keys and the key tensor whose first
    ``cache.length`` keys they describe (weakly held, with its version counter: an in-place write
    invalidates them)."""

    def __init__(self, span: int):
        self.cache = BlockSummaryCache(span)
        self.keys: Optional[weakref.ref] = None
        self.version = -1

    def describes(self, key: Tensor) -> bool:
        return self.keys is not None and self.keys() is key and key._version == self.version


_KEPT: "weakref.WeakKeyDictionary[Any, _KeptSummaries]" = weakref.WeakKeyDictionary()
_HOOK_ATTR = "_superlinear_cache_hook"
_CACHE_ATTR = "_superlinear_cache"


def _capture_cache(module, args, kwargs) -> None:
    """Forward pre-hook: the cache this call of the attention module updates (None if none)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    setattr(module, _CACHE_ATTR, None if cache is None else weakref.ref(cache))


def _watch(layer) -> None:
    """Wrap one DynamicLayer's ``update``: when it appends to the very keys the summaries
    describe, they go on describing the new (longer) key tensor; any other history drops them."""
    orig = layer.update

    def update(key_states, value_states, *args, **kwargs):
        prev = getattr(layer, "keys", None)
        k, v = orig(key_states, value_states, *args, **kwargs)
        st = _KEPT.get(layer)
        if st is not None:
            if prev is not None and st.describes(prev):
                st.keys, st.version = weakref.ref(k), k._version  # k[:len(prev)] is prev
            else:
                st.keys = None
        return k, v

    layer.update = update


def _kept_summary(module, key: Tensor, cfg: SuperlinearConfig) -> Optional[Tensor]:
    """The summaries of ``key`` kept with this module's DynamicCache layer (updated from the keys
    appended since the last call), or None where they cannot be kept (see the module docstring)."""
    if torch.compiler.is_compiling():
        return None
    if getattr(module, _HOOK_ATTR, None) is None:  # from the next call on
        setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(_capture_cache,
                                                                     with_kwargs=True))
        return None
    ref = getattr(module, _CACHE_ATTR, None)
    cache = ref() if ref is not None else None
    idx = getattr(module, "layer_idx", None)
    layers = getattr(cache, "layers", None)
    if layers is None or not isinstance(idx, int) or not 0 <= idx < len(layers):
        return None
    layer = layers[idx]
    from transformers.cache_utils import DynamicLayer
    if type(layer) is not DynamicLayer or getattr(layer, "keys", None) is not key:
        return None
    span = summary_keys(cfg.window, cfg.k_block, cfg.block_group)  # keys per stage-1 group
    st = _KEPT.get(layer)
    if st is None:
        st = _KEPT[layer] = _KeptSummaries(span)
        _watch(layer)
    elif st.cache.k_block != span:
        st.cache, st.keys = BlockSummaryCache(span), None
    summary = st.cache.update(key, st.cache.length if st.describes(key) else 0)
    st.keys, st.version = weakref.ref(key), key._version
    return summary


def superlinear_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
):
    """transformers attention function for ``"superlinear"``.

    query [B, Hq, Lq, D], key/value [B, Hkv, T, D] (un-repeated; GQA is handled inside), returns
    ([B, Lq, Hq, Dv], None) like transformers' sdpa function.
    """
    if dropout and dropout > 0.0:
        raise NotImplementedError("superlinear attention does not implement attention dropout "
                                  f"(dropout={dropout}); call model.eval() or set attention_dropout=0")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if not causal:
        raise NotImplementedError(f"superlinear attention is causal only; {_where(module)} is not "
                                  "causal (encoder or cross-attention)")
    if kwargs.get("output_attentions") or getattr(getattr(module, "config", None), "output_attentions", False):
        raise NotImplementedError("superlinear attention cannot return attention weights "
                                  "(output_attentions=True); use attn_implementation='eager' for that")
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"superlinear attention does not support {what}; "
                                      f"{_where(module)} passed {name}")
    cfg = get_config(module)
    B, Hq, Lq, D = query.shape
    T = key.shape[2]

    if attention_mask is None:
        # no mask function ran (e.g. a standalone module): bottom-right, nothing padded
        if Lq > T:
            raise ValueError(f"superlinear attention: {Lq} queries but {T} keys and no mask")
        qpos = (torch.arange(Lq, device=query.device) + (T - Lq)).expand(B, Lq)
        m = SuperlinearMask(None, qpos, None, T, (T,) * B, T - Lq)
    elif isinstance(attention_mask, SuperlinearMask):
        m = attention_mask
    else:
        raise NotImplementedError(
            "superlinear attention got a prepared attention mask "
            f"({type(attention_mask).__name__} of shape {tuple(getattr(attention_mask, 'shape', ()))}); "
            "pass a 2-D padding mask (or none) so that the 'superlinear' mask function builds it")
    if m.kv_length != T:
        raise ValueError(f"superlinear attention: the mask was built for {m.kv_length} keys but "
                         f"{_where(module)} has {T} (a cache with per-layer lengths is not supported)")
    if m.gather_index is not None:
        gi = m.gather_index[:, None, :, None]
        key = torch.gather(key, 2, gi.expand(B, key.shape[1], T, key.shape[3]))
        value = torch.gather(value, 2, gi.expand(B, value.shape[1], T, value.shape[3]))
    qpos = m.query_positions
    if qpos.shape[0] != B:
        qpos = qpos.expand(B, -1)
    if m.gather_index is None and m.first_position == T - Lq:
        qpos = None  # bottom-right, the ops' default: no position tensor to check on the host
    kpm = m.key_padding_mask
    sq = _search_query(module, query)
    lengths = m.lengths if m.lengths is not None else (T,) * B
    dense = [n <= cfg.dense_below for n in lengths]

    summary = None
    if (cfg.kind.block_sparse and kpm is None and m.gather_index is None
            and not any(dense)):
        summary = _kept_summary(module, key, cfg)

    def attend(rows, as_dense):
        def pick(t):
            return t if t is None or rows is None else t[rows]
        return superlinear_attention(
            pick(query), pick(key), pick(value), config=_forced(cfg, as_dense), scale=scaling,
            enable_gqa=Hq != key.shape[1], key_padding_mask=pick(kpm), query_positions=pick(qpos),
            search_query=pick(sq), block_summary=summary)

    if cfg.kind.block_sparse and m.gather_index is not None:
        # a padded batch: block-sparse attention lays its blocks from each sequence's first key,
        # so each row runs as it would alone, over its present keys (packed to the front) up to
        # its last query; queries at padding slots (outputs never used) give zeros
        out = query.new_zeros(B, Hq, Lq, value.shape[3])
        for b, row in enumerate(qpos.tolist()):
            last, n = row[-1], 1
            while n < Lq and row[Lq - 1 - n] == last - n:
                n += 1
            sl = slice(b, b + 1)
            out[sl, :, Lq - n:] = superlinear_attention(
                query[sl, :, Lq - n:], key[sl, :, :last + 1], value[sl, :, :last + 1],
                config=_forced(cfg, dense[b]), scale=scaling, enable_gqa=Hq != key.shape[1],
                search_query=None if sq is None else sq[sl, :, Lq - n:])
    elif all(dense) or not any(dense):
        out = attend(None, dense[0])
    else:  # rows on both sides of dense_below: each row as it would run alone
        rows_d = torch.tensor([b for b in range(B) if dense[b]], device=query.device)
        rows_s = torch.tensor([b for b in range(B) if not dense[b]], device=query.device)
        out = torch.empty(B, Hq, Lq, value.shape[3], dtype=query.dtype, device=query.device)
        out[rows_d] = attend(rows_d, True)
        out[rows_s] = attend(rows_s, False)
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

_TRIGGER = "transformers.modeling_utils"
_REGISTERED = False


def register() -> None:
    """Register ``"superlinear"`` with transformers' attention and mask interfaces (idempotent).
    Done automatically once transformers' modeling code is imported; call it to do it now."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError as e:
        raise ImportError("slcompile.hf needs transformers >= 5 (AttentionInterface and "
                          "AttentionMaskInterface); pip install 'slcompile[hf]'") from e
    AttentionInterface.register(NAME, superlinear_attention_forward)
    AttentionMaskInterface.register(NAME, superlinear_mask)
    _REGISTERED = True


class _RegisterOnImport:
    """A meta-path finder that registers right after ``transformers.modeling_utils`` is executed,
    so that ``import slcompile`` stays cheap and works without transformers installed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        for finder in sys.meta_path:  # the spec the rest of the import system would find
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_after_import(self)

        loader.exec_module = exec_then_register
        return spec


def _register_after_import(finder) -> None:
    try:
        register()
    except Exception as e:  # never break the user's transformers import
        warnings.warn(f"slcompile could not register attn_implementation='superlinear' with "
                      f"transformers: {e}", RuntimeWarning, stacklevel=2)
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)


def _register_when_transformers_loads() -> None:
    """Register now if transformers' modeling code is loaded, else when it is (idempotent)."""
    if _REGISTERED:
        return
    if _TRIGGER in sys.modules:
        _register_after_import(None)
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


_register_when_transformers_loads()
