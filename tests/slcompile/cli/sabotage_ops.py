"""Test helper imported with `slcompile check --import sabotage_ops`: it makes the superlinear
reference add a small error, so an exactness check over a correctly rewritten graph must fail."""

import slcompile.kernels.reference as _reference

_original = _reference.span_attention


def _off_by_a_little(*args, **kwargs):
    return _original(*args, **kwargs) + 1e-2


_reference.span_attention = _off_by_a_little
