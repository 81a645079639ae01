"""Direct launches against Triton's own, in one process: one decoded token of the default
(`superlinear::block_sparse_attention` as generate() reaches it, no dispatcher; block summaries
given) with `kernels/launch.py` on, and with it off (``launch._info`` patched to None: every launch
through ``kernel[grid]``), beside SDPA; 6 interleaved rounds of 200 unsynchronised calls (host
time of each call) and 30 synchronised ones (CUDA events). Counts the calls that reached Triton's
``JITFunction.run`` (0 once every key is known) and checks both give the same output.

    python benchmarks/decode_launch_ab.py --out results.json
"""
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from triton.runtime.jit import JITFunction
from slcompile.kernels import blocksparse as bs, launch as L, ops as kops
from slcompile.kernels.config import SuperlinearConfig

c = SuperlinearConfig(dense_below=0)
CALLS = [0]
orig = JITFunction.run
def counted(self, *a, **k):
    CALLS[0] += 1
    return orig(self, *a, **k)
JITFunction.run = counted
real_info = L._info
res = {"gpu": torch.cuda.get_device_name(), "hooks": None}
try:
    from triton import knobs
    rt = knobs.runtime
    res["hooks"] = [repr(getattr(h, "calls", h))
                    for h in (rt.launch_enter_hook, rt.launch_exit_hook)]
except Exception as e:
    res["hooks"] = repr(e)
for T in (16384, 131072, 1048576):
    torch.manual_seed(0)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16)
    cache = bs.BlockSummaryCache(bs.summary_keys(c.window, c.k_block, c.block_group))
    summ = cache.update(k, 0)
    args = (q, k, v, None, None, c.window, c.sinks, c.topk, 128 ** -0.5, 0, c.q_block, c.k_block,
            c.block_rows, c.block_pool, summ, c.exact_rows, c.block_group, c.spread_rows)
    f = kops.block_sparse_attention._init_fn  # what generate() reaches (no dispatcher)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    outs = {}
    R = {m: {"host": [], "synced": [], "calls": 0} for m in ("direct", "triton")}
    R["sdpa"] = {"host": [], "synced": []}
    for rnd in range(6):
        for mode in ("direct", "triton", "sdpa"):
            if mode == "sdpa":
                fn = sdpa
            else:
                L._info = real_info if mode == "direct" else (lambda kernel: None)
                fn = lambda: f(*args)
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            c0 = CALLS[0]
            for i in range(200):
                t0 = time.perf_counter_ns()
                fn()
                R[mode]["host"].append(time.perf_counter_ns() - t0)
                if i % 25 == 24:
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
            if mode != "sdpa":
                R[mode]["calls"] += CALLS[0] - c0
            s, e = torch.cuda.Event(True), torch.cuda.Event(True)
            for _ in range(30):
                torch.cuda.synchronize(); s.record(); fn(); e.record(); e.synchronize()
                R[mode]["synced"].append(s.elapsed_time(e) * 1e3)
            if mode != "sdpa":
                outs[mode] = fn().clone()
    L._info = real_info
    row = {"T": T, "equal_outputs": bool(torch.equal(outs["direct"], outs["triton"]))}
    for m, d in R.items():
        row[m] = {"host_us_median": statistics.median(d["host"]) / 1e3,
                  "synced_us_median": statistics.median(d["synced"])}
        if "calls" in d:
            row[m]["triton_run_calls"] = d["calls"]
    row["synced_ratio_direct"] = row["sdpa"]["synced_us_median"] / row["direct"]["synced_us_median"]
    row["synced_ratio_triton"] = row["sdpa"]["synced_us_median"] / row["triton"]["synced_us_median"]
    print(json.dumps(row), flush=True)
    res[str(T)] = row
    del k, v, cache, summ
    torch.cuda.empty_cache()
if "--out" in sys.argv:
    json.dump(res, open(sys.argv[sys.argv.index("--out") + 1], "w"), indent=1)
print(json.dumps({"hooks": res["hooks"]}))
