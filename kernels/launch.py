"""Kernel launches without Triton's per-call argument binding, once a specialisation is known.

A ``kernel[grid](*args, **kw)`` call of a ``@triton.jit`` function binds its arguments (one
native specialisation call per argument), hashes the specialisation into a cache key, builds
launch metadata and only then calls the compiled kernel's launcher. On an H100 host that took
23-30 us per launch of the decode kernels, against 6-7 us for the launcher alone (measured,
benchmarks/RESULTS.md): for a decoded token, whose launches (three then, four with split
attention tiles) each run a few microseconds on the GPU, the binding was most of the host time.

`launch` keeps, per kernel, the compiled kernels it has seen under a key of its own that is at
least as strict as Triton's specialisation:

* a tensor: its dtype and whether its address is a multiple of 16;
* an int: its value below 16 (Triton makes 1 a constant), else whether it is a multiple of 16
  and whether it needs 32, 64 or more bits (the integer type Triton picks);
* a float: only that it is one (Triton passes every float as fp32, never specialised);
* a constexpr, None, a bool, num_warps, num_stages: the value itself;
* the current CUDA device (Triton's kernel cache is per device).

Arguments with equal keys therefore get the same compiled kernel from Triton; so a key seen
before launches that kernel directly, with its launcher and the current stream, as Triton's own
``run`` would. A new key goes through Triton's ``run`` (compiling if needed) and records the
kernel it returns. Triton's interpreter, launch hooks (profilers) and Tritons whose compiled
kernels lack the attributes used here take Triton's path every time. Triton's debug and
instrumentation settings are part of its key, not of this one: they are read when a key is first
seen, so turning them on later in a process does not reach kernels already launched here.

Measured (benchmarks/decode_launch_ab.py, H100): 56-116 us less host time a decoded token, the same
outputs, and no call reaching Triton's ``run`` once the keys are known.
"""

from __future__ import annotations

from operator import itemgetter

import torch
from triton.runtime.errors import OutOfResources

_KERNELS: dict = {}  # (kernel, device, key) -> Triton's compiled kernel
_INFO: dict = {}  # kernel -> (constexpr flag of each parameter, names), or None: Triton's path
_MAX_KEYS = 1024  # a bound on the table: it is emptied when full (keys are then found again)
_RUNTIME: dict = {}  # "knobs": Triton's runtime knobs (launch hooks), once a kernel is known
_Tensor = torch.Tensor


def _getters(constexpr) -> tuple:
    """(constexpr values, runtime values): two functions of a call's values."""
    def getter(idx):
        if len(idx) == 1:
            return lambda values, i=idx[0]: (values[i],)
        return itemgetter(*idx) if idx else (lambda values: ())
    return (getter([i for i, c in enumerate(constexpr) if c]),
            getter([i for i, c in enumerate(constexpr) if not c]))


def _info(kernel):
    """(constexpr flags, parameter names, `_getters`) of a compiled-mode Triton kernel whose
    launches can be direct, else None (the interpreter, a Triton laid out otherwise, pre-run
    hooks)."""
    info = _INFO.get(kernel, _INFO)
    if info is not _INFO:
        return info
    info = None
    try:
        from triton import knobs
        from triton.runtime.jit import JITFunction
        if (isinstance(kernel, JITFunction) and not kernel.pre_run_hooks
                and hasattr(torch._C, "_cuda_getCurrentRawStream")):
            constexpr = tuple(bool(p.is_constexpr) for p in kernel.params)
            info = (constexpr, tuple(p.name for p in kernel.params), _getters(constexpr))
            _RUNTIME["knobs"] = knobs.runtime
    except Exception:  # a Triton laid out otherwise
        info = None
    _INFO[kernel] = info
    return info


def _hooked() -> bool:
    """Launch hooks installed (a profiler): Triton's path calls them. (Newer Tritons keep an
    empty chain of hooks where none is installed.)"""
    rt = _RUNTIME["knobs"]
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _key(getters, values, options) -> tuple:
    """`key_of` with the kernel's `_getters`: the constexprs as one tuple of values, then the
    class of each runtime value (the list the module docstring gives)."""
    key = [options, getters[0](values)]  # the constexprs by value
    add = key.append
    for v in getters[1](values):
        c = v.__class__
        if c is int:
            add(v if v < 16 else (v & 15 == 0, v > 0x7FFFFFFF, v > 0x7FFFFFFFFFFFFFFF))
        elif c is float:
            add(float)
        elif isinstance(v, _Tensor):
            add((v.dtype, v.data_ptr() & 15 == 0))
        else:
            add(v)
    return tuple(key)


def key_of(constexpr, values, options) -> tuple:
    """`launch`'s key of a call's values (in the kernel's parameter order)."""
    return _key(_getters(constexpr), values, options)


