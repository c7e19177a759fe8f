"""Consistency training (CT) and distillation (CD), paper Algorithms 3 and 2 (docs/model.md section 6), the EDM loss
for teachers, and the improved-CT options of Song & Dhariwal (2023): pseudo-Huber distance, lognormal choice of
the noise index, the doubling N schedule, and no target EMA (the target is the online network, gradient stopped).

Every step draws its randomness from a generator seeded by (seed, step), so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .consistency import Denoiser
from .schedules import karras_sigmas

METHODS = ("ct", "cd", "edm")
DISTANCES = ("l2", "l1", "pseudo_huber", "lpips")


# ---- schedules of the discretisation and the target EMA -----------------------------------------------------


def paper_n(k: int, total: int, s0: int = 2, s1: int = 150) -> int:
    """N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 (paper, CT)."""
    return math.ceil(math.sqrt(k / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def paper_target_ema(k: int, total: int, s0: int = 2, mu0: float = 0.95, s1: int = 150) -> float:
    """mu(k) = exp(s0 ln(mu0) / N(k)) (paper, CT)."""
    return math.exp(s0 * math.log(mu0) / paper_n(k, total, s0, s1))


def doubling_n(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2(s1/s0) + 1)) (improved CT)."""
    stage = max(1, total // (int(math.log2(s1 // s0)) + 1))
    return min(s0 * 2 ** (k // stage), s1) + 1


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """P(n) for the pair (sigmas[n], sigmas[n+1]) of an ascending grid: the lognormal mass between them."""
    cdf = torch.erf((torch.log(sigmas.double()) - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


# ---- distances -----------------------------------------------------------------------------------------------


def distance(a: torch.Tensor, b: torch.Tensor, kind: str, lpips=None) -> torch.Tensor:
    """Per-sample distance: l2 / l1 are means over the sample; pseudo_huber = sqrt(|a-b|^2 + c^2) - c with
    c = 0.00054 sqrt(dim); lpips calls the user's `lpips(a, b)` (cmfast ships no LPIPS weights)."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(diff.shape[1])
        return torch.sqrt(diff.pow(2).sum(1) + c * c) - c
    if kind == "lpips":
        if lpips is None:
            raise ValueError("distance: lpips needs the user's LPIPS network (lpips=callable(a, b) -> per-sample)")
        return lpips(a, b).reshape(a.shape[0])
    raise ValueError(f"distance: expected one of {', '.join(DISTANCES)}, got {kind!r}")


# ---- losses --------------------------------------------------------------------------------------------------


@dataclass
class Levels:
    """The noise levels of one step: the ascending grid, the chosen index n per sample, and its loss weight."""

    t_low: torch.Tensor  # sigma_n (the target's level)
    t_high: torch.Tensor  # sigma_{n+1} (the online network's level)
    weight: torch.Tensor


def draw_levels(batch: int, n_points: int, gen: torch.Generator, *, lognormal: bool, inverse_gap: bool,
                sigma_min=0.002, sigma_max=80.0, rho=7.0) -> Levels:
    sigmas = karras_sigmas(n_points, sigma_min, sigma_max, rho).flip(0)  # ascending
    if lognormal:
        n = torch.multinomial(lognormal_index_probs(sigmas), batch, replacement=True, generator=gen)
    else:
        n = torch.randint(0, n_points - 1, (batch,), generator=gen)
    low, high = sigmas[n], sigmas[n + 1]
    weight = 1.0 / (high - low) if inverse_gap else torch.ones_like(low)
    return Levels(low.float(), high.float(), weight.float())


def heun_step(teacher: Denoiser, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, y) -> torch.Tensor:
    """One Heun step of the teacher's probability-flow ODE from t to t_next (per-sample levels)."""
    view = (-1,) + (1,) * (x.dim() - 1)
    tv, nv = t.view(view), t_next.view(view)
    d = (x - teacher(x, t, y)) / tv
    x_euler = x + (nv - tv) * d
    d_next = (x_euler - teacher(x_euler, t_next, y)) / nv
    return x + (nv - tv) * (d + d_next) / 2


def consistency_loss(online: Denoiser, target: Denoiser, x0: torch.Tensor, y, levels: Levels,
                     noise: torch.Tensor, distance_kind: str, teacher: Denoiser | None = None, lpips=None):
    """CT (teacher None: x_t2 = x0 + t2 z) or CD (x_t2 from one Heun step of the teacher from x_t)."""
    view = (-1,) + (1,) * (x0.dim() - 1)
    x_high = x0 + levels.t_high.view(view) * noise
    with torch.no_grad():
        if teacher is None:
            x_low = x0 + levels.t_low.view(view) * noise
        else:
            x_low = heun_step(teacher, x_high, levels.t_high, levels.t_low, y)
        want = target(x_low, levels.t_low, y)
    got = online(x_high, levels.t_high, y)
    return (levels.weight * distance(got, want, distance_kind, lpips)).mean()


def edm_loss(denoiser: Denoiser, x0: torch.Tensor, y, gen: torch.Generator, p_mean=-1.2, p_std=1.2) -> torch.Tensor:
    """EDM's denoising loss: sigma ~ lognormal(p_mean, p_std), weight (sigma^2 + sd^2) / (sigma sd)^2."""
    sigma = torch.exp(p_mean + p_std * torch.randn(x0.shape[0], generator=gen))
    sd = denoiser.sigma_data
    noise = torch.randn(x0.shape, generator=gen)
    view = (-1,) + (1,) * (x0.dim() - 1)
    denoised = denoiser(x0 + sigma.view(view) * noise, sigma, y)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return (weight * (denoised - x0).flatten(1).pow(2).mean(1)).mean()


def step_generator(seed: int, step: int) -> torch.Generator:
    """The randomness of one training step, from (seed, step) alone."""
    state = np.random.SeedSequence([int(seed), int(step), 0xC0DE]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
