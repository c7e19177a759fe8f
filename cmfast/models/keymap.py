"""State-dict names: openai's UNetModel <-> diffusers' UNet2DModel (docs/model.md section 1b), both directions,
and the UNetConfig <-> diffusers config.json translation."""

from __future__ import annotations

import torch

from .config import UNetConfig
from .diffusers_config import RESAMPLE_BLOCKS, check as diffusers_config_check

# Inside a ResBlock / an attention block: openai sub-name -> diffusers sub-name.
RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
            "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
ATTENTION = {"norm": "group_norm", "proj_out": "to_out.0"}  # qkv is cut into to_q, to_k, to_v
DOWNSAMPLE = {"op": "conv"}  # resampling by convolution (resblock_updown=False)
UPSAMPLE = {"conv": "conv"}
SUBNAMES = {"res": RESBLOCK, "attn": ATTENTION, "down": DOWNSAMPLE, "up": UPSAMPLE}
TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
       "label_emb": "class_embedding", "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def block_prefixes(config: UNetConfig) -> list[tuple[str, str, str]]:
    """(openai prefix, diffusers prefix, "res" | "attn" | "down" | "up") for every ResBlock, attention block and
    resampling convolution."""
    c = config
    table = []
    k = 1
    levels = len(c.channel_mult)
    for i, attn in enumerate(c.attention_levels):
        for j in range(c.num_res_blocks):
            table.append((f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", "res"))
            if attn:
                table.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", "attn"))
            k += 1
        if i != levels - 1:
            table.append((f"input_blocks.{k}.0", f"down_blocks.{i}.downsamplers.0", "res" if c.resblock_updown else "down"))
            k += 1
    table += [("middle_block.0", "mid_block.resnets.0", "res"), ("middle_block.1", "mid_block.attentions.0", "attn"),
              ("middle_block.2", "mid_block.resnets.1", "res")]
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        attn = c.attention_levels[level]
        for j in range(c.num_res_blocks + 1):
            table.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            if attn:
                table.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn"))
            if level and j == c.num_res_blocks:
                table.append((f"output_blocks.{k}.{2 if attn else 1}", f"up_blocks.{i}.upsamplers.0",
                              "res" if c.resblock_updown else "up"))
            k += 1
    return table


def _rename_table(config: UNetConfig) -> dict[str, str]:
    """openai module path -> diffusers module path, for every module holding parameters (qkv excepted)."""
    table = dict(TOP)
    for openai, diffusers, kind in block_prefixes(config):
        for a, b in SUBNAMES[kind].items():
            table[f"{openai}.{a}"] = f"{diffusers}.{b}"
    return table


def _split(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def openai_to_diffusers(state_dict: dict, config: UNetConfig) -> dict:
    """Rename (and reshape: qkv cut in three, 1x1 attention convs as Linear) an openai state dict."""
    table = _rename_table(config)
    attn = {o: d for o, d, kind in block_prefixes(config) if kind == "attn"}
    out = {}
    for key, value in state_dict.items():
        module, param = _split(key)
        parent, _, leaf = module.rpartition(".")
        if leaf == "qkv" and parent in attn:
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{attn[parent]}.{name}.{param}"] = _linear(part).clone()
        elif module in table:
            is_attn_proj = module.endswith(".proj_out")
            out[f"{table[module]}.{param}"] = _linear(value) if is_attn_proj else value
        else:
            raise KeyError(f"{key}: no diffusers name for this openai key")
    return out


def diffusers_to_openai(state_dict: dict, config: UNetConfig) -> dict:
    """The inverse of openai_to_diffusers."""
    table = {d: o for o, d in _rename_table(config).items()}
    attn = {d: o for o, d, kind in block_prefixes(config) if kind == "attn"}
    out = {}
    for key, value in state_dict.items():
        module, param = _split(key)
        parent, _, leaf = module.rpartition(".")
        if leaf in ("to_q", "to_k", "to_v") and parent in attn:
            if leaf != "to_q":
                continue  # gathered with to_q
            parts = [state_dict.get(f"{parent}.{name}.{param}") for name in ("to_q", "to_k", "to_v")]
            if any(p is None for p in parts):
                raise KeyError(f"{parent}.to_k/to_v.{param}: missing beside {key}")
            out[f"{attn[parent]}.qkv.{param}"] = _conv1x1(torch.cat(parts, dim=0))
        elif module in table:
            is_attn_proj = table[module].endswith(".proj_out")
            out[f"{table[module]}.{param}"] = _conv1x1(value) if is_attn_proj else value
        else:
            raise KeyError(f"{key}: no openai name for this diffusers key")
    return out


def _linear(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1]) if w.dim() == 4 else w


def _conv1x1(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(*w.shape, 1, 1) if w.dim() == 2 else w


def diffusers_config(config: UNetConfig) -> dict:
    """The UNet2DModel config.json that diffusers' conversion writes for this architecture."""
    c = config
    levels = len(c.channel_mult)
    resample = "resnet" if c.resblock_updown else "conv"
    plain_down, plain_up = RESAMPLE_BLOCKS[resample]
    return {
        "_class_name": "UNet2DModel",
        "sample_size": c.image_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "layers_per_block": c.num_res_blocks,
        "num_class_embeds": c.num_classes,
        "block_out_channels": [c.model_channels * m for m in c.channel_mult],
        "attention_head_dim": c.num_head_channels,
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in c.attention_levels],
        "up_block_types": ["AttnUpBlock2D" if c.attention_levels[lv] else plain_up for lv in reversed(range(levels))],
        "resnet_time_scale_shift": "scale_shift" if c.use_scale_shift_norm else "default",
        "attn_norm_num_groups": c.num_groups,
        "norm_num_groups": c.num_groups,
        "freq_shift": c.freq_shift,
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "center_input_sample": c.center_input_sample,
        "norm_eps": 1e-5,
        "upsample_type": resample,
        "downsample_type": resample,
        "downsample_padding": 1,
        "act_fn": c.activation,
        "dropout": c.dropout,
    }


def config_from_diffusers(cfg: dict) -> UNetConfig:
    """The UNetConfig of a diffusers UNet2DModel config, which must be one cmfast computes exactly
    (cmfast.models.diffusers_config: every field checked, the others refused by name)."""
    cfg = diffusers_config_check(cfg)
    widths = list(cfg["block_out_channels"])
    c0 = widths[0]
    size = cfg.get("sample_size") or 64
    size = size[0] if isinstance(size, (list, tuple)) else size
    attn = [t.startswith("Attn") for t in cfg["down_block_types"]]
    return UNetConfig(
        model_channels=c0, num_res_blocks=cfg["layers_per_block"], channel_mult=tuple(w // c0 for w in widths),
        image_size=size, in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
        attention_resolutions=tuple(size // 2**lv for lv, a in enumerate(attn) if a),
        num_classes=cfg.get("num_class_embeds"), num_head_channels=cfg["attention_head_dim"],
        use_scale_shift_norm=cfg.get("resnet_time_scale_shift") == "scale_shift", dropout=cfg.get("dropout", 0.0),
        num_groups=cfg["norm_num_groups"], freq_shift=cfg["freq_shift"], flip_sin_to_cos=cfg["flip_sin_to_cos"],
        center_input_sample=cfg["center_input_sample"], activation=cfg["act_fn"],
        resblock_updown=cfg["downsample_type"] == "resnet",
    )
