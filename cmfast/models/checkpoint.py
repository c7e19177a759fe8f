"""Loading and saving U-Net checkpoints: openai `.pt` state dicts, `.safetensors` files (openai or diffusers
key names), diffusers model folders (config.json + weights), or a state dict in memory.

`.pt` files are read with torch.load(weights_only=True): a pickle that would run code is refused. Every
mismatch between the file and the config is reported in one CheckpointError. Files are written atomically.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..devices import parse_device
from .config import UNetConfig, infer_config, preset
from .keymap import config_from_diffusers, diffusers_config, diffusers_to_openai, openai_to_diffusers
from .unet import PRECISIONS, UNet

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CONFIG_METADATA = "cmfast_config"  # safetensors metadata key holding the UNetConfig as JSON
KIND_METADATA = "cmfast_kind"  # and the kind of network: "consistency" (CD/CT) or "edm" (a teacher)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the U-Net it is loaded into."""


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _is_pickle(path):  # random bytes, or a damaged file: not a pickle that carries anything
            raise CheckpointError(f"{path}: cannot be read as a torch checkpoint (not one, or corrupt)") from None
        raise CheckpointError(
            f"{path}: refused: the file is a pickle carrying code or objects beyond tensors, which "
            f"weights_only loading will not run ({str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint (truncated or corrupt?): {e}") from None


def _is_pickle(path: Path) -> bool:
    """Whether the file holds a well-formed pickle stream (the data.pkl of torch's zip format, or a legacy file's
    first pickle), read opcode by opcode without running any of it."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return False
                data = archive.read(name)
        else:
            data = path.read_bytes()
        for opcode, _, _ in pickletools.genops(data):
            if opcode.name == "STOP":
                return True
    except Exception:  # an invalid opcode, a truncated stream, a damaged zip
        return False
    return False


def _safetensors_load(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors (truncated or corrupt?): {e}") from None


def _diffusers_config_file(path: Path) -> UNetConfig:
    """A diffusers config.json, every error naming the file."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        return config_from_diffusers(cfg)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _recorded_config(path: Path, text: str) -> UNetConfig:
    """The UNetConfig a cmfast .safetensors records in its metadata."""
    fields = set(UNetConfig.__dataclass_fields__)
    try:
        value = json.loads(text)
        if not isinstance(value, dict) or not set(value) <= fields:
            raise ValueError(f"expected an object with the fields of UNetConfig, got {text[:80]!r}")
        config = UNetConfig(**_tuples(value))  # which checks every field's type and range
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad {CONFIG_METADATA} metadata: {str(e).splitlines()[0]}") from None
    return config


def is_diffusers_keys(state_dict: dict) -> bool:
    return "time_embedding.linear_1.weight" in state_dict or "conv_in.weight" in state_dict


def read(source) -> tuple[dict, UNetConfig | None]:
    """(state dict with openai key names, the config the source records or None)."""
    if isinstance(source, dict):
        state, config = source, None
    else:
        path = Path(source)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        if path.is_dir():
            if (path / "model_index.json").is_file() and (path / "unet").is_dir():  # a pipeline: its U-Net
                path = path / "unet"
            return _read_diffusers_folder(path)
        if path.suffix == ".safetensors":
            state, meta = _safetensors_load(path)
            config = _recorded_config(path, meta[CONFIG_METADATA]) if CONFIG_METADATA in meta else None
            if config is None and is_diffusers_keys(state) and (path.parent / "config.json").is_file():
                config = _diffusers_config_file(path.parent / "config.json")
        else:
            state, config = _torch_load(path), None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source!s:.200}: expected a state dict (names -> tensors)")
    if is_diffusers_keys(state):
        if config is None:
            raise CheckpointError("diffusers key names but no config: pass config= or load the model folder")
        state = _renamed(diffusers_to_openai, state, config)
    return state, config


def _read_diffusers_folder(path: Path) -> tuple[dict, UNetConfig]:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: a diffusers model folder needs config.json")
    config = _diffusers_config_file(path / "config.json")
    for name in DIFFUSERS_WEIGHTS:
        if (path / name).is_file():
            weights = path / name
            state = _safetensors_load(weights)[0] if name.endswith(".safetensors") else _torch_load(weights)
            return _renamed(diffusers_to_openai, state, config), config
    raise CheckpointError(f"{path}: no weights ({' or '.join(DIFFUSERS_WEIGHTS)})")


