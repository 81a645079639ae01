"""Issue 22: the sharp edges a new user hit, each run as the user runs it (a subprocess of
`python -m slcompile`, or the Python call) with its exit status and one-line error checked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cli_helpers import HERE, TINY, assert_one_line_error, listing, run_cli

ROOT = HERE.parents[2]
WITH_MODELS = {"PYTHONPATH": str(HERE)}  # issue22_models importable by the subprocess


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_files):
    """A converted archive of a retired search (block.sl.pt2: converted with "anchor", its
    span_search nodes then set to "block", as an archive converted before the retirement), a
    static-only pickled model, a .pt2 whose output type is registered only by importing
    issue22_models, and a Hugging Face Llama .pt2."""
    import issue22_models as m

    from slcompile.configs import build_config
    from slcompile.convert import convert_file

    d = tmp_path_factory.mktemp("issue22")
    ids = torch.randint(0, TINY["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    seq = torch.export.Dim("seq", min=2, max=4096)
    torch.save(m.FixedMultipleOf8(**TINY), d / "fixed.pt")
    pair = torch.export.export(m.PairOutput(**TINY), (ids,), dynamic_shapes=({1: seq},), strict=False)
    torch.export.save(pair, d / "pair.pt2")
    res = convert_file(str(tiny_files["dir"] / "tiny.pt2"), str(d / "block.sl.pt2"),
                       build_config({"search_key": "anchor", "window": 8, "dense_below": 0}),
                       verify=False)
    assert res.report["rewritten"] == 1
    old = torch.export.load(str(d / "block.sl.pt2"))
    searches = [n for n in old.graph.nodes if n.target is torch.ops.superlinear.span_search.default]
    for n in searches:
        n.args = n.args[:10] + ("block",) + n.args[11:]
    assert len(searches) == 1
    torch.export.save(old, d / "block.sl.pt2")
    return {"dir": d, "tiny": tiny_files["dir"] / "tiny.pt2", "notes": tiny_files["dir"] / "notes.txt"}


# --- devices --------------------------------------------------------------------------------

def test_demo_with_a_device_that_is_not_there():
    res = run_cli("demo", "--device", "tpu", "--seq-len", 16, "--repeat", 1)
    assert_one_line_error(res, 2, "--device 'tpu' is not a device", "cpu or cuda")
    res = run_cli("demo", "--device", "meta", "--seq-len", 16, "--repeat", 1)
    assert_one_line_error(res, 2, "--device meta", "cpu or cuda")
    if not torch.cuda.is_available():
        res = run_cli("demo", "--device", "cuda", "--seq-len", 16, "--repeat", 1)
        assert_one_line_error(res, 2, "--device cuda", "CUDA is not available")
    res = run_cli("bench", "--device", "tpu", "--lengths", 16)
    assert_one_line_error(res, 2, "--device 'tpu'")


def test_run_demo_api_checks_its_device():
    from slcompile.demo import run_demo

    with pytest.raises(ValueError, match="'tpu' is not a device"):
        run_demo(seq_len=16, repeat=1, device="tpu")


# --- options that were silently ignored -----------------------------------------------------

def test_batch_and_vocab_are_never_silently_ignored(files):
    res = run_cli("inspect", files["tiny"], "--batch", 0)
    assert_one_line_error(res, 2, "--batch must be an integer in [1,", "got 0")
    res = run_cli("inspect", files["tiny"], "--batch", 2)  # no --seq-len: the archive's inputs
    assert_one_line_error(res, 2, "--batch 2 applies only", "--seq-len")
    res = run_cli("inspect", files["tiny"], "--vocab", 5)
    assert_one_line_error(res, 2, "--vocab 5 applies only", "--seq-len")
    res = run_cli("bench", "--seq-len", 16, "--lengths", 16)  # the op bench has no token ids
    assert_one_line_error(res, 2, "--seq-len applies only with a MODEL")
    res = run_cli("bench", files["tiny"], "--heads", 4, "--lengths", 16)
    assert_one_line_error(res, 2, "--heads applies only to the op bench")
    # given with --seq-len they are used: batch 2 of ids < 5 (a pickled module is exported with them)
    res = run_cli("inspect", files["tiny"].with_suffix(".pt"), "--trust-pickle", "--seq-len", 16,
                  "--batch", 2, "--vocab", 5, "--json")
    assert res.rc == 0, res
    assert res.json()["inputs"] == "int64[2, 16]"


def test_inputs_that_do_not_fit_an_archive_are_refused_before_running(files):
    # tiny.pt2: batch 1 static, sequence 2..4096. Running them failed on torch's guards (exit 8).
    res = run_cli("check", files["tiny"], "--seq-len", 16, "--batch", 2)
    assert_one_line_error(res, 2, "do not fit", "batch 2", "exported with batch 1 fixed")
    res = run_cli("check", files["tiny"], "--seq-len", 5000)
    assert_one_line_error(res, 2, "do not fit", "at most 4096")
    res = run_cli("check", files["tiny"], "--lengths", "40,4097")
    assert_one_line_error(res, 2, "--lengths 4097", "up to 4096")


def test_make_example_inputs_api_refuses_ignored_batch(tiny_files):
    from slcompile.errors import UsageError
    from slcompile.loading import load_model, make_example_inputs

    loaded = load_model(str(tiny_files["dir"] / "tiny.pt2"))
    with pytest.raises(UsageError, match="--batch applies only"):
        make_example_inputs(loaded, batch=0)
    with pytest.raises(UsageError, match="--vocab applies only"):
        make_example_inputs(loaded, vocab=9)


# --- bounds at the front door ---------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--window", 10**20), ("--dense-below", 2**70),
                                        ("--sinks", 2**63)])
def test_config_values_past_int64_are_the_configs_error(files, flag, value):
    # They used to pass and fail in the op call: exit 8, "Expected ... 'int' ... found type 'int'".
    res = run_cli("check", files["tiny"], flag, value)
    field = flag[2:].replace("-", "_")
    assert_one_line_error(res, 7, f"SuperlinearConfig.{field}={value} is invalid", "int64")


def test_config_values_past_int64_in_the_api():
    from slcompile import SuperlinearConfig
    from slcompile.configs import build_config
    from slcompile.errors import ConfigError

    for field in ("window", "dense_below"):
        with pytest.raises(ValueError, match=rf"SuperlinearConfig\.{field}=\d+ is invalid.*int64"):
            SuperlinearConfig(**{field: 2**70})
        with pytest.raises(ConfigError, match="int64"):
            build_config({field: 2**70})
    assert SuperlinearConfig(window=2**63 - 1).window == 2**63 - 1


# --- retired block searches: refused by slcompile, up front ------------------------------------

@pytest.mark.parametrize("key", ["block", "block_rerank"])
def test_a_retired_search_key_is_refused_before_loading(files, workdir, key):
    out = workdir / "m.onnx"
    res = run_cli("export", files["tiny"], "--format", "onnx", "-o", out, "--search-key", key)
    assert_one_line_error(res, 7, f"search_key='{key}' was retired", "SuperlinearConfig()")
    assert "loading" not in res.stderr  # refused at the front door, before any heavy work
    assert listing(workdir) == []


def test_onnx_export_of_an_archive_of_a_retired_search_is_slcompiles_error(files, workdir):
    res = run_cli("export", files["dir"] / "block.sl.pt2", "--format", "onnx", "-o", workdir / "m.onnx")
    assert_one_line_error(res, 9, "search_key='block', which was retired", "convert the original")
    assert "ConversionError" not in res.stderr
    assert listing(workdir) == []
    res = run_cli("export", files["dir"] / "block.sl.pt2", "--format", "onnx", "-o",
                  workdir / "m.onnx", "--window", 8)
    assert_one_line_error(res, 2, "already converted", "config options")


def test_onnx_export_of_an_unconverted_model_with_the_default_search(files, workdir):
    # the default search (block-sparse) exports to standard operators; the N-step search, which
    # has no ONNX form, is refused before the rewrite, nothing written
    res = run_cli("export", files["tiny"], "--format", "onnx", "-o", workdir / "m.onnx",
                  "--dense-below", 0)
    assert res.rc == 0, res
    assert listing(workdir) == ["m.onnx"]
    res = run_cli("export", files["tiny"], "--format", "onnx", "-o", workdir / "n.onnx",
                  "--steps", 3)
    assert_one_line_error(res, 9, "has no form of the N-step search", "steps=2")
    assert listing(workdir) == ["m.onnx"]


def test_export_onnx_api_refuses_before_torchs_exporter(files, tmp_path, monkeypatch):
    import slcompile  # noqa: F401  (the ops)
    from slcompile.export import ExportRefusedError, export_onnx

    def exporter_must_not_run(*a, **k):
        raise AssertionError("torch.onnx.export ran")

    monkeypatch.setattr(torch.onnx, "export", exporter_must_not_run)
    ep = torch.export.load(str(files["dir"] / "block.sl.pt2"))
    with pytest.raises(ExportRefusedError, match="search_key='block', which was retired"):
        export_onnx(ep, str(tmp_path / "m.onnx"))
    assert listing(tmp_path) == []


# --- calibrate blames --seq-len ---------------------------------------------------------------

def test_calibrate_seq_len_too_short_for_the_window(files, workdir):
    res = run_cli("calibrate", "--text", files["notes"], "--seq-len", 512, "--window", 768,
                  "-o", workdir / "r.safetensors")
    msg = assert_one_line_error(res, 2, "--seq-len 512 is too short for window 768", "--seq-len 803")
    assert "texts hold" not in msg
    assert listing(workdir) == []


# --- files that are not what they should be ----------------------------------------------------

def test_inputs_file_that_is_text(files):
    res = run_cli("inspect", files["tiny"], "--inputs", files["notes"])
    msg = assert_one_line_error(res, 4, "notes.txt is not a torch.save file", "torch.save(tensor")
    assert "KeyError" not in msg


def test_output_path_under_a_regular_file(files):
    res = run_cli("convert", files["tiny"], "-o", files["notes"] / "out.pt2")
    assert_one_line_error(res, 6, "notes.txt is a file, not a folder")


# --- check says it fell back to a static export, and why it refuses --lengths -----------------

def test_check_says_it_exported_static_and_why_lengths_are_refused(files):
    res = run_cli("check", files["dir"] / "fixed.pt", "--trust-pickle", "--seq-len", 24,
                  "--lengths", "24,48", env_extra=WITH_MODELS)
    assert_one_line_error(res, 2, "--lengths 48", "static sequence length (24;",
                          "dynamic sequence length failed", "runs at 24 only")
    assert "note: dynamic sequence length failed" in res.stderr
    assert "exactness" not in res.stderr  # refused before the checks ran
    res = run_cli("check", files["dir"] / "fixed.pt", "--trust-pickle", "--seq-len", 24,
                  "--window", 8, "--dense-below", 0, "--json", env_extra=WITH_MODELS)
    assert res.rc == 0, res
    d = res.json()
    assert d["dynamic"] is False and any("exported with static shapes" in n for n in d["notes"])
    assert "note: dynamic sequence length failed" in res.stderr


# --- Hugging Face (and other) pytree output types ----------------------------------------------

def test_archive_with_an_unregistered_output_type_names_the_real_cause(files):
    res = run_cli("inspect", files["dir"] / "pair.pt2")
    assert_one_line_error(res, 4, "issue22_models.Pair", "not registered as a pytree type",
                          "--import issue22_models")
    assert "warnings above" not in res.stderr
    res = run_cli("inspect", files["dir"] / "pair.pt2", "--import", "issue22_models", "--json",
                  env_extra=WITH_MODELS)
    assert res.rc == 0, res
    assert res.json()["rewritten"] == 1


@pytest.fixture(scope="module")
def hf_archive(tmp_path_factory):
    """A 1-layer Hugging Face Llama exported the way README's recipe says (use_cache=False)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    model.config.use_cache = False
    ids = torch.randint(0, 64, (1, 40))
    ep = torch.export.export(model, (ids,), dynamic_shapes=({1: torch.export.Dim("seq", min=2)},),
                             strict=False)
    path = tmp_path_factory.mktemp("hf") / "llama.pt2"
    torch.export.save(ep, path)
    return path


