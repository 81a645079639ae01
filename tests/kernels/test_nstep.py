"""The N-step search (docs/nstep.md, ``SuperlinearConfig(steps>=3)``) against a brute-force oracle
written from docs/nstep.md: Python loops per query, explicit position sets, float64 attention.

Search inputs are small integers (exact in bf16 and in float32 sums), so scores are exact in every
implementation and the many exact ties exercise the tie rules. The Triton kernel runs under
TRITON_INTERPRET=1 (SLCOMPILE_FORCE_TRITON routes the op through it) with poisoned outputs.
"""

from __future__ import annotations


import pytest
import torch

from oracle import oracle_cells, oracle_nstep_attention, oracle_nstep_search
from triton_env import DEV, poison, require_triton, through_triton
from slcompile.kernels import nstep as NS
from slcompile.kernels import reference as R
from slcompile.kernels.config import SuperlinearConfig
from slcompile.kernels.geometry import span_extents

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _cfg(**kw):
    c = dict(window=4, sinks=2, topk=2, steps=3, backward_factor=2.0, forward_factor=0.0,
             combine="union", search_key="anchor", dense_below=0)
    c.update(kw)
    return c


def _int_inputs(gen, B, Hq, Hkv, Lq, T, D, Dv=None):
    """Small-integer q/k (exact scores everywhere, many ties), normal v."""
    q = torch.randint(-3, 4, (B, Hq, Lq, D), generator=gen).float()
    k = torch.randint(-3, 4, (B, Hkv, T, D), generator=gen).float()
    v = torch.randn(B, Hkv, T, Dv or D, generator=gen)
    return q, k, v


def _search(q, k, kpm, pos, c):
    return NS.nstep_search(q, k, kpm, pos, c["window"], c["topk"], c["steps"], c["backward_factor"],
                           c["forward_factor"], c["search_key"], c["dense_below"])


def _attend(q, k, v, a, s, kpm, pos, c, scale):
    return R.span_attention(q, k, v, a, s, kpm, pos, c["window"], c["sinks"], 1.0 / c["steps"],
                            c["backward_factor"], c["forward_factor"], c["combine"], scale,
                            c["dense_below"])


def _positions(B, Lq, T):
    return (torch.arange(Lq) + T - Lq).expand(B, Lq)


def _subset(gen, B, T, n):
    """Random query positions [B, n] (a decode-like subset of a prefill's rows)."""
    return torch.stack([torch.randperm(T, generator=gen)[:n].sort().values for _ in range(B)])


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------

def test_config_steps_field():
    c = SuperlinearConfig(steps=3)
    assert c.steps == 3 and c.attention_span_power == pytest.approx(1 / 3)
    assert SuperlinearConfig.from_dict(c.to_dict()) == c
    d = SuperlinearConfig()
    assert d.steps == 2 and d.attention_span_power == d.span_power
    assert SuperlinearConfig(steps=4, search_key="mean").replace(steps=2).search_key == "mean"
    for bad, msg in [(dict(steps=1), "steps"), (dict(steps=9), "steps"), (dict(steps=3.0), "steps"),
                     (dict(steps=True), "steps"),
                     (dict(steps=3, search_key="blocksparse"), "search_key"),
                     (dict(steps=3, span_power=1 / 3), "span_power"),
                     (dict(steps=3, search_power=0.4), "search_power")]:
        with pytest.raises(ValueError, match=msg):
            SuperlinearConfig(**bad)


def test_steps_2_is_the_spec_path_bit_identical():
    import slcompile
    gen = torch.Generator().manual_seed(11)
    q, k, v = torch.randn(1, 4, 90, 8, generator=gen), torch.randn(1, 2, 90, 8, generator=gen), \
        torch.randn(1, 2, 90, 8, generator=gen)
    c = SuperlinearConfig(search_key="anchor", window=8, dense_below=0)
    out = slcompile.superlinear_attention(q, k, v, config=c, enable_gqa=True)
    a, s = R.span_search(q, k, None, None, 8, 3, 0.5, 0.5, 2.0, 0.0, "anchor", 0)
    ref = R.span_attention(q, k, v, a, s, None, None, 8, 4, 0.5, 2.0, 0.0, "union", 8 ** -0.5, 0)
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------
# the search and the attention against the oracle
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("N,search_key,pad,bf,ff", [
    (3, "anchor", False, 2.0, 0.0), (3, "anchor", True, 1.0, 1.0), (3, "mean", True, 2.0, 0.0),
    (4, "anchor", True, 2.0, 0.0), (4, "mean", False, 0.5, 1.5)])
