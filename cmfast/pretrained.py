"""Finding a model by name or path for the commands: the released checkpoints by preset name (from a local
folder: openai's files are not downloaded by cmfast), or any checkpoint file or diffusers folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .consistency import Denoiser
from .models import PRESETS, UNet, load
from .models.checkpoint import recorded_kind

RELEASES = "https://github.com/openai/consistency_models (README: checkpoints)"
DATA = Path(__file__).resolve().parent / "data"
# The built-in models (`make digits-model`): the default, a consistency model distilled from the EDM teacher beside it.
BUILT_INS = {"digits": DATA / "digits.safetensors", "digits-teacher": DATA / "digits-teacher.safetensors"}
BUILT_IN = BUILT_INS["digits"]


def checkpoint_dirs() -> list[Path]:
    """Where preset names are looked up: $CMFAST_CHECKPOINTS (os.pathsep-separated), then ~/.cache/cmfast/checkpoints."""
    dirs = [Path(p) for p in os.environ.get("CMFAST_CHECKPOINTS", "").split(os.pathsep) if p]
    return dirs + [Path.home() / ".cache" / "cmfast" / "checkpoints"]


@dataclass
class Model:
    name: str  # preset name, or the file's stem
    unet: UNet
    kind: str  # "consistency" or "edm"

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet, kind=self.kind)


def _built_in_missing(given: str | None) -> ValueError:
    what = "the built-in model" if given is None else f"the built-in model {given!r}"
    return ValueError(f"checkpoint: {'none given and ' if given is None else ''}this install lacks {what}; pass a "
                      "checkpoint path or a preset name "
                      f"({', '.join(n for n in PRESETS if not n.startswith(('test', 'digits')))})")


def locate(name: str) -> Path | None:
    """The file of a model name: "digits" (the built-in model) or a preset name whose weights are in checkpoint_dirs();
    None when `name` is neither (a path, then). A known preset whose weights are not here is an error naming where
    they were looked for and where they come from."""
    if name in BUILT_INS:
        if not BUILT_INS[name].is_file():
            raise _built_in_missing(name)
        return BUILT_INS[name]
    if name not in PRESETS:
        return None
    tried = []
    for folder in checkpoint_dirs():
        for candidate in (folder / f"{name}.pt", folder / f"{name}.safetensors", folder / name):
            tried.append(str(candidate))
            if candidate.exists():
                return candidate
    raise FileNotFoundError(f"checkpoint: {name} is a known preset but its weights are not here; "
                            f"download {name}.pt from {RELEASES} into one of: {', '.join(tried[::3])}")


def find(name_or_path: str | None, *, device="cpu", dtype=None, kind: str | None = None) -> Model:
    """A checkpoint path (.pt, .safetensors, diffusers folder), a preset name whose file is in checkpoint_dirs(), or
    None / "digits": the built-in model ("digits-teacher": its EDM teacher)."""
    if name_or_path is None:
        if not BUILT_IN.is_file():
            raise _built_in_missing(None)
        name_or_path = "digits"
    path = Path(name_or_path)
    if path.exists():
        name = path.stem if path.is_file() else path.name
        preset = PRESETS.get(name)
        unet = load(path, config=None, device=device, dtype=dtype)
        return Model(name, unet, kind or recorded_kind(path) or (preset.kind if preset else "consistency"))
    found = locate(name_or_path)
    if found is None:
        raise FileNotFoundError(f"checkpoint: {name_or_path!r} is neither a file or folder nor a preset name")
    config = None if name_or_path in BUILT_INS else name_or_path
    unet = load(found, config=config, device=device, dtype=dtype)
    return Model(name_or_path, unet, kind or PRESETS[name_or_path].kind)
