"""Loads the compiled extension cmfast._C, if it is there and current.

`import cmfast` must work without it: the Triton and reference paths then serve every op. Whatever
goes wrong (never built, built against another torch, built from older sources) is said once, as a
warning, and recorded in `status` for `cmfast info`.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._build_hash import source_hash

_ROOT = Path(__file__).resolve().parent.parent  # the source tree, for an in-place (editable) build


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool  # the ops of cmfast._C are usable
    cpu: bool
    cuda: bool
    reason: str  # why it is not loaded, or "" when it is
    build_info: dict = field(default_factory=dict)


def _source_hash() -> str | None:
    """The fingerprint of csrc/ and kernels/ when they lie beside the package (an in-place build), else None."""
    if not (_ROOT / "setup.py").is_file():
        return None
    return source_hash(_ROOT)


def _load() -> ExtensionStatus:
    if os.environ.get("CMFAST_NO_EXTENSION", "0") == "1":
        return ExtensionStatus(False, False, False, "disabled by CMFAST_NO_EXTENSION=1")
    try:
        module = importlib.import_module("cmfast._C")
    except ImportError as e:  # never built, or built against another torch (undefined symbols)
        return ExtensionStatus(False, False, False, f"cmfast._C could not be imported ({e})")
    info = dict(module.build_info())
    if info["torch_version"] != torch.__version__:
        built = info["torch_version"]
        reason = (f"cmfast._C was built against torch {built}, this is torch {torch.__version__}: install that torch "
                  f"(pip install 'torch=={built.split('+')[0]}') or rebuild cmfast against this one "
                  "(pip install --no-build-isolation -e . in its checkout)")
        return ExtensionStatus(False, False, False, reason, info)
    current = _source_hash()
    if current is not None and current != info["source_hash"]:
        reason = "cmfast._C is stale: csrc/ or kernels/ changed since it was built"
        return ExtensionStatus(False, False, False, reason, info)
    return ExtensionStatus(True, True, bool(info["cuda"]), "", info)


status = _load()
# The module itself, for the ops' eager entry points (cmfast._C.group_norm, ...); None when it is not loaded.
compiled = importlib.import_module("cmfast._C") if status.loaded else None
if not status.loaded:
    warnings.warn(
        f"cmfast: compiled kernels off, Triton and reference paths only: {status.reason}. "
        "Build them with `pip install --no-build-isolation -e .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )
