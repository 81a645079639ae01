"""Test helpers for rewritten models (used by slcompile's own tests; offered to users for theirs).

* `assert_rewrite_equivalent(model, inputs)`: compile with the ``superlinear`` backend under a
  config that makes superlinear attention exact (`SuperlinearConfig.exact`) and compare with eager.
  Passing proves the rewrite's wiring: q/k/v, scale, GQA grouping, layout, padding and positions.
* `assert_all_attention_rewritten(model, inputs, expected=N)`: every attention site found is
  rewritten (and there are N of them).
* `compare_with_dense(model, inputs, config)`: error metrics of a real (approximate) config
  against eager dense attention.

``inputs`` is a tuple of positional arguments, a dict of keyword arguments, or a single tensor.
``output_fn`` (optional) picks what to compare from the model's output (default: every floating
tensor in it, e.g. an HF output's ``logits``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

import torch

from slcompile.kernels.config import SuperlinearConfig

__all__ = ["assert_rewrite_equivalent", "assert_all_attention_rewritten", "compare_with_dense",
           "compile_superlinear"]


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _tensors(out, output_fn) -> List[torch.Tensor]:
    if output_fn is not None:
        out = output_fn(out)
    if hasattr(out, "logits") and isinstance(getattr(out, "logits"), torch.Tensor) and output_fn is None:
        out = out.logits
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def compile_superlinear(model, config: SuperlinearConfig, compiler: str = "aot_eager",
                        dynamic: Optional[bool] = None):
    """`torch.compile(model, backend="superlinear")` with `config` and the given inner compiler."""
    opts = dict(dataclasses.asdict(config))
    opts["compiler"] = compiler
    return torch.compile(model, backend="superlinear", options=opts, dynamic=dynamic)


def _run_compiled(model, inputs, config, compiler, dynamic):
    from slcompile.backend import capture_reports
    from slcompile.passes import RewriteReport

    torch._dynamo.reset()
    compiled = compile_superlinear(model, config, compiler, dynamic)
    with capture_reports() as reports, torch.no_grad():
        out = _call(compiled, inputs)
    rep = RewriteReport(sites=[], graphs=0)
    for r in reports:
        rep = rep.merge(r)
    return out, rep


def assert_rewrite_equivalent(model, inputs, *, expected: Optional[int] = None, atol: float = 1e-4,
                              rtol: float = 0.0, compiler: str = "aot_eager",
                              dynamic: Optional[bool] = None,
                              output_fn: Optional[Callable[[Any], Any]] = None,
                              config: Optional[SuperlinearConfig] = None):
    """Compile `model` with the exact config, run it on `inputs` and compare with eager.

    Raises AssertionError when no attention was rewritten (or not `expected` sites), or when any
    compared tensor differs by more than ``atol + rtol * |eager|``. Returns the `RewriteReport`.
    """
    config = config or SuperlinearConfig.exact()
    with torch.no_grad():
        ref = _call(model, inputs)
    out, rep = _run_compiled(model, inputs, config, compiler, dynamic)
    if rep.rewritten == 0:
        raise AssertionError(f"no attention was rewritten: {rep.summary()}")
    if expected is not None and rep.rewritten != expected:
        raise AssertionError(f"expected {expected} rewritten site(s), got {rep.rewritten}: {rep.summary()}")
    a, b = _tensors(ref, output_fn), _tensors(out, output_fn)
    if len(a) != len(b) or not a:
        raise AssertionError(f"outputs differ in structure ({len(a)} vs {len(b)} tensors)")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise AssertionError(f"output {i}: shape {tuple(y.shape)} != eager {tuple(x.shape)}")
        err = (x.float() - y.float()).abs()
        tol = atol + rtol * x.float().abs()
        if not bool(torch.isfinite(y).all() == torch.isfinite(x).all()) or bool((err > tol).any()):
            raise AssertionError(f"output {i}: max abs error {err.max().item():.3e} > atol {atol} "
                                 f"({rep.summary()})")
    return rep


def assert_all_attention_rewritten(model, inputs, expected: Optional[int] = None, *,
                                   config: Optional[SuperlinearConfig] = None):
    """Every attention site found in `model` (traced on `inputs`) is rewritten; with `expected`,
    exactly that many sites exist. Returns the `RewriteReport`."""
    from slcompile.explain import explain

    args = () if isinstance(inputs, dict) else (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,))
    kwargs = inputs if isinstance(inputs, dict) else None
    rep = explain(model, *args, config=config, kwargs=kwargs)
    if rep.found == 0:
        raise AssertionError("no attention site found")
    if rep.skipped:
        raise AssertionError(f"{rep.skipped} site(s) not rewritten: " +
                             "; ".join(f"{s.name}: {s.reason}" for s in rep.skipped_sites))
    if expected is not None and rep.rewritten != expected:
        raise AssertionError(f"expected {expected} rewritten site(s), got {rep.rewritten}")
    return rep


def compare_with_dense(model, inputs, config: Optional[SuperlinearConfig] = None, *,
                       compiler: str = "aot_eager",
                       output_fn: Optional[Callable[[Any], Any]] = None) -> Dict[str, float]:
    """Run `model` rewritten with `config` and eagerly (dense); return error metrics over the
    compared outputs: max_abs, mean_abs, rel_max (max_abs / max |eager|), cosine (flattened),
    plus rewritten/found site counts."""
    config = config or SuperlinearConfig()
    with torch.no_grad():
        ref = _call(model, inputs)
    out, rep = _run_compiled(model, inputs, config, compiler, None)
    a = torch.cat([t.float().reshape(-1) for t in _tensors(ref, output_fn)])
    b = torch.cat([t.float().reshape(-1) for t in _tensors(out, output_fn)])
    d = (a - b).abs()
    return {
        "max_abs": d.max().item(),
        "mean_abs": d.mean().item(),
        "rel_max": (d.max() / a.abs().max().clamp_min(1e-30)).item(),
        "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
        "rewritten": float(rep.rewritten),
        "found": float(rep.found),
    }
