"""Which diffusers UNet2DModel configurations cmfast computes exactly, and a clear refusal of every other one.

cmfast's U-Net is the ADM U-Net of the consistency-model checkpoints; UNet2DModel can express more. Every field of a
config is checked here, none ignored: a value cmfast computes differently would otherwise give other numbers with no
error. The table (also in the README):

| field | supported |
|---|---|
| sample_size, in_channels, out_channels, layers_per_block, dropout, num_class_embeds | any |
| block_out_channels | multiples of the first width |
| downsample_type / upsample_type | both "resnet" (a ResBlock resamples, as in the released models) or both "conv" (a 3x3 convolution, stride 2 down, after nearest 2x up) |
| down_block_types / up_block_types | per level AttnDownBlock2D, or ResnetDownsampleBlock2D ("resnet") / DownBlock2D ("conv"); the up types their mirror |
| downsample_padding | 1 with "conv" (the reference's padding); any with "resnet" (unused) |
| act_fn | "silu" (or its other name "swish") or "gelu", in every ResBlock (the embedding and output head keep SiLU, as in diffusers) |
| attention_head_dim | the head width: an int dividing every attention level's width |
| resnet_time_scale_shift | "default" or "scale_shift" |
| flip_sin_to_cos, freq_shift, center_input_sample | any (the reference: true, 0, false) |
| norm_num_groups | a divisor of every width (the reference: 32); attn_norm_num_groups the same, or none without scale-shift |
| time_embedding_type "positional", time_embedding_dim none or 4 x the first width, norm_eps 1e-5 | the reference's |
| mid_block_type "UNetMidBlock2D", mid_block_scale_factor 1, add_attention true, class_embed_type none | the reference's choices |
| num_train_timesteps | any (unused by the network) |
"""

from __future__ import annotations

# resampling -> (the down and up block types of a level without attention); AttnDown/UpBlock2D take either
RESAMPLE_BLOCKS = {"resnet": ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"), "conv": ("DownBlock2D", "UpBlock2D")}
# field -> the values cmfast computes exactly (a tuple), or None for any value
FIXED = {
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,),
    "downsample_type": tuple(RESAMPLE_BLOCKS),
    "upsample_type": tuple(RESAMPLE_BLOCKS),
    "act_fn": ("silu", "swish", "gelu"),
    "norm_eps": (1e-5,),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "add_attention": (True,),
    "class_embed_type": (None,),
}
ANY = {"sample_size", "in_channels", "out_channels", "layers_per_block", "dropout", "num_class_embeds",
       "downsample_padding", "num_train_timesteps", "block_out_channels", "down_block_types", "up_block_types",
       "attention_head_dim", "time_embedding_dim", "center_input_sample", "flip_sin_to_cos", "freq_shift",
       "norm_num_groups", "attn_norm_num_groups"}  # all but the first eight checked below
# diffusers' defaults for the fields a config may leave out (UNet2DModel's constructor)
DEFAULTS = {"center_input_sample": False, "time_embedding_type": "positional", "flip_sin_to_cos": True,
            "freq_shift": 0, "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
            "upsample_type": "conv", "act_fn": "silu", "norm_num_groups": 32, "attn_norm_num_groups": None,
            "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
            "attention_head_dim": 8, "layers_per_block": 2, "time_embedding_dim": None, "sample_size": None,
            "in_channels": 3, "out_channels": 3, "dropout": 0.0, "num_class_embeds": None, "downsample_padding": 1,
            "num_train_timesteps": None}
REQUIRED = ("block_out_channels", "down_block_types", "up_block_types")


def _refuse(field: str, value, supported: str) -> ValueError:
    return ValueError(f"diffusers config: {field}={value!r} is not supported by cmfast (supported: {supported}); "
                      "cmfast computes the consistency-model U-Net exactly and refuses what it would compute differently")


