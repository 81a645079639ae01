"""The block-search kernels (kernels/triton_block.py, search_key="block" and "block_rerank")
against the reference, under TRITON_INTERPRET=1.

Tiny shapes, fresh random inputs, a NaN-poisoned allocator. Anchors must equal the reference's
exactly. Integer-valued inputs make every bound exact in any summation order, so scores must be
equal too and equal bounds are common: the tie rules (coarse: the later block; fine: the nearer
anchor) are checked there. On Gaussian inputs scores agree to fp32 rounding (the kernel sums in
another order than the reference's matrix products). The interpreter computes the bounds' products
in fp32 (its bf16 products are wrong): exact, like the GPU's bf16/fp16 tensor-core products, whose
equality benchmarks/block_search.py checks on the GPU. "block_rerank": the exact scores are sums of
products of integers too, so the same holds, and its tie rule (the nearer anchor) is checked.
"""

from __future__ import annotations

import pytest
import torch
from triton_env import DEV, poison, require_triton, through_triton

triton = require_triton()

from slcompile.kernels import reference as R  # noqa: E402
from slcompile.kernels import triton_block as TB  # noqa: E402
from slcompile.kernels import triton_impl as TI  # noqa: E402
from slcompile.kernels.config import SuperlinearConfig  # noqa: E402
from slcompile.kernels.geometry import span_extents  # noqa: E402


def _data(gen, B, Hq, Hkv, Lq, T, D, integer, dtype):
    if integer:
        q = torch.randint(-3, 4, (B, Hq, Lq, D), generator=gen).float()
        k = torch.randint(-3, 4, (B, Hkv, T, D), generator=gen).float()
    else:
        q = torch.randn(B, Hq, Lq, D, generator=gen)
        k = torch.randn(B, Hkv, T, D, generator=gen)
    return q.to(dtype), k.to(dtype)


