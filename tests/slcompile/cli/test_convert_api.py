"""The front door's file handling, in process (fast): format detection, refusal of untrusted
pickles, output-path checks and atomic writes. The subprocess tests cover the same paths end to end."""

from __future__ import annotations

import os

import pytest
import torch

from cli_helpers import listing
from slcompile import configs, errors, loading, paths


def test_detect_format(tiny_files, tmp_path):
    d = tiny_files["dir"]
    assert loading.detect_format(str(d / "tiny.pt2")) == "pt2"
    assert loading.detect_format(str(d / "tiny.pt")) == "torch-save"
    with pytest.raises(errors.InputFormatError, match="checksum mismatch"):
        loading.detect_format(str(d / "bitflip.pt2"))  # torch.export.load would read it silently
    with pytest.raises(errors.InputFormatError, match="corrupt or truncated"):
        loading.detect_format(str(d / "truncated.pt2"))
    with pytest.raises(errors.InputFormatError, match="not a model file"):
        loading.detect_format(str(d / "notes.txt"))
    (tmp_path / "empty.pt2").write_bytes(b"")
    with pytest.raises(errors.InputFormatError, match="empty"):
        loading.detect_format(str(tmp_path / "empty.pt2"))
    with pytest.raises(errors.InputFormatError, match="directory"):
        loading.detect_format(str(tmp_path))
    with pytest.raises(errors.InputNotFoundError):
        loading.detect_format(str(tmp_path / "missing.pt2"))


def test_pickles_only_with_trust(tiny_files):
    path = str(tiny_files["dir"] / "tiny.pt")
    with pytest.raises(errors.PickleRefusedError, match="--trust-pickle"):
        loading.load_model(path)
    loaded = loading.load_model(path, trust_pickle=True)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded.module(ids), tiny_files["model"](ids))
    with pytest.raises(errors.InputFormatError, match="state_dict"):
        loading.load_model(str(tiny_files["dir"] / "state_dict.pt"), trust_pickle=True)


def test_plain_pickle_of_a_module(tiny_files, tmp_path):
    import pickle

    path = tmp_path / "plain.pkl"
    with open(path, "wb") as f:
        pickle.dump(tiny_files["model"], f)
    assert loading.detect_format(str(path)) == "pickle"
    with pytest.raises(errors.PickleRefusedError):
        loading.load_model(str(path))
    module = loading.load_model(str(path), trust_pickle=True).module
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(module(ids), tiny_files["model"](ids))


def test_output_path_checks(tiny_files, tmp_path):
    src = str(tiny_files["dir"] / "tiny.pt2")
    with pytest.raises(errors.OutputPathError, match="is the input"):
        paths.check_output_path(src, [src], overwrite=True)
    with pytest.raises(errors.OutputPathError, match="does not exist"):
        paths.check_output_path(str(tmp_path / "no" / "dir" / "x.pt2"), [src])
    with pytest.raises(errors.OutputPathError, match="directory"):
        paths.check_output_path(str(tmp_path), [src])
    (tmp_path / "old.pt2").write_bytes(b"old")
    with pytest.raises(errors.OutputPathError, match="--overwrite"):
        paths.check_output_path(str(tmp_path / "old.pt2"), [src])
    paths.check_output_path(str(tmp_path / "old.pt2"), [src], overwrite=True)
    assert listing(tmp_path) == ["old.pt2"]  # the probe file is gone


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"previous")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with paths.atomic_output(str(out)) as tmp:
                with open(tmp, "wb") as f:
                    f.write(b"half")
                raise exc
        assert listing(tmp_path) == ["model.pt2"] and out.read_bytes() == b"previous"
    with paths.atomic_output(str(out)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert listing(tmp_path) == ["model.pt2"] and out.read_bytes() == b"new"


def test_config_errors_are_the_configs():
    assert configs.build_config({"window": 32, "topk": None}).window == 32
    with pytest.raises(errors.ConfigError, match=r"SuperlinearConfig\.combine='sum'"):
        configs.build_config({"combine": "sum"})
    with pytest.raises(errors.ConfigError, match="window"):
        configs.build_config({"window": -1})
    exact = configs.exact_config(configs.build_config({"search_key": "anchor", "combine": "gated", "window": 8}))
    assert exact.combine == "gated" and exact.dense_below == 0 and exact.window >= 2**40


def test_bench_a_model_in_process(tiny_files):
    """`slcompile bench MODEL` (in process through click's runner: the subprocess tests above
    cover the command-line plumbing; this covers the model-timing path)."""
    import json

    from click.testing import CliRunner

    from slcompile.cli import main

    res = CliRunner().invoke(main, ["bench", str(tiny_files["dir"] / "tiny.pt"), "--trust-pickle",
                                    "--lengths", "16,40", "--repeat", "1", "--warmup", "0",
                                    "--search-key", "anchor", "--window", "4", "--topk", "1", "--sinks", "1",
                                    "--json", "-q"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert [r["seq_len"] for r in d["rows"]] == [16, 40]
    assert all(r["dense_ms"] > 0 and r["superlinear_ms"] > 0 for r in d["rows"])
    assert d["rows"][1]["max_abs_err"] > 1e-3  # L=40 >> window 4: the rewritten model differs
