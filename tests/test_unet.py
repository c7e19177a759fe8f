"""The U-Net against diffusers' UNet2DModel with the same, fully random weights; the released architectures'
sizes and key sets; precision modes and layouts; bad input."""

import pytest
import torch
from reference_models import diffusers_unet

import cmfast
from cmfast.models import PRESETS, UNet, keymap

TINY = ["test_imagenet", "test_lsun"]
# Normwise relative error of the whole network against diffusers in fp32, per precision mode of cmfast.
TOLERANCE = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 5e-2}  # fp16/bf16: ~10x their unit roundoff


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def pair(name, gen, **load_kw):
    ref = diffusers_unet(name, gen)
    config = PRESETS[name].unet
    ours = cmfast.load(keymap.diffusers_to_openai(ref.state_dict(), config), config=config, **load_kw)
    return ref, ours, config


def inputs(config, gen, batch=3):
    size = config.image_size
    x = torch.randn(batch, config.in_channels, size, size, generator=gen)
    t = 250 * torch.log(torch.tensor([0.002, 1.3824, 80.0][:batch]))  # the time inputs of real sigmas
    y = torch.randint(0, config.num_classes, (batch,), generator=gen) if config.num_classes else None
    return x, t, y


@pytest.mark.parametrize("batch", [3, 1])  # 1: test_lsun's ResBlocks add the time embedding with the conv's bias
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", TINY)
def test_matches_diffusers(name, precision, batch, gen):
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    ref, ours, config = pair(name, gen, dtype=dtype)
    x, t, y = inputs(config, gen, batch)
    with torch.no_grad():
        want = ref(x, t, class_labels=y).sample
        got = ours(x, t, y)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) <= TOLERANCE[precision]


@pytest.mark.parametrize("batch", [3, 1])
@pytest.mark.parametrize("name", TINY)
def test_channels_last(name, batch, gen):
    ref, ours, config = pair(name, gen, channels_last=True)
    x, t, y = inputs(config, gen, batch)
    with torch.no_grad():
        assert rel_err(ours(x, t, y), ref(x, t, class_labels=y).sample) <= TOLERANCE["fp32"]


def test_fp16_mode_keeps_the_reference_parts_in_fp32():
    model = UNet(PRESETS["test_imagenet"].unet).set_precision("fp16")
    half = {n for n, p in model.named_parameters() if p.dtype == torch.float16}
    assert "input_blocks.0.0.weight" in half and "middle_block.1.qkv.weight" in half
    for n in ("time_embed.0.weight", "label_emb.weight", "out.2.weight", "out.0.weight",
              "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.in_layers.0.weight"):
        assert n not in half, n


def test_scalar_timestep_broadcasts(gen):
    _, ours, config = pair("test_lsun", gen)
    x, _, _ = inputs(config, gen)
    with torch.no_grad():
        assert torch.equal(ours(x, torch.tensor(500.0)), ours(x, torch.full((3,), 500.0)))


# ---- the released architectures, built on the meta device -------------------------------------------------

FULL = {"imagenet64": ("cd_imagenet64_l2", 295_899_267, 541), "lsun256": ("ct_bedroom256", 526_304_771, 566)}


@pytest.mark.parametrize("family", FULL)
def test_released_sizes_and_keys(family):
    name, params, keys = FULL[family]
    with torch.device("meta"):
        ours = UNet(PRESETS[name].unet)
        ref = diffusers_unet(name, device="meta")
    state = ours.state_dict()
    assert sum(p.numel() for p in ours.parameters()) == params
    assert len(state) == keys
    # The key set and shapes of the reference, through diffusers' names (qkv recombined, 1x1 convs restored).
    mapped = keymap.diffusers_to_openai(ref.state_dict(), PRESETS[name].unet)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_imagenet64_shapes_of_the_spec():
    with torch.device("meta"):
        state = UNet(PRESETS["cd_imagenet64_lpips"].unet).state_dict()
    assert state["input_blocks.5.0.emb_layers.1.weight"].shape == (768, 768)
    assert state["input_blocks.5.0.skip_connection.weight"].shape == (384, 192, 1, 1)
    assert state["middle_block.1.qkv.weight"].shape == (2304, 768, 1, 1)


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("test")])
def test_every_preset_builds_and_is_inferred_back(name):
    with torch.device("meta"):
        state = UNet(PRESETS[name].unet).state_dict()
    assert cmfast.infer_config(state) == PRESETS[name].unet.replace(dropout=0.0)


