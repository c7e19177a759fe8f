"""Denoiser(cuda_graph=True): replays give what the eager calls give, for new inputs each call, per signature;
outputs are not overwritten by later replays; CPU tensors and calls with gradients run eagerly."""

import pytest
import torch
from reference_models import randomize_

import cmfast
from cmfast.models import PRESETS


def tiny_unet(name: str, gen, device, dtype=None) -> cmfast.UNet:
    unet = randomize_(cmfast.UNet(PRESETS[name].unet), gen).to(device).eval()
    return unet.set_precision({torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32"))


def call_inputs(config, batch, gen, device):
    size = config.image_size
    x = (80 * torch.rand(batch, 1, 1, 1, generator=gen) * torch.randn(batch, 3, size, size, generator=gen)).to(device)
    sigma = (0.002 + 80 * torch.rand(batch, generator=gen)).to(device)
    y = torch.randint(config.num_classes, (batch,), generator=gen).to(device) if config.num_classes else None
    return x, sigma, y


def test_cpu_calls_run_eagerly(gen):
    unet = tiny_unet("test_imagenet", gen, "cpu")
    x, sigma, y = call_inputs(unet.config, 2, gen, "cpu")
    graphed, eager = cmfast.Denoiser(unet, cuda_graph=True), cmfast.Denoiser(unet)
    with torch.no_grad():
        assert torch.equal(graphed(x, sigma, y), eager(x, sigma, y))
    assert graphed.graphs.graphs == {} and "cuda_graph=True" in repr(graphed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ["test_imagenet", "test_lsun"])
def test_replays_match_eager_calls(name, dtype, gen):
    unet = tiny_unet(name, gen, "cuda", dtype)
    graphed, eager = cmfast.Denoiser(unet, cuda_graph=True), cmfast.Denoiser(unet)
    with torch.no_grad():
        results = []
        for batch in (2, 3, 2):  # a new signature, then the first one again with new values
            x, sigma, y = call_inputs(unet.config, batch, gen, "cuda")
            for s in (sigma, float(sigma[0])):  # a tensor, and a number (broadcast, not baked into the graph)
                for clamp in (False, True):
                    got, want = graphed(x, s, y, clamp=clamp), eager(x, s, y, clamp=clamp)
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
                    results.append((got, want))
        assert len(graphed.graphs.graphs) == 4  # batch 2 and 3, clamp or not; numbers and tensors share a graph
        for got, want in results:  # later replays did not overwrite what earlier calls returned
            assert torch.equal(got, want)


@pytest.mark.gpu
def test_sampling_through_graphs_matches_eager(gen):
    unet = tiny_unet("test_imagenet", gen, "cuda", torch.float16)
    x, _, y = call_inputs(unet.config, 4, gen, "cuda")
    x = 80 * x / x.std()
    outputs = []
    for cuda_graph in (True, False):
        noise = torch.Generator("cuda").manual_seed(7)
        with torch.no_grad():
            outputs.append(cmfast.sample(cmfast.Denoiser(unet, cuda_graph=cuda_graph), x, [80.0, 1.3824], y=y,
                                         generator=noise))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.gpu
def test_calls_with_gradients_run_eagerly(gen):
    unet = tiny_unet("test_imagenet", gen, "cuda")
    denoiser = cmfast.Denoiser(unet, cuda_graph=True)
    x, sigma, y = call_inputs(unet.config, 2, gen, "cuda")
    x.requires_grad_(True)
    denoiser(x, sigma, y).square().sum().backward()
    assert x.grad is not None and denoiser.graphs.graphs == {}


def test_sample_command_flag_gives_the_same_images(tmp_path):
    """`cmfast sample --cuda-graph` (here on the CPU: eager calls) writes what the plain command writes."""
    import numpy as np

    from cmfast.cli import main

    for name, flags in (("plain", []), ("graph", ["--cuda-graph"])):
        assert main(["sample", "--num", "3", "--seed", "5", "--steps", "2", "--out", str(tmp_path / name), *flags]) == 0
    with np.load(tmp_path / "plain" / "samples.npz") as a, np.load(tmp_path / "graph" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
