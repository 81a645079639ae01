"""The `superlinear` backend: entry point in a fresh interpreter, logging, torch.export graphs,
rewrite time."""

import os
import subprocess
import sys
import textwrap
import time

import torch
import torch.nn.functional as F

import slcompile
from slcompile.passes import exported_constants, rewrite_graph

FRESH = textwrap.dedent("""
    import logging, sys, io
    import torch, torch.nn.functional as F
    buf = io.StringIO()
    logging.basicConfig(stream=buf, level=logging.INFO, format="%(name)s|%(message)s")
    assert "slcompile" not in sys.modules
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    c = torch.compile(f, backend="superlinear",
                      options={"window": 2**62, "dense_below": 0, "compiler": sys.argv[1]})
    out = c(q, k, v)
    err = (out - f(q, k, v)).abs().max().item()
    assert err < 1e-5, err
    lines = [l for l in buf.getvalue().splitlines() if l.startswith("slcompile.backend|")]
    assert len(lines) == 1 and "1 rewritten" in lines[0], buf.getvalue()
    print("OK", lines[0])
""")


def test_entry_point_in_fresh_interpreter():
    env = dict(os.environ)
    for compiler in ("eager",):
        r = subprocess.run([sys.executable, "-c", FRESH, compiler], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.startswith("OK"), r.stdout


class Buffered(torch.nn.Module):
    def __init__(self, n=32):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n))

    def forward(self, q, k, v):
        L = q.shape[-2]
        w = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        w = torch.where(self.bias[:, :, :L, :L], w, torch.finfo(w.dtype).min)
        a = w.softmax(-1) @ v
        return a + F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1)[:, :4],
                                                  v.repeat_interleave(2, 1)[:, :4], is_causal=True)


def test_torch_export_graph_module_rewrite():
    m = Buffered().eval()
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8)
    ep = torch.export.export(m, (q, k, v))
    # without the buffer's contents the tril mask cannot be proven: left alone, with a reason
    exact = slcompile.SuperlinearConfig.exact(search_key="anchor")
    dry = rewrite_graph(ep.graph_module, exact, dry_run=True)
    assert dry.found == 2 and dry.sites[0].reason != "dry run"
    rep = rewrite_graph(ep.graph_module, exact, constants=exported_constants(ep))
    assert rep.found == 2 and rep.rewritten == 2, rep.sites
    targets = [n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.superlinear.span_attention.default) == 2
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert all("val" in n.meta for n in ep.graph_module.graph.nodes
               if n.op == "call_function" and "superlinear" in str(n.target))
    q2, k2, v2 = torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8)
    torch.testing.assert_close(ep.module()(q2, k2, v2), m(q2, k2, v2), atol=1e-5, rtol=0)


class Layer(torch.nn.Module):
    def __init__(self, d=32, h=4, hkv=2):
        super().__init__()
        self.h, self.hkv, self.dh = h, hkv, d // h
        self.q = torch.nn.Linear(d, d)
        self.kv = torch.nn.Linear(d, 2 * hkv * self.dh)
        self.o = torch.nn.Linear(d, d)

    def forward(self, x, mask):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.h, self.dh).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2 * self.hkv, self.dh).transpose(1, 2).chunk(2, dim=1)
        g = self.h // self.hkv
        k = k[:, :, None].expand(B, self.hkv, g, L, self.dh).reshape(B, self.h, L, self.dh)
        v = v[:, :, None].expand(B, self.hkv, g, L, self.dh).reshape(B, self.h, L, self.dh)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.o(a.transpose(1, 2).reshape(B, L, -1))


class Stack(torch.nn.Module):
    def __init__(self, n=30):
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer() for _ in range(n))

    def forward(self, x, pad):
        L = x.shape[1]
        i = torch.arange(L, device=x.device)
        mask = (i[None, None, None, :] <= i[None, None, :, None]) & pad.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x


def test_rewrite_time_30_layers():
    """Time of rewrite_graph on the dynamo graph of a 30-layer GQA model with a padded causal mask
    (the real 30-layer SmolLM2 graph is timed in tests/passes/test_hf_graphs.py)."""
    m = Stack(30).eval()
    times, reports = [], []

    def backend(gm, ex):
        t0 = time.perf_counter()
        reports.append(rewrite_graph(gm, slcompile.SuperlinearConfig.exact()))
        times.append(time.perf_counter() - t0)
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(2, 16, 32)
    pad = torch.ones(2, 16, dtype=torch.long)
    pad[0, :3] = 0
    with torch.no_grad():
        out = torch.compile(m, backend=backend)(x, pad)
        ref = m(x, pad)
    assert sum(r.rewritten for r in reports) == 30
    keep = pad.bool()
    assert (out[keep] - ref[keep]).abs().max() < 1e-4
    print(f"rewrite of 30 layers: {sum(times) * 1e3:.1f} ms")
    assert sum(times) < 1.0


def test_aotautograd_graphs():
    """rewrite_graph on post-dispatch ATen graphs (an aot_module_simplified forward compiler):
    fused SDPA ops and view(bmm(view(expand))) matmuls are recognised."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    def gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def hand(q, k, v):
        n = q.shape[-2]
        w = torch.matmul(q, k.transpose(-1, -2)) * 0.3 + torch.triu(torch.full((n, n), -1e9), diagonal=1)
        return w.softmax(-1) @ v

    for fn, hkv in ((gqa, 2), (hand, 4)):
        reports = []

        def fw(gm, ex):
            reports.append(rewrite_graph(gm, slcompile.SuperlinearConfig.exact()))
            return make_boxed_func(gm.forward)

        torch._dynamo.reset()
        q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, hkv, 9, 8), torch.randn(2, hkv, 9, 8)
        with torch.no_grad():
            out = torch.compile(fn, backend=lambda gm, ex: aot_module_simplified(gm, ex, fw_compiler=fw))(q, k, v)
        assert sum(r.rewritten for r in reports) == 1, [r.summary() for r in reports]
        torch.testing.assert_close(out, fn(q, k, v), atol=1e-5, rtol=0)


def test_mode_reduce_overhead_and_mode_in_options():
    """torch.compile's `mode` reaches Inductor as its config patches; bad modes are refused."""
    import pytest
    from slcompile.backend import _split_options

    _, _, patches = _split_options({"mode": "reduce-overhead", "inductor_options": {"max_autotune": False}})
    assert patches == {"triton.cudagraphs": True, "max_autotune": False}
    with pytest.raises(ValueError, match="mode='fast'"):
        _split_options({"mode": "fast"})
    with pytest.raises(ValueError, match="needs compiler='inductor'"):
        _split_options({"mode": "reduce-overhead", "compiler": "eager"})

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    torch._dynamo.reset()
    q, k, v = torch.randn(1, 4, 24, 8), torch.randn(1, 2, 24, 8), torch.randn(1, 2, 24, 8)
    from slcompile.backend import capture_reports

    with capture_reports() as reports:
        out = torch.compile(f, backend="superlinear", mode="reduce-overhead")(q, k, v)
    assert sum(r.rewritten for r in reports) == 1
    torch.testing.assert_close(out, f(q, k, v), atol=1e-5, rtol=1e-5)
