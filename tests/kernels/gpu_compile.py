"""Compile the Triton kernels for an NVIDIA GPU (sm_90 by default) on a machine without one.

Triton's interpreter, which runs the kernel tests on CPU, never compiles: a kernel that the
interpreter runs may still fail Triton's compiler (types the interpreter lets through, a
shared-memory plan past the GPU's). This script runs the public entry points on CPU tensors with
every launch compiled instead of run (``JITFunction.run`` patched, `launch.launch` sent through it):
compiled for the target through a stand-in driver (a target and its shared-memory limit, no
device) down to a cubin with Triton's own ptxas, and refused with Triton's ``OutOfResources``
where its shared memory exceeds the limit, as a real launch would be (the wrappers that shrink
their tiles then do so). Prints one JSON line per compiled kernel, then ``{"ok": N, ...}``.

Targets: ``--arch 90`` (H100/H200, 227 KB a block), ``80`` (A100, 163 KB), ``86`` (consumer Ampere,
A10, 99 KB), ``89`` (Ada, L4, 99 KB), ``75`` (T4, 64 KB). ``--default-only``: the default's
(block-sparse) entry points only, bf16 and fp32.

Exit status: 0 all compiled; 1 a kernel failed to compile or plans too much shared memory;
3 the stand-in could not be set up on this Triton (its driver interface differs).

    python tests/kernels/gpu_compile.py [--arch 90] [--default-only]   # TRITON_INTERPRET unset
"""

from __future__ import annotations

import json
import os
import sys
import traceback

# bytes of shared memory a block may use (what Triton's launch checks), by compute capability
SMEM_LIMIT = {90: 232448, 80: 166912, 86: 101376, 89: 101376, 75: 65536}
REFUSED: list = []  # kernels refused for their shared memory (their callers then shrank them)


