"""slcompile.kernels: tensors in, tensors out. The reference (SPEC.md executable), the custom ops
and the Triton kernels. Nothing here knows about graphs."""

from . import ops  # noqa: F401  (registers torch.ops.superlinear.*)
from .config import SuperlinearConfig

__all__ = ["SuperlinearConfig", "ops"]
