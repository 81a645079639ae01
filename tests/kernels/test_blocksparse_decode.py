"""kernels/blocksparse_decode.py: a decoded token's (or short chunk's) prepared launches are the
general path's launches value for value (recorded from both, token after token, across the
length classes the plan keys on), their outputs equal the general path's bit for bit and the
reference's within tolerance, and the calls the plan cannot take run the general path."""

from __future__ import annotations

import pytest
import torch
from triton_env import DEV, INTERPRETED, poison, require_triton, through_triton

require_triton()

from slcompile.kernels import blocksparse as bs  # noqa: E402
from slcompile.kernels import blocksparse_decode as BD  # noqa: E402
from slcompile.kernels import launch as L  # noqa: E402
from slcompile.kernels import triton_blocksparse as TB  # noqa: E402
from slcompile.kernels import triton_blocksparse_search as TS  # noqa: E402

# window sinks topk q_block k_block rows pool exact_rows group: 4-block groups of 16 keys, so that
# short caches cross several stage-1 group counts (the plan's length classes)
CFG = dict(window=64, sinks=4, topk=3, q_block=32, k_block=16, rows=4, pool=2, exact_rows=8,
           group=4)
KERNELS = ((TS, "_bound_kernel"), (TS, "_exact_kernel"), (TB, "_fwd_kernel"),
           (TB, "_combine_kernel"))


class _Recorded:
    """A kernel whose launches are logged (kernel, grid, every parameter by name, options) and
    then run."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log
        self.params = getattr(kernel, "params", None)
        self.arg_names = getattr(kernel, "arg_names", None)
        self.fn = getattr(kernel, "fn", None)
        self.__name__ = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__

    def __getitem__(self, grid):
        names, _ = L._params(self.kernel)

        def call(*args, **kw):
            values = dict(zip(names, args))
            values.update({n: v for n, v in kw.items() if n in names})
            opts = {n: v for n, v in kw.items() if n not in names}
            self.log.append((self.__name__, tuple(grid), values, opts))
            return self.kernel[grid](*args, **kw)
        return call


def _op(q, k, v, summary, scale=0.25):
    c = CFG
    return torch.ops.superlinear.block_sparse_attention(
        q, k, v, None, None, c["window"], c["sinks"], c["topk"], scale, 0, c["q_block"],
        c["k_block"], c["rows"], c["pool"], summary, c["exact_rows"], c["group"], False)


def _reference(q, k, v, scale=0.25):
    c = CFG
    T, Lq = k.shape[2], q.shape[2]
    return bs.superlinear_block_attention(
        q, k, v, None, T - Lq, window=c["window"], sinks=c["sinks"], topk=c["topk"],
        q_block=c["q_block"], k_block=c["k_block"], rows=c["rows"], pool=c["pool"],
        exact_rows=c["exact_rows"], group=c["group"], scale=scale, dense_below=0)


def _canonical(log, inputs):
    """The launches with each tensor replaced by its dtype and either the input it is (by address)
    or the order in which its address first appeared among the fresh ones."""
    fresh: dict = {}
    out = []
    for name, grid, values, opts in log:
        vals = {}
        for n, x in values.items():
            if isinstance(x, torch.Tensor):
                ptr = x.data_ptr()
                given = [i for i, t in inputs.items() if t.data_ptr() == ptr]
                vals[n] = (x.dtype, given[0] if given else fresh.setdefault(ptr, len(fresh)))
            else:
                vals[n] = x
        out.append((name, grid, vals, opts))
    return out


def _tokens(seed, lengths, Lq, Hq=4, Hkv=2, D=16, dtype=torch.float32, B=1):
    """(q, k, v, summaries) for each cache length: one key tensor grown token by token, its
    summaries kept as a cache keeps them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = max(lengths)
    k_all = torch.randn(B, Hkv, n, D, generator=g).to(DEV, dtype)
    v_all = torch.randn(B, Hkv, n, D, generator=g).to(DEV, dtype)
    q_all = torch.randn(B, Hq, n, D, generator=g).to(DEV, dtype)
    cache = bs.BlockSummaryCache(bs.summary_keys(CFG["window"], CFG["k_block"], CFG["group"]))
    for T in lengths:
        k, v = k_all[:, :, :T].contiguous(), v_all[:, :, :T].contiguous()
        summary = cache.update(k, cache.length)
        yield q_all[:, :, T - Lq:T].contiguous(), k, v, summary


# lengths across group counts 1..7 (64-key groups; 1 and 2+ keep 1 and 2 groups: two plans) and
# fronts across the query block; chunks of 3 queries, some of them over two query blocks (the
# general path's)
LENGTHS = [50, 70, 100, 127, 128, 129, 200, 255, 256, 300, 383, 384, 385]


@pytest.mark.parametrize("Lq,B", [(1, 1), (3, 1), (1, 2)])
def test_prepared_launches_are_the_general_paths(monkeypatch, Lq, B):
    through_triton(monkeypatch)
    monkeypatch.setattr(BD, "_PLANS", {})
    logs = {"prepared": [], "general": []}
    for which in ("prepared", "general"):
        for module, name in KERNELS:
            monkeypatch.setattr(module, name, _Recorded(getattr(module, name), logs[which]))
        if which == "general":
            monkeypatch.setattr(BD, "attention", lambda *a, **kw: None)
        outs = []
        for q, k, v, summary in _tokens(0, LENGTHS if B == 1 else LENGTHS[::3], Lq, B=B):
            start = len(logs[which])
            poison()
            outs.append(_op(q, k, v, summary))
            logs[which][start:] = _canonical(logs[which][start:],
                                             dict(q=q, k=k, v=v, summary=summary))
        for module, name in KERNELS:
            monkeypatch.setattr(module, name, getattr(module, name).kernel)
        logs[which + " outputs"] = outs
    assert len(logs["prepared"]) == len(logs["general"]) >= 3 * len(LENGTHS) // (1 if B == 1 else 3)
    for got, want in zip(logs["prepared"], logs["general"]):
        assert got == want
    for got, want in zip(logs["prepared outputs"], logs["general outputs"]):
        assert torch.equal(got, want)
    assert sum(p is not None for p in BD._PLANS.values()) == 2  # one and 2+ stage-1 groups


