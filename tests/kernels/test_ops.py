import pytest
import torch

import slcompile  # noqa: F401
from slcompile.kernels import reference as R


def _args(T=120, Lq=120, pad=False, pos=False):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, Lq, 16), torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16)
    kpm = (torch.rand(1, T) > 0.2) if pad else None
    qp = torch.arange(T - Lq, T).view(1, Lq) if pos else None
    return q, k, v, kpm, qp


@pytest.mark.parametrize("pad,pos", [(False, False), (True, True)])
def test_opcheck(pad, pos):
    q, k, v, kpm, qp = _args(pad=pad, pos=pos)
    s_args = (q, k, kpm, qp, 8, 3, 0.5, 0.5, 2.0, 0.0, "anchor", 0)
    torch.library.opcheck(torch.ops.superlinear.span_search.default, s_args)
    a, s = torch.ops.superlinear.span_search(*s_args)
    assert a.dtype == torch.int32 and s.dtype == torch.float32 and a.shape == (1, 4, 120, 3)
    a_args = (q, k, v, a, s, kpm, qp, 8, 2, 0.5, 2.0, 0.0, "union", 0.25, 0)
    torch.library.opcheck(torch.ops.superlinear.span_attention.default, a_args)
    out = torch.ops.superlinear.span_attention(*a_args)
    ref = R.span_attention(*a_args)
    assert torch.equal(out, ref)


def test_ops_trace_under_export():
    q, k, v, _, _ = _args()

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return slcompile.superlinear_attention(
                q, k, v, enable_gqa=True,
                config=slcompile.SuperlinearConfig(search_key="anchor", dense_below=0, window=8))

    ep = torch.export.export(M(), (q, k, v))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.superlinear.span_search.default in targets
    assert torch.ops.superlinear.span_attention.default in targets
    assert torch.equal(ep.module()(q, k, v), M()(q, k, v))


def test_eager_inference_calls_the_implementation_directly(monkeypatch):
    """Eager calls that need no gradient skip the dispatcher (`ops.direct`): the recorded
    implementation runs and equals the op's output; a call that needs a gradient, fake tensors,
    an active dispatch mode and torch.export keep the op."""
    from slcompile.kernels import ops
    q, k, v, _, _ = _args(T=256, Lq=256)
    cfg = slcompile.SuperlinearConfig(dense_below=0, window=32, q_block=32, k_block=16, topk=2,
                                      block_rows=4, block_pool=2)
    name = "superlinear::block_sparse_attention"
    calls = []
    plain = ops._PLAIN[name]

    def recorded(*a):
        calls.append(1)
        return plain(*a)

    monkeypatch.setitem(ops._PLAIN, name, recorded)
    with torch.no_grad():
        got = slcompile.superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
    assert calls == [1]  # the dispatcher would have run the registered function, not `recorded`
    from slcompile.kernels import lowering
    want = lowering.attention(cfg, q, k, v, None, None, 0.25,  # through the dispatcher
                              call=lambda op, args: op(*args))
    assert torch.equal(got, want) and calls == [1]
    op = torch.ops.superlinear.block_sparse_attention.default
    assert ops.direct(op, (q, k, v)) is recorded
    qg = q.clone().requires_grad_()
    assert ops.direct(op, (qg, k, v)) is None
    with torch.no_grad():
        assert ops.direct(op, (qg, k, v)) is recorded
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fq = mode.from_tensor(q)
        assert ops.direct(op, (fq, k, v)) is None
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Seen():
        assert ops.direct(op, (q, k, v)) is None

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return slcompile.superlinear_attention(q, k, v, config=cfg, enable_gqa=True)

    with torch.no_grad():
        ep = torch.export.export(M(), (q, k, v))
        traced = torch.jit.trace(M(), (q, k, v), check_trace=False)
    assert op in {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert "superlinear::block_sparse_attention" in str(traced.graph)  # jit keeps the op too
    assert calls == [1]
