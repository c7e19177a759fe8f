"""cmfast: fast, faithful inference for consistency models.

Importing cmfast registers its ops as torch.ops.cmfast.* and loads the compiled kernels (cmfast._C) when
they are built and current; without them (or without triton) it still works on the remaining backends.
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers torch.ops.cmfast.*)
from ._extension import status as extension  # noqa: E402
from .backends import use_backend  # noqa: E402
from .models import CheckpointError, UNet, UNetConfig, infer_config, load, save, swap  # noqa: E402

__all__ = ["CheckpointError", "UNet", "UNetConfig", "__version__", "extension", "infer_config", "load", "ops", "save",
           "swap", "use_backend"]
