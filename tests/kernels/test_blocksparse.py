"""search_key="blocksparse" (docs/blocksparse.md): the reference against a brute-force oracle written
from the contract, dense attention, and its properties; FlexAttention's lowering against the
reference."""

import pytest
import torch

import slcompile
from slcompile import SuperlinearConfig
from slcompile.kernels import blocksparse as bs
from slcompile.kernels.reference import dense_attention

from oracle import oracle_blocksparse

NEG = float("-inf")
R, P = 8, 8  # representative rows and pool of these tests (the config's defaults)



def _inputs(B, Hq, Hkv, T, D, seed, pad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    kpm = (torch.rand(B, T, generator=g) > 0.2) if pad else None
    return q, k, v, kpm


def _kept_sets(kept):
    B, H, nQ, _ = kept.shape
    return {(b, h, n): {int(x) for x in kept[b, h, n] if x >= 0}
            for b in range(B) for h in range(H) for n in range(nQ)}


CASES = [  # B, Hq, Hkv, T, D, p0, window, sinks, topk, qb, kb, pad
    (1, 2, 1, 700, 16, 0, 64, 4, 2, 64, 64, False),
    (2, 4, 2, 530, 8, 0, 40, 0, 3, 32, 16, True),
    (1, 3, 3, 600, 8, 200, 16, 20, 1, 64, 32, False),   # chunk not on a block edge
    (1, 4, 1, 450, 8, 449, 32, 4, 2, 32, 32, True),     # one decoded token, MQA
    (1, 2, 1, 1400, 8, 0, 128, 4, 3, 32, 16, False),    # stage-1 groups of 8 blocks
    (2, 4, 2, 900, 8, 300, 64, 20, 2, 32, 16, True),    # groups of 4, a chunk, padding
    (1, 2, 2, 1100, 8, 1099, 48, 4, 2, 32, 16, False),  # groups of 4, a decoded token
]
GROUPS = (1, 1, 1, 1, 8, 4, 4)  # key blocks per stage-1 group of each case
SPREAD = (False, True, True, False, True, True, False)  # rows spread over the query block


@pytest.mark.parametrize("case", CASES)
def test_reference_against_brute_force_oracle(case):
    B, Hq, Hkv, T, D, p0, W, S, K, qb, kb, pad = case
    r2 = (0, 24, 48, 24, 0, 32, 16)[CASES.index(case)]  # stage 2's rows (exact_rows)
    F, spread = GROUPS[CASES.index(case)], SPREAD[CASES.index(case)]
    q, k, v, kpm = _inputs(B, Hq, Hkv, T, D, seed=T + p0, pad=pad)
    q = q[:, :, p0:]
    scale = D ** -0.5
    kept = bs.block_select(q, k, kpm, p0, window=W, sinks=S, topk=K, q_block=qb, k_block=kb,
                           rows=R, pool=P, exact_rows=r2, group=F, spread=spread)
    j0 = p0 // qb
    want, scores, o_want = oracle_blocksparse(q, k, v, kpm, p0, window=W, sinks=S, topk=K, qb=qb, kb=kb,
                                  scale=scale, r2=r2, F=F, spread=spread)
    got = {(b, h, n + j0): s for (b, h, n), s in _kept_sets(kept).items()}
    assert set(got) == set(want)
    assert sum(len(s) for s in want.values()) > 0
    for key in want:
        if got[key] != want[key]:  # only a float32 near-tie may differ from the float64 oracle
            cands, pool = scores[key]
            bounds = sorted((c[0] for c in cands), reverse=True)
            exact = sorted((c[0] for c in pool), reverse=True)
            near = any(abs(x - y) < 1e-4 * (1 + abs(x)) for x, y in zip(bounds, bounds[1:])) or \
                any(abs(x - y) < 1e-4 * (1 + abs(x)) for x, y in zip(exact, exact[1:]))
            assert near, (key, got[key], want[key])
    # attention on the oracle's own choice equals the oracle's output
    okept = torch.full_like(kept, -1)
    for (b, h, j), s in want.items():
        for i, x in enumerate(sorted(s)):
            okept[b, h, j - j0, i] = x
    torch.manual_seed(0)
    out = bs.block_attention(q, k, v, okept, kpm, p0, window=W, sinks=S, q_block=qb, k_block=kb,
                             scale=scale)
    torch.testing.assert_close(out.double(), o_want, atol=2e-5, rtol=2e-5)


def test_exact_when_everything_is_attended_and_below_dense_below():
    q, k, v, kpm = _inputs(2, 4, 2, 300, 16, seed=1, pad=True)
    scale = 0.25
    dense = dense_attention(q, k, v, kpm, None, scale)
    # topk large enough to keep every candidate block: every query sees its whole past
    out = bs.superlinear_block_attention(q, k, v, kpm, 0, window=32, sinks=4, topk=8, q_block=32,
                                         k_block=32, scale=scale, dense_below=0, rows=R, pool=P)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    out = bs.superlinear_block_attention(q, k, v, kpm, 0, window=0, sinks=0, topk=1, q_block=32,
                                         k_block=32, scale=scale, dense_below=300, rows=R, pool=P)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    sparse = bs.superlinear_block_attention(q, k, v, kpm, 0, window=0, sinks=0, topk=1,
                                            q_block=32, k_block=32, scale=scale, dense_below=0, rows=R, pool=P)
    assert (sparse - dense).abs().max() > 1e-2  # the sparse path really runs


def test_causal_and_every_block_reachable():
    q, k, v, _ = _inputs(1, 2, 1, 512, 16, seed=2)
    kw = dict(window=32, sinks=0, topk=1, q_block=32, k_block=32, scale=0.25, dense_below=0,
              rows=R, pool=P)
    out = bs.superlinear_block_attention(q, k, v, None, 0, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 300:] += 5 * torch.randn_like(k2[:, :, 300:])
    v2[:, :, 300:] += 5
    out2 = bs.superlinear_block_attention(q, k2, v2, None, 0, **kw)
    # queries of blocks before the perturbed key block 9 (keys 288..) see nothing of it
    torch.testing.assert_close(out[:, :, :288], out2[:, :, :288], atol=0, rtol=0)
    assert (out[:, :, 320:] - out2[:, :, 320:]).abs().max() > 0.1
    # plant, for the last query block, a key aligned with its queries in each earlier block
    # outside window/sinks: it is always the one kept
    rep = q[0, :, -8:].mean((0, 1))
    for blk in range(0, 14):
        kp = k.clone()
        kp[0, 0, blk * 32 + 5] = 20 * rep / rep.norm()
        kept = bs.block_select(q, kp, None, 0, window=32, sinks=0, topk=1, q_block=32, k_block=32,
                               rows=R, pool=P)
        assert kept[0, 0, -1, 0].item() == blk


def test_chunked_prefill_on_block_edges_equals_prefill():
    q, k, v, _ = _inputs(1, 4, 2, 640, 16, seed=3)
    kw = dict(window=64, sinks=4, topk=2, q_block=64, k_block=64, scale=0.25, dense_below=0,
              rows=R, pool=P)
    full = bs.superlinear_block_attention(q, k, v, None, 0, **kw)
    half = bs.superlinear_block_attention(q[:, :, 320:], k, v, None, 320, **kw)
    torch.testing.assert_close(half, full[:, :, 320:], atol=1e-6, rtol=1e-6)


def test_functional_and_op_match_the_reference():
    q, k, v, kpm = _inputs(2, 4, 2, 400, 16, seed=4, pad=True)
    cfg = SuperlinearConfig(search_key="blocksparse", window=64, sinks=4, topk=2, dense_below=0,
                            q_block=128, k_block=64)
    got = slcompile.superlinear_attention(q, k, v, config=cfg, enable_gqa=True,
                                          key_padding_mask=kpm)
    sel = dict(rows=cfg.block_rows, pool=cfg.block_pool, exact_rows=cfg.exact_rows,
               group=cfg.block_group, spread=cfg.spread_rows)  # the config's search settings
    kept = bs.block_select(q, k, kpm, 0, window=64, sinks=4, topk=2, q_block=128,
                           k_block=64, **sel)
    want = bs.block_attention(q, k, v, kept, kpm, 0, window=64, sinks=4, q_block=128,
                              k_block=64, scale=0.25)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # a decode step at the bottom right, and explicit positions
    got = slcompile.superlinear_attention(q[:, :, -1:], k, v, config=cfg, enable_gqa=True)
    want = bs.superlinear_block_attention(q[:, :, -1:], k, v, None, 399, window=64, sinks=4,
                                          topk=2, q_block=128, k_block=64,
                                          scale=0.25, dense_below=0, **sel)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="p0..p0\\+Lq-1"):
        slcompile.superlinear_attention(q[:, :, :3], k, v, config=cfg, enable_gqa=True,
                                        query_positions=torch.tensor([5, 9, 20]))
    with pytest.raises(ValueError, match="combine='union'"):
        SuperlinearConfig(search_key="blocksparse", combine="gated")


