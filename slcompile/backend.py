"""The `superlinear` torch.compile backend (registered through the torch_dynamo_backends entry point).

    torch.compile(model, backend="superlinear", options={"window": 128, "compiler": "inductor"})

`options` takes every `SuperlinearConfig` field plus:

* ``compiler``: what compiles the rewritten graph: ``"inductor"`` (default), ``"aot_eager"``
  (AOTAutograd without code generation, for debugging) or ``"eager"`` (run the FX graph as is).
* ``inductor_options``: a dict passed to Inductor as its config patches.
* ``mode``: an Inductor mode (``"reduce-overhead"`` for CUDA graphs, ``"max-autotune"``, ...).
  ``torch.compile(model, backend="superlinear", mode="reduce-overhead")`` works too; torch.compile
  refuses ``mode`` together with ``options``, so to combine them put ``"mode"`` into ``options``.

The backend rewrites the dynamo graph in place (`slcompile.passes.rewrite_graph`), logs one line
per graph on the ``slcompile.backend`` logger, and hands the graph on. The rewrite adds no guards,
so with dynamic shapes one graph serves every sequence length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from typing import Any, Dict, Iterator, List, Optional

log = logging.getLogger("slcompile.backend")

_COMPILERS = ("inductor", "aot_eager", "eager")
_EXTRA_OPTIONS = ("compiler", "inductor_options", "mode")
_capture = threading.local()
_graph_counter = [0]


def _split_options(options: Optional[Dict[str, Any]]):
    from slcompile.kernels.config import SuperlinearConfig

    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(SuperlinearConfig)}
    unknown = set(options) - known - set(_EXTRA_OPTIONS)
    if unknown:
        raise ValueError(f"superlinear backend: unknown option(s) {sorted(unknown)}; known: "
                         f"{sorted(known | set(_EXTRA_OPTIONS))}")
    compiler = options.pop("compiler", "inductor")
    if compiler not in _COMPILERS:
        raise ValueError(f"superlinear backend: compiler={compiler!r} is invalid: expected one of {_COMPILERS}")
    inductor_options = options.pop("inductor_options", None) or {}
    if not isinstance(inductor_options, dict):
        raise ValueError("superlinear backend: inductor_options must be a dict")
    mode = options.pop("mode", None)
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        modes = list_mode_options()
        if mode not in modes:
            raise ValueError(f"superlinear backend: mode={mode!r} is invalid: expected one of {sorted(modes)}")
        if compiler != "inductor":
            raise ValueError(f"superlinear backend: mode={mode!r} needs compiler='inductor', not {compiler!r}")
        inductor_options = {**modes[mode], **inductor_options}
    return SuperlinearConfig.from_dict(options), compiler, inductor_options


@contextlib.contextmanager
def capture_reports() -> Iterator[List[Any]]:
    """Collect the `RewriteReport` of every graph the backend compiles inside the block."""
    stack = getattr(_capture, "stack", None)
    if stack is None:
        stack = _capture.stack = []
    reports: List[Any] = []
    stack.append(reports)
    try:
        yield reports
    finally:
        stack.remove(reports)


def _publish(report) -> None:
    for lst in getattr(_capture, "stack", None) or []:
        lst.append(report)


def superlinear_backend(gm, example_inputs, options: Optional[Dict[str, Any]] = None,
                        mode: Optional[str] = None, **kwargs):
    """Dynamo backend: rewrite provably causal attention, then compile with `compiler`."""
    from slcompile.passes import rewrite_graph

    if kwargs:
        raise ValueError(f"superlinear backend: unexpected arguments {sorted(kwargs)}; pass settings in options={{...}}")
    if mode is not None:
        options = {**(options or {}), "mode": mode}
    config, compiler, inductor_options = _split_options(options)
    report = rewrite_graph(gm, config)
    _graph_counter[0] += 1
    log.info("superlinear: graph %d: %s (%.1f ms)", _graph_counter[0], report.summary(),
             report.seconds * 1e3)
    # published once the graph has compiled: a compile that fails (and that dynamo may retry,
    # e.g. with some dims static) must not leave its sites counted twice
    if compiler == "eager":
        fn = gm.forward
    elif compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        fn = lookup_backend("aot_eager")(gm, example_inputs)
    else:
        from torch._inductor.compile_fx import compile_fx

        if inductor_options:
            fn = compile_fx(gm, example_inputs, config_patches=inductor_options)
        else:
            fn = compile_fx(gm, example_inputs)
    _publish(report)
    return fn
