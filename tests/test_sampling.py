"""Samplers and schedules: against diffusers' ConsistencyModelPipeline step for step, the schedule table of
docs/model.md, Heun against the exact ODE solution of a Gaussian, reproducibility, and bad input."""

import math

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline
from reference_models import diffusers_unet

import cmfast
from cmfast import schedules


# ---- schedules -------------------------------------------------------------------------------------------------

TUNED_MIDDLE_SIGMA = {  # checkpoint -> middle sigma of its tuned two-step schedule (docs/model.md section 2)
    "cd_imagenet64_l2": 1.3824, "ct_imagenet64": 1.9128, "cd_bedroom256_lpips": 4.3656,
    "cd_bedroom256_l2": 3.5197, "ct_bedroom256": 3.9912, "ct_cat256": 5.2485,
}


@pytest.mark.parametrize("checkpoint", TUNED_MIDDLE_SIGMA)
def test_tuned_two_step_schedules(checkpoint):
    sigmas = schedules.two_step_sigmas(checkpoint)
    assert sigmas.shape == (2,)
    assert sigmas[0].item() == pytest.approx(80.0, rel=1e-12)
    assert sigmas[1].item() == pytest.approx(TUNED_MIDDLE_SIGMA[checkpoint], abs=1e-4)


def test_karras_grid_end_points_and_formula():
    grid = schedules.karras_sigmas(40)
    assert grid[0].item() == pytest.approx(80.0, rel=1e-12) and grid[-1].item() == pytest.approx(0.002, rel=1e-12)
    i = 17
    want = (80 ** (1 / 7) + i / 39 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert grid[i].item() == pytest.approx(want, rel=1e-12)
    assert schedules.sigmas_from_indices([0, 22, 39], 40).tolist() == pytest.approx([80.0, 1.3824], abs=1e-4)


@pytest.mark.parametrize(
    "ts, steps, message",
    [([0, 22, 10], 40, "strictly ascending"), ([0, 22, 40], 40, r"in \[0, 39\]"), ([0, 22], 40, "last index"),
     ([39], 40, "at least two"), ([-1, 39], 40, r"in \[0, 39\]")],
)
def test_bad_index_schedules(ts, steps, message):
    with pytest.raises(ValueError, match=message):
        schedules.sigmas_from_indices(ts, steps)


# ---- against diffusers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [{"num_inference_steps": 1}, {"timesteps": [22, 0]}], ids=["one-step", "two-step"])
def test_matches_the_diffusers_pipeline(steps, gen):
    ref = diffusers_unet("test_imagenet", gen)
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0)
    pipe = ConsistencyModelPipeline(unet=ref, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(3, 3, 16, 16, generator=gen)
    labels = torch.tensor([1, 4, 8])
    seed = int(torch.randint(2**31, (1,), generator=gen))
    want = pipe(batch_size=3, class_labels=labels, latents=z.clone(), generator=torch.Generator().manual_seed(seed),
                output_type="pt", **steps).images
    # The pipeline's scheduler draws one noise tensor per step from its generator; the re-noising uses the first.
    twin = torch.Generator().manual_seed(seed)
    draws = [torch.randn(z.shape, generator=twin) for _ in range(2)]
    sigmas = [80.0] if "num_inference_steps" in steps else schedules.sigmas_from_indices([0, 22, 39], 40)
    denoiser = cmfast.Denoiser(cmfast.swap(ref).unet)
    x = cmfast.sample(denoiser, 80.0 * z, sigmas, y=labels, noise=draws[: len(sigmas) - 1])
    got = (x / 2 + 0.5).clamp(0, 1)
    assert (got - want).abs().max() <= 1e-5


# ---- the samplers on problems with known answers ---------------------------------------------------------------


class Counting:
    """A network that outputs a constant; counts its calls."""

    def __init__(self, value=0.0):
        self.value, self.calls = value, 0

    def __call__(self, x, t, y=None):
        self.calls += 1
        return torch.full_like(x, self.value)


def test_heun_solves_the_gaussian_ode():
    """With F = 0 the EDM denoiser is D = x sd^2/(s^2 + sd^2), exact for data N(0, sd^2); the probability-flow
    ODE then carries x(T) to x(T) sd / sqrt(T^2 + sd^2). Heun's error falls as the square of the step."""
    x_t = 80.0 * torch.randn(2, 3, 4, 4, dtype=torch.float64).float()
    want = x_t * 0.5 / math.sqrt(80.0**2 + 0.25)
    net = Counting()
    errors = []
    for n in (40, 80):
        got = cmfast.sample_heun(cmfast.Denoiser(net, kind="edm"), x_t, schedules.karras_sigmas(n, sigma_min=0.01),
                                 clip=False)
        errors.append(float((got - want).abs().max() / want.abs().max()))
    assert net.calls == (2 * 40 - 1) + (2 * 80 - 1)
    assert errors[1] < 4e-3 and errors[1] < errors[0] / 3.5  # second order: ~4x smaller per halving


def test_consistency_sampler_steps_and_callback(gen):
    net = Counting(0.3)
    denoiser = cmfast.Denoiser(net)
    x = 80.0 * torch.randn(2, 3, 4, 4, generator=gen)
    seen = []
    noise = [torch.randn_like(x), torch.randn_like(x)]
    out = cmfast.sample(denoiser, x, [80.0, 5.0, 0.5], noise=noise, callback=lambda d: seen.append(d["sigma"]))
    assert net.calls == 3 and seen == [80.0, 5.0, 0.5]
    # the last step by hand: x at 0.5 came from the step at 5.0, whose output is known in closed form
    x0_at_5 = denoiser(denoiser(x, 80.0, clamp=True) + math.sqrt(25 - 0.002**2) * noise[0], 5.0, clamp=True)
    x_at_half = x0_at_5 + math.sqrt(0.25 - 0.002**2) * noise[1]
    assert torch.allclose(out, denoiser(x_at_half, 0.5, clamp=True), atol=1e-6)


def test_seeded_noise_is_batch_invariant():
    gens = cmfast.generators_for(123, range(5))
    whole = cmfast.sampling.randn((5, 3, 8, 8), gens, "cpu")
    parts = torch.cat([cmfast.sampling.randn((2, 3, 8, 8), cmfast.generators_for(123, range(2)), "cpu"),
                       cmfast.sampling.randn((3, 3, 8, 8), cmfast.generators_for(123, range(2, 5)), "cpu")])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, cmfast.sampling.randn((5, 3, 8, 8), cmfast.generators_for(124, range(5)), "cpu"))


