"""The decode kernels (kernels/triton_decode.py) against the reference, under TRITON_INTERPRET=1.

Tiny shapes, fresh random inputs, poisoned allocator. Span-search is compared exactly on
integer-valued inputs (every dot product is exact in any summation order, and equal scores are
common, so the tie rule - the nearer anchor wins, at the chunk level and in the merge - is tested
too) and on Gaussian inputs. Span-attention is given the reference's anchors.
"""

from __future__ import annotations

import math

import pytest
import torch
from triton_env import DEV, poison, require_triton

triton = require_triton()

from slcompile.kernels import reference as R  # noqa: E402
from slcompile.kernels import triton_decode as TD  # noqa: E402
from slcompile.kernels import triton_impl as TI  # noqa: E402


def _cfg(**ch):
    c = dict(window=8, sinks=2, topk=3, search_power=0.5, span_power=0.5, backward_factor=2.0,
             forward_factor=0.0, combine="union", search_key="anchor")
    c.update(ch)
    return c


def _data(gen, B, Hq, Hkv, Lq, T, D, integer=False, dtype=torch.float32):
    if integer:
        q = torch.randint(-2, 3, (B, Hq, Lq, D), generator=gen).float()
        k = torch.randint(-2, 3, (B, Hkv, T, D), generator=gen).float()
    else:
        q = torch.randn(B, Hq, Lq, D, generator=gen)
        k = torch.randn(B, Hkv, T, D, generator=gen)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    return q.to(dtype).to(DEV), k.to(dtype).to(DEV), v.to(dtype).to(DEV)


