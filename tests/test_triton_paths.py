"""The Triton kernels' launch paths that the op tests' shapes do not reach with the default tunables: tunables
shrunk so small shapes take the looped and split group_norm paths and several attention tile shapes; statistics of
large groups far from zero; head dims that are not a power of two. Ground truth: the references in float64."""

import importlib

import pytest
import torch

from cmfast import backends

G = importlib.import_module("cmfast.ops.group_norm")
A = importlib.import_module("cmfast.ops.attention")
TRITON_ON_CPU = backends.availability("triton", torch.device("cpu"))[0]  # the interpreter
DEVICES = ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available()
           else ["cpu"] if TRITON_ON_CPU else [])
pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton cannot run here")


def group_norm_case(shape, groups, dtype, device, gen, channels_last=False, offset=0.5):
    b, c = shape[:2]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) + offset).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = [1 + 0.2 * torch.randn(c, generator=gen), 0.2 * torch.randn(c, generator=gen),
              0.5 * torch.randn(b, c, generator=gen), 0.5 * torch.randn(b, c, generator=gen)]
    out = torch.full_like(x, float("nan")).to(device)
    TG = importlib.import_module("cmfast.triton.group_norm")
    TG.group_norm(x.to(device), *(p.to(device) for p in params), groups, 1e-5, True, out)
    truth = G.group_norm_reference(x.double().contiguous(), *(p.double() for p in params), groups, 1e-5, True)
    return out.cpu().double(), truth


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("path, sms", [("looped", 1), ("split", 64)])
def test_group_norm_looped_and_split(device, dtype, rtol, layout, path, sms, gen, monkeypatch):
    """4 groups of 2 to 6 channels: tiles of 64 elements make them loop, or split with fewer pairs than SMs."""
    TG = importlib.import_module("cmfast.triton.group_norm")
    monkeypatch.setattr(TG, "BLOCK", 64)
    monkeypatch.setattr(TG, "MIN_SPLIT_ELEMENTS", 32)
    monkeypatch.setattr(TG, "SM_COUNT_INTERPRETED", sms)
    monkeypatch.setattr(TG, "sm_count", lambda device: sms)
    for shape in [(1, 8, 8, 8), (1, 20, 9, 11), (2, 24, 4, 4)]:
        out, truth = group_norm_case(shape, 4, dtype, device, gen, layout == "channels_last")
        assert not out.isnan().any(), f"unwritten output at {shape}"
        err = float((out - truth).abs().max() / truth.abs().max())
        assert err <= rtol, f"{shape}: relative error {err:.3g} > {rtol:g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_large_groups_far_from_zero(device, layout, gen):
    """Groups of 32k elements with mean 100 and std 1: a plain sum of squares in fp32 would lose ~3 digits."""
    out, truth = group_norm_case((1, 64, 128, 128), 32, torch.float32, device, gen, layout == "channels_last", 100.0)
    err = float((out - truth).abs().max() / truth.abs().max())
    assert err <= 1e-5, f"relative error {err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", [(16, 16), (64, 32), (128, 64)])
@pytest.mark.parametrize("shape", [(1, 96, 9, 9, 2), (2, 24, 5, 7, 3), (1, 128, 17, 9, 1)], ids=str)  # D = 48, 8, 128
def test_attention_tiles_and_head_dims(device, blocks, shape, gen, monkeypatch):
    TA = importlib.import_module("cmfast.triton.attention")
    monkeypatch.setattr(TA, "INTERPRETED_BLOCKS", blocks)
    b, c, h, w, heads = shape
    qkv = torch.randn(b, 3 * c, h, w, generator=gen).to(memory_format=torch.channels_last)
    out = torch.full(A.attention_output(qkv).shape, float("nan"), device=device).to(memory_format=torch.channels_last)
    TA.attention(qkv.to(device), heads, out)
    truth = torch.empty(out.shape, dtype=torch.float64)
    A.attention_reference_out(qkv.double(), heads, truth)
    assert not out.isnan().any()
    err = float((out.cpu().double() - truth).abs().max() / truth.abs().max())
    assert err <= 1e-5, f"relative error {err:.3g}"


def test_launch_helpers_match_triton():
    """The launchers' plain-Python cdiv / next_power_of_2 (triton's are slow host calls in Triton 3.9)."""
    import triton

    from cmfast.triton import cdiv, next_power_of_2

    for n in range(0, 3000):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for block in (1, 3, 16, 64, 128, 1024):
            assert cdiv(n, block) == triton.cdiv(n, block)
