"""cmfast.karras_sample against the reference's algorithm (the formulas of Karras et al. and the consistency-model
paper, written out here) with the same draws from the same generator object, for every sampler cmfast has; the
refusals of those it lacks."""

import math
from types import SimpleNamespace

import pytest
import torch
from reference_models import openai_style, randomize_

import cmfast
from cmfast.models import PRESETS, UNet


class Recording:
    """A generator object of the reference's kind (randn(*shape, device=), randn_like(x)), recording its draws."""

    def __init__(self, seed):
        self.gen, self.draws = torch.Generator().manual_seed(seed), []

    def randn(self, *shape, device=None):
        z = torch.randn(shape, generator=self.gen).to(device or "cpu")
        self.draws.append(z)
        return z

    def randn_like(self, x):
        return self.randn(*x.shape, device=x.device)


CD = SimpleNamespace(sigma_data=0.5, sigma_min=0.002, rho=7.0, distillation=True)  # the reference's KarrasDenoiser
EDM = SimpleNamespace(sigma_data=0.5, sigma_min=0.002, rho=7.0, distillation=False)


@pytest.fixture
def unet(gen):
    return randomize_(UNet(PRESETS["test_imagenet"].unet), gen).eval().requires_grad_(False)


def scalings(sigma, distillation):
    eps = 0.002 if distillation else 0.0
    return 0.25 / ((sigma - eps) ** 2 + 0.25), (sigma - eps) * 0.5 / math.sqrt(sigma**2 + 0.25), 1 / math.sqrt(sigma**2 + 0.25)


def reference_denoise(unet, x, sigma, y, distillation=True, clip=True):
    """The reference's denoise: c_skip x + c_out F(c_in x, 250 ln sigma, y), clamped; in float64 scalings."""
    c_skip, c_out, c_in = scalings(sigma, distillation)
    t = torch.full((x.shape[0],), 250 * math.log(sigma + 1e-44))
    out = c_skip * x + c_out * unet(c_in * x, t, y).double().float()
    return out.clamp(-1, 1) if clip else out


def grid(index, steps, t_min=0.002, t_max=80.0, rho=7.0):
    return (t_max ** (1 / rho) + index / (steps - 1) * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho


SHAPE = (2, 3, 16, 16)
Y = torch.tensor([3, 7])


def test_onestep(unet):
    got = cmfast.karras_sample(CD, unet, SHAPE, 40, sampler="onestep", model_kwargs={"y": Y}, generator=Recording(1))
    z = Recording(1).randn(*SHAPE)
    with torch.no_grad():
        want = reference_denoise(unet, 80 * z, 80.0, Y).clamp(-1, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ts", [[0, 22, 39], [0, 10, 25], [0, 39]], ids=["ending at the grid end", "ending early",
                                                                          "one jump"])
def test_multistep_same_draws_same_images(unet, ts):
    rec = Recording(2)
    got = cmfast.karras_sample(CD, unet, SHAPE, 40, sampler="multistep", ts=ts, model_kwargs={"y": Y}, generator=rec)
    assert len(rec.draws) == len(ts)  # x_T, then one per jump: the reference's order
    ref = Recording(2)
    x = ref.randn(*SHAPE) * 80
    with torch.no_grad():
        for a, b in zip(ts, ts[1:]):
            x0 = reference_denoise(unet, x, grid(a, 40), Y)
            t_next = min(max(grid(b, 40), 0.002), 80.0)
            x = x0 + ref.randn_like(x) * math.sqrt(t_next**2 - 0.002**2)
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_multistep_matches_cmfast_sample(unet):
    """The same algorithm as cmfast.sample with the tuned schedule: the noise of its draws handed over."""
    rec = Recording(3)
    got = cmfast.karras_sample(CD, unet, SHAPE, 40, sampler="multistep", ts=[0, 22, 39], model_kwargs={"y": Y},
                               generator=rec)
    x_t, z, _ = rec.draws
    with torch.no_grad():
        want = cmfast.sample(cmfast.Denoiser(unet), 80 * x_t, cmfast.sigmas_from_indices([0, 22, 39], 40),
                             y=Y, noise=[z])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("churn", [0.0, 5.0], ids=["no churn", "churn"])
