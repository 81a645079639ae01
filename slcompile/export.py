"""Export of models with superlinear attention: ONNX (standard operators) and TensorRT.

``export_onnx(program, path, example_inputs=(args, kwargs))`` writes an ONNX file in which the
``superlinear::span_search`` / ``span_attention`` nodes are translated into standard ONNX operators
(``slcompile.onnx_ops``), so onnxruntime, TensorRT's ONNX parser or any other ONNX runtime runs
the model with no plugin. The sequence axis stays dynamic when the program's is (the CLI's
archives and ``slcompile.convert`` keep it dynamic); a program exported with static shapes is
re-exported with the sequence axis (dim 1 of a 2-D integer input such as token ids) dynamic.

``export_tensorrt(program, path, example_inputs=...)`` has two routes: the ONNX form above parsed
by TensorRT's ONNX parser into a serialized engine (``model.engine``; needs ``tensorrt``), or
torch-tensorrt's dynamo compiler with the two ops registered as generated plugins
(``register_tensorrt_plugins``; ``model.ep``; needs ``torch-tensorrt`` and TensorRT >= 10.7). A
missing package raises ``ExportDependencyError`` naming it. Neither route has been run against a
real TensorRT here (see README, "Export"); the ONNX form is the one tested end to end.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional, Tuple

import torch

from slcompile.kernels import searches


class ExportDependencyError(RuntimeError):
    """An optional package needed for this export is not installed."""


class ExportRefusedError(ValueError):
    """The program (or config) uses something the ONNX form does not have: raised before
    torch's exporter runs, with a one-line message saying what and what to do instead."""


# What slcompile.onnx_ops translates: the two ops of docs/spec.md's search (steps=2) and
# block-sparse attention (the default, docs/blocksparse.md), for the search kinds with an ONNX form.
ONNX_SEARCH_KEYS = searches.names(onnx=True)
ONNX_OPS = ("span_search", "span_attention", "block_sparse_attention")


def _search_key_refusal(search_key: str) -> str:
    gone = searches.retired(search_key)
    if gone:  # a program converted before its search was retired
        return (f"ONNX export: the program searches with search_key={search_key!r}, which {gone}; "
                f"convert the original model again")
    return (f"ONNX export supports search_key {', '.join(map(repr, ONNX_SEARCH_KEYS))} only: "
            f"search_key={search_key!r} has no ONNX form (convert the model with the default "
            f"search or --search-key anchor, or export to TensorRT through torch-tensorrt: "
            f"-o model.ep, which runs the ops themselves)")


def _nstep_refusal(steps) -> str:
    return (f"ONNX export has no form of the N-step search (superlinear::nstep_search, "
            f"SuperlinearConfig(steps={steps}), docs/nstep.md): convert the model with steps=2 "
            f"to export it")


def onnx_refusal_for_config(config) -> Optional[str]:
    """Why a model rewritten under ``config`` could not be exported to ONNX (None: it can)."""
    if getattr(config, "steps", 2) != 2:
        return _nstep_refusal(config.steps)
    if config.search_key not in ONNX_SEARCH_KEYS:
        return _search_key_refusal(config.search_key)
    return None


def _node_argument(node, name: str, default=None):
    schema = getattr(node.target, "_schema", None)
    for i, a in enumerate(getattr(schema, "arguments", ())):
        if a.name == name:
            if i < len(node.args):
                return node.args[i]
            return node.kwargs.get(name, a.default_value if a.has_default_value() else default)
    return node.kwargs.get(name, default)