def test_sampling_is_batch_invariant(gen):
    unet = cmfast.swap(diffusers_unet("test_lsun", gen))
    denoiser = cmfast.Denoiser(unet.unet)
    sigmas = [80.0, 2.0]

    def run(indices):
        gens = cmfast.generators_for(9, indices)
        x = 80.0 * cmfast.sampling.randn((len(indices), 3, 16, 16), gens, "cpu")
        return cmfast.sample(denoiser, x, sigmas, generator=gens)

    together = run(range(4))
    apart = torch.cat([run(range(2)), run(range(2, 4))])
    assert (together - apart).abs().max() <= 1e-5


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"sigmas": [1.0, 5.0]}, ValueError, "strictly decreasing"),
        ({"sigmas": []}, ValueError, "at least one"),
        ({"sigmas": [80.0, 0.001]}, ValueError, "sigma_min"),
        ({"sigmas": [80.0, 1.0], "noise": []}, ValueError, "expected 1 tensors"),
        ({"sigmas": [80.0, 1.0], "noise": [torch.zeros(1, 3, 4, 4)]}, ValueError, "shape of x"),
    ],
)
def test_bad_sampler_input(kwargs, error, message):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(error, match=message):
        cmfast.sample(cmfast.Denoiser(Counting()), x, **kwargs)


def test_sampler_kinds_are_not_mixed():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="use sample_heun"):
        cmfast.sample(cmfast.Denoiser(Counting(), kind="edm"), x, [80.0])
    with pytest.raises(ValueError, match="use sample"):
        cmfast.sample_heun(cmfast.Denoiser(Counting()), x, [80.0])
