#!/usr/bin/env python3
"""Benchmark: forward + backward of superlinear attention against SDPA (training step cost).

One run times, at L = 32K .. 256K (B=1, Hq=32, Hkv=8, d=128, bf16, default config with
dense_below=0), ``out = slcompile.superlinear_attention(q, k, v)`` followed by
the gradients of q, k, v for ``dout`` (``torch.autograd.grad``: nothing accumulates into
``.grad``) for ``combine="union"`` and ``"gated"`` (gated: the gradient also flows through the
gate's scores into q and k, the search query being q), against
``F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)`` (flash) forward +
backward, timed the same way. Also the forward alone, so that the backward's share is visible.
Median of CUDA-event timings; writes ``train.json`` and ``train.md`` to ``--out``.

FLOP model (for the achieved-throughput column): dense causal attention does 4*d*L^2/2 FLOPs per
head forward and 2.5x that backward (recompute q.k, dO.v, dS.k, dS^T.q, P^T.dO); superlinear
attention attends |A_t| = min(t+1, S + W + k*(bf+ff)*(t+1)^r) keys per query (the spec's cost model),
so 4*d*|A_t| forward and 10*d*|A_t| backward, plus (union) the q.k-only statistics pass
(2*d*|A_t|).

    python benchmarks/train.py [--lengths 32768,65536,131072,262144] [--out DIR] [--check]

``--check`` first runs the GPU gradient sweep: the Triton backward against the reference
gradients (max error relative to the largest reference gradient, per output) on small shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import cuda_time  # noqa: E402  (median of CUDA-event timings)
from gpu_check import boot  # noqa: E402

CFG = dict(window=64, sinks=4, topk=3, search_power=0.5, span_power=0.5, backward_factor=2.0,
           forward_factor=0.0, search_key="anchor")


def keys_attended(L, S, W, k, bf, ff, r):
    t = torch.arange(L, dtype=torch.float64)
    return torch.minimum(t + 1, S + W + k * (bf + ff) * (t + 1) ** r).sum().item()


def gradient_sweep():
    """The ops' gradients on the GPU (Triton forward and backward, through autograd as in
    training: the union backward takes delta from the saved output) against the reference
    gradients (``autograd.gathered_attention``, fp32 on the same GPU). Returns rows."""
    from slcompile.kernels import autograd as AG, reference as R

    rows = []
    cases = [  # B, Hq, Hkv, L, D, dtype, combine, pad, pos, dense_below
        (1, 8, 2, 2048, 128, torch.bfloat16, "union", False, False, 0),
        (1, 8, 2, 2048, 128, torch.bfloat16, "gated", False, False, 0),
        (2, 8, 8, 1500, 64, torch.bfloat16, "gated", True, True, 0),
        (2, 4, 1, 1024, 128, torch.float16, "union", True, True, 0),
        (1, 4, 2, 1024, 64, torch.float32, "gated", False, True, 0),
        (1, 8, 2, 1024, 128, torch.bfloat16, "union", False, False, 4096),
    ]
    for B, Hq, Hkv, L, D, dt, combine, pad, pos, db in cases:
        g = torch.Generator(device="cuda").manual_seed(L + Hq)
        q, qs = (torch.randn(B, Hq, L, D, device="cuda", generator=g).to(dt) for _ in range(2))
        k, v = (torch.randn(B, Hkv, L, D, device="cuda", generator=g).to(dt) for _ in range(2))
        do = torch.randn(B, Hq, L, D, device="cuda", generator=g).to(dt)
        kpm = (torch.rand(B, L, device="cuda", generator=g) > 0.2) if pad else None
        qp = torch.sort(torch.randint(0, 4 * L, (B, L), device="cuda", generator=g) % L, 1).values if pos else None
        a, s = R.span_search(qs, k, kpm, qp, 64, 3, 0.5, 0.5, 2.0, 0.0, "anchor", db)
        params = (kpm, qp, 64, 4, 0.5, 2.0, 0.0, combine, D ** -0.5, db)
        row = {"case": f"B={B} Hq={Hq} Hkv={Hkv} L={L} D={D} {str(dt)[6:]} {combine} pad={pad} "
                       f"pos={pos} dense_below={db}"}
        ins = [x.clone().requires_grad_() for x in (q, k, v)]
        if combine == "gated":
            ins.append(s.clone().requires_grad_())
        torch.cuda.synchronize()
        t0 = time.time()
        try:
            out = torch.ops.superlinear.span_attention(*ins[:3], a, ins[3] if combine == "gated"
                                                       else s, *params)
            got = torch.autograd.grad(out, ins, do)
        except Exception as e:  # noqa: BLE001  (report, keep going)
            row.update(error=repr(e)[:300], ok=False)
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        torch.cuda.synchronize()
        row["triton_s"] = round(time.time() - t0, 3)
        ref = AG.gathered_attention(q, k, v, a, s, *params, grad_out=do)[1:]
        ok = True
        tol = 1e-4 if dt == torch.float32 else 2.5e-2
        for name, x, y in zip(("dq", "dk", "dv", "dscores"), got, ref):
            if not torch.isfinite(x).all():
                row[name] = "non-finite"
                ok = False
                continue
            den = max(float(y.abs().max()), 1e-6)
            err = float((x.float() - y.float()).abs().max()) / den
            row[name] = f"{err:.2e}"
            ok &= err <= tol
        row["ok"] = bool(ok)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _qkv(L, Hq, Hkv, D):
    torch.manual_seed(0)
    q = torch.randn(1, Hq, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return q, k, v, torch.randn_like(q)


def _fwd_bwd(q, k, v, do, combine="union"):
    c = CFG
    a, s = torch.ops.superlinear.span_search(
        q, k, None, None, c["window"], c["topk"], c["search_power"], c["span_power"],
        c["backward_factor"], c["forward_factor"], c["search_key"], 0)
    o = torch.ops.superlinear.span_attention(
        q, k, v, a, s, None, None, c["window"], c["sinks"], c["span_power"],
        c["backward_factor"], c["forward_factor"], combine, q.shape[-1] ** -0.5, 0)
    torch.autograd.grad(o, (q, k, v), do)


def _fwd_bwd_tuned(TB, q, k, v, do, tuning):
    """union forward, then the Triton backward called directly with these launch overrides."""
    c = CFG
    with torch.no_grad():
        a, s = torch.ops.superlinear.span_search(
            q, k, None, None, c["window"], c["topk"], c["search_power"], c["span_power"],
            c["backward_factor"], c["forward_factor"], c["search_key"], 0)
        args = (None, None, c["window"], c["sinks"], c["span_power"], c["backward_factor"],
                c["forward_factor"], "union", q.shape[-1] ** -0.5, 0)
        o = torch.ops.superlinear.span_attention(q, k, v, a, s, *args)
        TB.span_attention_backward(do, q, k, v, a, s, *args, out=o, tuning=tuning)


def tune(TB, L, Hq, Hkv, D):
    """Time union fwd+bwd at L for a few launch settings of the backward (each change alone,
    then the best changes together) and report the fastest; the defaults (_settings) are what
    every other measurement runs, so a better setting found here is a change to make there."""
    q, k, v, do = _qkv(L, Hq, Hkv, D)
    cands = [{}, {"dq_stages": 1, "kv_stages": 1, "st_stages": 1},
             {"dq_stages": 3, "kv_stages": 3}]
    rows = []

    def run(cand):
        try:
            ms = cuda_time(lambda: _fwd_bwd_tuned(TB, q, k, v, do, cand), 1.0, 5)[0] * 1e3
        except Exception as e:  # noqa: BLE001
            ms = float("inf")
            print("tune", cand, repr(e)[:200], flush=True)
        rows.append({"settings": dict(cand), "ms": round(ms, 2)})
        print("tune", rows[-1], flush=True)

    for cand in cands:
        run(cand)
    base = rows[0]["ms"]
    best = {}
    for r in rows[1:]:
        if r["ms"] < base * 0.98:
            best.update(r["settings"])
    if best and best not in [r["settings"] for r in rows]:
        run(best)
    print("tune: fastest", min(rows, key=lambda r: r["ms"])["settings"], flush=True)
    return rows


def kernel_profile(L, Hq, Hkv, D):
    """CUDA time per kernel of one union fwd+bwd at L (after a warm-up), largest first."""
    q, k, v, do = _qkv(L, Hq, Hkv, D)
    _fwd_bwd(q, k, v, do)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _fwd_bwd(q, k, v, do)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:90], "ms": round(t / 1e3, 3), "calls": e.count})
    rows.sort(key=lambda r: -r["ms"])
    for r in rows[:20]:
        print("profile", json.dumps(r), flush=True)
    return rows[:40]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32768,65536,131072,262144")
    ap.add_argument("--out", default=".")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per case")
    ap.add_argument("--check", action="store_true", help="first the GPU gradient sweep")
    ap.add_argument("--tune-L", type=int, default=0,
                    help="first pick the backward's block sizes by timing at this length")
    ap.add_argument("--profile-L", type=int, default=0,
                    help="record the CUDA kernels of one fwd+bwd (union) at this length")
    args = ap.parse_args(argv)
    boot()
    from slcompile.kernels import ops  # noqa: F401  (registers the ops and their autograd)
    from slcompile.kernels import triton_backward as TB

    sweep = gradient_sweep() if args.check else []
    tuning = tune(TB, args.tune_L, args.heads, args.kv_heads, args.dim) if args.tune_L else []
    profile = kernel_profile(args.profile_L, args.heads, args.kv_heads, args.dim) \
        if args.profile_L else []

    Hq, Hkv, D = args.heads, args.kv_heads, args.dim
    rows = []
    for L in [int(x) for x in args.lengths.split(",")]:
        q, k, v, do = _qkv(L, Hq, Hkv, D)
        scale = 1.0 / math.sqrt(D)
        row = {"L": L}

        def sl(combine, backward=True):
            if backward:
                _fwd_bwd(q, k, v, do, combine)
            else:
                c = CFG
                a, s = torch.ops.superlinear.span_search(
                    q, k, None, None, c["window"], c["topk"], c["search_power"], c["span_power"],
                    c["backward_factor"], c["forward_factor"], c["search_key"], 0)
                torch.ops.superlinear.span_attention(
                    q, k, v, a, s, None, None, c["window"], c["sinks"], c["span_power"],
                    c["backward_factor"], c["forward_factor"], combine, scale, 0)

        def sdpa(backward=True):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            if backward:
                torch.autograd.grad(o, (q, k, v), do)

        for name, fn in (("union", lambda: sl("union")), ("gated", lambda: sl("gated")),
                         ("union_fwd", lambda: sl("union", False)), ("sdpa", sdpa),
                         ("sdpa_fwd", lambda: sdpa(False))):
            try:
                with torch.no_grad() if name.endswith("_fwd") else torch.enable_grad():
                    sec, n = cuda_time(fn, args.budget, 10 if L <= 131072 else 3)
                row[name + "_ms"] = round(sec * 1e3, 3)
                row[name + "_iters"] = n
            except Exception as e:  # noqa: BLE001  (report, keep going)
                row[name + "_error"] = repr(e)[:300]
            torch.cuda.empty_cache()
        A = keys_attended(L, CFG.get("sinks", 4), CFG["window"], CFG["topk"],
                          CFG["backward_factor"], CFG["forward_factor"], CFG["span_power"]) * Hq
        dense_flops = 4 * D * (L * (L + 1) / 2) * Hq * 3.5  # fwd + 2.5x bwd
        sl_flops = (4 + 10 + 2) * D * A  # fwd + bwd + union's statistics pass
        if "union_ms" in row and "sdpa_ms" in row:
            row["speedup_union"] = round(row["sdpa_ms"] / row["union_ms"], 2)
            row["sdpa_tflops"] = round(dense_flops / row["sdpa_ms"] / 1e9, 1)
            row["union_tflops"] = round(sl_flops / row["union_ms"] / 1e9, 1)
        if "gated_ms" in row and "sdpa_ms" in row:
            row["speedup_gated"] = round(row["sdpa_ms"] / row["gated_ms"], 2)
        row["keys_per_query"] = round(A / Hq / L, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del q, k, v, do
        torch.cuda.empty_cache()

    os.makedirs(args.out, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "shape": f"B=1 Hq={Hq} Hkv={Hkv} d={D} bf16", "config": CFG, "rows": rows,
            "gradient_sweep": sweep,
            "tuning": tuning, "profile": profile}
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump(meta, f, indent=1)
    cols = ["L", "union_ms", "gated_ms", "union_fwd_ms", "sdpa_ms", "sdpa_fwd_ms", "speedup_union",
            "speedup_gated", "union_tflops", "sdpa_tflops", "keys_per_query"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    with open(os.path.join(args.out, "train.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
