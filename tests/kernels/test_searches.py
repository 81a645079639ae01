"""The search-kind registry (kernels/searches.py): every layer reads it, so that a new kind that
reuses an existing family is one entry, and every entry's facts hold."""

import dataclasses
from pathlib import Path

import pytest
import torch

from slcompile import SuperlinearConfig, superlinear_attention
from slcompile.export import onnx_refusal_for_config
from slcompile.kernels import searches

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(searches.REGISTRY))
def test_entry_drives_the_config(name):
    k = searches.kind(name)
    c = SuperlinearConfig(search_key=name)
    assert c.kind is k and (c.window, c.topk) == (k.window, k.topk)
    SuperlinearConfig(search_key=name, topk=k.topk_max)
    with pytest.raises(ValueError, match="topk"):
        SuperlinearConfig(search_key=name, topk=k.topk_max + 1)
    assert (ROOT / k.contract).is_file(), k.contract
    assert k.family in searches.FAMILIES
    assert (onnx_refusal_for_config(c) is None) == k.onnx
    if k.nstep:
        SuperlinearConfig(search_key=name, steps=3)
    else:
        with pytest.raises(ValueError, match="steps=3"):
            SuperlinearConfig(search_key=name, steps=3)


def test_unknown_key_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="blocksparse"):
        searches.kind("nope")
    with pytest.raises(ValueError, match="search_key='nope' is invalid: expected one of"):
        SuperlinearConfig(search_key="nope")


def test_retired_keys_are_refused_with_the_default_named():
    """search_key="block" / "block_rerank" (retired): one line at the front door, from a config,
    a saved config (from_dict, as the Hugging Face config and routers files load), the CLI's
    config building, or a graph's op; a config saved before the retirement with the retired
    fields (fine_block, rerank) and a remaining key loads as it ran."""
    from slcompile.configs import build_config
    from slcompile.errors import ConfigError

    assert set(searches.RETIRED) == {"block", "block_rerank"}
    assert not set(searches.RETIRED) & set(searches.REGISTRY)
    for key in searches.RETIRED:
        want = (f"SuperlinearConfig.search_key={key!r} was retired (the block searches ran slower "
                "than dense attention): use the default, SuperlinearConfig() "
                "(search_key='blocksparse', docs/blocksparse.md)")
        for make in (lambda: SuperlinearConfig(search_key=key),
                     lambda: SuperlinearConfig(search_key="anchor").replace(search_key=key),
                     lambda: SuperlinearConfig.from_dict(dict(search_key=key, window=768,
                                                              fine_block=16, rerank=32))):
            with pytest.raises(ValueError) as e:
                make()
            assert str(e.value) == want and "\n" not in want
        with pytest.raises(ConfigError, match=f"search_key='{key}' was retired"):
            build_config({"search_key": key})
        with pytest.raises(ValueError, match=f"^search_key='{key}' was retired .*blocksparse"):
            searches.kind(key)
        q = torch.randn(1, 2, 40, 8)
        with pytest.raises(ValueError, match=f"search_key='{key}' was retired"):
            torch.ops.superlinear.span_search(q, q, None, None, 8, 2, 0.5, 0.5, 2.0, 0.0, key, 0)
    for cfg in (SuperlinearConfig(), SuperlinearConfig(search_key="mean", topk=6)):
        saved = {**cfg.to_dict(), "fine_block": 32, "rerank": 4}
        assert SuperlinearConfig.from_dict(saved) == cfg
    with pytest.raises(TypeError, match="fine_block"):  # no longer a field
        SuperlinearConfig(fine_block=16)


def test_for_pretrained_is_retired_with_its_search():
    """SuperlinearConfig.for_pretrained() (search_key="block_rerank") raises, whatever it is given,
    one line naming the default instead."""
    for kw in ({}, dict(window=512, dense_below=0)):
        with pytest.raises(ValueError) as e:
            SuperlinearConfig.for_pretrained(**kw)
        assert str(e.value) == (
            "SuperlinearConfig.for_pretrained() (search_key='block_rerank') was retired (the block "
            "searches ran slower than dense attention): use the default, SuperlinearConfig() "
            "(search_key='blocksparse', docs/blocksparse.md)")


def test_names_filter():
    assert searches.names(family="stripe") == ("anchor", "mean")
    assert searches.names(family="blocksparse") == ("blocksparse",)
    assert set(searches.names()) == set(searches.REGISTRY)


@pytest.mark.parametrize("base,combine", [("anchor", "gated"), ("mean", "union"),
                                          ("anchor", "union")])
def test_a_new_entry_is_enough(monkeypatch, base, combine):
    """A dry-run addition: a kind registered as a copy of an existing one (no Triton kernel, so the
    reference runs wherever it is called) is accepted by the config and runs the same search
    through the ops, the reference and autograd: outputs and gradients equal to its original's."""
    new = dataclasses.replace(searches.kind(base), name=base + "_copy", triton=False)
    monkeypatch.setitem(searches.REGISTRY, new.name, new)
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, T, D = 1, 4, 2, 160, 16
    q = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    outs, grads = [], []
    for key in (base, new.name):
        cfg = SuperlinearConfig(search_key=key, window=16, topk=2, dense_below=0, combine=combine)
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        out = superlinear_attention(qq, kk, v, config=cfg, enable_gqa=True)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append((qq.grad, kk.grad))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert (outs[0] - dense).abs().max() > 1e-3  # the search mattered
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
