"""slcompile.kernels: tensors in, tensors out. The reference (SPEC.md executable), the custom ops
and the Triton kernels. Nothing here knows about graphs."""

if __name__ == "slcompile.kernels":
    from . import ops  # noqa: F401  (registers torch.ops.superlinear.*)
    from .config import SuperlinearConfig

    __all__ = ["SuperlinearConfig", "ops"]
# Otherwise this folder was imported as a top-level ``kernels`` because a checkout's root is on
# sys.path (``python -m pytest`` or ``python -c`` run there). Libraries probe that generic name
# (transformers imports ``kernels`` looking for the Hugging Face kernels package); registering the
# custom ops a second time from here would replace the real registration, so do nothing.
