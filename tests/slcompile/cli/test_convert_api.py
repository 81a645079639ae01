"""The front door's file handling, in process (fast): format detection, refusal of untrusted
pickles, output-path checks and atomic writes. The subprocess tests cover the same paths end to end."""

from __future__ import annotations

import os

import pytest
import torch

from cli_helpers import listing
from slcompile import convert as cv


def test_detect_format(tiny_files, tmp_path):
    d = tiny_files["dir"]
    assert cv.detect_format(str(d / "tiny.pt2")) == "pt2"
    assert cv.detect_format(str(d / "tiny.pt")) == "torch-save"
    with pytest.raises(cv.InputFormatError, match="checksum mismatch"):
        cv.detect_format(str(d / "bitflip.pt2"))  # torch.export.load would read it silently
    with pytest.raises(cv.InputFormatError, match="corrupt or truncated"):
        cv.detect_format(str(d / "truncated.pt2"))
    with pytest.raises(cv.InputFormatError, match="not a model file"):
        cv.detect_format(str(d / "notes.txt"))
    (tmp_path / "empty.pt2").write_bytes(b"")
    with pytest.raises(cv.InputFormatError, match="empty"):
        cv.detect_format(str(tmp_path / "empty.pt2"))
    with pytest.raises(cv.InputFormatError, match="directory"):
        cv.detect_format(str(tmp_path))
    with pytest.raises(cv.InputNotFoundError):
        cv.detect_format(str(tmp_path / "missing.pt2"))


def test_pickles_only_with_trust(tiny_files):
    path = str(tiny_files["dir"] / "tiny.pt")
    with pytest.raises(cv.PickleRefusedError, match="--trust-pickle"):
        cv.load_model(path)
    loaded = cv.load_model(path, trust_pickle=True)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded.module(ids), tiny_files["model"](ids))
    with pytest.raises(cv.InputFormatError, match="state_dict"):
        cv.load_model(str(tiny_files["dir"] / "state_dict.pt"), trust_pickle=True)


def test_plain_pickle_of_a_module(tiny_files, tmp_path):
    import pickle

    path = tmp_path / "plain.pkl"
    with open(path, "wb") as f:
        pickle.dump(tiny_files["model"], f)
    assert cv.detect_format(str(path)) == "pickle"
    with pytest.raises(cv.PickleRefusedError):
        cv.load_model(str(path))
    module = cv.load_model(str(path), trust_pickle=True).module
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(module(ids), tiny_files["model"](ids))


def test_output_path_checks(tiny_files, tmp_path):
    src = str(tiny_files["dir"] / "tiny.pt2")
    with pytest.raises(cv.OutputPathError, match="is the input"):
        cv.check_output_path(src, [src], overwrite=True)
    with pytest.raises(cv.OutputPathError, match="does not exist"):
        cv.check_output_path(str(tmp_path / "no" / "dir" / "x.pt2"), [src])
    with pytest.raises(cv.OutputPathError, match="directory"):
        cv.check_output_path(str(tmp_path), [src])
    (tmp_path / "old.pt2").write_bytes(b"old")
    with pytest.raises(cv.OutputPathError, match="--overwrite"):
        cv.check_output_path(str(tmp_path / "old.pt2"), [src])
    cv.check_output_path(str(tmp_path / "old.pt2"), [src], overwrite=True)
    assert listing(tmp_path) == ["old.pt2"]  # the probe file is gone


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"previous")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with cv.atomic_output(str(out)) as tmp:
                with open(tmp, "wb") as f:
                    f.write(b"half")
                raise exc
        assert listing(tmp_path) == ["model.pt2"] and out.read_bytes() == b"previous"
    with cv.atomic_output(str(out)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert listing(tmp_path) == ["model.pt2"] and out.read_bytes() == b"new"


def test_config_errors_are_the_configs():
    assert cv.build_config({"window": 32, "topk": None}).window == 32
    with pytest.raises(cv.ConfigError, match=r"SuperlinearConfig\.combine='sum'"):
        cv.build_config({"combine": "sum"})
    with pytest.raises(cv.ConfigError, match="window"):
        cv.build_config({"window": -1})
    exact = cv.exact_config(cv.build_config({"search_key": "anchor", "combine": "gated", "window": 8}))
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
