"""The attention op, read straight from the packed qkv: every backend against the reference over the real
ADM shapes (T = 64, 256, 1024 tokens, heads of 64), reduced for Triton's interpreter, plus head dims 32 and
128, odd token counts, T = 1, layouts and bad input."""

import importlib
import math

import pytest
import torch
from checks import assert_matches
from conftest import backend_params

import cmfast
from cmfast import ops
A = importlib.import_module("cmfast.ops.attention")  # the module; cmfast.ops.attention is the function

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Normwise relative error per dtype: the kernels accumulate in fp32 but may round probabilities to the storage
# type before the second matmul, as flash attention does.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (batch, C, H, W, heads)
REAL = [(1, 192, 32, 32, 3), (2, 384, 16, 16, 6), (2, 576, 8, 8, 9), (1, 768, 8, 8, 12)]
EDGE = [(2, 64, 5, 7, 2), (1, 128, 1, 1, 2), (2, 256, 3, 3, 2), (1, 96, 4, 4, 3),  # D = 32, 64, 128, 32
        (1, 64, 64, 64, 1)]  # T = 4096, the longest the op promises
INTERPRETER = [(1, 128, 4, 4, 2), (2, 64, 5, 7, 2), (1, 64, 1, 1, 1), (1, 256, 3, 5, 2), (1, 96, 9, 9, 3)]


def shapes_for(device, backend):
    return INTERPRETER if (backend == "triton" and device == "cpu") else REAL + EDGE


def make(shape, dtype, device, gen, channels_last=False):
    b, c, h, w, heads = shape
    qkv = torch.randn(b, 3 * c, h, w, generator=gen).to(dtype)
    if channels_last:
        qkv = qkv.to(memory_format=torch.channels_last)
    return qkv.to(device), heads


def reference(qkv, heads):
    out = torch.full(A.output_like(qkv).shape, float("nan"), dtype=qkv.dtype, device=qkv.device)
    A.reference_attention(qkv, heads, out)
    return out


def close(got, want, dtype):
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    assert err <= RTOL[dtype], f"relative error {err:.3g} > {RTOL[dtype]:g}"


def test_reference_is_the_textbook_formula(gen):
    qkv, heads = make((2, 128, 3, 4, 2), torch.float64, "cpu", gen)
    b, t, d = 2, 12, 64
    q, k, v = qkv.reshape(b, 3, heads, d, t).unbind(1)  # (three, head, d) channel order
    weights = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d), dim=-1)
    want = torch.einsum("bhts,bhds->bhdt", weights, v).reshape(b, heads * d, 3, 4)
    out = torch.empty(b, 128, 3, 4, dtype=torch.float64)
    A.reference_attention(qkv, heads, out)
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device, backend", backend_params(A.IMPLEMENTED))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kernels_match_reference(device, backend, dtype, layout, gen):
    for shape in shapes_for(device, backend):
        qkv, heads = make(shape, dtype, device, gen, layout == "channels_last")
        out = torch.full(A.output_like(qkv).shape, float("nan"), dtype=dtype, device=device)
        if layout == "channels_last":
            out = out.to(memory_format=torch.channels_last)
        A._impl(backend)(qkv, heads, out)
        assert not out.isnan().any(), f"unwritten output at {shape}"
        close(out, reference(qkv, heads), dtype)


@pytest.mark.parametrize("device, backend", backend_params(A.IMPLEMENTED))
@pytest.mark.parametrize("layout", ["strided_view", "channels_last", "tokens"])
def test_public_op_layouts(device, backend, layout, gen):
    qkv, heads = make((2, 128, 6, 8, 2), torch.float32, device, gen)
    if layout == "strided_view":
        qkv = qkv[:, :, ::2]
    elif layout == "channels_last":
        qkv = qkv.to(memory_format=torch.channels_last)
    else:
        qkv = qkv.flatten(2)
    with cmfast.use_backend({"attention": backend}):
        out = ops.attention(qkv, heads)
    close(out.contiguous(), reference(qkv.contiguous(), heads), torch.float32)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda q: ops.attention(q, 5), "^num_heads: expected a positive int dividing C"),
        (lambda q: ops.attention(q, 0), "^num_heads"),
        (lambda q: ops.attention(q[:, :100], 2), "^num_heads"),
        (lambda q: ops.attention(q.long(), 2), "^qkv: expected dtype"),
        (lambda q: ops.attention(q[0, 0], 2), "^qkv: expected at least 3"),
    ],
)
def test_bad_input(call, message, gen):
    qkv, _ = make((1, 128, 2, 2, 2), torch.float32, "cpu", gen)
    with pytest.raises((ValueError, TypeError), match=message):
        call(qkv)


@pytest.mark.skipif(not cmfast.extension.cpu, reason=cmfast.extension.reason or "no cmfast._C")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cpu_tile_transpose(dtype, gen):
    """cmfast._C.transpose_last2, which the CPU torch backend uses around SDPA in NCHW: tiles cut at odd sizes too."""
    from cmfast._extension import compiled

    for shape in [(5, 33, 70), (1, 1, 1), (2, 64, 1024), (3, 1024, 32)]:
        src = torch.randn(shape, generator=gen).to(dtype)
        out = torch.full((shape[0], shape[2], shape[1]), float("nan"), dtype=dtype)
        compiled.transpose_last2(src, out)
        assert torch.equal(out, src.transpose(1, 2))
    with pytest.raises(RuntimeError, match="expected a contiguous"):
        compiled.transpose_last2(torch.zeros(2, 3, 4, dtype=dtype), torch.zeros(2, 3, 4, dtype=dtype))
