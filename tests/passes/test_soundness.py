"""Soundness of the rewrite (issue 20): forms that were once rewritten wrongly, and forms the site
finders once missed. Each builds the model with fresh random inputs and compiles it with the
``superlinear`` backend: either the site is left alone with a reason that names what was not
followed (and the compiled model still computes the original function), or the rewrite under
`SuperlinearConfig.exact()` equals eager."""

import pytest
import torch
import torch.nn.functional as F

import slcompile
from slcompile.backend import capture_reports
from slcompile.passes import RewriteReport
from slcompile.testing import assert_rewrite_equivalent

B, H, L, D = 2, 4, 12, 8


def qkv(lq=L, t=L, b=B, h=H):
    return torch.randn(b, h, lq, D), torch.randn(b, h, t, D), torch.randn(b, h, t, D)


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *a):
        return self.fn(*a)


def compiled_report(m, args, dynamic=None, exact=True):
    """Compile `m` with the superlinear backend (eager inner compiler), run it on `args`; returns
    (output, merged RewriteReport)."""
    torch._dynamo.reset()
    opts = {**(slcompile.SuperlinearConfig.exact().to_dict() if exact else {}), "compiler": "eager"}
    c = torch.compile(m, backend="superlinear", options=opts, dynamic=dynamic)
    with capture_reports() as reps, torch.no_grad():
        out = c(*args)
    rep = RewriteReport(sites=[], graphs=0)
    for r in reps:
        rep = rep.merge(r)
    return out, rep


def assert_left_alone(m, args, reason, dynamic=None, found=1):
    with torch.no_grad():
        ref = m(*args)
    out, rep = compiled_report(m, args, dynamic)
    assert rep.found == found and rep.rewritten == 0, rep.sites
    for s in rep.sites:
        assert reason.lower() in s.reason.lower(), s.reason
    torch.testing.assert_close(out, ref)
    return rep


def causal_bool(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


# ---------------------------------------------------------------------------------------------
# 1. a large negative fill followed by more arithmetic on the logits
# ---------------------------------------------------------------------------------------------

def fill_then_divide(q, k, v):
    n = q.shape[-2]
    w = q @ k.transpose(-2, -1)
    w = w.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -1e4) / 2000  # masked: -5
    return w.softmax(-1) @ v


def where_then_multiply(q, k, v):
    n = q.shape[-2]
    w = torch.matmul(q, k.transpose(-1, -2))
    w = torch.where(causal_bool(n), w, torch.tensor(-1e4)) * 1e-3  # masked: -10
    return F.softmax(w, dim=-1) @ v


def bias_then_scale(q, k, v):
    n = q.shape[-2]
    bias = torch.full((n, n), -1e4).triu(1)
    w = (q @ k.transpose(-2, -1) + bias) * 0.01  # masked: about -100 + logits
    return w.softmax(-1) @ v


def nested_bias_then_scale(q, k, v):
    n = q.shape[-2]
    bias = torch.full((n, n), -1e4).triu(1)
    w = (q @ k.transpose(-2, -1) * 0.5 + bias + 1.0) / 500.0  # constant shift, then the scale
    return w.softmax(-1) @ v


def fill_then_negate(q, k, v):
    n = q.shape[-2]
    w = (q @ k.transpose(-2, -1)).masked_fill(~causal_bool(n), float("-inf"))
    return (w * -1.0 * -0.5).softmax(-1) @ v  # fine: the product of the factors is positive


@pytest.mark.parametrize("fn", [fill_then_divide, where_then_multiply, bias_then_scale,
                                nested_bias_then_scale], ids=lambda f: f.__name__)
def test_fill_scaled_back_into_reach_is_left_alone(fn):
    """The fill reaches the softmax as a small negative number: future keys keep weight."""
    m = Fn(fn)
    rep = assert_left_alone(m, qkv(), "reaches the softmax as")
    assert "after the mask" in rep.sites[0].reason


def test_fill_scaled_by_runtime_scalar_is_left_alone():
    def fn(q, k, v, s):
        n = q.shape[-2]
        w = (q @ k.transpose(-2, -1)).masked_fill(~causal_bool(n), -1e9) * s
        return w.softmax(-1) @ v

    assert_left_alone(Fn(fn), (*qkv(), torch.tensor(1e-6)), "runtime scalar")


def fill_inf_then_divide(q, k, v):
    n = q.shape[-2]
    w = (q @ k.transpose(-2, -1)).masked_fill(~causal_bool(n), float("-inf"))
    return (w / 2000).softmax(-1) @ v


def finfo_min_then_scale(q, k, v):
    n = q.shape[-2]
    w = q @ k.transpose(-2, -1)
    w = torch.where(causal_bool(n), w, torch.tensor(torch.finfo(w.dtype).min)) / 8.0
    return w.softmax(-1) @ v


@pytest.mark.parametrize("fn", [fill_inf_then_divide, finfo_min_then_scale, fill_then_negate],
                         ids=lambda f: f.__name__)
def test_fill_that_stays_minus_inf_is_rewritten_exactly(fn):
    assert_rewrite_equivalent(Fn(fn), qkv(), expected=1, compiler="eager")


# ---------------------------------------------------------------------------------------------
# 2. query positions shifted by a runtime offset
# ---------------------------------------------------------------------------------------------

def shifted(q, k, v, shift):
    n = q.shape[-2]
    i = torch.arange(n)
    mask = i[None, :] <= (i + shift)[:, None]  # k <= q + shift
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_runtime_offset_that_looks_ahead_fails_clearly(compiler):
    """shift = 1 puts the last query past the keys: a run-time check says so before the kernel
    runs (it once failed with an IndexError inside the reference); shift = 0 is exact."""
    m = Fn(shifted)
    q, k, v = qkv()
    torch._dynamo.reset()
    opts = {**slcompile.SuperlinearConfig.exact().to_dict(), "compiler": compiler}
    c = torch.compile(m, backend="superlinear", options=opts)
    with capture_reports() as reps:
        out = c(q, k, v, torch.tensor(0))
    assert sum(r.rewritten for r in reps) == 1
    torch.testing.assert_close(out, m(q, k, v, torch.tensor(0)), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="superlinear: a query position"):
        c(q, k, v, torch.tensor(1))


# ---------------------------------------------------------------------------------------------
# 3. an offset diagonal under dynamic=True
# ---------------------------------------------------------------------------------------------

def tril_diag(d):
    def fn(q, k, v):
        n = q.shape[-2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(n, n, dtype=torch.bool).tril(d))
    return fn


@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
def test_tril_diagonal_one_same_decision_static_and_symbolic(dynamic):
    assert_left_alone(Fn(tril_diag(1)), qkv(), "causal offset 1 puts queries outside", dynamic=dynamic)
    assert_left_alone(Fn(tril_diag(-1)), qkv(), "causal offset -1 puts queries outside", dynamic=dynamic)
    assert_rewrite_equivalent(Fn(tril_diag(0)), qkv(), expected=1, compiler="eager", dynamic=dynamic)
