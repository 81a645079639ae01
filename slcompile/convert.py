"""Front door for files: load a model, build example inputs, export, rewrite, re-export, save.

``convert_file("model.pt2", "model.sl.pt2", config)`` is what ``slcompile convert`` runs:

1. load a ``torch.export`` archive (``.pt2``), or, only with ``trust_pickle=True``, a pickled
   ``nn.Module`` (``torch.save(model)``; unpickling runs arbitrary code, so it is refused otherwise);
2. build example inputs (token ids from ``seq_len``/``batch``/``vocab``, a file of tensors, or the
   archive's own sample inputs);
3. export to an ATen graph (``torch.export``), rewrite every provably causal attention site in place
   with ``slcompile.passes.rewrite_graph``, re-export (keeping the archive's dynamic dimensions);
4. save to a temporary file beside the output, load it back, check it reproduces the rewritten
   module, and only then move it into place with ``os.replace``. The input is never overwritten and
   no partial file is left behind on failure.

The resulting archive holds ``superlinear.span_search``/``superlinear.span_attention`` nodes;
``torch.export.load`` reads it once ``slcompile`` is imported (importing registers the ops).

Every failure is an ``SlcompileError`` with a one-line message and an ``exit_code``; the CLI prints
the message and exits with that code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import os
import importlib.util
import pickle
import re
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# torch is imported lazily inside functions so that `slcompile --help` and early path checks are
# fast; everything that touches tensors imports it on first use.


# --------------------------------------------------------------------------------------------
# Errors (each carries the CLI's exit status; the table is printed by `slcompile --help`)
# --------------------------------------------------------------------------------------------

class SlcompileError(Exception):
    """A user-facing failure: one line of text plus the exit status the CLI uses."""

    exit_code = 70
    kind = "error"

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class CheckFailedError(SlcompileError):
    exit_code = 1
    kind = "check failed"


class UsageError(SlcompileError):
    exit_code = 2
    kind = "usage"


class InputNotFoundError(SlcompileError):
    exit_code = 3
    kind = "input not found"


class InputFormatError(SlcompileError):
    exit_code = 4
    kind = "bad input file"


class PickleRefusedError(SlcompileError):
    exit_code = 5
    kind = "pickle refused"


class OutputPathError(SlcompileError):
    exit_code = 6
    kind = "bad output path"


class ConfigError(SlcompileError):
    exit_code = 7
    kind = "bad config"


class ModelError(SlcompileError):
    """Exporting, rewriting or running the model failed."""

    exit_code = 8
    kind = "model failed"


class NotAvailableError(SlcompileError):
    exit_code = 9
    kind = "not available"


class NothingRewrittenError(SlcompileError):
    exit_code = 10
    kind = "nothing rewritten"


EXIT_CODES: List[Tuple[int, str]] = [
    (0, "success"),
    (1, "check: the rewritten model is not exact under the exact config"),
    (2, "usage error (bad or missing option or argument)"),
    (3, "input file not found or unreadable"),
    (4, "input file corrupt or of the wrong format"),
    (5, "pickled model refused: pass --trust-pickle if you trust the file"),
    (6, "output path unusable (unwritable, exists, or is the input)"),
    (7, "invalid SuperlinearConfig value"),
    (8, "the model could not be exported, rewritten or run"),
    (9, "feature not available (optional dependency or module missing)"),
    (10, "no attention site could be rewritten (nothing to convert, check or benchmark)"),
    (70, "internal error (a bug: rerun with --debug and report it)"),
    (130, "interrupted"),
]


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first meaningful line of an exception's message, shortened."""
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        line = type(exc).__name__
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return line


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

CONFIG_FIELDS = ("window", "sinks", "topk", "search_power", "span_power", "backward_factor",
                 "forward_factor", "combine", "search_key", "dense_below", "scale", "steps",
                 "q_block", "k_block", "block_rows", "block_pool", "exact_rows", "block_group",
                 "spread_rows")


