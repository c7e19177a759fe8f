"""Reference models for the tests: diffusers' UNet2DModel (the stand-in for openai's UNetModel, docs/model.md
section 1) built with the configs diffusers uses for the consistency checkpoints, with EVERY parameter
randomised (the reference zero-initialises some layers, which would hide errors there)."""

import torch
from diffusers import UNet2DModel

from cmfast.models import PRESETS, keymap


def randomize_(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in) (activations keep their scale through the depth), vectors ~ 1 + N(0, 0.1) for
    norm scales and N(0, 0.1) for biases and shifts; nothing left at zero or one."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def diffusers_unet(preset: str, gen: torch.Generator | None = None, device="cpu") -> UNet2DModel:
    """A UNet2DModel of the preset's architecture; randomised when `gen` is given."""
    config = {k: v for k, v in keymap.diffusers_config(PRESETS[preset].unet).items() if not k.startswith("_")}
    with torch.device(device):
        model = UNet2DModel(**config)
    return randomize_(model, gen).eval() if gen is not None else model.eval()


def openai_style(source: torch.nn.Module, **attributes) -> torch.nn.Module:
    """A stand-in for the reference's UNetModel: a module holding `source`'s parameters under the openai key names,
    with the attributes given (num_head_channels, num_heads, image_size, dtype, input_blocks, ...)."""
    holder = torch.nn.Module()
    for key, value in source.state_dict().items():
        holder.register_parameter(key.replace(".", "__"), torch.nn.Parameter(value.clone(), requires_grad=False))
    holder.state_dict = lambda: {k.replace("__", "."): v for k, v in holder.named_parameters()}
    for name, value in attributes.items():
        setattr(holder, name, value)
    return holder
