"""The group_norm op (GroupNorm + optional scale/shift + SiLU): every backend against the reference over the
real ADM shapes (reduced for Triton's interpreter) and the edge cases; layouts; bad input."""

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from checks import assert_matches
from conftest import backend_params, with_shapes

import cmfast
from cmfast import ops
G = importlib.import_module("cmfast.ops.group_norm")  # the module; cmfast.ops.group_norm is the function

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, C, H, W): the ADM widths and resolutions, then the edge cases.
REAL = [(2, 192, 64, 64), (2, 384, 32, 32), (1, 576, 16, 16), (4, 768, 8, 8), (1, 768, 32, 32)]
EDGE = [(1, 64, 8, 8), (3, 96, 5, 7), (2, 96, 1, 1), (1, 32, 3, 3), (2, 160, 16, 16),  # C/32 = 2, 3, 3, 1, 5
        (1, 64, 20, 20)]  # channels_last: 400 pixels in two runs of the CPU kernel
INTERPRETER = [(1, 64, 8, 8), (3, 96, 5, 7), (2, 96, 1, 1), (2, 192, 4, 4)]
# GPU only: enough groups for one block each, each too large for the CUDA fused kernel's registers: the
# shared-memory kernel (fp16 and fp32, 16-byte and 1-element packets), or the two-stage one where it does not fit;
# then batch 1 with groups past a cluster's registers (8 x 32K fp16 elements): the two-stage kernels on sm_90 too
# (the batch-1 shapes above take the cluster kernel there).
GPU = [(4, 384, 64, 64), (3, 160, 64, 64), (4, 96, 45, 47), (1, 64, 384, 384), (4, 192, 32, 32), (1, 192, 64, 64),
       (16, 512, 32, 32)]


def shapes_for(device, backend):
    if backend == "triton" and device == "cpu":
        return INTERPRETER
    return REAL + EDGE + (GPU if device == "cuda" else [])


def make(shape, dtype, device, gen, channels_last=False, affine=True, modulated=True):
    b, c = shape[:2]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    args = {
        "weight": 1 + 0.2 * torch.randn(c, generator=gen) if affine else None,
        "bias": 0.2 * torch.randn(c, generator=gen) if affine else None,
        "scale": 0.5 * torch.randn(b, c, generator=gen) if modulated else None,
        "shift": 0.5 * torch.randn(b, c, generator=gen) if modulated else None,
    }
    return x.to(device), {k: None if v is None else v.to(device) for k, v in args.items()}


def reference(x, args, silu):
    out = torch.full_like(x, float("nan"))
    G.group_norm_reference_out(x, args["weight"], args["bias"], args["scale"], args["shift"], 32, 1e-5, silu, out)
    return out


def test_reference_is_torchs_groupnorm_chain(gen):
    x, args = make((2, 64, 6, 6), torch.float32, "cpu", gen)
    want = F.silu(F.group_norm(x, 32, args["weight"], args["bias"], 1e-5) * (1 + args["scale"][..., None, None])
                  + args["shift"][..., None, None])
    assert_matches(reference(x, args, True), want)


VARIANTS = {  # (affine, scale/shift, SiLU)
    "modulated silu": (True, True, True),  # ResBlock out_layers with scale-shift
    "silu": (True, False, True),  # in_layers
    "plain": (True, False, False),  # the attention's norm
    "no affine, modulated": (False, True, False),
}


@pytest.mark.parametrize("device, backend, shape", with_shapes(backend_params(G.IMPLEMENTED), shapes_for))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_kernels_match_reference(device, backend, shape, dtype, layout, variant, gen):
    """Each shape in each variant of the op the U-Net calls."""
    affine, modulated, silu = variant
    x, args = make(shape, dtype, device, gen, layout == "channels_last", affine, modulated)
    out = torch.full_like(x, float("nan"))  # poisoned: unwritten elements fail
    f32 = {k: None if v is None else v.float().contiguous() for k, v in args.items()}
    G.kernel(backend)(x, f32["weight"], f32["bias"], f32["scale"], f32["shift"], 32, 1e-5, silu, out)
    assert_matches(out, reference(x, args, silu), ulps=2, rtol=1e-5)


