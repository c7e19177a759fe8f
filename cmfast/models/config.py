"""U-Net configurations: the ADM constructor's arguments, named presets for the released checkpoints
(docs/model.md section 2) and small test configs, and inference of a config from a state dict's shapes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


ACTIVATIONS = ("silu", "gelu")


@dataclass(frozen=True)
class UNetConfig:
    """The arguments of openai's UNetModel that shape the network. `attention_resolutions` are image sizes
    (32, 16, 8) as the reference's command line gives them; attention runs where image_size // ds matches.
    resblock_updown: resampling by a ResBlock (True, every released model) or by a 3x3 convolution (False: stride 2
    down; nearest 2x then the convolution up: the reference's Downsample/Upsample with conv_resample)."""

    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_classes: int | None = None
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    dropout: float = 0.0
    # What diffusers' UNet2DModel can set and the released models do not (the reference's values are the defaults):
    num_groups: int = 32  # of every GroupNorm
    freq_shift: int = 0  # the time embedding's frequencies exp(-ln(10000) i / (half - freq_shift))
    flip_sin_to_cos: bool = True  # [cos, sin] (the reference's order) or [sin, cos]
    center_input_sample: bool = False  # the network input mapped x -> 2x - 1 first
    activation: str = "silu"  # of every ResBlock: "silu" (the reference) or "gelu" (exact, not tanh-approximated)

    def __post_init__(self):
        def positive_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        def ints(v):
            return isinstance(v, tuple) and all(positive_int(i) for i in v)

        checks = {
            "model_channels": (positive_int, "a positive int"), "num_res_blocks": (positive_int, "a positive int"),
            "channel_mult": (lambda v: ints(v) and len(v) > 0, "a non-empty tuple of positive ints"),
            "image_size": (positive_int, "a positive int"), "in_channels": (positive_int, "a positive int"),
            "out_channels": (positive_int, "a positive int"), "attention_resolutions": (ints, "a tuple of positive ints"),
            "num_classes": (lambda v: v is None or positive_int(v), "None or a positive int"),
            "num_head_channels": (positive_int, "a positive int"), "num_groups": (positive_int, "a positive int"),
            "freq_shift": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
            "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                        "a number in [0, 1)"),
        }
        checks.update({name: (lambda v: isinstance(v, bool), "true or false") for name in
                       ("use_scale_shift_norm", "resblock_updown", "flip_sin_to_cos", "center_input_sample")})
        for name, (ok, expected) in checks.items():
            if not ok(getattr(self, name)):
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"image_size: {self.image_size} is not divisible by 2^(levels-1)")

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        """Per level: whether its blocks have attention (level l works at image_size / 2^l)."""
        return tuple(self.image_size // 2**level in self.attention_resolutions for level in range(len(self.channel_mult)))

    def replace(self, **changes) -> "UNetConfig":
        return dataclasses.replace(self, **changes)


IMAGENET64 = UNetConfig(model_channels=192, num_res_blocks=3, channel_mult=(1, 2, 3, 4), image_size=64,
                        num_classes=1000, use_scale_shift_norm=True)
LSUN256 = UNetConfig(model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4), image_size=256,
                     num_classes=None, use_scale_shift_norm=False)


@dataclass(frozen=True)
class Preset:
    name: str
    unet: UNetConfig
    kind: str  # "consistency" (CD/CT) or "edm" (the teacher)


