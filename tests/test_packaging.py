"""Packaging contract: passes/ and kernels/ install as slcompile.passes / slcompile.kernels only."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _py(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_no_top_level_import_names(tmp_path):
    r = _py("import importlib.util as u, slcompile.kernels, slcompile.passes;"
            "print(u.find_spec('kernels') is None, u.find_spec('passes') is None)", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]


def test_top_level_kernels_from_a_checkout_is_inert():
    # From the repository root the folder is importable as `kernels` (sys.path[0] = cwd), and
    # transformers imports that name looking for the Hugging Face kernels package. It must not
    # register the custom ops a second time (that would replace the real registration).
    code = ("import kernels, sys, slcompile, torch;"
            "import slcompile.kernels.ops as ops;"
            "print('kernels.ops' in sys.modules, hasattr(kernels, 'ops'));"
            "q = torch.randn(1, 1, 40, 8);"
            "ops.force_triton(False);"
            "a, s = torch.ops.superlinear.span_search(q, q, None, None, 4, 2, 0.5, 0.5, 2.0, 0.0, 'anchor', 0);"
            "print(tuple(a.shape))")
    r = _py(code, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["False False", "(1, 1, 40, 2)"]
