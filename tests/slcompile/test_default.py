"""The default is block-sparse attention (docs/blocksparse.md) at every front door: the config,
the backend with no options, `attn_implementation="superlinear"` and the functional form; the
stripe searches of docs/spec.md keep their own defaults when named."""

import pytest
import torch
import torch.nn.functional as F

import slcompile
import slcompile.hf as H
from slcompile import SuperlinearConfig
from slcompile.kernels import blocksparse as bs


def test_default_config_is_the_block_sparse_one_and_kinds_bring_their_defaults():
    c = SuperlinearConfig()
    assert c == SuperlinearConfig.block_sparse()
    assert (c.search_key, c.window, c.topk, c.q_block, c.k_block) == ("blocksparse", 256, 24, 64, 32)
    a = SuperlinearConfig(search_key="anchor")
    assert (a.window, a.topk) == (64, 3)
    # replace keeps what was given and re-derives the rest for the new kind
    assert SuperlinearConfig(window=512).replace(search_key="mean").to_dict() == \
        SuperlinearConfig(window=512, search_key="mean").to_dict()
    assert c.replace(search_key="anchor").topk == 3
    assert SuperlinearConfig(steps=3).search_key == "anchor"
    # a saved config reloads to itself, whatever its kind
    for cfg in (c, a, SuperlinearConfig(topk=40, dense_below=0), SuperlinearConfig(steps=4)):
        assert SuperlinearConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="topk"):
        SuperlinearConfig(search_key="anchor", topk=9)
    with pytest.raises(ValueError, match="topk"):
        SuperlinearConfig(topk=257)


def test_block_sparse_preset():
    """The block-sparse preset: docs/blocksparse.md's search with its measured geometry; overrides
    validated; at 8K the last 1024 queries attend at most 15% of the keys on average (on random
    inputs, counted from the op's own lists), each of them at most 16%."""
    p = SuperlinearConfig.block_sparse()
    assert (p.search_key, p.window, p.sinks, p.topk, p.q_block, p.k_block) == \
        ("blocksparse", 256, 4, 24, 64, 32)
    assert p.dense_below == SuperlinearConfig().dense_below
    assert SuperlinearConfig.block_sparse(topk=40).topk == 40
    with pytest.raises(ValueError, match="k_block"):
        SuperlinearConfig.block_sparse(k_block=128)  # q_block 64 is not a multiple
    torch.manual_seed(0)
    T = 8192
    q, k = torch.randn(1, 2, 1024, 16), torch.randn(1, 1, T, 16)
    kw = dict(window=p.window, sinks=p.sinks, q_block=p.q_block, k_block=p.k_block)
    kept = bs.block_select(q, k, None, T - 1024, topk=p.topk, rows=p.block_rows,
                           pool=p.block_pool, group=p.block_group, spread=p.spread_rows,
                           exact_rows=p.exact_rows, **kw)
    keys = bs.keys_attended(kept, T - 1024, 1024, T, **kw).double()
    share = keys / torch.arange(T - 1024 + 1, T + 1)
    assert float(share.mean()) <= 0.15 and float(share.max()) <= 0.16 and float(share.min()) > 0.1


def _qkv(T, seed, Hq=4, Hkv=2, D=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, T, D, generator=g) for h in (Hq, Hkv, Hkv)]


def _reference(q, k, v, cfg):
    return bs.superlinear_block_attention(
        q, k, v, None, 0, window=cfg.window, sinks=cfg.sinks, topk=cfg.topk, q_block=cfg.q_block,
        k_block=cfg.k_block, rows=cfg.block_rows, pool=cfg.block_pool, scale=q.shape[-1] ** -0.5,
        dense_below=cfg.dense_below, exact_rows=cfg.exact_rows, group=cfg.block_group,
        spread=cfg.spread_rows)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _compiled(q, k, v, **options):
    """SDPA compiled with backend="superlinear" and these options (none: no options at all)."""
    torch._dynamo.reset()
    fn = torch.compile(_sdpa, backend="superlinear", **({"options": options} if options else {}))
    out = fn(q, k, v)
    torch._dynamo.reset()
    return out


def _front_doors_match_the_reference(q, k, v, cfg, **options):
    """The functional form (under cfg) and the backend (under options, the same config spelled as
    the backend takes it) both give the reference's output; returns it."""
    want = _reference(q, k, v, cfg)
    out = slcompile.superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_compiled(q, k, v, **options), want, atol=1e-5, rtol=1e-5)
    return want


