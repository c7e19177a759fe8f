"""A 3x3 convolution of a nearest-2x-upsampled image (cmfast/models/upsample.py): the sub-pixel way (four 2x2 phase
kernels on the image as it is) against the direct sum in float64 and against the reference's way, in both layouts
and precisions, with a shifted bias; its weights following the module's; the U-Net run that way against diffusers."""

import pytest
import torch
import torch.nn.functional as F
from reference_models import diffusers_unet

import cmfast
from cmfast import tuning
from cmfast.models import PRESETS, keymap, upsample
from cmfast.models.conv import Conv2d


def random_conv(cin, cout, dtype, layout, gen):
    conv = Conv2d(cin, cout, 3, padding=1)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.dim() > 1 else 3))
    conv = conv.to(dtype).requires_grad_(False)
    return conv.to(memory_format=torch.channels_last) if layout == "channels_last" else conv


def image(shape, dtype, layout, gen):
    x = torch.randn(shape, generator=gen).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("shifted", [False, True], ids=["bias", "bias+shift"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 32, 8, 8), (1, 3, 1, 1)], ids=str)
def test_subpixel_is_the_convolution_of_the_upsampled_image(shape, dtype, layout, shifted, gen):
    conv = random_conv(shape[1], 24, dtype, layout, gen)
    x = image(shape, dtype, layout, gen)
    shift = torch.randn(24, generator=gen) if shifted else None
    bias = conv._shifted_bias(shift) if shifted else conv.bias
    up = F.interpolate(x.double(), scale_factor=2, mode="nearest")
    want = F.conv2d(up, conv.weight.double(), bias.double(), padding=1)
    got = upsample._subpixel(conv, x, bias)
    assert got.dtype == dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last") or shape[2:] == (1, 1)
    direct = F.conv2d(upsample.upsample_nearest2x(x), conv.weight, bias.to(dtype), padding=1)
    err, direct_err = (got.double() - want).abs().max(), (direct.double() - want).abs().max()
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:  # the summed weights rounded to bf16 once more: within 2x the direct bf16 convolution's error
        assert err <= 2 * direct_err + 1e-2
    # the module's call picks one of the two ways (the fixed order here): the same values
    torch.testing.assert_close(upsample.conv_upsampled(conv, x, shift).double(), want,
                               **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)))


def test_phase_weights_follow_the_weights(gen):
    conv = random_conv(8, 8, torch.float32, "nchw", gen)
    x = image((1, 8, 4, 4), torch.float32, "nchw", gen)
    first = upsample._subpixel(conv, x, conv.bias)
    with torch.no_grad():
        conv.weight.mul_(2)  # in place: the cached phase kernels must be made again
    want = F.conv2d(upsample.upsample_nearest2x(x), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(upsample._subpixel(conv, x, conv.bias), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, want)


@pytest.fixture
def always_subpixel(monkeypatch):
    """The up convolutions the sub-pixel way whatever measurement would say; every other choice as it is."""
    choose = tuning.choose

    def forced(op, device, key, candidates, default, run, **kw):
        if op == "upsample_conv":
            return "subpixel", run("subpixel")
        return choose(op, device, key, candidates, default, run, **kw)

    monkeypatch.setattr(tuning, "choose", forced)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 2])
def test_the_unet_the_subpixel_way_matches_diffusers(always_subpixel, precision, batch, gen):
    ref = diffusers_unet("test_lsun", gen)
    config = PRESETS["test_lsun"].unet
    assert config.resblock_updown
    dtype = torch.bfloat16 if precision == "bf16" else None
    ours = cmfast.load(keymap.diffusers_to_openai(ref.state_dict(), config), config=config, dtype=dtype,
                       channels_last=precision == "bf16")
    x = torch.randn(batch, 3, config.image_size, config.image_size, generator=gen)
    t = torch.tensor([-1.5, 2.0][:batch])
    with torch.no_grad():
        want, got = ref(x, t).sample, ours(x, t)
    error = float((got - want).abs().max() / want.abs().max())
    assert error <= {"fp32": 1e-5, "bf16": 5e-2}[precision]
    ups = [m for m in ours.modules() if getattr(m, "up", False)]
    assert ups and all(m.in_layers[2]._phases is not None for m in ups)  # they did run the sub-pixel way
