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
    torch.testing.assert_close(out, ref, equal_nan=True)
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


# ---------------------------------------------------------------------------------------------
# missed forms
# ---------------------------------------------------------------------------------------------

def safe_softmax_packet(q, k, v):
    n = q.shape[-2]
    w = (q @ k.transpose(-2, -1) / 3.0).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.ops.aten._safe_softmax(w, -1) @ v  # no overload named


def triu_transposed(q, k, v):
    n = q.shape[-2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(n, n, dtype=torch.bool).triu().T)


def triu_mT(q, k, v):
    n = q.shape[-2]
    keep = torch.ones(1, n, n, dtype=torch.bool).triu().mT
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def triu_size_diagonal(q, k, v):
    i, j = q.shape[-2], k.shape[-2]
    mask = torch.ones(i, j, dtype=torch.bool).triu(j - i + 1)  # symbolic under dynamic=True
    w = (q @ k.transpose(-2, -1) / 3.0).masked_fill(mask, float("-inf"))
    return w.softmax(-1) @ v


def repeat_position_ids(q, k, v):
    b, n = q.shape[0], q.shape[-2]
    pos = torch.arange(n).unsqueeze(0).repeat(b, 1)  # Whisper's decoder
    mask = pos[:, None, None, :] <= pos[:, None, :, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


MISSED = [safe_softmax_packet, triu_transposed, triu_mT, triu_size_diagonal, repeat_position_ids]


@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("fn", MISSED, ids=lambda f: f.__name__)
def test_missed_form_rewritten_exactly(fn, dynamic):
    assert_rewrite_equivalent(Fn(fn), qkv(), expected=1, compiler="eager", dynamic=dynamic)


def padding_or_triu(q, k, v, pad):
    n = q.shape[-2]
    mask = (pad == 0).view(q.shape[0], 1, 1, n) | torch.ones(n, n, dtype=torch.bool).triu(1)
    w = (q @ k.transpose(-2, -1) / 3.0).masked_fill(mask, float("-inf"))
    return w.softmax(-1) @ v


def test_padding_or_triu_carries_padding():
    q, k, v = qkv()
    pad = torch.ones(B, L, dtype=torch.long)
    pad[0, :3] = 0
    pad[1, 7] = 0
    keep = pad.bool()
    keep[0, :3] = False  # rows whose keys are all padded are NaN in eager
    rep = assert_rewrite_equivalent(Fn(padding_or_triu), (q, k, v, pad), expected=1, compiler="eager",
                                    output_fn=lambda o: o.transpose(1, 2)[keep])
    assert rep.sites[0].padding


def test_unfollowed_op_on_positions_is_named():
    def fn(q, k, v):
        n = q.shape[-2]
        mask = torch.flip(torch.ones(n, n, dtype=torch.bool).triu(), [0, 1])  # tril, but not read
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    assert_left_alone(Fn(fn), qkv(), "not followed: flip")


def xglm_style(q, k, v, pad):
    """XGLM: 3-D bmm logits viewed to 4-D to add the (causal + padding) mask, floored with
    max(w, finfo.min), viewed back, softmax, 3-D bmm with the values."""
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, k, v))
    neg = torch.finfo(q.dtype).min
    keep = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & pad.bool()[:, None, None, :]
    bias = torch.zeros(b, 1, n, n).masked_fill(~keep, neg)
    w = torch.bmm(q3, k3.transpose(1, 2)) * d ** -0.5
    w = w.view(b, h, n, n) + bias
    w = torch.max(w, torch.full((), neg))
    w = w.view(b * h, n, n)
    return torch.bmm(F.softmax(w, dim=-1), v3).view(b, h, n, d)


def gpt2_reorder_upcast(q, k, v, pad):
    """GPT-2 with reorder_and_upcast_attn: baddbmm(empty, q3, k^T merged, beta=0, alpha)."""
    b, h, n, d = q.shape
    w = torch.empty(b * h, n, n, dtype=torch.float32)
    q3, kt3 = q.reshape(-1, n, d), k.transpose(-1, -2).reshape(-1, d, n)
    w = torch.baddbmm(w, q3.float(), kt3.float(), beta=0, alpha=d ** -0.5)
    w = w.reshape(b, h, n, n)
    w = torch.where(torch.ones(n, n, dtype=torch.bool).tril(), w, torch.tensor(torch.finfo(w.dtype).min))
    w = w.masked_fill(pad[:, None, None, :] == 0, torch.finfo(w.dtype).min)
    return torch.matmul(F.softmax(w, dim=-1), v)


@pytest.mark.parametrize("fn", [xglm_style, gpt2_reorder_upcast], ids=lambda f: f.__name__)
def test_bmm_views_and_baddbmm_with_padding(fn):
    q, k, v = qkv()
    pad = torch.ones(B, L, dtype=torch.long)
    pad[1, :4] = 0
    keep = pad.bool()
    rep = assert_rewrite_equivalent(Fn(fn), (q, k, v, pad), expected=1, compiler="eager",
                                    output_fn=lambda o: o.transpose(1, 2)[keep])
    assert rep.sites[0].padding


