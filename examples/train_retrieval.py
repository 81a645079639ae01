#!/usr/bin/env python3
"""Routing is learnable: train a small causal LM with gated superlinear attention on key-value
retrieval whose answers lie farther back than the attention window.

Task (multi-query associative recall): a sequence of random filler tokens holds ``--pairs``
(key, value) pairs at random places; its last 2 * ``--queries`` tokens ask for some of the keys
again ("key value"), and the model must predict each value from its key. Every asked pair lies more
than ``window`` tokens back, so a query can only answer if the span search routes it there: the
local window and the sinks never hold the answer. Chance is 1 / ``--values``.

Model: ``--layers`` pre-norm blocks; attention is ``slcompile.superlinear_attention`` with
``combine="gated"`` (the paper's trainable form: per-span softmaxes mixed by a softmax over the
spans' search scores), ``search_key="mean"`` (a span is scored by the mean of its keys, so a key
anywhere in the span can attract the search), GQA, and a *learned search projection*
(``search_query = W_s x``, its own weights). Rotary embeddings turn a quarter of each head's
dims (``--rotary-frac``); the rest stays position-free, which is what the mean key of a span can
match (rotated dims average out over a span). The search projection learns only through the gate
(see kernels/autograd.py).

Training: AdamW, linear warmup, then cosine decay over the wall-clock budget ``--max-seconds``;
every ``--eval-every`` steps an evaluation on fresh held-out batches; the run stops once accuracy
reaches ``--target``, then a 4x larger fresh held-out set gives the final accuracy. Each
evaluation also measures *routing recall*: the fraction of answer queries for which some head of
the last layer keeps a span that holds the answer's value token (at step 0 this is what random
routing gets), and the accuracy with and without such a span, which separates learning where to
look from learning to read what was found.

    python examples/train_retrieval.py                         # GPU: until 90% or --max-seconds
    python examples/train_retrieval.py --device cpu --steps 3 --seq-len 96 --batch 2   # smoke test

Writes ``--out``/train_retrieval.json (the curve and the settings) and train_retrieval.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from slcompile.functional import superlinear_attention
from slcompile.kernels.config import SuperlinearConfig
from slcompile.kernels.geometry import span_extents


def make_batch(gen, batch, seq_len, n_pairs, n_queries, n_keys, n_values, n_filler, window,
               device):
    """tokens [B, L] and, for each asked key, its position in the query tail, its value and the
    position of that value in the context (where attention has to read it).

    Vocabulary: filler [0, n_filler), keys [n_filler, +n_keys), values after them."""
    L = seq_len
    q_start = L - 2 * n_queries
    ctx_end = q_start - window - 2  # every pair lies more than `window` before any query
    if ctx_end < 2 * n_pairs:
        raise ValueError(f"seq_len {L} is too short for {n_pairs} pairs, {n_queries} queries and "
                         f"window {window}")
    tok = torch.randint(0, n_filler, (batch, L), generator=gen)
    slots = ctx_end // 2
    pos = torch.stack([torch.randperm(slots, generator=gen)[:n_pairs] for _ in range(batch)]) * 2
    keys = torch.stack([torch.randperm(n_keys, generator=gen)[:n_pairs] for _ in range(batch)])
    vals = torch.randint(0, n_values, (batch, n_pairs), generator=gen)
    bi = torch.arange(batch)[:, None]
    tok[bi, pos] = n_filler + keys
    tok[bi, pos + 1] = n_filler + n_keys + vals
    ask = torch.stack([torch.randperm(n_pairs, generator=gen)[:n_queries] for _ in range(batch)])
    qpos = q_start + 2 * torch.arange(n_queries)[None, :].expand(batch, -1)
    tok[bi, qpos] = n_filler + torch.gather(keys, 1, ask)
    tok[bi, qpos + 1] = n_filler + n_keys + torch.gather(vals, 1, ask)
    vpos = torch.gather(pos, 1, ask) + 1
    # the model answers at the key's position (next token = value)
    return (tok.to(device), qpos.to(device), torch.gather(vals, 1, ask).to(device),
            vpos.to(device))


def rotary(x, dims, base=10000.0):
    """Rotary position embedding on the first ``dims`` (even) dims of each head; the rest stays
    as is."""
    B, H, L, D = x.shape
    r = dims
    half = r // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:r], x[..., r:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], -1)


class Attention(nn.Module):
    def __init__(self, d, hq, hkv, config, rotary_dims):
        super().__init__()
        self.hq, self.hkv, self.hd = hq, hkv, d // hq
        self.rotary_dims = rotary_dims
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, hkv * self.hd, bias=False)
        self.v = nn.Linear(d, hkv * self.hd, bias=False)
        self.s = nn.Linear(d, d, bias=False)  # the learned search projection
        self.o = nn.Linear(d, d, bias=False)
        self.config = config
        self.record = None  # a list: forward appends the search's anchors (diagnostics)

    def forward(self, x):
        B, L, _ = x.shape
        q = rotary(self.q(x).view(B, L, self.hq, self.hd).transpose(1, 2), self.rotary_dims)
        k = rotary(self.k(x).view(B, L, self.hkv, self.hd).transpose(1, 2), self.rotary_dims)
        v = self.v(x).view(B, L, self.hkv, self.hd).transpose(1, 2)
        qs = self.s(x).view(B, L, self.hq, self.hd).transpose(1, 2)
        if self.record is not None:  # the same search superlinear_attention runs, for its anchors
            c = self.config
            with torch.no_grad():
                anchors, _ = torch.ops.superlinear.span_search(
                    qs, k, None, None, c.window, c.topk, c.search_power, c.span_power,
                    c.backward_factor, c.forward_factor, c.search_key, c.dense_below)
            self.record.append(anchors)
        y = superlinear_attention(q, k, v, config=self.config, enable_gqa=True, search_query=qs)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, d, hq, hkv, config, rotary_dims):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, hq, hkv, config, rotary_dims)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class RetrievalLM(nn.Module):
    def __init__(self, vocab, d, layers, hq, hkv, config, rotary_frac=0.5):
        super().__init__()
        rotary_dims = 2 * round(d // hq * rotary_frac / 2)
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, hq, hkv, config, rotary_dims) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tok):
        x = self.emb(tok)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def routing_hits(anchors, qpos, vpos, config, seq_len):
    """bool [B, Hq, Q]: does a span that head h keeps for answer query q hold its value position?

    anchors [B, Hq, L, topk] (-1 empty) from the search; a kept anchor a of the query at t owns
    [max(0, a - back[t]), min(a + fwd[t], t - window)] (docs/spec.md)."""
    back, fwd = span_extents(seq_len, config.attention_span_power, config.backward_factor,
                             config.forward_factor, anchors.device)
    H, k = anchors.shape[1], anchors.shape[3]
    a = torch.gather(anchors.long(), 2, qpos[:, None, :, None].expand(-1, H, -1, k))
    t = qpos[:, None, :, None]
    lo = (a - back[t]).clamp(min=0)
    hi = torch.minimum(a + fwd[t], t - config.window)
    v = vpos[:, None, :, None]
    return ((a >= 0) & (lo <= v) & (v <= hi)).any(-1)


def answer_logits(model, tok, qpos, n_filler, n_keys, n_values):
    logits = model(tok)
    at = torch.gather(logits, 1, qpos[..., None].expand(-1, -1, logits.shape[-1]))
    lo = n_filler + n_keys
    return at[..., lo:lo + n_values].float()  # [B, Q, n_values]


def lr_factor(step, elapsed, warmup, budget, min_frac):
    """Linear warmup over ``warmup`` steps, then cosine decay over the wall-clock budget down to
    ``min_frac`` of the peak (the run is shaped for its time budget, not a step count)."""
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    frac = min(1.0, elapsed / budget)
    return ramp * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--keys", type=int, default=32)
    ap.add_argument("--values", type=int, default=32)
    ap.add_argument("--filler", type=int, default=64)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--sinks", type=int, default=0)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--rotary-frac", type=float, default=0.25,
                    help="fraction of each head's dims that rotary embeddings turn (the rest is "
                         "position-free: what a span's mean key can match)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--search-lr-mult", type=float, default=1.0,
                    help="learning rate of the search projections, in units of --lr")
    ap.add_argument("--warmup", type=int, default=100, help="warmup steps")
    ap.add_argument("--min-lr-frac", type=float, default=0.05,
                    help="the cosine decay ends at this fraction of --lr at --max-seconds")
    ap.add_argument("--steps", type=int, default=1000000)
    ap.add_argument("--max-seconds", type=float, default=540.0,
                    help="wall-clock budget of the run (training plus evaluations)")
    ap.add_argument("--target", type=float, default=0.9, help="stop once eval accuracy >= this")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=4,
                    help="fresh held-out batches per evaluation (the final one uses 4x as many)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    config = SuperlinearConfig(window=args.window, sinks=args.sinks, topk=args.topk,
                               combine="gated", search_key="mean", dense_below=0)
    vocab = args.filler + args.keys + args.values
    model = RetrievalLM(vocab, args.d_model, args.layers, args.heads, args.kv_heads, config,
                        args.rotary_frac).to(dev)
    search = [p for n, p in model.named_parameters() if ".attn.s." in n]
    rest = [p for n, p in model.named_parameters() if ".attn.s." not in n]
    peak = [args.lr, args.lr * args.search_lr_mult]
    opt = torch.optim.AdamW([{"params": rest, "lr": peak[0]}, {"params": search, "lr": peak[1]}],
                            weight_decay=0.01)
    amp = (dev.type == "cuda" and args.dtype == "bf16")
    gen = torch.Generator().manual_seed(args.seed)
    # held-out data: its own generator, fresh batches at every evaluation, never trained on
    egen = torch.Generator().manual_seed(args.seed + 1_000_003)
    batch_args = (args.seq_len, args.pairs, args.queries, args.keys, args.values, args.filler,
                  args.window, dev)
    last_attn = model.blocks[-1].attn

    def evaluate(n_batches):
        """Accuracy, routing recall of the last layer (a head keeps a span holding the answer's
        value: any head / the mean over heads) and the accuracy with and without such a span."""
        model.eval()
        correct, hit = [], []
        last_attn.record = []
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            for _ in range(n_batches):
                tok, qpos, ans, vpos = make_batch(egen, args.batch, *batch_args)
                logits = answer_logits(model, tok, qpos, args.filler, args.keys, args.values)
                correct.append((logits.argmax(-1) == ans).flatten())
                hit.append(routing_hits(last_attn.record.pop(), qpos, vpos, config, args.seq_len)
                           .transpose(0, 1).flatten(1))  # [Hq, B*Q]
        last_attn.record = None
        model.train()
        correct, hit = torch.cat(correct).float(), torch.cat(hit, 1)
        anyh = hit.any(0)
        def mean_or_none(x):
            return round(float(x.mean()), 4) if x.numel() else None
        return {"accuracy": float(correct.mean()), "recall_any_head": float(anyh.float().mean()),
                "recall_per_head": round(float(hit.float().mean()), 4),
                "accuracy_given_hit": mean_or_none(correct[anyh]),
                "accuracy_given_miss": mean_or_none(correct[~anyh]), "queries": correct.numel()}

    def log(step, seconds, loss, ev):
        curve.append({"step": step, "seconds": round(seconds, 2), "loss": round(loss, 4),
                      "lr": round(opt.param_groups[0]["lr"], 6), **ev})
        print(f"step {step}: loss {loss:.3f}, eval accuracy {ev['accuracy']:.3f}, routing recall "
              f"{ev['recall_any_head']:.3f} (per head {ev['recall_per_head']:.3f}), accuracy "
              f"given a hit {ev['accuracy_given_hit']}, {seconds:.0f} s", flush=True)

    curve = []
    t0 = time.time()
    log(0, 0.0, math.log(args.values), evaluate(args.eval_batches))
    print(f"chance {1 / args.values:.3f}", flush=True)
    step, reached_at = 0, None
    while step < args.steps:
        elapsed = time.time() - t0
        if elapsed > args.max_seconds:
            break
        for g, p in zip(opt.param_groups, peak):
            g["lr"] = p * lr_factor(step, elapsed, args.warmup, args.max_seconds, args.min_lr_frac)
        tok, qpos, ans, _ = make_batch(gen, args.batch, *batch_args)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = answer_logits(model, tok, qpos, args.filler, args.keys, args.values)
        loss = F.cross_entropy(logits.reshape(-1, args.values), ans.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            ev = evaluate(args.eval_batches)
            log(step, time.time() - t0, loss.item(), ev)
            if ev["accuracy"] >= args.target:
                reached_at = curve[-1]["seconds"]
                break
    train_seconds = time.time() - t0
    final = evaluate(4 * args.eval_batches)  # a larger fresh held-out set, after training
    print(f"final: {final}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    result = {"settings": vars(args), "config": config.to_dict(), "chance": 1 / args.values,
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "steps": step, "seconds": round(train_seconds, 2),
              "seconds_to_target": reached_at, "final": final,
              "final_accuracy": final["accuracy"],
              "reached_target": reached_at is not None and final["accuracy"] >= args.target,
              "curve": curve}
    with open(os.path.join(args.out, "train_retrieval.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        secs = [c["seconds"] for c in curve]
        ax.plot(secs, [c["accuracy"] for c in curve], marker=".", label="eval retrieval accuracy")
        ax.plot(secs, [c["recall_any_head"] for c in curve], lw=1,
                label="routing recall (any head, last layer)")
        ax.axhline(1 / args.values, color="gray", ls=":", label="chance")
        ax.axhline(args.target, color="green", ls="--", label=f"target {args.target:.0%}")
        ax.set_xlabel("seconds (training and evaluations)")
        ax.set_ylabel("fraction of held-out queries")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"gated superlinear attention, L={args.seq_len}, window {args.window}, "
                     f"top-{args.topk}")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "train_retrieval.png"), dpi=120)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    return result


if __name__ == "__main__":
    main()
