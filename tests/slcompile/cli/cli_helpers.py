"""Helpers of the command-line tests: a runner that invokes the CLI in a subprocess, exactly as a
user does, and checks of its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent

# A deliberately tiny Llama-style model: 1 layer, 2 query heads sharing 1 kv head (GQA).
TINY = dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64)


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    def json(self):
        return json.loads(self.stdout)

    def error_lines(self):
        return [ln for ln in self.stderr.splitlines() if ln.startswith("slcompile: error:")]

    def __repr__(self):
        return f"<rc={self.rc}\nstdout={self.stdout[-2000:]}\nstderr={self.stderr[-3000:]}>"


def run_cli(*args, cwd=None, env_extra=None, timeout=300, module=True) -> Result:
    env = dict(os.environ)
    env.pop("SLCOMPILE_DEBUG", None)
    env["PYTHONWARNINGS"] = "ignore"
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "slcompile", *map(str, args)] if module else [*map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return Result(proc)


def assert_one_line_error(res: Result, code: int, *needles: str) -> str:
    assert res.rc == code, res
    lines = res.error_lines()
    assert len(lines) == 1, res
    assert "Traceback" not in res.stderr, res
    msg = lines[0]
    for n in needles:
        assert n.lower() in msg.lower(), (n, msg)
    return msg


def listing(folder: Path):
    return sorted(p.name for p in Path(folder).iterdir())
