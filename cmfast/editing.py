"""Zero-shot editing with a consistency model (paper Algorithm 4, docs/model.md section 5).

An edit is an orthogonal map A with a mask of the coordinates of A y that are KNOWN: each step denoises,
then puts the known coordinates of the reference image y back,
    x0 = A^T [ (A y) * known + (A f(x, t)) * (1 - known) ],
and re-noises to the next level. It starts from the erased image plus noise, y_erased + t_1 z (the paper's
start; the reference code starts from t_1 z alone, a difference of y_erased / t_1).
Images are (batch, C, H, W) in [-1, 1] (colorization needs C = 3). Every task takes sigmas, y (class labels), noise, generator and
callback as cmfast.sample does; `noise` lists every draw: the start noise first, then one per re-noising.
"""

from __future__ import annotations

import math

import torch

from .consistency import Denoiser
from .sampling import NoiseSource, check_denoiser, check_sigma, noise_levels, sample

LUMINANCE = (0.2989, 0.5870, 0.1140)


def orthogonal_with_first_column(v: torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix whose first column is v / |v| (QR of the identity with v in column 0, sign fixed so
    that column 0 sums > 0), in float32."""
    m = torch.eye(v.numel(), dtype=torch.float64)
    m[:, 0] = v.double() / v.double().norm()
    q = torch.linalg.qr(m).Q
    return (-q if q[:, 0].sum() < 0 else q).float()


class Transform:
    """The identity: pixels are the coordinates (inpainting). Subclasses change the basis."""

    fill = 0.0  # value of the unknown coordinates in the erased image

    def __init__(self, known: torch.Tensor):
        self.known = known

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def invert(self, c: torch.Tensor) -> torch.Tensor:
        return c

    def merge(self, y: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """A^T[(A y) * known + (A x0) * (1 - known)]."""
        known = self.known.to(x0)
        return self.invert(self.apply(y) * known + self.apply(x0) * (1 - known))

    def erase(self, y: torch.Tensor) -> torch.Tensor:
        known = self.known.to(y)
        return self.invert(self.apply(y) * known + self.fill * (1 - known))


class Pixels(Transform):
    fill = -1.0  # erased pixels are black, as in the reference


class Luminance(Transform):
    """Per pixel, a 3x3 orthogonal basis whose first axis is luminance; only luminance is known."""

    def __init__(self):
        self.q = orthogonal_with_first_column(torch.tensor(LUMINANCE))
        super().__init__(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))

    def apply(self, x):
        return torch.einsum("bchw,cd->bdhw", x, self.q.to(x))

    def invert(self, c):
        return torch.einsum("bdhw,cd->bchw", c, self.q.to(c))


class PatchMeans(Transform):
    """Per channel and p x p patch, a p^2 orthogonal basis whose first axis is the (scaled) patch mean; only
    the means are known (super-resolution)."""

    def __init__(self, patch: int):
        self.p = patch
        self.q = orthogonal_with_first_column(torch.ones(patch * patch))
        known = torch.zeros(patch * patch)
        known[0] = 1
        super().__init__(known)

    def _patches(self, x):  # (B, C, H, W) -> (B, C, H/p, W/p, p*p)
        b, c, h, w = x.shape
        p = self.p
        return x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // p, w // p, p * p)

    def _image(self, x):  # the inverse of _patches
        b, c, hp, wp, _ = x.shape
        p = self.p
        return x.reshape(b, c, hp, wp, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, hp * p, wp * p)

    def apply(self, x):
        return self._patches(x) @ self.q.to(x)

    def invert(self, c):
        return self._image(c @ self.q.to(c).T)


@torch.no_grad()
def edit(denoiser: Denoiser, image: torch.Tensor, transform: Transform, sigmas, *, y=None, noise=None,
         generator=None, callback=None) -> torch.Tensor:
    """Algorithm 4: consistency steps that keep the known coordinates of `image` under `transform`."""
    check_denoiser(denoiser, image, "consistency")
    levels = noise_levels(sigmas)
    source = NoiseSource(image, noise, generator, needed=len(levels))

    def denoise(i, x):  # denoise, then restore what is known
        x0 = transform.merge(image, denoiser(x, levels[i], y, clamp=True))
        if callback is not None:
            callback({"i": i, "sigma": levels[i], "x": x, "denoised": x0})
        return x0

    x0 = denoise(0, transform.erase(image) + levels[0] * source.next())
    for i in range(1, len(levels)):
        x0 = denoise(i, x0 + math.sqrt(levels[i] ** 2 - denoiser.sigma_min**2) * source.next())
    return x0


def _check_image(name, image, channels=None, *, in_range=True):
    """A (batch, C, H, W) floating-point tensor, finite, and (in_range) within the model's [-1, 1]."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or (channels and image.shape[1] != channels):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: expected shape (batch, {channels or 'C'}, H, W), got {got}")
    if not image.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor in [-1, 1], got {image.dtype}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{name}: holds NaN or infinite values")
    if in_range and image.numel() and (float(image.min()) < -1 - 1e-6 or float(image.max()) > 1 + 1e-6):
        raise ValueError(f"{name}: expected pixel values in [-1, 1] (the models' range), got "
                         f"[{float(image.min()):.4g}, {float(image.max()):.4g}]")


def inpaint(denoiser, image, mask, sigmas, **kw) -> torch.Tensor:
    """Fill the pixels where `mask` is 0; keep those where it is 1. mask: (H, W) or broadcastable to image."""
    _check_image("image", image)
    mask = torch.as_tensor(mask, dtype=image.dtype, device=image.device)
    try:
        known = torch.broadcast_to(mask, image.shape) if mask.dim() != 2 else mask.expand(image.shape)
    except RuntimeError:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not fit the image {tuple(image.shape)}") from None
    if not bool(((known == 0) | (known == 1)).all()):
        raise ValueError(f"mask: expected values 0 (to fill) and 1 (to keep), got values in "
                         f"[{float(known.min()):.4g}, {float(known.max()):.4g}]")
    return edit(denoiser, image, Pixels(known), sigmas, **kw)


def colorize(denoiser, image, sigmas, **kw) -> torch.Tensor:
    """Colour a grayscale image: its luminance is kept, chroma is generated (an RGB image is reduced to luminance)."""
    _check_image("image", image, channels=3)
    return edit(denoiser, image, Luminance(), sigmas, **kw)


def super_resolve(denoiser, low_res, sigmas, factor: int = 8, **kw) -> torch.Tensor:
    """Upscale by `factor`: the mean of every factor x factor patch of the result equals the low-res pixel."""
    _check_image("low_res", low_res)
    if not isinstance(factor, int) or factor < 2:
        raise ValueError(f"factor: expected an integer >= 2, got {factor!r}")
    image = torch.nn.functional.interpolate(low_res, scale_factor=factor, mode="nearest")
    return edit(denoiser, image, PatchMeans(factor), sigmas, **kw)


@torch.no_grad()
def stroke_guided(denoiser, strokes, sigmas, *, y=None, noise=None, generator=None, callback=None) -> torch.Tensor:
    """SDEdit-like generation from a stroke painting: noise it to sigmas[0] (below sigma_max), then sample."""
    _check_image("strokes", strokes)
    levels = noise_levels(sigmas)
    source = NoiseSource(strokes, noise, generator, needed=len(levels))
    x = strokes + levels[0] * source.next()
    rest = None if noise is None else list(noise)[1:]
    return sample(denoiser, x, levels, y=y, noise=rest, generator=generator, callback=callback)


@torch.no_grad()
def denoise(denoiser, noisy, sigma, *, y=None) -> torch.Tensor:
    """One call f(x, sigma) at the image's true noise level sigma."""
    _check_image("noisy", noisy, in_range=False)
    check_sigma("sigma", sigma, denoiser)
    return denoiser(noisy, sigma, y, clamp=True)


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation per sample: alpha = 0 gives z0 and alpha = 1 gives z1, exactly (the weights are
    sin(theta)/sin(theta) and sin(0)); parallel latents fall back to linear weights."""
    flat0, flat1 = z0.flatten(1).double(), z1.flatten(1).double()
    theta = torch.arccos(((flat0 * flat1).sum(1) / (flat0.norm(dim=1) * flat1.norm(dim=1))).clamp(-1, 1))
    sin = torch.sin(theta)
    parallel = sin < 1e-12
    w0 = torch.where(parallel, torch.full_like(sin, 1 - alpha), torch.sin((1 - alpha) * theta) / sin)
    w1 = torch.where(parallel, torch.full_like(sin, alpha), torch.sin(alpha * theta) / sin)
    shape = (-1,) + (1,) * (z0.dim() - 1)
    return (w0.view(shape) * z0.double() + w1.view(shape) * z1.double()).to(z0.dtype)


@torch.no_grad()
def interpolate(denoiser, z0, z1, alphas, *, y=None, sigma_max: float = 80.0) -> torch.Tensor:
    """One-step samples along the slerp between latents z0 and z1 (N(0, I)): (len(alphas), batch, C, H, W)."""
    _check_image("z0", z0, in_range=False)
    if z1.shape != z0.shape:
        raise ValueError(f"z1: expected the shape of z0 {tuple(z0.shape)}, got {tuple(z1.shape)}")
    return torch.stack([sample(denoiser, sigma_max * slerp(z0, z1, float(a)), [sigma_max], y=y) for a in alphas])
