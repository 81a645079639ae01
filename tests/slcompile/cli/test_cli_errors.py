"""`slcompile` as a user runs it, when things go wrong: every failure is one line on stderr, a
documented exit status, no traceback (unless --debug), and nothing half-written left behind."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from cli_helpers import assert_one_line_error, listing, run_cli

from slcompile.errors import EXIT_CODES


def test_help_lists_commands_examples_and_exit_codes():
    script = shutil.which("slcompile", path=os.path.dirname(sys.executable)) or shutil.which("slcompile")
    assert script, "the slcompile console script is not installed"
    res = run_cli(script, "--help", module=False)
    assert res.rc == 0, res
    for cmd in ("demo", "convert", "inspect", "check", "bench", "export", "calibrate"):
        assert cmd in res.stdout
    assert "Examples:" in res.stdout
    for code, _ in EXIT_CODES:
        assert f"\n  {code:>3}  " in res.stdout.replace("    ", "  "), code
    # Distinct codes, one per kind of failure.
    codes = [c for c, _ in EXIT_CODES]
    assert len(codes) == len(set(codes))


def test_missing_file(tiny_files, workdir):
    out = workdir / "out.pt2"
    res = run_cli("convert", workdir / "nope.pt2", "-o", out, "--json")
    assert_one_line_error(res, 3, "nope.pt2")
    assert res.json() == {"ok": False, "error": res.error_lines()[0].split("error: ", 1)[1],
                          "kind": "input not found", "exit_code": 3}
    assert listing(workdir) == []


def test_corrupt_archive(tiny_files, workdir):
    # (a flipped byte inside an archive is caught by its checksums: test_convert_api.py)
    res = run_cli("convert", tiny_files["dir"] / "truncated.pt2", "-o", workdir / "out.pt2")
    assert_one_line_error(res, 4, "corrupt")
    assert listing(workdir) == []


def test_wrong_format(tiny_files, workdir):
    # Even with --trust-pickle a state_dict is recognised (safely) as the wrong kind of file.
    # (other wrong files: test_convert_api.py)
    res = run_cli("convert", tiny_files["dir"] / "state_dict.pt", "-o", workdir / "out.pt2",
                  "--trust-pickle", "--seq-len", 16)
    assert_one_line_error(res, 4, "state_dict")
    assert listing(workdir) == []


def test_pickle_refused_without_trust(tiny_files, workdir):
    res = run_cli("inspect", tiny_files["dir"] / "tiny.pt", "--seq-len", 16)
    assert_one_line_error(res, 5, "--trust-pickle", "arbitrary code")


def test_unwritable_output(tiny_files, workdir):
    if os.geteuid() == 0:
        out = "/proc/slcompile-test-out.pt2"  # root may write anywhere except a pseudo file system
    else:
        ro = workdir / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "out.pt2"
    before = listing(workdir)
    res = run_cli("convert", tiny_files["dir"] / "tiny.pt2", "-o", out)
    assert_one_line_error(res, 6, "cannot write")
    assert listing(workdir) == before
    assert not os.path.exists(out)


def test_output_is_input_is_refused_even_with_overwrite(tiny_files, workdir):
    src = workdir / "model.pt2"
    shutil.copy(tiny_files["dir"] / "tiny.pt2", src)
    original = src.read_bytes()
    link = workdir / "alias.pt2"
    link.symlink_to(src)
    res = run_cli("convert", src, "-o", link, "--overwrite")
    assert_one_line_error(res, 6, "is the input")
    assert src.read_bytes() == original
    assert listing(workdir) == ["alias.pt2", "model.pt2"]


def test_bad_config_value_is_the_configs_error_and_debug_shows_traceback(tiny_files, workdir):
    # Without --debug every error test above asserts "no traceback"; with it, the traceback
    # comes first and the one-line error still ends the output.
    res = run_cli("check", tiny_files["dir"] / "tiny.pt2", "--search-key", "anchor", "--topk", 99, "--debug")
    assert res.rc == 7, res
    assert "Traceback" in res.stderr and "ValueError" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("slcompile: error: SuperlinearConfig.topk=99")


def test_export_without_its_packages_is_a_clear_error(tiny_files, workdir):
    import importlib.util

    if importlib.util.find_spec("slcompile.export") is None:
        res = run_cli("export", tiny_files["dir"] / "tiny.pt2", "--format", "onnx", "-o",
                      workdir / "m.onnx")
        assert_one_line_error(res, 9, "not available yet", "needs")
    elif importlib.util.find_spec("tensorrt") is None:
        res = run_cli("export", tiny_files["dir"] / "tiny.pt2", "--format", "tensorrt", "-o",
                      workdir / "m.trt")
        assert_one_line_error(res, 9, "not available", "needs", "tensorrt")
    else:
        pytest.skip("slcompile.export and TensorRT are installed: covered by the export tests")
    assert listing(workdir) == []
