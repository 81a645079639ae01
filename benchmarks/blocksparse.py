"""Block-sparse superlinear attention (search_key="blocksparse", docs/blocksparse.md) against what a
user gets by default: F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) with its
default dispatch, in one run, on one GPU.

Per length: SDPA's time; the block-sparse total (search + BlockMask + FlexAttention, the op a model
runs) and its parts; the ratio SDPA / total; the attention's useful TFLOP/s (4 * D * attended
(query, key) pairs * Hq / time). Lengths up to --check-max also check FlexAttention against the
gather-based reference attention on the same selection.

    python benchmarks/blocksparse.py --lengths 8192 32768 131072 --out benchmarks/data/x.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from slcompile.kernels import blocksparse as bs


def timed(fn, reps: int, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def attended_pairs(kept, L, window, sinks, q_block, k_block):
    """(query, key) pairs attended, summed over kv heads (x G for query heads)."""
    return bs.keys_attended(kept, 0, L, L, window=window, sinks=sinks, q_block=q_block,
                            k_block=k_block).sum().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 131072])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--q-blocks", type=int, nargs="+", default=[bs.Q_BLOCK])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--check-max", type=int, default=16384)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = "cuda"
    rows = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, commit=commit,
                date=time.strftime("%Y-%m-%d"), hq=a.hq, hkv=a.hkv, d=a.d, window=a.window,
                sinks=a.sinks, topk=a.topk, k_block=bs.K_BLOCK, dtype="bfloat16", B=1)
    print(json.dumps(meta), flush=True)
    for L in a.lengths:
        torch.manual_seed(0)
        q = torch.randn(1, a.hq, L, a.d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, a.hkv, L, a.d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, a.hkv, L, a.d, device=dev, dtype=torch.bfloat16)
        scale = a.d ** -0.5
        reps = a.reps if L <= 600_000 else max(1, a.reps - 1)
        t_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                              enable_gqa=True), reps)
        for qb in a.q_blocks:
            kw = dict(window=a.window, sinks=a.sinks, q_block=qb, k_block=bs.K_BLOCK)
            sel = lambda: bs.block_select(q, k, None, 0, topk=a.topk, **kw)  # noqa: E731
            kept = sel()
            mask = lambda: bs.flex_block_mask(kept, L, Hq=a.hq, **kw)  # noqa: E731
            bm = mask()
            flex = bs._flex_fn(True)
            ko = bs.flex_kernel_options(qb, bs.K_BLOCK)
            att = lambda: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True,  # noqa: E731
                               kernel_options=ko)

            def total():
                kp = bs.block_select(q, k, None, 0, topk=a.topk, **kw)
                return bs.block_attention_flex(q, k, v, kp, scale=scale, **kw)

            t_sel, t_mask, t_att = timed(sel, reps), timed(mask, reps), timed(att, reps, warm=2)
            t_tot = timed(total, reps)
            pairs = attended_pairs(kept, L, **kw) * (a.hq // a.hkv)
            dense_pairs = L * (L + 1) // 2 * a.hq
            row = dict(L=L, q_block=qb, sdpa_ms=t_sdpa, total_ms=t_tot, search_ms=t_sel,
                       mask_ms=t_mask, attention_ms=t_att, speedup=t_sdpa / t_tot,
                       attention_speedup=t_sdpa / t_att,
                       useful_tflops=4 * a.d * pairs / (t_att * 1e-3) / 1e12,
                       sdpa_tflops=4 * a.d * dense_pairs / (t_sdpa * 1e-3) / 1e12,
                       keys_per_query=pairs / (L * a.hq), key_fraction=pairs / dense_pairs)
            if L <= a.check_max:
                ref = bs.block_attention(q, k, v, kept, None, 0, scale=scale, **kw)
                row["max_err_vs_reference"] = (att().float() - ref.float()).abs().max().item()
            rows.append(row)
            print(json.dumps(row), flush=True)
            del bm, kept
        del q, k, v
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