def test_search_matches_oracle(N, search_key, pad, bf, ff):
    gen = torch.Generator().manual_seed(100 * N + 7 * pad + int(10 * ff))
    B, Hq, Hkv, T, D = 2, 4, 2, 160, 6
    c = _cfg(steps=N, search_key=search_key, backward_factor=bf, forward_factor=ff, topk=2)
    if search_key == "anchor":
        q, k, _ = _int_inputs(gen, B, Hq, Hkv, T, T, D)
    else:  # float inputs: means of integers would make exact ties depend on rounding order
        q, k = torch.randn(B, Hq, T, D, generator=gen), torch.randn(B, Hkv, T, D, generator=gen)
    kpm = (torch.rand(B, T, generator=gen) > 0.3) if pad else None
    pos = _subset(gen, B, T, 24)
    qs = torch.gather(q, 2, pos[:, None, :, None].expand(B, Hq, 24, D))
    a, s = _search(qs, k, kpm, pos, c)
    oa, os_ = oracle_nstep_search(qs, k, kpm, pos, c)
    assert torch.equal(a.long(), oa)
    assert torch.allclose(s.double(), os_, rtol=1e-5, atol=1e-5)
    assert (a >= 0).any()  # the test exercises kept cells


@pytest.mark.parametrize("combine,search_key,pad", [("union", "anchor", True), ("gated", "mean", False)])
def test_attention_matches_oracle(combine, search_key, pad):
    import slcompile
    gen = torch.Generator().manual_seed(5 + pad)
    B, Hq, Hkv, T, D = 1, 4, 2, 140, 6
    c = _cfg(combine=combine, search_key=search_key, window=5, sinks=2)
    q, k, v = _int_inputs(gen, B, Hq, Hkv, T, T, D) if search_key == "anchor" else \
        (torch.randn(B, Hq, T, D, generator=gen), torch.randn(B, Hkv, T, D, generator=gen),
         torch.randn(B, Hkv, T, D, generator=gen))
    kpm = (torch.rand(B, T, generator=gen) > 0.25) if pad else None
    pos = _subset(gen, B, T, 20)
    qs = torch.gather(q, 2, pos[:, None, :, None].expand(B, Hq, 20, D))  # the search query
    qa = qs * 0.3 + 0.1 * torch.randn(qs.shape, generator=gen)  # the attention query
    cfg = SuperlinearConfig(**{k_: c[k_] for k_ in ("window", "sinks", "topk", "steps", "combine",
                                                     "search_key", "dense_below")})
    out = slcompile.superlinear_attention(qa, k, v, config=cfg, scale=0.5, enable_gqa=True,
                                          key_padding_mask=kpm, query_positions=pos, search_query=qs)
    oa, os_ = oracle_nstep_search(qs, k, kpm, pos, c)
    ref = oracle_nstep_attention(qa, k, v, c, 0.5, kpm, pos, oa, os_)
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()
    dense = R.dense_attention(qa, k, v, kpm, pos, 0.5)
    assert not torch.allclose(out, dense, atol=1e-3)  # the spans did restrict the attention


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("N", [3, 4])
def test_cells_tile_the_past_and_lie_in_their_spans(N):
    gen = torch.Generator().manual_seed(N)
    T = 2000
    fwd_t, cell, ncell, fan = NS.tables(T, 64, N, 2.0, 0.5)
    back, fwd = span_extents(T, 1.0 / N, 2.0, 0.5)
    for t in torch.randint(0, T, (12,), generator=gen).tolist() + [63, 64, T - 1]:
        s, n, f, fw, cells = oracle_cells(t, T, 64, N, 2.0, 0.5)
        assert (int(cell[t]), int(ncell[t]), int(fan[t])) == (s, n, f)
        covered = []
        for j, lo, hi, a in cells:
            covered += range(lo, hi + 1)
            assert max(0, a - int(back[t])) <= lo and hi <= min(a + int(fwd[t]), t - 64)
        # disjoint, every position of [0, t - W] once, none in the window
        assert sorted(covered) == list(range(t - 63)) and len(covered) == len(set(covered))


