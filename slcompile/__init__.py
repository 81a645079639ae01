"""slcompile: compile dense causal attention in PyTorch models into superlinear attention."""

from slcompile.kernels.config import SuperlinearConfig
from slcompile.functional import superlinear_attention
from slcompile.explain import explain
from slcompile import testing  # noqa: F401  (slcompile.testing)
# a callable module: slcompile.calibrate(model, texts, ...) runs calibrate.calibrate;
# save_routers / load_routers / attach_routers live in it too
from slcompile import calibrate  # noqa: F401
from slcompile import hf  # noqa: F401  (attn_implementation="superlinear" once transformers loads; cheap)

__version__ = "0.1.0"

__all__ = ["SuperlinearConfig", "superlinear_attention", "__version__"]
__all__ += ["explain", "testing"]
__all__ += ["calibrate"]
__all__ += ["hf"]