# The CUDA kernel each GPU test shape is meant to exercise (on sm_90; the cluster one is two-stage before that).
CUDA_PATHS = [
    ((4, 192, 32, 32), torch.float16, "fused"),  # 6K-element groups, 128 of them (64 would split on an H100)
    ((4, 384, 64, 64), torch.float16, "shared"),  # 96 KB groups, 128 of them: enough for the SMs of an A100/H100
    ((3, 160, 64, 64), torch.float32, "shared"),  # 80 KB
    ((1, 192, 64, 64), torch.float16, "cluster"),  # batch 1: 32 groups
    ((1, 64, 384, 384), torch.float16, "two-stage"),  # batch 1, 576 KB groups: past 8 blocks' registers
    ((16, 512, 32, 32), torch.float16, "fused"),  # 2048 packets a group (16 a thread), 512 groups
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype, path", CUDA_PATHS)
def test_cuda_kernel_paths(shape, dtype, path):
    """The CUDA plan sends the GPU test shapes to the kernels they are meant to exercise."""
    if not cmfast.extension.cuda:
        pytest.skip(cmfast.extension.reason or "cmfast._C has no CUDA part")
    from cmfast._extension import compiled

    x = torch.empty(shape, dtype=dtype, device="cuda")
    if path == "cluster" and (torch.cuda.get_device_capability()[0] < 9
                              or os.environ.get("CMFAST_GROUP_NORM_CLUSTER") == "0"):
        path = "two-stage"
    assert compiled.group_norm_cuda_path(x, 32) == path
    assert compiled.group_norm_cuda_path(x.to(memory_format=torch.channels_last), 32) == path


@pytest.mark.gpu
def test_cuda_kernels_with_clusters_off():
    """CMFAST_GROUP_NORM_CLUSTER=0 (read once a process) sends batch 1 to the two-stage kernels on sm_90 as well:
    this file's CUDA tests again in a process with it set."""
    if os.environ.get("CMFAST_GROUP_NORM_CLUSTER") == "0":
        pytest.skip("this process runs with the cluster kernel off already")
    if not cmfast.extension.cuda or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("no cluster kernel to turn off here")
    env = {**os.environ, "CMFAST_GROUP_NORM_CLUSTER": "0"}
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "gpu",
                          "-k", "(kernels_match and cuda-cuda) or kernel_paths"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-3000:]


@pytest.mark.parametrize("device, backend", backend_params(G.IMPLEMENTED))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_misaligned_tensors(device, backend, dtype, offset, layout, gen):
    """x and out `offset` elements past an aligned address (the CUDA kernel's packets narrow to what the addresses
    allow: 1 or 2 elements instead of 16 bytes)."""
    if backend == "triton" and device == "cpu":
        shapes = [(1, 64, 8, 8)]
    else:  # on an H100 the last two are the cluster and two-stage kernels with 1- and 2-element packets
        shapes = [(2, 192, 16, 16)] + ([(1, 192, 64, 64), (1, 64, 384, 384)] if device == "cuda" else [])
    for shape in shapes:
        check_misaligned(shape, dtype, device, backend, offset, layout, gen)


def check_misaligned(shape, dtype, device, backend, offset, layout, gen):
    x, args = make(shape, dtype, device, gen)
    b, c, h, w = shape

    def placed(t):
        flat = torch.full((t.numel() + offset,), float("nan"), dtype=dtype, device=device)[offset:]
        if layout == "channels_last":
            return flat.view(b, h, w, c).permute(0, 3, 1, 2).copy_(t)
        return flat.view(shape).copy_(t)

    x_odd, out = placed(x), placed(torch.full_like(x, float("nan")))
    assert x_odd.data_ptr() % 16 != 0 and out.data_ptr() % 16 != 0
    G.kernel(backend)(x_odd, *args.values(), 32, 1e-5, True, out)
    assert_matches(out.contiguous(), reference(x, args, True), ulps=2, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [name for name in ("cuda", "triton") if name in G.IMPLEMENTED])