def test_every_position_is_reachable():
    """A key that stands out for the query is found wherever it lies before the window (mean
    search), so the span holding it is attended: no coverage gap next to the window."""
    gen = torch.Generator().manual_seed(3)
    T, D, W, t = 200, 8, 16, 199
    q = torch.randn(1, 1, 1, D, generator=gen)
    pos = torch.tensor([[t]])
    c = _cfg(window=W, search_key="mean", topk=1)
    fwd, cell, ncell, fan = NS.tables(T, W, 3, 2.0, 0.0)
    assert int(ncell[t]) > 2 * int(fan[t]) > 4  # a real search: several top regions and cells
    back, _ = span_extents(T, 1 / 3, 2.0, 0.0)
    for x in range(0, t - W + 1):
        k = 0.01 * torch.randn(1, 1, T, D, generator=gen)
        k[0, 0, x] = 50.0 * q[0, 0, 0] / q.norm()
        a, _ = _search(q, k, None, pos, c)
        a0 = int(a[0, 0, 0, 0])
        assert max(0, a0 - int(back[t])) <= x <= min(a0, t - W), (x, a0)


def test_causality():
    import slcompile
    gen = torch.Generator().manual_seed(9)
    B, Hq, Hkv, T, D = 1, 2, 1, 100, 8
    q, k, v = (torch.randn(B, h, T, D, generator=gen) for h in (Hq, Hkv, Hkv))
    for sk in ("anchor", "mean"):
        cfg = SuperlinearConfig(window=4, sinks=1, steps=3, search_key=sk, dense_below=0, topk=2)
        out = slcompile.superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
        for cut in (53, 99):
            k2, v2 = k.clone(), v.clone()
            k2[:, :, cut:] = torch.randn(B, Hkv, T - cut, D, generator=gen) * 5
            v2[:, :, cut:] = torch.randn(B, Hkv, T - cut, D, generator=gen) * 5
            out2 = slcompile.superlinear_attention(q, k2, v2, config=cfg, enable_gqa=True)
            assert torch.equal(out[:, :, :cut], out2[:, :, :cut])
            assert not torch.equal(out[:, :, cut:], out2[:, :, cut:])


def test_exactness():
    import slcompile
    gen = torch.Generator().manual_seed(4)
    B, Hq, Hkv, T, D = 2, 4, 2, 130, 8
    q, k, v = (torch.randn(B, h, T, D, generator=gen) for h in (Hq, Hkv, Hkv))
    kpm = torch.rand(B, T, generator=gen) > 0.2
    kpm[:, 0] = True
    dense = R.dense_attention(q, k, v, kpm, None, D ** -0.5)
    for cfg in (SuperlinearConfig.exact(steps=3), SuperlinearConfig(steps=3, dense_below=T),
                SuperlinearConfig(steps=4, window=T, dense_below=0, search_key="mean")):
        out = slcompile.superlinear_attention(q, k, v, config=cfg, enable_gqa=True, key_padding_mask=kpm)
        assert torch.allclose(out, dense, atol=1e-5)
    # union mode: a query with at most topk cells keeps every cell, so its row is dense
    cfg = SuperlinearConfig(steps=3, window=6, sinks=0, topk=4, dense_below=0)
    out = slcompile.superlinear_attention(q, k, v, config=cfg, enable_gqa=True, key_padding_mask=kpm)
    _, _, ncell, _ = NS.tables(T, 6, 3, 2.0, 0.0)
    few = ncell <= 4
    assert few.sum() > 20 and (~few).sum() > 20
    assert torch.allclose(out[:, :, few], dense[:, :, few], atol=1e-5)
    assert not torch.allclose(out[:, :, ~few], dense[:, :, ~few], atol=1e-3)


