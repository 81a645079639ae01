#!/usr/bin/env python3
"""Benchmark: sequence-parallel superlinear attention (kernels/distributed.py), 1 device against N.

For each length L: the single-device ops on the whole sequence (rank 0 alone), then the sequence
split over ``--nproc`` ranks three ways: equal contiguous chunks with the selective path and with
the all-gather baseline, and the zigzag layout (rank r holds pieces r and 2P-1-r of L/(2P); K and V
all-gathered). Reports time (median over ``--repeats`` of the slowest rank, after ``--warmup``
calls), speed-up over one device, bytes each rank sent/received (logical payload, `CommStats`),
peak memory per rank (CUDA) and the error of the split result against the single-device one on
sampled query rows (the first and last 128 queries of every piece, all heads). Writes
distributed.json / .md to --out.

Defaults: B=1, Hq=32, Hkv=8, d=128, the default config (``--config default``: block-sparse; or
``anchor``, SPEC.md's stripe search) with dense_below=0, bf16 and NCCL on CUDA (one process per GPU,
mp.spawn), fp32 and gloo on CPU (one thread per process).

    python benchmarks/distributed.py                                   # 2 GPUs, 1M / 2M / 4M tokens
    python benchmarks/distributed.py --device cpu --lengths 4096       # CPU, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta

# NVLink SHARP (multicast) off: the device machines' NVLink multicast is not to be used.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import boot  # noqa: E402

CONFIGS = {"default": dict(dense_below=0),
           "anchor": dict(window=64, sinks=4, topk=3, search_power=0.5, span_power=0.5,
                          backward_factor=2.0, forward_factor=0.0, combine="union",
                          search_key="anchor", dense_below=0)}
SPLITS = (("contiguous", "selective"), ("contiguous", "all_gather"), ("zigzag", None))  # zigzag: its default comm
SAMPLE = 128  # query rows compared at each end of every chunk


def _chunk(seed, p, B, Hq, Hkv, C, D, dtype, dev, routed=0):
    """q, k, v of chunk p (the same on every rank and in the single-device run). routed > 0:
    every query carries one direction that only ``routed`` keys in the middle of chunk 0 carry
    (attention that concentrates, as a trained model's does; random inputs select everywhere)."""
    g = torch.Generator(device=dev).manual_seed(seed * 1009 + p)
    q = torch.randn(B, Hq, C, D, generator=g, device=dev, dtype=dtype)
    k = torch.randn(B, Hkv, C, D, generator=g, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, C, D, generator=g, device=dev, dtype=dtype)
    if routed:
        u = torch.randn(D, generator=torch.Generator(device=dev).manual_seed(seed), device=dev)
        u = (u / u.norm()).to(dtype)
        q, k = 0.3 * q + 3.0 * u, 0.3 * k
        if p == 0:
            k[:, :, C // 2:C // 2 + routed] += 3.0 * u
    return q, k, v


def _sample_rows(out, h):
    """The first and last SAMPLE query rows of each piece of h rows of out [B, H, n*h, D]."""
    n = out.shape[2] // h
    s = min(SAMPLE, h)
    idx = torch.cat([torch.cat([torch.arange(p * h, p * h + s), torch.arange((p + 1) * h - s, (p + 1) * h)])
                     for p in range(n)]).to(out.device)
    return out.index_select(2, idx).float()


def _pieces(layout, rank, P):
    """The pieces (of 2P) a rank holds, in its local order."""
    return (2 * rank, 2 * rank + 1) if layout == "contiguous" else (rank, 2 * P - 1 - rank)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev, warmup, repeats, group_wide):
    """Median seconds of fn(); with group_wide, (median of the slowest rank's time, each rank's
    median)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if group_wide:
            dist.barrier()
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    if not group_wide:
        return statistics.median(times)
    mine = torch.tensor(times, dtype=torch.float64, device=dev)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    worst = torch.stack(every).max(0).values
    return statistics.median(worst.tolist()), [statistics.median(e.tolist()) for e in every]


def _worker(rank, args, port):
    boot()
    from slcompile.kernels.config import SuperlinearConfig
    from slcompile import superlinear_attention
    from slcompile.kernels.distributed import sequence_parallel_superlinear_attention as sp_attn

    P = args.nproc
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        backend = "nccl"
    else:
        torch.set_num_threads(1)
        dev = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P,
                            timeout=timedelta(seconds=600))
    dtype = getattr(torch, args.dtype)
    cfg = SuperlinearConfig(**CONFIGS[args.config])
    B, Hq, Hkv, D = args.B, args.Hq, args.Hkv, args.D
    rows = []
    for L in args.lengths:
        if L % (2 * P):
            raise ValueError(f"length {L} is not a multiple of 2 x --nproc {P}")
        h = L // (2 * P)  # the zigzag piece; contiguous chunks are 2h
        row = dict(L=L, nproc=P, device=args.device, dtype=args.dtype)
        if rank == 0:
            print(f"# L={L}: started {time.strftime('%H:%M:%S')}", flush=True)
        # ---- one device: rank 0 alone, the ops on the whole sequence ----------------------------
        ref = None
        if rank == 0 and not args.no_single:
            try:
                q = torch.empty(B, Hq, L, D, dtype=dtype, device=dev)
                k = torch.empty(B, Hkv, L, D, dtype=dtype, device=dev)
                v = torch.empty(B, Hkv, L, D, dtype=dtype, device=dev)
                for p in range(2 * P):
                    q[:, :, p * h:(p + 1) * h], k[:, :, p * h:(p + 1) * h], v[:, :, p * h:(p + 1) * h] = \
                        _chunk(args.seed, p, B, Hq, Hkv, h, D, dtype, dev, args.routed)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)

                def one():
                    return superlinear_attention(q, k, v, config=cfg, enable_gqa=True)

                ref = _sample_rows(one(), h)  # also the first warm-up call
                row["single_s"] = _time(one, dev, max(0, args.warmup - 1), args.repeats, group_wide=False)
                if dev.type == "cuda":
                    row["single_peak_gb"] = (torch.cuda.max_memory_allocated(dev) - base) / 1e9
            except torch.OutOfMemoryError as e:
                row["single_error"] = f"out of memory: {str(e).splitlines()[0]}"
            except Exception as e:  # reported, the split runs still go ahead
                row["single_error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            q = k = v = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier()
        # ---- split over P ranks --------------------------------------------------------------
        for layout, comm in SPLITS:
            name = comm if layout == "contiguous" else layout
            mine = [_chunk(args.seed, p, B, Hq, Hkv, h, D, dtype, dev, args.routed) for p in _pieces(layout, rank, P)]
            ql, kl, vl = (torch.cat([m[i] for m in mine], dim=2) for i in range(3))
            mine = None
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)

            def split():
                return sp_attn(ql, kl, vl, config=cfg, comm=comm, block=args.block, return_stats=True,
                               layout=layout)

            out, st = split()
            t, per_rank_s = _time(split, dev, max(0, args.warmup - 1), args.repeats, group_wide=True)
            row[f"{name}_rank_s"] = per_rank_s
            if dev.type == "cuda":
                peak = torch.tensor([(torch.cuda.max_memory_allocated(dev) - base) / 1e9],
                                    dtype=torch.float64, device=dev)
                peaks = [torch.empty_like(peak) for _ in range(P)]
                dist.all_gather(peaks, peak)
                row[f"{name}_peak_gb"] = [float(x) for x in peaks]
            smp = _sample_rows(out, h)
            every = [torch.empty_like(smp) for _ in range(P)]
            dist.all_gather(every, smp)
            sent = torch.tensor([st.total_sent, st.total_received, st.sent.get("k", 0) + st.sent.get("v", 0),
                                 st.received.get("k", 0) + st.received.get("v", 0)],
                                dtype=torch.int64, device=dev)
            per_rank = [torch.empty_like(sent) for _ in range(P)]
            dist.all_gather(per_rank, sent)
            row[f"{name}_s"] = t
            row[f"{name}_bytes"] = [dict(rank=i, sent=int(x[0]), received=int(x[1]), kv_sent=int(x[2]),
                                         kv_received=int(x[3])) for i, x in enumerate(per_rank)]
            held = torch.tensor([st.held_rows], dtype=torch.int64, device=dev)
            helds = [torch.empty_like(held) for _ in range(P)]
            dist.all_gather(helds, held)
            row[f"{name}_held_rows"] = [int(x) for x in helds]  # K/V rows a kv head, per rank
            if ref is not None:  # every rank's sampled pieces, put back in sequence order
                n = every[0].shape[2] // 2
                got = [None] * (2 * P)
                for r, e in enumerate(every):
                    for i, p in enumerate(_pieces(layout, r, P)):
                        got[p] = e[:, :, i * n:(i + 1) * n]
                err = (torch.cat(got, dim=2) - ref).abs()
                row[f"{name}_max_abs_err"] = float(err.max())
                row[f"{name}_rel_err"] = float(err.norm() / ref.norm())
            out = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        # the all-gather baseline's collectives alone (K and V), to split its time
        ks, vs = [torch.empty_like(kl) for _ in range(P)], [torch.empty_like(vl) for _ in range(P)]

        def gather_only():
            dist.all_gather(ks, kl)
            dist.all_gather(vs, vl)

        row["all_gather_comm_s"] = _time(gather_only, dev, 1, args.repeats, group_wide=True)[0]
        ql = kl = vl = ks = vs = None
        if rank == 0:
            if "single_s" in row:
                for name in ("selective", "all_gather", "zigzag"):
                    row[f"{name}_speedup"] = row["single_s"] / row[f"{name}_s"]
            print(json.dumps(row), flush=True)
            rows.append(row)
            _write(rows, args)  # after every length: a later one may not finish
    dist.barrier()
    dist.destroy_process_group()


def _gb(x):
    return f"{x / 1e9:.4g}"


def _write(rows, args):
    os.makedirs(args.out, exist_ok=True)
    meta = dict(torch=torch.__version__, device=args.device, nproc=args.nproc, B=args.B, Hq=args.Hq,
                routed=args.routed,
                Hkv=args.Hkv, D=args.D, dtype=args.dtype, block=args.block, config=CONFIGS[args.config],
                warmup=args.warmup, repeats=args.repeats)
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
    with open(os.path.join(args.out, "distributed.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# {meta}", "",
             f"| L | 1 device s | split | {args.nproc} ranks s | speed-up | max rank GB received "
             "| per-rank s | per-rank peak GB (1 device) | K/V rows held per rank | max abs err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name in ("selective", "all_gather", "zigzag"):
            peak = " / ".join(f"{x:.3g}" for x in r.get(f"{name}_peak_gb", []))
            lines.append(
                f"| {r['L']} | {r.get('single_s', float('nan')):.4f} | {name} | {r[f'{name}_s']:.4f} "
                f"| {r.get(f'{name}_speedup', float('nan')):.2f}x "
                f"| {_gb(max(b['received'] for b in r[f'{name}_bytes']))} "
                f"| {' / '.join(f'{x:.4f}' for x in r[f'{name}_rank_s'])} "
                f"| {peak} ({r.get('single_peak_gb', float('nan')):.3g}) "
                f"| {' / '.join(str(x) for x in r.get(f'{name}_held_rows', []))} "
                f"| {r.get(f'{name}_max_abs_err', float('nan')):.2e} |")
        lines.append(f"| {r['L']} | | all_gather of K/V alone | {r['all_gather_comm_s']:.4f} | | | | | | |")
        if "single_error" in r:
            lines.append(f"|  | 1 device: {r['single_error']} | | | | | | | | |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "distributed.md"), "w") as f:
        f.write(text)
    if len(rows) == len(args.lengths):
        print(text, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--lengths", default="1048576,2097152,4194304")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--Hq", type=int, default=32)
    ap.add_argument("--Hkv", type=int, default=8)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--block", type=int, default=64, help="rows per transferred block")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="default",
                    help="default: SuperlinearConfig(dense_below=0), block-sparse; anchor: SPEC.md's stripe search")
    ap.add_argument("--warmup", type=int, default=None, help="default: 1 on cuda, 0 on cpu")
    ap.add_argument("--repeats", type=int, default=None, help="default: 3 on cuda, 1 on cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--routed", type=int, default=0,
                    help="keys of one region (this many, in chunk 0) that every query prefers")
    ap.add_argument("--no-single", action="store_true", help="skip the single-device run")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.warmup = (1 if cuda else 0) if args.warmup is None else args.warmup
    args.repeats = (3 if cuda else 1) if args.repeats is None else args.repeats
    if cuda and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args, port), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