def test_heun(unet, churn):
    rec = Recording(4)
    got = cmfast.karras_sample(EDM, unet, SHAPE, 5, sampler="heun", s_churn=churn, model_kwargs={"y": Y},
                               generator=rec, clip_denoised=False)
    assert len(rec.draws) == 1 + 5  # x_T, then eps every step whether churn uses it or not
    ref = Recording(4)
    x = ref.randn(*SHAPE) * 80
    sigmas = [grid(i, 5) for i in range(5)] + [0.0]
    with torch.no_grad():
        for i in range(5):
            gamma = min(churn / 5, 2**0.5 - 1)
            eps = ref.randn_like(x)
            s_hat = sigmas[i] * (gamma + 1)
            if gamma > 0:
                x = x + eps * math.sqrt(s_hat**2 - sigmas[i] ** 2)
            d = (x - reference_denoise(unet, x, s_hat, Y, False, False)) / s_hat
            x_next = x + d * (sigmas[i + 1] - s_hat)
            if sigmas[i + 1] > 0:
                d2 = (x_next - reference_denoise(unet, x_next, sigmas[i + 1], Y, False, False)) / sigmas[i + 1]
                x_next = x + (d + d2) / 2 * (sigmas[i + 1] - s_hat)
            x = x_next
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    if churn == 0:
        with torch.no_grad():
            mine = cmfast.sample_heun(cmfast.Denoiser(unet, kind="edm"), 80 * rec.draws[0], sigmas[:-1], y=Y, clip=False)
        torch.testing.assert_close(got, mine.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_a_reference_style_model_is_swapped_once(unet):
    # input_blocks: what marks an openai UNetModel
    holder = openai_style(unet, input_blocks=torch.nn.ModuleList(), num_head_channels=16, image_size=16)
    from cmfast import karras

    first = cmfast.karras_sample(CD, holder, SHAPE, 40, sampler="onestep", model_kwargs={"y": Y}, generator=Recording(5))
    swapped = karras._swapped[holder][1]
    again = cmfast.karras_sample(CD, holder, SHAPE, 40, sampler="onestep", model_kwargs={"y": Y}, generator=Recording(5))
    assert karras._swapped[holder][1] is swapped and torch.equal(first, again)
    torch.testing.assert_close(first, cmfast.karras_sample(CD, unet, SHAPE, 40, sampler="onestep",
                                                           model_kwargs={"y": Y}, generator=Recording(5)))


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "dpm"}, "'dpm' is a sampler of the reference that cmfast does not have"),
    ({"sampler": "progdist"}, "does not have"),
    ({"sampler": "nonsense"}, "sampler: expected one of onestep, multistep, heun, euler"),
    ({"sampler": "multistep"}, "ts: the multistep sampler needs"),
    ({"steps": 0}, "steps: expected a positive int"),
])
def test_refusals(unet, kwargs, message):
    args = {"sampler": "onestep", "steps": 40, **kwargs}
    with pytest.raises(ValueError, match=message):
        cmfast.karras_sample(CD, unet, SHAPE, args.pop("steps"), model_kwargs={"y": Y}, **args)


def test_euler(unet):
    rec = Recording(6)
    got = cmfast.karras_sample(EDM, unet, SHAPE, 4, sampler="euler", model_kwargs={"y": Y}, generator=rec)
    assert len(rec.draws) == 1
    x = 80 * rec.draws[0]
    sigmas = [grid(i, 4) for i in range(4)] + [0.0]
    with torch.no_grad():
        for s, s_next in zip(sigmas, sigmas[1:]):
            x = x + (x - reference_denoise(unet, x, s, Y, False)) / s * (s_next - s)
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=1e-4, atol=1e-4)
