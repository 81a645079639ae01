#!/usr/bin/env python3
"""GPU correctness sweep of the Triton kernels against the reference (run on the device machine).

For every case: fresh random inputs, the allocator poisoned with NaN before each kernel call,
span_search checked robustly (kept scores equal the reference's top-k values; every kept anchor is
a legal stripe anchor, present, unique, and its recomputed float64 score is its score; anchors agree
with the reference except at near-ties), span_attention checked given the reference's anchors
(relative error against the reference on fp32-upcast inputs: fp32 <= 1e-5, bf16/fp16 <= 1e-2).
Also: the dense route (T <= dense_below), the custom ops end to end, and CUDA-graph capture.

    python benchmarks/gpu_check.py [--out DIR] [--oracle DIR] [--quick]

Exits non-zero if any case fails. ``--oracle DIR`` loads reference.py/geometry.py from DIR (a
snapshot of a committed reference) instead of the working tree's.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import traceback
import types

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def boot():
    """``slcompile.kernels`` from this checkout without running ``slcompile/__init__.py``."""
    try:
        return importlib.import_module("slcompile.kernels")
    except Exception:
        pass
    for name in [n for n in sys.modules if n == "slcompile" or n.startswith("slcompile.")]:
        del sys.modules[name]
    pkg = types.ModuleType("slcompile")
    pkg.__path__ = [os.path.join(REPO, "slcompile")]
    sys.modules["slcompile"] = pkg
    spec = importlib.util.spec_from_file_location(
        "slcompile.kernels", os.path.join(REPO, "kernels", "__init__.py"),
        submodule_search_locations=[os.path.join(REPO, "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["slcompile.kernels"] = mod
    spec.loader.exec_module(mod)
    pkg.kernels = mod
    return mod


def load_oracle(path):
    boot()
    if not path:
        return importlib.import_module("slcompile.kernels.reference")
    spec = importlib.util.spec_from_file_location(
        "oracle", os.path.join(path, "__init__.py"), submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["oracle"] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module("oracle.reference")


DEFAULT = dict(window=64, sinks=4, topk=3, search_power=0.5, span_power=0.5,
               backward_factor=2.0, forward_factor=0.0, combine="union", search_key="anchor")


def poison():
    x = torch.empty(64 << 20, dtype=torch.float32, device="cuda")
    x.fill_(float("nan"))
    del x


def sargs(c, db=0):
    return (c["window"], c["topk"], c["search_power"], c["span_power"], c["backward_factor"],
            c["forward_factor"], c["search_key"], db)


def aargs(c, scale, db=0):
    return (c["window"], c["sinks"], c["span_power"], c["backward_factor"], c["forward_factor"],
            c["combine"], scale, db)


def make_inputs(case, gen):
    B, Hq, Hkv, Lq, T, D, Dv, dtype = (case[k] for k in ("B", "Hq", "Hkv", "Lq", "T", "D", "Dv", "dtype"))
    dev = "cuda"
    q = torch.randn(B, Hq, Lq, D, generator=gen, device=dev).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=gen, device=dev).to(dtype)
    v = torch.randn(B, Hkv, T, Dv, generator=gen, device=dev).to(dtype)
    kpm = None
    if case.get("pad"):
        kpm = torch.rand(B, T, generator=gen, device=dev) > 0.2
        kpm[0, : T // 7] = False  # left padding on the first row
    pos = None
    if case.get("pos") == "cache":
        pos = (torch.arange(Lq, device=dev) + T - Lq).expand(B, Lq).contiguous()
    elif case.get("pos") == "random":
        pos = torch.stack([torch.randperm(T, generator=gen, device=dev)[:Lq] for _ in range(B)])
    return q, k, v, kpm, pos


def check_search(R, geo, TS, case, q, k, kpm, pos, log, **skw):
    cfg = case["cfg"]
    B, Hq, Lq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    poison()
    a, s = TS.span_search(q, k, kpm, pos, *sargs(cfg), **skw)
    torch.cuda.synchronize()
    ra, rs = R.span_search(q, k, kpm, pos, *sargs(cfg))
    probs = []
    if torch.isnan(s).any():
        probs.append("NaN (unwritten) scores")
    if not torch.equal(torch.isinf(s), torch.isinf(rs)) or not torch.equal(a < 0, ra < 0):
        probs.append("empty slots differ")
    fin = torch.isfinite(rs) & torch.isfinite(s)
    scale = rs[fin].abs().max().item() if fin.any() else 1.0
    serr = (s[fin] - rs[fin]).abs().max().item() / scale if fin.any() else 0.0
    if serr > 1e-5:
        probs.append(f"kept scores differ from the reference's top-k by {serr:.2e}")
    P = R.default_positions(B, Lq, T, q.device) if pos is None else pos.long()
    ok = a >= 0
    al = a.long().clamp(min=0)
    W = min(cfg["window"], T)
    n = geo.num_stripes(T, cfg["search_power"])
    deltas = geo.stripe_deltas(n, cfg["search_power"], q.device)
    is_delta = torch.zeros(T + 1, dtype=torch.bool, device=q.device)
    is_delta[deltas.clamp(max=T)] = True
    off = (P[:, None, :, None] - al)
    legal = (off >= W) & (off <= T) & is_delta[off.clamp(0, T)]
    if not legal[ok].all():
        probs.append("illegal anchor (not at a stripe offset past the window)")
    if kpm is not None:
        bi = torch.arange(B, device=q.device)[:, None, None, None].expand_as(al)
        if not kpm[bi[ok], al[ok]].all():
            probs.append("anchor on a padded key")
    for j in range(1, a.shape[-1]):
        for jj in range(j):
            if ((a[..., j] == a[..., jj]) & ok[..., j]).any():
                probs.append("duplicate anchor")
    # recompute the kept scores in float64
    g = Hq // Hkv
    kvh = torch.arange(Hq, device=q.device) // g
    kd = k.double()
    if cfg["search_key"] == "anchor":
        keys = kd[torch.arange(B, device=q.device)[:, None, None, None], kvh[None, :, None, None], al]
    else:
        back, fwd = geo.span_extents(T, cfg["span_power"], cfg["backward_factor"],
                                     cfg["forward_factor"], q.device)
        if kpm is not None:
            kd = kd * kpm[:, None, :, None]
        pref = torch.zeros(B, Hkv, T + 1, D, dtype=torch.float64, device=q.device)
        pref[:, :, 1:] = kd.cumsum(2)
        cnt = torch.zeros(B, T + 1, dtype=torch.float64, device=q.device)
        cnt[:, 1:] = (kpm.double() if kpm is not None else torch.ones(B, T, dtype=torch.float64,
                                                                     device=q.device)).cumsum(1)
        tt = P[:, None, :, None].expand_as(al)
        lo = (al - back[tt]).clamp(min=0)
        hi = torch.minimum(al + fwd[tt], tt - W).clamp(min=0)
        bi = torch.arange(B, device=q.device)[:, None, None, None]
        hv = kvh[None, :, None, None]
        tot = pref[bi, hv, hi + 1] - pref[bi, hv, lo]
        c = (cnt[bi.expand_as(hi), hi + 1] - cnt[bi.expand_as(lo), lo]).clamp(min=1)
        keys = tot / c[..., None]
    rec = torch.einsum("bhld,bhlkd->bhlk", q.double(), keys)
    rerr = ((s.double() - rec).abs()[ok].max().item() / scale) if ok.any() else 0.0
    if rerr > 1e-5:
        probs.append(f"kept score != recomputed score of its anchor ({rerr:.2e})")
    agree = ((a == ra) | ~ok).float().mean().item()
    if agree < 0.95:
        probs.append(f"anchors agree with the reference on only {agree:.3f}")
    log(f"  search{skw or ''}: score err {serr:.1e}, recomputed err {rerr:.1e}, anchor agreement {agree:.4f}")
    return probs, ra, rs


def check_attention(R, TA, case, q, k, v, kpm, pos, ra, rs, log, impl=None):
    cfg = case["cfg"]
    scale = 1.0 / math.sqrt(q.shape[-1])
    poison()
    kw = {} if impl is None else {"impl": impl}
    out = TA.span_attention(q, k, v, ra, rs, kpm, pos, *aargs(cfg, scale), **kw)
    torch.cuda.synchronize()
    ref = R.span_attention(q.float(), k.float(), v.float(), ra, rs, kpm, pos, *aargs(cfg, scale))
    probs = []
    if out.dtype != q.dtype or out.shape != ref.shape:
        probs.append(f"bad output dtype/shape {out.dtype} {tuple(out.shape)}")
    if torch.isnan(out).any():
        probs.append("NaN (unwritten) output")
    err = ((out.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    tol = 1e-5 if q.dtype == torch.float32 else 1e-2
    if not err <= tol:
        probs.append(f"attention rel err {err:.2e} > {tol}")
    dead = ref.abs().sum(-1) == 0
    if dead.any() and not (out[dead] == 0).all():
        probs.append("rows with no visible key are not zero")
    log(f"  attention[{impl or 'default'}]: rel err {err:.2e}")
    return probs


TILE_TOO = ("default_bf16", "gated_bf16", "cache_offsets", "d80_fp16")


def cases(quick=False):
    f32, bf, fp = torch.float32, torch.bfloat16, torch.float16
    C = []

    def add(name, B=1, Hq=8, Hkv=2, L=1024, T=None, D=128, Dv=None, dtype=bf, pad=False, pos=None,
            **cfg):
        C.append(dict(name=name, B=B, Hq=Hq, Hkv=Hkv, Lq=L, T=T or L, D=D, Dv=Dv or D, dtype=dtype,
                      pad=pad, pos=pos, cfg={**DEFAULT, **cfg}))

    add("default_bf16", L=2048)
    add("default_fp16", L=1500, dtype=fp)
    add("default_fp32", L=1300, dtype=f32)
    add("gated_bf16", L=1777, combine="gated")
    add("gated_fp32_pad", B=2, L=900, dtype=f32, combine="gated", pad=True)
    add("mean_key_fp32", L=1100, dtype=f32, search_key="mean")
    add("mean_key_bf16_pad", B=2, L=1000, search_key="mean", pad=True, combine="gated")
    for D in (32, 64, 80, 96, 256):
        add(f"d{D}_fp16", Hq=4, Hkv=1, L=1031, D=D, dtype=fp)
        add(f"d{D}_fp32_gated", Hq=4, Hkv=4, L=600, D=D, dtype=f32, combine="gated")
    add("dv_ne_d", L=800, D=64, Dv=128, dtype=f32)
    add("mqa_topk8_p3", Hq=6, Hkv=1, L=1200, D=64, topk=8, search_power=1 / 3)
    add("topk1_ff", L=999, D=64, dtype=f32, topk=1, forward_factor=0.5, backward_factor=1.5)
    add("topk5_r04", L=1600, D=64, topk=5, span_power=0.4, window=32, sinks=0)
    add("cache_offsets", B=2, L=300, T=1800, D=64, pos="cache", dtype=f32, pad=True)
    add("cache_gated", B=1, L=1, T=2000, D=128, pos="cache", combine="gated")
    add("random_positions", B=2, L=257, T=1500, D=64, pos="random", dtype=f32)
    add("small_window_no_sinks", L=700, D=64, window=1, sinks=0, dtype=f32)
    add("window0", L=500, D=32, window=0, sinks=2, dtype=f32, combine="gated")
    add("tiny_L", L=70, D=64, dtype=f32, window=8, sinks=1)
    add("long_bf16", Hq=4, Hkv=1, L=8192, D=128)
    if quick:
        C = C[:4]
    return C


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--oracle", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated case names to skip")
    ap.add_argument("--only", default="", help="comma-separated case names to run")
    ap.add_argument("--no-tile", action="store_true", help="check only the default attention path")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "gpu_check.log"), "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    boot()
    R = load_oracle(args.oracle)
    geo = importlib.import_module(R.__name__.rsplit(".", 1)[0] + ".geometry")
    from slcompile.kernels import triton_search as TS, triton_attention as TA, ops  # noqa
    from slcompile.kernels import triton_impl as TI  # noqa
    log(f"torch {torch.__version__}, triton {importlib.import_module('triton').__version__}, "
        f"{torch.cuda.get_device_name()}, oracle {R.__file__}")
    impls = getattr(TA, "IMPLS", [None])[:1] if args.no_tile else getattr(TA, "IMPLS", [None])
    results = []
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int(time.time()) & 0xFFFF)
    skip = set(x for x in args.skip.split(",") if x)
    for case in cases(args.quick):
        if case["name"] in skip or (args.only and case["name"] not in args.only.split(",")):
            continue
        t0 = time.time()
        log(f"[{case['name']}] B={case['B']} Hq={case['Hq']} Hkv={case['Hkv']} Lq={case['Lq']} "
            f"T={case['T']} D={case['D']} Dv={case['Dv']} {case['dtype']} "
            f"cfg={ {k: v for k, v in case['cfg'].items() if DEFAULT.get(k) != v} } "
            f"pad={case['pad']} pos={case['pos']}")
        try:
            q, k, v, kpm, pos = make_inputs(case, gen)
            probs, ra, rs = check_search(R, geo, TS, case, q, k, kpm, pos, log)
            if case["dtype"] != torch.float32 and case["cfg"]["search_key"] == "anchor":
                p2, _, _ = check_search(R, geo, TS, case, q, k, kpm, pos, log, use_dot=True)
                probs += [f"use_dot: {x}" for x in p2]
            if not (ra >= 0).any():
                probs.append("no anchors at all: the case tests nothing")
            for impl in impls:
                if impl not in (None, "pairs") and case["name"] not in TILE_TOO:
                    continue
                probs += check_attention(R, TA, case, q, k, v, kpm, pos, ra, rs, log, impl)
        except Exception as e:  # a crash is a failure, with its traceback in the log
            probs = [f"exception {type(e).__name__}: {e}"]
            log(traceback.format_exc())
        results.append((case["name"], probs, time.time() - t0))
        log(f"  -> {'OK' if not probs else 'FAIL: ' + '; '.join(probs)} ({time.time() - t0:.1f}s)")

    # dense route (T <= dense_below): SDPA where it applies, the kernel otherwise
    for name, pad, pos in (("dense_sdpa", False, None), ("dense_kernel_pad", True, "cache")):
        case = dict(name=name, B=2, Hq=8, Hkv=2, Lq=600 if pos else 1000, T=1000, D=128, Dv=128,
                    dtype=torch.bfloat16, pad=pad, pos=pos, cfg=DEFAULT)
        try:
            q, k, v, kpm, p = make_inputs(case, gen)
            poison()
            out = TI.span_attention(q, k, v, torch.empty(2, 8, case["Lq"], 3, dtype=torch.int32,
                                                         device="cuda"),
                                    torch.empty(2, 8, case["Lq"], 3, device="cuda"), kpm, p,
                                    *aargs(DEFAULT, 0.1, db=4096))
            ref = R.dense_attention(q.float(), k.float(), v.float(), kpm, p, 0.1)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            probs = [] if err < 1e-2 and not torch.isnan(out).any() else [f"dense err {err:.2e}"]
            log(f"[{name}] rel err {err:.2e}")
        except Exception as e:
            probs = [f"exception {type(e).__name__}: {e}"]
            log(traceback.format_exc())
        results.append((name, probs, 0.0))

    # custom ops end to end on CUDA, and CUDA graph capture of both ops
    try:
        case = dict(name="ops_graph", B=1, Hq=8, Hkv=2, Lq=3000, T=3000, D=128, Dv=128,
                    dtype=torch.float32, pad=False, pos=None, cfg=DEFAULT)
        q, k, v, _, _ = make_inputs(case, gen)
        sc = 1 / math.sqrt(128)

        def run():
            a, s = torch.ops.superlinear.span_search(q, k, None, None, *sargs(DEFAULT))
            return torch.ops.superlinear.span_attention(q, k, v, a, s, None, None,
                                                        *aargs(DEFAULT, sc))
        eager = run()
        ref = R.superlinear_attention(q, k, v, dense_below=0, scale=sc, **DEFAULT)
        err_e = ((eager - ref).norm() / ref.norm()).item()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gout = run()
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        gout.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref2 = R.superlinear_attention(q, k, v, dense_below=0, scale=sc, **DEFAULT)
        err_g = ((gout - ref2).norm() / ref2.norm()).item()
        log(f"[ops_graph] custom ops vs reference {err_e:.2e}; CUDA graph replay on new data "
            f"{err_g:.2e}")
        probs = [] if err_e < 1e-4 and err_g < 1e-4 else [f"ops {err_e:.2e} graph {err_g:.2e}"]
    except Exception as e:
        probs = [f"exception {type(e).__name__}: {e}"]
        log(traceback.format_exc())
    results.append(("ops_graph", probs, 0.0))

    nfail = sum(1 for _, p, _ in results if p)
    log("\n==== gpu_check summary ====")
    for name, p, dt in results:
        log(f"{'OK  ' if not p else 'FAIL'} {name:28s} {'; '.join(p)}")
    log(f"{len(results) - nfail}/{len(results)} passed")
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump([{"name": n, "problems": p, "seconds": d} for n, p, d in results], f, indent=1)
    sys.exit(1 if nfail else 0)


if __name__ == "__main__":
    main()
