"""cmfast's ops. Each is registered as torch.ops.cmfast.<name> (with a fake implementation for
torch.compile) and runs on the backend cmfast.backends.choose() picks."""

from .consistency import consistency_epilogue, consistency_prologue, consistency_scalings, time_input

__all__ = ["consistency_epilogue", "consistency_prologue", "consistency_scalings", "time_input"]
