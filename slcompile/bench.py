"""What ``slcompile bench`` measures: dense causal SDPA against superlinear attention, as an op on
random tensors or as a whole converted model, timed as medians; and its optional plot. The command
line (cli.py) parses and reports; this module times."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Dict, List

from slcompile.errors import NotAvailableError, UsageError, first_line


def timeit(fn: Callable[[], Any], repeat: int, warmup: int, device) -> float:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_op(L, B, Hq, Hkv, D, dtype, device, config, repeat, warmup) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from slcompile.functional import superlinear_attention

    g = torch.Generator().manual_seed(L)
    q = torch.randn(B, Hq, L, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(device=device, dtype=dtype)
    gqa = Hq != Hkv
    with torch.no_grad():
        dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        sl = lambda: superlinear_attention(q, k, v, config=config, enable_gqa=gqa)
        d_ms = timeit(dense, repeat, warmup, device)
        s_ms = timeit(sl, repeat, warmup, device)
        err = float((dense().float() - sl().float()).abs().max())
    return {"seq_len": L, "dense_ms": d_ms, "superlinear_ms": s_ms,
            "speedup": d_ms / s_ms if s_ms > 0 else None, "max_abs_err": err}


def bench_model(L, dense_mod, gm, ex, repeat, warmup) -> Dict[str, Any]:
    import torch

    from slcompile.convert import error_metrics

    dev = torch.device("cpu")
    with torch.no_grad():
        d_ms = timeit(lambda: dense_mod(*ex.args, **ex.kwargs), repeat, warmup, dev)
        s_ms = timeit(lambda: gm(*ex.args, **ex.kwargs), repeat, warmup, dev)
        m = error_metrics(dense_mod(*ex.args, **ex.kwargs), gm(*ex.args, **ex.kwargs))
    return {"seq_len": L, "dense_ms": d_ms, "superlinear_ms": s_ms,
            "speedup": d_ms / s_ms if s_ms > 0 else None, "max_abs_err": m["max_abs_err"]}


def need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise NotAvailableError("not available: --plot needs matplotlib (pip install 'slcompile[plot]')")


def write_plot(path: str, rows: List[Dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slcompile.paths import atomic_output

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["seq_len"] for r in rows]
    ax.loglog(xs, [r["dense_ms"] for r in rows], "o-", label="dense (causal SDPA)")
    ax.loglog(xs, [r["superlinear_ms"] for r in rows], "s-", label="superlinear")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("time (ms)")
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format=ext)
    except ValueError as e:
        raise UsageError(f"--plot {path}: {first_line(e)}")
    finally:
        plt.close(fig)
