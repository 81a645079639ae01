"""torch.compile(model, backend="superlinear") in training: AOTAutograd builds the joint graph
around the rewritten ops (their backward passes are ops too) and the gradients equal those of the
same model run eagerly with `slcompile.superlinear_attention` (GQA, gated and union)."""

import pytest
import torch
import torch.nn.functional as F

import slcompile


class TinyLM(torch.nn.Module):
    """Two attention layers with GQA, written with SDPA (what the pass rewrites) or, for the
    eager reference, with slcompile.superlinear_attention and a given config."""

    def __init__(self, vocab=50, d=32, hq=4, hkv=2, layers=2, eager_config=None):
        super().__init__()
        self.hq, self.hkv, self.dh = hq, hkv, d // hq
        self.emb = torch.nn.Embedding(vocab, d)
        self.qkv = torch.nn.ModuleList(
            torch.nn.Linear(d, (hq + 2 * hkv) * self.dh) for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab)
        self.eager_config = eager_config

    def forward(self, tok):
        x = self.emb(tok)
        B, L, _ = x.shape
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = qkv(x).split([self.hq * self.dh, self.hkv * self.dh, self.hkv * self.dh], -1)
            q = q.view(B, L, self.hq, self.dh).transpose(1, 2)
            k = k.view(B, L, self.hkv, self.dh).transpose(1, 2)
            v = v.view(B, L, self.hkv, self.dh).transpose(1, 2)
            if self.eager_config is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                y = slcompile.superlinear_attention(q, k, v, config=self.eager_config,
                                                    enable_gqa=True)
            x = x + out(y.transpose(1, 2).reshape(B, L, -1))
        return self.head(x)


@pytest.mark.parametrize("combine,search_key", [("gated", "anchor"), ("union", "mean")])
def test_compiled_training_gradients_equal_eager_superlinear(combine, search_key):
    torch.manual_seed(0)
    opts = dict(window=4, sinks=1, topk=2, dense_below=0, combine=combine, search_key=search_key)
    cfg = slcompile.SuperlinearConfig(**opts)
    model = TinyLM().train()
    eager = TinyLM(eager_config=cfg).train()
    eager.load_state_dict(model.state_dict())
    dense = TinyLM().train()
    dense.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="superlinear", options={**opts, "compiler": "aot_eager"})
    tok = torch.randint(0, 50, (2, 48))
    tgt = torch.randint(0, 50, (2, 48))
    losses, grads = [], []
    for m in (compiled, eager, dense):
        loss = F.cross_entropy(m(tok).flatten(0, 1), tgt.flatten())
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in
                      (m._orig_mod if m is compiled else m).named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=2e-6, rtol=1e-5, msg=n)
    # superlinear attention really differs from dense here (the spans matter), and so do grads
    assert (losses[0] - losses[2]).abs() > 1e-4
    assert max((grads[0][n] - grads[2][n]).abs().max() for n in grads[0]) > 1e-4


def test_compiled_training_joint_graph_holds_the_backward_ops():
    """The AOTAutograd backward graph calls the backward ops (nothing decomposed away)."""
    from torch._dynamo.backends.common import aot_autograd

    seen = []

    def fw(gm, _):
        return gm.forward

    def bw(gm, _):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    from slcompile.backend import _split_options  # noqa: F401  (the backend's option parser)
    from slcompile.passes import rewrite_graph

    cfg = slcompile.SuperlinearConfig(search_key="anchor", window=4, sinks=1, topk=2, dense_below=0,
                                     combine="gated")

    def backend(gm, example_inputs):
        rewrite_graph(gm, cfg)
        return aot_autograd(fw_compiler=fw, bw_compiler=bw)(gm, example_inputs)

    torch.manual_seed(1)
    model = TinyLM().train()
    out = torch.compile(model, backend=backend)(torch.randint(0, 50, (1, 40)))
    out.square().mean().backward()
    assert any("span_attention_backward" in s for s in seen), seen
    assert any("span_search_backward" in s for s in seen), seen