@pytest.mark.parametrize("Lq", [1, 2])
def test_prepared_decoding_matches_the_reference(monkeypatch, Lq):
    calls = through_triton(monkeypatch, (TS, "block_select_triton"))
    monkeypatch.setattr(BD, "_PLANS", {})
    for q, k, v, summary in _tokens(1, [95, 160, 256, 334], Lq, Hq=8, Hkv=2, D=32):
        poison()
        got = _op(q, k, v, summary)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, _reference(q, k, v), atol=2e-4, rtol=2e-4)
    assert calls == []  # every token took the prepared launches
    assert any(p is not None for p in BD._PLANS.values())


def test_calls_the_plan_cannot_take_run_the_general_path(monkeypatch):
    calls = through_triton(monkeypatch, (TS, "block_select_triton"))
    monkeypatch.setattr(BD, "_PLANS", {})
    (q, k, v, summary), = _tokens(2, [200], 1)
    torch.testing.assert_close(_op(q, k, v, summary, scale=-0.25),
                               _reference(q, k, v, scale=-0.25), atol=2e-4, rtol=2e-4)
    assert calls == ["block_select_triton"]  # a negative scale
    (q, k, v, summary), = _tokens(2, [156], 6)  # queries 150..155: rows 22..27, tiles of 8
    torch.testing.assert_close(_op(q, k, v, summary), _reference(q, k, v), atol=2e-4, rtol=2e-4)
    assert calls == ["block_select_triton"] * 2
    (q, k, v, summary), = _tokens(2, [200], 1)
    with pytest.raises(ValueError, match="block summaries"):
        _op(q, k, v, summary[:, :, :1])  # too few summaries: the general path's error
    with pytest.raises(ValueError, match="dtypes"):
        _op(q, k.double(), v, summary)


def test_sites_check_their_parameters():
    with pytest.raises(TypeError, match="fixed"):
        L.Site(TB._combine_kernel, dict(ML0=0), ("PACC",), num_warps=4)
    names, constexpr = L._params(TB._combine_kernel)
    with pytest.raises(TypeError, match="no constexpr"):
        L.Site(TB._combine_kernel, {n: 0 for n in names if n != "SPLIT"}, ("SPLIT",),
               num_warps=4)
    assert "SPLIT" in constexpr and "PACC" not in constexpr


@pytest.mark.skipif(INTERPRETED, reason="direct launches need compiled kernels on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prepared_direct_launches_give_what_tritons_own_launches_give(monkeypatch, dtype):
    """On a GPU, token after token (lengths of every residue mod 16, group counts crossed): the
    prepared launches, direct once a key is known, give exactly the general path's outputs through
    Triton's own launches, and the reference's within bf16/fp32 tolerance."""
    monkeypatch.setattr(BD, "_PLANS", {})
    lengths = list(range(1000, 1040)) + [4095, 4096, 4097]

    def decode(Hq=32, Hkv=8, D=128):
        return [_op(q, k, v, s, scale=D ** -0.5) for q, k, v, s in
                _tokens(3, lengths, 1, Hq, Hkv, D, dtype)]
    poison()
    prepared = decode()
    assert any(site.table for p in BD._PLANS.values() if p is not None
               for site in (p.stage1, p.stage2, p.attend))  # direct launches ran
    monkeypatch.setattr(BD, "attention", lambda *a, **kw: None)
    monkeypatch.setattr(L, "_info", lambda kernel: None)  # Triton's own launches only
    poison()
    general = decode()
    for got, want in zip(prepared, general):
        assert not torch.isnan(got).any()
        assert torch.equal(got, want)
    (q, k, v, _), = _tokens(3, [lengths[-1]], 1, 32, 8, 128, dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
    torch.testing.assert_close(prepared[-1].float(), _reference(q, k, v, 128 ** -0.5).float(),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("T,dtype", [(200, torch.float32), (256, torch.bfloat16),
                                     (37, torch.float16)])
def test_summaries_in_one_pass_equal_the_torch_summaries(T, dtype):
    g = torch.Generator(device="cpu").manual_seed(T)
    k = torch.randn(2, 3, T, 24, generator=g).to(DEV, dtype)[:, :, :, :20]  # strided, D=20
    poison()
    got = TS.summaries_triton(k, 64)
    want = bs.block_summaries(k, None, 64)[0]
    assert got.shape == want.shape == (2, 3, -(-T // 64), 40)
    assert torch.equal(got, want)  # maxima and minima: exact in any dtype


def test_a_token_without_kept_summaries_takes_the_prepared_launches(monkeypatch):
    """No summaries kept with the cache (a compiled model's decoded token): one launch builds
    them from the keys, then the prepared launches, which give what kept summaries give."""
    calls = through_triton(monkeypatch, (TS, "block_select_triton"), (TS, "summaries_triton"))
    monkeypatch.setattr(BD, "_PLANS", {})
    for q, k, v, summary in _tokens(4, [150, 321], 1):
        poison()
        got = _op(q, k, v, None)
        assert torch.equal(got, _op(q, k, v, summary))
        torch.testing.assert_close(got, _reference(q, k, v), atol=2e-4, rtol=2e-4)
    assert calls == ["summaries_triton"] * 2  # never the general search
