"""The rewrite on hand-written attention forms: positive (rewritten + equivalent under the exact
config against eager) and must-leave-alone cases (reason recorded, graph untouched)."""

import math

import pytest
import torch
import torch.nn.functional as F

import slcompile
from slcompile.testing import assert_all_attention_rewritten, assert_rewrite_equivalent

B, H, HKV, L, D = 2, 4, 2, 12, 8


def rnd(*shape):
    return torch.randn(*shape)


def qkv(h=H, hkv=H, lq=L, t=L):
    return rnd(B, h, lq, D), rnd(B, hkv, t, D), rnd(B, hkv, t, D)


def repeat_kv(x, g):
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, g, t, d).reshape(b, h * g, t, d)


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *a):
        return self.fn(self, *a)


# ---------------------------------------------------------------------------------------------
# positive forms
# ---------------------------------------------------------------------------------------------

def sdpa_causal(m, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_scale(m, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.37)


def sdpa_gqa(m, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_repeat_kv(m, q, k, v):
    return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=True)


def sdpa_repeat_interleave(m, q, k, v):
    k2, v2 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    return F.scaled_dot_product_attention(q, k2, v2, is_causal=True)


def sdpa_bool_tril(m, q, k, v):
    n = q.shape[-2]
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_additive_triu(m, q, k, v):
    n = q.shape[-2]
    mask = torch.full((n, n), float("-inf"), device=q.device).triu(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_arange_mask(m, q, k, v):
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    mask = i[None, None, None, :] <= i[None, None, :, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(q.shape[0], 1, n, n))


def sdpa_arange_mask_padding(m, q, k, v, pad):
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    causal = i[None, None, None, :] <= i[None, None, :, None]
    mask = causal & pad.bool()[:, None, None, :]
    neg = torch.finfo(q.dtype).min
    bias = torch.where(mask, torch.zeros((), dtype=q.dtype), neg)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def hand_div_masked_fill(m, q, k, v):
    n = q.shape[-2]
    w = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    w = w.masked_fill(m.tril[:, :, :n, :n] == 0, float("-inf"))
    return torch.softmax(w, dim=-1) @ v


def hand_prescaled_where_upcast(m, q, k, v):
    n = q.shape[-2]
    qs = q * (q.shape[-1] ** -0.5)
    w = torch.matmul(qs, k.transpose(2, 3))
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    w = torch.where(keep, w, torch.tensor(float("-inf")))
    p = F.softmax(w.float(), dim=-1).to(q.dtype)
    p = F.dropout(p, p=0.1, training=False)
    return torch.matmul(p, v)


def hand_mul_additive(m, q, k, v):
    n = q.shape[-2]
    w = torch.matmul(q, k.transpose(-1, -2)) * 0.3
    bias = torch.triu(torch.full((n, n), -1e9), diagonal=1)
    return (w + bias).softmax(-1) @ v


def hand_einsum_gqa(m, q, k, v):
    n = q.shape[-2]
    k2, v2 = repeat_kv(k, 2), repeat_kv(v, 2)
    w = torch.einsum("bhqd,bhkd->bhqk", q, k2) / 3.0
    w = w.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", w.softmax(-1), v2)


class WithTril(torch.nn.Module):
    def __init__(self, fn, n=64):
        super().__init__()
        self.fn = fn
        self.register_buffer("tril", torch.tril(torch.ones(n, n)).view(1, 1, n, n))

    def forward(self, *a):
        return self.fn(self, *a)


POSITIVE = [
    ("sdpa_causal", sdpa_causal, H, "sdpa"),
    ("sdpa_scale", sdpa_scale, H, "sdpa"),
    ("sdpa_gqa", sdpa_gqa, HKV, "sdpa"),
    ("sdpa_repeat_kv", sdpa_repeat_kv, HKV, "sdpa"),
    ("sdpa_repeat_interleave", sdpa_repeat_interleave, HKV, "sdpa"),
    ("sdpa_bool_tril", sdpa_bool_tril, H, "sdpa+mask"),
    ("sdpa_additive_triu", sdpa_additive_triu, H, "sdpa+mask"),
    ("sdpa_arange_mask", sdpa_arange_mask, H, "sdpa+mask"),
    ("hand_div_masked_fill_tril_buffer", hand_div_masked_fill, H, "matmul-softmax"),
    ("hand_prescaled_where_upcast", hand_prescaled_where_upcast, H, "matmul-softmax"),
    ("hand_mul_additive", hand_mul_additive, H, "matmul-softmax"),
    ("hand_einsum_gqa", hand_einsum_gqa, HKV, "einsum-softmax"),
]


@pytest.mark.parametrize("name,fn,hkv,form", POSITIVE, ids=[p[0] for p in POSITIVE])
def test_positive_form(name, fn, hkv, form):
    m = WithTril(fn)
    q, k, v = qkv(H, hkv)
    rep = assert_rewrite_equivalent(m, (q, k, v), expected=1, compiler="eager")
    s = rep.sites[0]
    assert s.form == form and s.causal_proven and s.rewritten
    assert s.kv_groups == H // hkv
    assert s.kv_shape[1] == str(hkv)  # the un-repeated K/V is read


def test_padding_mask_carried():
    m = Fn(sdpa_arange_mask_padding)
    q, k, v = qkv()
    pad = torch.ones(B, L, dtype=torch.long)
    pad[0, :4] = 0
    keep = pad.bool()
    rep = assert_rewrite_equivalent(m, (q, k, v, pad), expected=1, compiler="eager",
                                    output_fn=lambda o: o.transpose(1, 2)[keep])
    assert rep.sites[0].padding
    # the padding is a runtime input: a different mask, same graph, still exact
    pad2 = torch.ones(B, L, dtype=torch.long)
    pad2[1, :6] = 0
    torch._dynamo.reset()
    c = torch.compile(m, backend="superlinear", options={**slcompile.SuperlinearConfig.exact().to_dict(),
                                                         "compiler": "eager"})
    c(q, k, v, pad)
    out = c(q, k, v, pad2)
    ref = m(q, k, v, pad2)
    sel = pad2.bool()
    assert (out.transpose(1, 2)[sel] - ref.transpose(1, 2)[sel]).abs().max() <= 1e-5


def test_inductor_and_no_recompile_across_lengths():
    from torch._dynamo.utils import counters

    m = WithTril(hand_prescaled_where_upcast)
    torch._dynamo.reset()
    counters.clear()
    c = torch.compile(m, backend="superlinear", dynamic=True,
                      options={**slcompile.SuperlinearConfig.exact().to_dict(), "compiler": "inductor"})
    for n in (9, 13, 20, 31):
        q, k, v = qkv(lq=n, t=n)
        torch.testing.assert_close(c(q, k, v), m(q, k, v), atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_default_dynamic_recompiles_once_at_most():
    from torch._dynamo.utils import counters

    m = Fn(sdpa_gqa)
    torch._dynamo.reset()
    counters.clear()
    c = torch.compile(m, backend="superlinear",
                      options={**slcompile.SuperlinearConfig.exact().to_dict(), "compiler": "eager"})
    for n in (8, 11, 15, 22, 30):
        q, k, v = qkv(H, HKV, n, n)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert (c(q, k, v) - ref).abs().max() <= 1e-5
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_rewritten_graph_holds_superlinear_ops():
    seen = []

    def backend(gm, ex):
        from slcompile.passes import rewrite_graph
        rewrite_graph(gm, slcompile.SuperlinearConfig.exact(search_key="anchor"))
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(Fn(sdpa_causal), backend=backend)(*qkv())
    assert torch.ops.superlinear.span_search.default in seen
    assert torch.ops.superlinear.span_attention.default in seen
    assert F.scaled_dot_product_attention not in seen


def test_not_exact_config_differs_but_is_close_in_structure():
    # a real (approximate) config: window 4 on 40 tokens really drops keys
    q, k, v = qkv(lq=40, t=40)
    m = Fn(sdpa_causal)
    metrics = slcompile.testing.compare_with_dense(
        m, (q, k, v),
        slcompile.SuperlinearConfig(search_key="anchor", window=4, sinks=1, topk=1, dense_below=0),
        compiler="eager")
    assert metrics["rewritten"] == 1 and metrics["max_abs"] > 1e-3 and metrics["cosine"] > 0.3


# ---------------------------------------------------------------------------------------------
# must leave alone
# ---------------------------------------------------------------------------------------------

def bidirectional(m, q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def bidirectional_hand(m, q, k, v):
    return (q @ k.transpose(-2, -1) / 3.0).softmax(-1) @ v


def cross_attention(m, q, k, v):
    kx = k[:, :, :5] * 2.0  # 5 encoder states, no mask
    return F.scaled_dot_product_attention(q, kx, kx)


def sliding_window(m, q, k, v):
    n = q.shape[-2]
    i = torch.arange(n)
    mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 4)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def prefix_lm(m, q, k, v):
    n = q.shape[-2]
    i = torch.arange(n)
    mask = (i[None, :] <= i[:, None]) | (i[None, :] < 3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def runtime_mask(m, q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def first_row_broadcast(m, q, k, v):
    n = q.shape[-2]
    i = torch.arange(n)
    mask = (i[None, :] <= i[:, None])[:1, :]  # row 0 only, broadcast to every query
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def anti_causal(m, q, k, v):
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool).triu()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def alibi(m, q, k, v):
    n = q.shape[-2]
    i = torch.arange(n)
    rel = (i[None, :] - i[:, None]).float()
    slopes = torch.tensor([0.5 ** (h + 1) for h in range(q.shape[1])])[:, None, None]
    causal = torch.full((n, n), float("-inf")).triu(1)
    w = q @ k.transpose(-2, -1) / 3.0 + slopes * rel + causal
    return w.softmax(-1) @ v


def softcap(m, q, k, v):
    n = q.shape[-2]
    w = torch.tanh(q @ k.transpose(-2, -1) / 30.0) * 30.0
    w = w.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return w.softmax(-1) @ v


def weights_returned(m, q, k, v):
    n = q.shape[-2]
    w = (q @ k.transpose(-2, -1)).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    p = w.softmax(-1)
    return p @ v, p


NEGATIVE = [
    ("bidirectional_sdpa", bidirectional, "bidirectional"),
    ("bidirectional_hand", bidirectional_hand, "bidirectional"),
    ("cross_attention", cross_attention, "bidirectional"),
    ("sliding_window", sliding_window, "sliding window"),
    ("prefix_lm", prefix_lm, "not provably causal"),
    ("anti_causal", anti_causal, "causal"),
    ("first_row_broadcast", first_row_broadcast, "not a causal"),
    ("alibi", alibi, "ALiBi"),
    ("softcap", softcap, "soft-capping"),
    ("weights_returned", weights_returned, "used elsewhere"),
]


@pytest.mark.parametrize("name,fn,reason", NEGATIVE, ids=[n[0] for n in NEGATIVE])
def test_left_alone(name, fn, reason):
    m = Fn(fn)
    q, k, v = qkv()
    rep = slcompile.explain(m, q, k, v)
    assert rep.found == 1 and rep.rewritten == 0, rep.sites
    assert reason.lower() in rep.sites[0].reason.lower(), rep.sites[0].reason
    # and the compiled model still computes the original function exactly
    torch._dynamo.reset()
    c = torch.compile(m, backend="superlinear", options={"compiler": "eager"})
    torch.testing.assert_close(c(q, k, v), m(q, k, v))


def test_runtime_mask_input_left_alone():
    q, k, v = qkv()
    mask = torch.ones(L, L, dtype=torch.bool).tril()  # causal values, but runtime data
    rep = slcompile.explain(Fn(runtime_mask), q, k, v, mask)
    assert rep.found == 1 and rep.rewritten == 0
    assert "runtime" in rep.sites[0].reason


def test_assert_all_attention_rewritten_helper():
    q, k, v = qkv(H, HKV)
    rep = assert_all_attention_rewritten(Fn(sdpa_gqa), (q, k, v), expected=1)
    assert rep.rewritten == 1
    with pytest.raises(AssertionError, match="not rewritten"):
        assert_all_attention_rewritten(Fn(bidirectional), qkv(), expected=1)
    with pytest.raises(AssertionError, match="no attention was rewritten"):
        assert_rewrite_equivalent(Fn(bidirectional), qkv(), compiler="eager")


def test_backend_rejects_unknown_option():
    torch._dynamo.reset()
    c = torch.compile(Fn(sdpa_causal), backend="superlinear", options={"windw": 3})
    with pytest.raises(Exception, match="windw"):
        c(*qkv())


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------

class MHA(torch.nn.Module):
    def __init__(self, need_weights, is_causal, bool_mask=False, cross=False):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.nw, self.causal, self.bm, self.cross = need_weights, is_causal, bool_mask, cross

    def forward(self, x):
        n = x.shape[1]
        if self.bm:
            mask = torch.ones(n, n, dtype=torch.bool).triu(1)  # True = not allowed
        else:
            mask = torch.nn.Transformer.generate_square_subsequent_mask(n)
        kv = x * 2.0 if self.cross else x
        return self.mha(x, kv, kv, attn_mask=mask, is_causal=self.causal, need_weights=self.nw)[0]


@pytest.mark.parametrize("nw,causal,bm", [(False, True, False), (True, False, False), (True, False, True)],
                         ids=["is_causal", "float_mask_weights_unused", "bool_mask"])
def test_multihead_attention(nw, causal, bm):
    m = MHA(nw, causal, bm).eval()
    rep = assert_rewrite_equivalent(m, (torch.randn(2, 10, 32),), expected=1, compiler="eager")
    assert rep.sites[0].form == "mha" and rep.sites[0].module_path == "mha"


def test_multihead_cross_attention_left_alone():
    rep = slcompile.explain(MHA(False, False, cross=True).eval(), torch.randn(2, 10, 32))
    assert rep.found == 1 and rep.rewritten == 0 and "cross" in rep.sites[0].reason


def test_wide_mask_sliced_to_length_carries_padding():
    """A mask built once for a maximum length (causal & padding) and sliced [:L, :L]: the padding
    factor is cut to the key length when carried into the ops."""
    S = 32

    def fn(m, q, k, v, pad):
        i = torch.arange(S)
        full = (i[None, None, None, :] <= i[None, None, :, None]) & pad.bool()[:, None, None, :]
        n = q.shape[-2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=full[:, :, :n, :n])

    q, k, v = qkv()
    pad = torch.ones(B, S, dtype=torch.long)
    pad[0, :2] = 0
    pad[1, 5] = 0
    keep = pad[:, :L].bool()
    rep = assert_rewrite_equivalent(Fn(fn), (q, k, v, pad), expected=1, compiler="eager",
                                    output_fn=lambda o: o.transpose(1, 2)[keep])
    assert rep.sites[0].padding


def test_bmm_three_d_attention():
    """[B*H, L, D] attention through bmm / baddbmm-free spelling, with a top-left causal offset
    check: queries and keys of one length."""

    def fn(m, q, k, v):
        b, h, n, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, k, v))
        w = torch.bmm(q3 * d ** -0.5, k3.transpose(1, 2))
        w = w + torch.full((n, n), float("-inf")).triu(1)
        return torch.bmm(w.softmax(-1), v3).view(b, h, n, d)

    rep = assert_rewrite_equivalent(Fn(fn), qkv(), expected=1, compiler="eager")
    assert rep.sites[0].q_shape == (str(B * H), str(L), str(D))


def test_separate_causal_and_padding_masked_fills():
    """Two masked_fill calls: a causal one from shapes and a runtime padding one (True = pad)."""

    def fn(m, q, k, v, is_pad):
        n = q.shape[-2]
        w = q @ k.transpose(-2, -1) * 0.25
        w = w.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        w = w.masked_fill(is_pad[:, None, None, :], float("-inf"))
        return w.softmax(-1) @ v

    q, k, v = qkv()
    is_pad = torch.zeros(B, L, dtype=torch.bool)
    is_pad[1, :5] = True
    keep = ~is_pad
    rep = assert_rewrite_equivalent(Fn(fn), (q, k, v, is_pad), expected=1, compiler="eager",
                                    output_fn=lambda o: o.transpose(1, 2)[keep])
    assert rep.sites[0].padding
