"""Sequence-parallel superlinear attention (kernels/distributed.py) on CPU: gloo, 2 processes (and a
group of 3 for the multi-owner exchange).

One fork per group size runs all of its cases (process start-up dominates on a small CPU); each
rank saves its outputs and byte counts, and the tests compare them here against single-device
``slcompile.superlinear_attention`` over the whole sequence, and the byte counts against the rows a
brute-force walk over the single-device selection says must move."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import slcompile
from slcompile.kernels import reference as R
from slcompile.kernels.config import SuperlinearConfig
from slcompile.kernels.distributed import sequence_parallel_superlinear_attention
from slcompile.kernels.geometry import span_extents, stripe_deltas, num_stripes

WORLD = 2  # processes of most cases; a case with "world": 3 runs in a second group of 3

# name -> shapes, config, options. T = world * C.
CASES = {
    "union_gqa": dict(B=1, Hq=4, Hkv=2, C=80, D=8, block=16,
                      cfg=dict(search_key="anchor", window=8, sinks=2, topk=2, dense_below=0)),
    "union_gqa_all_gather": dict(B=1, Hq=4, Hkv=2, C=80, D=8, block=16, comm="all_gather", seed_of="union_gqa",
                                 cfg=dict(search_key="anchor", window=8, sinks=2, topk=2, dense_below=0)),
    "gated_mask_search_query": dict(B=2, Hq=4, Hkv=1, C=72, D=8, Dv=6, block=32, mask=True, sq=True, scale=0.3,
                                    cfg=dict(search_key="anchor", window=5, sinks=3, topk=3, combine="gated",
                                             dense_below=0)),
    "union_topk1_forward": dict(B=1, Hq=2, Hkv=2, C=64, D=8, block=8,
                                cfg=dict(search_key="anchor", window=12, sinks=0, topk=1, forward_factor=1.0,
                                         span_power=0.4, dense_below=0)),
    "gated_topk4_mean": dict(B=1, Hq=4, Hkv=2, C=60, D=8, block=16, mask=True,
                             cfg=dict(window=7, sinks=1, topk=4, combine="gated", search_key="mean",
                                      dense_below=0)),
    "union_mean": dict(B=1, Hq=2, Hkv=1, C=100, D=8, block=16,
                       cfg=dict(window=16, sinks=4, topk=3, search_key="mean", dense_below=0)),
    "blocksparse": dict(B=1, Hq=4, Hkv=2, C=160, D=8, block=16, mask=True,
                        cfg=dict(search_key="blocksparse", window=32, sinks=4, topk=3, q_block=32,
                                 k_block=16, block_rows=4, block_pool=2, dense_below=0)),
    "dense_below": dict(B=1, Hq=2, Hkv=1, C=40, D=8, block=16, mask=True,
                        cfg=dict(search_key="anchor", window=8)),
    "window_covers_all": dict(B=1, Hq=2, Hkv=2, C=40, D=8, block=16,
                              cfg=dict(search_key="anchor", window=1000, dense_below=0)),
    # long enough that the selection is sparse; structured so that every query routes to one region
    "bytes_selective": dict(B=1, Hq=2, Hkv=1, C=1024, D=8, block=32, hot=(300, 420),
                            cfg=dict(search_key="anchor", window=16, sinks=2, topk=1, dense_below=0)),
    "bytes_all_gather": dict(B=1, Hq=2, Hkv=1, C=1024, D=8, block=32, hot=(300, 420), comm="all_gather",
                             seed_of="bytes_selective",
                             cfg=dict(search_key="anchor", window=16, sinks=2, topk=1, dense_below=0)),
    # three ranks: the last one fetches from two owners at once
    "three_union_gqa": dict(world=3, B=1, Hq=4, Hkv=2, C=64, D=8, block=16,
                            cfg=dict(search_key="anchor", window=8, sinks=2, topk=2, dense_below=0)),
    "three_gated_mean_mask": dict(world=3, B=2, Hq=2, Hkv=1, C=48, D=8, block=32, mask=True,
                                  cfg=dict(window=6, sinks=1, topk=3, combine="gated", search_key="mean",
                                           dense_below=0)),
    "three_blocksparse": dict(world=3, B=2, Hq=2, Hkv=1, C=96, D=8, block=16, comm="all_gather",
                              cfg=dict(search_key="blocksparse", window=16, sinks=0, topk=2,
                                       q_block=32, k_block=16, block_rows=8, block_pool=4,
                                       dense_below=0)),
    # zigzag: rank r holds chunks r and 2P-1-r of C/2 (balanced work)
    "zigzag_blocksparse": dict(B=1, Hq=4, Hkv=2, C=256, D=8, block=16, mask=True, layout="zigzag",
                               cfg=dict(search_key="blocksparse", window=32, sinks=4, topk=2,
                                        q_block=32, k_block=16, block_rows=4, block_pool=2,
                                        dense_below=0)),
    "zigzag_anchor_gated": dict(B=2, Hq=4, Hkv=1, C=70, D=8, block=16, sq=True, layout="zigzag",
                                cfg=dict(search_key="anchor", window=6, sinks=2, topk=2,
                                         combine="gated", dense_below=0)),
    # (the default comm, selective: C/2 = 96 cuts the stage-1 groups of 64 keys, so every
    # earlier K and V moves; "zigzag_blocksparse" likewise, for its padding mask)
    "three_zigzag_blocksparse": dict(world=3, B=1, Hq=2, Hkv=1, C=192, D=8, block=16,
                                     layout="zigzag",
                                     cfg=dict(search_key="blocksparse", window=64, sinks=0,
                                              topk=2, q_block=32, k_block=16, block_rows=4,
                                              block_pool=2, block_group=4, dense_below=0)),
    # zigzag, selective (the default there for the block-sparse search): the group summaries,
    # then K of stage 1's candidate groups and K/V of the kept blocks, window and sinks, fetched
    # from the owners of the zigzag chunks; queries route to one region of chunk 1 (rank 1)
    "zigzag_bsp_selective": dict(B=1, Hq=4, Hkv=2, C=512, D=8, block=16, hot=(300, 420),
                                 layout="zigzag",
                                 cfg=dict(search_key="blocksparse", window=32, sinks=4, topk=2,
                                          q_block=32, k_block=16, block_rows=4, block_pool=2,
                                          dense_below=0)),
    "zigzag_bsp_all_gather": dict(B=1, Hq=4, Hkv=2, C=512, D=8, block=16, hot=(300, 420),
                                  layout="zigzag", comm="all_gather", seed_of="zigzag_bsp_selective",
                                  cfg=dict(search_key="blocksparse", window=32, sinks=4, topk=2,
                                           q_block=32, k_block=16, block_rows=4, block_pool=2,
                                           dense_below=0)),
    # transfer blocks of 24 rows: one straddles the owner's two pieces, the last is padded
    "zigzag_bsp_odd_block": dict(B=1, Hq=2, Hkv=1, C=128, D=8, block=24, layout="zigzag",
                                 cfg=dict(search_key="blocksparse", window=32, sinks=4, topk=2,
                                          q_block=32, k_block=16, block_rows=4, block_pool=2,
                                          dense_below=0)),
    "three_zigzag_bsp_selective": dict(world=3, B=2, Hq=2, Hkv=1, C=256, D=8, block=32,
                                       layout="zigzag",
                                       cfg=dict(search_key="blocksparse", window=64, sinks=2,
                                                topk=3, q_block=32, k_block=16, block_rows=4,
                                                block_pool=2, block_group=4, exact_rows=8,
                                                dense_below=0)),
    # the default's selective path: stage 1 reads gathered group summaries, then K of its
    # candidate groups and K/V of the kept blocks, window and sinks move (no padding mask; C a
    # multiple of the stage-1 group, 2 blocks of 16 keys here)
    "bsp_selective": dict(B=2, Hq=4, Hkv=2, C=512, D=8, block=16, hot=(300, 420),
                          cfg=dict(search_key="blocksparse", window=32, sinks=4, topk=2,
                                   q_block=32, k_block=16, block_rows=4, block_pool=2,
                                   dense_below=0)),
    "bsp_selective_all_gather": dict(B=2, Hq=4, Hkv=2, C=512, D=8, block=16, hot=(300, 420),
                                     comm="all_gather", seed_of="bsp_selective",
                                     cfg=dict(search_key="blocksparse", window=32, sinks=4,
                                              topk=2, q_block=32, k_block=16, block_rows=4,
                                              block_pool=2, dense_below=0)),
    "three_bsp_selective": dict(world=3, B=1, Hq=2, Hkv=1, C=256, D=8, block=32,
                                cfg=dict(search_key="blocksparse", window=64, sinks=0, topk=3,
                                         q_block=32, k_block=16, block_rows=4, block_pool=2,
                                         block_group=4, exact_rows=8, dense_below=0)),
    # bsp_selective with a third rank (T 1024 -> 1536): the last rank's buffers follow its
    # selection, not the length
    "three_bsp_longer": dict(world=3, B=2, Hq=4, Hkv=2, C=512, D=8, block=16, hot=(300, 420),
                             seed_of="bsp_selective",
                             cfg=dict(search_key="blocksparse", window=32, sinks=4, topk=2,
                                      q_block=32, k_block=16, block_rows=4, block_pool=2,
                                      dense_below=0)),
    "three_bytes": dict(world=3, B=1, Hq=2, Hkv=1, C=512, D=8, block=32, hot=(300, 420),
                        cfg=dict(search_key="anchor", window=16, sinks=2, topk=1, dense_below=0)),
}


def _world(name):
    return CASES[name].get("world", WORLD)


def _inputs(name):
    """Whole-sequence inputs of a case, from a seed of its name (every process makes the same)."""
    c = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, c.get("seed_of", name))))
    B, Hq, Hkv, D, Dv = c["B"], c["Hq"], c["Hkv"], c["D"], c.get("Dv", c["D"])
    T = _world(name) * c["C"]
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, Dv, generator=g)
    if "hot" in c:  # queries share a direction that only the keys of one region carry
        u = torch.randn(D, generator=g)
        u = u / u.norm()
        q = 0.3 * q + 3.0 * u
        k = 0.3 * k
        k[:, :, c["hot"][0]:c["hot"][1]] += 3.0 * u
    qs = torch.randn(B, Hq, T, D, generator=g) if c.get("sq") else None
    mask = (torch.rand(B, T, generator=g) > 0.2) if c.get("mask") else None
    return q, k, v, qs, mask


def _local(x, name, rank, dim=2):
    """The rows of x that ``rank`` holds in its case's layout (None stays None)."""
    if x is None:
        return None
    c, P = CASES[name], _world(name)
    C = c["C"]
    if c.get("layout", "contiguous") == "contiguous":
        return x.narrow(dim, rank * C, C)
    h = C // 2
    return torch.cat([x.narrow(dim, rank * h, h), x.narrow(dim, (2 * P - 1 - rank) * h, h)], dim)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expect_error(fn):
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    res = {}
    for name, c in CASES.items():
        if _world(name) != world:
            continue
        q, k, v, qs, mask = _inputs(name)
        out, st = sequence_parallel_superlinear_attention(
            _local(q, name, rank), _local(k, name, rank), _local(v, name, rank),
            config=SuperlinearConfig(**c["cfg"]), search_query_local=_local(qs, name, rank),
            key_padding_mask_local=_local(mask, name, rank, 1), scale=c.get("scale"),
            comm=c.get("comm"), block=c["block"], return_stats=True,
            layout=c.get("layout", "contiguous"))
        res[name] = dict(out=out, sent=st.sent, received=st.received, k_blocks=st.k_blocks,
                         v_blocks=st.v_blocks, held_rows=st.held_rows)
    if world != WORLD:
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()
        return
    # invalid inputs: every rank raises, none hangs
    q, k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
    qo, ko, vo = (torch.randn(1, 2, 9, 4), torch.randn(1, 1, 9, 4), torch.randn(1, 1, 9, 4)) if rank == 1 else (q, k, v)
    res["err_unequal"] = _expect_error(lambda: sequence_parallel_superlinear_attention(qo, ko, vo))
    bad = torch.ones(1, 8, dtype=torch.int64) if rank == 0 else torch.ones(1, 8, dtype=torch.bool)
    res["err_mask"] = _expect_error(lambda: sequence_parallel_superlinear_attention(q, k, v, key_padding_mask_local=bad))
    res["err_heads"] = _expect_error(lambda: sequence_parallel_superlinear_attention(q, torch.randn(1, 3, 8, 4), torch.randn(1, 3, 8, 4)))
    qg = q.clone().requires_grad_(rank == 1)
    res["err_grad"] = _expect_error(lambda: sequence_parallel_superlinear_attention(qg, k, v))
    with torch.no_grad():
        res["ok_no_grad"] = sequence_parallel_superlinear_attention(
            qg, k, v, config=SuperlinearConfig(search_key="anchor", dense_below=0, window=2))
    res["err_comm"] = _expect_error(lambda: sequence_parallel_superlinear_attention(q, k, v, comm="ring"))
    res["err_layout"] = _expect_error(lambda: sequence_parallel_superlinear_attention(q, k, v, layout="ring"))
    res["err_zigzag_comm"] = _expect_error(lambda: sequence_parallel_superlinear_attention(
        q, k, v, layout="zigzag", comm="selective", config=SuperlinearConfig(search_key="anchor")))
    res["err_zigzag_blocks"] = _expect_error(lambda: sequence_parallel_superlinear_attention(
        q, k, v, layout="zigzag", config=SuperlinearConfig(dense_below=0)))  # C/2 = 4 < q_block
    res["err_bsp_split"] = _expect_error(lambda: sequence_parallel_superlinear_attention(
        q, k, v, config=SuperlinearConfig(dense_below=0)))  # C = 8: cuts a query block of 64
    res["ok_after_errors"] = sequence_parallel_superlinear_attention(
        q, k, v, config=SuperlinearConfig(search_key="anchor", dense_below=0, window=2))
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_thread():
    """The CPU reference on these tiny shapes is many times slower with 2 threads on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _single_device(name):
    c = CASES[name]
    q, k, v, qs, mask = _inputs(name)
    return slcompile.superlinear_attention(q, k, v, config=SuperlinearConfig(**c["cfg"]), enable_gqa=True,
                                           key_padding_mask=mask, search_query=qs, scale=c.get("scale"))


def _run(tmp_path_factory, world):
    """Run the cases of a world size once in that many processes; [rank] -> {case: outputs and
    byte counts}.

    The processes are forked after one call of the ops here: a spawned process would import torch
    and, on its first custom-op call, torch._dynamo again (40+ s on a busy 2-core machine). Each
    worker is single-threaded."""
    _single_device("window_covers_all")
    outdir = str(tmp_path_factory.mktemp(f"dist{world}"))
    mp.start_processes(_worker, args=(world, _free_port(), outdir), nprocs=world, join=True,
                       start_method="fork")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    return _run(tmp_path_factory, WORLD)


@pytest.fixture(scope="module")
def runs3(tmp_path_factory, one_thread):
    return _run(tmp_path_factory, 3)


@pytest.mark.parametrize("name", list(CASES))
def test_equals_single_device(request, one_thread, name):
    world = _world(name)
    res = request.getfixturevalue("runs" if world == WORLD else "runs3")
    ref = _single_device(name)
    for r in range(world):
        out, want = res[r][name]["out"], _local(ref, name, r)
        assert out.shape == want.shape
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)


def _oracle_blocks(name, rank):
    """From the single-device selection, brute force: the (kv head, block) pairs of earlier ranks
    that rank's queries read, for the search (anchor keys) and for attention (spans, window,
    sinks). Returns (search blocks, attention blocks) as sets of (b, h, position // block)."""
    c = CASES[name]
    cfg = SuperlinearConfig(**c["cfg"])
    q, k, v, qs, mask = _inputs(name)
    B, Hq, Hkv, C, blk = c["B"], c["Hq"], c["Hkv"], c["C"], c["block"]
    T, L = _world(name) * C, rank * C
    assert C % blk == 0
    anchors, _ = R.span_search(q, k, mask, None, cfg.window, cfg.topk, cfg.search_power, cfg.span_power,
                               cfg.backward_factor, cfg.forward_factor, cfg.search_key, cfg.dense_below)
    back, fwd = span_extents(T, cfg.span_power, cfg.backward_factor, cfg.forward_factor)
    deltas = stripe_deltas(num_stripes(T, cfg.search_power), cfg.search_power).tolist()
    W, S = cfg.window, cfg.sinks
    search, attend = set(), set()
    g = Hq // Hkv
    for t in range(L, L + C):
        for d in deltas:
            if d >= W and 0 <= t - d < L:
                search |= {(b, h, (t - d) // blk) for b in range(B) for h in range(Hkv)}
        keys = set(range(min(S, t + 1))) | set(range(max(0, t - W + 1), t + 1))
        for b in range(B):
            for hq in range(Hq):
                pos = set(keys)
                for a in anchors[b, hq, t].tolist():
                    if a >= 0:
                        pos |= set(range(max(0, a - int(back[t])), min(a + int(fwd[t]), t - W) + 1))
                attend |= {(b, hq // g, p // blk) for p in pos if p < L}
    return search, attend


def test_bytes_match_the_selection_and_beat_all_gather(runs, one_thread):
    name = "bytes_selective"
    c = CASES[name]
    row = c["block"] * c["D"] * 4  # float32 rows of one block
    for r in range(WORLD):
        search, attend = _oracle_blocks(name, r)
        got = runs[r][name]
        assert got["k_blocks"] == len(search | attend)
        assert got["v_blocks"] == len(attend)
        assert got["received"]["k"] == row * len(search | attend)
        assert got["received"]["v"] == row * len(attend)
        assert got["sent"]["index"] == 8 * (len(search | attend) + len(attend))
    assert runs[1][name]["received"]["index"] == 0  # nobody asks for blocks of a later rank
    assert runs[0][name]["sent"]["index"] == 0 and runs[0][name]["received"]["k"] == 0
    # rank 0 serves rank 1: what one sends, the other receives
    for cat in ("k", "v", "index", "count", "meta"):
        assert runs[0][name]["sent"][cat] == runs[1][name]["received"][cat]
    # rank 1 needs every key of rank 0 for the search (C is far larger than the stripe gaps), but
    # the values of only a few blocks: the one region every query routes to, the window, the sinks
    search, attend = _oracle_blocks(name, 1)
    assert len(search) == c["C"] // c["block"]
    assert len(attend) < len(search) // 2
    base = [runs[r]["bytes_all_gather"] for r in range(WORLD)]
    sel = [runs[r][name] for r in range(WORLD)]
    for r in range(WORLD):
        assert base[r]["received"]["k"] == base[r]["received"]["v"] == c["C"] * c["D"] * 4
        assert sum(sel[r]["received"].values()) < sum(base[r]["received"].values())
        assert sum(sel[r]["sent"].values()) < sum(base[r]["sent"].values())


def test_bytes_random_inputs_causal_saving(runs, one_thread):
    """Random routing reads most earlier blocks, yet rank 0 receives nothing but metadata and the
    group moves less than the all-gather baseline; the counts match the selection."""
    sel = [runs[r]["union_gqa"] for r in range(WORLD)]
    base = [runs[r]["union_gqa_all_gather"] for r in range(WORLD)]
    assert set(sel[0]["received"]) - {"meta", "count", "index", "k", "v"} == set()
    assert sel[0]["received"]["k"] == sel[0]["received"]["v"] == 0
    total_sel = sum(sum(s["received"].values()) for s in sel)
    total_base = sum(sum(s["received"].values()) for s in base)
    assert total_sel < total_base
    c = CASES["union_gqa"]
    search, attend = _oracle_blocks("union_gqa", 1)
    row = c["block"] * c["D"] * 4
    assert sel[1]["received"]["k"] == row * len(search | attend)
    assert sel[1]["received"]["v"] == row * len(attend)


def test_invalid_inputs_raise_on_every_rank(runs):
    for r in range(WORLD):
        assert "equal contiguous chunk" in runs[r]["err_unequal"]
        assert runs[r]["err_unequal"].startswith("ValueError")
        assert "not a multiple of key/value heads" in runs[r]["err_heads"]
        assert "comm='ring'" in runs[r]["err_comm"]
        assert "layout='ring'" in runs[r]["err_layout"]
        assert runs[r]["err_zigzag_comm"].startswith("ValueError")
        assert "layout='zigzag' with comm='selective' needs search_key='blocksparse'" in \
            runs[r]["err_zigzag_comm"]
        assert "search_key='anchor' with zigzag takes comm='all_gather'" in runs[r]["err_zigzag_comm"]
        assert "multiple of q_block=64" in runs[r]["err_zigzag_blocks"]
        assert "C = 8 to be a multiple of q_block=64" in runs[r]["err_bsp_split"]
    assert "rank 0: key_padding_mask_local must be a bool tensor" in runs[0]["err_mask"]
    assert "rank(s) [0]" in runs[1]["err_mask"]
    assert "rank 1: gradients do not flow across ranks" in runs[1]["err_grad"]
    assert "rank(s) [1]" in runs[0]["err_grad"]
    assert runs[1]["ok_no_grad"].shape == (1, 2, 8, 4)
    # the group is still usable afterwards
    for r in range(WORLD):
        assert runs[r]["ok_after_errors"].shape == (1, 2, 8, 4)


def test_local_argument_errors_before_any_collective():
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="search_query_local is not supported"):
        sequence_parallel_superlinear_attention(q, q, q, config=SuperlinearConfig.block_sparse(),
                                                search_query_local=q)
    with pytest.raises(ValueError, match="steps=3"):
        sequence_parallel_superlinear_attention(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4),
                                                torch.randn(1, 1, 4, 4), config=SuperlinearConfig(steps=3))
    with pytest.raises(ValueError, match="scale must be"):
        sequence_parallel_superlinear_attention(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4),
                                                torch.randn(1, 1, 4, 4), scale=-1.0)


def test_needs_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("another test left a default process group initialised in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        sequence_parallel_superlinear_attention(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4),
                                                torch.randn(1, 1, 4, 4))


def test_bytes_three_ranks_match_the_selection(runs3, one_thread):
    """Rank 2 fetches from two owners in one exchange; every rank's counts match the selection,
    and what each owner serves adds up to what the others receive."""
    name = "three_bytes"
    c = CASES[name]
    row = c["block"] * c["D"] * 4
    for r in range(3):
        search, attend = _oracle_blocks(name, r)
        got = runs3[r][name]
        assert got["received"]["k"] == row * len(search | attend)
        assert got["received"]["v"] == row * len(attend)
        assert got["sent"]["index"] == 8 * (len(search | attend) + len(attend))
        if r == 2:  # blocks from both earlier ranks
            assert {blk * c["block"] // c["C"] for (_, _, blk) in attend} == {0, 1}
    for cat in ("k", "v", "index"):
        assert sum(runs3[r][name]["sent"][cat] for r in range(3)) == \
            sum(runs3[r][name]["received"][cat] for r in range(3))
    assert runs3[2][name]["received"]["v"] < 2 * c["C"] * c["D"] * 4  # less than all earlier V


def _oracle_bsp_blocks(name, rank):
    """From the contract's brute force over the whole sequence (tests/oracle.py): the (batch row,
    kv head, transfer block) triples of earlier ranks that rank's queries read, for stage 2 (the
    key blocks of stage 1's kept groups) and for attention (kept blocks, window, sinks)."""
    from oracle import oracle_blocksparse
    from slcompile.kernels.blocksparse import stage1_group
    c = CASES[name]
    cfg = SuperlinearConfig(**c["cfg"])
    q, k, v, _, _ = _inputs(name)
    C, blk = c["C"], c["block"]
    T, L = _world(name) * C, rank * C
    qb, kb = cfg.q_block, cfg.k_block
    F = stage1_group(cfg.window, kb, cfg.block_group)
    kept, scores, _ = oracle_blocksparse(
        q, k, v, None, 0, window=cfg.window, sinks=cfg.sinks, topk=cfg.topk, qb=qb, kb=kb,
        scale=1.0, r2=cfg.exact_rows, F=F, R=cfg.block_rows, P=cfg.block_pool)
    sb, wb = math.ceil(cfg.sinks / kb), math.ceil(min(cfg.window, T) / kb)
    search, attend = set(), set()
    for (b, h, j), blocks in kept.items():
        if not L <= j * qb < L + C:
            continue
        groups = [g for _, g in scores[(b, h, j)][0][:math.ceil(cfg.block_pool * cfg.topk / F)]]
        search |= {(b, h, p // blk) for g in groups for p in range(g * F * kb, (g + 1) * F * kb)
                   if p < L}
        before = j * qb // kb
        full = set(range(min(sb, before))) | set(range(max(sb, before - wb), before)) | blocks
        attend |= {(b, h, p // blk) for i in full for p in range(i * kb, (i + 1) * kb) if p < L}
    return search, attend


@pytest.mark.parametrize("name,world", [("bsp_selective", WORLD), ("three_bsp_selective", 3)])
def test_blocksparse_selective_bytes_match_the_selection(request, one_thread, name, world):
    """The default's traffic: every rank receives the earlier group summaries, K of the blocks
    stage 2 reads and K/V of the blocks attention reads, exactly as the contract's brute force
    selects them over the whole sequence, and (with routing that concentrates) less than the
    all-gather baseline."""
    res = request.getfixturevalue("runs" if world == WORLD else "runs3")
    c = CASES[name]
    cfg = SuperlinearConfig(**c["cfg"])
    from slcompile.kernels.blocksparse import summary_keys
    row = c["block"] * c["D"] * 4
    summ = c["B"] * c["Hkv"] * (c["C"] // summary_keys(cfg.window, cfg.k_block, cfg.block_group)) \
        * 2 * c["D"] * 4
    for r in range(world):
        search, attend = _oracle_bsp_blocks(name, r)
        got = res[r][name]
        assert got["received"]["summary"] == (world - 1) * summ
        assert got["received"]["k"] == row * len(search | attend)
        assert got["received"]["v"] == row * len(attend)
        assert got["k_blocks"] == len(search | attend) and got["v_blocks"] == len(attend)
    assert res[0][name]["received"]["k"] == res[0][name]["received"]["v"] == 0
    for cat in ("k", "v", "index", "summary"):
        assert sum(res[r][name]["sent"][cat] for r in range(world)) == \
            sum(res[r][name]["received"][cat] for r in range(world))
    if name == "bsp_selective":  # queries route to one region: a fraction of rank 0's chunk moves
        base = res[1]["bsp_selective_all_gather"]["received"]
        got = res[1][name]["received"]
        assert got["v"] < base["v"] // 2 and got["k"] < base["k"]
        assert sum(got.values()) < sum(base.values())


def _zigzag_owner_block(name, p):
    """(owner rank, transfer block of its zigzag chunk) of sequence position p: chunk p // h is
    held by rank chunk if chunk < P, else by rank 2P-1-chunk as its second piece."""
    c, P = CASES[name], _world(name)
    h = c["C"] // 2
    chunk = p // h
    if chunk < P:
        return chunk, (p % h) // c["block"]
    return 2 * P - 1 - chunk, (h + p % h) // c["block"]


_ORACLE = {}


def _oracle_zigzag_bsp_blocks(name, rank):
    """As `_oracle_bsp_blocks`, for the zigzag layout: from the contract's brute force over the
    whole sequence, the (batch row, kv head, owner, owner's transfer block) of other ranks' rows
    that the queries of rank's two pieces read, for stage 2 (the key blocks of stage 1's kept
    groups) and for attention (kept blocks, window, sinks)."""
    from oracle import oracle_blocksparse
    from slcompile.kernels.blocksparse import stage1_group
    c = CASES[name]
    cfg = SuperlinearConfig(**c["cfg"])
    P, h = _world(name), c["C"] // 2
    T = P * c["C"]
    qb, kb = cfg.q_block, cfg.k_block
    F = stage1_group(cfg.window, kb, cfg.block_group)
    if name not in _ORACLE:
        q, k, v, _, _ = _inputs(name)
        _ORACLE[name] = oracle_blocksparse(
            q, k, v, None, 0, window=cfg.window, sinks=cfg.sinks, topk=cfg.topk, qb=qb, kb=kb,
            scale=1.0, r2=cfg.exact_rows, F=F, R=cfg.block_rows, P=cfg.block_pool)[:2]
    kept, scores = _ORACLE[name]
    sb, wb = math.ceil(cfg.sinks / kb), math.ceil(min(cfg.window, T) / kb)
    mine = {rank, 2 * P - 1 - rank}

    def others(b, hh, positions):
        return {(b, hh) + _zigzag_owner_block(name, p) for p in positions if p // h not in mine}

    search, attend = set(), set()
    for (b, hh, j), blocks in kept.items():
        if j * qb // h not in mine:
            continue
        groups = [g for _, g in scores[(b, hh, j)][0][:math.ceil(cfg.block_pool * cfg.topk / F)]]
        search |= others(b, hh, (p for g in groups for p in range(g * F * kb, (g + 1) * F * kb)))
        before = j * qb // kb
        full = set(range(min(sb, before))) | set(range(max(sb, before - wb), before)) | blocks
        attend |= others(b, hh, (p for i in full for p in range(i * kb, (i + 1) * kb)))
    return search, attend


@pytest.mark.parametrize("name,world", [("zigzag_bsp_selective", WORLD),
                                        ("zigzag_bsp_odd_block", WORLD),
                                        ("three_zigzag_bsp_selective", 3)])
def test_zigzag_selective_bytes_match_the_selection(request, one_thread, name, world):
    """Selective zigzag: every rank receives the group summaries of the other ranks' chunks, K of
    the blocks stage 2 reads and K/V of the blocks attention reads for both of its pieces, from
    the owners of the zigzag chunks, exactly as the contract's brute force selects them over the
    whole sequence; what the owners serve adds up to what the others receive."""
    res = request.getfixturevalue("runs" if world == WORLD else "runs3")
    c = CASES[name]
    cfg = SuperlinearConfig(**c["cfg"])
    from slcompile.kernels.blocksparse import summary_keys
    row = c["block"] * c["D"] * 4
    summ = c["B"] * c["Hkv"] * (c["C"] // summary_keys(cfg.window, cfg.k_block, cfg.block_group)) \
        * 2 * c["D"] * 4
    owners, stage2 = set(), False
    for r in range(world):
        search, attend = _oracle_zigzag_bsp_blocks(name, r)
        got = res[r][name]
        assert got["received"]["summary"] == got["sent"]["summary"] == (world - 1) * summ
        assert got["received"]["k"] == row * len(search | attend)
        assert got["received"]["v"] == row * len(attend)
        assert got["k_blocks"] == len(search | attend) and got["v_blocks"] == len(attend)
        assert attend  # the ranks read each other's rows
        stage2 = stage2 or bool(search)
        owners |= {(r, o) for (_, _, o, _) in search | attend}
    assert stage2  # some rank fetches K for stage 2
    if world == 3:  # the late pieces read from both other ranks
        assert {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)} <= owners
    for cat in ("k", "v", "index", "count", "summary"):
        assert sum(res[r][name]["sent"][cat] for r in range(world)) == \
            sum(res[r][name]["received"][cat] for r in range(world))


def test_zigzag_selective_moves_less_than_all_gather(runs, one_thread):
    """Queries route to one region: each rank receives a fraction of what the all-gather zigzag
    moves (every other chunk's K and V), with the same (exact) output."""
    c = CASES["zigzag_bsp_selective"]
    for r in range(WORLD):
        sel, base = runs[r]["zigzag_bsp_selective"], runs[r]["zigzag_bsp_all_gather"]
        full = c["B"] * c["Hkv"] * c["C"] * c["D"] * 4  # the other rank's chunk, K or V
        assert base["received"]["k"] == base["received"]["v"] == full
        assert sel["received"]["v"] < full // 2 and sel["received"]["k"] < full // 2
        assert sum(sel["received"].values()) < sum(base["received"].values()) // 2
        assert sum(sel["sent"].values()) < sum(base["sent"].values()) // 2
        torch.testing.assert_close(sel["out"], base["out"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name,world", [("zigzag_blocksparse", WORLD),
                                        ("three_zigzag_blocksparse", 3),
                                        ("zigzag_anchor_gated", WORLD)])
def test_zigzag_without_selection_moves_every_row_it_holds(request, one_thread, name, world):
    """Where the selective zigzag cannot narrow the rows (a key-padding mask; pieces that cut a
    stage-1 group) it fetches every row of its buffer, the keys up to its late piece's end, and
    no summaries; a span search takes comm='all_gather' by default (selective is refused for it:
    test_invalid_inputs_raise_on_every_rank). Outputs are exact (test_equals_single_device)."""
    res = request.getfixturevalue("runs" if world == WORLD else "runs3")
    c = CASES[name]
    h, B, Hkv, D = c["C"] // 2, c["B"], c["Hkv"], c["D"]
    for r in range(world):
        got = res[r][name]
        assert "summary" not in got["received"]
        if CASES[name]["cfg"]["search_key"] != "blocksparse":  # all_gather: every other chunk
            assert got["received"]["k"] == (world - 1) * B * Hkv * c["C"] * D * 4
            assert got["k_blocks"] == got["v_blocks"] == 0
            continue
        rows = {(b, hh) + _zigzag_owner_block(name, p) for b in range(B) for hh in range(Hkv)
                for p in range((2 * world - r) * h) if p // h not in (r, 2 * world - 1 - r)}
        assert got["k_blocks"] == got["v_blocks"] == len(rows)
        assert got["received"]["k"] == got["received"]["v"] == len(rows) * c["block"] * D * 4



def _most_per_head(blocks):
    """The most transfer blocks of one (batch row, kv head) in a set of (b, h, ...) tuples."""
    per = {}
    for x in blocks:
        per[x[:2]] = per.get(x[:2], 0) + 1
    return max(per.values(), default=0)


@pytest.mark.parametrize("name,world", [
    ("bsp_selective", WORLD), ("three_bsp_selective", 3), ("three_bsp_longer", 3),
    ("zigzag_bsp_selective", WORLD), ("zigzag_bsp_odd_block", WORLD),
    ("three_zigzag_bsp_selective", 3)])
def test_buffers_hold_what_the_selection_reads(request, one_thread, name, world):
    """Per-rank memory of the default's selective path (CommStats.held_rows, the most rows per
    batch row and kv head its key and value buffers hold): the rank's own C rows and the blocks
    the contract's brute force says its selection reads (stage 2's, then attention's), never the
    whole prefix (where the routing concentrates, less than it); with transfer blocks that are
    whole key blocks, exactly that."""
    res = request.getfixturevalue("runs" if world == WORLD else "runs3")
    c = CASES[name]
    cfg = SuperlinearConfig(**c["cfg"])
    C, blk, kb = c["C"], c["block"], cfg.k_block
    zigzag = c.get("layout") == "zigzag"
    for r in range(world):
        search, attend = (_oracle_zigzag_bsp_blocks if zigzag else _oracle_bsp_blocks)(name, r)
        read = max(_most_per_head(search), _most_per_head(attend))
        held = res[r][name]["held_rows"]
        prefix = (2 * world - r) * C // 2 if zigzag else (r + 1) * C
        if blk % kb == 0:
            assert held == C + read * blk, (r, held, read)
        else:  # transfer blocks straddle key blocks (and a zigzag owner's two pieces)
            assert C <= held <= C + read * (blk + 2 * kb), (r, held, read)
        assert held <= prefix
        if "hot" in c and r:  # routing that concentrates: a fraction of the prefix
            assert held < prefix


def test_the_last_ranks_memory_does_not_grow_with_the_length(runs, runs3, one_thread):
    """The same chunks and routing at 2 ranks (T = 1024) and at 3 (T = 1536): the last rank's
    buffers hold no more rows at the longer length (its prefix grew by a chunk), under 2/3 of its
    prefix."""
    two = runs[1]["bsp_selective"]["held_rows"]
    three = runs3[2]["three_bsp_longer"]["held_rows"]
    assert three <= two and three < 2 * 3 * 512 // 3
    # all_gather holds the whole prefix
    assert runs[1]["bsp_selective_all_gather"]["held_rows"] == 1024