def test_flex_lowering_matches_the_reference():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v, _ = _inputs(1, 4, 2, 700, 16, seed=5)
    kw = dict(window=64, sinks=4, q_block=64, k_block=64)
    kept = bs.block_select(q, k, None, 0, topk=2, rows=R, pool=P, **kw)
    want = bs.block_attention(q, k, v, kept, None, 0, scale=0.25, **kw)
    got = torch.full_like(want, float("nan"))
    got.copy_(bs.block_attention_flex(q, k, v, kept, scale=0.25, **kw))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    dense = dense_attention(q, k, v, None, None, 0.25)
    assert (want - dense).abs().max() > 1e-2


def test_ranking_orders_negative_scores_and_breaks_ties_to_the_later_block():
    g = torch.Generator().manual_seed(6)
    score = torch.randn(5, 40, generator=g) * 3
    score[:, 7] = score[:, 30]  # exact ties
    score[:, 11] = NEG
    idx = torch.arange(40).expand(5, 40)
    s, i = bs._top(score, idx, 36)
    for r in range(5):
        want = sorted(range(40), key=lambda x: (score[r, x].item(), x), reverse=True)[:36]
        want = [x if score[r, x] > NEG else -1 for x in want]
        assert i[r].tolist() == want


def test_keys_attended_counts_the_attention_set():
    q, k, v, _ = _inputs(1, 2, 2, 333, 8, seed=7)
    kw = dict(window=40, sinks=4, q_block=32, k_block=16)
    for p0 in (0, 300):
        kept = bs.block_select(q[:, :, p0:], k, None, p0, topk=2, rows=R, pool=P, **kw)
        n = bs.keys_attended(kept, p0, 333 - p0, 333, **kw)
        # count the attended keys directly from the contract's sets
        nK, sb, wb, per_q = bs.geometry(333, 40, 4, 32, 16)
        for h in range(2):
            for i, t in enumerate(range(p0, 333, 37)):
                j = t // 32
                before = j * 2
                blocks = set(range(min(sb, before))) | set(range(max(sb, before - wb), before))
                blocks |= {int(x) for x in kept[0, h, j - p0 // 32] if x >= 0}
                keys = {x for b in blocks for x in range(b * 16, min(333, b * 16 + 16))}
                keys |= set(range(j * 32, t + 1))
                assert n[0, h, t - p0].item() == len(keys)


def test_backend_rewrites_a_model_into_the_block_sparse_op():
    from slcompile.convert import superlinear_nodes

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                    enable_gqa=True)

    q, k, v, _ = _inputs(2, 4, 2, 300, 16, seed=8)
    opts = dict(search_key="blocksparse", window=64, sinks=4, topk=1, dense_below=0)
    graphs = []

    def spy(gm, example_inputs):
        from slcompile.backend import superlinear_backend
        out = superlinear_backend(gm, example_inputs, options={**opts, "compiler": "eager"})
        graphs.append(gm)
        return out

    torch._dynamo.reset()
    got = torch.compile(Attn(), backend=spy)(q, k, v)
    want = slcompile.superlinear_attention(q, k, v, enable_gqa=True,
                                           config=SuperlinearConfig(**opts))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                             enable_gqa=True)
    assert (got - dense).abs().max() > 1e-2
    assert sum(len(superlinear_nodes(g.graph)) for g in graphs) == 1


