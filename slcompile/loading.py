"""Reading models and example inputs from files.

``detect_format`` tells a ``torch.export`` archive (``.pt2``) from a ``torch.save`` zip and a plain
pickle without reading any Python object; ``load_model`` loads either (a pickle only with
``trust_pickle``: unpickling runs arbitrary code); ``load_archive`` is ``torch.export.load`` that
imports the Hugging Face output classes an archive needs and reports the real cause of a failure.
``make_example_inputs`` builds the inputs to export and run a model with: token ids from
``seq_len``/``batch``/``vocab``, a file of tensors (``load_inputs_file``), or an archive's own
sample inputs; ``with_seq_len`` makes the same kind of inputs at another length.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from slcompile.errors import (
    InputFormatError,
    InputNotFoundError,
    PickleRefusedError,
    UsageError,
    first_line,
)
from slcompile.paths import check_input_path

# torch is imported lazily inside functions so that `slcompile --help` and early path checks are
# fast; everything that touches tensors imports it on first use.


@contextlib.contextmanager
def quiet_torch_logs():
    """Silence torch's loggers and warnings inside the block: torch.export.load (for one) logs a
    traceback at WARNING before raising, and the CLI reports one line."""
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

    # (torch.ops.superlinear, which converted archives use, is registered: importing this module
    # imported the slcompile package)
    if fmt == "pt2":
        return LoadedModel(path=path, fmt=fmt, program=load_archive(path))

    # A pickle: first try the safe loader, which accepts tensors and containers only.
    try:
        with quiet_torch_logs():
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
            with quiet_torch_logs():
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
        with quiet_torch_logs():
            lg.setLevel(logging.WARNING)  # (quiet_torch_logs raised it)
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
        with quiet_torch_logs():
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