def test_decode_equals_prefill():
    import slcompile
    gen = torch.Generator().manual_seed(6)
    B, Hq, Hkv, T, D = 2, 4, 2, 120, 8
    q, k, v = (torch.randn(B, h, T, D, generator=gen) for h in (Hq, Hkv, Hkv))
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, :17] = False  # left padding of the second row
    for sk in ("anchor", "mean"):
        cfg = SuperlinearConfig(window=4, steps=3, search_key=sk, dense_below=0, topk=2)
        full = slcompile.superlinear_attention(q, k, v, config=cfg, enable_gqa=True, key_padding_mask=kpm)
        for t in (70, 119):  # one decode step with a cache of t keys
            step = slcompile.superlinear_attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                                                   config=cfg, enable_gqa=True,
                                                   key_padding_mask=kpm[:, :t + 1])
            assert torch.allclose(step[:, :, 0], full[:, :, t], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# the op, the pass, export
# ------------------------------------------------------------------------------------------------

def test_opcheck():
    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 4, 60, 8, generator=gen), torch.randn(1, 2, 60, 8, generator=gen)
    kpm = torch.rand(1, 60, generator=gen) > 0.2
    for args in ((q, k, kpm, None, 4, 3, 3, 2.0, 0.0, "anchor", 0),
                 (q[:, :, -5:], k, None, torch.arange(55, 60)[None], 4, 2, 4, 1.0, 1.0, "mean", 0)):
        torch.library.opcheck(torch.ops.superlinear.nstep_search.default, args)
        a, s = torch.ops.superlinear.nstep_search(*args)
        ra, rs = NS.nstep_search(*args)
        assert a.dtype == torch.int32 and torch.equal(a, ra) and torch.equal(s, rs)