def test_bmm_logits_floor_that_changes_logits_is_left_alone():
    def fn(q, k, v):
        b, h, n, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, k, v))
        w = torch.bmm(q3, k3.transpose(1, 2)).view(b, h, n, n) + torch.full((n, n), -1e9).triu(1)
        w = torch.max(w, torch.full((), -1.0)).view(b * h, n, n)  # raises masked logits to -1
        return torch.bmm(F.softmax(w, dim=-1), v3).view(b, h, n, d)

    assert_left_alone(Fn(fn), qkv(), "max() of logits and -1")


def test_fill_negated_once_is_left_alone():
    def fn(q, k, v):
        n = q.shape[-2]
        w = (q @ k.transpose(-2, -1)).masked_fill(~causal_bool(n), float("-inf"))
        return (w * -1.0).softmax(-1) @ v  # masked logits become +inf

    assert_left_alone(Fn(fn), qkv(), "reaches the softmax as inf")


def einsum_sequence_major(q, k, v):
    n = q.shape[-2]
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))  # [B, L, H, D]
    w = torch.einsum("bqhd,bkhd->bhqk", qs, ks) / 3.0
    w = w.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), vs)


class OpenAIGPT(torch.nn.Module):
    """OpenAI-GPT: keys split with permute(0, 2, 3, 1) and the mask w * b + -1e4 * (1 - b)."""

    def __init__(self, multiply_only=False):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32))
        self.multiply_only = multiply_only

    def forward(self, q, k, v):
        kx = k.transpose(1, 2).contiguous().permute(0, 2, 3, 1)  # [B, T, H, D] -> [B, H, D, T]
        w = torch.matmul(q, kx) / (q.size(-1) ** 0.5)
        b = self.bias[:, :, : w.size(-2), : w.size(-1)]
        w = w * b if self.multiply_only else w * b + -1e4 * (1 - b)
        return torch.matmul(F.softmax(w, dim=-1), v)


@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("make", [lambda: Fn(einsum_sequence_major), lambda: OpenAIGPT()],
                         ids=["einsum_bqhd", "openai_gpt"])
def test_permuted_operands_rewritten_exactly(make, dynamic):
    assert_rewrite_equivalent(make(), qkv(), expected=1, compiler="eager", dynamic=dynamic)


def test_logits_times_mask_without_removal_is_left_alone():
    assert_left_alone(OpenAIGPT(multiply_only=True), qkv(), "no later mask removes")


# ---------------------------------------------------------------------------------------------
# explain leaves the user's compiled state alone
# ---------------------------------------------------------------------------------------------

def test_explain_does_not_reset_the_users_compiled_model():
    m = Fn(triu_transposed)
    args = qkv()
    calls = []

    def user_backend(gm, ex):
        calls.append(gm)
        return gm.forward

    torch._dynamo.reset()
    c = torch.compile(m, backend=user_backend)
    c(*args)
    assert len(calls) == 1
    for _ in range(2):  # explain still traces (a fresh report) each time
        rep = slcompile.explain(m, *args)
        assert rep.found == 1 and rep.rewritten == 1, rep.sites
    c(*args)
    assert len(calls) == 1  # no recompile of the user's model


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention with a key_padding_mask
# ---------------------------------------------------------------------------------------------

class MHAPadded(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, kpm):
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)  # True = not allowed
        return self.mha(x, x, x, attn_mask=causal, key_padding_mask=kpm, need_weights=False)[0]


def test_multihead_attention_key_padding_mask_carried():
    x = torch.randn(2, 10, 32)
    kpm = torch.zeros(2, 10, dtype=torch.bool)
    kpm[1, :3] = True  # the first keys of row 1 are padding
    keep = ~kpm
    rep = assert_rewrite_equivalent(MHAPadded().eval(), (x, kpm), expected=1, compiler="eager",
                                    output_fn=lambda o: o[keep])
    assert rep.sites[0].form == "mha"


# ---------------------------------------------------------------------------------------------
# nn.TransformerEncoder in eval mode (its fused fast path)
# ---------------------------------------------------------------------------------------------

class Encoder(torch.nn.Module):
    def __init__(self, norm_first, activation, causal=True):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                                 norm_first=norm_first, activation=activation)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.causal = causal

    def forward(self, x, pad=None):
        n = x.shape[1]
        if not self.causal:
            return self.enc(x, src_key_padding_mask=pad)
        if pad is None:
            mask = torch.nn.Transformer.generate_square_subsequent_mask(n)
        else:  # same dtype as the padding mask (torch warns, and dynamo breaks the graph, otherwise)
            mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        return self.enc(x, mask=mask, is_causal=True, src_key_padding_mask=pad)


@pytest.mark.parametrize("norm_first,activation,dynamic", [(False, "relu", None), (True, "gelu", None),
                                                            (False, "gelu", True)])
