"""cmfast: fast, faithful inference for consistency models.

Importing cmfast registers its ops as torch.ops.cmfast.* and loads the compiled kernels (cmfast._C) when
they are built and current; without them (or without triton) it still works on the remaining backends.
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers torch.ops.cmfast.*)
from ._extension import status as extension  # noqa: E402
from .backends import use_backend  # noqa: E402
from .models import CheckpointError, UNet, UNetConfig, infer_config, load, save, swap  # noqa: E402
from .consistency import Denoiser  # noqa: E402
from .sampling import generators_for, sample, sample_heun  # noqa: E402
from .karras import karras_sample  # noqa: E402
from .schedules import karras_sigmas, sigmas_from_indices, two_step_sigmas  # noqa: E402
from . import editing  # noqa: E402

__all__ = ["CheckpointError", "Denoiser", "UNet", "UNetConfig", "__version__", "editing", "extension",
           "generators_for", "infer_config", "karras_sample", "karras_sigmas", "load", "ops", "sample", "sample_heun", "save",
           "sigmas_from_indices", "swap", "two_step_sigmas", "use_backend"]
