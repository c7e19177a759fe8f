"""Noise-level schedules (docs/model.md section 4): the Karras grid, the reference's index form, and the two-step
schedules the paper's authors tuned for each released checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0

# checkpoint -> (grid points, indices): the tuned two-step schedules (docs/model.md section 2).
TWO_STEP = {
    "cd_imagenet64_l2": (40, (0, 22, 39)),
    "cd_imagenet64_lpips": (40, (0, 22, 39)),
    "ct_imagenet64": (201, (0, 106, 200)),
    "cd_bedroom256_lpips": (40, (0, 17, 39)),
    "cd_bedroom256_l2": (40, (0, 18, 39)),
    "ct_bedroom256": (151, (0, 67, 150)),
    "ct_cat256": (151, (0, 62, 150)),
    "digits": (40, (0, 20, 39)),  # the built-in model: of 8, 12, ..., 32, index 20 recognised most (seeds 1, 2)
}


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> torch.Tensor:
    """The n-point Karras grid t(i) = (T^(1/rho) + i/(n-1) (eps^(1/rho) - T^(1/rho)))^rho, from sigma_max down to
    sigma_min (float64)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of grid points, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigmas_from_indices(ts: Sequence[int], steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                        rho: float = RHO) -> torch.Tensor:
    """The reference's multistep schedule: ascending indices `ts` into a grid of `steps` points, the last one
    steps - 1 (sigma_min, where the final noise is zero). Returns the levels the model is evaluated at,
    t(ts[0]), ..., t(ts[-2]): len(ts) - 1 network calls."""
    ts = [int(t) for t in ts]
    if len(ts) < 2:
        raise ValueError(f"ts: expected at least two indices (start and end), got {ts}")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"ts: indices must be strictly ascending, got {ts}")
    if ts[0] < 0 or ts[-1] >= steps:
        raise ValueError(f"ts: indices must lie in [0, {steps - 1}] for a grid of {steps} points, got {ts}")
    if ts[-1] != steps - 1:
        raise ValueError(f"ts: the last index must be {steps - 1} (sigma_min) for a grid of {steps} points, got {ts}")
    return karras_sigmas(steps, sigma_min, sigma_max, rho)[ts[:-1]]


def evenly_spaced_indices(steps: int, grid: int) -> tuple[int, ...]:
    """`steps` network calls spread evenly over a grid of `grid` points: indices 0 .. grid-1, steps + 1 of them."""
    if not 1 <= steps < grid:
        raise ValueError(f"steps: expected 1 <= steps < grid ({grid}), got {steps}")
    return tuple(round(i * (grid - 1) / steps) for i in range(steps + 1))


def two_step_sigmas(checkpoint: str) -> torch.Tensor:
    """The tuned two-step schedule of a released checkpoint, e.g. [80, 1.3824] for cd_imagenet64_l2."""
    if checkpoint not in TWO_STEP:
        raise ValueError(f"checkpoint: no tuned two-step schedule for {checkpoint!r}; known: {', '.join(TWO_STEP)}")
    steps, ts = TWO_STEP[checkpoint]
    return sigmas_from_indices(ts, steps)
