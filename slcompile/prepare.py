"""Export, rewrite, re-export: a loaded model made into an ATen graph, rewritten, exported again.

``prepare`` exports a loaded module (or takes an archive's program) with example inputs and works
out the dynamic-shape spec to re-export with (an archive keeps its own dynamic dimensions; token
ids made from a length get dynamic batch and sequence axes); ``rewrite_module`` runs
``slcompile.passes.rewrite_graph`` on a fresh copy of the graph; ``reexport`` exports the result.
``input_mismatch`` and ``seq_len_range`` say which inputs a program accepts.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from slcompile.errors import ModelError, NotAvailableError, SlcompileError, UsageError, first_line
from slcompile.loading import ExampleInputs, LoadedModel


def _program_dynamic_shapes(ep, module, args, kwargs):
    """Dynamic-shape spec reproducing the dynamic dims of ``ep``'s user inputs (None if static)."""
    import torch
    from torch.export import Dim
    from torch.export.graph_signature import InputKind
    from torch.utils import _pytree as pytree

    user_names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    vals = [placeholders[n].meta.get("val") for n in user_names]
    dims: Dict[str, Any] = {}
    leaf_specs = []
    any_dynamic = False
    for v in vals:
        if not isinstance(v, torch.Tensor):
            leaf_specs.append(None)
            continue
        spec = {}
        for i, s in enumerate(v.shape):
            if isinstance(s, torch.SymInt):
                expr = s.node.expr
                name = str(expr)
                if getattr(expr, "is_Symbol", False):
                    if name not in dims:
                        rng = ep.range_constraints.get(expr)
                        # torch's int_oo reports is_finite=True: test .is_Integer too
                        lo = int(rng.lower) if rng is not None and rng.lower.is_Integer else 0
                        hi = int(rng.upper) if rng is not None and rng.upper.is_Integer else None
                        kw = {"min": max(lo, 0)}
                        if hi is not None:
                            kw["max"] = hi
                        dims[name] = Dim(f"d_{name}", **kw)
                    spec[i] = dims[name]
                else:
                    spec[i] = Dim.AUTO
                any_dynamic = True
        leaf_specs.append(spec or None)
    if not any_dynamic:
        return None
    flat, treespec = pytree.tree_flatten((args, kwargs))
    if len(flat) != len(leaf_specs):
        return None
    return _structure_specs(module, args, kwargs, leaf_specs)


def _structure_specs(module, args, kwargs, leaf_specs):
    """Arrange per-leaf specs (flattened order of (args, kwargs)) by forward's argument names."""
    from torch.utils import _pytree as pytree

    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    out = {}
    it = iter(leaf_specs)
    # pytree flattens (args, kwargs) as args in order, then kwargs in key-sorted order for dicts;
    # rebuild the exact order the same way.
    flat_args = [(None, a) for a in args]
    flat_kwargs = [(k, kwargs[k]) for k in sorted(kwargs)] if kwargs else []
    per_value = []
    for _, v in flat_args + flat_kwargs:
        leaves, spec = pytree.tree_flatten(v)
        per_value.append(pytree.tree_unflatten([next(it) for _ in leaves], spec))
    values = list(args) + [kwargs[k] for k in sorted(kwargs)]
    by_id = {}
    for v, s in zip(values, per_value):
        by_id[id(v)] = s
    for name, val in bound.arguments.items():
        if id(val) in by_id:
            out[name] = by_id[id(val)]
        elif isinstance(val, (tuple, list)) and all(id(x) in by_id for x in val):
            out[name] = type(val)(by_id[id(x)] for x in val)
        elif isinstance(val, dict) and all(id(x) in by_id for x in val.values()):
            out[name] = {k: by_id[id(x)] for k, x in val.items()}
        else:
            return None
    return out


def input_mismatch(program, args, kwargs) -> Optional[str]:
    """Why the example inputs cannot run ``program`` (None: they fit): a different number of
    tensors, a rank, or a size where the program's dimension is static or capped."""
    import torch
    from torch.export.graph_signature import InputKind
    from torch.utils import _pytree as pytree

    users = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    vals = [placeholders[n].meta.get("val") if n in placeholders else None for n in users]
    flat = pytree.tree_leaves((tuple(args), dict(kwargs or {})))
    if len(flat) != len(vals):
        return f"the program takes {len(vals)} input(s), the example gives {len(flat)}"
    for i, (want, got) in enumerate(zip(vals, flat)):
        if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
            continue
        if want.dim() != got.dim():
            return f"input {i} has {got.dim()} dimensions, the program's has {want.dim()}"
        for d, (w, g) in enumerate(zip(want.shape, got.shape)):
            if isinstance(w, torch.SymInt):
                rng = program.range_constraints.get(w.node.expr)
                if rng is not None and rng.upper.is_Integer and g > int(rng.upper):
                    return f"input {i} dim {d} is {g}, the program takes at most {int(rng.upper)}"
            elif int(w) != int(g):
                what = "batch" if d == 0 else ("sequence length" if d == 1 else f"dim {d}")
                return (f"input {i} has {what} {g}, the program was exported with {what} {int(w)} "
                        f"fixed (a static dimension)")
    return None


