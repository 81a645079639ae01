"""Block-sparse superlinear attention (search_key="blocksparse", docs/blocksparse.md) against what a
user gets by default: F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) with its
default dispatch, in one run, on one GPU.

Per length: SDPA's time; the block-sparse total (the custom op a model runs: Triton search and
Triton attention) and its parts (search, attended lists, attention; the torch reference search and
FlexAttention on the same selection beside them); the ratio SDPA / total; the attention's useful
TFLOP/s (4 * D * attended (query, key) pairs * Hq / time). Lengths up to --check-max also check the
kernel and the op against the gather-based reference attention on the same selection.

Defaults: SuperlinearConfig.block_sparse()'s geometry (window 256, 4 sinks, topk 24, 64 x 32 blocks).

    python benchmarks/blocksparse.py --lengths 8192 32768 131072 --decode-lengths 131072 \
        --train-lengths 131072 --out benchmarks/data/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from slcompile.kernels import blocksparse as bs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import time_graph  # noqa: E402  (the decode benchmark's CUDA-graph timer)
from meta import commit as measured_commit  # noqa: E402  (benchmarks/meta.py)


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


def profile_ms(fn, calls: int) -> dict:
    """GPU time per call of fn's twelve most expensive kernels (torch.profiler), ms."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    ev = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
    return {e.key[:60]: round(e.device_time_total / 1e3 / calls, 4) for e in ev}


def back_to_back(fn, calls: int = 50, reps: int = 3, host: bool = False) -> float:
    """ms per call of fn called back to back, the best of reps runs: the GPU's time from the first
    launch to the last kernel's end (a token's cost when the host keeps the GPU waiting, as an
    eager decoding loop does); host=True: the host's time for the calls only (no wait)."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        h = (time.perf_counter() - t) * 1e3
        torch.cuda.synchronize()
        best = min(best, h if host else a.elapsed_time(b))
    return best / calls


def launches(fn, calls: int) -> float:
    """GPU kernels (and memsets/copies) launched per call of fn (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_time_total > 0) / calls


def attended_pairs(kept, L, window, sinks, q_block, k_block):
    """(query, key) pairs attended, summed over kv heads (x G for query heads)."""
    return bs.keys_attended(kept, 0, L, L, window=window, sinks=sinks, q_block=q_block,
                            k_block=k_block).sum().item()


def op_call(q, k, v, cfg, scale, summary=None):
    """The custom op as a model's rewritten graph calls it (search + attention)."""
    return torch.ops.superlinear.block_sparse_attention(
        q, k, v, None, None, cfg["window"], cfg["sinks"], cfg["topk"], scale, 0, cfg["q_block"],
        cfg["k_block"], cfg["rows"], cfg["pool"], summary, cfg["exact_rows"], cfg["group"],
        cfg["spread"])


_CONFIGS = {}


def functional_call(q, k, v, cfg, scale, summary=None):
    """The op as superlinear_attention and generate() call it eagerly: without gradients, the
    implementation without the dispatcher (`ops.direct`), the config built once (as a model
    holds it)."""
    from slcompile.kernels import lowering
    from slcompile.kernels.config import SuperlinearConfig
    key = tuple(sorted(cfg.items()))
    if key not in _CONFIGS:
        _CONFIGS[key] = SuperlinearConfig(
            search_key="blocksparse", window=cfg["window"], sinks=cfg["sinks"], topk=cfg["topk"],
            q_block=cfg["q_block"], k_block=cfg["k_block"], block_rows=cfg["rows"],
            block_pool=cfg["pool"], exact_rows=cfg["exact_rows"], block_group=cfg["group"],
            spread_rows=cfg["spread"], dense_below=0)
    with torch.no_grad():
        return lowering.attention(_CONFIGS[key], q, k, v, None, None, scale,
                                  block_summary=summary)


