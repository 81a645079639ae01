"""A decoded token's host time without a GPU: the default op's implementation
(`superlinear::block_sparse_attention`, no dispatcher, block summaries given) and the functional
call generate()'s attention makes (`superlinear_attention` without gradients: checks, lowering,
the op without the dispatcher) on CPU tensors, through the real Triton path (`launch.launch`, its keys and table) with only the
compiled kernel's launcher (``CompiledKernel.run``) replaced by a no-op. It measures the Python
that runs between a token's launches, which bounds an eager decode where the GPU work is short
(benchmarks/RESULTS.md, "Decoding one token"); the launcher itself (5-7 us a launch on an H100
host) is not included. The ``general_`` rows time the same calls through the general entry points
(kernels/blocksparse_decode.py's prepared launches off), in the same process. Needs Triton, no GPU;
TRITON_INTERPRET must be unset.

    python benchmarks/decode_host_cpu.py --out benchmarks/data/decode_host_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from meta import commit as measured_commit  # noqa: E402  (benchmarks/meta.py)


def _general(bd, fn):
    real, bd.attention = bd.attention, lambda *a, **kw: None
    try:
        return fn()
    finally:
        bd.attention = real


class _NoLaunch:
    """A compiled kernel whose launch does nothing."""
    function = packed_metadata = None

    def run(self, *args):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[16384, 131072, 1048576])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from triton.runtime.jit import JITFunction
    JITFunction.run = lambda self, *args, grid, warmup, **kw: _NoLaunch()
    torch.cuda.current_device = lambda: 0
    torch._C._cuda_getCurrentRawStream = lambda device: 0
    from slcompile.functional import superlinear_attention
    from slcompile.kernels import blocksparse_decode as bd, dispatch, launch as L, ops as kops
    from slcompile.kernels.config import SuperlinearConfig
    kops._use_triton = dispatch.use_triton = lambda device: True
    c = SuperlinearConfig(dense_below=0)
    f = kops.block_sparse_attention._init_fn  # what generate() reaches (no dispatcher)
    commit = measured_commit()
    res = dict(commit=commit, date=time.strftime("%Y-%m-%d"), cpu=platform.processor() or
               platform.machine(), torch=torch.__version__, hq=32, hkv=8, d=128, rows=[])
    for T in a.lengths:
        q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
        k = torch.empty(1, 8, T, 128, dtype=torch.bfloat16)  # never touched: no pages
        v = torch.empty(1, 8, T, 128, dtype=torch.bfloat16)
        summ = torch.empty(1, 8, T // 256, 256, dtype=torch.bfloat16)
        args = (q, k, v, None, None, c.window, c.sinks, c.topk, 128 ** -0.5, 0, c.q_block,
                c.k_block, c.block_rows, c.block_pool, summ, c.exact_rows, c.block_group,
                c.spread_rows)
        row = dict(T=T)
        calls = (("op", lambda: f(*args)),
                 ("functional", lambda: superlinear_attention(
                     q, k, v, config=c, enable_gqa=True, block_summary=summ)))
        # the same calls through the general entry points (kernels/blocksparse_decode.py's
        # prepared launches off), interleaved with the prepared ones
        general = [("general_" + n, lambda fn=fn: _general(bd, fn)) for n, fn in calls]
        for name, fn in calls + tuple(general):
            medians = []
            with torch.no_grad():
                for _ in range(50):
                    fn()
                for _ in range(a.rounds):
                    ts = []
                    for _ in range(a.calls):
                        t0 = time.perf_counter_ns()
                        fn()
                        ts.append(time.perf_counter_ns() - t0)
                    medians.append(statistics.median(ts) / 1e3)
            row[name + "_host_us"] = round(min(medians), 1)
            row[name + "_round_medians_us"] = [round(m, 1) for m in medians]
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    res["direct_launch_keys"] = len(L._KERNELS)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