def _extras(gen, B, Lq, T, pad, posmode):
    kpm = None
    if pad:
        kpm = torch.rand(B, T, generator=gen) > 0.25
        kpm[0, :T // 3] = False  # left padding, as generate() does
        kpm = kpm.to(DEV)
    pos = None
    if posmode == "static":  # a static cache: queries at a runtime offset, slots after them unused
        off = int(torch.randint(T // 2, T - Lq, (1,), generator=gen))
        pos = (torch.arange(Lq) + off).expand(B, Lq).contiguous().to(DEV)
    elif posmode == "random":
        pos = torch.stack([torch.randperm(T, generator=gen)[:Lq] for _ in range(B)]).to(DEV)
    return kpm, pos


SEARCH_CASES = [
    # name, B, Hq, Hkv, Lq, T, D, cfg, pad, posmode, integer
    ("decode", 1, 4, 2, 1, 300, 16, {}, False, None, True),
    ("decode-gauss-pad", 1, 2, 1, 1, 120, 16, {}, True, None, False),
    ("chunk2-static", 1, 4, 2, 2, 150, 8, {"topk": 4}, True, "static", True),
    ("random-pos-p13", 1, 2, 2, 2, 120, 8, {"search_power": 1 / 3, "window": 3}, False, "random", True),
]


@pytest.mark.parametrize("case", SEARCH_CASES, ids=[c[0] for c in SEARCH_CASES])
def test_decode_search_matches_reference(case):
    name, B, Hq, Hkv, Lq, T, D, ch, pad, posmode, integer = case
    gen = torch.Generator().manual_seed(hash(name) % 10_000)
    cfg = _cfg(**ch)
    qs, k, _ = _data(gen, B, Hq, Hkv, Lq, T, D, integer)
    kpm, pos = _extras(gen, B, Lq, T, pad, posmode)
    args = (kpm, pos, cfg["window"], cfg["topk"], cfg["search_power"], cfg["span_power"],
            cfg["backward_factor"], cfg["forward_factor"], "anchor", 0)
    ra, rs = R.span_search(qs.cpu(), k.cpu(), *[x.cpu() if torch.is_tensor(x) else x for x in args])
    poison()
    a, s = TD.span_search(qs, k, *args, block_stripes=4)  # several stripe chunks per query
    assert torch.equal(a.cpu(), ra), name
    if integer:
        assert torch.equal(s.cpu(), rs)
    else:
        torch.testing.assert_close(s.cpu(), rs, rtol=1e-5, atol=1e-5)
    if name == "decode":  # the op-level dispatch picks the decode path, one chunk of stripes
        assert TD.use_decode(qs, k)
        a, _ = TI.span_search(qs, k, *args)
        assert torch.equal(a.cpu(), ra)


ATTN_CASES = [
    # name, B, Hq, Hkv, Lq, T, D, cfg, pad, posmode, dtype
    ("union", 1, 2, 1, 1, 220, 16, {}, False, None, torch.float32),
    ("union-pad-static", 2, 2, 1, 1, 160, 16, {"topk": 4}, True, "static", torch.float32),
    ("gated", 1, 2, 2, 2, 170, 8, {"combine": "gated"}, True, "static", torch.float32),
    ("gated-random-ff", 1, 2, 1, 2, 150, 16, {"combine": "gated", "forward_factor": 1.0, "sinks": 0},
     False, "random", torch.float32),
    ("bf16-nowindow", 1, 2, 1, 1, 140, 16, {"window": 0, "sinks": 5}, True, None, torch.bfloat16),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def test_decode_attention_matches_reference(case):
    name, B, Hq, Hkv, Lq, T, D, ch, pad, posmode, dtype = case
    gen = torch.Generator().manual_seed(hash(name) % 10_000)
    cfg = _cfg(**ch)
    q, k, v = _data(gen, B, Hq, Hkv, Lq, T, D, dtype=dtype)
    kpm, pos = _extras(gen, B, Lq, T, pad, posmode)
    cpu = lambda x: x.cpu() if torch.is_tensor(x) else x  # noqa: E731
    a, s = R.span_search(q.cpu(), k.cpu(), cpu(kpm), cpu(pos), cfg["window"], cfg["topk"],
                         cfg["search_power"], cfg["span_power"], cfg["backward_factor"],
                         cfg["forward_factor"], "anchor", 0)
    assert (a >= 0).any()
    scale = 1 / math.sqrt(D)
    rest = (cfg["window"], cfg["sinks"], cfg["span_power"], cfg["backward_factor"],
            cfg["forward_factor"], cfg["combine"], scale)
    ref = R.span_attention(q.cpu(), k.cpu(), v.cpu(), a, s, cpu(kpm), cpu(pos), *rest, 0)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    poison()
    out = TD.span_attention(q, k, v, a.to(DEV), s.to(DEV), kpm, pos, *rest, 0, block_n=16)
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu().float(), ref.float(), **tol)
    if name == "union":  # the op-level dispatch, one chunk per segment
        out = TI.span_attention(q, k, v, a.to(DEV), s.to(DEV), kpm, pos, *rest, 0)
        torch.testing.assert_close(out.cpu().float(), ref.float(), **tol)
    if name == "union-pad-static":  # dense (T <= dense_below): flash-decoding, exact attention
        dref = R.dense_attention(q.cpu(), k.cpu(), v.cpu(), cpu(kpm), cpu(pos), scale)
        dense = TD.span_attention(q, k, v, a.to(DEV), s.to(DEV), kpm, pos, *rest, T, block_n=64)
        torch.testing.assert_close(dense.cpu().float(), dref.float(), **tol)


def test_decode_rows_without_keys_give_zeros_and_causality():
    """A query whose keys are all padded outputs zeros; keys after a query's position (the unused
    slots of a static cache) change nothing."""
    gen = torch.Generator().manual_seed(7)
    B, Hq, Hkv, Lq, T, D = 2, 1, 1, 1, 130, 8
    q, k, v = _data(gen, B, Hq, Hkv, Lq, T, D)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1] = False
    kpm = kpm.to(DEV)
    pos = torch.tensor([[100], [110]], device=DEV)
    cfg = _cfg()
    sargs = (cfg["window"], cfg["topk"], cfg["search_power"], cfg["span_power"],
             cfg["backward_factor"], cfg["forward_factor"], "anchor", 0)
    rest = (cfg["window"], cfg["sinks"], cfg["span_power"], cfg["backward_factor"],
            cfg["forward_factor"], "union", 0.3, 0)
    a, s = TD.span_search(q, k, kpm, pos, *sargs)
    out = TD.span_attention(q, k, v, a, s, kpm, pos, *rest)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 101:] = torch.randn_like(k2[:, :, 101:]) * 100
    v2[:, :, 101:] = float("nan")
    a2, s2 = TD.span_search(q, k2, kpm, pos, *sargs)
    out2 = TD.span_attention(q, k2, v2, a2, s2, kpm, pos, *rest)
    assert torch.equal(a2[0], a[0]) and torch.equal(out2[0], out[0])


def test_decode_bad_inputs_raise():
    q, k, v = _data(torch.Generator().manual_seed(0), 1, 2, 1, 1, 50, 8)
    a = torch.full((1, 2, 1, 2), -1, dtype=torch.int32, device=DEV)
    s = torch.zeros(1, 2, 1, 2, device=DEV)
    with pytest.raises(ValueError, match="combine"):
        TD.span_attention(q, k, v, a, s, None, None, 4, 1, 0.5, 2.0, 0.0, "sum", 0.3, 0)
    with pytest.raises(ValueError, match="anchors"):
        TD.span_attention(q, k, v, a[:, :1], s[:, :1], None, None, 4, 1, 0.5, 2.0, 0.0, "union", 0.3, 0)
    with pytest.raises(ValueError, match="search_key"):
        TD.span_search(q, k, None, None, 4, 2, 0.5, 0.5, 2.0, 0.0, "mean", 0)
