"""`karras_sample` with the signature and meaning of the reference implementation's function of that name
(openai/consistency_models, cm/karras_diffusion.py), so that a script calling it changes one import.

    from cm.karras_diffusion import karras_sample   ->   from cmfast import karras_sample

The arguments mean what they mean there: `diffusion` is the reference's KarrasDenoiser (its sigma_data, sigma_min,
rho and `distillation`: consistency scalings when true, the EDM teacher's otherwise); `model` the network, called as
model(x, t, **model_kwargs), run through cmfast's U-Net (a reference UNetModel is swapped once, cmfast.swap, and the
copy reused while its weights are unchanged); `generator` the reference's generator object (anything with
.randn(*shape, device=) and .randn_like(x): its draws are made in the reference's order, so the same generator gives
the same images), a torch.Generator, or None (torch's global one). Samplers: onestep, multistep (with `ts`), heun
(with churn), euler; dpm, ancestral and progdist are refused by name.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from .consistency import Denoiser
from .schedules import karras_sigmas

SAMPLERS = ("onestep", "multistep", "heun", "euler")
NOT_HERE = ("dpm", "ancestral", "progdist")
_swapped: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class _Draws:
    """The generator argument as the reference uses it: randn(*shape, device=) and randn_like(x)."""

    def __init__(self, generator):
        self.generator = generator

    def randn(self, shape, device) -> torch.Tensor:
        g = self.generator
        if g is None or isinstance(g, torch.Generator):
            return torch.randn(shape, device=device, generator=g)
        return g.randn(*shape, device=device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        g = self.generator
        if g is None or isinstance(g, torch.Generator):
            return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=g)
        return g.randn_like(x)


def _cmfast_model(model):
    """The network as cmfast runs it: a cmfast.UNet (or a swapped diffusers one) as it is, a reference UNetModel
    swapped once (again after its weights change), any other callable as it is."""
    from .models import UNet, swap
    from .models.swap import DiffusersUNet

    if isinstance(model, (UNet, DiffusersUNet)) or not isinstance(model, nn.Module) or not hasattr(model, "input_blocks"):
        return model
    stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cached = _swapped.get(model)
    if cached is None or cached[0] != stamp:
        cached = _swapped[model] = (stamp, swap(model))
    return cached[1]


def _denoiser(diffusion, model, model_kwargs: dict) -> Denoiser:
    sigma_data = float(getattr(diffusion, "sigma_data", 0.5))
    sigma_min = float(getattr(diffusion, "sigma_min", 0.002))
    kind = "consistency" if getattr(diffusion, "distillation", True) else "edm"
    net = _cmfast_model(model)
    return Denoiser(lambda x, t, y=None: net(x, t, **model_kwargs), kind=kind, sigma_min=sigma_min,
                    sigma_data=sigma_data)


def karras_sample(diffusion, model, shape, steps, clip_denoised=True, progress=False, callback=None, model_kwargs=None,
                  device=None, sigma_min=0.002, sigma_max=80, rho=7.0, sampler="heun", s_churn=0.0, s_tmin=0.0,
                  s_tmax=float("inf"), s_noise=1.0, generator=None, ts=None) -> torch.Tensor:
    """Samples of `shape` in [-1, 1], as the reference's karras_sample draws them (see the module docstring)."""
    if sampler in NOT_HERE:
        raise ValueError(f"sampler: {sampler!r} is a sampler of the reference that cmfast does not have "
                         f"(cmfast has {', '.join(SAMPLERS)})")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if sampler == "multistep" and (ts is None or len(ts) < 2):
        raise ValueError(f"ts: the multistep sampler needs at least two grid indices, got {ts!r}")
    model_kwargs = dict(model_kwargs or {})
    draws = _Draws(generator)
    denoiser = _denoiser(diffusion, model, model_kwargs)
    x = draws.randn(tuple(shape), device) * sigma_max  # x_T, the first draw

    def denoise(x, sigma):
        with torch.no_grad():
            return denoiser(x, torch.full((x.shape[0],), float(sigma), device=x.device), clamp=clip_denoised)

    if sampler == "onestep":
        out = denoise(x, sigma_max)
    elif sampler == "multistep":
        out = _multistep(denoise, x, draws, ts, steps, sigma_min, sigma_max, float(getattr(diffusion, "rho", rho)),
                         progress)
    else:
        sigmas = karras_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).tolist() + [0.0]
        out = _ode(denoise, x, draws, sigmas, sampler == "heun", (s_churn, s_tmin, s_tmax, s_noise), progress,
                   callback)
    return out.clamp(-1, 1)


def _steps(n: int, progress: bool):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n))


def _multistep(denoise, x, draws, ts, steps, t_min, t_max, rho, progress):
    """Algorithm 1 on the reference's grid: jump to the origin at t(ts[i]), then re-noise to t(ts[i + 1]) (clipped to
    [t_min, t_max]); after the last jump too, as the reference does (no noise when ts ends at the grid's end)."""
    def t_of(index):
        return (t_max ** (1 / rho) + index / (steps - 1) * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho

    for i in _steps(len(ts) - 1, progress):
        x0 = denoise(x, t_of(ts[i]))
        t_next = min(max(t_of(ts[i + 1]), t_min), t_max)
        x = x0 + draws.randn_like(x) * math.sqrt(t_next**2 - t_min**2)
    return x


def _ode(denoise, x, draws, sigmas, heun: bool, churn, progress, callback):
    """Karras et al.'s Algorithm 2 (heun) or its Euler variant over `sigmas` (ending at 0): per step optional churn
    (a draw every step, as the reference makes it, used where gamma > 0), an Euler step, and for heun the trapezoid
    correction but on the last step."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    for i in _steps(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if heun:
            gamma = min(s_churn / (len(sigmas) - 1), math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
            eps = draws.randn_like(x) * s_noise
            sigma_hat = sigma * (gamma + 1)
            if gamma > 0:
                x = x + eps * math.sqrt(sigma_hat**2 - sigma**2)
        else:
            sigma_hat = sigma
        denoised = denoise(x, sigma_hat)
        slope = (x - denoised) / sigma_hat
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})
        x_next = x + slope * (sigma_next - sigma_hat)
        if heun and sigma_next != 0:
            slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (slope + slope_next) / 2 * (sigma_next - sigma_hat)
        x = x_next
    return x
