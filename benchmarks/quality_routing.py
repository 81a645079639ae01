"""Routing probe of the quality harness (``benchmarks/quality.py --routing``): which keys each
variant would attend, on the model's own queries and keys from dense prefills of the needle prompts
(no generation), scored by the dense attention mass and the needle tokens the attended set keeps.
"""

from __future__ import annotations

import math

import torch

from slcompile.calibrate import BUFFER, search_query

from quality_rules import FLAT, MASKED, ROUTED, attended_mask, flat_mask, flat_spec, variant_config


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
