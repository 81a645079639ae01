"""The Triton block-sparse search (kernels/triton_blocksparse_search.py) against the reference
`blocksparse.block_select` (docs/blocksparse.md), under Triton's interpreter on CPU."""

import pytest
import torch

from tests.triton_env import DEV, poison, require_triton

require_triton()

from slcompile.kernels import blocksparse as bs  # noqa: E402
from slcompile.kernels import triton_blocksparse_search as tss  # noqa: E402

CASES = [  # B, Hq, Hkv, T, D, p0, window, sinks, topk, qb, kb, rows, pool, pad
    (1, 4, 2, 1000, 32, 0, 64, 4, 2, 64, 32, 8, 2, False),
    (2, 2, 2, 700, 24, 0, 32, 40, 3, 32, 16, 4, 3, True),   # D not a power of two, padding
    (1, 3, 1, 900, 16, 333, 16, 0, 1, 64, 16, 8, 8, False),  # a chunk off the block edges, MQA
    (1, 4, 2, 800, 16, 799, 64, 4, 2, 32, 32, 8, 4, True),   # one decoded token
    (1, 2, 1, 600, 16, 0, 0, 0, 40, 32, 16, 2, 2, False),    # topk past the candidates
]


def _inputs(B, Hq, Hkv, T, D, seed, pad, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    kpm = (torch.rand(B, T, generator=g) > 0.25) if pad else None
    return q.to(DEV), k.to(DEV), None if kpm is None else kpm.to(DEV)


def _exact_scores(q, k, kpm, p0, kb, qb, rows, Hkv):
    """[B, Hkv, nQ, nK] exact largest logit of each block's present keys against the
    representatives, float64 (to explain a disagreement as a near-tie)."""
    rep, _ = bs.representatives(q, p0, qb, rows, Hkv)
    kbk, present = bs._key_blocks(k, kpm, kb)
    lg = torch.einsum("bhnrd,bhiwd->bhniw", rep.double(), kbk.double())
    lg = lg.masked_fill(~present[:, None, None], float("-inf"))
    return lg.amax((3, 5)) if lg.dim() == 6 else lg.amax(3).amax(-1)


@pytest.mark.parametrize("case", CASES)
def test_triton_search_matches_the_reference(case):
    B, Hq, Hkv, T, D, p0, W, S, K, qb, kb, rows, pool, pad = case
    q, k, kpm = _inputs(B, Hq, Hkv, T, D, seed=T + p0 + D, pad=pad)
    q = q[:, :, p0:]
    kw = dict(window=W, sinks=S, topk=K, q_block=qb, k_block=kb, rows=rows, pool=pool)
    want = bs.block_select(q, k, kpm, p0, **kw)
    poison()
    got = tss.block_select_triton(q, k, kpm, p0, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (want >= 0).sum() > 0
    if torch.equal(got, want):
        return
    # a float32 near-tie (sums in another order) may swap two blocks; nothing else may differ
    ex = _exact_scores(q, k, kpm, p0, kb, qb, rows, Hkv)
    bad = (got != want).any(-1).nonzero().tolist()
    for b, h, n in bad:
        g = sorted(int(x) for x in got[b, h, n] if x >= 0)
        w = sorted(int(x) for x in want[b, h, n] if x >= 0)
        assert len(g) == len(w), (b, h, n, g, w)
        sg = sorted(float(ex[b, h, n, i]) for i in g)
        sw = sorted(float(ex[b, h, n, i]) for i in w)
        assert all(abs(x - y) < 1e-4 * (1 + abs(x)) for x, y in zip(sg, sw)), (b, h, n, g, w)
    assert len(bad) <= max(1, want.shape[2] // 10)


def test_triton_search_half_precision_keeps_the_same_blocks_mostly():
    q, k, kpm = _inputs(1, 4, 2, 1024, 32, seed=11, pad=False, dtype=torch.float16)
    kw = dict(window=64, sinks=4, topk=3, q_block=64, k_block=32, rows=8, pool=4)
    want = bs.block_select(q, k, None, 0, **kw)
    got = tss.block_select_triton(q, k, None, 0, **kw)
    same = sum(len({int(x) for x in a} & {int(x) for x in b})
               for a, b in zip(got.view(-1, 3), want.view(-1, 3)))
    assert same >= 0.97 * (want >= 0).sum().item()


def test_a_planted_key_is_found_in_every_block():
    """Reachability through the kernels: a key aligned with the last block's queries wins
    wherever it is planted outside sinks and window."""
    q, k, _ = _inputs(1, 2, 1, 512, 16, seed=12, pad=False)
    rep = q[0, :, -8:].mean((0, 1))
    for blk in (0, 5, 13):
        kp = k.clone()
        kp[0, 0, blk * 32 + 7] = 20 * rep / rep.norm()
        kept = tss.block_select_triton(q, kp, None, 0, window=32, sinks=0, topk=1, q_block=32,
                                       k_block=32, rows=8, pool=2)
        assert kept[0, 0, -1, 0].item() == blk


def test_decoding_with_kept_summaries_over_several_tiles():
    """A decoded token and a short chunk searched against summaries kept by BlockSummaryCache (the
    cache grown token by token), the stage-1 scan over several tiles (57 blocks, 16-block tiles),
    pick what the reference picks from the keys."""
    B, Hq, Hkv, T, D = 1, 4, 2, 900, 16
    q, k, _ = _inputs(B, Hq, Hkv, T, D, seed=18, pad=False)
    kw = dict(window=32, sinks=4, topk=3, q_block=32, k_block=16, rows=4, pool=2)
    cache = bs.BlockSummaryCache(16)
    cache.update(k[:, :, :850], 0)
    for t in range(850, T - 3):  # one key at a time, as generate() appends
        cache.update(k[:, :, :t + 1], t)
    for p0 in (T - 4, T - 1):  # a chunk of 4 queries (one query block edge inside), one token
        summ = cache.update(k, p0)
        want = bs.block_select(q[:, :, p0:], k, None, p0, **kw)
        poison()
        got = tss.block_select_triton(q[:, :, p0:], k, None, p0, summary=summ, **kw)
        assert (want >= 0).sum() > 0
        assert torch.equal(got, want), (p0, got, want)


def test_negative_scores_with_a_pool_past_the_candidates():
    """All logits negative and a pool larger than most query blocks' candidates: the Triton search
    keeps what the reference keeps (empty pool slots never outrank a block)."""
    torch.manual_seed(8)
    q = torch.randn(1, 2, 640, 8).abs().to(DEV)
    k = (-torch.randn(1, 1, 640, 8).abs()).to(DEV)
    kw = dict(window=32, sinks=0, topk=3, q_block=32, k_block=16, rows=8, pool=8)
    want = bs.block_select(q, k, None, 0, **kw)
    poison()
    got = tss.block_select_triton(q, k, None, 0, **kw)
    assert torch.equal(got, want)
    assert (want >= 0).sum() > 0


def test_stage_one_retries_with_smaller_tiles_when_shared_memory_runs_out(monkeypatch):
    """A launch the compiler refuses for shared memory (as a 256-block tile with three stages did
    on an H200) is retried with fewer stages and narrower slices, with the same result."""
    from triton.runtime.errors import OutOfResources

    q, k, _ = _inputs(1, 4, 2, 1000, 32, seed=23, pad=False)
    kw = dict(window=64, sinks=4, topk=2, q_block=64, k_block=32, rows=8, pool=2)
    want = tss.block_select_triton(q, k, None, 0, **kw)
    real, seen = tss._bound_kernel, []

    class Refusing:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                seen.append((meta["DK"], meta["num_stages"]))
                if len(seen) == 1:
                    raise OutOfResources(300000, 232448, "shared memory")
                return real[grid](*args, **meta)
            return launch

    monkeypatch.setattr(tss, "_bound_kernel", Refusing())
    poison()
    got = tss.block_select_triton(q, k, None, 0, **kw)
    assert seen[1] == (32, 1) and seen[0] != seen[1]
    assert torch.equal(got, want)


@pytest.mark.parametrize("p0", [8999, 8960])
def test_the_preset_pool_size_with_a_long_cache(p0):
    """The preset's pool (8 x 24 = 192 candidates: 256-block stage-1 tiles, the size that runs on
    a GPU) over a cache of 563 key blocks, for a decoded token and for a 40-query chunk."""
    B, Hq, Hkv, T, D = 1, 4, 1, 9000, 16
    q, k, _ = _inputs(B, Hq, Hkv, T, D, seed=p0, pad=False)
    kw = dict(window=64, sinks=4, topk=24, q_block=64, k_block=16, rows=8, pool=8)
    want = bs.block_select(q[:, :, p0:], k, None, p0, **kw)
    poison()
    got = tss.block_select_triton(q[:, :, p0:], k, None, p0, **kw)
    assert (want >= 0).sum(-1).min() == 24
    assert torch.equal(got, want)


@pytest.mark.parametrize("rows,L", [(8, 32768), (3, 40001), (1, 9000)])
def test_top_blocks_of_few_long_rows_in_pieces(rows, L):
    """The pool of a decoded token (few rows over every candidate) is picked in pieces, then among
    the pieces' best: the same blocks, in the same order, as one topk over the row."""
    g = torch.Generator().manual_seed(rows + L)
    keys = (torch.randperm(rows * L, generator=g).view(rows, L).long() << bs._IDX_BITS) | \
        torch.arange(L).long()
    keys[:, torch.randperm(L, generator=g)[: L // 3]] = tss._NO_KEY  # non-candidates
    want = keys.topk(192, dim=-1)[0]
    want = torch.where(want == tss._NO_KEY, -1, want & ((1 << bs._IDX_BITS) - 1))
    assert torch.equal(tss._blocks_of(tss._top_keys(keys, 192)), want)


@pytest.mark.parametrize("p0,exact_rows", [(0, 64), (0, 32), (333, 16)])
def test_exact_rows_of_stage_two(p0, exact_rows):
    """Stage 2 with more representative rows than stage 1 (``exact_rows``, up to a whole 64-query
    block: 256 rows over 4 heads) keeps what the reference keeps, and differs from stage 1's rows."""
    q, k, kpm = _inputs(1, 4, 1, 1200, 16, seed=21 + exact_rows, pad=p0 == 0)
    q = q[:, :, p0:]
    kw = dict(window=32, sinks=4, topk=3, q_block=64, k_block=16, rows=4, pool=4)
    want = bs.block_select(q, k, kpm, p0, exact_rows=exact_rows, **kw)
    poison()
    got = tss.block_select_triton(q, k, kpm, p0, exact_rows=exact_rows, **kw)
    assert torch.equal(got, want)
    assert not torch.equal(want, bs.block_select(q, k, kpm, p0, **kw))


GROUP_CASES = [  # T, p0, window, kb, group, pad, summaries kept with a cache
    (1500, 0, 128, 16, 8, False, False),
    (1300, 0, 64, 16, 4, True, False),     # padding: groups without present keys
    (1400, 517, 112, 16, 8, False, False),  # a chunk off the block edges
    (1600, 1599, 96, 16, 4, False, True),   # a decoded token against kept group summaries
]


@pytest.mark.parametrize("case", GROUP_CASES)
def test_stage_one_groups_of_key_blocks(case):
    """Stage 1 bounding groups of `group` key blocks (`block_group`) keeps what the reference
    keeps, for a prefill, padding, a chunk and a decoded token with summaries kept per group."""
    T, p0, W, kb, F, pad, kept_summ = case
    q, k, kpm = _inputs(1, 4, 2, T, 16, seed=T + F, pad=pad)
    q = q[:, :, p0:]
    kw = dict(window=W, sinks=4, topk=3, q_block=32, k_block=kb, rows=4, pool=4, group=F)
    summ = bs.BlockSummaryCache(kb * F).update(k, 0) if kept_summ else None
    want = bs.block_select(q, k, kpm, p0, **kw)
    poison()
    got = tss.block_select_triton(q, k, kpm, p0, summary=summ, **kw)
    assert (want >= 0).sum() > 0
    assert torch.equal(got, want)
    # the groups change the choice (stage 1 bounds coarser units)
    assert not torch.equal(want, bs.block_select(q, k, kpm, p0, **dict(kw, group=1)))


def test_groups_are_capped_by_the_window():
    """A group may not reach the query block: with a window of 2 key blocks, groups of 4 blocks
    are groups of 2 (the largest power of two <= wb + 1), in the kernels as in the reference."""
    q, k, _ = _inputs(1, 2, 1, 700, 16, seed=3, pad=False)
    kw = dict(window=32, sinks=0, topk=2, q_block=32, k_block=16, rows=4, pool=2)
    assert bs.stage1_group(32, 16, 4) == 2 and bs.stage1_group(0, 16, 8) == 1
    assert bs.stage1_group(256, 32, 8) == 8 and bs.stage1_group(224, 32, 16) == 8
    want = bs.block_select(q, k, None, 0, group=2, **kw)
    assert torch.equal(bs.block_select(q, k, None, 0, group=4, **kw), want)
    poison()
    assert torch.equal(tss.block_select_triton(q, k, None, 0, group=4, **kw), want)
    with pytest.raises(ValueError, match="power of two"):
        bs.block_select(q, k, None, 0, group=3, **kw)


@pytest.mark.parametrize("p0,exact_rows,group", [(0, 0, 1), (0, 16, 4), (517, 32, 8), (1399, 16, 4)])
def test_rows_spread_over_the_query_block(p0, exact_rows, group):
    """Representative rows q_block // rows apart (`spread_rows`), in either stage, with or without
    groups, for a prefill, a chunk off the block edges and a decoded token: the reference's blocks,
    and other blocks than the block's last rows choose."""
    q, k, _ = _inputs(1, 4, 2, 1400, 16, seed=31 + p0, pad=False)
    q = q[:, :, p0:]
    kw = dict(window=128, sinks=4, topk=3, q_block=64, k_block=16, rows=4, pool=4,
              exact_rows=exact_rows, group=group)
    want = bs.block_select(q, k, None, p0, spread=True, **kw)
    poison()
    got = tss.block_select_triton(q, k, None, p0, spread=True, **kw)
    assert (want >= 0).sum() > 0
    assert torch.equal(got, want)
    if p0 < 1399:  # a decoded token's block holds one row: nothing to spread
        assert not torch.equal(want, bs.block_select(q, k, None, p0, **kw))


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]])
def test_triton_stage1_candidates_match_the_reference(case):
    """candidates_only (sequence parallelism fetches their keys): stage 1's groups, the same set
    as the reference's, from summaries alone (keys outside the groups poisoned)."""
    B, Hq, Hkv, T, D, p0, W, S, K, qb, kb, rows, pool, pad = case
    q, k, _ = _inputs(B, Hq, Hkv, T, D, seed=T + p0 + D + 1, pad=False)
    q = q[:, :, p0:]
    group = 2
    gspan = bs.summary_keys(W, kb, group)
    summary = bs.block_summaries(k, None, gspan)[0]
    kw = dict(window=W, sinks=S, topk=K, q_block=qb, k_block=kb, rows=rows, pool=pool,
              group=group, summary=summary, candidates_only=True)
    want = bs.block_select(q, k, None, p0, **kw)
    k_nan = torch.full_like(k, float("nan"))  # stage 1 with summaries reads no key
    poison()
    got = tss.block_select_triton(q, k_nan, None, p0, **kw)
    ref_nan = bs.block_select(q, k_nan, None, p0, **kw)
    assert torch.equal(ref_nan, want)
    assert got.shape == want.shape and (want >= 0).sum() > 0
    MG = want.shape[-1]
    assert MG == min(-(-pool * K // min(group, gspan // kb)), -(-T // gspan))
    for b in range(B):
        for h in range(Hkv):
            for n in range(want.shape[2]):
                assert {int(x) for x in got[b, h, n] if x >= 0} == \
                    {int(x) for x in want[b, h, n] if x >= 0}, (b, h, n)


@pytest.mark.parametrize("T,p0,group", [(2600, 2599, 1), (4300, 4290, 1), (9000, 8999, 1),
                                         (20000, 19999, 4)])
def test_one_query_block_merges_stage_one_tops_in_the_kernels(T, p0, group):
    """A call of one query block (a decoded token, a short chunk) picks stage 1's pool inside the
    kernels (each stage-1 tile keeps its best groups, stage 2 merges them): over 1-3 tiles of
    groups it keeps what the reference keeps, and its stage-2 keys (exact_keys) rank those blocks
    first."""
    B, Hq, Hkv, D = 1, 4, 2, 16
    q, k, _ = _inputs(B, Hq, Hkv, T, D, seed=T + group, pad=False)
    kw = dict(window=32, sinks=4, topk=4, q_block=32, k_block=16, rows=4, pool=2, group=group)
    nG = -(-T // (16 * bs.stage1_group(32, 16, group)))
    assert nG > 128  # stage-1 tiles of 256 groups: 1, 2, 3 and 2 of them
    want = bs.block_select(q[:, :, p0:], k, None, p0, **kw)
    poison()
    got = tss.block_select_triton(q[:, :, p0:], k, None, p0, **kw)
    assert (want >= 0).sum() > 0
    assert torch.equal(got, want), (got, want)
    keys = tss.block_select_triton(q[:, :, p0:], k, None, p0, exact_keys=True, **kw)
    top = keys.topk(4, dim=-1)[0]
    assert torch.equal(torch.where(top == tss._NO_KEY, -1, top & tss._IDX_MASK).to(torch.int32),
                       want)


def test_summary_update_kernel_equals_a_rebuild(monkeypatch):
    """The summaries' update on the Triton path (one launch) equals block_summaries over the whole
    key tensor on the whole groups as keys are appended one by one and in chunks, and launches
    nothing while the new keys only fill the partial last group."""
    from slcompile.kernels import dispatch
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1, 2, 700, 24, generator=g).to(DEV)
    prev = dispatch._FORCE_TRITON
    dispatch.force_triton(True)
    launches = []
    real = tss.summary_update_triton
    monkeypatch.setattr(tss, "summary_update_triton", lambda *a: launches.append(1) or real(*a))
    try:
        cache = bs.BlockSummaryCache(64)
        T = 0
        for step, launched in ((130, 1), (1, 0), (1, 0), (63, 1), (1, 0), (200, 1), (300, 1),
                               (4, 0)):
            new = min(700, T + step)
            poison()
            launches.clear()
            got = cache.update(k[:, :, :new], cache.length)
            assert len(launches) == launched, (T, new)
            n = new // 64
            torch.testing.assert_close(got[:, :, :n], bs.block_summaries(k[:, :, :new], None,
                                                                          64)[0][:, :, :n],
                                       rtol=0, atol=0)
            T = new
    finally:
        dispatch.force_triton(prev)


@pytest.mark.parametrize("p0", [0, 700, 1023])
def test_paged_keys_give_the_reference_choice(p0):
    """Stage 2 over paged keys (shuffled slots beside NaN slots, as sequence parallelism holds
    them) keeps the blocks the reference keeps over the whole keys."""
    from tests.blocksparse_lists import paged
    B, Hq, Hkv, T, D = 1, 4, 2, 1024, 16
    q, k, _ = _inputs(B, Hq, Hkv, T, D, seed=p0 + 3, pad=False)
    q = q[:, :, p0:]
    kw = dict(window=32, sinks=4, topk=3, q_block=32, k_block=16, rows=4, pool=2, group=2)
    summary = bs.block_summaries(k, None, 32)[0]
    want = bs.block_select(q, k, None, p0, summary=summary, **kw)
    kp, table = paged(torch.Generator().manual_seed(p0), 16, k)
    poison()
    got = tss.block_select_triton(q, kp, None, p0, summary=summary, table=table, **kw)
    assert (want >= 0).sum() > 0
    assert torch.equal(got, want)