def _contract_mask(kept, p0, Lq, T, kpm, *, window, sinks, qb, kb, G):
    """bool [B, Hq, Lq, T]: the keys each query attends, from the contract's sets (loops)."""
    B, Hkv = kept.shape[:2]
    sb, wb = -(-sinks // kb), -(-min(window, T) // kb)
    m = torch.zeros(B, Hkv * G, Lq, T, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            for t in range(p0, p0 + Lq):
                j = t // qb
                before = j * qb // kb
                blocks = set(range(min(sb, before))) | set(range(max(sb, before - wb), before))
                blocks |= {int(x) for x in kept[b, h, j - p0 // qb] if x >= 0}
                keys = {x for blk in blocks for x in range(blk * kb, min(T, blk * kb + kb))}
                keys |= set(range(j * qb, t + 1))
                for x in keys:
                    if kpm is None or kpm[b, x]:
                        m[b, h * G:(h + 1) * G, t - p0, x] = True
    return m


@pytest.mark.parametrize("p0,pad", [(0, False), (130, True)])
def test_gradients_match_masked_dense_attention(p0, pad):
    """The op's backward (search held fixed) equals autograd through dense attention masked to
    the contract's attended sets, in float64."""
    q, k, v, kpm = _inputs(2, 4, 2, 300, 16, seed=9 + p0, pad=pad)
    q = q[:, :, p0:].contiguous()
    cfg = SuperlinearConfig(search_key="blocksparse", window=40, sinks=4, topk=2, dense_below=0,
                            q_block=32, k_block=16, block_rows=4, block_pool=2)
    qpos = torch.arange(p0, 300).expand(2, -1)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out = slcompile.superlinear_attention(*leaves, config=cfg, enable_gqa=True,
                                          key_padding_mask=kpm, query_positions=qpos)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    kept = bs.block_select(q, k, kpm, p0, window=40, sinks=4, topk=2, q_block=32, k_block=16,
                           rows=4, pool=2, group=cfg.block_group, spread=cfg.spread_rows,
                           exact_rows=cfg.exact_rows)
    mask = _contract_mask(kept, p0, 300 - p0, 300, kpm, window=40, sinks=4, qb=32, kb=16, G=2)
    ql, kl, vl = [x.double().requires_grad_() for x in (q, k, v)]
    lg = torch.einsum("bhqd,bhkd->bhqk", ql, kl.repeat_interleave(2, 1)) * 0.25
    p = torch.softmax(lg.masked_fill(~mask, float("-inf")), -1)
    ref = torch.einsum("bhqk,bhkd->bhqd", p, vl.repeat_interleave(2, 1))
    torch.testing.assert_close(out.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    want = torch.autograd.grad(ref, (ql, kl, vl), g)
    for a, b in zip(got, want):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_summary_cache_equals_a_rebuild_as_the_keys_grow():
    """BlockSummaryCache updated from the new keys only (appends of 1..70 keys, a rewrite of the
    last keys, growth past its buffer) always equals block_summaries over the whole key tensor
    on the whole blocks (a partial last block's row is not kept: the search never reads it);
    ``length`` counts the whole blocks' keys."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 3, 1500, 8, generator=g)
    cache = bs.BlockSummaryCache(32)

    def same(got, keys):
        n = keys.shape[2] // 32
        assert got.shape[2] == -(-keys.shape[2] // 32) and cache.length == n * 32
        torch.testing.assert_close(got[:, :, :n], bs.block_summaries(keys, None, 32)[0][:, :, :n],
                                   rtol=0, atol=0)

    T = 0
    while T < 1500:
        step = int(torch.randint(1, 71, (1,), generator=g))
        new = min(1500, T + step)
        same(cache.update(k[:, :, :new], cache.length), k[:, :, :new])
        T = new
    k2 = k.clone()
    k2[:, :, 1400:] = torch.randn(2, 3, 100, 8, generator=g)  # rewritten from 1400 on
    same(cache.update(k2, 1400), k2)
    # another batch shape: rebuilt from scratch whatever start says
    k3 = torch.randn(1, 3, 300, 8, generator=g)
    same(cache.update(k3, 299), k3)


def test_op_with_kept_summaries_equals_the_op_without():
    torch.manual_seed(5)
    B, Hq, Hkv, T, D = 1, 4, 2, 700, 16
    q = torch.randn(B, Hq, 3, D)
    k, v = torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    args = (8, 4, 3, D ** -0.5, 0, 32, 16, 4, 2)  # window sinks topk scale dense_below qb kb R P
    summ = bs.BlockSummaryCache(16).update(k, 0)
    want = torch.ops.superlinear.block_sparse_attention(q, k, v, None, None, *args)
    got = torch.ops.superlinear.block_sparse_attention(q, k, v, None, None, *args, summ)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and it is used: summaries of other keys change the choice
    other = bs.BlockSummaryCache(16).update(torch.randn(B, Hkv, T, D), 0)
    moved = torch.ops.superlinear.block_sparse_attention(q, k, v, None, None, *args, other)
    assert not torch.equal(moved, want)
    with pytest.raises(ValueError, match="block summaries"):
        torch.ops.superlinear.block_sparse_attention(q, k, v, None, None, *args, summ[:, :, :5])


def test_empty_pool_slots_never_displace_blocks_with_negative_scores():
    """Query blocks with fewer candidates than the pool hold empty slots (-1); blocks whose exact
    scores are all negative must still be kept ahead of them (an empty slot's order key once
    outranked every negative score), as the brute-force oracle keeps them."""
    torch.manual_seed(8)
    T, kb, qb = 640, 16, 32
    q = torch.randn(1, 2, T, 8).abs()
    k = -torch.randn(1, 1, T, 8).abs()  # every logit negative
    v = torch.randn(1, 1, T, 8)
    kw = dict(window=32, sinks=0, q_block=qb, k_block=kb)
    kept = bs.block_select(q, k, None, 0, topk=3, rows=R, pool=P, **kw)
    want, _, _ = oracle_blocksparse(q, k, v, None, 0, window=32, sinks=0, topk=3, qb=qb, kb=kb, scale=0.3)
    assert _kept_sets(kept) == want
    nK, sb, wb, per_q = bs.geometry(T, 32, 0, qb, kb)
    for j in range(T // qb):  # every query block keeps min(topk, candidates) blocks
        assert int((kept[0, 0, j] >= 0).sum()) == min(3, max(0, j * per_q - wb - sb))


def test_paged_keys_give_the_same_choice_and_output():
    """Paged keys (`check_table`: the key blocks in slots of any order, as sequence parallelism
    holds only what a rank reads): the search and the attention equal those over the whole keys,
    with every block held in shuffled slots beside NaN slots, and with only the blocks the
    selection reads held; a read of a block not held raises."""
    from blocksparse_lists import paged
    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, T, D, p0, kb, qb = 2, 4, 2, 1024, 16, 512, 16, 32
    kw = dict(window=32, sinks=4, q_block=qb, k_block=kb)
    sel = dict(topk=3, rows=4, pool=2, group=2)
    q = torch.randn(B, Hq, T - p0, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    summary = bs.block_summaries(k, None, 2 * kb)[0]
    want = bs.block_select(q, k, None, p0, summary=summary, **kw, **sel)
    o_want = bs.block_attention(q, k, v, want, None, p0, scale=0.3, **kw)
    kp, vp, table = paged(g, kb, k, v)
    got = bs.block_select(q, kp, None, p0, summary=summary, table=table, **kw, **sel)
    assert torch.equal(got, want) and (want >= 0).sum() > 0
    o_got = bs.block_attention(q, kp, vp, got, None, p0, scale=0.3, table=table, **kw)
    torch.testing.assert_close(o_got, o_want, atol=0, rtol=0)
    # only what is read: stage 2's candidate groups, then the attended blocks
    cand = bs.block_select(q, k, None, p0, summary=summary, candidates_only=True, **kw, **sel)
    nK = T // kb
    read = torch.zeros(B, Hkv, nK + 1, dtype=torch.bool)
    c = cand.long()
    blocks = torch.where(c[..., None] >= 0, c[..., None] * 2 + torch.arange(2), nK)
    read.scatter_(2, blocks.flatten(2), True)
    full, diag = bs.attended_blocks(want, p0 // qb, nK, *bs.geometry(T, 32, 4, qb, kb)[1:])
    lists = torch.cat([full, diag[None, None].expand(B, Hkv, *diag.shape)], -1)
    read.scatter_(2, torch.where(lists >= 0, lists, nK).flatten(2), True)
    read = read[..., :nK]
    assert not read.all()
    kp, vp, table = paged(g, kb, k, v, held=read)
    assert torch.equal(bs.block_select(q, kp, None, p0, summary=summary, table=table, **kw, **sel),
                       want)
    o_got = bs.block_attention(q, kp, vp, want, None, p0, scale=0.3, table=table, **kw)
    torch.testing.assert_close(o_got, o_want, atol=0, rtol=0)
    table[0, 0, read[0, 0].nonzero()[0, 0]] = -1  # a block attention reads, dropped
    with pytest.raises(ValueError, match="not held by the paged keys"):
        bs.block_attention(q, kp, vp, want, None, p0, scale=0.3, table=table, **kw)
    with pytest.raises(ValueError, match="need the group summaries"):
        bs.block_select(q, kp, None, p0, table=table, **kw, **sel)
    with pytest.raises(ValueError, match="key-padding mask"):
        bs.block_select(q, kp, torch.ones(B, T, dtype=torch.bool), p0, summary=summary,
                        table=table, **kw, **sel)
