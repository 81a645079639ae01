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