def _stand_in(arch: int):
    """Make Triton's active driver a stand-in that targets sm_<arch> without a device."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class _Utils:
        def get_device_properties(self, device):
            return {"max_shared_mem": SMEM_LIMIT[arch], "multiprocessor_count": 132,
                    "max_num_regs": 65536, "warpSize": 32}

    class _Driver:
        utils = _Utils()

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

    driver.set_active(_Driver())


def _record(arch: int):
    """Compile every launch instead of running it: [(kernel, compiled kernel)], or
    [(kernel, exception)] for one that failed to compile. A compiled kernel over the shared-memory
    limit raises ``OutOfResources`` to its caller, as a launch would."""
    import torch
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction
    from slcompile.kernels import launch as L

    calls = []
    real = JITFunction.run

    def run(self, *args, grid, warmup, **kw):
        if warmup:
            return real(self, *args, grid=grid, warmup=warmup, **kw)
        try:
            compiled = real(self, *args, grid=grid, warmup=True, **kw)
        except Exception as e:  # a compile error, or ptxas refusing the kernel
            calls.append((self, e))
        else:
            if compiled.metadata.shared > SMEM_LIMIT[arch]:
                REFUSED.append(self.__name__)
                raise OutOfResources(compiled.metadata.shared, SMEM_LIMIT[arch], "shared memory")
            calls.append((self, compiled))
        for x in list(args) + list(kw.values()):  # integer outputs (lists, keys) read by the
            if isinstance(x, torch.Tensor) and not x.is_floating_point():  # Python that follows:
                x.data.zero_()  # valid indices, not garbage (.data: no version bump)
        return None

    JITFunction.run = run
    L._info = lambda kernel: None  # every launch through kernel[grid]
    return calls


def _entry_points(default_only: bool = False):
    """Run the kernels' entry points on CPU tensors: the default (block-sparse) prefill, decode,
    chunk, paged decode, backward and summary update; the stripe and N-step searches and
    attention; bf16, fp16 and fp32. default_only: the default's entry points in bf16 and fp32
    (fp16 compiles to the same tiles as bf16)."""
    import torch
    from slcompile.kernels import blocksparse as bs, dispatch
    from slcompile.kernels import triton_blocksparse as TB
    from slcompile.kernels import triton_blocksparse_search as TS
    from slcompile.kernels.config import SuperlinearConfig
    from slcompile.functional import superlinear_attention

    dispatch.force_triton(True)
    torch.manual_seed(0)

    def qkv(Lq, T, dtype, Hq=32, Hkv=8, D=128, grad=False):
        q, k, v = (torch.randn(1, h, n, D, dtype=dtype) for h, n in ((Hq, Lq), (Hkv, T), (Hkv, T)))
        if grad:
            for x in (q, k, v):
                x.requires_grad_(True)
        return q, k, v

    default = SuperlinearConfig(dense_below=0)
    for dtype in (torch.bfloat16,) if default_only else (torch.bfloat16, torch.float16):
        q, k, v = qkv(2048, 2048, dtype)
        superlinear_attention(q, k, v, config=default, enable_gqa=True)  # prefill
        q, k, v = qkv(1, 8192, dtype)
        superlinear_attention(q, k, v, config=default, enable_gqa=True)  # decode, keys rebuilt
        cache = bs.BlockSummaryCache(bs.summary_keys(default.window, default.k_block,
                                                     default.block_group))
        summ = cache.update(k, 0)  # the summary update kernel
        superlinear_attention(q, k, v, config=default, enable_gqa=True, block_summary=summ)
        q, k, v = qkv(20, 8192, dtype)
        superlinear_attention(q, k, v, config=default, enable_gqa=True, block_summary=summ)
    q, k, v = qkv(1024, 1024, torch.float32, Hq=8, Hkv=2, D=64)  # fp32 (IEEE products)
    superlinear_attention(q, k, v, config=default, enable_gqa=True)
    q, k, v = qkv(2048, 2048, torch.bfloat16, grad=True)  # the backward (lse written)
    superlinear_attention(q, k, v, config=default, enable_gqa=True).sum().backward()
    # paged keys and values (sequence parallelism's layout) in the search and the attention
    q, k, v = qkv(1, 4096, torch.bfloat16)
    nK = 4096 // 32
    table = torch.arange(nK, dtype=torch.int32).expand(1, 8, nK).contiguous()
    summ = bs.BlockSummaryCache(256).update(k, 0)
    keys = TS.block_select_triton(q, k, None, 4095, window=256, sinks=4, topk=24, q_block=64,
                                  k_block=32, rows=8, pool=8, summary=summ, exact_rows=16,
                                  group=8, exact_keys=True, table=table)
    TB.block_attention_triton(q, k, v, keys, 4095, q_block=64, k_block=32, scale=0.088,
                              sink_blocks=1, window_blocks=8, keys_topk=24, table=table)
    if default_only:
        return
    # the stripe searches (SPEC.md) and the N-step search, prefill and decode
    for cfg in (SuperlinearConfig(search_key="anchor", dense_below=0),
                SuperlinearConfig(steps=3, dense_below=0)):
        for Lq, T in ((2048, 2048), (1, 16384)):
            q, k, v = qkv(Lq, T, torch.bfloat16)
            superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
    q, k, v = qkv(1024, 1024, torch.bfloat16, grad=True)
    superlinear_attention(q, k, v, config=SuperlinearConfig(search_key="anchor", dense_below=0),
                          enable_gqa=True).sum().backward()


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_LIMIT))
    ap.add_argument("--default-only", action="store_true")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_compile: unset TRITON_INTERPRET (the interpreter never compiles)")
        return 3
    try:
        _stand_in(a.arch)
        calls = _record(a.arch)
    except Exception:  # a Triton laid out otherwise
        traceback.print_exc()
        return 3
    _entry_points(a.default_only)
    seen, ok, failed = set(), 0, 0
    for kernel, compiled in calls:
        if isinstance(compiled, Exception):
            failed += 1
            print(json.dumps({"kernel": kernel.__name__, "error": repr(compiled)[-2000:]}),
                  flush=True)
            continue
        name = (kernel.__name__, compiled.hash)
        if name in seen:
            continue
        seen.add(name)
        ok += 1
        print(json.dumps({"kernel": kernel.__name__, "num_warps": compiled.metadata.num_warps,
                          "num_stages": compiled.metadata.num_stages,
                          "shared": compiled.metadata.shared}), flush=True)
    print(json.dumps({"arch": a.arch, "ok": ok, "failed": failed, "launches": len(calls),
                      "refused": REFUSED}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
