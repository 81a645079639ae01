"""Where the custom ops run: the Triton kernels on CUDA (when Triton imports), the reference on
CPU. ``force_triton(True)`` (or ``SLCOMPILE_FORCE_TRITON=1`` together with ``TRITON_INTERPRET=1``)
sends the CPU implementation through the Triton kernels too, so that CI checks them under the
interpreter. Read by the forward ops (ops.py) and the backward ops (autograd.py) alike."""

from __future__ import annotations

import os

import torch

_FORCE_TRITON = os.environ.get("SLCOMPILE_FORCE_TRITON", "") == "1"


def force_triton(enabled: bool = True) -> None:
    """Route the CPU implementation of the ops through the Triton kernels (needs
    ``TRITON_INTERPRET=1`` set before triton is imported). For tests of the kernels on CPU."""
    global _FORCE_TRITON
    _FORCE_TRITON = bool(enabled)


def triton_module():
    """The Triton implementation of the stripe ops (kernels/triton_impl.py), or None when Triton
    is unavailable."""
    try:
        from . import triton_impl  # noqa: F401  (kernels land here)
    except ImportError:
        return None
    return triton_impl


def use_triton(device: torch.device) -> bool:
    if device.type == "cuda":
        return triton_module() is not None
    return _FORCE_TRITON and triton_module() is not None