def onnx_refusal(program) -> Optional[str]:
    """Why ``program`` could not be exported to ONNX (None: it can): a superlinear op without an
    ONNX translation, or ``span_search`` with a search key other than 'anchor'/'mean'."""
    graph = getattr(getattr(program, "graph_module", None), "graph", None)
    for n in (graph.nodes if graph is not None else ()):
        if n.op != "call_function":
            continue
        schema = getattr(n.target, "_schema", None)
        qual = getattr(schema, "name", "")
        if not qual.startswith("superlinear::"):
            continue
        op = qual.split("::", 1)[1]
        if op.startswith("nstep_search"):
            return _nstep_refusal(_node_argument(n, "steps", ">=3"))
        if op not in ONNX_OPS:
            return (f"ONNX export: the program uses superlinear::{op}, which has no ONNX form "
                    f"(translated: {', '.join('superlinear::' + o for o in ONNX_OPS)})")
        if op == "span_search":
            key = _node_argument(n, "search_key", "anchor")
            if key not in ONNX_SEARCH_KEYS:
                return _search_key_refusal(key)
    return None


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


def _user_input_values(program):
    """The example tensors (``meta["val"]``) of the program's user inputs."""
    from torch.export.graph_signature import InputKind

    users = {s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    for n in program.graph.nodes:
        if n.op == "placeholder" and n.name in users and isinstance(n.meta.get("val"), torch.Tensor):
            yield n.meta["val"]


def _has_dynamic_input(program) -> bool:
    return any(isinstance(s, torch.SymInt) for v in _user_input_values(program) for s in v.shape)


def _batch_dynamic(program) -> bool:
    """A 2-D user input (token ids, masks) with a dynamic first (batch) dim."""
    return any(v.dim() == 2 and isinstance(v.shape[0], torch.SymInt)
               for v in _user_input_values(program))


def _with_dynamic_sequence(program, args, kwargs):
    """Re-export a program with dims 0 (batch) and 1 (sequence) of its 2-D integer inputs dynamic
    (token ids, attention masks, positions), so that one file serves every batch size and
    length; keeps what it cannot make dynamic (warning where nothing is)."""
    dynamic = _has_dynamic_input(program)
    if kwargs or (dynamic and _batch_dynamic(program)):
        return program
    seq, batch = torch.export.Dim("seq", min=2), torch.export.Dim("batch", min=1)
    ids = [isinstance(a, torch.Tensor) and a.dim() == 2 and not a.is_floating_point()
           and a.shape[1] >= 2 for a in args]
    if not any(ids):
        return program
    # a batch of one would be specialised: trace with two rows (the example repeated)
    wide = tuple(a.expand(2, -1).contiguous() if i and a.shape[0] == 1 else a
                 for a, i in zip(args, ids))
    tries = [(wide, tuple({0: batch, 1: seq} if i else None for i in ids))]
    if not dynamic:
        tries.append((args, tuple({1: seq} if i else None for i in ids)))
    err = None
    for a, specs in tries:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.export.export(program.module(), a, dynamic_shapes=specs, strict=False)
        except Exception as e:  # the next try, or the program as it is
            err = err or e
    if not dynamic:
        warnings.warn(f"slcompile.export: the program has static shapes and re-exporting it with a "
                      f"dynamic sequence axis failed ({type(err).__name__}: {err}); exporting it "
                      f"static")
    return program


def _refuse_nstep(program, what: str) -> None:
    """The N-step search (SuperlinearConfig(steps>=3), docs/nstep.md) has no export form yet."""
    graph = getattr(getattr(program, "graph_module", None), "graph", None)
    for n in (graph.nodes if graph is not None else ()):
        if n.op == "call_function" and "superlinear.nstep_search" in str(n.target):
            raise ValueError(f"{what}: the program uses superlinear::nstep_search "
                             f"(SuperlinearConfig(steps>=3), docs/nstep.md), which has no {what} form; "
                             f"convert the model with steps=2 to export it")


def export_onnx(program: "torch.export.ExportedProgram", path: str, example_inputs=None, *,
                opset_version: Optional[int] = None, optimize: bool = True) -> str:
    """Write ``program`` (holding ``torch.ops.superlinear`` nodes or not) to the ONNX file ``path``
    with standard ONNX operators only. Returns ``path``."""
    _require("onnx", "onnx", "ONNX export")
    _require("onnxscript", "onnxscript", "ONNX export")
    from slcompile import onnx_ops

    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"export_onnx needs a torch.export.ExportedProgram, got {type(program).__name__}")
    refusal = onnx_refusal(program)  # before torch's exporter, whose error would bury ours
    if refusal is not None:
        raise ExportRefusedError(refusal)
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