def _renamed(fn, state, config):
    try:
        return fn(state, config)
    except KeyError as e:
        raise CheckpointError(f"{e.args[0]} (config: {config})") from None


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def check_fits(state: dict, config: UNetConfig) -> None:
    """One error listing every missing, unexpected and wrongly-shaped key, and the config it was checked against."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {expected[k]}" for k in expected
              if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        def listing(title, items):
            shown = "".join(f"\n    {i}" for i in items[:20])
            return f"\n  {title} ({len(items)}):{shown}" + (f"\n    ... {len(items) - 20} more" if len(items) > 20 else "")

        raise CheckpointError(
            "checkpoint does not fit the U-Net"
            + (listing("missing keys", missing) if missing else "")
            + (listing("unexpected keys", unexpected) if unexpected else "")
            + (listing("wrong shapes", shapes) if shapes else "")
            + f"\n  config: {config}"
        )


def _precision(dtype) -> str:
    if dtype is None:
        return "fp32"
    for name, d in PRECISIONS.items():
        if dtype in (d, name):
            return name
    raise ValueError(f"dtype: expected None, torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")


def load(source, *, config=None, device="cpu", dtype=None, channels_last: bool | None = None,
         num_head_channels: int | None = None) -> UNet:
    """A cmfast U-Net with the weights of `source`: a path to a .pt, .safetensors, diffusers model folder or diffusers
    pipeline folder (its unet/), a state dict, "digits" (the built-in model) or a preset name (cd_imagenet64_l2, ...)
    whose weights are in $CMFAST_CHECKPOINTS or ~/.cache/cmfast/checkpoints. Parameters are inference-only
    (requires_grad=False: the fused kernels serve only calls that need no gradient); training sets them back.

    config: None (recorded in the source, else inferred from the weights' shapes), a preset name, or a UNetConfig.
    dtype: None or torch.float32; torch.float16 for the reference's fp16 mode; torch.bfloat16 likewise in bf16.
    num_head_channels: the attention heads' width where the source does not record it (an openai .pt or state dict:
    64, as in every released model, unless given); an error where it records another.
    channels_last: True or False to run in that memory layout; None (default): the layout measured faster for each
    input shape on this machine (UNet.set_channels_last(None)); outputs are NCHW either way.
    """
    precision = _precision(dtype)
    device = parse_device(device)
    if isinstance(source, str) and not Path(source).exists():  # a name: the built-in model's or a preset's
        from ..pretrained import BUILT_INS, locate

        found = locate(source)
        if found is not None:
            config = source if config is None and source not in BUILT_INS else config
            source = found
    state, recorded = read(source)
    if isinstance(config, str):
        config = preset(config).unet
    elif config is None:
        try:
            config = recorded or infer_config(state, num_head_channels=num_head_channels or 64)
        except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:
            raise CheckpointError(f"cannot infer the U-Net config from these keys ({e}); pass config=") from None
    elif not isinstance(config, UNetConfig):
        raise TypeError(f"config: expected None, a preset name or a UNetConfig, got {type(config).__name__}")
    if num_head_channels is not None and config.num_head_channels != num_head_channels:
        raise ValueError(f"num_head_channels: {num_head_channels} given, but the source records "
                         f"{config.num_head_channels}")
    check_fits(state, config)
    check_values(state)
    with torch.device("meta"):
        model = UNet(config)
    model.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in state.items()}, assign=True)
    model.set_precision(precision)
    model.set_channels_last(channels_last)
    return model.eval().requires_grad_(False)


def check_values(state: dict) -> None:
    """Refuse weights that are not floating-point numbers, or not finite: they would load and sample black images."""
    for key, value in state.items():
        if not value.is_floating_point():
            raise CheckpointError(f"{key}: expected floating-point weights, got {value.dtype}")
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}): a damaged checkpoint")


def unrecorded(model: UNet) -> dict:
    """The config fields an openai .pt of `model` (a bare state dict) would not give back on a plain load: the
    value to pass again (num_head_channels=, or config=)."""
    state = {k: v.to("meta") for k, v in model.state_dict().items()}
    inferred = infer_config(state)
    return {f: getattr(model.config, f) for f in model.config.__dataclass_fields__
            if f != "dropout" and getattr(inferred, f) != getattr(model.config, f)}


STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def stored(state: dict, weights_dtype: str = "fp32") -> dict:
    """The weights as a file holds them: on the CPU, contiguous, in fp32 or (half the size) fp16 / bf16; loading
    gives fp32 again. A weight the half type cannot hold (beyond fp16's 65504) is an error, not an infinity."""
    if weights_dtype not in STORAGE_DTYPES:
        raise ValueError(f"weights_dtype: expected one of {', '.join(STORAGE_DTYPES)}, got {weights_dtype!r}")
    dtype = STORAGE_DTYPES[weights_dtype]
    out = {}
    for key, value in state.items():
        value = value.detach().to("cpu", torch.float32)
        if value.is_floating_point():
            value = value.to(dtype)
            if not torch.isfinite(value).all():
                raise ValueError(f"weights_dtype: {key} has values beyond what {weights_dtype} holds; store it in fp32")
        out[key] = value.contiguous()
    return out


def stage(model: UNet, out, name: str | None, kind: str | None = None, weights_dtype: str = "fp32") -> None:
    """Write `model` to out's temporaries (a cmfast.outputs.Outputs): the file `name` (.pt or .safetensors), or,
    for None, a diffusers model's config.json and diffusion_pytorch_model.safetensors. kind ("consistency" or "edm",
    what the network is) is recorded in a .safetensors file's metadata; weights_dtype: see stored()."""
    _stage_stored(stored(model.state_dict(), weights_dtype), model.config, out, name, kind)


def _stage_stored(state: dict, config, out, name: str | None, kind: str | None) -> None:
    from safetensors.torch import save_file

    if name is None:
        save_file(openai_to_diffusers(state, config), str(out.stage(DIFFUSERS_WEIGHTS[0])))
        out.stage("config.json").write_text(json.dumps(diffusers_config(config), indent=2) + "\n")
    elif name.endswith(".pt"):
        torch.save(state, out.stage(name))
    else:
        meta = {CONFIG_METADATA: json.dumps(config.__dict__), "format": "openai"}
        if kind is not None:
            meta[KIND_METADATA] = kind
        save_file(state, str(out.stage(name)), metadata=meta)


def recorded_kind(path) -> str | None:
    """The kind ("consistency" or "edm") a cmfast .safetensors file records, else None."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    kind = _safetensors_load(path)[1].get(KIND_METADATA)
    if kind not in (None, "consistency", "edm"):
        raise CheckpointError(f"{path}: bad {KIND_METADATA} metadata {kind!r} (expected consistency or edm)")
    return kind


def save(model: UNet, dest, *, overwrite: bool | str = False, protect=(), kind: str | None = None,
         weights_dtype: str = "fp32") -> Path:
    """Write `model` as an openai `.pt`, a `.safetensors` (openai names, config in metadata) or, for a path without
    one of those suffixes, a diffusers model folder (config.json and diffusion_pytorch_model.safetensors; nothing
    else in the folder is touched). Through cmfast.outputs: checked first, written as a set or not at all.
    overwrite: False (refuse an existing file), True (replace the model's files), "own" (replace only files cmfast
    wrote; the command line's --force). protect: paths (the source) that must not be replaced. weights_dtype: "fp32",
    or "fp16" / "bf16" for a file of half the size (see stored())."""
    from ..outputs import Outputs

    state = stored(model.state_dict(), weights_dtype)  # first: a bad type fails before the destination is touched
    dest = Path(dest)
    folder = dest.suffix not in (".pt", ".safetensors")
    names = ["config.json", DIFFUSERS_WEIGHTS[0]] if folder else [dest.name]
    with Outputs(dest if folder else dest.parent, names, replace=overwrite, what="destination", protect=protect) as out:
        _stage_stored(state, model.config, out, dest.name if not folder else None, kind)
        out.commit()
    return dest
