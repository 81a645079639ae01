"""What each variant of the quality harness (``benchmarks/quality.py``) attends, and the attention
functions that run it inside the model.

* Variant names: named configs (``VARIANTS``), inline ``key=value,...`` SuperlinearConfig fields, a
  trailing ``+r`` (searched with calibrated routers), ``flat:...`` selection rules and
  ``mask:<config>`` (``variant_config``, ``flat_spec``, ``is_masked``).
* Selection rules evaluated on dense logits (``flat_mask``, ``flat_scores``, ``attended_mask``):
  which keys a search would keep, computed by masking dense attention (O(L^2), for evaluation).
* Attention functions registered with transformers: ``superlinear_masked`` (``MaskedAttention``:
  dense attention restricted to a rule's set) and ``superlinear_probe`` (``KeyCounter``: the
  superlinear kernels, counting the exact fraction of keys attended); ``use_variant`` switches a
  model between them and dense sdpa.

Tested by tests/kernels/test_quality_eval.py against the kernels.
"""

from __future__ import annotations

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


@torch.no_grad()
def attended_mask(cfg: SuperlinearConfig, qs, k, qpos):
    """bool [B, Hq, nQ, T]: the keys docs/spec.md's union attends for the queries at qpos [B, nQ]
    (the search of cfg.steps: the stripe search for 2, docs/nstep.md's for N >= 3)."""
    if cfg.kind.block_sparse:  # its choice needs the whole query block, not the probed queries
        raise SystemExit(f"the routing probe takes stripe searches and flat:/mask: rules, not "
                         f"search_key={cfg.search_key!r} (measure it by needles and perplexity)")
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


# --------------------------------------------------------------------------------------------
# Exact fraction of keys attended (a probe attention function)
# --------------------------------------------------------------------------------------------

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
