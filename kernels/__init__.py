"""slcompile.kernels: tensors in, tensors out. The reference (docs/spec.md executable), the custom
ops and the Triton kernels. Nothing here knows about graphs."""

if __name__ == "slcompile.kernels":
    from . import ops  # noqa: F401  (registers torch.ops.superlinear.*)
    from .config import SuperlinearConfig

    __all__ = ["SuperlinearConfig", "ops"]
else:
    # This folder was imported as a top-level ``kernels`` because a checkout's root is on sys.path
    # (``python -m pytest`` or ``python -m slcompile`` run there). That name belongs to Hugging
    # Face's ``kernels`` package, which transformers imports. Hand the name over: load the package
    # of that name found on the rest of sys.path in our place; where there is none, stand in as an
    # empty namespace package (no ``__file__``, no ``__version__``: what transformers reads as "not
    # installed"), exactly what this folder would be without an ``__init__.py``. Nothing of ours
    # runs under that name (the custom ops are registered once, by ``slcompile.kernels``).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _hand_over(name, here):
        root = _os.path.dirname(here)
        rest = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != root]
        spec = _machinery.PathFinder.find_spec(name, rest)
        if spec is None:
            spec = _machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [here]
            _sys.modules[name] = _util.module_from_spec(spec)
            return
        module = _util.module_from_spec(spec)
        _sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            _sys.modules.pop(name, None)
            raise

    _hand_over(__name__, _os.path.dirname(_os.path.realpath(__file__)))