def _presets() -> dict[str, Preset]:
    found = {}
    for family, unet in (("imagenet64", IMAGENET64), ("bedroom256", LSUN256), ("cat256", LSUN256)):
        for stem in ("edm_{}_ema", "cd_{}_l2", "cd_{}_lpips", "ct_{}"):
            name = stem.format(family)
            edm = name.startswith("edm")
            found[name] = Preset(name, unet.replace(dropout=0.1) if edm else unet, "edm" if edm else "consistency")
    # Small configs of the same two families for tests: every feature of the real ones, a fraction of the size.
    found["test_imagenet"] = Preset("test_imagenet", IMAGENET64.replace(
        model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2), image_size=16, attention_resolutions=(8, 4),
        num_classes=10, num_head_channels=16), "consistency")
    found["test_lsun"] = Preset("test_lsun", LSUN256.replace(
        model_channels=32, num_res_blocks=2, channel_mult=(1, 1, 2), image_size=16, attention_resolutions=(4,),
        num_head_channels=32), "consistency")
    # The built-in model (issue 7): trained by `make digits-model` on scikit-learn's digits, shipped in cmfast/data.
    found["digits"] = Preset("digits", UNetConfig(
        model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2), image_size=16, in_channels=1, out_channels=1,
        attention_resolutions=(4,), num_classes=10, num_head_channels=64, use_scale_shift_norm=True), "consistency")
    found["digits-teacher"] = Preset("digits-teacher", found["digits"].unet, "edm")  # its teacher, shipped beside it
    return found


PRESETS = _presets()


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"config: unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def infer_config(state_dict, num_head_channels: int = 64, image_size: int | None = None) -> UNetConfig:
    """The UNetConfig whose parameters have the shapes of `state_dict` (openai key names).

    The weights record neither the image size nor the head width: image_size comes from the released preset of
    the same architecture when there is one (else the size whose deepest level is 8 px, as in every released
    model); heads are num_head_channels wide (64 in every released model).
    """
    def shape(key):
        if key not in state_dict:
            raise KeyError(key)
        return tuple(state_dict[key].shape)

    c0 = shape("time_embed.0.weight")[1]
    in_channels = shape("input_blocks.0.0.weight")[1]
    out_channels = shape("out.2.weight")[0]
    num_classes = shape("label_emb.weight")[0] if "label_emb.weight" in state_dict else None
    # Output blocks: the last block of each level but the first ends with an upsampler (an up ResBlock, or the
    # Upsample's `conv`), so the blocks carrying one are num_res_blocks + 1 apart, the first at index num_res_blocks.
    n_out = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("output_blocks."))
    ups = [i for i in range(n_out) if any(k.startswith(f"output_blocks.{i}.{j}.in_layers")
                                          or k == f"output_blocks.{i}.{j}.conv.weight" for j in (1, 2) for k in state_dict)]
    num_res_blocks = ups[0] if ups else n_out - 1
    levels = n_out // (num_res_blocks + 1)
    first = [1 + level * (num_res_blocks + 1) for level in range(levels)]  # first input block of each level
    widths = [shape(f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in first]
    channel_mult = tuple(w // c0 for w in widths)
    attention = [f"input_blocks.{i}.1.qkv.weight" in state_dict for i in first]
    # the down block after level 0: a ResBlock (resblock_updown) or the Downsample's convolution `op`
    resblock_updown = levels == 1 or f"input_blocks.{first[0] + num_res_blocks}.0.op.weight" not in state_dict
    scale_shift = shape(f"input_blocks.{first[0]}.0.emb_layers.1.weight")[0] == 2 * widths[0]
    if image_size is None:
        image_size = 2 ** (levels - 1) * 8  # so that the deepest level is 8 px, as in every released model
        for p in PRESETS.values():
            if (p.unet.model_channels, p.unet.channel_mult, p.unet.num_res_blocks) == (c0, channel_mult, num_res_blocks):
                image_size = p.unet.image_size
                break
    return UNetConfig(
        model_channels=c0, num_res_blocks=num_res_blocks, channel_mult=channel_mult, image_size=image_size,
        in_channels=in_channels, out_channels=out_channels,
        attention_resolutions=tuple(image_size // 2**level for level, a in enumerate(attention) if a),
        num_classes=num_classes, num_head_channels=num_head_channels, use_scale_shift_norm=scale_shift,
        resblock_updown=resblock_updown,
    )