def decode_row(T, a, cfg):
    """One decoded token (the last of T keys): SDPA against the op with the block summaries kept
    with the cache (updated for the new key first, as the cache does) and without them."""
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(1, a.hq, 1, a.d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, a.hkv, T, a.d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, a.hkv, T, a.d, device=dev, dtype=torch.bfloat16)
    scale = a.d ** -0.5
    cache = bs.BlockSummaryCache(bs.summary_keys(a.window, a.k_block, a.group))
    cache.update(k, 0)

    tick = [0]

    def grown():
        """The summaries as a growing cache keeps them: a group's row is written when its last
        key arrives, one token in cache.k_block (the others launch nothing)."""
        tick[0] += 1
        return cache.update(k, T - 1 if tick[0] % cache.k_block == 0 else T)

    def ours():
        return op_call(q, k, v, cfg, scale, grown())

    def direct():  # as generate() runs it: no dispatcher
        return functional_call(q, k, v, cfg, scale, grown())

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    row = dict(T=T, sdpa_eager_ms=timed(sdpa, 20, warm=3), eager_ms=timed(ours, 20, warm=3),
               sdpa_back_to_back_ms=back_to_back(sdpa), back_to_back_ms=back_to_back(ours),
               update_host_ms=back_to_back(lambda: cache.update(k, T - 1), host=True),
               op_host_ms=back_to_back(lambda: op_call(q, k, v, cfg, scale, cache.buf[:, :, :(
                   T + cache.k_block - 1) // cache.k_block]), host=True),
               direct_eager_ms=timed(direct, 20, warm=3),
               direct_back_to_back_ms=back_to_back(direct),
               direct_host_ms=back_to_back(lambda: functional_call(
                   q, k, v, cfg, scale, cache.buf[:, :, :(T + cache.k_block - 1) // cache.k_block]),
                   host=True),
               rebuild_eager_ms=timed(lambda: op_call(q, k, v, cfg, scale), 10, warm=2),
               update_ms=timed(lambda: cache.update(k, T - 1), 20, warm=3))
    row["sdpa_graph_ms"] = time_graph(sdpa)
    row["graph_ms"] = time_graph(ours)
    if a.decode_split_ab:  # the same token with each tile's keys walked by one program
        from slcompile.kernels import triton_blocksparse as tba
        split_out = ours().float()
        tba._MAX_SPLIT, max_split = 1, tba._MAX_SPLIT
        try:
            row.update(unsplit_graph_ms=time_graph(ours),
                       unsplit_direct_eager_ms=timed(direct, 20, warm=3),
                       unsplit_max_diff=(ours().float() - split_out).abs().max().item())
            if a.profile_decode:
                row["unsplit_profile_us_per_token"] = {
                    n: round(ms * 1e3, 1) for n, ms in profile_ms(ours, 10).items()}
        finally:
            tba._MAX_SPLIT = max_split
    if a.decode_general_ab:  # the same token through the general entry points (no plan)
        from slcompile.kernels import blocksparse_decode as bd
        prepared_out = direct().float()
        real = bd.attention
        bd.attention = lambda *args, **kw: None
        try:
            row.update(general_direct_eager_ms=timed(direct, 20, warm=3),
                       general_direct_back_to_back_ms=back_to_back(direct),
                       general_direct_host_ms=back_to_back(lambda: functional_call(
                           q, k, v, cfg, scale,
                           cache.buf[:, :, :(T + cache.k_block - 1) // cache.k_block]), host=True),
                       general_graph_ms=time_graph(ours),
                       general_max_diff=(direct().float() - prepared_out).abs().max().item())
        finally:
            bd.attention = real
        row["general_direct_eager_speedup"] = row["sdpa_eager_ms"] / row["general_direct_eager_ms"]
    if a.decode_attention_ab:  # the token's attention alone, given the search's keys
        from slcompile.kernels import triton_blocksparse as tba
        from slcompile.kernels import triton_blocksparse_search as tss
        summ = cache.buf[:, :, :(T + cache.k_block - 1) // cache.k_block]
        keys = tss.block_select_triton(
            q, k, None, T - 1, window=a.window, sinks=a.sinks, q_block=a.q_block,
            k_block=a.k_block, topk=a.topk, rows=a.rows, pool=a.pool, summary=summ,
            exact_rows=a.exact_rows, group=a.group, spread=a.spread_rows, exact_keys=True)
        _, sb, wb, _ = bs.geometry(T, a.window, a.sinks, a.q_block, a.k_block)
        first = None
        row["attention_ab"] = []
        for kw in json.loads(a.decode_attention_ab):
            def att(kw=kw):
                return tba.block_attention_triton(
                    q, k, v, keys, T - 1, q_block=a.q_block, k_block=a.k_block, scale=scale,
                    sink_blocks=sb, window_blocks=wb, keys_topk=a.topk, **kw)
            out = att().float()
            first = out if first is None else first
            row["attention_ab"].append(dict(kw, graph_us=time_graph(att) * 1e3,
                                            max_diff=(out - first).abs().max().item()))
            print(json.dumps(row["attention_ab"][-1]), flush=True)
    if a.profile_decode:  # where a token's GPU time goes (kernel times, eager calls)
        row["profile_us_per_token"] = {n: round(ms * 1e3, 1)
                                       for n, ms in profile_ms(ours, 10).items()}
        row["launches_per_token"] = launches(ours, 10)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).float()
    row.update(eager_speedup=row["sdpa_eager_ms"] / row["eager_ms"],
               back_to_back_speedup=row["sdpa_back_to_back_ms"] / row["back_to_back_ms"],
               direct_eager_speedup=row["sdpa_eager_ms"] / row["direct_eager_ms"],
               direct_back_to_back_speedup=(row["sdpa_back_to_back_ms"]
                                            / row["direct_back_to_back_ms"]),
               graph_speedup=row["sdpa_graph_ms"] / row["graph_ms"],
               rebuild_speedup=row["sdpa_eager_ms"] / row["rebuild_eager_ms"],
               max_diff_vs_dense=(ours().float() - ref).abs().max().item())
    print(json.dumps(dict(decode=row)), flush=True)
    del q, k, v, cache
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 32768, 131072])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--topk", type=int, default=24)
    ap.add_argument("--q-block", type=int, default=64)
    ap.add_argument("--k-block", type=int, default=32)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--exact-rows", type=int, default=16, help="stage 2's rows (0: --rows)")
    ap.add_argument("--group", type=int, default=8, help="key blocks per stage-1 group")
    ap.add_argument("--spread-rows", action="store_true",
                    help="representative rows spread over the query block (default: its last rows)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--check-max", type=int, default=16384)
    ap.add_argument("--reference-max", type=int, default=131072,
                    help="longest length at which the torch reference search is timed")
    ap.add_argument("--flex-max", type=int, default=524288,
                    help="longest length at which FlexAttention is timed (its index rows: 2 x "
                         "Hq x (L/QB) x (L/KB) x 4 bytes)")
    ap.add_argument("--sdpa-max", type=int, default=1 << 40,
                    help="longest length at which SDPA is timed (past it: no ratios, our times only)")
    ap.add_argument("--tune", default="[]",
                    help="JSON list of keyword sets for the Triton attention, timed at --tune-L")
    ap.add_argument("--tune-L", type=int, default=131072)
    ap.add_argument("--train-lengths", type=int, nargs="*", default=[],
                    help="also time forward+backward (the op's backward against SDPA's)")
    ap.add_argument("--decode-lengths", type=int, nargs="*", default=[],
                    help="also time one decoded token against a cache of this many keys (eager and "
                         "CUDA graphs; block summaries kept with the cache)")
    ap.add_argument("--profile-decode", action="store_true",
                    help="kernel times of a decoded token (torch.profiler)")
    ap.add_argument("--decode-general-ab", action="store_true",
                    help="also time the decoded token through the general entry points (without "
                         "kernels/blocksparse_decode.py's prepared launches), in the same process")
    ap.add_argument("--decode-split-ab", action="store_true",
                    help="also time the decoded token with one program a tile (no split of its "
                         "key blocks)")
    ap.add_argument("--decode-attention-ab", default=None,
                    help="JSON list of keyword sets (heads, split) for the decoded token's "
                         "attention alone, given the search's keys, timed in a CUDA graph")
    ap.add_argument("--profile-search", action="store_true",
                    help="kernel times of one prefill search (torch.profiler)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from slcompile.kernels import triton_blocksparse as tba
    from slcompile.kernels import triton_blocksparse_search as tss

    dev = "cuda"
    rows = []
    commit = measured_commit()
    cfg = dict(window=a.window, sinks=a.sinks, topk=a.topk, q_block=a.q_block, k_block=a.k_block,
               rows=a.rows, pool=a.pool, exact_rows=a.exact_rows, group=a.group,
               spread=a.spread_rows)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, commit=commit,
                date=time.strftime("%Y-%m-%d"), hq=a.hq, hkv=a.hkv, d=a.d, dtype="bfloat16", B=1,
                **cfg)
    print(json.dumps(meta), flush=True)
    tune = json.loads(a.tune)
    for L in a.lengths:
        torch.manual_seed(0)
        q = torch.randn(1, a.hq, L, a.d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, a.hkv, L, a.d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, a.hkv, L, a.d, device=dev, dtype=torch.bfloat16)
        scale = a.d ** -0.5
        reps = a.reps if L <= 600_000 else max(1, a.reps - 1)
        row = dict(L=L)
        if L <= a.sdpa_max:
            row["sdpa_ms"] = timed(lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True), reps)
        kw = dict(window=a.window, sinks=a.sinks, q_block=a.q_block, k_block=a.k_block)
        skw = dict(kw, topk=a.topk, rows=a.rows, pool=a.pool, exact_rows=a.exact_rows,
                   group=a.group, spread=a.spread_rows)
        sel = lambda: tss.block_select_triton(q, k, None, 0, **skw)  # noqa: E731
        kept = sel()
        row["search_ms"] = timed(sel, reps)
        if a.profile_search:
            row["search_profile_ms"] = profile_ms(sel, 1)
        if L <= a.reference_max:
            ref_kept = bs.block_select(q, k, None, 0, **skw)
            row["search_reference_ms"] = timed(lambda: bs.block_select(q, k, None, 0, **skw), 1)
            row["kept_agreement"] = (kept == ref_kept).float().mean().item()
            del ref_kept
        _, sb, wb, _ = bs.geometry(L, a.window, a.sinks, a.q_block, a.k_block)
        att = lambda **t: tba.block_attention_triton(  # noqa: E731 (as the op calls it)
            q, k, v, kept, 0, q_block=a.q_block, k_block=a.k_block, scale=scale, sink_blocks=sb,
            window_blocks=wb, **t)
        row["attention_ms"] = timed(att, reps, warm=2)
        if L == a.tune_L:
            row["tune"] = []
            for t in tune:
                try:
                    row["tune"].append(dict(t, ms=timed(lambda: att(**t), reps, warm=2)))
                except Exception as e:  # a setting that does not compile or fit
                    row["tune"].append(dict(t, error=repr(e)[:200]))
                print(json.dumps(row["tune"][-1]), flush=True)
        if L <= a.flex_max:
            try:
                bm = bs.flex_block_mask(kept, L, Hq=a.hq, **kw)
                flex = bs._flex_fn(True)
                ko = bs.flex_kernel_options(a.q_block, a.k_block)
                row["flex_mask_ms"] = timed(lambda: bs.flex_block_mask(kept, L, Hq=a.hq, **kw),
                                            reps)
                row["flex_attention_ms"] = timed(lambda: flex(
                    q, k, v, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=ko),
                    reps, warm=2)
                del bm
            except torch.OutOfMemoryError as e:
                row["flex_error"] = repr(e)[:120]
            torch.cuda.empty_cache()
        row["total_ms"] = timed(lambda: op_call(q, k, v, cfg, scale), reps)
        pairs = attended_pairs(kept, L, **kw) * (a.hq // a.hkv)
        dense_pairs = L * (L + 1) // 2 * a.hq
        if "sdpa_ms" in row:
            row.update(speedup=row["sdpa_ms"] / row["total_ms"],
                       attention_speedup=row["sdpa_ms"] / row["attention_ms"],
                       sdpa_tflops=4 * a.d * dense_pairs / (row["sdpa_ms"] * 1e-3) / 1e12)
        row.update(useful_tflops=4 * a.d * pairs / (row["attention_ms"] * 1e-3) / 1e12,
                   keys_per_query=pairs / (L * a.hq), key_fraction=pairs / dense_pairs,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30)
        if L <= a.check_max:
            ref = bs.block_attention(q, k, v, kept, None, 0, scale=scale, **kw).float()
            row["max_err_vs_reference"] = (att().float() - ref).abs().max().item()
            row["op_max_err_vs_reference"] = (op_call(q, k, v, cfg, scale).float()
                                              - ref).abs().max().item()
        rows.append(row)
        print(json.dumps(row), flush=True)
        del kept, q, k, v
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    decode = [decode_row(T, a, cfg) for T in a.decode_lengths]
    train = []
    for L in a.train_lengths:
        torch.manual_seed(0)
        leaves = [torch.randn(1, h, L, a.d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                  for h in (a.hq, a.hkv, a.hkv)]
        g = torch.randn(1, a.hq, L, a.d, device=dev, dtype=torch.bfloat16)
        scale = a.d ** -0.5

        def step(fn):
            out = fn(*leaves)
            torch.autograd.grad(out, leaves, g)

        row = dict(L=L)
        row["sdpa_fwd_bwd_ms"] = timed(lambda: step(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True)), a.reps)
        try:
            row["fwd_bwd_ms"] = timed(lambda: step(lambda q, k, v: op_call(q, k, v, cfg, scale)),
                                      a.reps)
            row["speedup"] = row["sdpa_fwd_bwd_ms"] / row["fwd_bwd_ms"]
        except Exception as e:  # reported, not hidden: the row says what failed
            row["error"] = repr(e)[-300:]
        train.append(row)
        print(json.dumps(dict(train=row)), flush=True)
        del leaves, g
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows, train=train, decode=decode), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
