"""Hugging Face transformers without compiling: ``attn_implementation="superlinear"``.

Importing this module registers an attention function and its mask function under the name
``"superlinear"`` with transformers (5.x ``AttentionInterface`` / ``AttentionMaskInterface``). Nothing
changes for a model until it selects that name::

    import slcompile.hf
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="superlinear")
    slcompile.hf.configure(model, window=256, dense_below=0)      # optional; defaults otherwise

    # or, on a loaded model
    slcompile.hf.configure(model, window=256, dense_below=0)      # also switches the model over

The `SuperlinearConfig` is read, per call, from the attention module's model config attribute
``superlinear`` (a dict of `SuperlinearConfig` fields, saved with ``save_pretrained``); without one
the defaults apply.

Masks. transformers hands a custom attention function ``attention_mask=None`` unless a mask function is
registered under the same name, which would silently drop padding. Ours builds a small
`SuperlinearMask` (never a [Lq, T] tensor): the key-padding mask, the query positions and, when the
batch is padded, the per-row order that packs each row's present keys to the front. Positions in
superlinear attention are therefore *token* positions within each sequence, not slots of the padded
buffer: a left-padded row attends exactly as the same sequence alone would (same sinks, same window,
same stripes), which is what makes batched generation equal one sequence at a time. Only causal
masks are supported; a packed-sequence, sliding-window or custom mask function raises.

Caches: DynamicCache (keys are the whole past, queries bottom-right) and StaticCache (queries sit at
the cache position; unfilled slots lie after every query and are never seen) both work through the
query positions carried by the mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from slcompile.functional import superlinear_attention
from slcompile.kernels.config import SuperlinearConfig

NAME = "superlinear"
CONFIG_ATTR = "superlinear"

__all__ = ["NAME", "SuperlinearMask", "configure", "get_config", "register",
           "superlinear_attention_forward", "superlinear_mask"]


@dataclass
class SuperlinearMask:
    """What the mask function hands the attention function (shared by all layers of a forward).

    Attributes:
        key_padding_mask: bool [B, T] in the attention's key order (after packing), True = key
            present; None when every key is present.
        query_positions: int64 [B, Lq], absolute positions of the queries in that key order.
        gather_index: int64 [B, T] or None: key slot j of row b in the attention's order is slot
            ``gather_index[b, j]`` of the cache (present keys first, in order). None: identity.
        kv_length: T, checked against the keys the attention receives.
    """

    key_padding_mask: Optional[Tensor]
    query_positions: Tensor
    gather_index: Optional[Tensor]
    kv_length: int

    # transformers treats a mask with a 4-D ``shape`` as prepared and passes it through untouched
    # (generate() builds masks ahead of the forward for static caches); we present as one.
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

def _model_config(obj) -> Any:
    cfg = getattr(obj, "config", None)
    return cfg


def get_config(module_or_model) -> SuperlinearConfig:
    """The `SuperlinearConfig` of a model or attention module (its ``config.superlinear``;
    defaults when absent)."""
    cfg = _model_config(module_or_model)
    raw = getattr(cfg, CONFIG_ATTR, None) if cfg is not None else None
    if raw is None:
        return SuperlinearConfig()
    if isinstance(raw, SuperlinearConfig):
        return raw
    if isinstance(raw, dict):
        return SuperlinearConfig.from_dict(raw)
    raise TypeError(f"model config attribute {CONFIG_ATTR!r} must be a dict of SuperlinearConfig "
                    f"fields or a SuperlinearConfig, got {type(raw).__name__}")


def configure(model, config: Optional[SuperlinearConfig] = None, *, enable: bool = True,
              **fields: Any) -> SuperlinearConfig:
    """Set the `SuperlinearConfig` a transformers model uses under ``attn_implementation="superlinear"``.

    Args:
        model: a transformers ``PreTrainedModel``.
        config: a full config (default: the model's current one, or the defaults).
        enable: also switch the model to the superlinear attention implementation
            (``model.set_attn_implementation("superlinear")``).
        **fields: `SuperlinearConfig` fields to change (validated).

    The config is stored as a dict in ``model.config.superlinear`` (and in every sub-config of
    the model that attention modules read), so ``save_pretrained`` keeps it.
    """
    register()
    base = config if config is not None else get_config(model)
    if not isinstance(base, SuperlinearConfig):
        raise TypeError(f"configure: config must be a SuperlinearConfig, got {type(base).__name__}")
    new = base.replace(**fields) if fields else base
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
            "sequences, sliding windows, bidirectional blocks or and/or masks are not supported)")
    if kv_offset != 0:
        raise NotImplementedError(
            f"superlinear attention needs the whole past in the cache (kv_offset={kv_offset}); "
            "sliding-window caches are not supported")
    device = torch.device(device)
    if isinstance(q_offset, Tensor):
        q_offset = q_offset.to(device=device, dtype=torch.int64).reshape(())
    qpos = torch.arange(q_length, device=device, dtype=torch.int64) + q_offset  # [Lq]
    qpos = qpos.expand(batch_size, q_length)

    present = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError(
                f"superlinear attention takes a 2-D padding mask [B, T]; got shape {tuple(attention_mask.shape)}")
        present = attention_mask.to(device=device, dtype=torch.bool)
        if present.shape[-1] < kv_length:  # static caches: slots not yet written are absent
            present = torch.nn.functional.pad(present, (0, kv_length - present.shape[-1]))
        elif present.shape[-1] > kv_length:
            present = present[:, :kv_length]
        if present.shape[0] != batch_size:
            present = present.expand(batch_size, kv_length)
        # With a static cache the unwritten slots past the queries are "absent" too; they never
        # precede a query, so they change no position. Only absent keys *before* some query matter.
        upto = int(qpos.max().item()) + 1 if q_length > 0 else 0
        if bool(present[:, :upto].all()):
            present = None
    if present is None:
        return SuperlinearMask(None, qpos.contiguous(), None, kv_length)

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
    return SuperlinearMask(kpm, new_q.contiguous(), gather_index, kv_length)


# --------------------------------------------------------------------------------------------
# Attention function
# --------------------------------------------------------------------------------------------

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
        raise NotImplementedError(f"superlinear attention is causal only; {type(module).__name__} "
                                  "is not causal")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("superlinear attention cannot return attention weights")
    cfg = get_config(module)
    B, Hq, Lq, D = query.shape
    T = key.shape[2]

    if attention_mask is None:
        # no mask function ran (e.g. a standalone module): bottom-right, nothing padded
        m = SuperlinearMask(None, (torch.arange(Lq, device=query.device) + (T - Lq)).expand(B, Lq),
                            None, T)
    elif isinstance(attention_mask, SuperlinearMask):
        m = attention_mask
    else:
        raise NotImplementedError(
            "superlinear attention got a prepared attention mask "
            f"({type(attention_mask).__name__} of shape {tuple(getattr(attention_mask, 'shape', ()))}); "
            "pass a 2-D padding mask (or none) so that the 'superlinear' mask function builds it")
    if m.kv_length != T:
        raise ValueError(f"superlinear attention: the mask was built for {m.kv_length} keys but the "
                         f"layer has {T} (a cache with per-layer lengths is not supported)")
    if m.gather_index is not None:
        gi = m.gather_index[:, None, :, None]
        key = torch.gather(key, 2, gi.expand(B, key.shape[1], T, key.shape[3]))
        value = torch.gather(value, 2, gi.expand(B, value.shape[1], T, value.shape[3]))
    qpos = m.query_positions
    if qpos.shape[0] != B:
        qpos = qpos.expand(B, -1)
    out = superlinear_attention(
        query, key, value, config=cfg, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
        key_padding_mask=m.key_padding_mask, query_positions=qpos)
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def register() -> None:
    """Register ``"superlinear"`` with transformers (idempotent; done on import)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, superlinear_attention_forward)
    AttentionMaskInterface.register(NAME, superlinear_mask)
    _REGISTERED = True


register()
