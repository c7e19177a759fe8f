"""The ADM U-Net, its configs, checkpoint loading/saving, key mapping and swap-in adapters."""

from .checkpoint import CheckpointError, load, save
from .config import PRESETS, Preset, UNetConfig, infer_config, preset
from .swap import swap
from .unet import UNet

__all__ = ["CheckpointError", "PRESETS", "Preset", "UNet", "UNetConfig", "infer_config", "load", "preset", "save",
           "swap"]
