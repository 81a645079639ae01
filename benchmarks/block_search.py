#!/usr/bin/env python3
"""The block span-search (search_key="block", kernels/triton_block.py) on a GPU: equality with the
reference and timing against the kernel's previous version, the Triton anchor search and dense SDPA.

    python benchmarks/block_search.py [--out DIR] [--lengths 131072,32768,8192] [--budget-s 60]
    TRITON_INTERPRET=1 python benchmarks/block_search.py --tiny   # dry run on a CPU
    python benchmarks/block_search.py --rerank --precompile   # search_key="block_rerank"

1. Equality (bf16, SuperlinearConfig.for_pretrained() geometry, dense_below=0, fresh random inputs,
   allocator poisoned with NaN): the kernel against ``reference.span_search`` on the same device.
   Integer-valued inputs (every bound exact in any summation order, many equal bounds): anchors and
   scores must be identical. Gaussian inputs: scores to fp32 rounding; anchors may differ only where
   two bounds are within rounding of each other, so rows that differ are counted and their sorted
   scores compared. Each timed shape is also checked on its last ``--ref-queries`` queries.
2. Timing (CUDA events, median): the kernel over a whole prefill, the Triton anchor search with the
   same config and causal SDPA (flash) on q/k/v of the same shape, in this one run; "before" is the
   previous kernel's prefill from ``data/block_search_h200_2026-11-28.json`` (commit f03b88b).
   Past ``--budget-s`` seconds the remaining optional parts (the launch-shape sweep) are skipped.

--rerank: the same for search_key="block_rerank" (the block kernel's candidate selection plus
_rerank_kernel): equality checks at 8K against the reference (whose rerank is quadratic, so the
last-queries check runs up to 32K only), and the timing of "block_rerank" against "block" and SDPA
(no anchor search and no "before"; the old constants timed beside it, then a sweep of
`rerank_chunk` x `rerank_warps` at the longest length).

Results: JSON (written after every row) and a Markdown table under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from attention import cuda_time  # noqa: E402
from gpu_check import boot  # noqa: E402

boot()  # slcompile.kernels from this checkout (the GPU machine has no install)
from slcompile.kernels.config import SuperlinearConfig  # noqa: E402
from slcompile.kernels import reference as R  # noqa: E402
from slcompile.kernels import triton_block as TB  # noqa: E402
from slcompile.kernels import triton_impl as TI  # noqa: E402

HEADS = [(32, 8, 128), (9, 3, 64)]  # Llama-8B-like, SmolLM2-135M-like
BEFORE = os.path.join(HERE, "data", "block_search_h200_2026-11-28.json")
# launch shapes tried after the table (keyword arguments of triton_block.span_search)
SWEEP = [dict(block_q=bq, num_warps=nw) for bq, nw in [(16, 8), (4, 4), (8, 4)]]
RERANK_SWEEP = [dict(rerank_chunk=ch, rerank_warps=nw)  # --rerank
                for ch, nw in [(1, 4), (2, 4), (8, 4), (4, 8), (8, 8)]]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
KEY = "block"  # the search key checked and timed (--rerank: "block_rerank")
OLD = dict(fine_block=32, rerank=4)  # --rerank also times block_rerank as it was before 2026-12-01
RERANK_REF_MAX_T = 32768  # the reference's rerank is quadratic: last-queries checks up to here


def clock(fn, budget_s, max_iters):
    """Median seconds of fn(): CUDA events on a GPU, wall clock under the interpreter."""
    if DEV == "cuda":
        return cuda_time(fn, budget_s=budget_s, max_iters=max_iters)[0]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def search_args(cfg, kpm=None, pos=None, key=None):
    key = key or KEY
    return (kpm, pos, cfg.window, cfg.topk, cfg.search_power, cfg.span_power, cfg.backward_factor,
            cfg.forward_factor, key, 0, cfg.fine_block, cfg.rerank)


def data(Hq, Hkv, Lq, T, D, integer, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    if integer:
        q = torch.randint(-4, 5, (1, Hq, Lq, D), generator=g, device=DEV)
        k = torch.randint(-4, 5, (1, Hkv, T, D), generator=g, device=DEV)
    else:
        q = torch.randn(1, Hq, Lq, D, generator=g, device=DEV)
        k = torch.randn(1, Hkv, T, D, generator=g, device=DEV)
    return q.bfloat16(), k.bfloat16()


def compare(a, s, ra, rs, integer):
    """Kernel (a, s) against the reference (ra, rs). Integer-valued inputs: identical. Gaussian
    (docs/routing.md, tolerance): the rows (query, head) with the same anchors have scores within
    1e-3; a row with other anchors is a fine near-tie (sorted scores within 1e-3) or a coarse
    near-tie (another coarse block refined: a span of another score, "rows_other_span"); together
    at most 1e-3 of the rows."""
    rows = (a != ra).any(-1)
    fin = torch.isfinite(rs)
    same = fin & ~rows[..., None]
    res = dict(rows=int(rows.numel()), rows_kept=int((ra[..., 0] >= 0).sum()),
               rows_differ=int(rows.sum()), scores_equal=bool(torch.equal(s, rs)),
               same_empty=bool(torch.equal(fin, torch.isfinite(s))),
               max_score_err=float((s[same] - rs[same]).abs().max()) if same.any() else 0.0)
    if res["rows_differ"]:
        d = (s[rows].sort(-1).values - rs[rows].sort(-1).values).nan_to_num(0, 0, 0).abs()
        d = d.amax(-1)
        res["differ_sorted_score_err"] = float(d.max())
        res["rows_other_span"] = int((d > 1e-3).sum())
    res["ok"] = (res["rows_differ"] == 0 and res["scores_equal"]) if integer else \
        (res["same_empty"] and res["max_score_err"] < 1e-3 and res["rows_differ"] <= 1e-3 * res["rows"])
    return res


def check(cfg, Hq, Hkv, Lq, T, D, integer, pad, seed):
    q, k = data(Hq, Hkv, Lq, T, D, integer, seed)
    kpm = None
    if pad:
        kpm = torch.rand(1, T, device=DEV) > 0.2
        kpm[:, :T // 16] = False
    args = search_args(cfg, kpm)
    ra, rs = R.span_search(q, k, *args)
    torch.full((1 << (28 if DEV == "cuda" else 16),), float("nan"), device=DEV)  # poison
    a, s = TB.span_search(q, k, *args)
    res = dict(T=T, Lq=Lq, heads=[Hq, Hkv, D], integer=integer, pad=pad,
               **compare(a, s, ra, rs, integer))
    print("check", json.dumps(res), flush=True)
    return res


def sdpa(q, k, v):
    """The baseline: SDPA with its default dispatch, what a user gets."""
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    except RuntimeError:  # no GQA in this build's kernel: repeat the kv heads
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                              v.repeat_interleave(g, 1), is_causal=True)


def timing(cfg, Hq, Hkv, D, T, ref_q, before):
    q, k = data(Hq, Hkv, T, T, D, False, T + Hq)
    blk = search_args(cfg)
    row = dict(T=T, heads=[Hq, Hkv, D])
    if KEY == "block_rerank":
        row["rerank_s"] = clock(lambda: TB.span_search(q, k, *blk), 0.5, 5)
        old = search_args(cfg.replace(**OLD))  # the settings before 2026-12-01
        row["rerank_old_s"] = clock(lambda: TB.span_search(q, k, *old), 0.5, 5)
        blk = search_args(cfg, key="block")
    row["block_s"] = clock(lambda: TB.span_search(q, k, *blk), 0.5, 5)
    v = torch.randn_like(k)
    row["sdpa_s"] = clock(lambda: sdpa(q, k, v), 0.5, 3)
    if KEY == "block_rerank":
        row["x_sdpa"] = row["sdpa_s"] / row["rerank_s"]
        row["x_block"] = row["rerank_s"] / row["block_s"]
        if T <= RERANK_REF_MAX_T:
            qs = q[:, :, T - min(T, ref_q):]
            rr = search_args(cfg)
            ra, rs = R.span_search(qs, k, *rr)
            a, s = TB.span_search(qs, k, *rr)
            row["check_last_queries"] = dict(Lq=qs.shape[2], **compare(a, s, ra, rs, False))
        print("time", json.dumps(row), flush=True)
        return row
    row["anchor_s"] = clock(lambda: TI.span_search(q, k, *search_args(cfg, key="anchor")), 0.3, 5)
    row["before_s"] = before.get((T, Hq, Hkv, D))
    # equality on the prefill's last ref_q queries (the same kernel specialisation as timed)
    qs = q[:, :, T - min(T, ref_q):]
    ra, rs = R.span_search(qs, k, *blk)
    a, s = TB.span_search(qs, k, *blk)
    row["check_last_queries"] = dict(Lq=qs.shape[2], **compare(a, s, ra, rs, False))
    row["x_sdpa"] = row["sdpa_s"] / row["block_s"]
    row["x_anchor"] = row["block_s"] / row["anchor_s"]
    if row["before_s"]:
        row["x_before"] = row["before_s"] / row["block_s"]
    print("time", json.dumps(row), flush=True)
    return row


def kernel_breakdown(cfg, heads, T):
    """CUDA milliseconds per kernel name of one block_rerank search (torch.profiler; the second
    of two calls, so nothing compiles inside)."""
    from torch.profiler import ProfilerActivity, profile

    Hq, Hkv, D = heads
    q, k = data(Hq, Hkv, T, T, D, False, 2)
    TB.span_search(q, k, *search_args(cfg))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        TB.span_search(q, k, *search_args(cfg))
        torch.cuda.synchronize()
    ms = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        t = getattr(e, "cuda_time_total", 0.0) if t is None else t
        if t:
            ms[e.key[:60]] = round(t / 1e3, 3)
    return dict(sorted(ms.items(), key=lambda kv: -kv[1])[:8], T=T, heads=list(heads))


def warm(cfg, job):
    """Run (and so compile into Triton's on-disk cache) the kernels one job of main() launches,
    with the same shapes: --precompile runs these in parallel processes, one per job."""
    kind, spec = job
    if kind == "check":
        (Hq, Hkv, D), Lq, T, integer, pad = spec
        q, k = data(Hq, Hkv, Lq, T, D, integer, 0)
        kpm = torch.rand(1, T, device=DEV) > 0.2 if pad else None
        TB.span_search(q, k, *search_args(cfg, kpm))
    elif kind == "time":
        T, (Hq, Hkv, D) = spec
        q, k = data(Hq, Hkv, T, T, D, False, 0)
        TB.span_search(q, k, *search_args(cfg))
        if KEY == "block_rerank":
            TB.span_search(q, k, *search_args(cfg, key="block"))
            TB.span_search(q, k, *search_args(cfg.replace(**OLD)))
        else:
            TI.span_search(q, k, *search_args(cfg, key="anchor"))
    else:
        T, (Hq, Hkv, D), launch = spec
        q, k = data(Hq, Hkv, T, T, D, False, 0)
        TB.span_search(q, k, *search_args(cfg), **launch)
    torch.cuda.synchronize() if DEV == "cuda" else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--lengths", default="131072,32768,8192")
    ap.add_argument("--ref-queries", type=int, default=2048)
    ap.add_argument("--budget-s", type=float, default=60.0, help="skip the sweep past this")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny shapes")
    ap.add_argument("--precompile", action="store_true",
                    help="first compile every kernel of the run in parallel processes")
    ap.add_argument("--rerank", action="store_true", help='search_key="block_rerank"')
    ap.add_argument("--warm-job", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    global KEY
    KEY = "block_rerank" if a.rerank else "block"
    t_start = time.time()
    cfg = SuperlinearConfig.for_pretrained()
    heads = HEADS
    checks = [((9, 3, 64), 8192, 8192, True, False), ((32, 8, 128), 2048, 32768, False, True),
              ((32, 8, 128), 1, 32768, True, True)]
    lengths = [int(x) for x in a.lengths.split(",")]
    if a.rerank:  # 8K prefill (integer-valued), 2048 queries of 8K with padding (Gaussian)
        checks = [((9, 3, 64), 8192, 8192, True, False), ((32, 8, 128), 2048, 8192, False, True)]
    if a.tiny:  # the same code paths on shapes the interpreter runs in seconds
        cfg = cfg.replace(window=48)
        heads = [(4, 2, 16), (3, 1, 8)]
        checks = [((3, 1, 8), 64 >> 2 * a.rerank, 160, True, False),
                  ((4, 2, 16), 1, 300, True, True)]
        lengths = [64 if a.rerank else 192]
        a.ref_queries = 32
    out = dict(search_key=KEY, device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)",
               torch=torch.__version__, config=cfg.to_dict(), checks=[], timings=[])
    os.makedirs(a.out, exist_ok=True)

    def save():
        with open(os.path.join(a.out, f"{KEY}_search.json"), "w") as f:
            json.dump(out, f, indent=1)

    with open(BEFORE) as f:
        before = {(r["T"], *r["heads"]): r["block_s"] for r in json.load(f)["timings"]}
    # most informative first (a run cut short keeps what it saved): the integer check (exactness
    # and tie rules on tensor cores), the first heads' timings, the other checks, the other heads
    todo = [("check", checks[0])] + [("time", (T, heads[0])) for T in lengths] + \
        [("check", c) for c in checks[1:]] + [("time", (T, hd)) for hd in heads[1:] for T in lengths]
    sweep = [("sweep", (lengths[0], heads[0], launch)) for launch in (RERANK_SWEEP if a.rerank else SWEEP)]
    if a.warm_job is not None:
        warm(cfg, (todo + sweep)[a.warm_job])
        return
    if a.precompile:
        args = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:]
        procs = [subprocess.Popen(args + ["--warm-job", str(i)]) for i in range(len(todo + sweep))]
        out["precompile_failed"] = [i for i, p in enumerate(procs) if p.wait() != 0]
        out["precompile_s"] = time.time() - t_start
        print(f"precompiled in {out['precompile_s']:.0f} s, failed jobs {out['precompile_failed']}",
              flush=True)
    for kind, job in todo:
        if kind == "check":
            (Hq, Hkv, D), Lq, T, integer, pad = job
            out["checks"].append(check(cfg, Hq, Hkv, Lq, T, D, integer, pad, seed=T + Lq))
        else:
            T, (Hq, Hkv, D) = job
            out["timings"].append(timing(cfg, Hq, Hkv, D, T, a.ref_queries, before))
        save()
    if sweep and time.time() - t_start < a.budget_s:  # launch shapes at the longest length, first heads
        (Hq, Hkv, D), T = heads[0], lengths[0]
        q, k = data(Hq, Hkv, T, T, D, False, 1)
        out["sweep"] = {}
        for _, (_, _, launch) in sweep:
            if time.time() - t_start > a.budget_s:
                break
            ms = clock(lambda: TB.span_search(q, k, *search_args(cfg), **launch), 0.5, 5) * 1e3
            bq = ",".join(f"{n}={v}" for n, v in launch.items())
            out["sweep"][bq] = ms
            print("sweep", bq, f"{ms:.2f} ms", flush=True)
            save()
    if a.rerank and DEV == "cuda":  # where the time goes: CUDA time per kernel, longest length
        out["kernels_ms"] = kernel_breakdown(cfg, heads[0], lengths[0])
        print("kernels", json.dumps(out["kernels_ms"]), flush=True)
        save()
    if a.rerank:
        lines = ["| T | Hq/Hkv/D | block_rerank | block_rerank, block 32 / rerank 4 (before) | block "
                 "| rerank / block | SDPA flash | SDPA / rerank | last-queries check |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in out["timings"]:
            c = r.get("check_last_queries")
            chk = f"{c['rows_differ']}/{c['rows']} rows differ, ok={c['ok']}" if c else "-"
            lines.append(f"| {r['T']} | {'/'.join(map(str, r['heads']))} | "
                         f"{r['rerank_s'] * 1e3:.2f} ms | {r['rerank_old_s'] * 1e3:.2f} ms | "
                         f"{r['block_s'] * 1e3:.2f} ms | "
                         f"{r['x_block']:.2f}x | {r['sdpa_s'] * 1e3:.1f} ms | {r['x_sdpa']:.2f}x | "
                         f"{chk} |")
    else:
        lines = ["| T | Hq/Hkv/D | block search (new) | before (f03b88b) | speed-up | anchor search "
                 "| block / anchor | SDPA flash | SDPA / block | last-queries check |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in out["timings"]:
            c = r["check_last_queries"]
            before_ms = f"{r['before_s'] * 1e3:.1f} ms" if r["before_s"] else "-"
            lines.append(f"| {r['T']} | {'/'.join(map(str, r['heads']))} | "
                         f"{r['block_s'] * 1e3:.2f} ms | {before_ms} | {r.get('x_before', float('nan')):.1f}x | "
                         f"{r['anchor_s'] * 1e3:.2f} ms | {r['x_anchor']:.1f}x | "
                         f"{r['sdpa_s'] * 1e3:.1f} ms | {r['x_sdpa']:.1f}x | "
                         f"{c['rows_differ']}/{c['rows']} rows differ, ok={c['ok']} |")
    with open(os.path.join(a.out, f"{KEY}_search.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    out["all_checks_ok"] = all(c["ok"] for c in out["checks"]) and \
        all(r["check_last_queries"]["ok"] for r in out["timings"] if "check_last_queries" in r)
    out["wall_s"] = time.time() - t_start
    save()
    print("all checks ok:", out["all_checks_ok"], f"wall {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
