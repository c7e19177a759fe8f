"""The attention op, read straight from the packed qkv: every backend against the reference over the real
ADM shapes (T = 64, 256, 1024 tokens, heads of 64), reduced for Triton's interpreter, plus head dims 32 and
128, odd token counts, T = 1, layouts and bad input."""

import importlib
import math

import pytest
import torch
from checks import assert_matches
from conftest import backend_params, shape_id, with_shapes

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
    out = torch.full(A.attention_output(qkv).shape, float("nan"), dtype=qkv.dtype, device=qkv.device)
    A.attention_reference_out(qkv, heads, out)
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
    A.attention_reference_out(qkv, heads, out)
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device, backend, shape", with_shapes(backend_params(A.IMPLEMENTED), shapes_for))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kernels_match_reference(device, backend, shape, dtype, layout, gen):
    qkv, heads = make(shape, dtype, device, gen, layout == "channels_last")
    out = torch.full(A.attention_output(qkv).shape, float("nan"), dtype=dtype, device=device)
    if layout == "channels_last":
        out = out.to(memory_format=torch.channels_last)
    A.kernel(backend)(qkv, heads, out)
    assert not out.isnan().any(), "unwritten output"
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
@pytest.mark.parametrize("shape", [(5, 33, 70), (1, 1, 1), (2, 64, 1024), (3, 1024, 32)], ids=shape_id)
def test_cpu_tile_transpose(dtype, shape, gen):
    """cmfast._C.transpose_last2, which the CPU torch backend uses around SDPA in NCHW: tiles cut at odd sizes too."""
    from cmfast._extension import compiled

    src = torch.randn(shape, generator=gen).to(dtype)
    out = torch.full((shape[0], shape[2], shape[1]), float("nan"), dtype=dtype)
    compiled.transpose_last2(src, out)
    assert torch.equal(out, src.transpose(1, 2))
    with pytest.raises(RuntimeError, match="expected a contiguous"):
        compiled.transpose_last2(torch.zeros(2, 3, 4, dtype=dtype), torch.zeros(2, 3, 4, dtype=dtype))


# Odd head dims (12, 15: padded to the microkernel's 8 channels; 15 has no bf16 pairs) beside the shapes above.
ODD_HEADS = [(1, 36, 3, 5, 3), (2, 30, 2, 3, 2)]


def cpu_kernel_runs(kernel):
    from cmfast._extension import compiled

    if not cmfast.extension.cpu:
        pytest.skip(cmfast.extension.reason or "no cmfast._C")
    if kernel not in compiled.attention_cpu_kernels():
        needs = {"f32": "AVX-512", "bf16": "AVX-512 and AVX512_BF16", "amx": "AVX512_BF16 and AMX-BF16"}[kernel]
        pytest.skip(f"this CPU cannot run the {kernel} attention kernel (needs {needs})")
    return compiled


def misaligned_like(t):
    """t's values in a tensor of its layout whose data starts one element past an aligned address."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    if t.is_contiguous():
        return flat.view(t.shape).copy_(t)
    return flat.view(t.permute(0, 2, 3, 1).shape).permute(0, 3, 1, 2).copy_(t)


# The head dims each kernel takes: any (f32), even (bf16 pairs), multiples of 32 (a tile row of 32 bf16, amx).
HEAD_DIM_STEP = {"f32": 1, "bf16": 2, "amx": 32}


@pytest.mark.parametrize("kernel, dtype", [("f32", d) for d in DTYPES] + [("bf16", torch.bfloat16),
                                                                          ("amx", torch.bfloat16)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "misaligned"])
def test_cpu_kernels_match_reference(kernel, dtype, layout, gen):
    """Each CPU kernel by name (the op picks one per dtype, head dim and CPU): the f32 one on every dtype (bfloat16 on
    CPUs without AVX512_BF16 takes it), the bf16 and amx ones on bfloat16, over the real and edge shapes and odd head
    dims (those each kernel takes)."""
    compiled = cpu_kernel_runs(kernel)
    shapes = [s for s in REAL + EDGE + ODD_HEADS if (s[1] // s[4]) % HEAD_DIM_STEP[kernel] == 0]
    assert shapes
    for shape in shapes:
        qkv, heads = make(shape, dtype, "cpu", gen, channels_last=layout == "channels_last")
        out = torch.full(A.attention_output(qkv).shape, float("nan"), dtype=dtype)
        if layout == "channels_last":
            out = out.to(memory_format=torch.channels_last)
        if layout == "misaligned":
            qkv, out = misaligned_like(qkv), misaligned_like(out)
        compiled.attention_cpu(qkv, heads, out, kernel)
        assert not out.isnan().any(), f"unwritten output at {shape}"
        close(out, reference(qkv, heads), dtype)


@pytest.mark.parametrize("head_dim", [64, 16], ids=lambda d: f"head_dim{d}")
def test_cpu_op_picks_its_kernel(head_dim, gen):
    """The registered CPU op on bfloat16: AMX tiles where the CPU has them and the head dim is a multiple of 32, else
    bf16 dot products where the CPU has them, else fp32 arithmetic; registered at all only where the CPU runs the
    f32 kernel (AVX-512)."""
    compiled = cpu_kernel_runs("f32")
    assert "cpu" in A.IMPLEMENTED
    qkv, heads = make((1, 2 * head_dim, 8, 8, 2), torch.bfloat16, "cpu", gen)
    by_kernel = {}
    for kernel in compiled.attention_cpu_kernels():
        if head_dim % HEAD_DIM_STEP[kernel] == 0:
            by_kernel[kernel] = A.attention_output(qkv)
            compiled.attention_cpu(qkv, heads, by_kernel[kernel], kernel)
    out = A.attention_output(qkv)
    torch.ops.cmfast_C.attention(qkv, heads, out)
    picked = next(k for k in ("amx", "bf16", "f32") if k in by_kernel)
    assert torch.equal(out, by_kernel[picked])
    if picked != "f32":  # so that the comparison above tells bf16 products from fp32 ones
        assert not torch.equal(by_kernel["f32"], by_kernel[picked])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c, q, o: c.attention_cpu(q, 2, o, "f16"), "cannot run the f16 kernel"),
        (lambda c, q, o: c.attention_cpu(q, 2, o, "bf16"), "takes bfloat16"),
        (lambda c, q, o: c.attention_cpu(q.bfloat16(), 4, o.bfloat16(), "amx"),  # head dim 16
         "takes bfloat16 tensors with a head dim that is a multiple of 32|cannot run the amx kernel"),
        (lambda c, q, o: c.attention_cpu(q, 3, o, "f32"), "does not divide"),
        (lambda c, q, o: c.attention_cpu(q, 2, o[:, :32], "f32"), "expected shape"),
        (lambda c, q, o: c.attention_cpu(q, 2, o.double(), "f32"), "expected dtype"),
        (lambda c, q, o: c.attention_cpu(q.double(), 2, o.double(), "f32"), "unsupported dtype"),
        (lambda c, q, o: c.attention_cpu(q, 2, o.to(memory_format=torch.channels_last), "f32"), "both contiguous"),
        (lambda c, q, o: c.attention_cpu(q[:, :, ::2], 2, o[:, :, ::2], "f32"), "both contiguous"),
    ],
)
def test_cpu_kernel_rejects(call, message, gen):
    compiled = cpu_kernel_runs("f32")
    qkv, _ = make((1, 64, 4, 4, 2), torch.float32, "cpu", gen)
    out = torch.full(A.attention_output(qkv).shape, float("nan"))
    with pytest.raises(RuntimeError, match=message):
        call(compiled, qkv, out)
    assert out.isnan().all()  # nothing written
