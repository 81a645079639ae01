"""Front door for files: load a model, build example inputs, export, rewrite, re-export, save.

``convert_file("model.pt2", "model.sl.pt2", config)`` is what ``slcompile convert`` runs:

1. load a ``torch.export`` archive (``.pt2``), or, only with ``trust_pickle=True``, a pickled
   ``nn.Module`` (``torch.save(model)``; unpickling runs arbitrary code, so it is refused otherwise)
   (``slcompile.loading``);
2. build example inputs (token ids from ``seq_len``/``batch``/``vocab``, a file of tensors, or the
   archive's own sample inputs) (``slcompile.loading``);
3. export to an ATen graph (``torch.export``), rewrite every provably causal attention site in place
   with ``slcompile.passes.rewrite_graph``, re-export (keeping the archive's dynamic dimensions)
   (``slcompile.prepare``);
4. save to a temporary file beside the output, load it back, check it reproduces the rewritten
   module, and only then move it into place with ``os.replace`` (``slcompile.paths``). The input is
   never overwritten and no partial file is left behind on failure.

The resulting archive holds ``superlinear`` op nodes (``block_sparse_attention`` for the default
search; ``span_search``/``span_attention`` for the stripe searches);
``torch.export.load`` reads it once ``slcompile`` is imported (importing registers the ops).

This module also holds what the CLI's commands share to run and compare models (``run_module``,
``error_metrics``) and to report a rewrite as data (``report_to_dict``, ``superlinear_nodes``).

Every failure is an ``SlcompileError`` (``slcompile.errors``) with a one-line message and an
``exit_code``; the CLI prints the message and exits with that code.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from slcompile.configs import build_config
from slcompile.errors import ModelError, NothingRewrittenError, first_line
from slcompile.loading import ExampleInputs, load_model, make_example_inputs, quiet_torch_logs
from slcompile.paths import atomic_output, check_input_path, check_output_path
from slcompile.prepare import prepare, reexport, rewrite_module


# --------------------------------------------------------------------------------------------
# Running and comparing
# --------------------------------------------------------------------------------------------

def run_module(module, ex: ExampleInputs, what: str = "the model"):
    import torch

    try:
        with torch.no_grad():
            return module(*ex.args, **ex.kwargs)
    except Exception as e:
        raise ModelError(f"running {what} on {ex.describe()} failed: {type(e).__name__}: {first_line(e)}")


def output_tensors(out) -> list:
    """Floating-point tensors of a model output (any pytree, HF ModelOutput included)."""
    import torch
    from torch.utils import _pytree as pytree

    if hasattr(out, "to_tuple") and callable(out.to_tuple):
        out = out.to_tuple()
    leaves = pytree.tree_leaves(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def error_metrics(ref, got) -> Dict[str, float]:
    """Max/mean absolute error, relative error (max abs / max |ref|) and, for logits-like last
    dimensions > 1, the fraction of positions whose argmax agrees."""
    import torch

    a, b = output_tensors(ref), output_tensors(got)
    if len(a) != len(b):
        raise ModelError(f"outputs differ in structure: {len(a)} vs {len(b)} tensors")
    max_abs, sum_abs, n, ref_max = 0.0, 0.0, 0, 0.0
    agree, total = 0, 0
    finite = True
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise ModelError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if not x.is_floating_point():
            if not torch.equal(x, y):
                max_abs = float("inf")
            continue
        x64, y64 = x.double(), y.double()
        if not torch.isfinite(y64).all() and torch.isfinite(x64).all():
            finite = False
        d = (x64 - y64).abs()
        d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
        max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
        sum_abs += float(d.sum())
        n += d.numel()
        ref_max = max(ref_max, float(x64.abs().max()) if x64.numel() else 0.0)
        if x.dim() >= 2 and x.shape[-1] > 1:
            agree += int((x.argmax(-1) == y.argmax(-1)).sum())
            total += x[..., 0].numel()
    return {
        "max_abs_err": max_abs,
        "mean_abs_err": sum_abs / max(n, 1),
        "rel_err": max_abs / ref_max if ref_max > 0 else max_abs,
        "argmax_agreement": (agree / total) if total else None,
        "finite": finite,
        "ref_max_abs": ref_max,
    }


# --------------------------------------------------------------------------------------------
# Report helpers (reports are data; the CLI prints them)
# --------------------------------------------------------------------------------------------

def report_to_dict(report) -> Dict[str, Any]:
    sites = [site_to_dict(s) for s in getattr(report, "sites", [])]
    return {
        "found": int(getattr(report, "found", len(sites))),
        "rewritten": int(getattr(report, "rewritten", sum(1 for s in sites if s.get("rewritten")))),
        "skipped": int(getattr(report, "skipped", sum(1 for s in sites if not s.get("rewritten")))),
        "sites": sites,
    }


def site_to_dict(site) -> Dict[str, Any]:
    if dataclasses.is_dataclass(site):
        # Not dataclasses.asdict: it deep-copies, and shapes may hold SymInts.
        d = {f.name: getattr(site, f.name) for f in dataclasses.fields(site)}
    else:
        d = {k: getattr(site, k, None) for k in ("name", "module_path", "source", "form", "q_shape",
                                                 "kv_shape", "causal_proven", "rewritten", "reason")}
    return {k: _jsonable(v) for k, v in d.items()}


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    try:
        return int(v)
    except (TypeError, ValueError):
        return str(v)


def superlinear_nodes(graph) -> List[Any]:
    """Attention nodes of ours already present in a graph (an archive converted before):
    ``span_attention``, or ``block_sparse_attention`` (search_key="blocksparse")."""
    import torch

    targets = (torch.ops.superlinear.span_attention.default,
               torch.ops.superlinear.block_sparse_attention.default)
    return [n for n in graph.nodes if n.op == "call_function" and n.target in targets]


# --------------------------------------------------------------------------------------------
# convert_file
# --------------------------------------------------------------------------------------------

@dataclass
class ConvertResult:
    input: str
    output: str
    input_format: str
    inputs: str
    dynamic: bool
    config: Dict[str, Any]
    report: Dict[str, Any]
    verify_max_abs_err: Optional[float]
    vs_dense: Optional[Dict[str, Any]]
    output_bytes: int
    seconds: Dict[str, float]
    notes: List[str]

    def to_dict(self) -> Dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


def convert_file(input_path: str, output_path: str, config=None, *, trust_pickle: bool = False,
                 seq_len: Optional[int] = None, batch: int = 1, vocab: Optional[int] = None,
                 inputs_file: Optional[str] = None, dynamic: bool = True, overwrite: bool = False,
                 allow_unchanged: bool = False, verify: bool = True,
                 progress: Optional[Callable[[str], None]] = None) -> ConvertResult:
    """Convert a model file into a ``torch.export`` archive with superlinear attention.

    Args:
        input_path: a ``.pt2`` archive, or a ``torch.save``'d ``nn.Module`` (needs ``trust_pickle``).
        output_path: where to write the ``.pt2``; never the input; written atomically.
        config: ``SuperlinearConfig`` (default: the defaults).
        seq_len, batch, vocab: build token-id example inputs [batch, seq_len] in [0, vocab).
        inputs_file: or a ``torch.save``'d tensor / tuple / dict of example inputs.
        dynamic: keep the sequence dimension dynamic (an archive keeps its own dynamic dims).
        overwrite: replace an existing output file (never the input).
        allow_unchanged: write the file even when no attention site was rewritten.
        verify: run the saved archive and the rewritten module on the example inputs and require
            identical outputs (and report the error against the original, dense model).
        progress: called with a short description at each step.
    """
    import torch

    step = progress or (lambda msg: None)
    config = config if config is not None else build_config()
    check_input_path(input_path)
    check_output_path(output_path, [input_path] + ([inputs_file] if inputs_file else []), overwrite)
    seconds: Dict[str, float] = {}
    t0 = time.perf_counter()

    step("loading model")
    loaded = load_model(input_path, trust_pickle=trust_pickle)
    ex = make_example_inputs(loaded, seq_len=seq_len, batch=batch, vocab=vocab, inputs_file=inputs_file)
    seconds["load"] = time.perf_counter() - t0

    step("exporting" if loaded.module is not None else "reading program")
    t = time.perf_counter()
    prep = prepare(loaded, ex, dynamic=dynamic)
    seconds["export"] = time.perf_counter() - t
    if superlinear_nodes(prep.program.graph):
        prep.notes.append(f"the input already holds {len(superlinear_nodes(prep.program.graph))} "
                          f"superlinear attention site(s)")

    step("rewriting attention")
    t = time.perf_counter()
    gm, report = rewrite_module(prep, config)
    rep = report_to_dict(report)
    seconds["rewrite"] = time.perf_counter() - t
    already = len(superlinear_nodes(prep.program.graph))
    if rep["rewritten"] == 0 and already and not allow_unchanged:
        raise NothingRewrittenError(f"{input_path} is already converted ({already} superlinear "
                                    f"attention site(s)) and has no dense attention left to rewrite")
    if rep["rewritten"] == 0 and not allow_unchanged:
        reasons = sorted({s.get("reason") or "?" for s in rep["sites"]})
        detail = f"{rep['found']} site(s) found" + (f", skipped: {'; '.join(reasons)}" if reasons else "")
        raise NothingRewrittenError(f"no attention site was rewritten ({detail}); nothing written "
                                    f"(pass --allow-unchanged to write it anyway)")

    step("re-exporting")
    t = time.perf_counter()
    new_ep = reexport(prep, gm)
    seconds["reexport"] = time.perf_counter() - t

    verify_err = None
    vs_dense = None
    step("saving")
    t = time.perf_counter()
    with atomic_output(output_path) as tmp:
        try:
            torch.export.save(new_ep, tmp)
        except Exception as e:
            raise ModelError(f"saving the archive failed: {type(e).__name__}: {first_line(e)}")
        seconds["save"] = time.perf_counter() - t
        step("verifying the saved archive")
        t = time.perf_counter()
        try:
            with quiet_torch_logs():
                reloaded = torch.export.load(tmp)
        except Exception as e:
            raise ModelError(f"the written archive does not load back: {type(e).__name__}: {first_line(e)}")
        if len(superlinear_nodes(reloaded.graph)) < rep["rewritten"]:
            raise ModelError("the written archive lost superlinear attention nodes on the way "
                             f"({len(superlinear_nodes(reloaded.graph))} < {rep['rewritten']})")
        if verify:
            got = run_module(reloaded.module(), ex, "the saved archive")
            want = run_module(gm, ex, "the rewritten model")
            m = error_metrics(want, got)
            verify_err = m["max_abs_err"]
            if not (verify_err <= 1e-5 * max(1.0, m["ref_max_abs"])):
                raise ModelError(f"the saved archive does not reproduce the rewritten model "
                                 f"(max abs error {verify_err:.3g})")
            dense = run_module(prep.dense_module(), ex, "the original model")
            vs_dense = error_metrics(dense, want)
        seconds["verify"] = time.perf_counter() - t
    size = os.path.getsize(output_path)
    seconds["total"] = time.perf_counter() - t0
    return ConvertResult(
        input=input_path, output=output_path, input_format=loaded.fmt, inputs=ex.describe(),
        dynamic=prep.dynamic, config=config.to_dict(), report=rep, verify_max_abs_err=verify_err,
        vs_dense=vs_dense, output_bytes=size, seconds=seconds, notes=prep.notes)