def test_backend_without_options_runs_the_default_past_dense_below():
    cfg = SuperlinearConfig()
    T = cfg.dense_below + 3 * cfg.q_block + 5  # past dense_below: the sparse path, a partial block
    q, k, v = _qkv(T, 0)
    out = _compiled(q, k, v)
    want = _reference(q, k, v, cfg)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    dense = _sdpa(q, k, v)
    assert (out - dense).abs().max() > 1e-2  # sparse: late queries leave blocks out
    # the early queries see every key (window, sinks and kept blocks cover them)
    torch.testing.assert_close(out[:, :, :1024], dense[:, :, :1024], atol=1e-5, rtol=1e-5)


def test_attn_implementation_without_config_uses_the_default():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "superlinear"
    layer = model.model.layers[0].self_attn
    assert H.get_config(layer) == SuperlinearConfig()
    # the same default, forced past dense_below, through the whole model against the functional
    H.configure(model, SuperlinearConfig(dense_below=0))
    ids = torch.randint(0, 64, (1, 2048), generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        sparse = model(ids).logits
        H.configure(model, SuperlinearConfig.exact())
        exact = model(ids).logits
        model.config._attn_implementation = "sdpa"
        dense = model(ids).logits
    torch.testing.assert_close(exact, dense, atol=1e-4, rtol=1e-4)
    assert (sparse - dense).abs().max() > 1e-3


def test_functional_default_matches_the_reference():
    cfg = SuperlinearConfig(dense_below=0)
    q, k, v = _qkv(1500, 2)
    out = slcompile.superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
    torch.testing.assert_close(out, _reference(q, k, v, cfg), atol=1e-6, rtol=1e-6)
    dense = _sdpa(q, k, v)
    assert (out - dense).abs().max() > 1e-2


def test_exact_rows_through_the_functional_form_and_the_backend():
    cfg = SuperlinearConfig(dense_below=0, exact_rows=64)  # stage 2 scores with every row
    q, k, v = _qkv(1500, 3)
    want = _front_doors_match_the_reference(q, k, v, cfg, dense_below=0, exact_rows=64)
    assert (want - _reference(q, k, v, SuperlinearConfig(dense_below=0))).abs().max() > 1e-3


def test_exact_rows_gradients_follow_the_forwards_blocks():
    cfg = SuperlinearConfig(dense_below=0, exact_rows=32, topk=4)  # sparse at this length
    q, k, v = (x.requires_grad_() for x in _qkv(900, 4))
    slcompile.superlinear_attention(q, k, v, config=cfg, enable_gqa=True).square().sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    _reference(q, k, v, cfg).square().sum().backward()
    for g, x in zip(got, (q, k, v)):
        torch.testing.assert_close(g, x.grad, atol=1e-5, rtol=1e-5)
        x.grad = None
    _reference(q, k, v, cfg.replace(exact_rows=0)).square().sum().backward()
    assert (got[0] - q.grad).abs().max() > 1e-4  # stage 2's rows chose other blocks


def test_stage_one_groups_through_the_front_doors():
    """block_group (stage 1 bounds groups of key blocks; the default 8): validated by the config,
    carried by the backend and the functional form, and absent from the op's arguments it means 1,
    the semantics of graphs exported before it."""
    assert SuperlinearConfig().block_group == 8 and SuperlinearConfig().spread_rows is False
    with pytest.raises(ValueError, match="spread_rows"):
        SuperlinearConfig(spread_rows=1)
    with pytest.raises(ValueError, match="block_group"):
        SuperlinearConfig(block_group=3)
    with pytest.raises(ValueError, match="block_group"):
        SuperlinearConfig(block_group=128)
    cfg = SuperlinearConfig(dense_below=0, topk=6)  # sparse at this length
    q, k, v = _qkv(3000, 5)
    want = _front_doors_match_the_reference(q, k, v, cfg, dense_below=0, topk=6)
    old = torch.ops.superlinear.block_sparse_attention(  # no trailing arguments: groups of 1,
        q, k, v, None, None, cfg.window, cfg.sinks, cfg.topk, 0.25, 0, cfg.q_block, cfg.k_block,
        cfg.block_rows, cfg.block_pool)  # the block's last rows
    one = _reference(q, k, v, cfg.replace(block_group=1, spread_rows=False, exact_rows=0))
    torch.testing.assert_close(old, one, atol=1e-6, rtol=1e-6)
    assert (one - want).abs().max() > 1e-3  # the groups chose other blocks
