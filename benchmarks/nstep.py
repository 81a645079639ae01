"""N = 2 (docs/spec.md) against N = 3 (docs/nstep.md): keys attended per query and prefill time.

    python benchmarks/nstep.py --keys-only                  # CPU: exact key budgets, no timing
    python benchmarks/nstep.py --out nstep.json             # GPU: budgets, measured keys, times

Per length L (a prefill: queries 0..L-1 over L keys) and N:

* budget: the most keys a query may attend, exact from the integer geometry tables (CPU):
  min(t+1, S + W + topk * span) with span = back + fwd + 1 (N = 2: the the spec span of
  ceil(bf (t+1)^(1/2)) keys back; N = 3: the cell size of docs/nstep.md); the mean over t, and the
  total over the prefill, whose fitted exponent is the cost exponent;
* scored: candidates scored per query (N = 2: the stripes past the window; N = 3: an upper bound,
  the top-level regions plus topk x fan-out children);
* attended (GPU): the exact mean number of distinct keys attended per (head, query), union mode,
  counted from the anchors the search returned on random inputs;
* time (GPU): search and attention of a whole prefill (CUDA events), queries in chunks of
  --chunk with explicit positions (the KV cache of all L keys is present), so 4M fits in memory.

Shape: B=1, Hq=32, Hkv=8, d=128, bf16, default config (W=64, S=4, topk=3, bf=2, ff=0, union,
anchor key), dense_below=0. A correctness check of the Triton N = 3 search against the reference
runs first on the GPU (anchor agreement, attention error).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import boot  # noqa: E402  (slcompile.kernels from this checkout, installed or not)

boot()  # registers the ops
from slcompile.kernels import nstep as NS  # noqa: E402
from slcompile.kernels import reference as R  # noqa: E402
from slcompile.kernels.config import SuperlinearConfig  # noqa: E402
from slcompile.kernels.geometry import num_stripes, span_extents, stripe_deltas  # noqa: E402

LENGTHS = [262144, 524288, 1048576, 2097152, 4194304]


def config(steps: int) -> SuperlinearConfig:
    return SuperlinearConfig(steps=steps, dense_below=0)


def budgets(L: int, steps: int):
    """Exact per-query budget (keys) and scored-candidate count, int64 [L] each, CPU."""
    c = config(steps)
    t = torch.arange(L, dtype=torch.int64)
    W, S, k = min(c.window, L), c.sinks, c.topk
    if steps == 2:
        back, fwd = span_extents(L, c.span_power, c.backward_factor, c.forward_factor)
        span = back + fwd + 1
        d = stripe_deltas(num_stripes(L, c.search_power), c.search_power)
        # stripes i with W <= delta_i <= t
        scored = (torch.searchsorted(d, t, right=True) - torch.searchsorted(d, torch.tensor(W))).clamp(min=0)
    else:
        fwd, span, n, f = NS.tables(L, c.window, steps, c.backward_factor, c.forward_factor)
        P = f ** (steps - 2)
        ntop = torch.where(n > 0, -(-n // P), 0)
        scored = ntop + (steps - 2) * torch.minimum(ntop, torch.tensor(k)) * f
    budget = torch.minimum(t + 1, S + W + k * span * (scored > 0))
    return budget, scored


def fit(xs, ys):
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def attended(anchors, pos, T, c):
    """Exact mean of distinct keys attended per (head, query) in union mode, from the anchors."""
    W, S = min(c.window, T), c.sinks
    back, fwd = span_extents(T, c.attention_span_power, c.backward_factor, c.forward_factor, anchors.device)
    t = pos[0]  # [Lq]
    a = anchors[0].long()  # [H, Lq, k]
    lo = torch.clamp(a - back[t][None, :, None], min=S)
    hi = torch.minimum(a + fwd[t][None, :, None], (t - W)[None, :, None])
    lo = torch.where(a >= 0, lo, 1 << 40)
    hi = torch.where(a >= 0, hi, -1)
    order = torch.argsort(lo, dim=-1)
    lo, hi = torch.gather(lo, -1, order), torch.gather(hi, -1, order)
    run = torch.full_like(lo[..., 0], -1)
    span_keys = torch.zeros_like(lo[..., 0])
    for j in range(lo.shape[-1]):
        start = torch.maximum(lo[..., j], run + 1)
        span_keys += (hi[..., j] - start + 1).clamp(min=0)
        run = torch.maximum(run, hi[..., j])
    fixed = torch.clamp(t + 1, max=S) + (t - torch.clamp(t - W + 1, min=S) + 1).clamp(min=0)
    return float((span_keys + fixed[None, :]).double().mean().item())


def run_ops(q, k, v, c, pos, scale):
    if c.steps == 2:
        a, s = torch.ops.superlinear.span_search(q, k, None, pos, c.window, c.topk, c.search_power,
                                                 c.span_power, c.backward_factor, c.forward_factor,
                                                 c.search_key, c.dense_below)
    else:
        a, s = torch.ops.superlinear.nstep_search(q, k, None, pos, c.window, c.topk, c.steps,
                                                  c.backward_factor, c.forward_factor, c.search_key,
                                                  c.dense_below)
    return a, s


def prefill(q, k, v, c, chunk, count_keys):
    """(search ms, attention ms, attended keys mean) of a chunked prefill."""
    L = k.shape[2]
    scale = q.shape[-1] ** -0.5
    ts = ta = 0.0
    keys = 0.0
    for c0 in range(0, L, chunk):
        qc = q[:, :, c0:c0 + chunk]
        pos = torch.arange(c0, c0 + qc.shape[2], device=q.device)[None]
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        a, s = run_ops(qc, k, v, c, pos, scale)
        e1.record()
        out = torch.ops.superlinear.span_attention(qc, k, v, a, s, None, pos, c.window, c.sinks,
                                                   c.attention_span_power, c.backward_factor,
                                                   c.forward_factor, c.combine, scale, c.dense_below)
        e2.record()
        torch.cuda.synchronize()
        ts += e0.elapsed_time(e1)
        ta += e1.elapsed_time(e2)
        if count_keys:
            keys += attended(a, pos, L, c) * qc.shape[2]
        del a, s, out
    return ts, ta, keys / L if count_keys else None


def gpu_check(out):
    """Triton N = 3 search and attention against the reference on the GPU (bf16, 8K)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    L = 8192
    q = torch.randn(1, 32, L, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, 8, L, 128, device="cuda", generator=g).bfloat16()
    v = torch.randn(1, 8, L, 128, device="cuda", generator=g).bfloat16()
    res = {}
    for sk in ("anchor", "mean"):
        c = config(3).replace(search_key=sk)
        a, s = torch.ops.superlinear.nstep_search(q, k, None, None, c.window, c.topk, 3, c.backward_factor,
                                                  c.forward_factor, sk, 0)
        ra, rs = NS.nstep_search(q, k, None, None, c.window, c.topk, 3, c.backward_factor,
                                 c.forward_factor, sk, 0)
        agree = float((a == ra).all(-1).double().mean().item())
        o = torch.ops.superlinear.span_attention(q, k, v, ra, rs, None, None, c.window, c.sinks, 1 / 3,
                                                 c.backward_factor, c.forward_factor, c.combine,
                                                 128 ** -0.5, 0)
        ro = R.span_attention(q, k, v, ra, rs, None, None, c.window, c.sinks, 1 / 3, c.backward_factor,
                              c.forward_factor, c.combine, 128 ** -0.5, 0)
        rel = float(((o.float() - ro.float()).norm() / ro.float().norm()).item())
        res[sk] = {"anchor_rows_identical": agree, "attention_rel_err": rel,
                   "score_max_abs_diff_where_identical": float(
                       (s - rs).abs()[(a == ra).all(-1)].nan_to_num(0.0).max().item())}
        print(f"check {sk}: rows with identical anchors {agree:.6f}, attention rel err {rel:.2e}", flush=True)
    out["gpu_check"] = res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=LENGTHS)
    ap.add_argument("--keys-only", action="store_true", help="CPU budgets only")
    ap.add_argument("--chunk", type=int, default=524288)
    ap.add_argument("--max-seconds", type=float, default=1e9, help="start no new length after this")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3],
                    help="which N to time (budgets are computed for 2 and 3 always)")
    args = ap.parse_args(argv)
    t_start = time.time()
    out = {"lengths": args.lengths, "rows": []}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)

    for L in args.lengths:
        for steps in (2, 3):
            b, sc = budgets(L, steps)
            out["rows"].append({"L": L, "steps": steps, "budget_mean": float(b.double().mean()),
                                "budget_last": int(b[-1]), "budget_total": float(b.double().sum()),
                                "scored_mean": float(sc.double().mean()), "scored_last": int(sc[-1])})
            print(f"L={L} N={steps}: budget mean {out['rows'][-1]['budget_mean']:.1f} "
                  f"last {int(b[-1])}, scored mean {out['rows'][-1]['scored_mean']:.1f} last {int(sc[-1])}",
                  flush=True)
    save()
    if args.keys_only:
        for steps in (2, 3):
            rows = [r for r in out["rows"] if r["steps"] == steps]
            print(f"N={steps}: fitted exponent of total budget {fit([r['L'] for r in rows], [r['budget_total'] for r in rows]):.3f}")
        return out
    if not torch.cuda.is_available():
        sys.exit("timing needs a CUDA device (use --keys-only on CPU)")
    out["device"] = torch.cuda.get_device_name()
    out["torch"] = torch.__version__
    if not args.no_check:
        gpu_check(out)
        save()
    g = torch.Generator(device="cuda").manual_seed(1)
    # warm-up (compiles every kernel) at a small length
    qw = torch.randn(1, 32, 32768, 128, device="cuda", generator=g).bfloat16()
    kw = torch.randn(1, 8, 32768, 128, device="cuda", generator=g).bfloat16()
    for steps in args.steps:
        prefill(qw, kw, kw, config(steps), 16384, False)
    del qw, kw
    for L in args.lengths:
        if time.time() - t_start > args.max_seconds:
            print(f"time guard: skipping L={L}", flush=True)
            continue
        q = torch.randn(1, 32, L, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        k = torch.randn(1, 8, L, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        v = torch.randn(1, 8, L, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        for steps in args.steps:
            c = config(steps)
            reps = [prefill(q, k, v, c, args.chunk, True)]  # counts keys outside the timed part
            if L <= 1 << 20:
                reps.append(prefill(q, k, v, c, args.chunk, False))
            keys = reps[0][2]
            ts, ta = min(r[0] for r in reps), min(r[1] for r in reps)
            row = next(r for r in out["rows"] if r["L"] == L and r["steps"] == steps)
            row.update(search_ms=ts, attention_ms=ta, total_ms=ts + ta, attended_mean=keys)
            print(f"L={L} N={steps}: search {ts:.1f} ms attention {ta:.1f} ms total {ts + ta:.1f} ms, "
                  f"attended {keys:.1f} keys/query (elapsed {time.time() - t_start:.0f} s)", flush=True)
            save()
        del q, k, v
        torch.cuda.empty_cache()
    for steps in (2, 3):
        rows = [r for r in out["rows"] if r["steps"] == steps and "total_ms" in r]
        if len(rows) >= 2:
            xs = [r["L"] for r in rows]
            out[f"exponent_N{steps}"] = {m: fit(xs, [r[m] for r in rows])
                                         for m in ("total_ms", "search_ms", "attention_ms", "budget_total")}
            out[f"exponent_N{steps}"]["attended_total"] = fit(xs, [r["attended_mean"] * r["L"] for r in rows])
            print(f"N={steps} exponents: {out[f'exponent_N{steps}']}", flush=True)
    save()
    return out


if __name__ == "__main__":
    main()
