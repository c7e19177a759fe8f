"""Every configuration of diffusers' UNet2DModel is computed exactly (fp32 within 1e-5 of diffusers, every weight
random) or refused at swap/load time with an error naming the field, its value and what cmfast supports: never
silently different."""

import json

import pytest
import torch
from diffusers import UNet2DModel
from reference_models import openai_style, randomize_

import cmfast
from cmfast.models import PRESETS, keymap

BASE = {k: v for k, v in keymap.diffusers_config(PRESETS["test_imagenet"].unet).items() if not k.startswith("_")}

# resampling by convolution: the level without attention has the plain blocks of that kind
CONV = {"downsample_type": "conv", "upsample_type": "conv",
        "down_block_types": ["DownBlock2D" if t.startswith("Resnet") else t for t in BASE["down_block_types"]],
        "up_block_types": ["UpBlock2D" if t.startswith("Resnet") else t for t in BASE["up_block_types"]]}
EXACT = {
    "released layout": {},
    "head width 8": {"attention_head_dim": 8},
    "head width 32": {"attention_head_dim": 32},
    "no scale-shift": {"resnet_time_scale_shift": "default"},
    "unconditional": {"num_class_embeds": None},
    "attn_norm_num_groups unset, no scale-shift": {"attn_norm_num_groups": None, "resnet_time_scale_shift": "default"},
    "defaults left out": {"_drop": ["freq_shift", "flip_sin_to_cos", "act_fn", "norm_eps", "center_input_sample"]},
    "16 groups": {"norm_num_groups": 16, "attn_norm_num_groups": 16},
    "8 groups, attention norm unset": {"norm_num_groups": 8, "attn_norm_num_groups": None,
                                       "resnet_time_scale_shift": "default"},
    "frequency shift 1": {"freq_shift": 1},
    "sin before cos": {"flip_sin_to_cos": False},
    "centred input": {"center_input_sample": True},
    "all four": {"norm_num_groups": 16, "attn_norm_num_groups": 16, "freq_shift": 1, "flip_sin_to_cos": False,
                 "center_input_sample": True},
    "GELU": {"act_fn": "gelu"},
    "swish (SiLU's other name)": {"act_fn": "swish"},
    "conv resampling": CONV,
    "conv resampling, GELU, no scale-shift": {**CONV, "act_fn": "gelu", "resnet_time_scale_shift": "default"},
}
REFUSED = {  # field -> a value diffusers builds and cmfast would compute differently
    "attn_norm_num_groups": None,  # with scale-shift: UNet2DModel's middle attention has no norm then
    "act_fn": "mish",
    "norm_eps": 1e-6,
    "upsample_type": "interpolation",
    "mid_block_scale_factor": 2,
    "add_attention": False,
    "attention_head_dim": None,
    "class_embed_type": "timestep",
    "time_embedding_type": "fourier",
}


def build(changes: dict, gen) -> UNet2DModel:
    config = dict(BASE)
    for field in changes.get("_drop", []):
        config.pop(field, None)
    config.update({k: v for k, v in changes.items() if k != "_drop"})
    if config.get("time_embedding_type") == "fourier":
        config["flip_sin_to_cos"] = False  # fourier features with the conversion's other choices
    return randomize_(UNet2DModel(**config), gen).eval()


@pytest.mark.parametrize("changes", EXACT.values(), ids=EXACT.keys())
def test_supported_configurations_are_exact(changes, gen):
    ref = build(changes, gen)
    ours = cmfast.swap(ref)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t = torch.tensor([10.0, -300.0])
    y = None if ref.config.num_class_embeds is None else torch.tensor([3, 9])
    with torch.no_grad():
        want, got = ref(x, t, class_labels=y).sample, ours(x, t, class_labels=y).sample
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.parametrize("field, value", REFUSED.items(), ids=REFUSED.keys())
def test_other_configurations_are_refused_by_name(field, value, gen, tmp_path):
    ref = build({field: value}, gen)
    with pytest.raises(ValueError, match=f"diffusers config: {field}={value!r} is not supported by cmfast"):
        cmfast.swap(ref)
    ref.save_pretrained(tmp_path / "m")  # and from a folder on disk: the same refusal
    with pytest.raises(ValueError, match=f"{field}={value!r} is not supported"):
        cmfast.load(tmp_path / "m")