# --------------------------------------------------------------------------------------------
# TensorRT
# --------------------------------------------------------------------------------------------

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def register_tensorrt_plugins() -> None:
    """Register the two ops with torch-tensorrt as Quick Deployable Plugins (TensorRT >= 10.7):
    torch-tensorrt generates the plugin (shapes from the ops' fake implementations, execution by
    the ops themselves, i.e. the Triton kernels on CUDA) and a ``dynamo_tensorrt_converter`` for
    each op, so the compiled engine runs them without a graph break. Idempotent."""
    global _PLUGINS_REGISTERED
    if _PLUGINS_REGISTERED:
        return
    _require("tensorrt", "tensorrt", "TensorRT export")
    ttrt = _require("torch_tensorrt", "torch-tensorrt", "TensorRT export")
    import slcompile.kernels.ops  # noqa: F401  (defines torch.ops.superlinear)

    feats = getattr(ttrt, "ENABLED_FEATURES", None)
    if feats is not None and not getattr(feats, "qdp_plugin", False):
        raise ExportDependencyError("TensorRT export through torch-tensorrt needs TensorRT >= 10.7 "
                                    "(Quick Deployable Plugins: torch_tensorrt.ENABLED_FEATURES.qdp_plugin "
                                    "is False); or write an engine from the ONNX form: -o model.engine")
    for name in ("superlinear::span_search", "superlinear::span_attention"):
        ttrt.dynamo.conversion.plugins.custom_op(name, supports_dynamic_shapes=True)
    _PLUGINS_REGISTERED = True


_PLUGINS_REGISTERED = False


def tensorrt_profile(onnx_model, feeds, max_seq_len: Optional[int] = None, min_seq_len: int = 2,
                     max_batch: Optional[int] = None):
    """Optimisation profile for TensorRT: {input name: (min, opt, max) shapes}. A symbolic first
    dimension of an input of rank >= 2 is the batch: [1, max_batch] (default: the example's batch)
    with the example's as the optimum; other symbolic dimensions (the sequence axis) range over
    [min_seq_len, max_seq_len] with the example's size as the optimum (max default: 8x the
    example, at least 4096); static ones are fixed. ``feeds``: {input name: example array}."""
    prof = {}
    for inp in onnx_model.graph.input:
        if inp.name not in feeds:
            raise ValueError(f"no example value for ONNX input {inp.name!r}")
        ex = tuple(int(d) for d in feeds[inp.name].shape)
        dims = inp.type.tensor_type.shape.dim
        if len(dims) != len(ex):
            raise ValueError(f"ONNX input {inp.name!r} has rank {len(dims)}, example has shape {ex}")
        lo, opt, hi = [], [], []
        for i, (d, n) in enumerate(zip(dims, ex)):
            if d.HasField("dim_value"):
                lo.append(n), opt.append(n), hi.append(n)
            elif i == 0 and len(ex) >= 2:  # the batch
                top = max_batch if max_batch is not None else n
                if top < n:
                    raise ValueError(f"max_batch={top} is below the example's batch {n} of {inp.name!r}")
                lo.append(1), opt.append(n), hi.append(top)
            else:
                top = max_seq_len if max_seq_len is not None else max(4096, 8 * n)
                if top < n:
                    raise ValueError(f"max_seq_len={top} is below the example's size {n} of {inp.name!r}")
                lo.append(min(min_seq_len, n)), opt.append(n), hi.append(top)
        prof[inp.name] = (tuple(lo), tuple(opt), tuple(hi))
    return prof


def _onnx_feeds(onnx_model, args, kwargs):
    flat = [a for a in list(args) + [kwargs[k] for k in kwargs] if isinstance(a, torch.Tensor)]
    names = [i.name for i in onnx_model.graph.input]
    if len(names) != len(flat):
        raise ValueError(f"the ONNX graph has {len(names)} inputs, the example has {len(flat)} tensors")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, flat)}