def seq_len_range(program) -> Optional[Tuple[int, Optional[int]]]:
    """(min, max) of the sequence length (dim 1 of the first 2-D+ user input) that ``program``
    accepts; max None when unbounded; None when that dimension is static or there is none."""
    import torch
    from torch.export.graph_signature import InputKind

    users = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for name in users:
        v = placeholders[name].meta.get("val") if name in placeholders else None
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            s = v.shape[1]
            if not isinstance(s, torch.SymInt):
                return None
            rng = program.range_constraints.get(s.node.expr)
            if rng is None:
                return None
            lo = int(rng.lower) if rng.lower.is_Integer else 0
            hi = int(rng.upper) if rng.upper.is_Integer else None
            return lo, hi
    return None


def _seq_dynamic_shapes(module, ex: ExampleInputs, batch: bool = False):
    """Mark dim 1 (sequence) of the token-id input dynamic (and dim 0, the batch, with ``batch``)."""
    from torch.export import Dim

    if not ex.seq_dim_dynamic or len(ex.args) != 1 or ex.kwargs:
        return None
    if ex.args[0].shape[1] < 2:
        return None
    seq = Dim("seq", min=2)
    spec = {0: Dim("batch", min=1), 1: seq} if batch else {1: seq}
    return _structure_specs(module, ex.args, ex.kwargs, [spec])


def export_module(module, ex: ExampleInputs, dynamic_shapes=None):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, ex.args, ex.kwargs, dynamic_shapes=dynamic_shapes,
                                       strict=False)
    except Exception as e:
        raise ModelError(f"torch.export failed: {type(e).__name__}: {first_line(e)}")


def _rewrite_api():
    try:
        from slcompile.passes import rewrite_graph  # noqa: F401
    except ImportError as e:
        raise NotAvailableError(f"not available yet: needs slcompile.passes.rewrite_graph "
                                f"(the graph pass) ({first_line(e)})")
    return rewrite_graph


@dataclass
class Prepared:
    """A model ready to rewrite: its export, example inputs, and how its shapes are declared."""

    loaded: LoadedModel
    program: Any                     # ExportedProgram of the original (dense) model
    inputs: ExampleInputs
    dynamic_shapes: Any              # spec used to re-export (None = static)
    notes: List[str] = field(default_factory=list)
    # inputs to re-export with when they differ from ``inputs``: a dynamic batch axis needs an
    # example batch of 2 (torch.export specializes a dimension of size 1 to the constant 1)
    export_inputs: Optional[ExampleInputs] = None

    @property
    def dynamic_batch(self) -> bool:
        """Dim 0 of the first input is dynamic in the program (one file serves every batch)."""
        import torch

        v = _first_user_input_val(self.program)
        return isinstance(v, torch.Tensor) and v.dim() >= 1 and isinstance(v.shape[0], torch.SymInt)

    @property
    def dynamic(self) -> bool:
        return self.dynamic_shapes is not None

    def dense_module(self):
        """A fresh runnable module of the original program."""
        return self.program.module()


def _first_user_input_val(program):
    from torch.export.graph_signature import InputKind

    users = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    for n in program.graph.nodes:
        if n.op == "placeholder" and users and n.name == users[0]:
            return n.meta.get("val")
    return None


def _batch_of_two(inputs: ExampleInputs, which: Callable[[int, Any], bool]) -> Optional[ExampleInputs]:
    """``inputs`` with the tensors chosen by ``which(flat index, tensor)`` that have batch 1
    repeated to batch 2 (None when nothing changes)."""
    import torch
    from torch.utils import _pytree as pytree

    flat, spec = pytree.tree_flatten((tuple(inputs.args), dict(inputs.kwargs)))
    changed = False
    for i, t in enumerate(flat):
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == 1 and which(i, t):
            flat[i] = torch.cat([t, t], 0)
            changed = True
    if not changed:
        return None
    args, kwargs = pytree.tree_unflatten(flat, spec)
    return ExampleInputs(tuple(args), dict(kwargs), inputs.source + " (batch 2 for export)",
                         inputs.seq_dim_dynamic)