def test_unknown_and_missing_fields(gen, tmp_path):
    ref = build({}, gen)
    ref.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "future_option": 3}))
    with pytest.raises(ValueError, match="unknown field.* future_option"):
        cmfast.load(tmp_path / "m")
    del config["block_out_channels"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing field.* block_out_channels"):
        cmfast.load(tmp_path / "m")


@pytest.mark.parametrize("changes, field, value", [
    ({**CONV, "upsample_type": "resnet", "up_block_types": BASE["up_block_types"]}, "upsample_type", "resnet"),
    ({**CONV, "downsample_padding": 0}, "downsample_padding", 0),
    ({"downsample_type": "conv"}, "upsample_type", "resnet"),
], ids=["conv down, resnet up", "conv with padding 0", "resnet blocks with conv down"])
def test_other_resampling_is_refused_by_name(changes, field, value, gen):
    with pytest.raises(ValueError, match=f"diffusers config: {field}={value!r} is not supported by cmfast"):
        cmfast.swap(build(changes, gen))


def test_down_and_up_types_must_mirror():
    from cmfast.models import diffusers_config

    with pytest.raises(ValueError, match="up_block_types"):
        diffusers_config.check({**BASE, "up_block_types": list(reversed(BASE["up_block_types"]))})
    with pytest.raises(ValueError, match="down_block_types"):
        diffusers_config.check({**BASE, "down_block_types": ["DownBlock2D"] + BASE["down_block_types"][1:]})
    with pytest.raises(ValueError, match="block_out_channels"):
        diffusers_config.check({**BASE, "block_out_channels": [32, 48, 64]})


def lsun_pair(gen, **attributes):
    from cmfast.models import UNet

    source = randomize_(UNet(PRESETS["test_lsun"].unet), gen).eval()
    return source, openai_style(source, image_size=16, **attributes)


def test_openai_heads_given_by_count_are_refused(gen):
    _, holder = lsun_pair(gen, num_heads=4, num_head_channels=-1)
    with pytest.raises(ValueError, match="num_head_channels=-1 with num_heads=4 .* one head width"):
        cmfast.swap(holder)


def test_openai_fp16_mode_is_kept(gen):
    _, holder = lsun_pair(gen, num_head_channels=32, dtype=torch.float16)  # what use_fp16=True sets
    assert cmfast.swap(holder).precision == "fp16"
    _, holder = lsun_pair(gen, num_head_channels=32, dtype=torch.float32)
    assert cmfast.swap(holder).precision == "fp32"


def test_swap_of_a_cmfast_unet_keeps_its_config_and_mode(gen):
    source, _ = lsun_pair(gen)
    source.set_precision("bf16")
    swapped = cmfast.swap(source)
    assert swapped.config == source.config and swapped.precision == "bf16"


def conv_resampling_pair(gen, **attributes):
    from cmfast.models import UNet

    config = PRESETS["test_imagenet"].unet.replace(resblock_updown=False)
    source = randomize_(UNet(config), gen).eval()
    return source, openai_style(source, image_size=16, num_head_channels=16, conv_resample=True, num_res_blocks=1,
                                channel_mult=(1, 2, 2), **attributes)


def test_openai_conv_resampling_is_recognised_from_its_keys(gen, tmp_path):
    source, holder = conv_resampling_pair(gen)
    assert "input_blocks.2.0.op.weight" in holder.state_dict() and "output_blocks.3.2.conv.weight" in holder.state_dict()
    swapped = cmfast.swap(holder)
    assert swapped.config == source.config
    cmfast.save(source, tmp_path / "m.pt")  # a bare state dict: the keys say how it resamples
    assert cmfast.load(tmp_path / "m.pt", num_head_channels=16).config == source.config


def test_openai_resampling_without_a_convolution_is_refused(gen):
    source, _ = conv_resampling_pair(gen)
    state = {k: v for k, v in source.state_dict().items() if ".op." not in k and ".conv." not in k}
    holder = torch.nn.Module()
    holder.state_dict = lambda: state
    holder.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    holder.conv_resample, holder.num_res_blocks, holder.channel_mult = False, 1, (1, 2, 2)
    with pytest.raises(ValueError, match="conv_resample=False with resblock_updown=False"):
        cmfast.swap(holder)


def test_gelu_is_noted_where_a_pt_cannot_record_it(gen, tmp_path):
    from cmfast.models import UNet, checkpoint

    model = UNet(PRESETS["test_lsun"].unet.replace(activation="gelu"))
    assert checkpoint.unrecorded(model) == {"activation": "gelu", "num_head_channels": 32}
    cmfast.save(model, tmp_path / "m.safetensors")  # recorded in the metadata
    assert cmfast.load(tmp_path / "m.safetensors").config.activation == "gelu"