def test_transformer_encoder_fast_path_rewritten_exactly(norm_first, activation, dynamic):
    m = Encoder(norm_first, activation).eval()
    x = torch.randn(2, 10, 32)
    rep = assert_rewrite_equivalent(m, (x,), expected=2, compiler="eager", dynamic=dynamic)
    assert all(s.form == "encoder-layer" for s in rep.sites)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 4] = True  # True = padding (every query keeps a key: no NaN rows)
    keep = ~pad
    rep = assert_rewrite_equivalent(m, (x, pad), expected=2, compiler="eager", output_fn=lambda o: o[keep],
                                    dynamic=dynamic)
    assert all(s.padding for s in rep.sites)


def test_transformer_encoder_without_causal_mask_left_alone():
    m = Encoder(False, "relu", causal=False).eval()
    assert_left_alone(m, (torch.randn(2, 10, 32),), "bidirectional", found=2)


def einsum_keys_transposed(q, k, v):
    n = q.shape[-2]
    w = torch.einsum("bhqd,bhdk->bhqk", q, k.transpose(-1, -2).contiguous()) * 0.3
    w = w.masked_fill(~causal_bool(n), float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", w.softmax(-1), v)


def test_einsum_keys_transposed_rewritten_exactly():
    assert_rewrite_equivalent(Fn(einsum_keys_transposed), qkv(), expected=1, compiler="eager")


def test_sum_of_finite_biases_then_scaled_is_left_alone():
    def fn(q, k, v):
        n = q.shape[-2]
        causal = torch.full((n, n), -1e4).triu(1)
        far = torch.full((n, n), -1e4).triu(50)  # a second 0/-1e4 bias (removes nothing here)
        w = (q @ k.transpose(-2, -1) + (causal + far)) / 2000  # masked logits: about -5
        return w.softmax(-1) @ v

    assert_left_alone(Fn(fn), qkv(), "reaches the softmax as")


def test_multi_query_broadcast_keys_with_mask_still_rewritten():
    def fn(q, k, v):
        n = q.shape[-2]
        w = (q @ k.transpose(-2, -1) * 0.3).masked_fill(~causal_bool(n), float("-inf"))
        return w.softmax(-1) @ v  # one key/value head broadcast over the query heads

    q = torch.randn(B, H, L, D)
    k, v = torch.randn(B, 1, L, D), torch.randn(B, 1, L, D)
    rep = assert_rewrite_equivalent(Fn(fn), (q, k, v), expected=1, compiler="eager")
    assert rep.sites[0].kv_groups == H


# ---------------------------------------------------------------------------------------------
# the same decisions on ATen graphs (torch.export)
# ---------------------------------------------------------------------------------------------

EXPORTED = [
    ("fill_then_divide", lambda: Fn(fill_then_divide), (), "reaches the softmax as"),
    ("bias_then_scale", lambda: Fn(bias_then_scale), (), "reaches the softmax as"),
    ("tril_diag_1", lambda: Fn(tril_diag(1)), (), "causal offset 1 puts queries outside"),
    ("fill_inf_then_divide", lambda: Fn(fill_inf_then_divide), (), None),
    ("openai_gpt", lambda: OpenAIGPT(), (), None),
    ("einsum_bqhd", lambda: Fn(einsum_sequence_major), (), None),
    ("xglm_style", lambda: Fn(xglm_style), (torch.ones(B, L, dtype=torch.long),), None),
    ("gpt2_reorder", lambda: Fn(gpt2_reorder_upcast), (torch.ones(B, L, dtype=torch.long),), None),
    ("triu_T", lambda: Fn(triu_transposed), (), None),
]


@pytest.mark.parametrize("name,make,extra,reason", EXPORTED, ids=[e[0] for e in EXPORTED])
def test_exported_graph_same_decision(name, make, extra, reason):
    from slcompile.passes import exported_constants, rewrite_graph

    m = make()
    args = (*qkv(), *extra)
    ep = torch.export.export(m, args)
    rep = rewrite_graph(ep.graph_module, slcompile.SuperlinearConfig.exact(), constants=exported_constants(ep))
    assert rep.found == 1, rep.sites
    if reason is None:
        assert rep.rewritten == 1, rep.sites
    else:
        assert rep.rewritten == 0 and reason in rep.sites[0].reason, rep.sites
    args2 = (*qkv(), *extra)
    torch.testing.assert_close(ep.module()(*args2), m(*args2), atol=1e-5, rtol=0)


def test_exported_runtime_offset_that_looks_ahead_fails_clearly():
    from slcompile.passes import rewrite_graph

    m = Fn(shifted)
    ep = torch.export.export(m, (*qkv(), torch.tensor(0)))
    rep = rewrite_graph(ep.graph_module, slcompile.SuperlinearConfig.exact())
    assert rep.rewritten == 1, rep.sites
    q, k, v = qkv()
    torch.testing.assert_close(ep.module()(q, k, v, torch.tensor(0)), m(q, k, v, torch.tensor(0)),
                               atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="superlinear: a query position"):
        ep.module()(q, k, v, torch.tensor(1))
