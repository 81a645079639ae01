"""Export of models with superlinear attention: ONNX (standard operators) and TensorRT.

``export_onnx(program, path, example_inputs=(args, kwargs))`` writes an ONNX file in which the
``superlinear::span_search`` / ``span_attention`` nodes are translated into standard ONNX operators
(``slcompile.onnx_ops``), so onnxruntime, TensorRT's ONNX parser or any other ONNX runtime runs
the model with no plugin. The sequence axis stays dynamic when the program's is (the CLI's
archives and ``slcompile.convert`` keep it dynamic); a program exported with static shapes is
re-exported with the sequence axis (dim 1 of a 2-D integer input such as token ids) dynamic.

``export_tensorrt(program, path, example_inputs=...)`` compiles the program with torch-tensorrt
(``ir="dynamo"``), with converters for the two ops that lower them to TensorRT layers through the
same standard-operator decomposition (``slcompile.trt_converters`` is not needed: the ops are
decomposed into aten ops before TensorRT sees them). It needs ``torch_tensorrt`` and
``tensorrt``, and raises ``ExportDependencyError`` naming the missing package otherwise.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any, Optional, Tuple

import torch


class ExportDependencyError(RuntimeError):
    """An optional package needed for this export is not installed."""


def _require(module: str, package: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExportDependencyError(
            f"{what} needs the Python package '{package}' (import {module!r} failed: {e}); "
            f"install it, e.g. `pip install 'slcompile[{'onnx' if what.startswith('ONNX') else 'tensorrt'}]'`"
        ) from e


def _split_inputs(program, example_inputs) -> Tuple[tuple, dict]:
    if example_inputs is None:
        # the program's own example inputs (torch.export keeps them when it can)
        ex = getattr(program, "example_inputs", None)
        if ex is None:
            raise ValueError("export needs example_inputs=(args, kwargs): the program carries none")
        return tuple(ex[0]), dict(ex[1] or {})
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"example_inputs must be (args_tuple, kwargs_dict) or an args tuple, "
                    f"got {type(example_inputs).__name__}")


def _has_dynamic_input(program) -> bool:
    from torch.export.graph_signature import InputKind

    users = {s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    for n in program.graph.nodes:
        if n.op == "placeholder" and n.name in users:
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in v.shape):
                return True
    return False


def _with_dynamic_sequence(program, args, kwargs):
    """Re-export a static program with dim 1 of its 2-D integer inputs dynamic (token ids,
    attention masks, positions); returns the program unchanged when that is not possible."""
    if _has_dynamic_input(program) or kwargs:
        return program
    specs = []
    seq = torch.export.Dim("seq", min=2)
    any_seq = False
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() == 2 and not a.is_floating_point() and a.shape[1] >= 2:
            specs.append({1: seq})
            any_seq = True
        else:
            specs.append(None)
    if not any_seq:
        return program
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(program.module(), args, dynamic_shapes=tuple(specs), strict=False)
    except Exception as e:  # keep the static program: still a correct export, for one length
        warnings.warn(f"slcompile.export: the program has static shapes and re-exporting it with a "
                      f"dynamic sequence axis failed ({type(e).__name__}: {e}); exporting it static")
        return program


def export_onnx(program: "torch.export.ExportedProgram", path: str, example_inputs=None, *,
                opset_version: Optional[int] = None, optimize: bool = True) -> str:
    """Write ``program`` (holding ``torch.ops.superlinear`` nodes or not) to the ONNX file ``path``
    with standard ONNX operators only. Returns ``path``."""
    _require("onnx", "onnx", "ONNX export")
    _require("onnxscript", "onnxscript", "ONNX export")
    from slcompile import onnx_ops

    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"export_onnx needs a torch.export.ExportedProgram, got {type(program).__name__}")
    args, kwargs = _split_inputs(program, example_inputs)
    program = _with_dynamic_sequence(program, args, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program, args, kwargs=kwargs or None, dynamo=True,
            opset_version=opset_version or onnx_ops.ONNX_OPSET,
            custom_translation_table=onnx_ops.translation_table(),
            optimize=optimize, external_data=False, verbose=False, report=False)
    onnx_program.save(path, external_data=False)
    return path


def export_tensorrt(program, path, example_inputs=None, **kw):
    _require("tensorrt", "tensorrt", "TensorRT export")
    _require("torch_tensorrt", "torch-tensorrt", "TensorRT export")
    raise NotImplementedError
