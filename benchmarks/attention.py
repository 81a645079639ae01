#!/usr/bin/env python3
"""Benchmark: superlinear attention (Triton span_search + span_attention) against dense attention.

One run prints a table at L = 4K .. 1M (B=1, Hq=32, Hkv=8, d=128, bf16, the stripe search with
dense_below=0) against ``F.scaled_dot_product_attention`` (its default dispatch; the flash backend
beside it) and FlexAttention (causal block mask, compiled): time (median of CUDA-event timings),
ratio to SDPA, achieved TFLOP/s and
GB/s against the FLOPs and bytes that the spec's cost model says superlinear attention must do, and the
fitted scaling exponent between 128K and 1M. It writes ``attention.json``, ``attention.md`` and a
log-log PNG (if matplotlib is there) to ``--out``.

Cost model (docs/spec.md, per query head, query at t): span-search scores n(t) stripes (the exact count
from ``geometry.stripe_deltas``), 2*d FLOPs each; span-attention attends
|A_t| = min(t+1, S + W + k*(bf+ff)*(t+1)^r) keys, 4*d FLOPs each (q.k and p.v). Bytes: q, k, v read
once, the output written once, anchors and scores written and read once. Dense attention: 4*d*(t+1)
FLOPs per query and head. Timings that would exceed ``--max-seconds`` for one call are not run but
estimated from the last measured length (quadratic for dense, the measured exponent otherwise) and
marked ``est``.

    python benchmarks/attention.py [--lengths 4096,16384,...] [--out DIR] [--no-flex]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import boot  # noqa: E402

CFG = dict(window=64, sinks=4, topk=3, search_power=0.5, span_power=0.5, backward_factor=2.0,
           forward_factor=0.0, combine="union", search_key="anchor")


def cuda_time(fn, budget_s=1.5, max_iters=20, warmup=True, predicted=None):
    """Median seconds of fn() by CUDA events; warm-up first unless the call is long."""
    if warmup and (predicted is None or predicted < 3.0):
        fn()
        torch.cuda.synchronize()
    times = []
    t_start = time.time()
    while True:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
        if len(times) >= max_iters or time.time() - t_start + times[-1] > budget_s:
            break
    return statistics.median(times), len(times)


def cost_model(L, Hq, D, cfg, B=1):
    """FLOPs and bytes superlinear attention must do (the spec cost model), and dense FLOPs."""
    kernels = boot()
    from slcompile.kernels.geometry import num_stripes, stripe_deltas
    t = torch.arange(L, dtype=torch.float64)
    n = num_stripes(L, cfg["search_power"])
    d = stripe_deltas(n, cfg["search_power"]).double()
    W, S, k = min(cfg["window"], L), min(cfg["sinks"], L), cfg["topk"]
    d = d[d >= W]
    n_t = torch.searchsorted(d, t, right=True).double()  # stripes with delta <= t
    A_t = torch.minimum(t + 1, S + W + k * (cfg["backward_factor"] + cfg["forward_factor"])
                        * (t + 1) ** cfg["span_power"])
    flops = B * Hq * (2 * D * n_t.sum().item() + 4 * D * A_t.sum().item())
    dense = B * Hq * 4 * D * (t + 1).sum().item()
    return flops, dense, n_t.sum().item(), A_t.sum().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,16384,65536,131072,262144,1048576")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--Hq", type=int, default=32)
    ap.add_argument("--Hkv", type=int, default=8)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--max-seconds", type=float, default=40.0,
                    help="estimate instead of running a call predicted to take longer")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--attn-kw", default="{}", help="JSON kwargs for triton span_attention")
    ap.add_argument("--search-kw", default="{}", help="JSON kwargs for triton span_search")
    ap.add_argument("--tune", default="", help="JSON list of attn kwargs to compare at --tune-L")
    ap.add_argument("--tune-search", default="", help="JSON list of search kwargs to compare")
    ap.add_argument("--tune-L", type=int, default=65536)
    ap.add_argument("--check-L", type=int, default=0,
                    help="first compare the attention (default and each --tune variant, union and "
                         "gated) at this length with the CPU reference; 0: no check")
    ap.add_argument("--flex-max-L", type=int, default=262144,
                    help="above this, FlexAttention is estimated (quadratic) instead of run")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    boot()
    from slcompile.kernels import triton_attention as TA, triton_search as TS

    B, Hq, Hkv, D = args.B, args.Hq, args.Hkv, args.D
    scale = 1 / math.sqrt(D)
    akw, skw = json.loads(args.attn_kw), json.loads(args.search_kw)
    dev = "cuda"
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)

    def search(q, k):
        return TS.span_search(q, k, None, None, CFG["window"], CFG["topk"], CFG["search_power"],
                              CFG["span_power"], CFG["backward_factor"], CFG["forward_factor"],
                              CFG["search_key"], 0, **skw)

    def attend(q, k, v, a, s, **kw):
        return TA.span_attention(q, k, v, a, s, None, None, CFG["window"], CFG["sinks"],
                                 CFG["span_power"], CFG["backward_factor"], CFG["forward_factor"],
                                 CFG["combine"], scale, 0, **{**akw, **kw})

    sdpa_gqa = True

    def sdpa(q, k, v, flash=False):
        """The baseline: SDPA with its default dispatch (what a user gets; cuDNN attention on
        H100/H200); flash=True forces its FLASH backend, which stands beside it."""
        nonlocal sdpa_gqa
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if flash else contextlib.nullcontext():
            if sdpa_gqa:
                try:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                          enable_gqa=True)
                except RuntimeError:
                    sdpa_gqa = False
            g = Hq // Hkv
            return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                                  v.repeat_interleave(g, 1), is_causal=True,
                                                  scale=scale)

    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex_c = torch.compile(flex_attention, dynamic=False)

            def causal(b, h, qi, ki):
                return qi >= ki

            masks = {}

            def flex(q, k, v):
                L = q.shape[2]
                if L not in masks:
                    masks.clear()
                    masks[L] = create_block_mask(causal, None, None, L, L, device=dev,
                                                 _compile=True)
                return flex_c(q, k, v, block_mask=masks[L], scale=scale, enable_gqa=True)
        except Exception:
            traceback.print_exc()
            flex = None

    if args.check_L:
        # the Triton attention against the reference (CPU, fp32) on small random inputs
        from slcompile.kernels import reference as R
        L, Hc = args.check_L, 4
        q = torch.randn(B, Hc, L, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, 1, L, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, 1, L, D, device=dev, dtype=torch.bfloat16)
        a, s = search(q, k)
        for comb in ("union", "gated"):
            geo = (CFG["window"], CFG["sinks"], CFG["span_power"], CFG["backward_factor"],
                   CFG["forward_factor"], comb, scale, 0)
            ref = R.span_attention(*(x.cpu().float() for x in (q, k, v)), a.cpu(), s.cpu(), None,
                                   None, *geo)
            for kw in [{}] + json.loads(args.tune or "[]"):
                o = TA.span_attention(q, k, v, a, s, None, None, *geo, **{**akw, **kw}).cpu()
                err = ((o.float() - ref).norm() / ref.norm()).item()
                print(f"check L={L} {comb} {kw}: rel. error to the reference {err:.1e}"
                      f"{'' if err < 1e-2 and not o.isnan().any() else '  FAILED'}", flush=True)

    rows = []
    tuned = {}
    if args.tune or args.tune_search:
        # compare variants at one length; the fastest that agrees with the default is used below
        L = args.tune_L
        q = torch.randn(B, Hq, L, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16)
        a, s = search(q, k)
        best = None
        for kw in json.loads(args.tune_search or "[]"):
            try:
                a2, s2 = TS.span_search(q, k, None, None, CFG["window"], CFG["topk"],
                                        CFG["search_power"], CFG["span_power"],
                                        CFG["backward_factor"], CFG["forward_factor"],
                                        CFG["search_key"], 0, **kw)
                same = (a2 == a).float().mean().item()
                t, n = cuda_time(lambda: TS.span_search(
                    q, k, None, None, CFG["window"], CFG["topk"], CFG["search_power"],
                    CFG["span_power"], CFG["backward_factor"], CFG["forward_factor"],
                    CFG["search_key"], 0, **kw))
                print(f"tune search L={L} {kw}: {t * 1e3:.2f} ms (n={n}), anchors equal to "
                      f"default {same:.5f}", flush=True)
                if same > 0.999 and (best is None or t < best[0]):
                    best = (t, kw)
            except Exception as e:
                print(f"tune search L={L} {kw}: FAILED {type(e).__name__}: {str(e)[:300]}",
                      flush=True)
        if best:
            skw = {**skw, **best[1]}
            tuned["search"] = best[1]
        try:
            ref = attend(q, k, v, a, s)
        except Exception:
            traceback.print_exc()
            akw["impl"] = "tile"
            ref = attend(q, k, v, a, s)
        best = None
        for kw in json.loads(args.tune or "[]"):
            try:
                o = attend(q, k, v, a, s, **kw)
                err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                t, n = cuda_time(lambda: attend(q, k, v, a, s, **kw))
                print(f"tune attn L={L} {kw}: {t * 1e3:.2f} ms (n={n}), diff to default "
                      f"{err:.1e}", flush=True)
                if err < 1e-2 and (best is None or t < best[0]):
                    best = (t, kw)
            except Exception as e:
                print(f"tune attn L={L} {kw}: FAILED {type(e).__name__}: {str(e)[:300]}",
                      flush=True)
        if best:
            akw = {**akw, **best[1]}
            tuned["attn"] = best[1]
        print(f"using search kwargs {skw}, attention kwargs {akw}", flush=True)
        del q, k, v, a, s, ref
        torch.cuda.empty_cache()

    def run_super(r, q, k, v):
        L = q.shape[2]
        if akw.get("impl") == "tile" and L > 262144:
            raise RuntimeError("the tile path is not run above 256K (minutes per call)")
        a, s = search(q, k)
        out = attend(q, k, v, a, s)
        torch.cuda.synchronize()
        if torch.isnan(out).any() or (a < 0).all():
            raise RuntimeError("superlinear output has NaN or no anchors")
        r["search_s"], _ = cuda_time(lambda: search(q, k))
        r["attn_s"], _ = cuda_time(lambda: attend(q, k, v, a, s))
        if akw.get("impl", "pairs") == "pairs":
            from slcompile.kernels.geometry import span_extents
            bk, fw = span_extents(L, CFG["span_power"], CFG["backward_factor"],
                                  CFG["forward_factor"], dev)

            def prep():  # what the pairs path does before its kernels: pieces, keys, sort
                lo, hi = TA.span_pieces_triton(a, None, L, CFG["window"], CFG["sinks"], bk, fw,
                                               True)
                key = TA.sort_keys(lo, hi, L, sinks=False,
                                   bucket=akw.get("lo_bucket", TA.BUCKET),
                                   snake=akw.get("snake", True))
                return torch.argsort(key.view(B * Hkv, -1), dim=-1)
            r["prep_s"], _ = cuda_time(prep)
        r["super_s"], r["super_n"] = cuda_time(lambda: attend(q, k, v, *search(q, k)))
        r["super_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        r["attn_kw"] = dict(akw)

    last = {}
    for L in [int(x) for x in args.lengths.split(",") if x]:
        torch.cuda.empty_cache()
        flops, dflops, nsum, asum = cost_model(L, Hq, D, CFG, B)
        q = torch.randn(B, Hq, L, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16)
        nbytes = 2 * (q.numel() * 2 + k.numel() + v.numel()) + B * Hq * L * CFG["topk"] * 8 * 2
        r = dict(L=L, flops=flops, dense_flops=dflops, bytes=nbytes, keys_per_query=asum / L,
                 stripes_per_query=nsum / L)
        # superlinear: search, attention, both
        for attempt in range(2):
            try:
                run_super(r, q, k, v)
                break
            except Exception as e:
                r["super_err"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
                if akw.get("impl", "pairs") == "tile":
                    break
                akw["impl"] = "tile"  # fall back to the other attention path, and say so
                r["fallback"] = "tile"
        torch.cuda.empty_cache()
        # dense baselines
        for name, fn, on in (("sdpa", sdpa, not args.no_dense),
                             ("sdpa_flash", lambda q, k, v: sdpa(q, k, v, flash=True),
                              not args.no_dense),
                             ("flex", flex, flex is not None)):
            if not on:
                continue
            pred = None
            if name in last:
                L0, t0 = last[name]
                pred = t0 * (L / L0) ** 2
            if pred is not None and (pred > args.max_seconds
                                     or (name == "flex" and L > args.flex_max_L)):
                r[f"{name}_s"], r[f"{name}_est"] = pred, True
                continue
            try:
                r[f"{name}_s"], r[f"{name}_n"] = cuda_time(lambda: fn(q, k, v), predicted=pred,
                                                           max_iters=10)
                last[name] = (L, r[f"{name}_s"])
            except Exception as e:
                r[f"{name}_err"] = f"{type(e).__name__}: {str(e)[:200]}"
                if pred is not None:
                    r[f"{name}_s"], r[f"{name}_est"] = pred, True
                print(f"{name} at L={L} failed: {r[name + '_err']}", flush=True)
            torch.cuda.empty_cache()
        del q, k, v
        rows.append(r)
        msg = " ".join(f"{kk}={vv:.4g}" if isinstance(vv, float) else f"{kk}={vv}"
                       for kk, vv in r.items())
        print(msg, flush=True)
        with open(os.path.join(args.out, "attention.json"), "w") as f:
            json.dump(rows, f, indent=1)

    # fitted exponent over L >= 128K
    def fit(key):
        pts = [(math.log(r["L"]), math.log(r[key])) for r in rows if r["L"] >= 131072 and key in r]
        if len(pts) < 2:
            return float("nan")
        mx = sum(p[0] for p in pts) / len(pts)
        my = sum(p[1] for p in pts) / len(pts)
        return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)

    lines = ["| L | superlinear ms | search ms | attention ms | (of which prep+sort ms) | "
             "SDPA ms | Flex ms | SDPA / super | Flex / super | TFLOP/s (model) | "
             "GB/s (model) | keys/query |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def ms(key):
            if key not in r:
                return "n/a"
            return f"{r[key] * 1e3:.2f}" + (" (est)" if r.get(key[:-2] + "_est") else "")
        sup = r.get("super_s")
        rs = f"{r['sdpa_s'] / sup:.2f}x" if sup and "sdpa_s" in r else "n/a"
        rf = f"{r['flex_s'] / sup:.2f}x" if sup and "flex_s" in r else "n/a"
        tf = f"{r['flops'] / sup / 1e12:.1f}" if sup else "n/a"
        gb = f"{r['bytes'] / sup / 1e9:.0f}" if sup else "n/a"
        lines.append(f"| {r['L']} | {ms('super_s')} | {ms('search_s')} | {ms('attn_s')} | "
                     f"{ms('prep_s')} | "
                     f"{ms('sdpa_s')} | {ms('flex_s')} | {rs} | {rf} | {tf} | {gb} | "
                     f"{r['keys_per_query']:.0f} |")
    ex = {k: fit(k) for k in ("super_s", "search_s", "attn_s", "sdpa_s", "flex_s")}
    lines.append("")
    lines.append("fitted exponent 128K..1M: " + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in ex.items()))
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    with open(os.path.join(args.out, "attention.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump({"rows": rows, "exponents": ex, "search_kw": skw, "attn_kw": akw,
                   "sdpa_enable_gqa": sdpa_gqa,
                   "tuned": tuned}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 5))
        for key, lab in (("super_s", "superlinear (Triton)"), ("sdpa_s", "SDPA (default dispatch)"),
                         ("sdpa_flash_s", "SDPA flash"),
                         ("flex_s", "FlexAttention")):
            pts = [(r["L"], r[key], r.get(key[:-2] + "_est", False)) for r in rows if key in r]
            if not pts:
                continue
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=lab)
            est = [p for p in pts if p[2]]
            if est:
                ax.plot([p[0] for p in est], [p[1] for p in est], "o", mfc="white",
                        color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("seconds (forward, B=1, Hq=32, Hkv=8, d=128, bf16)")
        ax.set_title(f"{props.name}: attention forward (hollow = estimated)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.savefig(os.path.join(args.out, "attention.png"), dpi=120, bbox_inches="tight")
        print("wrote attention.png")
    except Exception as e:
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