def test_over_two_to_the_31_elements(backend):
    """An fp16 x of 2^31 + 2^23 elements (4.4 GB; groups of 256 KB, past the shared kernel): the samples whose
    offsets pass 2^31 elements checked against the reference."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GB of GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (514, 256, 128, 128)
    x = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    args = {"weight": torch.rand(256, device="cuda") + 0.5, "bias": torch.randn(256, device="cuda"),
            "scale": torch.randn(514, 256, device="cuda"), "shift": torch.randn(514, 256, device="cuda")}
    out = torch.full_like(x, float("nan"))
    G.kernel(backend)(x, *args.values(), 32, 1e-5, True, out)
    last = slice(-2, None)  # samples 512 and 513: from element 2^31 on
    tail = {k: v if k in ("weight", "bias") else v[last] for k, v in args.items()}
    assert_matches(out[last], reference(x[last], tail, True), ulps=2, rtol=1e-5)
    assert not out[:1].isnan().any()
    del x, out
    torch.cuda.empty_cache()


@pytest.mark.parametrize("device, backend", backend_params(G.IMPLEMENTED))
def test_silu_over_its_whole_range(device, backend):
    """With weight 0 the normalised value is exactly the shift, so the output is SiLU(shift) channel by channel: the
    kernels' SiLU against float64 over -100..100 (past the clamp of the CPU kernel's exp) and at a few special
    points, element by element (the CPU kernel's SiLU is within 2e-7)."""
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 0.5, -0.5, 15.0, -15.0, 86.9, -86.9, 87.5, -87.5,
                            float("inf"), float("nan")])
    shift = torch.cat([torch.linspace(-100, 100, 4096 - 32 - len(special)), special,
                       torch.zeros(32)]).reshape(1, -1)  # 4096 channels, in 32 groups of 128
    x = torch.randn(1, shift.shape[1], 2, 3, dtype=torch.float64).float()
    with cmfast.use_backend({"group_norm": backend}):
        out = ops.group_norm(x.to(device), torch.zeros(shift.shape[1], device=device), None, shift=shift.to(device),
                             silu=True).cpu()
    y = shift[0].double()[:, None, None].expand(-1, 2, 3)
    want, got = y * torch.sigmoid(y), out[0].double()
    assert torch.equal(got.isnan(), want.isnan())
    body = ~want.isnan() & (y.abs() <= 80)
    rel = ((got - want).abs() / want.abs().clamp_min(1e-35))[body]
    # GPU exps are exp2.approx of y * log2(e): that product's rounding alone is ~3e-6 relative at |y| = 80.
    rtol = 1e-5 if device == "cuda" else 1e-6
    assert float(rel.max()) <= rtol, f"SiLU relative error {float(rel.max()):.3g}"
    tails = y < -80  # SiLU underflows towards -0: tiny either way
    assert float((got - want)[tails].abs().max()) <= 1e-30
    assert got[y == float("inf")].eq(float("inf")).all()


@pytest.mark.skipif(not cmfast.backends.availability("cpu", torch.device("cpu"))[0], reason="no compiled CPU kernels")
# channels_last at batch 1: with more samples the bf16 and fp32 kernels cut their waves differently (by bytes), and
# the statistics' summation order with them
@pytest.mark.parametrize("shape, groups, layout", [((1, 256, 48, 48), 32, "channels_last"), ((2, 256, 32, 32), 32, "nchw"),
                                                   ((3, 96, 5, 7), 32, "nchw"),  # 35 values a channel: a tail of 3
                                                   ((2, 40, 6, 6), 8, "channels_last")])  # 40 channels: a tail of 8