def _archive_export_inputs(ep, inputs: ExampleInputs) -> Optional[ExampleInputs]:
    """For an archive with a dynamic batch: example inputs of batch 2 for the re-export."""
    import torch
    from torch.export.graph_signature import InputKind

    users = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    vals = [placeholders[n].meta.get("val") if n in placeholders else None for n in users]

    def dyn_batch(i, t):
        v = vals[i] if i < len(vals) else None
        return isinstance(v, torch.Tensor) and v.dim() >= 1 and isinstance(v.shape[0], torch.SymInt)

    return _batch_of_two(inputs, dyn_batch)


def prepare(loaded: LoadedModel, inputs: ExampleInputs, dynamic: bool = True) -> Prepared:
    """Export ``loaded`` (if it is a module) with ``inputs``; work out the dynamic-shape spec.
    Token ids made from a length (``inputs.seq_dim_dynamic``) are exported with the batch and the
    sequence axes dynamic (with an example batch of 2; the sequence axis alone if that fails)."""
    notes: List[str] = []
    if loaded.program is not None:
        ep = loaded.program
        why = input_mismatch(ep, inputs.args, inputs.kwargs)
        if why is not None:  # say so here: running it would fail on one of torch's guards
            raise UsageError(f"the example inputs ({inputs.source}) do not fit {loaded.path}: {why}")
        ds = _program_dynamic_shapes(ep, ep.module(), inputs.args, inputs.kwargs) if dynamic else None
        if dynamic and ds is None and inputs.seq_dim_dynamic:
            notes.append("the archive was exported with static shapes: the result is static too")
        export_inputs = _archive_export_inputs(ep, inputs) if ds is not None else None
        return Prepared(loaded, ep, inputs, ds, notes, export_inputs)
    module = loaded.module
    hf_config = getattr(module, "config", None)
    if getattr(hf_config, "use_cache", False) is True:
        # Hugging Face models return a KV-cache object by default; a prefill program has no use
        # for it and torch.export cannot return it.
        hf_config.use_cache = False
        notes.append("the model's config.use_cache was set to False for export (prefill program, "
                     "no KV cache in the outputs)")
    ds = _seq_dynamic_shapes(module, inputs) if dynamic else None
    if ds is not None:
        ds_b = _seq_dynamic_shapes(module, inputs, batch=True)
        two = _batch_of_two(inputs, lambda i, t: True)
        if ds_b is not None:
            try:
                ep = export_module(module, two or inputs, ds_b)
                return Prepared(loaded, ep, inputs, ds_b, notes, two)
            except ModelError:
                pass  # e.g. a model that fixes its batch: keep the sequence axis dynamic alone
        try:
            ep = export_module(module, inputs, ds)
        except ModelError as e:
            notes.append(f"dynamic sequence length failed ({e}); exported with static shapes")
            ds = None
            ep = export_module(module, inputs, None)
    else:
        ep = export_module(module, inputs, None)
    return Prepared(loaded, ep, inputs, ds, notes)


def rewrite_module(prepared: Prepared, config, dry_run: bool = False):
    """A fresh copy of the original graph module, rewritten in place; returns (module, report).
    With ``dry_run`` the pass only analyses (the module is left dense)."""
    rewrite_graph = _rewrite_api()
    gm = prepared.program.module()
    try:
        report = rewrite_graph(gm, config, dry_run=True) if dry_run else rewrite_graph(gm, config)
        if not dry_run:
            _drop_dead_nodes(gm)
        gm.recompile()
    except SlcompileError:
        raise
    except Exception as e:
        raise ModelError(f"the rewrite pass failed: {type(e).__name__}: {first_line(e)}")
    return gm, report


def _drop_dead_nodes(gm) -> None:
    """Remove nodes whose results are unused, random ones included.

    A replaced SDPA node carries the ``nondeterministic_seeded`` tag (it could run dropout), so the
    default dead-code elimination keeps it, and the re-exported program would still compute dense
    attention beside the superlinear ops. Unused random ops only advance the RNG; in an inference
    graph they are dead too. Calls of modules (the export's input guards) and mutating ops stay."""

    def impure(n) -> bool:
        if n.op in ("placeholder", "output"):
            return True
        try:
            return n.is_impure(impure_random=False)
        except TypeError:  # older torch without impure_random
            return n.is_impure()

    if gm.graph.eliminate_dead_code(is_impure_node=impure):
        gm.recompile()


def reexport(prepared: Prepared, gm):
    import torch

    ex = prepared.export_inputs or prepared.inputs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(gm, ex.args, ex.kwargs,
                                       dynamic_shapes=prepared.dynamic_shapes, strict=False)
    except Exception as e:
        raise ModelError(f"re-exporting the rewritten graph failed: {type(e).__name__}: {first_line(e)}")
