"""Router calibration: learn each attention layer's search projection from the model's own dense
attention.

A converted pretrained model was never trained to route: span-search scores candidate regions with
the attention query itself. Calibration learns, per layer and query head, a linear map
``router[h]`` [D, D] so that the search query ``query[b, h] @ router[h]`` ranks the candidate regions
the way dense attention distributes its mass over them. Nothing else changes: the attention query,
keys and values, and every weight of the model, stay as they are.

How:

1. **Capture** (no gradients): dense forward passes over ordinary text. In each attention layer, for
   a random sample of query positions t, the post-RoPE query and the exact dense attention
   probabilities are reduced to what the search sees: per candidate region (before the window, the
   part routing must find) the dense attention mass it holds, and the region's key summary.
2. **Distil** (per layer, the model frozen): minimise the KL divergence from the dense mass
   distribution over the candidate regions to the softmax of the search scores computed from
   ``query @ router`` (plus a learned per-head temperature that is folded into the router). The
   regions are the stripe spans of the query (docs/spec.md), scored by qs . k[anchor]
   (``search_key="anchor"``) or qs . mean(k over the span) (``"mean"``, the default here:
   `DEFAULT_SEARCH_KEY`). The default search, ``"blocksparse"``, selects with the attention query
   itself and takes no router.

The routers start at the identity (the training-free search) and the loss is measured on held-back
queries before and after; ``Routers.info`` records both. A learned router is kept only if the
held-back queries' top-k spans hold more dense mass with it than with the identity.

Contract with the attention function (``slcompile.hf``): `attach_routers` sets, on every attention
module (``model.model.layers[i].self_attn`` for Llama-family models; the ``module`` transformers
passes to an attention function), a float32 buffer ``superlinear_router`` [Hq, D, D] such that
``search_query[b, h] = query[b, h] @ router[h]``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import types
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import Tensor

from slcompile.kernels.config import SuperlinearConfig
from slcompile.kernels.geometry import span_extents, stripe_deltas

__all__ = ["Routers", "calibrate", "save_routers", "load_routers", "attach_routers", "search_query",
           "BUFFER", "DEFAULT_SEARCH_KEY", "min_tokens"]

BUFFER = "superlinear_router"
_FORMAT = "slcompile-routers/1"
_CAPTURE = "slcompile_calibrate_capture"
# The search routers are calibrated for when no config is given: docs/spec.md's stripe search with
# mean keys, which summarise a converted model's spans better than one anchor key (perplexity +27%
# against +75% at 2K, benchmarks/RESULTS.md).
DEFAULT_SEARCH_KEY = "mean"
# Keys a sampled query has before its window at least, so that it has spans to choose between.
BEFORE_WINDOW = 32


def min_tokens(config: SuperlinearConfig) -> int:
    """Calibration uses sequences of more than this many tokens: the window, `BEFORE_WINDOW` keys
    before it and two more."""
    return config.window + BEFORE_WINDOW + 2


@dataclass
class Routers:
    """Learned search projections.

    Attributes:
        config: the `SuperlinearConfig` they were calibrated for (its ``search_key`` decides what
            the routers were trained to rank).
        weights: attention module name (``model.named_modules()``) -> float32 [Hq, D, D].
        info: what calibration measured (loss before/after per layer, seconds, tokens, ...).
    """

    config: SuperlinearConfig
    weights: Dict[str, Tensor]
    info: Dict[str, Any] = field(default_factory=dict)


def search_query(query: Tensor, router: Tensor) -> Tensor:
    """query [B, Hq, L, D] @ router [Hq, D, D] per head -> [B, Hq, L, D] (query's dtype)."""
    if router.dim() != 3 or router.shape[0] != query.shape[1] or router.shape[1] != query.shape[-1] \
            or router.shape[2] != query.shape[-1]:
        raise ValueError(f"router of shape {tuple(router.shape)} does not fit a query of shape "
                         f"{tuple(query.shape)} (expected [Hq, D, D] = [{query.shape[1]}, "
                         f"{query.shape[-1]}, {query.shape[-1]}])")
    r = router.to(device=query.device, dtype=torch.float32)
    return torch.einsum("bhld,hde->bhle", query.float(), r).to(query.dtype)


# --------------------------------------------------------------------------------------------
# Saving, loading, attaching
# --------------------------------------------------------------------------------------------

def save_routers(routers: Routers, path: str) -> str:
    """Write routers to ``path`` (safetensors: one float32 tensor per attention module, the config
    and info as JSON metadata). The file is written next to its destination and renamed into place,
    so a reader never sees half a file. Returns the path."""
    from safetensors.torch import save_file

    if not isinstance(routers, Routers):
        raise TypeError(f"save_routers: expected Routers, got {type(routers).__name__}")
    if not routers.weights:
        raise ValueError("save_routers: no router weights to save")
    tensors = {}
    for name, w in routers.weights.items():
        if not isinstance(w, Tensor) or w.dim() != 3 or w.shape[1] != w.shape[2]:
            raise ValueError(f"save_routers: router {name!r} must be a tensor [Hq, D, D], got "
                             f"{getattr(w, 'shape', type(w).__name__)}")
        tensors[name] = w.detach().to("cpu", torch.float32).contiguous()
    meta = {"format": _FORMAT, "config": json.dumps(routers.config.to_dict()),
            "info": json.dumps(routers.info, default=str)}
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ValueError(f"save_routers: directory {d!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".routers-", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_routers(path: str) -> Routers:
    """Read a file written by `save_routers`. Raises ValueError naming the problem for a missing,
    truncated or foreign file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"load_routers: no such file: {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            weights = {n: f.get_tensor(n) for n in names}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"load_routers: {path!r} is not a readable routers file "
                         f"({type(e).__name__}: {e})") from None
    if meta.get("format") != _FORMAT:
        raise ValueError(f"load_routers: {path!r} is not a routers file (format "
                         f"{meta.get('format')!r}, expected {_FORMAT!r})")
    try:
        config = SuperlinearConfig.from_dict(json.loads(meta["config"]))
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"load_routers: {path!r} has a bad config: {e}") from None
    for n, w in weights.items():
        if w.dim() != 3 or w.shape[1] != w.shape[2] or w.dtype != torch.float32:
            raise ValueError(f"load_routers: {path!r}: router {n!r} is not float32 [Hq, D, D] "
                             f"({w.dtype}, {tuple(w.shape)})")
    if not weights:
        raise ValueError(f"load_routers: {path!r} holds no routers")
    return Routers(config, weights, info)


def attention_modules(model) -> Dict[str, torch.nn.Module]:
    """The attention modules of a transformers decoder: name -> module, in layer order (modules
    with q/k projections and a ``layer_idx``, the ``module`` an attention function receives)."""
    mods = {}
    for name, m in model.named_modules():
        if hasattr(m, "layer_idx") and hasattr(m, "q_proj") and hasattr(m, "k_proj"):
            mods[name] = m
    if not mods:
        raise TypeError(f"{type(model).__name__} has no transformers attention modules (modules "
                        "with q_proj, k_proj and layer_idx); calibration supports transformers "
                        "decoder models")
    return mods


def attach_routers(model, routers: Routers) -> int:
    """Register ``superlinear_router`` float32 [Hq, D, D] on each attention module of ``model``
    (replacing an earlier one). Every module must get one and every router must fit its module.
    Returns the number of modules."""
    if not isinstance(routers, Routers):
        raise TypeError(f"attach_routers: expected Routers, got {type(routers).__name__}")
    mods = attention_modules(model)
    missing = sorted(set(mods) - set(routers.weights))
    extra = sorted(set(routers.weights) - set(mods))
    if missing or extra:
        raise ValueError(f"attach_routers: routers do not match the model's attention modules "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unknown "
                         f"{extra[:3]}{'...' if len(extra) > 3 else ''})")
    for name, m in mods.items():
        w = routers.weights[name]
        hq, d = _heads(m)
        if tuple(w.shape) != (hq, d, d):
            raise ValueError(f"attach_routers: router {name!r} has shape {tuple(w.shape)}, the module "
                             f"needs [{hq}, {d}, {d}]")
        dev = m.q_proj.weight.device
        m.register_buffer(BUFFER, w.detach().to(dev, torch.float32).clone(), persistent=False)
    return len(mods)


def _heads(m) -> tuple:
    d = getattr(m, "head_dim", None) or m.config.hidden_size // m.config.num_attention_heads
    hq = m.q_proj.weight.shape[0] // d
    return hq, d


# --------------------------------------------------------------------------------------------
# Step 1: capture what the search sees, from dense attention
# --------------------------------------------------------------------------------------------

def _stripe_candidates(t: Tensor, cfg: SuperlinearConfig, T: int):
    """Per sampled query t [n]: stripe anchors [n, S] and their spans [lo, hi] (valid mask)."""
    W = cfg.window
    n_st = max(1, int(math.floor((T + 1) ** cfg.search_power)) + 2)
    deltas = stripe_deltas(n_st, cfg.search_power, t.device)
    back, fwd = span_extents(T, cfg.span_power, cfg.backward_factor, cfg.forward_factor, t.device)
    a = t[:, None] - deltas[None, :]
    valid = (deltas[None, :] >= W) & (a >= 0)
    a = a.clamp(min=0)
    lo = (a - back[t][:, None]).clamp(min=0)
    hi = torch.minimum(a + fwd[t][:, None], (t - W)[:, None]).clamp(min=0)
    return a, lo, hi, valid


class _Capture:
    """Attention function registered as ``_CAPTURE``: transformers' sdpa (dense, the teacher), and
    per layer a sample of what the search needs."""

    def __init__(self, cfg: SuperlinearConfig, queries: int, gen: torch.Generator):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        self.cfg, self.queries, self.gen = cfg, queries, gen
        self.samples: Dict[int, List[dict]] = {}
        self._sdpa = sdpa_attention_forward
        AttentionInterface.register(_CAPTURE, self._forward)
        AttentionMaskInterface.register(_CAPTURE, sdpa_mask)

    def _forward(self, module, query, key, value, attention_mask, scaling=None, **kw):
        with torch.no_grad():
            self._sample(module, query, key, scaling)
        return self._sdpa(module, query, key, value, attention_mask, scaling=scaling, **kw)

    def _sample(self, module, query, key, scaling):
        cfg = self.cfg
        B, Hq, L, D = query.shape
        Hkv, T = key.shape[1], key.shape[2]
        if L != T:
            raise ValueError("calibration runs plain prefills (no cache)")
        scale = scaling if scaling is not None else 1.0 / math.sqrt(D)
        g = Hq // Hkv
        t_min = cfg.window + BEFORE_WINDOW
        if T <= t_min:
            return
        for b in range(B):
            cand = torch.arange(t_min, T)
            pick = torch.randperm(cand.numel(), generator=self.gen)[:self.queries]
            t = cand[pick].sort().values.to(query.device)
            q = query[b, :, t].float()  # [Hq, n, D]
            kf = key[b].float()  # [Hkv, T, D]
            logits = torch.einsum("hgnd,htd->hgnt", q.view(Hkv, g, -1, D), kf).reshape(Hq, -1, T) * scale
            j = torch.arange(T, device=query.device)
            logits = logits.masked_fill(j[None, None, :] > t[None, :, None], float("-inf"))
            p = torch.softmax(logits, -1)
            a, lo, hi, valid = _stripe_candidates(t, cfg, T)
            cs = torch.cat([torch.zeros_like(p[..., :1]), p.cumsum(-1)], -1)  # [Hq, n, T+1]
            mass = torch.gather(cs, -1, (hi + 1)[None].expand(Hq, -1, -1)) - \
                torch.gather(cs, -1, lo[None].expand(Hq, -1, -1))
            if cfg.kind.stripe_key == "anchor":
                keys = kf[:, a]  # [Hkv, n, S, D]
            else:
                pk = torch.cat([torch.zeros_like(kf[:, :1]), kf.cumsum(1)], 1)  # [Hkv, T+1, D]
                cnt = (hi - lo + 1).clamp(min=1).to(kf.dtype)
                keys = (pk[:, hi + 1] - pk[:, lo]) / cnt[None, ..., None]
            s = {"t": t.cpu(), "q": q.cpu(), "keys": keys.cpu(), "mass": mass.cpu(),
                 "valid": valid.cpu()}
            self.samples.setdefault(module.layer_idx, []).append(s)


# --------------------------------------------------------------------------------------------
# Step 2: distil
# --------------------------------------------------------------------------------------------

def _scores(s: dict, qs: Tensor, g: int) -> tuple:
    """The spans of sample s: (logits [Hq, n, S] from search queries qs [Hq, n, D], target mass
    [Hq, n, S], valid [Hq, n, S])."""
    Hq, n, D = qs.shape
    keys = s["keys"].to(qs.device)  # [Hkv, n, S, D]
    sc = torch.einsum("hgnd,hnsd->hgns", qs.view(Hq // g, g, n, D), keys).reshape(Hq, n, -1)
    return sc, s["mass"].to(qs.device), s["valid"].to(qs.device)[None].expand_as(sc)


def _loss(samples: List[dict], R: Tensor, logtau: Tensor, g: int) -> Tensor:
    total, count = 0.0, 0
    for s in samples:
        q = s["q"].to(R.device)
        qs = torch.einsum("hnd,hde->hne", q, R) * logtau.exp()[:, None, None]
        sc, tm, v = _scores(s, qs, g)
        tm = tm.masked_fill(~v, 0.0)
        z = tm.sum(-1, keepdim=True)
        rows = (z[..., 0] > 1e-6) & (v.sum(-1) >= 2)  # queries with a choice to make
        if not bool(rows.any()):
            continue
        pt = tm / z.clamp(min=1e-12)
        logp = torch.log_softmax(sc.masked_fill(~v, float("-inf")), -1)
        kl = (pt * (torch.log(pt.clamp(min=1e-12)) - logp.masked_fill(~v, 0.0))).sum(-1)
        total = total + kl[rows].sum()
        count += int(rows.sum())
    return total / max(1, count) if count else torch.zeros((), device=R.device)


def _topk_mass(samples: List[dict], R: Tensor, cfg: SuperlinearConfig, g: int) -> float:
    """What the search keeps: the dense mass share of the top-k spans by score, averaged over
    queries and heads. The selection criterion."""
    tot, n = 0.0, 0
    with torch.no_grad():
        for s in samples:
            qs = torch.einsum("hnd,hde->hne", s["q"].to(R.device), R)
            sc, tm, v = _scores(s, qs, g)
            tm = tm.masked_fill(~v, 0.0)
            share = tm / tm.sum(-1, keepdim=True).clamp(min=1e-12)
            k = min(cfg.topk, sc.shape[-1])
            top = sc.masked_fill(~v, float("-inf")).topk(k, -1).indices
            tot += float(torch.gather(share, -1, top).sum(-1).sum())
            n += share.shape[0] * share.shape[1]
    return tot / max(1, n)


def _fit_layer(train: List[dict], held: List[dict], Hq: int, D: int, g: int, cfg, steps: int,
               deadline: float, device, lr: float) -> dict:
    """Distil one layer. Returns the router (the learned one if it keeps more of the held-back
    queries' dense mass in the top-k regions than the identity, else the identity) and stats."""
    eye = torch.eye(D, device=device).repeat(Hq, 1, 1)
    R = eye.clone().requires_grad_(True)
    logtau = torch.full((Hq,), -0.5 * math.log(D), device=device, requires_grad=True)
    opt = torch.optim.Adam([R, logtau], lr=lr)
    with torch.no_grad():
        kl0 = float(_loss(held, R, logtau, g))
    done = 0
    for step in range(steps):
        if time.monotonic() > deadline and step > 0:
            break
        opt.zero_grad()
        loss = _loss(train, R, logtau, g)
        loss.backward()
        opt.step()
        done += 1
    with torch.no_grad():
        kl1 = float(_loss(held, R, logtau, g))
        # fold the temperature in (ranking is unchanged by it; a gated combine sees calibrated logits)
        learned = (R * logtau.exp()[:, None, None]).detach()
    m0, m1 = _topk_mass(held, eye, cfg, g), _topk_mass(held, learned, cfg, g)
    keep = m1 > m0
    return {"router": (learned if keep else eye).float().cpu(), "kl_before": kl0, "kl_after": kl1,
            "topk_mass_identity": m0, "topk_mass_learned": m1, "learned_kept": keep, "steps": done}


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------

def _token_ids(texts_or_token_ids, tokenizer, max_length: Optional[int]) -> List[Tensor]:
    if isinstance(texts_or_token_ids, (str, Tensor)):
        texts_or_token_ids = [texts_or_token_ids]
    items = list(texts_or_token_ids)
    if not items:
        raise ValueError("calibrate: no texts or token ids given")
    out = []
    for i, x in enumerate(items):
        if isinstance(x, str):
            if tokenizer is None:
                raise TypeError("calibrate: texts need a tokenizer (tokenizer=...); or pass token ids")
            ids = torch.tensor(tokenizer.encode(x, add_special_tokens=False), dtype=torch.long)
        elif isinstance(x, Tensor):
            if x.dim() == 2 and x.shape[0] == 1:
                x = x[0]
            if x.dim() != 1 or x.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"calibrate: token ids #{i} must be a 1-D integer tensor, got "
                                f"{x.dtype} {tuple(x.shape)}")
            ids = x.long()
        elif isinstance(x, (list, tuple)) and all(isinstance(v, int) for v in x):
            ids = torch.tensor(x, dtype=torch.long)
        else:
            raise TypeError(f"calibrate: item #{i} is {type(x).__name__}; expected str, a list of "
                            "ints or a 1-D integer tensor")
        if max_length is not None:
            ids = ids[:max_length]
        out.append(ids)
    return out


def _printer(progress) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda msg: print(f"calibrate: {msg}", file=sys.stderr, flush=True)
    return lambda msg: None


def calibrate(model, texts_or_token_ids, *, config: Optional[SuperlinearConfig] = None,
              minutes: float = 10.0, steps: int = 200, progress: Union[bool, Callable] = True,
              tokenizer=None, max_length: Optional[int] = None, queries: int = 256,
              lr: float = 0.01, seed: int = 0) -> Routers:
    """Learn each attention layer's search projection from the model's own dense attention.

    Args:
        model: a transformers causal LM (Llama-family attention modules); left frozen and unchanged.
        texts_or_token_ids: ordinary text (str, needs ``tokenizer``) or token ids (lists of ints,
            1-D tensors), one sequence each. Longer sequences teach longer-range routing; use the
            lengths you will run at. No labels are used.
        config: the `SuperlinearConfig` the routers are for, a stripe search of docs/spec.md
            (default ``SuperlinearConfig(search_key=DEFAULT_SEARCH_KEY)``, "mean"): its
            ``search_key``, window and span geometry define the candidate spans.
        minutes: time budget for the whole call (capture and distillation); each layer gets an
            equal share of what is left after the capture, and layers reached after the budget is
            spent keep the identity (``info["layers_trained"]`` says how many were trained).
        steps: at most this many optimiser steps per layer (full batch).
        progress: True prints progress lines on stderr; a callable receives the lines instead.
        tokenizer: turns texts into ids.
        max_length: cut each sequence to this many tokens.
        queries: sampled query positions per sequence and layer (a quarter is held back to measure
            the loss before and after).
        lr: Adam learning rate.
        seed: sampling seed.

    Returns:
        `Routers` (save with `save_routers`, attach with `attach_routers`).
    """
    if config is None:
        config = SuperlinearConfig(search_key=DEFAULT_SEARCH_KEY)
    if not isinstance(config, SuperlinearConfig):
        raise TypeError(f"calibrate: config must be a SuperlinearConfig, got {type(config).__name__}")
    if config.kind.block_sparse:
        raise ValueError("calibrate: search_key='blocksparse' selects with the attention query "
                         "itself and takes no routers; calibrate a span-search config "
                         f"(for example SuperlinearConfig(search_key={DEFAULT_SEARCH_KEY!r}))")
    for name, v, lo in (("minutes", minutes, 0.0), ("steps", steps, 1), ("queries", queries, 4)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= lo) or \
                (isinstance(v, float) and not math.isfinite(v)):
            raise ValueError(f"calibrate: {name}={v!r} must be a number >= {lo}")
    if minutes <= 0:
        raise ValueError(f"calibrate: minutes={minutes!r} must be > 0")
    say = _printer(progress)
    t0 = time.monotonic()
    deadline = t0 + 60.0 * minutes
    mods = attention_modules(model)
    seqs = _token_ids(texts_or_token_ids, tokenizer, max_length)
    need = min_tokens(config)
    seqs = [s for s in seqs if s.numel() > need]
    if not seqs:
        raise ValueError(f"calibrate: every sequence is too short: routing needs more than {need} "
                         f"tokens (window {config.window} + {BEFORE_WINDOW} keys before it + 2)")
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    cap = _Capture(config, queries, gen)
    old_impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    was_training = model.training
    model.eval()
    ntok = 0
    try:
        model.set_attn_implementation(_CAPTURE)
        for i, ids in enumerate(seqs):
            with torch.no_grad():
                model(input_ids=ids[None].to(dev), use_cache=False)
            ntok += ids.numel()
            say(f"captured dense attention of sequence {i + 1}/{len(seqs)} ({ids.numel()} tokens, "
                f"{time.monotonic() - t0:.0f}s)")
            if time.monotonic() > t0 + 0.5 * 60.0 * minutes and i + 1 < len(seqs):
                say(f"capture used half the budget: {len(seqs) - i - 1} sequence(s) left out")
                break
    finally:
        model.set_attn_implementation(old_impl)
        model.train(was_training)
    t_cap = time.monotonic() - t0

    weights, per_layer = {}, []
    names = list(mods)
    for li, name in enumerate(names):
        m = mods[name]
        hq, d = _heads(m)
        samples = cap.samples.pop(m.layer_idx, [])
        if not samples:
            raise ValueError(f"calibrate: layer {name!r} saw no sequence (is it an attention layer of "
                             "this model's forward?)")
        g = hq // samples[0]["keys"].shape[0]
        train, held = [], []
        for s in samples:
            n = s["t"].numel()
            nh = max(1, n // 4)
            held.append(_subset(s, slice(0, n, max(1, n // nh))))
            keep = torch.ones(n, dtype=torch.bool)
            keep[0:n:max(1, n // nh)] = False
            train.append(_subset(s, keep))
        if time.monotonic() >= deadline:  # budget spent: the remaining layers keep the identity
            weights[name] = torch.eye(d).repeat(hq, 1, 1)
            per_layer.append({"module": name, "steps": 0, "learned_kept": False})
            say(f"layer {li + 1}/{len(names)} {name}: budget spent, identity")
            continue
        layer_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(names) - li)
        r = _fit_layer(train, held, hq, d, g, config, steps, layer_deadline, dev, lr)
        weights[name] = r.pop("router")
        per_layer.append({"module": name, **r})
        say(f"layer {li + 1}/{len(names)} {name}: KL {r['kl_before']:.3f} -> {r['kl_after']:.3f}, "
            f"top-{config.topk} mass {r['topk_mass_identity']:.3f} -> {r['topk_mass_learned']:.3f} "
            f"({'kept' if r['learned_kept'] else 'identity kept'}; {r['steps']} steps, "
            f"{time.monotonic() - t0:.0f}s)")

    trained = [x for x in per_layer if x["steps"] > 0]

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else float("nan")

    info = {"tokens": ntok, "sequences": len(seqs), "queries_per_sequence": queries,
            "capture_seconds": t_cap, "seconds": time.monotonic() - t0, "layers": per_layer,
            "layers_trained": len(trained),
            "kl_before_mean": mean(x["kl_before"] for x in trained),
            "kl_after_mean": mean(x["kl_after"] for x in trained),
            "topk_mass_identity_mean": mean(x["topk_mass_identity"] for x in trained),
            "topk_mass_calibrated_mean": mean(max(x["topk_mass_identity"], x["topk_mass_learned"])
                                              for x in trained),
            "layers_learned": sum(bool(x["learned_kept"]) for x in per_layer)}
    say(f"done in {info['seconds']:.0f}s: {len(trained)}/{len(per_layer)} layers trained; mean KL "
        f"{info['kl_before_mean']:.3f} -> {info['kl_after_mean']:.3f}; held-back top-{config.topk} "
        f"mass {info['topk_mass_identity_mean']:.3f} -> {info['topk_mass_calibrated_mean']:.3f}; "
        f"learned routers kept in {info['layers_learned']}/{len(per_layer)} layers")
    return Routers(config, weights, info)


def _subset(s: dict, idx) -> dict:
    """Sample s restricted to some of its queries (dimension 0 of t and valid, 1 of the per-head
    tensors q, mass and keys)."""
    return {k: v[idx] if k in ("t", "valid") else v[:, idx] for k, v in s.items()}


class _CallableModule(types.ModuleType):
    """``slcompile.calibrate`` is this module and also the function: ``slcompile.calibrate(model,
    texts, ...)`` calls `calibrate`, while ``import slcompile.calibrate as C`` and
    ``from slcompile.calibrate import save_routers`` keep working."""

    def __call__(self, *args, **kwargs):
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
