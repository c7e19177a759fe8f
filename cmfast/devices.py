"""The one reading of a device argument (the command line's --device, the API's device=)."""

from __future__ import annotations

import torch


def parse_device(value, what: str = "device", *, meta: bool = True) -> torch.device:
    """A torch device that is here: cpu, cuda, cuda:N (a CUDA index below the count), and meta (shapes without
    values, for tracing) where `meta` allows. `what` names the argument in the error."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what}: expected cpu, cuda or cuda:N, got {value!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{what} {device}: no CUDA device here (torch {torch.__version__}); use cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{what} {device}: there are {count} CUDA device(s), numbered from 0")
    elif device.type != "cpu" and not (meta and device.type == "meta"):
        raise ValueError(f"{what}: expected cpu, cuda or cuda:N, got {value!r}")
    return device