class _Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_backend_and_pass_emit_the_nstep_search():
    import slcompile
    from slcompile.passes import rewrite_graph
    gen = torch.Generator().manual_seed(12)
    q, k, v = torch.randn(1, 4, 96, 8, generator=gen), torch.randn(1, 2, 96, 8, generator=gen), \
        torch.randn(1, 2, 96, 8, generator=gen)
    opts = dict(window=4, steps=3, dense_below=0, topk=2)
    want = slcompile.superlinear_attention(q, k, v, config=SuperlinearConfig(**opts), enable_gqa=True)
    got = torch.compile(_Attn(), backend="superlinear", options={**opts, "compiler": "eager"})(q, k, v)
    assert torch.equal(got, want)
    assert not torch.allclose(got, _Attn()(q, k, v), atol=1e-3)
    ep = torch.export.export(_Attn(), (q, k, v))
    rep = rewrite_graph(ep.graph_module, SuperlinearConfig(**opts))
    targets = [str(n.target) for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    assert any("nstep_search" in x for x in targets) and not any("span_search" in x for x in targets), rep


def test_export_refuses_steps_3():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from slcompile.export import export_onnx, export_tensorrt

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            a, s = torch.ops.superlinear.nstep_search(q, k, None, None, 4, 2, 3, 2.0, 0.0, "anchor", 0)
            return torch.ops.superlinear.span_attention(q, k, v, a, s, None, None, 4, 2, 1 / 3, 2.0,
                                                        0.0, "union", 0.3, 0)

    x = torch.randn(1, 2, 40, 8)
    ep = torch.export.export(M(), (x, x, x))
    with pytest.raises(ValueError, match="nstep_search.*steps=2"):
        export_onnx(ep, "/nonexistent/never_written.onnx", example_inputs=((x, x, x), {}))
    with pytest.raises(ValueError, match="nstep_search"):
        export_tensorrt(ep, "/nonexistent/never_written.engine", example_inputs=((x, x, x), {}))


# ------------------------------------------------------------------------------------------------
# the Triton kernel (TRITON_INTERPRET=1 on CPU), against the reference
# ------------------------------------------------------------------------------------------------

def _triton_ready():
    require_triton()
    from slcompile.kernels import triton_nstep
    return triton_nstep, DEV


@pytest.mark.parametrize("N,search_key,pad,explicit_pos", [
    (3, "anchor", True, True), (3, "mean", False, False), (4, "anchor", False, True)])
def test_triton_search_matches_reference(N, search_key, pad, explicit_pos):
    TN, dev = _triton_ready()
    gen = torch.Generator().manual_seed(20 + N + pad)
    B, Hq, Hkv, T, D, Lq = 1, 4, 2, 110, 8, 12
    if search_key == "anchor":
        q, k, _ = _int_inputs(gen, B, Hq, Hkv, Lq, T, D)
    else:
        q, k = torch.randn(B, Hq, Lq, D, generator=gen), torch.randn(B, Hkv, T, D, generator=gen)
    kpm = (torch.rand(B, T, generator=gen) > 0.3) if pad else None
    pos = _subset(gen, B, T, Lq) if explicit_pos else None
    args = (kpm, pos, 4, 3, N, 2.0, 0.0, search_key, 0)
    ra, rs = NS.nstep_search(q, k, *args)
    to = (lambda x: None if x is None else x.to(dev))
    poison(dev)
    a, s = TN.nstep_search(q.to(dev), k.to(dev), to(kpm), to(pos), *args[2:])
    assert torch.equal(a.cpu(), ra)
    assert torch.allclose(s.cpu(), rs, rtol=1e-5, atol=1e-5)
    assert (ra >= 0).sum() > Lq  # kept cells were compared, not only empty slots


def test_triton_route_of_the_ops_with_span_power_one_third(monkeypatch):
    """The op dispatches to the Triton search (force_triton) and the unchanged Triton
    span-attention takes span_power = 1/3: the functional form equals the reference."""
    TN, dev = _triton_ready()
    import slcompile
    gen = torch.Generator().manual_seed(31)
    B, Hq, Hkv, T, D = 1, 2, 1, 90, 8
    q, k, _ = _int_inputs(gen, B, Hq, Hkv, T, T, D)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    cfg = SuperlinearConfig(window=4, sinks=2, topk=2, steps=3, dense_below=0)
    ref = NS.superlinear_attention(q, k, v, window=4, sinks=2, topk=2, steps=3, backward_factor=2.0,
                                   forward_factor=0.0, combine="union", search_key="anchor",
                                   dense_below=0, scale=D ** -0.5)
    calls = through_triton(monkeypatch, (TN, "nstep_search"))
    poison(dev)
    out = slcompile.superlinear_attention(q.to(dev), k.to(dev), v.to(dev), config=cfg,
                                          enable_gqa=True)
    assert calls == ["nstep_search"]
    assert torch.allclose(out.cpu(), ref, atol=2e-5), (out.cpu() - ref).abs().max()


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("search_key,pad,ff", [("anchor", True, 0.0), ("mean", True, 1.0), ("mean", False, 0.0)])
def test_search_gradient_matches_oracle(search_key, pad, ff):
    """Gradient of the kept scores (through the op's autograd) against autograd through the
    oracle's definition of a cell's score, recomputed in float64 for the anchors the op kept."""
    gen = torch.Generator().manual_seed(40 + pad + int(ff))
    B, Hq, Hkv, T, D = 1, 4, 2, 90, 5
    c = _cfg(search_key=search_key, forward_factor=ff, topk=3)
    qs = torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    kpm = (torch.rand(B, T, generator=gen) > 0.3) if pad else None
    w = torch.randn(B, Hq, T, 3, generator=gen, dtype=torch.float64)
    a, s = torch.ops.superlinear.nstep_search(qs, k, kpm, None, c["window"], 3, 3, c["backward_factor"],
                                               ff, search_key, 0)
    (w * s.nan_to_num(0.0, neginf=0.0)).sum().backward()
    keep = torch.ones(B, T, dtype=torch.bool) if kpm is None else kpm
    q2, k2 = qs.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    total = 0.0
    for h in range(Hq):
        for t in range(T):
            _, _, _, _, cells = oracle_cells(t, T, c["window"], 3, c["backward_factor"], ff)
            by_anchor = {anc: (lo, hi) for _, lo, hi, anc in cells}
            for j in range(3):
                anc = int(a[0, h, t, j])
                if anc < 0:
                    continue
                lo, hi = by_anchor[anc]
                present = [x for x in range(lo, hi + 1) if keep[0, x]]
                key = k2[0, h // 2, present[-1]] if search_key == "anchor" else k2[0, h // 2, present].mean(0)
                total = total + w[0, h, t, j] * (q2[0, h, t] @ key)
    total.backward()
    assert (a >= 0).sum() > 100
    assert torch.allclose(qs.grad, q2.grad, atol=1e-5) and torch.allclose(k.grad, k2.grad, atol=1e-5)


def test_backward_through_attention_runs_in_both_modes():
    import slcompile
    gen = torch.Generator().manual_seed(44)
    for combine in ("union", "gated"):
        q, k, v = (torch.randn(1, h, 70, 8, generator=gen, requires_grad=True) for h in (4, 2, 2))
        cfg = SuperlinearConfig(steps=3, window=4, dense_below=0, combine=combine)
        slcompile.superlinear_attention(q, k, v, config=cfg, enable_gqa=True).square().sum().backward()
        assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
                   for x in (q, k, v))