def launch(kernel, grid, *args, num_warps: int, num_stages=None, **kw) -> None:
    """``kernel[grid](*args, num_warps=..., num_stages=..., **kw)``, the same launch, directly
    from a compiled kernel found under `key_of` where one was recorded. Every parameter of the
    kernel is given, the first ones in ``args`` and the rest by name in ``kw``."""
    opts = {"num_warps": num_warps}
    if num_stages is not None:
        opts["num_stages"] = num_stages
    info = _info(kernel)
    if info is None or _hooked():
        kernel[grid](*args, **opts, **kw)
        return
    _, names, getters = info
    if len(args) + len(kw) != len(names):  # every parameter, and nothing else (no other option)
        raise TypeError(f"launch: {kernel.__name__} takes {len(names)} parameters, got "
                        f"{len(args)} positional and {sorted(kw)}")
    values = args + tuple([kw[n] for n in names[len(args):]])
    device = torch.cuda.current_device()
    key = (kernel, device, _key(getters, values, (num_warps, num_stages)))
    compiled = _KERNELS.get(key)
    if compiled is None:
        if not _kept(_KERNELS, key, kernel[grid](*args, **opts, **kw)):
            _INFO[kernel] = None  # compiled kernels laid out otherwise: Triton's path from now on
        return
    _run(compiled, grid, device, values)


def _kept(table: dict, key, compiled) -> bool:
    """Keep a compiled kernel Triton's path returned under ``key`` (the table emptied when full);
    False where it lacks what a direct launch uses (a Triton laid out otherwise)."""
    if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        return False
    if len(table) >= _MAX_KEYS:
        table.clear()
    table[key] = compiled
    return True


def _run(compiled, grid, device, values) -> None:
    """Launch a kept compiled kernel with its launcher on the current stream, as Triton's ``run``
    would."""
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                 torch._C._cuda_getCurrentRawStream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *values)


_DYNAMIC = (lambda values: (), lambda values: values)  # `_key`'s getters: every value runtime


def classes(values: tuple):
    """The key of one round of `Site` launches: the current device and the classes `_key` gives
    ``values`` (every value the round's launches take as dynamic, so that the key covers each
    launch's), or None where launches take Triton's own path (no compiled kernel met yet: the
    interpreter; launch hooks: a profiler)."""
    if not _RUNTIME or _hooked():
        return None
    return (torch.cuda.current_device(), _key(_DYNAMIC, values, None))


def _params(kernel) -> tuple:
    """(parameter names, names of the constexprs) of a Triton kernel, compiled or interpreted."""
    params = getattr(kernel, "params", None)
    if params is not None:
        return tuple(p.name for p in params), {p.name for p in params if p.is_constexpr}
    import triton.language as tl  # the interpreter's function: its annotations say it
    ann = getattr(kernel.fn, "__annotations__", {})
    return tuple(kernel.arg_names), {n for n, a in ann.items()
                                     if a is tl.constexpr or "constexpr" in str(a)}


class Site:
    """Repeated launches of one kernel from one call site whose parameters are fixed but for those
    named ``dynamic`` (no constexpr among them): ``site(grid, key, *dynamic values)`` is
    ``launch(kernel, grid, **fixed, **dynamic, num_warps=..., num_stages=...)``, where ``key`` is
    `classes` of values that include the dynamic ones (a decoded token classifies its values once
    for its four launches: kernels/blocksparse_decode.py). The fixed values are placed once and
    their classes are the same at every call, so the compiled kernel is kept under ``key``. A new
    key, a key of None, the interpreter and Tritons laid out otherwise take Triton's own path."""

    __slots__ = ("kernel", "fixed", "place", "opts", "direct", "table")

    def __init__(self, kernel, fixed: dict, dynamic: tuple, *, num_warps: int, num_stages=None):
        info = _info(kernel)
        names, constexpr = _params(kernel)
        if set(fixed) & set(dynamic) or set(fixed) | set(dynamic) != set(names) \
                or len(dynamic) != len(set(dynamic)) or constexpr & set(dynamic):
            raise TypeError(f"Site: {kernel.__name__}'s parameters {names} are not the fixed "
                            f"{sorted(fixed)} and the dynamic {dynamic} (no constexpr) exactly")
        self.kernel = kernel
        # the parameters in order, picked from (dynamic values + fixed values) in one C call
        fixed_names = tuple(n for n in names if n not in dynamic)
        self.fixed = tuple(fixed[n] for n in fixed_names)
        at = {n: i for i, n in enumerate(tuple(dynamic) + fixed_names)}
        self.place = itemgetter(*[at[n] for n in names])
        self.opts = {"num_warps": num_warps}
        if num_stages is not None:
            self.opts["num_stages"] = num_stages
        self.direct = info is not None
        self.table: dict = {}  # key -> compiled kernel

    def __call__(self, grid, key, *dynamic) -> None:
        values = self.place(dynamic + self.fixed)
        compiled = self.table.get(key) if self.direct and key is not None else None
        if compiled is None:
            compiled = self.kernel[grid](*values, **self.opts)
            if self.direct and key is not None and not _kept(self.table, key, compiled):
                self.direct = False  # compiled kernels laid out otherwise: Triton's path now on
            return
        _run(compiled, grid, key[0], values)


def refit(attempt, state, smaller):
    """``attempt(state)``; where Triton refuses the launch for its shared memory (a GPU with less
    than the launch planned for: refused before the kernel runs, so nothing is half written),
    ``attempt(smaller(state, refusal))`` until one runs. ``smaller`` returns None where nothing
    smaller is left, and the refusal is raised; so is any other refusal. (The block-sparse
    attention and search, on a decoded token's path, keep the same loop inline: closures there
    cost 2-3 us of host time a token.)"""
    while True:
        try:
            return attempt(state)
        except OutOfResources as refusal:
            if refusal.name != "shared memory":
                raise
            state = smaller(state, refusal)
            if state is None:
                raise
