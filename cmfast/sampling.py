"""The paper's samplers, each reading like its algorithm (docs/model.md section 4).

All share one signature: sample*(denoiser, x, sigmas, *, y=None, noise=None, generator=None, clip=True,
callback=None). `x` is the starting point at noise level sigmas[0] (e.g. sigma_max * z); `sigmas` are the levels
the network is evaluated at, from high to low, the clean image coming after the last. `noise` (a list of
tensors) replaces the random draws, for step-by-step comparison with other implementations; otherwise noise
comes from `generator`: one torch.Generator, or a list of them, one per sample, so that a sample's noise does
not depend on the batch it is in. `callback(info)` is called after every network evaluation with a dict
(i, sigma, x, denoised).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .consistency import Denoiser


def generators_for(seed: int, indices: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per sample index, seeded from (seed, index): sample i is the same in any batch."""
    gens = []
    for i in indices:
        state = np.random.SeedSequence([int(seed), int(i)]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


def labels_for(num_classes: int | None, indices, gens, given: list[int] | None, device) -> torch.Tensor | None:
    """Class labels of the samples `indices`: the given list cycled over the indices, or one drawn from each sample's
    generator (before its noise); None for an unconditional model."""
    if num_classes is None:
        return None
    if given:
        return torch.tensor([given[i % len(given)] for i in indices], device=device)
    return torch.cat([torch.randint(num_classes, (1,), generator=g, device=g.device) for g in gens]).to(device)


def randn(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """N(0, I) of `shape`; with a list of generators, row b of the batch comes from generator b alone."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: expected {shape[0]} generators (one per sample), got {len(generator)}")
        rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.stack(rows).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


class NoiseSource:
    """The noise of one sampling run: the given tensors in order, else fresh draws from the generator(s)."""

    def __init__(self, like: torch.Tensor, noise=None, generator=None, needed: int = 0):
        if noise is not None:
            noise = list(noise)
            if len(noise) != needed:
                raise ValueError(f"noise: expected {needed} tensors (one per re-noising step), got {len(noise)}")
            for i, z in enumerate(noise):
                if not isinstance(z, torch.Tensor) or z.shape != like.shape:
                    got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                    raise ValueError(f"noise: entry {i} must have the shape of x {tuple(like.shape)}, got {got}")
        self.noise, self.generator, self.like, self.used = noise, generator, like, 0

    def next(self) -> torch.Tensor:
        self.used += 1
        if self.noise is not None:
            return self.noise[self.used - 1].to(self.like)
        return randn(self.like.shape, self.generator, self.like.device, torch.float32).to(self.like.dtype)


SIGMA_MAX = 80.0  # the largest noise level the released models (and cmfast's own) were trained at


def noise_levels(sigmas, name="sigmas", sigma_max: float = SIGMA_MAX) -> list[float]:
    """Noise levels as floats: a list, tuple, 1-D tensor or array of positive, finite, strictly decreasing
    numbers, none above sigma_max."""
    if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__len__") or getattr(sigmas, "ndim", 1) != 1:
        got = f"a {sigmas.ndim}-D array" if getattr(sigmas, "ndim", 1) != 1 else f"{type(sigmas).__name__} {sigmas!r:.40}"
        raise ValueError(f"{name}: expected a sequence of noise levels (a list or 1-D tensor; one level: [sigma]), "
                         f"got {got}")
    try:
        values = [float(s) for s in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected numbers, got {list(sigmas)!r:.80}") from None
    if not values:
        raise ValueError(f"{name}: expected at least one noise level")
    if any(not math.isfinite(s) or s <= 0 for s in values) or any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name}: expected positive, strictly decreasing noise levels, got {values}")
    if values[0] > sigma_max * (1 + 1e-6):
        raise ValueError(f"{name}: levels must be <= sigma_max = {sigma_max} (the largest the models were trained "
                         f"at), got {values[0]}")
    return values


def check_sigma(name: str, sigma, denoiser) -> None:
    """One noise level (a number, or one per sample as a 1-D tensor) within [sigma_min, sigma_max], finite."""
    values = sigma.flatten().tolist() if isinstance(sigma, torch.Tensor) else [sigma]
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {sigma!r:.40}") from None
    bad = [v for v in values if not (math.isfinite(v) and denoiser.sigma_min <= v <= SIGMA_MAX)]
    if bad:
        raise ValueError(f"{name}: expected a noise level in [{denoiser.sigma_min}, {SIGMA_MAX}], got {bad[0]}")


def check_denoiser(denoiser, x, kind):
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser: expected a cmfast.Denoiser, got {type(denoiser).__name__}")
    if denoiser.kind != kind:
        other = "sample_heun" if kind == "consistency" else "sample"
        raise ValueError(f"denoiser: this sampler takes kind={kind!r} models, got {denoiser.kind!r}; use {other}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")


@torch.no_grad()
def sample(denoiser: Denoiser, x: torch.Tensor, sigmas, *, y=None, noise=None, generator=None, clip: bool = True,
           callback=None) -> torch.Tensor:
    """Multistep consistency sampling (paper Algorithm 1); one step when `sigmas` has one entry.

    `noise` holds len(sigmas) - 1 tensors, the z of each re-noising step."""
    check_denoiser(denoiser, x, "consistency")
    levels = noise_levels(sigmas)
    if levels[-1] < denoiser.sigma_min:
        raise ValueError(f"sigmas: levels must be >= sigma_min = {denoiser.sigma_min}, got {levels[-1]}")
    source = NoiseSource(x, noise, generator, needed=len(levels) - 1)

    def denoise(i, x):  # jump to the trajectory's origin
        x0 = denoiser(x, levels[i], y, clamp=clip)
        if callback is not None:
            callback({"i": i, "sigma": levels[i], "x": x, "denoised": x0})
        return x0

    x0 = denoise(0, x)
    for i in range(1, len(levels)):
        x = x0 + math.sqrt(levels[i] ** 2 - denoiser.sigma_min**2) * source.next()  # re-noise to the next level
        x0 = denoise(i, x)
    return x0


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas, *, y=None, noise=None, generator=None,
                clip: bool = True, callback=None) -> torch.Tensor:
    """Heun's second-order ODE solver (Karras et al. 2022, Algorithm 2, no churn) for the EDM teachers.

    `sigmas` are the grid levels; the solver ends with an Euler step to sigma = 0, so len(sigmas) levels cost
    2 len(sigmas) - 1 network calls. Deterministic: `noise` and `generator` are accepted for the shared
    signature and unused."""
    check_denoiser(denoiser, x, "edm")
    levels = noise_levels(sigmas) + [0.0]
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        denoised = denoiser(x, sigma, y, clamp=clip)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})
        d = (x - denoised) / sigma  # dx/dsigma of the probability-flow ODE
        x_next = x + (sigma_next - sigma) * d  # Euler step
        if sigma_next > 0:  # Heun's correction with the slope at the end of the step
            d_next = (x_next - denoiser(x_next, sigma_next, y, clamp=clip)) / sigma_next
            x_next = x + (sigma_next - sigma) * (d + d_next) / 2
        x = x_next
    return x
