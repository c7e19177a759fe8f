"""Zero-shot editing: the known part of the image is reproduced exactly (in the transform's space), the
transforms are orthogonal, denoising at sigma_min is the identity, interpolation ends at the end points, and
the masks."""

import pytest
import torch
from reference_models import diffusers_unet

import cmfast
from cmfast import editing, masks

SIGMAS = [80.0, 10.0, 1.0]


@pytest.fixture
def denoiser(gen):
    return cmfast.Denoiser(cmfast.swap(diffusers_unet("test_lsun", gen)).unet)


@pytest.fixture
def image(gen):
    return (torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1) * 0.9


def test_inpainting_keeps_the_known_pixels_exactly(denoiser, image, gen):
    mask = masks.glyph(16, "S")
    out = editing.inpaint(denoiser, image, mask, SIGMAS, generator=gen)
    known = mask.bool().expand_as(image)
    assert torch.equal(out[known], image[known])
    assert not torch.equal(out[~known], image[~known])  # and generates the rest


def test_colorization_keeps_the_luminance(denoiser, image, gen):
    out = editing.colorize(denoiser, image, SIGMAS, generator=gen)
    lum = torch.tensor(editing.LUMINANCE)
    lum = lum / lum.norm()
    assert torch.allclose(torch.einsum("bchw,c->bhw", out, lum), torch.einsum("bchw,c->bhw", image, lum), atol=1e-5)


@pytest.mark.parametrize("factor", [2, 4])
def test_super_resolution_keeps_the_patch_means(denoiser, image, gen, factor):
    low = torch.nn.functional.avg_pool2d(image, factor)
    out = editing.super_resolve(denoiser, low, SIGMAS, factor=factor, generator=gen)
    assert out.shape == image.shape
    assert torch.allclose(torch.nn.functional.avg_pool2d(out, factor), low, atol=1e-5)


@pytest.mark.parametrize("transform", [editing.Luminance(), editing.PatchMeans(4), editing.PatchMeans(8)],
                         ids=["luminance", "patch4", "patch8"])
def test_transforms_are_orthogonal(transform, gen):
    q = transform.q
    assert torch.allclose(q @ q.T, torch.eye(q.shape[0]), atol=1e-6)
    assert q[:, 0].sum() > 0
    x = torch.randn(2, 3, 16, 16, generator=gen)
    c = transform.apply(x)
    assert torch.allclose(c.norm(), x.norm(), rtol=1e-5)
    assert torch.allclose(transform.invert(c), x, atol=1e-5)


def test_first_axes_are_luminance_and_patch_mean():
    assert torch.allclose(editing.Luminance().q[:, 0], torch.tensor(editing.LUMINANCE) / torch.tensor(editing.LUMINANCE).norm())
    assert torch.allclose(editing.PatchMeans(8).q[:, 0], torch.full((64,), 1 / 8))


def test_denoising_at_sigma_min_is_the_identity(denoiser, image):
    assert torch.equal(editing.denoise(denoiser, image, 0.002), image)


def test_interpolation_end_points_are_the_one_step_samples(denoiser, gen):
    z0, z1 = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 16, 16, generator=gen)
    frames = editing.interpolate(denoiser, z0, z1, [0.0, 0.5, 1.0])
    assert frames.shape == (3, 2, 3, 16, 16)
    assert torch.equal(frames[0], cmfast.sample(denoiser, 80.0 * z0, [80.0]))
    assert torch.equal(frames[2], cmfast.sample(denoiser, 80.0 * z1, [80.0]))
    mid = editing.slerp(z0, z1, 0.5)
    assert torch.allclose(mid.flatten(1).norm(dim=1), z0.flatten(1).norm(dim=1), rtol=0.2)


def test_stroke_guided_starts_from_the_strokes(denoiser, image, gen):
    noise = [torch.randn_like(image) for _ in range(2)]
    out = editing.stroke_guided(denoiser, image, [20.0, 2.0], noise=noise)
    want = cmfast.sample(denoiser, image + 20.0 * noise[0], [20.0, 2.0], noise=noise[1:])
    assert torch.equal(out, want)


def test_masks():
    assert masks.box(8).sum() == 64 - 16 and masks.half(8, "left")[:, :4].all() and not masks.half(8, "left")[:, 4:].any()
    g = masks.glyph(32, "S")
    assert 0.05 < 1 - g.mean() < 0.5  # the letter covers a fair part of the image
    assert torch.equal(masks.from_spec("glyph:S", 32), g)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d, x: editing.inpaint(d, x, torch.ones(5, 5), SIGMAS), "^mask: shape"),
        (lambda d, x: editing.inpaint(d, x[0], torch.ones(16, 16), SIGMAS), r"^image: expected shape \(batch, C"),
        (lambda d, x: editing.colorize(d, x[:, :1], SIGMAS), r"^image: expected shape \(batch, 3"),
        (lambda d, x: editing.super_resolve(d, x, SIGMAS, factor=1), "^factor"),
        (lambda d, x: editing.interpolate(d, x, x[:1], [0.5]), "^z1: expected the shape"),
        (lambda d, x: editing.colorize(d, x, [1.0, 2.0]), "^sigmas: expected positive, strictly decreasing"),
    ],
)
def test_bad_input(denoiser, image, call, message):
    with pytest.raises(ValueError, match=message):
        call(denoiser, image)