def build_config(overrides: Optional[Dict[str, Any]] = None, config_file: Optional[str] = None,
                 base: Optional[Any] = None):
    """A ``SuperlinearConfig`` from a JSON file and/or field overrides (None values ignored).
    Invalid values raise ``ConfigError`` carrying the config's own message."""
    from slcompile.kernels.config import SuperlinearConfig

    fields: Dict[str, Any] = {}
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise InputNotFoundError(f"config file not found: {config_file}")
        try:
            with open(config_file) as f:
                loaded = json.load(f)
        except (OSError, ValueError) as e:
            raise InputFormatError(f"config file {config_file} is not valid JSON: {first_line(e)}")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a JSON object of "
                              f"SuperlinearConfig fields, got {type(loaded).__name__}")
        fields.update(loaded)
    fields.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return (base if base is not None else SuperlinearConfig()).replace(**fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(first_line(e))


def exact_config(config):
    """The exact counterpart of ``config`` (same mode, window covering everything, dense_below=0)."""
    from slcompile.kernels.config import SuperlinearConfig

    keep = {k: v for k, v in config.to_dict().items() if k not in ("window", "dense_below")}
    return SuperlinearConfig.exact(**keep)


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------

def check_input_path(path: str) -> None:
    if not os.path.lexists(path):
        raise InputNotFoundError(f"no such file: {path}")
    if os.path.isdir(path):
        raise InputFormatError(f"{path} is a directory, not a model file")
    if not os.path.exists(path):
        raise InputNotFoundError(f"{path} is a broken symbolic link")
    if not os.access(path, os.R_OK):
        raise InputNotFoundError(f"cannot read {path}: permission denied")


def _same_file(a: str, b: str) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(output: str, inputs: Sequence[str] = (), overwrite: bool = False) -> None:
    """Fail early (before any heavy work) if ``output`` cannot be written safely.

    Refuses the input itself (whatever ``overwrite`` says), directories, missing or unwritable
    folders, and existing files unless ``overwrite``. Writability is probed by creating (and
    removing) a temporary file, which also catches read-only file systems."""
    if not output:
        raise OutputPathError("empty output path")
    for src in inputs:
        if src and _same_file(src, output):
            raise OutputPathError(f"output {output} is the input file; refusing to overwrite the input")
    if os.path.isdir(output):
        raise OutputPathError(f"output {output} is a directory; give a file name such as model.sl.pt2")
    if os.path.lexists(output) and not overwrite:
        raise OutputPathError(f"output {output} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        # name the real obstacle: a regular file where a folder should be, or the missing folder
        part = folder
        while part and not os.path.lexists(part) and os.path.dirname(part) != part:
            part = os.path.dirname(part)
        if os.path.lexists(part) and not os.path.isdir(part):
            raise OutputPathError(f"cannot write {output}: {part} is a file, not a folder")
        raise OutputPathError(f"cannot write {output}: folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".slcompile-probe-", dir=folder)
    except OSError as e:
        raise OutputPathError(f"cannot write {output}: {e.strerror or first_line(e)}")
    os.close(fd)
    os.unlink(probe)


def _temp_path_for(output: str) -> str:
    folder = os.path.dirname(os.path.abspath(output))
    ext = os.path.splitext(output)[1] or ".pt2"
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=f".partial{ext}", dir=folder)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_output(output: str):
    """Yields a temporary path beside ``output``; on success moves it over ``output``
    (``os.replace``), on any failure (including KeyboardInterrupt) removes it."""
    tmp = _temp_path_for(output)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export.load logs a traceback at WARNING before raising; the CLI reports one line."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def detect_format(path: str) -> str:
    """'pt2' (torch.export archive), 'torch-save' (torch.save zip) or 'pickle' (plain/legacy
    pickle). Raises InputNotFoundError / InputFormatError. Reads no Python objects."""
    check_input_path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise InputNotFoundError(f"cannot read {path}: {e.strerror or first_line(e)}")
    if not head:
        raise InputFormatError(f"{path} is empty")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, ValueError) as e:
            raise InputFormatError(f"{path} is a corrupt zip archive: {first_line(e)}")
        except Exception as e:  # zlib.error and friends
            raise InputFormatError(f"{path} is a corrupt zip archive: {first_line(e)}")
        if bad is not None:
            raise InputFormatError(f"{path} is corrupt: checksum mismatch in archive member {bad}")
        if any(n == "archive_format" or n.endswith("/archive_format") for n in names):
            return "pt2"
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "torch-save"
        raise InputFormatError(f"{path} is a zip archive but neither a torch.export archive (.pt2) "
                               f"nor a torch.save file")
    if head.startswith(b"PK"):
        raise InputFormatError(f"{path} is a corrupt or truncated zip archive")
    if head[:1] == b"\x80":
        return "pickle"
    raise InputFormatError(f"{path} is not a model file: expected a torch.export archive (.pt2) "
                           f"or a pickled nn.Module (torch.save)")


@dataclass
class LoadedModel:
    """A model read from a file: ``program`` for a .pt2, ``module`` for a pickled nn.Module."""

    path: str
    fmt: str
    program: Any = None      # torch.export.ExportedProgram
    module: Any = None       # torch.nn.Module

    @property
    def is_program(self) -> bool:
        return self.program is not None


def import_modules(names: Sequence[str]) -> None:
    """Import the user's modules (``--import``) so pickled classes and custom ops resolve."""
    if not names:
        return
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:
            raise UsageError(f"--import {name} failed: {type(e).__name__}: {first_line(e)}")


def load_model(path: str, trust_pickle: bool = False) -> LoadedModel:
    """Load ``path``. Pickles are unpickled only with ``trust_pickle`` (a state_dict, which holds
    no code, is recognised safely and rejected as the wrong kind of file)."""
    fmt = detect_format(path)
    import torch

    import slcompile  # noqa: F401  (registers torch.ops.superlinear for archives that use them)

    if fmt == "pt2":
        return LoadedModel(path=path, fmt=fmt, program=load_archive(path))

    # A pickle: first try the safe loader, which accepts tensors and containers only.
    try:
        with _quiet_torch_logs():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = _UNSAFE
    except Exception as e:
        raise InputFormatError(f"{path} is a corrupt torch.save/pickle file: "
                               f"{type(e).__name__}: {first_line(e)}")
    if obj is _UNSAFE:
        if not trust_pickle:
            raise PickleRefusedError(
                f"{path} is a pickled Python object and unpickling it can run arbitrary code; "
                f"pass --trust-pickle only if you trust its source (or convert a torch.export "
                f"archive instead: torch.export.save(torch.export.export(model, args), 'model.pt2'))")
        try:
            with _quiet_torch_logs():
                if fmt == "pickle":
                    obj = _load_plain_or_legacy_pickle(path)
                else:
                    obj = torch.load(path, map_location="cpu", weights_only=False)
        except (AttributeError, ImportError) as e:
            raise InputFormatError(f"cannot unpickle {path}: {first_line(e)} (the model's class must "
                                   f"be importable: use --import MODULE)")
        except Exception as e:
            raise InputFormatError(f"cannot unpickle {path}: {type(e).__name__}: {first_line(e)}")
    if isinstance(obj, torch.export.ExportedProgram):
        return LoadedModel(path=path, fmt=fmt, program=obj)
    if not isinstance(obj, torch.nn.Module):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise InputFormatError(f"{path} holds a state_dict ({len(obj)} tensors), not a model; "
                                   f"slcompile needs the model itself: torch.export.save(...) it to .pt2")
        raise InputFormatError(f"{path} holds a {type(obj).__module__}.{type(obj).__qualname__}, "
                               f"not a torch.nn.Module")
    return LoadedModel(path=path, fmt=fmt, module=obj.eval())


_UNSAFE = object()

# Modules that an archive's pytree types may be imported from without being asked: importing them
# registers their output classes (transformers' ModelOutput subclasses register themselves).
AUTO_IMPORT_PREFIXES = ("transformers.",)
_PYTREE_UNREGISTERED = re.compile(r"Deserializing ([A-Za-z_][\w.]*) in pytree is not registered")


@contextlib.contextmanager
def _capture_export_load_log():
    """torch.export.load logs the real cause of a failed load (at WARNING, with the traceback) and
    raises a RuntimeError that only says "check the warnings above". Keep those records (and
    print nothing): the caller reports the cause in one line."""
    records: List[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    lg = logging.getLogger("torch.export")
    saved = (lg.level, lg.propagate, list(lg.handlers))
    lg.setLevel(logging.WARNING)
    lg.propagate = False
    lg.handlers = [_Keep()]
    try:
        with _quiet_torch_logs():
            lg.setLevel(logging.WARNING)  # (_quiet_torch_logs raised it)
            yield records
    finally:
        lg.setLevel(saved[0])
        lg.propagate = saved[1]
        lg.handlers = saved[2]


def _load_failure_cause(exc: BaseException, records) -> str:
    """The real reason of a failed torch.export.load: the logged exception, else the raised one."""
    for r in records:
        if r.exc_info and r.exc_info[1] is not None:
            inner = r.exc_info[1]
            return f"{type(inner).__name__}: {first_line(inner)}"
    for r in records:
        msg = r.getMessage().strip()
        if msg and "Ran into the following error" not in msg:
            return first_line(Exception(msg))
    return f"{type(exc).__name__}: {first_line(exc)}"


def load_archive(path: str):
    """``torch.export.load(path)``, made to work for archives whose outputs are Hugging Face
    ``ModelOutput`` classes (their pytree types are registered when transformers.modeling_outputs
    is imported: it is imported and the load retried), and reporting the real cause when it fails
    (torch's own error only points at warnings it printed)."""
    import torch

    imported: List[str] = []
    while True:
        with _capture_export_load_log() as records:
            try:
                return torch.export.load(path)
            except Exception as e:
                cause = _load_failure_cause(e, records)
        m = _PYTREE_UNREGISTERED.search(cause)
        module = m.group(1).rsplit(".", 1)[0] if m else None
        if module and module not in imported and module.startswith(AUTO_IMPORT_PREFIXES) \
                and importlib.util.find_spec(module.split(".", 1)[0]) is not None:
            imported.append(module)
            try:
                importlib.import_module(module)
                continue
            except Exception as e:
                cause += f" (importing {module} failed: {type(e).__name__}: {first_line(e)})"
        if m:
            typ = m.group(1)
            hint = (f"; {module} is not installed" if module and module.startswith(AUTO_IMPORT_PREFIXES)
                    and importlib.util.find_spec(module.split(".", 1)[0]) is None
                    else f"; import the module that registers it: --import {module}")
            raise InputFormatError(f"{path} cannot be loaded: its inputs or outputs use the class "
                                   f"{typ}, which is not registered as a pytree type{hint}")
        raise InputFormatError(f"{path} is a corrupt or unsupported torch.export archive: {cause}")


def _load_plain_or_legacy_pickle(path: str):
    """A legacy (pre-zip) torch.save file, or a plain ``pickle.dump`` of a module."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ImportError):
        raise
    except Exception:
        with open(path, "rb") as f:
            return pickle.load(f)


# --------------------------------------------------------------------------------------------
# Example inputs
# --------------------------------------------------------------------------------------------

@dataclass
class ExampleInputs:
    args: tuple
    kwargs: dict
    source: str                      # human-readable: where they came from
    seq_dim_dynamic: bool = False    # mark dim 1 of the token-id input dynamic on export

    def describe(self) -> str:
        import torch

        parts = []
        for a in self.args:
            parts.append(_describe_value(a))
        for k, v in self.kwargs.items():
            parts.append(f"{k}={_describe_value(v)}")
        return ", ".join(parts)


def _describe_value(v) -> str:
    import torch

    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_describe_value(x) for x in v) + ")"
    return type(v).__name__


def infer_vocab(loaded: LoadedModel) -> Optional[int]:
    """The vocabulary size: ``num_embeddings`` of the first embedding table."""
    import torch

    if loaded.module is not None:
        vs = getattr(loaded.module, "vocab_size", None)
        if isinstance(vs, int) and vs > 0:
            return vs
        for m in loaded.module.modules():
            if isinstance(m, torch.nn.Embedding):
                return int(m.num_embeddings)
        return None
    ep = loaded.program
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.embedding.default,):
            w = node.args[0].meta.get("val")
            if w is not None and w.dim() == 2:
                try:
                    return int(w.shape[0])
                except (TypeError, ValueError):
                    return None
    return None


def load_inputs_file(path: str) -> Tuple[tuple, dict]:
    """A file of tensors (``torch.save``; read with ``weights_only=True``): a tensor, a tuple or
    list of tensors (positional), a dict of name -> tensor (keyword), or
    ``{"args": [...], "kwargs": {...}}``."""
    import torch

    check_input_path(path)
    expected = "torch.save(tensor | tuple of tensors | dict of tensors)"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise InputNotFoundError(f"cannot read inputs file {path}: {e.strerror or first_line(e)}")
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        # torch.load of text fails with "KeyError: 101" (the byte 'e' read as a pickle opcode)
        raise InputFormatError(f"inputs file {path} is not a torch.save file"
                               f"{' (it is empty)' if not head else ''}; it must be {expected}")
    try:
        with _quiet_torch_logs():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputFormatError(f"inputs file {path} holds more than tensors; it must be {expected}")
    except Exception as e:
        raise InputFormatError(f"inputs file {path} is not a readable torch.save file "
                               f"({type(e).__name__}: {first_line(e)}); it must be {expected}")
    if isinstance(obj, torch.Tensor):
        return (obj,), {}
    if isinstance(obj, (tuple, list)):
        return tuple(obj), {}
    if isinstance(obj, dict):
        if set(obj) <= {"args", "kwargs"} and obj:
            return tuple(obj.get("args", ())), dict(obj.get("kwargs", {}))
        if all(isinstance(k, str) for k in obj):
            return (), dict(obj)
    raise InputFormatError(f"inputs file {path} holds a {type(obj).__name__}; expected a tensor, "
                           f"a tuple/list of tensors or a dict of name -> tensor")


def make_example_inputs(loaded: LoadedModel, seq_len: Optional[int] = None, batch: int = 1,
                        vocab: Optional[int] = None, inputs_file: Optional[str] = None,
                        seed: int = 0) -> ExampleInputs:
    """Example inputs for exporting/running ``loaded``: token ids [batch, seq_len] in [0, vocab),
    a file of tensors, or (for an archive) the sample inputs it was exported with."""
    import torch

    if seq_len is not None and inputs_file is not None:
        raise UsageError("give either --seq-len or --inputs, not both")
    if seq_len is None and (batch != 1 or vocab is not None):
        # they shape the token ids made from seq_len only: never ignore them silently
        raise UsageError(f"{'--batch' if batch != 1 else '--vocab'} applies only to the token ids made "
                         f"with --seq-len; pass --seq-len N too")
    if inputs_file is not None:
        args, kwargs = load_inputs_file(inputs_file)
        return ExampleInputs(args, kwargs, f"file {inputs_file}")
    if seq_len is not None:
        if seq_len < 1 or batch < 1:
            raise UsageError(f"--seq-len and --batch must be >= 1 (got {seq_len}, {batch})")
        if vocab is None:
            vocab = infer_vocab(loaded)
            if vocab is None:
                raise UsageError("cannot infer the vocabulary size (no embedding table found): pass --vocab")
        if vocab < 1:
            raise UsageError(f"--vocab must be >= 1 (got {vocab})")
        g = torch.Generator().manual_seed(seed)
        try:
            ids = torch.randint(0, vocab, (batch, seq_len), generator=g, dtype=torch.int64)
        except (RuntimeError, MemoryError, OverflowError) as e:
            raise UsageError(f"cannot make token ids [{batch}, {seq_len}] < {vocab}: "
                             f"{type(e).__name__}: {first_line(e)}")
        return ExampleInputs((ids,), {}, f"token ids [{batch}, {seq_len}] < {vocab}", seq_dim_dynamic=True)
    if loaded.program is not None:
        ex = getattr(loaded.program, "example_inputs", None)
        if ex is not None:
            args, kwargs = ex
            return ExampleInputs(tuple(args), dict(kwargs or {}), "the archive's sample inputs")
        raise UsageError(f"{loaded.path} carries no sample inputs: pass --seq-len N (token ids) "
                         f"or --inputs FILE")
    raise UsageError("a pickled model needs example inputs: pass --seq-len N (token ids) or --inputs FILE")


def with_seq_len(ex: ExampleInputs, seq_len: int, vocab: Optional[int], seed: int = 0) -> ExampleInputs:
    """The same kind of token-id inputs at another length (for check/bench across lengths)."""
    import torch

    if len(ex.args) != 1 or ex.kwargs or not isinstance(ex.args[0], torch.Tensor) \
            or ex.args[0].dim() != 2 or ex.args[0].dtype != torch.int64:
        raise UsageError("other lengths need token-id inputs (one int64 tensor [B, L]); "
                         "these example inputs are " + ex.describe())
    ids = ex.args[0]
    hi = vocab if vocab is not None else int(ids.max().item()) + 1
    g = torch.Generator().manual_seed(seed + seq_len)
    new = torch.randint(0, max(1, hi), (ids.shape[0], seq_len), generator=g, dtype=torch.int64)
    return ExampleInputs((new,), {}, f"token ids [{ids.shape[0]}, {seq_len}] < {hi}", seq_dim_dynamic=True)


# --------------------------------------------------------------------------------------------
# Export, rewrite, re-export
# --------------------------------------------------------------------------------------------

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
            with _quiet_torch_logs():
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
