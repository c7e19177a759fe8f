"""cmfast's ops. Each is registered as torch.ops.cmfast.<name> (with a fake implementation for
torch.compile) and runs on the backend cmfast.backends.choose() picks among the kernels it has."""

from . import attention as _attention
from . import consistency as _consistency
from . import group_norm as _group_norm
from .attention import attention
from .consistency import consistency_epilogue, consistency_prologue, consistency_scalings, time_input
from .group_norm import group_norm

# op name -> the backends it has kernels for (cmfast info reports the choice for each)
IMPLEMENTED = {
    "consistency": _consistency.IMPLEMENTED,
    "group_norm": _group_norm.IMPLEMENTED,
    "attention": _attention.IMPLEMENTED,
}

__all__ = [
    "attention",
    "consistency_epilogue",
    "consistency_prologue",
    "consistency_scalings",
    "group_norm",
    "time_input",
]
