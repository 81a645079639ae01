#!/usr/bin/env python3
"""Benchmark: sequence-parallel superlinear attention (kernels/distributed.py), 1 device against N.

For each length L: the single-device ops on the whole sequence (rank 0 alone), then the sequence
split over ``--nproc`` ranks (equal contiguous chunks) with the selective path and with the
all-gather baseline. Reports time (median over ``--repeats`` of the slowest rank, after
``--warmup`` calls), speed-up over one device, bytes each rank sent/received (logical payload,
`CommStats`) and the error of the split result against the single-device one on sampled query rows
(the first and last 128 queries of every chunk, all heads). Writes distributed.json / .md to --out.

Defaults: B=1, Hq=32, Hkv=8, d=128, the spec's default config with dense_below=0, bf16 and NCCL on
CUDA (one process per GPU, mp.spawn), fp32 and gloo on CPU (one thread per process).

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

CFG = dict(window=64, sinks=4, topk=3, search_power=0.5, span_power=0.5, backward_factor=2.0,
           forward_factor=0.0, combine="union", search_key="anchor", dense_below=0)
SAMPLE = 128  # query rows compared at each end of every chunk


def _chunk(seed, p, B, Hq, Hkv, C, D, dtype, dev):
    """q, k, v of chunk p (the same on every rank and in the single-device run)."""
    g = torch.Generator(device=dev).manual_seed(seed * 1009 + p)
    q = torch.randn(B, Hq, C, D, generator=g, device=dev, dtype=dtype)
    k = torch.randn(B, Hkv, C, D, generator=g, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, C, D, generator=g, device=dev, dtype=dtype)
    return q, k, v


def _sample_rows(out, C):
    """The first and last SAMPLE query rows of each chunk of out [B, H, n*C, D]."""
    n = out.shape[2] // C
    s = min(SAMPLE, C)
    idx = torch.cat([torch.cat([torch.arange(p * C, p * C + s), torch.arange((p + 1) * C - s, (p + 1) * C)])
                     for p in range(n)]).to(out.device)
    return out.index_select(2, idx).float()


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
    cfg = SuperlinearConfig(**CFG)
    B, Hq, Hkv, D = args.B, args.Hq, args.Hkv, args.D
    rows = []
    for L in args.lengths:
        if L % P:
            raise ValueError(f"length {L} is not a multiple of --nproc {P}")
        C = L // P
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
                for p in range(P):
                    q[:, :, p * C:(p + 1) * C], k[:, :, p * C:(p + 1) * C], v[:, :, p * C:(p + 1) * C] = \
                        _chunk(args.seed, p, B, Hq, Hkv, C, D, dtype, dev)
                scale = 1.0 / D ** 0.5

                def one():
                    a, s = torch.ops.superlinear.span_search(
                        q, k, None, None, cfg.window, cfg.topk, cfg.search_power, cfg.span_power,
                        cfg.backward_factor, cfg.forward_factor, cfg.search_key, cfg.dense_below)
                    return torch.ops.superlinear.span_attention(
                        q, k, v, a, s, None, None, cfg.window, cfg.sinks, cfg.span_power,
                        cfg.backward_factor, cfg.forward_factor, cfg.combine, scale, cfg.dense_below)

                ref = _sample_rows(one(), C)  # also the first warm-up call
                row["single_s"] = _time(one, dev, max(0, args.warmup - 1), args.repeats, group_wide=False)
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
        ql, kl, vl = _chunk(args.seed, rank, B, Hq, Hkv, C, D, dtype, dev)
        for comm in ("selective", "all_gather"):
            def split():
                return sp_attn(ql, kl, vl, config=cfg, comm=comm, block=args.block, return_stats=True)

            out, st = split()
            t, per_rank_s = _time(split, dev, max(0, args.warmup - 1), args.repeats, group_wide=True)
            row[f"{comm}_rank_s"] = per_rank_s
            mine = _sample_rows(out, C)
            every = [torch.empty_like(mine) for _ in range(P)]
            dist.all_gather(every, mine)
            sent = torch.tensor([st.total_sent, st.total_received, st.sent.get("k", 0) + st.sent.get("v", 0),
                                 st.received.get("k", 0) + st.received.get("v", 0)],
                                dtype=torch.int64, device=dev)
            per_rank = [torch.empty_like(sent) for _ in range(P)]
            dist.all_gather(per_rank, sent)
            row[f"{comm}_s"] = t
            row[f"{comm}_bytes"] = [dict(rank=i, sent=int(x[0]), received=int(x[1]), kv_sent=int(x[2]),
                                         kv_received=int(x[3])) for i, x in enumerate(per_rank)]
            if ref is not None:
                got = torch.cat(every, dim=2)
                err = (got - ref).abs()
                row[f"{comm}_max_abs_err"] = float(err.max())
                row[f"{comm}_rel_err"] = float(err.norm() / ref.norm())
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
                for comm in ("selective", "all_gather"):
                    row[f"{comm}_speedup"] = row["single_s"] / row[f"{comm}_s"]
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
                Hkv=args.Hkv, D=args.D, dtype=args.dtype, block=args.block, config=CFG,
                warmup=args.warmup, repeats=args.repeats)
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
    with open(os.path.join(args.out, "distributed.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# {meta}", "",
             f"| L | 1 device s | {args.nproc} ranks selective s | speed-up | {args.nproc} ranks all-gather s "
             "| speed-up | max rank GB received, selective | all-gather | GB sent+received per rank, selective "
             "| all-gather | max abs err (sel / ag) | per-rank s, sel | per-rank s, ag | all_gather of K/V alone s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sel, ag = r["selective_bytes"], r["all_gather_bytes"]
        lines.append(
            f"| {r['L']} | {r.get('single_s', float('nan')):.4f} | {r['selective_s']:.4f} "
            f"| {r.get('selective_speedup', float('nan')):.2f}x | {r['all_gather_s']:.4f} "
            f"| {r.get('all_gather_speedup', float('nan')):.2f}x "
            f"| {_gb(max(b['received'] for b in sel))} | {_gb(max(b['received'] for b in ag))} "
            f"| {' / '.join(_gb(b['sent'] + b['received']) for b in sel)} "
            f"| {' / '.join(_gb(b['sent'] + b['received']) for b in ag)} "
            f"| {r.get('selective_max_abs_err', float('nan')):.2e} / {r.get('all_gather_max_abs_err', float('nan')):.2e} "
            f"| {' / '.join(f'{x:.4f}' for x in r['selective_rank_s'])} "
            f"| {' / '.join(f'{x:.4f}' for x in r['all_gather_rank_s'])} | {r['all_gather_comm_s']:.4f} |")
        if "single_error" in r:
            lines.append(f"|  | 1 device: {r['single_error']} | | | | | | | | | | | | |")
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
    ap.add_argument("--warmup", type=int, default=None, help="default: 1 on cuda, 0 on cpu")
    ap.add_argument("--repeats", type=int, default=None, help="default: 3 on cuda, 1 on cpu")
    ap.add_argument("--seed", type=int, default=0)
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
