"""cmfast's ops. Each is registered as torch.ops.cmfast.<name> (with a fake implementation for
torch.compile) and runs on the backend cmfast.backends.choose() picks among the kernels it has."""

from .attention import attention
from .consistency import consistency_epilogue, consistency_prologue, consistency_scalings, time_input
from .group_norm import group_norm

__all__ = [
    "attention",
    "consistency_epilogue",
    "consistency_prologue",
    "consistency_scalings",
    "group_norm",
    "time_input",
]
