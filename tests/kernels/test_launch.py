"""kernels/launch.py: its key is at least as strict as Triton's own specialisation (checked against
Triton's specialiser on random arguments), and direct launches on a GPU give exactly what
Triton's own launches give, token after token of a decode."""

from __future__ import annotations

import random

import pytest
import torch
from triton_env import DEV, INTERPRETED, poison, require_triton

require_triton()

from slcompile.kernels import launch as L  # noqa: E402


def _triton_spec(v, specialize=True):
    """Triton's specialisation of one non-constexpr argument (the binder's per-argument call)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    return native_specialize_impl(BaseBackend, v, False, specialize, True)


def _random_value(rng, base):
    kind = rng.randrange(4)
    if kind == 0:  # ints near the edges of Triton's classes
        edge = rng.choice([0, 1, 16, 1 << 31, 1 << 32])
        return edge + rng.randrange(-20, 20)
    if kind == 1:
        return rng.randrange(1 << 40) * rng.choice([1, 16])
    if kind == 2:
        return rng.random()
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.int64])
    return base[dtype][rng.randrange(9):]  # views at every offset: aligned to 16 bytes or not


def test_equal_keys_mean_equal_triton_specialisations():
    pytest.importorskip("triton._C.libtriton")
    rng = random.Random(0)
    base = {d: torch.zeros(64, dtype=d) for d in (torch.float32, torch.bfloat16, torch.int64)}
    values = [_random_value(rng, base) for _ in range(3000)]
    seen = {}
    classes = set()
    for v in values:
        k = L.key_of((False,), (v,), None)
        spec = _triton_spec(v)
        classes.add(spec)
        assert seen.setdefault(k, spec) == spec, (v, k, spec, seen[k])
    assert len(classes) >= 10  # the draw reaches ints, floats and pointers of several kinds


def test_keys_tell_apart_what_triton_does_and_constexprs_by_value():
    x = torch.zeros(8)
    key = lambda *v, c=None: L.key_of(c or (False,) * len(v), v, (4, 3))  # noqa: E731
    assert key(32) == key(48) and key(33) == key(35)  # same class: the same compiled kernel
    assert key(32) != key(33) and key(1) != key(2) and key(16) != key(1 << 31)
    assert key(0.5) == key(0.25)
    assert key(x) != key(x[1:]) and key(x) != key(x.double())
    assert key(64, c=(True,)) != key(32, c=(True,))  # a constexpr: its value
    assert L.key_of((False,), (32,), (4, 3)) != L.key_of((False,), (32,), (8, 3))  # warps


@pytest.mark.skipif(INTERPRETED, reason="direct launches need compiled kernels on a GPU")
def test_direct_decode_launches_give_what_tritons_own_launches_give(monkeypatch):
    from slcompile.kernels import blocksparse as bs
    from slcompile.kernels import ops
    from slcompile.kernels.config import SuperlinearConfig
    c = SuperlinearConfig()
    g = torch.Generator(device=DEV).manual_seed(0)
    T0, n = 3000, 40
    q_all = torch.randn(1, 8, T0 + n, 64, device=DEV, dtype=torch.bfloat16, generator=g)
    k_all = torch.randn(1, 2, T0 + n, 64, device=DEV, dtype=torch.bfloat16, generator=g)
    v_all = torch.randn(1, 2, T0 + n, 64, device=DEV, dtype=torch.bfloat16, generator=g)

    def decode():
        outs = []
        for T in range(T0, T0 + n):  # lengths of every residue mod 16
            k, v = k_all[:, :, :T].contiguous(), v_all[:, :, :T].contiguous()
            q = q_all[:, :, T - 1:T].contiguous()
            poison()
            outs.append(ops.block_sparse_attention(
                q, k, v, None, None, c.window, c.sinks, c.topk, 0.125, 0, c.q_block, c.k_block,
                c.block_rows, c.block_pool, None, c.exact_rows, c.block_group, c.spread_rows))
        return torch.stack(outs)

    L._KERNELS.clear()
    direct = decode()
    assert L._KERNELS  # the direct path ran
    monkeypatch.setattr(L, "_info", lambda kernel: None)  # Triton's own launches only
    own = decode()
    assert not torch.isnan(direct).any()
    assert torch.equal(direct, own)
    want = bs.block_attention(q_all[:, :, T0 + n - 2:T0 + n - 1], k_all[:, :, :T0 + n - 1],
                              v_all[:, :, :T0 + n - 1], bs.block_select(
                                  q_all[:, :, T0 + n - 2:T0 + n - 1], k_all[:, :, :T0 + n - 1],
                                  None, T0 + n - 2, window=c.window, sinks=c.sinks, topk=c.topk,
                                  q_block=c.q_block, k_block=c.k_block, rows=c.block_rows,
                                  pool=c.block_pool, exact_rows=c.exact_rows,
                                  group=c.block_group, spread=c.spread_rows),
                              None, T0 + n - 2, window=c.window, sinks=c.sinks,
                              q_block=c.q_block, k_block=c.k_block, scale=0.125)
    torch.testing.assert_close(direct[-1].float(), want.float(), atol=2e-2, rtol=2e-2)


def _site_kernel(X, Y, n, m, BLOCK):  # parameters only: the launches below are stand-ins
    pass


def test_site_launches_directly_what_tritons_path_launches(monkeypatch):
    """`Site` on a compiled-mode kernel, without a GPU: Triton's path (a stand-in `run` that
    records) for a key not seen, the compiled kernel's launcher afterwards, with the same values in
    parameter order; a new class of a dynamic value, a key of None or a launch hook go back to
    Triton's path."""
    import types

    from triton.runtime.jit import JITFunction
    ann = {"BLOCK": "tl.constexpr"}
    fn = types.FunctionType(_site_kernel.__code__, globals(), "_site_kernel")
    fn.__annotations__ = ann
    kernel = JITFunction(fn)
    log = []

    class Compiled:
        function = packed_metadata = None

        def run(self, g0, g1, g2, stream, function, meta, h1, h2, h3, *values):
            log.append(("direct", (g0, g1, g2), values))

    def triton_run(self, *args, grid, warmup, **kw):
        log.append(("triton", tuple(grid), args, kw))
        return Compiled()

    monkeypatch.setattr(JITFunction, "run", triton_run)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    monkeypatch.setattr(L, "_INFO", {})
    monkeypatch.setattr(L, "_RUNTIME", {})  # set by the first compiled kernel met: undone below
    site = L.Site(kernel, dict(m=48, BLOCK=64), ("X", "n", "Y"), num_warps=4, num_stages=2)
    x, y = torch.zeros(8), torch.zeros(8, dtype=torch.int64)
    for n in (32, 64, 33):  # 32 and 64: one class; 33 another
        site((2, 3), L.classes((x, y, n)), x, n, y)
    assert [e[0] for e in log] == ["triton", "direct", "triton"]
    assert log[0][2] == (x, y, 32, 48, 64) and log[0][3] == {"num_warps": 4, "num_stages": 2}
    assert log[0][1] == (2, 3) and log[1][1] == (2, 3, 1)
    assert log[1][2] == (x, y, 64, 48, 64)  # the fixed and dynamic values in parameter order
    site((1,), None, x, 64, y)
    assert log[-1][0] == "triton"
    monkeypatch.setattr(L, "_hooked", lambda: True)
    assert L.classes((x, y, 64)) is None  # a profiler's hook: Triton's path, which calls it