def _same(value, supported) -> bool:
    """JSON-equal: True is not 1, 1.0 is 1, None only None."""
    if supported is None or isinstance(supported, bool):
        return value is supported
    if isinstance(supported, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == supported
    return value == supported


def check(cfg: dict) -> dict:
    """cfg with diffusers' defaults filled in, if cmfast computes it exactly; else a ValueError naming the field,
    its value and what cmfast supports."""
    if not isinstance(cfg, dict):
        raise ValueError(f"diffusers config: expected a JSON object, got {type(cfg).__name__}")
    missing = [f for f in REQUIRED if f not in cfg]
    if missing:
        raise ValueError(f"diffusers config: missing field(s) {', '.join(missing)}")
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    unknown = sorted(set(cfg) - set(FIXED) - ANY)
    if unknown:
        raise ValueError(f"diffusers config: unknown field(s) {', '.join(unknown)} (a UNet2DModel of another diffusers "
                         "version?); cmfast does not guess what they change")
    for field, values in FIXED.items():
        if not any(_same(cfg[field], v) for v in values):
            raise _refuse(field, cfg[field], " or ".join(repr(v) for v in values))
    cfg["act_fn"] = "silu" if cfg["act_fn"] == "swish" else cfg["act_fn"]  # diffusers' two names of one function
    resample = cfg["downsample_type"]
    if cfg["upsample_type"] != resample:
        raise _refuse("upsample_type", cfg["upsample_type"], f"{resample!r}, as downsample_type (one way of resampling)")
    if resample == "conv" and not _same(cfg["downsample_padding"], 1):
        raise _refuse("downsample_padding", cfg["downsample_padding"], "1 (the reference's) with conv resampling")
    for field in ("center_input_sample", "flip_sin_to_cos"):
        if not isinstance(cfg[field], bool):
            raise _refuse(field, cfg[field], "true or false")
    if not isinstance(cfg["freq_shift"], int) or isinstance(cfg["freq_shift"], bool) or cfg["freq_shift"] < 0:
        raise _refuse("freq_shift", cfg["freq_shift"], "an int >= 0 below half the embedding width")
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    for field in ("layers_per_block", "in_channels", "out_channels"):
        if not positive_int(cfg[field]):
            raise _refuse(field, cfg[field], "a positive int")
    size = cfg["sample_size"]
    if not (size is None or positive_int(size) or (isinstance(size, (list, tuple)) and len(size) == 2
                                                   and size[0] == size[1] and positive_int(size[0]))):
        raise _refuse("sample_size", size, "a positive int, or [n, n]")
    if not (cfg["num_class_embeds"] is None or positive_int(cfg["num_class_embeds"])):
        raise _refuse("num_class_embeds", cfg["num_class_embeds"], "null or a positive int")
    dropout = cfg["dropout"]
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        raise _refuse("dropout", dropout, "a number in [0, 1)")
    groups = cfg["norm_num_groups"]
    if not isinstance(groups, int) or isinstance(groups, bool) or groups <= 0:
        raise _refuse("norm_num_groups", groups, "a positive int dividing every width")
    if cfg["attn_norm_num_groups"] is None and cfg["resnet_time_scale_shift"] != "default":
        # UNet2DModel's middle attention then has no GroupNorm at all
        raise _refuse("attn_norm_num_groups", None, f"{groups} (norm_num_groups), or None without scale-shift")
    if cfg["attn_norm_num_groups"] not in (None, groups):
        raise _refuse("attn_norm_num_groups", cfg["attn_norm_num_groups"], f"None or norm_num_groups ({groups})")
    widths = cfg["block_out_channels"]
    if not (isinstance(widths, (list, tuple)) and widths and all(isinstance(w, int) and w > 0 for w in widths)):
        raise _refuse("block_out_channels", widths, "a list of positive ints")
    if any(w % widths[0] for w in widths):
        raise _refuse("block_out_channels", widths, "multiples of the first width (the reference's channel_mult)")
    if any(w % groups for w in widths):
        raise _refuse("norm_num_groups", groups, f"a divisor of every width {list(widths)}")
    if cfg["freq_shift"] >= widths[0] // 2:
        raise _refuse("freq_shift", cfg["freq_shift"], f"an int below half the embedding width ({widths[0] // 2})")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    plain_down, plain_up = RESAMPLE_BLOCKS[resample]
    up_of = {plain_down: plain_up, "AttnDownBlock2D": "AttnUpBlock2D"}
    if len(down) != len(widths) or any(t not in up_of for t in down):
        raise _refuse("down_block_types", down, f"one of {', '.join(up_of)} per width (downsample_type {resample!r})")
    if up != [up_of[t] for t in reversed(down)]:
        raise _refuse("up_block_types", up, f"the mirror of down_block_types: {[up_of[t] for t in reversed(down)]}")
    head = cfg["attention_head_dim"]
    attention_widths = [w for w, t in zip(widths, down) if t.startswith("Attn")] + [widths[-1]]  # + the middle block
    if not isinstance(head, int) or head <= 0 or any(w % head for w in attention_widths):
        raise _refuse("attention_head_dim", head, f"a head width dividing every attention width {attention_widths}")
    if cfg["time_embedding_dim"] not in (None, 4 * widths[0]):
        raise _refuse("time_embedding_dim", cfg["time_embedding_dim"], f"None or {4 * widths[0]}")
    return cfg