def build_tensorrt_engine(onnx_path: str, engine_path: str, profile, *, fp16: bool = False,
                          workspace_bytes: Optional[int] = None) -> str:
    """Parse the ONNX file with TensorRT's ONNX parser (no plugin: standard operators only), build
    a serialized engine with one optimisation profile and write it to ``engine_path``."""
    trt = _require("tensorrt", "tensorrt", "TensorRT export")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if flag is None else (1 << int(flag)))
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        ok = parser.parse(f.read())
    if not ok:
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errs or 'no detail'}")
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in profile:
            raise RuntimeError(f"no optimisation-profile shapes for network input {name!r}")
        opt.set_shape(name, *profile[name])
    config.add_optimization_profile(opt)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    with open(engine_path, "wb") as f:
        f.write(bytes(blob))
    return engine_path


def export_tensorrt(program: "torch.export.ExportedProgram", path: str, example_inputs=None, *,
                    route: str = "auto", max_seq_len: Optional[int] = None, fp16: bool = False) -> str:
    """Export ``program`` for TensorRT. Two routes:

    * ``route="onnx"`` (the default for paths ending in .engine/.plan/.trt): the standard-operator
      ONNX form (``export_onnx``) parsed by TensorRT's ONNX parser into a serialized engine with a
      dynamic sequence axis (profile: ``tensorrt_profile``). Needs the ``tensorrt`` package.
    * ``route="torch_tensorrt"`` (the default otherwise, e.g. ``model.ep``): torch-tensorrt's
      dynamo compiler with the two ops as generated plugins (``register_tensorrt_plugins``), saved
      with ``torch_tensorrt.save`` as an ExportedProgram. Needs ``torch-tensorrt`` and
      ``tensorrt`` >= 10.7, and a CUDA device.

    Raises ``ExportDependencyError`` naming the missing package."""
    if route == "auto":
        route = "onnx" if path.lower().endswith(ENGINE_SUFFIXES) else "torch_tensorrt"
    if route not in ("onnx", "torch_tensorrt"):
        raise ValueError(f"route={route!r}: expected 'auto', 'onnx' or 'torch_tensorrt'")
    _refuse_nstep(program, "TensorRT export")
    args, kwargs = _split_inputs(program, example_inputs)
    if route == "onnx":
        _require("tensorrt", "tensorrt", "TensorRT export")
        import tempfile

        import onnx

        with tempfile.TemporaryDirectory() as d:
            onnx_path = os.path.join(d, "model.onnx")
            export_onnx(program, onnx_path, example_inputs=(args, kwargs))
            model = onnx.load(onnx_path)
            profile = tensorrt_profile(model, _onnx_feeds(model, args, kwargs), max_seq_len)
            return build_tensorrt_engine(onnx_path, path, profile, fp16=fp16)
    register_tensorrt_plugins()
    ttrt = importlib.import_module("torch_tensorrt")
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT export through torch-tensorrt needs a CUDA device")
    if kwargs:
        raise ValueError("TensorRT export takes positional example inputs only")
    program = _with_dynamic_sequence(program, args, kwargs)
    dev_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    inputs = []
    for a in dev_args:
        if not isinstance(a, torch.Tensor):
            inputs.append(a)
            continue
        shp = tuple(a.shape)
        if a.dim() == 2 and not a.is_floating_point() and _has_dynamic_input(program):
            top = max_seq_len if max_seq_len is not None else max(4096, 8 * shp[1])
            inputs.append(ttrt.Input(min_shape=(shp[0], min(2, shp[1])), opt_shape=shp,
                                     max_shape=(shp[0], top), dtype=a.dtype))
        else:
            inputs.append(ttrt.Input(shape=shp, dtype=a.dtype))
    enabled = {torch.float16} if fp16 else {torch.float32}
    trt_gm = ttrt.dynamo.compile(program, arg_inputs=inputs, enabled_precisions=enabled,
                                 min_block_size=1)
    ttrt.save(trt_gm, path, output_format="exported_program", arg_inputs=list(dev_args))
    return path