@pytest.mark.parametrize("silu", [True, False])
def test_cpu_bf16_output_is_the_fp32_kernels_rounded(shape, groups, layout, silu, gen):
    """The CPU kernel's bf16 pass (AVX512_BF16's rounding where the CPU has it) computes what the fp32 kernel does
    on the same values, then rounds to nearest even as torch does: equal values, tails and SiLU's clamp included
    (weights up to ~100 put the normalised values past +-87)."""
    x = (torch.randn(shape, generator=gen) * 2).bfloat16()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight, bias = 30 * torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    scale, shift = 0.5 * torch.randn(shape[0], c, generator=gen), torch.randn(shape[0], c, generator=gen)
    with cmfast.use_backend({"group_norm": "cpu"}):
        got = ops.group_norm(x, weight, bias, num_groups=groups, scale=scale, shift=shift, silu=silu)
        want = ops.group_norm(x.float(), weight, bias, num_groups=groups, scale=scale, shift=shift, silu=silu)
    assert float(want.abs().max()) > 87
    torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("device, backend", backend_params(G.IMPLEMENTED))
def test_public_op_converts_parameters(device, backend, gen):
    """fp16 and non-contiguous weight/bias/scale/shift go to the kernels as contiguous fp32."""
    x, args = make((2, 64, 4, 4), torch.float32, device, gen)
    odd = {k: (v.half() if k in ("weight", "scale") else v.t().contiguous().t() if v.dim() == 2 else v[None].expand(
        2, -1)[1]) for k, v in args.items()}
    with cmfast.use_backend({"group_norm": backend}):
        out = ops.group_norm(x, **odd, silu=True)
    exact = {k: v.float() for k, v in odd.items()}
    assert_matches(out, reference(x, exact, True), rtol=1e-5)


@pytest.mark.parametrize("device, backend", backend_params(G.IMPLEMENTED))
@pytest.mark.parametrize("layout", ["strided_view", "channels_last", "three_dims"])
def test_public_op_layouts(device, backend, layout, gen):
    x, args = make((2, 64, 8, 10), torch.float32, device, gen)
    if layout == "strided_view":
        x = x[:, :, ::2, 1:]
    elif layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    else:
        x = x.flatten(2)  # (batch, C, tokens)
    with cmfast.use_backend({"group_norm": backend}):
        out = ops.group_norm(x, **args, silu=True)
    assert_matches(out.contiguous(), reference(x.contiguous(), args, True), rtol=1e-5)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_half_input_with_fp32_parameters(gen):
    """The reference's fp16 mode: fp16 activations, fp32 GroupNorm parameters and embeddings."""
    x, args = make((2, 64, 8, 8), torch.float16, "cpu", gen)
    out = ops.group_norm(x, **args, silu=True)
    assert out.dtype == torch.float16
    assert_matches(out, reference(x, args, True), ulps=2, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, a: ((x[:, :48],), a), "^num_groups: expected a positive divisor of the 48"),
        (lambda x, a: ((x,), {**a, "weight": a["weight"][:5]}), r"^weight: expected shape \(64,\)"),
        (lambda x, a: ((x,), {**a, "scale": a["scale"][:1]}), r"^scale: expected shape \(2, 64\)"),
        (lambda x, a: ((x.long(),), a), "^x: expected dtype"),
        (lambda x, a: ((x[0, 0, 0],), a), "^x: expected at least 2"),
        (lambda x, a: ((x,), {**a, "shift": a["shift"].to("meta")}), "^shift: expected device cpu"),
    ],
)
def test_bad_input(change, message, gen):
    x, args = make((2, 64, 4, 4), torch.float32, "cpu", gen)
    pos, kw = change(x, args)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.group_norm(*pos, **kw, silu=True)
