"""One query without a mask (a DynamicCache decode step): rewritten only over its own cache."""

import torch
import torch.nn.functional as F

import slcompile


class Step(torch.nn.Module):
    """q and the new key/value row come from `x`; keys/values are cat([past, new]) (own=True) or
    cat([past, row of `other`]) / a memory that is not concatenated (cross-attention)."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.q = torch.nn.Linear(16, 16)
        self.kv = torch.nn.Linear(16, 16)

    def forward(self, x, other, pk, pv):
        q = self.q(x).view(1, 1, 2, 8).transpose(1, 2)
        src = x if self.form == "own" else other
        k = self.kv(src).view(1, 1, 2, 8).transpose(1, 2)
        if self.form == "cross":
            k, v = pk, pv
        else:
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, k], dim=2)
        return F.scaled_dot_product_attention(q, k, v)


def _inputs():
    return (torch.randn(1, 1, 16), torch.randn(1, 1, 16), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8))


def test_decode_over_own_cache_is_rewritten_and_exact():
    from slcompile.testing import assert_rewrite_equivalent
    rep = assert_rewrite_equivalent(Step("own"), _inputs(), expected=1, compiler="eager")
    assert rep.rewritten == 1


def test_unmasked_single_query_over_other_keys_is_left_alone():
    for form in ("cross", "foreign"):
        rep = slcompile.explain(Step(form), *_inputs())
        assert rep.found == 1 and rep.rewritten == 0, (form, rep.sites)
        assert "bidirectional" in rep.sites[0].reason


def test_decode_over_own_cache_sits_at_the_bottom_right():
    """Past dense_below, the rewritten step equals the functional form with bottom-right positions."""
    torch._dynamo.reset()
    m = Step("own")
    x, o, pk, pv = _inputs()
    cfg = slcompile.SuperlinearConfig(search_key="anchor", window=4, sinks=1, topk=2, dense_below=0)
    f = torch.compile(m, backend="superlinear", options={**cfg.to_dict(), "compiler": "eager"})
    with torch.no_grad():
        out = f(x, o, pk, pv)
        q = m.q(x).view(1, 1, 2, 8).transpose(1, 2)
        k = m.kv(x).view(1, 1, 2, 8).transpose(1, 2)
        ref = slcompile.superlinear_attention(q, torch.cat([pk, k], 2), torch.cat([pv, k], 2), config=cfg)
        dense = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, k], 2))
    assert torch.allclose(out, ref, atol=1e-6)
    assert not torch.allclose(out, dense, atol=1e-3)


class StaticStep(torch.nn.Module):
    """A static buffer of T slots, queries at a runtime offset `off` (a 0-d tensor, like a static
    cache's fill level); the mask also states that no key past the written part is seen."""

    def forward(self, q, k, v, off):
        Lq, T = q.shape[2], k.shape[2]
        qi = torch.arange(Lq) + off
        j = torch.arange(T)
        mask = (j[None, :] <= qi[:, None]) & (j[None, :] < off + Lq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_runtime_offset_positions_come_from_the_graph():
    torch._dynamo.reset()
    cfg = slcompile.SuperlinearConfig(search_key="anchor", window=4, sinks=1, topk=2, dense_below=0)
    f = torch.compile(StaticStep(), backend="superlinear", options={**cfg.to_dict(), "compiler": "eager"})
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 60, 8), torch.randn(1, 2, 60, 8)
    from slcompile.backend import capture_reports
    for off in (30, 51):  # one graph: the offset is data
        with capture_reports() as reps:
            out = f(q, k, v, torch.tensor(off))
        pos = (torch.arange(3) + off)[None]
        ref = slcompile.superlinear_attention(q, k, v, config=cfg, query_positions=pos)
        assert torch.allclose(out, ref, atol=1e-6), off
        assert all(r.rewritten == 1 for r in reps)
