"""Set-up shared by the Triton kernel tests: Triton's interpreter on a machine without CUDA, the
device the kernels run on, a skip where they cannot run, and poisoned memory.

tests/conftest.py imports this module first, so TRITON_INTERPRET is set before anything imports
Triton."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # CPU CI: the kernels run under Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


def require_triton():
    """Skip the calling test (or, at import, its module) unless Triton kernels can run here."""
    triton = pytest.importorskip("triton")
    if not INTERPRETED and not torch.cuda.is_available():
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 on a machine without CUDA",
                    allow_module_level=True)
    return triton


def poison(dev=DEV):
    """Leave NaN in freshly freed memory, so that outputs made with torch.empty start poisoned."""
    x = torch.full((1 << 16,), float("nan"), device=dev)
    del x


def through_triton(monkeypatch, *entry_points):
    """Send the custom ops through the Triton kernels for the rest of the test (dispatch's
    force_triton, undone at teardown) and count calls of the given (module, function name) entry points: the
    returned list gets the name at each call, so a test can show the kernel really ran."""
    from slcompile.kernels import dispatch

    calls = []
    for module, name in entry_points:
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    monkeypatch.setattr(dispatch, "_FORCE_TRITON", True)
    return calls
