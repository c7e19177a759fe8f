"""Swap-in: a cmfast U-Net in the place of a live reference model, with its weights, call signature and
return type. `pipe.unet = cmfast.swap(pipe.unet)` inside diffusers' ConsistencyModelPipeline."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

from .checkpoint import load, save
from .config import UNetConfig, infer_config
from .keymap import config_from_diffusers, diffusers_to_openai
from .unet import PrecisionMoves, UNet


def _is_diffusers_unet(model) -> bool:
    config = getattr(model, "config", None)  # diffusers: a FrozenDict (cmfast.UNet's is a UNetConfig)
    return isinstance(config, Mapping) and "block_out_channels" in config and "layers_per_block" in config


class DiffusersUNet(PrecisionMoves, nn.Module):
    """A cmfast U-Net behind diffusers' UNet2DModel interface: forward(sample, timestep, class_labels=None,
    return_dict=True) -> UNet2DOutput (or a 1-tuple), plus the `config`, `dtype` and `device` pipelines read."""

    def __init__(self, unet: UNet, config):
        super().__init__()
        self.unet = unet
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, *args, **kwargs) -> "DiffusersUNet":  # a dtype selects the precision mode (cmfast.UNet.to)
        self.unet.to(*args, **kwargs)
        return self

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        timestep = torch.as_tensor(timestep, device=sample.device)
        out = self.unet(sample, timestep.reshape(-1).expand(sample.shape[0]), class_labels).to(sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)


@functools.cache
def saveable_diffusers_unet() -> type:
    """DiffusersUNet as a diffusers ModelMixin, so that `pipe.save_pretrained` saves it, as a folder plain diffusers
    loads: diffusers saves only ModelMixin components, and model_index.json records each component's library (from
    its `__module__`) and class name, read back by plain diffusers as the class to load. The class is therefore
    named UNet2DModel and each instance says it comes from diffusers: the saved unet/ is a UNet2DModel folder (its
    config and weights, cmfast.save's diffusers format). Built on first use: diffusers is not a dependency."""
    from diffusers import ModelMixin

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None, **kwargs):
        if variant is not None or not safe_serialization:
            raise ValueError("save_pretrained of a cmfast-swapped unet: writes diffusion_pytorch_model.safetensors "
                             f"only (variant={variant!r}, safe_serialization={safe_serialization!r} asked)")
        save(self.unet, save_directory, overwrite=True)

    def init(self, unet: UNet, config):
        DiffusersUNet.__init__(self, unet, config)
        self.__module__ = "diffusers.models.unets.unet_2d"  # what model_index.json records: see above

    return type("UNet2DModel", (DiffusersUNet, ModelMixin), {
        "__init__": init, "save_pretrained": save_pretrained, "__module__": __name__,
        "__doc__": "A cmfast U-Net behind diffusers' UNet2DModel interface, saved as a UNet2DModel folder."})


def _head_width(model: nn.Module) -> int:
    """The head width of an openai-style model: num_head_channels, or, where that is -1, channels / num_heads, which
    cmfast takes only when it is one width at every attention level (it has one head width)."""
    if isinstance(getattr(model, "config", None), UNetConfig):
        return model.config.num_head_channels
    width = getattr(model, "num_head_channels", 64)
    if isinstance(width, int) and width > 0:
        return width
    heads = getattr(model, "num_heads", None)
    raise ValueError(f"model: num_head_channels={width!r} with num_heads={heads!r} makes heads of width channels / "
                     f"{heads}, a different width at each attention level; cmfast supports one head width "
                     "(num_head_channels > 0, 64 in every released model)")


def _check_resampling(model: nn.Module, state: dict) -> None:
    """Refuse the reference's conv_resample=False without resblock_updown (average pooling down, nearest up, no
    convolution): its first down block then holds no parameters at all, where cmfast has a ResBlock or a convolution."""
    levels = len(getattr(model, "channel_mult", ()))
    down = 1 + getattr(model, "num_res_blocks", 0)  # the input block that downsamples level 0
    if getattr(model, "conv_resample", True) is False and levels > 1 \
            and not any(k.startswith(f"input_blocks.{down}.") for k in state):
        raise ValueError("model: conv_resample=False with resblock_updown=False (resampling without a convolution) is "
                         "not supported by cmfast; supported: resblock_updown=True, or conv_resample=True")


def swap(model: nn.Module, *, channels_last: bool | None = None) -> nn.Module:
    """A cmfast U-Net with `model`'s weights: for a diffusers UNet2DModel, wrapped in its interface; for an openai
    UNetModel (or anything with its key names), a cmfast.UNet (same forward(x, timesteps, y=None)); for a diffusers
    ConsistencyModelPipeline, the pipeline run by cmfast's U-Net and sampler (cmfast.pipeline: same call, same images).
    channels_last: as cmfast.load (None: the layout measured faster, outputs NCHW)."""
    from ..pipeline import ConsistencyPipeline, is_consistency_pipeline

    if is_consistency_pipeline(model):  # the sampler too: the same call and images, cmfast's loop
        return ConsistencyPipeline(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module or a diffusers ConsistencyModelPipeline, got "
                        f"{type(model).__name__}")
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("model: has no parameters to take")
    device = param.device
    if _is_diffusers_unet(model):
        config = config_from_diffusers(dict(model.config))
        state = diffusers_to_openai(model.state_dict(), config)
        half = model.dtype if model.dtype in (torch.float16, torch.bfloat16) else None
        unet = load(state, config=config, device=device, dtype=half, channels_last=channels_last)
        wrapper = saveable_diffusers_unet()(unet.requires_grad_(model.training), model.config)
        return wrapper.train(model.training)
    state = model.state_dict()
    _check_resampling(model, state)
    config = infer_config(state, num_head_channels=_head_width(model), image_size=getattr(model, "image_size", None))
    # the reference's fp16 mode (use_fp16=True / convert_to_fp16()) shows as model.dtype; so does cmfast.UNet's
    half = getattr(model, "dtype", None) if getattr(model, "dtype", None) in (torch.float16, torch.bfloat16) else None
    unet = load(state, config=config, device=device, dtype=half, channels_last=channels_last)
    return unet.requires_grad_(model.training).train(model.training)  # inference-only unless it replaces a trainee
