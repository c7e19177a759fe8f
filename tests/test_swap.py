"""Swap-in: cmfast.swap() takes a live model's weights and keeps its call signature and return type, inside
diffusers' ConsistencyModelPipeline too."""

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline
from reference_models import diffusers_unet, openai_style, randomize_

import cmfast
from cmfast.models import PRESETS, UNet


def pipeline(unet):
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0)
    pipe = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("steps", [{"num_inference_steps": 1}, {"timesteps": [22, 0]}], ids=["one-step", "two-step"])
def test_swap_inside_a_diffusers_pipeline(steps, gen):
    pipe = pipeline(diffusers_unet("test_imagenet", gen))
    labels = torch.tensor([0, 3, 9])

    def images():
        out = pipe(batch_size=3, class_labels=labels, generator=torch.Generator().manual_seed(7), output_type="np",
                   **steps)
        return torch.from_numpy(out.images)

    before = images()
    pipe.unet = cmfast.swap(pipe.unet)
    assert isinstance(pipe.unet.unet, cmfast.UNet)
    after = images()
    assert before.shape == (3, 16, 16, 3)
    assert (after - before).abs().max() <= 1e-5


def test_swapped_diffusers_unet_keeps_its_interface(gen):
    ref = diffusers_unet("test_lsun", gen)
    swapped = cmfast.swap(ref)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        want = ref(x, torch.tensor(100.0))
        got = swapped(x, torch.tensor(100.0))
        got_tuple = swapped(x, 100.0, return_dict=False)
    assert type(got) is type(want) and isinstance(got_tuple, tuple)
    assert float((got.sample - want.sample).abs().max() / want.sample.abs().max()) <= 1e-5
    assert torch.equal(got_tuple[0], got.sample)
    assert swapped.config == ref.config and swapped.dtype == ref.dtype and swapped.device == ref.device


def test_swap_an_openai_style_model(gen):
    """Anything with the openai key names (here a plain container of them) becomes a cmfast.UNet."""
    source = randomize_(UNet(PRESETS["test_lsun"].unet), gen).eval()
    swapped = cmfast.swap(openai_style(source, num_head_channels=32, image_size=16))
    assert isinstance(swapped, cmfast.UNet) and swapped.config == PRESETS["test_lsun"].unet
    x, t = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([5.0, 700.0])
    with torch.no_grad():
        assert torch.equal(swapped(x, t), source(x, t))


def test_swap_rejects_what_it_cannot_take():
    with pytest.raises(TypeError, match="^model: expected an nn.Module"):
        cmfast.swap("unet")
    with pytest.raises(ValueError, match="^model: has no parameters"):
        cmfast.swap(torch.nn.Identity())


def test_pipeline_moves_to_bfloat16_after_the_swap(gen):
    pipe = pipeline(diffusers_unet("test_imagenet", gen))
    pipe.unet = cmfast.swap(pipe.unet)
    pipe.to(torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.unet.unet.precision == "bf16"
    out = pipe(batch_size=2, class_labels=torch.tensor([1, 2]), generator=torch.Generator().manual_seed(3),
               num_inference_steps=1, output_type="pt").images
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out.float()).all()


def test_pipeline_saved_after_the_swap_loads_in_plain_diffusers(gen, tmp_path):
    from diffusers import UNet2DModel

    pipe = pipeline(diffusers_unet("test_imagenet", gen))
    labels = torch.tensor([0, 3])

    def images(p):
        return p(batch_size=2, class_labels=labels, generator=torch.Generator().manual_seed(7), output_type="pt",
                 num_inference_steps=1).images

    before = images(pipe)
    pipe.unet = cmfast.swap(pipe.unet)
    pipe.save_pretrained(tmp_path / "saved")
    index = __import__("json").loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    loaded = ConsistencyModelPipeline.from_pretrained(tmp_path / "saved")
    assert type(loaded.unet) is UNet2DModel  # plain diffusers, no cmfast inside
    loaded.set_progress_bar_config(disable=True)
    assert (images(loaded) - before).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="variant='fp16'"):
        pipe.unet.save_pretrained(tmp_path / "v", variant="fp16")


@pytest.mark.parametrize("call", [
    {"num_inference_steps": 1},
    {"timesteps": [22, 0]},
    {"timesteps": [30, 12, 0], "class_labels": [1, 2, 3]},
    {"num_inference_steps": 1, "class_labels": torch.tensor([4, 5, 6])},
    {"num_inference_steps": 1, "per_sample_generators": True},
    {"timesteps": [22, 0], "latents": True, "return_dict": False},
], ids=["one-step", "two-step", "three-step labels", "tensor labels", "generator list", "latents, tuple"])
def test_swapped_pipeline_same_call_same_images(call, gen):
    call = dict(call)
    pipe = pipeline(diffusers_unet("test_imagenet", gen))
    if call.pop("latents", False):
        call["latents"] = 80.0 * torch.randn(3, 3, 16, 16, generator=gen)
    per_sample = call.pop("per_sample_generators", False)

    def run(p):
        torch.manual_seed(5)  # the pipeline draws missing class labels from torch's global generator
        g = ([torch.Generator().manual_seed(s) for s in (1, 2, 3)] if per_sample
             else torch.Generator().manual_seed(11))
        out = p(batch_size=3, generator=g, output_type="pt", **call)
        return out[0] if call.get("return_dict") is False else out.images

    before = run(pipe)
    fast = cmfast.swap(pipe)
    assert fast.scheduler is pipe.scheduler and isinstance(fast.unet.unet, cmfast.UNet)
    steps = []
    torch.manual_seed(5)
    after = fast(batch_size=3, generator=torch.Generator().manual_seed(11), output_type="pt",
                 callback=lambda i, t, x: steps.append(i), **{k: v for k, v in call.items() if k != "return_dict"}) \
        if not per_sample and call.get("return_dict") is not False else None
    if after is not None:
        assert steps == list(range(len(call.get("timesteps", [0]))))
        after = after.images
    else:
        after = run(fast)
    assert after.shape == before.shape == (3, 3, 16, 16)
    assert (after - before).abs().max() <= 1e-5


def test_swapped_pipeline_moves_and_saves(gen, tmp_path):
    pipe = pipeline(diffusers_unet("test_imagenet", gen))
    fast = cmfast.swap(pipe)
    assert fast.to(torch.bfloat16) is fast and fast.unet.dtype == torch.bfloat16
    images = fast(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.bfloat16
    fast.to(torch.float32).save_pretrained(tmp_path / "p")
    assert ConsistencyModelPipeline.from_pretrained(tmp_path / "p").unet.__class__.__module__.startswith("diffusers")
