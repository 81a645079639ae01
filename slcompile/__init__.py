"""slcompile: compile dense causal attention in PyTorch models into superlinear attention."""

from slcompile.kernels.config import SuperlinearConfig
from slcompile.functional import superlinear_attention

__version__ = "0.1.0"

__all__ = ["SuperlinearConfig", "superlinear_attention", "__version__"]