# ---- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda x, t, y: (x[:, :2], t, y), ValueError, r"^x: expected shape \(batch, 3, H, W\)"),
        (lambda x, t, y: (x[:, :, :14, :14], t, y), ValueError, "^x: height and width must be multiples of 4"),
        (lambda x, t, y: (x.long(), t, y), TypeError, "^x: expected a floating-point"),
        (lambda x, t, y: (x, t[:2], y), ValueError, r"^timesteps: expected shape \(3,\)"),
        (lambda x, t, y: (x, t, None), ValueError, "^y: this model is class-conditional"),
        (lambda x, t, y: (x, t, y.clone().fill_(10)), ValueError, r"^y: class labels must lie in \[0, 10\)"),
        (lambda x, t, y: (x, t, y.clone().fill_(-1)), ValueError, r"^y: class labels must lie in \[0, 10\)"),
        (lambda x, t, y: (x, t, y.float()), ValueError, "^y: expected integer labels"),
    ],
)
def test_bad_input(change, error, message, gen):
    model = UNet(PRESETS["test_imagenet"].unet)
    x, t, y = inputs(PRESETS["test_imagenet"].unet, gen)
    with pytest.raises(error, match=message):
        model(*change(x, t, y))


def test_labels_given_to_an_unconditional_model(gen):
    model = UNet(PRESETS["test_lsun"].unet)
    x, t, _ = inputs(PRESETS["test_lsun"].unet, gen)
    with pytest.raises(ValueError, match="^y: this model is unconditional"):
        model(x, t, torch.zeros(3, dtype=torch.long))


# ---- the whole U-Net on each backend that runs here ------------------------------------------------------------

BACKEND_MIXES = {  # what runs each op; attention has no C++ kernel on the CPU (torch's SDPA on views serves it)
    "reference": {"group_norm": "reference", "attention": "reference"},
    "cpu": {"group_norm": "cpu", "attention": "torch"},
    "triton": {"group_norm": "triton", "attention": "triton"},
}


def mix_params():
    from cmfast import backends
    from cmfast.ops import IMPLEMENTED

    params = []
    for name, mix in BACKEND_MIXES.items():
        missing = [f"{op}={b}" for op, b in mix.items()
                   if b not in IMPLEMENTED[op] or not backends.availability(b, torch.device("cpu"))[0]]
        marks = [pytest.mark.skip(reason=f"not available here: {', '.join(missing)}")] if missing else []
        params.append(pytest.param(name, marks=marks))
    return params


@pytest.mark.parametrize("mix", mix_params())
@pytest.mark.parametrize("name", TINY)
def test_backends_match_diffusers(name, mix, gen):
    ref, ours, config = pair(name, gen, channels_last=mix == "cpu")
    x, t, y = inputs(config, gen, batch=2)
    with torch.no_grad(), cmfast.use_backend(BACKEND_MIXES[mix]):
        got = ours(x, t, y)
    with torch.no_grad():
        want = ref(x, t, class_labels=y).sample
    assert rel_err(got, want) <= TOLERANCE["fp32"]


# ---- the whole U-Net on the GPU backends (run when a GPU is lent) ----------------------------------------------

GPU_MIXES = {
    "cuda": {"group_norm": "cuda", "attention": "torch", "consistency": "cuda"},
    "triton": {"group_norm": "triton", "attention": "triton", "consistency": "triton"},
}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mix", list(GPU_MIXES))
@pytest.mark.parametrize("name", [*TINY, "cd_imagenet64_l2"])
def test_gpu_backends_match_diffusers(name, mix, precision, gen):
    """On the GPU, each backend mix in each precision mode against diffusers in fp32 on the CPU (the real
    ImageNet-64 architecture too: its widths, T = 64..1024 and 22 attention calls). TF32 off for fp32."""
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    ref, ours, config = pair(name, gen, dtype=dtype)
    x, t, y = inputs(config, gen, batch=2)
    with torch.no_grad():
        want = ref(x, t, class_labels=y).sample
    ours = ours.cuda()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad(), cmfast.use_backend(GPU_MIXES[mix]):
            got = ours(x.cuda(), t.cuda(), None if y is None else y.cuda()).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= TOLERANCE[precision], f"relative error {err:.3g} > {TOLERANCE[precision]:g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_upsample_is_torchs_nearest(layout, dtype, gen):
    from cmfast.models.upsample import upsample_nearest2x

    x = torch.randn(2, 5, 3, 4, generator=gen).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(2, 5, 3, 8, generator=gen).to(dtype)[..., ::2]
    got = upsample_nearest2x(x)
    assert torch.equal(got, torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    if layout == "channels_last":  # the layout is kept: no flip between the U-Net's ops
        assert got.is_contiguous(memory_format=torch.channels_last)