def test_hugging_face_archive_converts_without_any_import(hf_archive, workdir):
    # It failed with exit 4 "corrupt or unsupported ... check the warnings above"; the cause was
    # CausalLMOutputWithPast not being registered until transformers.modeling_outputs is imported.
    out = workdir / "llama.sl.pt2"
    res = run_cli("convert", hf_archive, "-o", out, "--window", 8, "--dense-below", 0, "--json")
    assert res.rc == 0, res
    d = res.json()
    assert d["report"]["rewritten"] == 1 and d["dynamic"] is True
    assert d["verify_max_abs_err"] == 0.0
    assert listing(workdir) == ["llama.sl.pt2"]


def test_hugging_face_archive_loads_in_process(hf_archive):
    code = ("import sys; from slcompile.loading import load_model; "
            "lm = load_model(sys.argv[1]); print(type(lm.program).__name__)")
    proc = subprocess.run([sys.executable, "-c", code, str(hf_archive)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ExportedProgram"


# --- bench on a converted file ------------------------------------------------------------------

def test_bench_of_a_converted_file_says_why(files):
    res = run_cli("bench", files["dir"] / "block.sl.pt2", "--lengths", 24)
    msg = assert_one_line_error(res, 10, "already converted", "bench the original")
    assert "0 found" not in msg


# --- the example script ------------------------------------------------------------------------

def test_convert_file_example_makes_its_out_dir(workdir):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    script = ROOT / "examples" / "convert_file.py"
    new = workdir / "a" / "b"
    proc = subprocess.run([sys.executable, str(script), "--out-dir", str(new)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert listing(new) == ["model.pt2", "model.sl.pt2"]
    (workdir / "file").write_text("x")
    proc = subprocess.run([sys.executable, str(script), "--out-dir", str(workdir / "file" / "sub")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "cannot make the folder" in errors[0], proc.stderr


# --- README: the dense_below note matches the config ---------------------------------------------

def test_readme_use_section_says_nothing_changes_below_dense_below():
    from slcompile import SuperlinearConfig

    text = (ROOT / "README.md").read_text()
    use = text.split("## Use", 1)[1].split("\n## ", 1)[0]
    default = SuperlinearConfig().dense_below
    assert "Nothing changes below `dense_below`" in use
    assert f"dense_below={default}" in use and f"{default:,}" in use


# --- the exported ONNX serves any batch ---------------------------------------------------------

def test_converted_model_and_its_onnx_have_a_dynamic_batch(files, workdir):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    import slcompile  # noqa: F401  (the ops, for torch.export.load)

    sl, onnx_path = workdir / "tiny.sl.pt2", workdir / "tiny.onnx"
    res = run_cli("convert", files["tiny"].with_suffix(".pt"), "--trust-pickle", "--seq-len", 40,
                  "-o", sl, "--search-key", "anchor", "--window", 8, "--dense-below", 0, "--json")
    assert res.rc == 0, res
    res = run_cli("export", sl, "--format", "onnx", "-o", onnx_path)
    assert res.rc == 0, res
    program = torch.export.load(sl).module()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    assert [isinstance(d, str) for d in sess.get_inputs()[0].shape] == [True, True]  # [batch, seq]
    g = torch.Generator().manual_seed(4)
    for B, L in ((1, 40), (3, 57)):
        ids = torch.randint(0, TINY["vocab_size"], (B, L), generator=g)
        with torch.no_grad():
            want = program(ids)
        got = sess.run(None, {name: ids.numpy()})[0]
        assert got.shape == tuple(want.shape)
        assert np.abs(got - want.numpy()).max() <= 2e-4
