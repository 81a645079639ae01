"""Packaging contract: passes/ and kernels/ install as slcompile.passes / slcompile.kernels only."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# our top-level kernels/ folder (a virtual environment may live inside the checkout: CI's .venv)
OURS = os.path.join(os.path.realpath(ROOT), "kernels") + os.sep


def _py(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_no_top_level_import_names(tmp_path):
    # ``kernels`` may exist (Hugging Face's package, which transformers depends on), never as ours
    r = _py("import importlib.util as u, os, slcompile.kernels, slcompile.passes;"
            "s = u.find_spec('kernels');"
            "print(s is None or not os.path.realpath(s.origin or '').startswith(%r),"
            " u.find_spec('passes') is None)" % OURS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]


def _hf_kernels_version():
    # the real package must be installed for the tests below to mean anything: the ``hf`` extra
    # requires it, so its absence is a broken environment, not a reason to skip
    import importlib.metadata
    return importlib.metadata.version("kernels")


def test_checkout_root_does_not_shadow_hugging_face_kernels():
    # From the checkout root (sys.path[0] = cwd) our top-level ``kernels/`` folder must hand its
    # name to the installed package: transformers imports ``from kernels import ...`` on import.
    _hf_kernels_version()
    code = ("import os, slcompile, kernels;"
            "from transformers import LlamaConfig, LlamaForCausalLM;"
            "import transformers.integrations.hub_kernels;"
            "print(os.path.realpath(kernels.__file__));"
            "print(hasattr(torch_ops := __import__('torch').ops.superlinear, 'span_search'))")
    r = _py(code, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    origin, registered = r.stdout.split()
    assert not origin.startswith(OURS), origin
    assert registered == "True"
    # python -m pytest puts the root first too; and transformers first, slcompile after
    r = _py("from transformers import LlamaConfig; import slcompile, kernels;"
            "print(kernels.__name__, slcompile.SuperlinearConfig().window)", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["kernels", "256"]  # the default (block-sparse) window


def test_cli_from_checkout_root_with_transformers():
    # ``python -m slcompile`` from the checkout root, on the real pretrained model (transformers,
    # gguf): it failed at import with "cannot import name 'CUDAProperties' from 'kernels'"
    _hf_kernels_version()
    r = subprocess.run([sys.executable, "-m", "slcompile", "demo", "--model", "smollm2",
                        "--seq-len", "48", "--repeat", "1", "--json", "-q"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["ok"] is True, out


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