def _extras(gen, B, Lq, T, pad, posmode):
    kpm = None
    if pad:
        kpm = torch.rand(B, T, generator=gen) > 0.3
        kpm[0, :T // 4] = False  # left padding as well as holes
        kpm[-1, T // 2:T // 2 + 40] = False  # a hole longer than a fine block
    pos = None
    if posmode == "random":
        pos = torch.stack([torch.randperm(T, generator=gen)[:Lq] for _ in range(B)])
    return kpm, pos


CASES = [
    # name, B, Hq, Hkv, Lq, T, D, W, topk, bf, ff, pad, posmode, integer, dtype, block_q
    ("gqa-gauss-chunk", 1, 4, 2, 128, 230, 8, 16, 3, 2.0, 0.0, False, None, False, torch.float32, 128),
    ("int-ties-pad-ff", 2, 2, 1, 160, 160, 8, 8, 4, 1.0, 1.0, True, None, True, torch.float32, 128),
    ("preset-bf16-pad", 1, 2, 1, 96, 420, 16, 24, 8, 0.35, 0.0, True, None, False, torch.bfloat16, 128),
    ("random-pos-fp16-int", 2, 2, 2, 24, 300, 8, 5, 2, 2.0, 0.0, True, "random", True, torch.float16, 8),
    # one-key fine blocks, topk 1: more coarse blocks than the 2 refined, so coarse ties matter
    ("one-key-blocks-top1", 1, 2, 1, 120, 120, 4, 4, 1, 0.0, 0.0, False, None, True, torch.float32, 128),
    ("decode-gqa", 2, 4, 1, 1, 333, 8, 12, 3, 2.0, 0.0, True, None, False, torch.float32, 1),
    # spans of ~240 keys over coarse blocks of 128: one kept span covers up to 3 coarse blocks' slots
    ("long-spans", 1, 2, 1, 32, 400, 8, 16, 3, 8.0, 4.0, False, None, True, torch.float32, 16),
]


# search_key="block_rerank": few queries (the interpreter runs one program per (query, head) row)
RERANK_CASES = [
    ("rr-int-ties-pad-pos", 2, 2, 1, 8, 300, 8, 5, 2, 2.0, 0.0, True, "random", True, torch.float16, 8),
    ("rr-gauss-bf16-gqa-ff", 1, 4, 2, 6, 230, 8, 16, 3, 2.0, 1.0, False, None, False, torch.bfloat16,
     8),
    ("rr-int-long-spans", 1, 2, 1, 8, 400, 8, 16, 3, 8.0, 4.0, False, None, True, torch.float32, 8),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_block_search_matches_reference(case):
    _check_against_reference(case, "block")


@pytest.mark.parametrize("case", RERANK_CASES, ids=[c[0] for c in RERANK_CASES])
def test_block_rerank_matches_reference(case):
    """The block kernel's RERANK topk best candidates, rescored exactly by _rerank_kernel, then the
    greedy: anchors identical to the reference's; the case must make the rerank matter (other
    anchors than "block" in some rows)."""
    a, qs, k, args = _check_against_reference(case, "block_rerank")
    rb, _ = R.span_search(qs, k, *args[:-4], "block", 0)
    assert (rb != a).any(-1).sum() >= a[..., 0].numel() // 4


@pytest.mark.parametrize("rerank", [1, 2])
def test_block_rerank_small_pool_matches_reference(rerank):
    """A pool smaller than the candidates (the default rerank = 32 rescores every candidate of these
    small cases): the block kernel's cut at the rerank topk best by bound (ties: the nearer block)
    must drop the same candidates as the reference."""
    _check_against_reference(RERANK_CASES[rerank - 1], "block_rerank", rerank=rerank)


@pytest.mark.parametrize("fine_block", [4, 32])
def test_other_fine_blocks_match_reference(fine_block):
    """config.fine_block other than 16: the kernel's levels and tiles follow the reference's."""
    _check_against_reference(RERANK_CASES[0], "block_rerank", fine_block=fine_block)
    _check_against_reference(CASES[0], "block", fine_block=fine_block)


@pytest.mark.parametrize("chunk", [1, 8])
def test_block_rerank_chunks_match_reference(chunk):
    """_rerank_kernel gathering 1 or 8 candidate blocks per step (the default is 4)."""
    _check_against_reference(RERANK_CASES[0], "block_rerank", rerank_chunk=chunk)


def _check_against_reference(case, search_key, fine_block=16, rerank=32, **launch):
    """The kernel against reference.span_search on the case's fresh inputs; returns the kernel's
    anchors and the inputs."""
    name, B, Hq, Hkv, Lq, T, D, W, topk, bf, ff, pad, posmode, integer, dtype, bq = case
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    qs, k = _data(gen, B, Hq, Hkv, Lq, T, D, integer, dtype)
    kpm, pos = _extras(gen, B, Lq, T, pad, posmode)
    args = (kpm, pos, W, topk, 0.5, 0.5, bf, ff, search_key, 0, fine_block, rerank)
    ra, rs = R.span_search(qs, k, *args)
    dev = lambda x: x.to(DEV) if torch.is_tensor(x) else x  # noqa: E731
    poison()
    a, s = TB.span_search(dev(qs), dev(k), *map(dev, args), block_q=bq, **launch)
    a, s = a.cpu(), s.cpu()
    assert (ra >= 0).sum() > ra.numel() // 3, "the case must keep spans"
    assert torch.equal(a, ra), (name, (a != ra).nonzero()[:4].tolist())
    if integer:
        assert torch.equal(s, rs)
    else:
        torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-4)
    if integer and topk > 1:  # equal bounds occur among the kept spans: the tie rules are exercised
        kept = s[..., 1:][a[..., 1:] >= 0]
        assert (kept == s[..., :-1][a[..., 1:] >= 0]).any()
    return a, qs, k, args


def test_short_sequences_and_empty_rows():
    """Queries before the window keep nothing; T smaller than a fine block; every key padded."""
    gen = torch.Generator().manual_seed(3)
    qs, k = _data(gen, 2, 2, 1, 20, 20, 8, False, torch.float32)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[1] = False
    for args in [(None, None, 6, 3, 0.5, 0.5, 30.0, 0.0, "block", 0),  # e <= 13 < 16: only a partial fine block
                 (kpm, None, 3, 2, 0.5, 0.5, 2.0, 0.0, "block", 0)]:
        ra, rs = R.span_search(qs, k, *args)
        poison()
        a, s = TB.span_search(qs.to(DEV), k.to(DEV), *[x.to(DEV) if torch.is_tensor(x) else x
                                                       for x in args], block_q=32)
        assert torch.equal(a.cpu(), ra)
        torch.testing.assert_close(s.cpu(), rs, rtol=1e-5, atol=1e-4)
        assert (ra[:, :, :args[2]] == -1).all() and (ra >= 0).any()


@pytest.mark.parametrize("search_key", ["block", "block_rerank"])
def test_dispatch_runs_the_kernel(search_key, monkeypatch):
    """torch.ops.superlinear.span_search (forced onto Triton) routes "block" and "block_rerank" to
    this kernel; a window covering every key, or T <= dense_below, keeps no span."""
    gen = torch.Generator().manual_seed(4)
    qs, k = _data(gen, 1, 2, 1, 3, 70, 8, False, torch.float32)
    args = (None, None, 8, 2, 0.5, 0.5, 2.0, 0.0, search_key, 0)
    ra, rs = R.span_search(qs, k, *args)
    calls = through_triton(monkeypatch, (TB, "span_search"))
    a, s = torch.ops.superlinear.span_search(qs.to(DEV), k.to(DEV), *args)
    assert calls and torch.equal(a.cpu(), ra)
    torch.testing.assert_close(s.cpu(), rs, rtol=1e-5, atol=1e-4)
    for w, below in [(70, 0), (8, 70)]:
        a, s = TI.span_search(qs, k, None, None, w, 2, 0.5, 0.5, 2.0, 0.0, search_key, below)
        assert (a == -1).all() and (s == float("-inf")).all()


def test_bad_inputs_raise():
    q, k = _data(torch.Generator().manual_seed(0), 1, 3, 2, 4, 40, 8, False, torch.float32)
    with pytest.raises(ValueError, match="kv heads"):
        TB.span_search(q, k, None, None, 4, 2, 0.5, 0.5, 2.0, 0.0, "block", 0)
    q = q[:, :2]
    with pytest.raises(ValueError, match="topk"):
        TB.span_search(q, k, None, None, 4, 9, 0.5, 0.5, 2.0, 0.0, "block", 0)
    with pytest.raises(ValueError, match="search_key"):
        TB.span_search(q, k, None, None, 4, 2, 0.5, 0.5, 2.0, 0.0, "anchor", 0)
    with pytest.raises(ValueError, match="dtype|bf16"):
        TB.span_search(q.double(), k.double(), None, None, 4, 2, 0.5, 0.5, 2.0, 0.0, "block", 0)


@pytest.mark.parametrize("W,bf", [(5, 0.0), (8, 0.35), (24, 2.0), (64, 8.0)])
def test_tile_columns_cover_every_query(W, bf):
    """The host's tile width (no device synchronisation) is >= R = 2^c of every query it serves
    (brute force over t with the reference's block levels), and not above 2 R."""
    T = 5000
    back, _ = span_extents(T, 0.5, bf, 0.0)
    for t0 in (W, T // 2, T - 1):
        t = torch.arange(max(t0, W), T)
        jf, jc = R._block_levels(t - W, back[t], 16)
        r_max = int((1 << (jc - jf)).max())
        rp = TB._max_fine_per_coarse(T, W, t0, 0.5, bf, 4)
        assert r_max <= rp <= 2 * r_max, (t0, r_max, rp)


def test_tile_columns_for_pretrained_128k():
    """for_pretrained at 128K: fine blocks of fine_block = 16 keys, nf = 8192, so R = 128 tile
    columns, not the 256 that the finest level (8 keys at t = W) would give."""
    cfg = SuperlinearConfig.for_pretrained()
    T = 131072
    back, _ = span_extents(T, cfg.span_power, cfg.backward_factor, cfg.forward_factor)
    t = torch.arange(cfg.window, T)
    jf, jc = R._block_levels(t - cfg.window, back[t], cfg.fine_block)
    assert cfg.fine_block == 16 and int((1 << (jc - jf)).max()) == 128
    assert TB._max_fine_per_coarse(T, cfg.window, cfg.window, cfg.span_power,
                                   cfg.backward_factor, 4) == 128
