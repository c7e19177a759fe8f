"""The consistency op: the reference against the formulas of docs/model.md section 3, every backend against the
reference, layouts, torch.compile, and bad input."""

import math

import pytest
import torch
from checks import assert_matches
from conftest import backend_params

import cmfast
from cmfast import ops
from cmfast.ops import consistency as C

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 0.5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---- the reference against the formulas (float64 math, written out independently) -------------------------


def formulas(s, sd=SIGMA_DATA, eps=SIGMA_MIN):
    return (
        sd**2 / ((s - eps) ** 2 + sd**2),
        (s - eps) * sd / math.sqrt(s**2 + sd**2),
        1 / math.sqrt(s**2 + sd**2),
        1000 * 0.25 * math.log(s + 1e-44),
    )


@pytest.mark.parametrize("sigma", [SIGMA_MIN, 0.01, 0.5, 1.0, 1.3824, 5.0, SIGMA_MAX])
@pytest.mark.parametrize("kind", ["consistency", "edm"])
def test_reference_matches_formulas(sigma, kind):
    eps = SIGMA_MIN if kind == "consistency" else 0.0
    c_skip, c_out, c_in = C.consistency_scalings(torch.tensor([sigma]), SIGMA_DATA, eps)
    want = formulas(sigma, eps=eps)
    for got, w in zip((c_skip, c_out, c_in, C.time_input(torch.tensor([sigma]))), want):
        assert float(got) == pytest.approx(w, rel=1e-6, abs=1e-7)


def test_known_values():
    s = torch.tensor([SIGMA_MIN, SIGMA_MAX])
    c_skip, c_out, c_in = C.consistency_scalings(s, SIGMA_DATA, SIGMA_MIN)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # f(x, sigma_min) = x exactly
    assert C.time_input(s)[1].item() == pytest.approx(1095.5067, abs=1e-4)
    edm = C.consistency_scalings(torch.tensor([SIGMA_DATA]), SIGMA_DATA, 0.0)
    assert edm[0].item() == pytest.approx(0.5) and edm[1].item() == pytest.approx(SIGMA_DATA / math.sqrt(2))


# ---- every backend against the reference ------------------------------------------------------------------

SHAPES = [
    (1, 3, 64, 64),  # an ImageNet-64 batch of one
    (4, 3, 32, 32),
    (3, 5, 7, 9),  # per-sample size not a multiple of any vector width or block
    (2, 192, 16, 16),  # several blocks per sample
    (5,),  # one value per sample
    (0, 3, 4, 4),  # empty batch
]


def random_sigma(batch, gen, device):
    """Log-uniform over [sigma_min, sigma_max], with sigma_min and sigma_max themselves present."""
    u = torch.rand(batch, generator=gen, dtype=torch.float64)
    s = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** u
    s[:1] = SIGMA_MIN
    s[1:2] = SIGMA_MAX
    return s.to(torch.float32).to(device)


def inputs(shape, dtype, device, gen, channels_last=False):
    x = (torch.randn(shape, generator=gen) * 1.5).to(dtype)
    f = (torch.randn(shape, generator=gen) * 1.5).to(dtype)
    if channels_last:
        x, f = (t.to(memory_format=torch.channels_last) for t in (x, f))
    return x.to(device), f.to(device), random_sigma(shape[0], gen, device)


def poisoned_like(x):
    return torch.full_like(x, float("nan"))


def reference_outputs(x, f, sigma, kind, clamp):
    shift = SIGMA_MIN if kind == "consistency" else 0.0
    out, x_in, t_in = poisoned_like(x), poisoned_like(x), torch.full(sigma.shape, float("nan"), device=x.device)
    C.epilogue_reference_out(x, f, sigma, SIGMA_DATA, shift, clamp, out)
    C.prologue_reference_out(x, sigma, SIGMA_DATA, x_in, t_in)
    return out, x_in, t_in


@pytest.mark.parametrize("device, backend", backend_params(C.IMPLEMENTED))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_match_reference(device, backend, dtype, shape, gen):
    """The backend's kernels fill NaN-poisoned buffers with the reference's values."""
    x, f, sigma = inputs(shape, dtype, device, gen)
    for kind in ("consistency", "edm"):
        for clamp in (False, True):
            shift = SIGMA_MIN if kind == "consistency" else 0.0
            out = poisoned_like(x)
            C.epilogue_kernel(backend)(x, f, sigma, SIGMA_DATA, shift, clamp, out)
            want, _, _ = reference_outputs(x, f, sigma, kind, clamp)
            assert_matches(out, want)
    x_in, t_in = poisoned_like(x), torch.full(sigma.shape, float("nan"), device=device)
    C.prologue_kernel(backend)(x, sigma, SIGMA_DATA, x_in, t_in)
    _, want_x, want_t = reference_outputs(x, f, sigma, "consistency", False)
    assert_matches(x_in, want_x)
    assert_matches(t_in, want_t)


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.to(memory_format=torch.channels_last),
    "strided_view": lambda t: t[:, :, ::2, 1:],
    "batch_inner": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),  # dense, batch not outermost
}


@pytest.mark.parametrize("device, backend", backend_params(C.IMPLEMENTED))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_public_op_layouts(device, backend, dtype, layout, gen):
    """Through torch.ops.cmfast: any layout in, the values of the reference out, in x's layout where dense."""
    x, f, sigma = inputs((3, 6, 10, 12), dtype, device, gen)
    x, f = LAYOUTS[layout](x), LAYOUTS[layout](f)
    with cmfast.use_backend(backend):
        out = ops.consistency_epilogue(x, f, sigma, clamp=True)
        x_in, t_in = ops.consistency_prologue(x, sigma)
    want, want_x, want_t = reference_outputs(x.contiguous(), f.contiguous(), sigma, "consistency", True)
    for got, w in ((out, want), (x_in, want_x), (t_in, want_t)):
        assert_matches(got.contiguous(), w)
    if layout in ("contiguous", "channels_last"):
        assert out.stride() == x.stride() and x_in.stride() == x.stride()


@pytest.mark.parametrize("device, backend", backend_params(C.IMPLEMENTED))
def test_mixed_layouts_and_dtypes(device, backend, gen):
    """model_output in another layout or dtype than x: taken as x's, result in x's dtype and layout."""
    x, f, sigma = inputs((2, 4, 8, 8), torch.float32, device, gen, channels_last=True)
    f_half = f.contiguous().to(torch.float16)
    with cmfast.use_backend(backend):
        out = ops.consistency_epilogue(x, f_half, sigma)
    want, _, _ = reference_outputs(x, f_half.float(), sigma, "consistency", False)
    assert out.dtype == torch.float32 and out.stride() == x.stride()
    assert_matches(out, want)


def test_sigma_min_is_identity(gen):
    x, f, _ = inputs((4, 3, 8, 8), torch.float32, "cpu", gen)
    assert torch.equal(ops.consistency_epilogue(x, f, SIGMA_MIN), x)


def test_sigma_broadcast_forms(gen):
    x, f, _ = inputs((3, 2, 4, 4), torch.float32, "cpu", gen)
    full = torch.full((3,), 2.5)
    want = ops.consistency_epilogue(x, f, full)
    assert torch.equal(ops.consistency_epilogue(x, f, 2.5), want)
    assert torch.equal(ops.consistency_epilogue(x, f, torch.tensor(2.5, dtype=torch.float64)), want)


# ---- torch.compile and the op contract --------------------------------------------------------------------


def test_torch_compile_fullgraph(gen):
    x, f, sigma = inputs((2, 3, 16, 16), torch.float32, "cpu", gen)

    def denoise(x, f, sigma):
        x_in, t_in = ops.consistency_prologue(x, sigma)
        return ops.consistency_epilogue(x, f * x_in, sigma, clamp=True) + t_in[:, None, None, None] * 1e-3

    compiled = torch.compile(denoise, fullgraph=True)
    assert_matches(compiled(x, f, sigma), denoise(x, f, sigma))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_view"])
def test_opcheck(layout, gen):
    """torch.library's own checks: schema, fake (meta) implementation vs real outputs, dispatch."""
    x, f, sigma = inputs((2, 4, 6, 8), torch.float32, "cpu", gen)
    x, f = LAYOUTS[layout](x), LAYOUTS[layout](f)
    torch.library.opcheck(torch.ops.cmfast.consistency_epilogue, (x, f, sigma, 0.5, 0.002, True))
    torch.library.opcheck(torch.ops.cmfast.consistency_prologue, (x, sigma, 0.5))


# ---- bad input: clear errors that name the argument -------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, names",
    [
        (lambda x, f, s: ops.consistency_epilogue(x, f, s[:2]), ValueError, "sigma"),
        (lambda x, f, s: ops.consistency_epilogue(x, f, s[:, None]), ValueError, "sigma"),
        (lambda x, f, s: ops.consistency_epilogue(x, f, s.long()), TypeError, "sigma"),
        (lambda x, f, s: ops.consistency_epilogue(x.long(), f, s), TypeError, "x"),
        (lambda x, f, s: ops.consistency_epilogue(x.double(), f, s), TypeError, "x"),
        (lambda x, f, s: ops.consistency_epilogue(x, f.int(), s), TypeError, "model_output"),
        (lambda x, f, s: ops.consistency_epilogue(x, f[:, :2], s), ValueError, "model_output"),
        (lambda x, f, s: ops.consistency_epilogue(x, f, s.to("meta")), ValueError, "sigma"),
        (lambda x, f, s: ops.consistency_epilogue(x, f.to("meta"), s), ValueError, "model_output"),
        (lambda x, f, s: ops.consistency_epilogue(x, f, s, kind="ddpm"), ValueError, "kind"),
        (lambda x, f, s: ops.consistency_epilogue(x, f, s, sigma_data=0), ValueError, "sigma_data"),
        (lambda x, f, s: ops.consistency_epilogue(x, f, s, sigma_min=-1), ValueError, "sigma_min"),
        (lambda x, f, s: ops.consistency_epilogue(x.numpy(), f, s), TypeError, "x"),
        (lambda x, f, s: ops.consistency_prologue(x, s[1:]), ValueError, "sigma"),
        (lambda x, f, s: ops.consistency_prologue(x[0, 0, 0, 0], s), ValueError, "x"),
    ],
)
def test_bad_input(call, error, names, gen):
    x, f, sigma = inputs((3, 4, 5, 5), torch.float32, "cpu", gen)
    with pytest.raises(error, match=rf"^{names}: "):
        call(x, f, sigma)


def test_forcing_a_backend_that_cannot_run(gen):
    x, f, sigma = inputs((2, 3, 4, 4), torch.float32, "cpu", gen)
    with pytest.raises(RuntimeError, match="'cuda' was forced for consistency but cannot run on cpu"):
        with cmfast.use_backend("cuda"):
            ops.consistency_epilogue(x, f, sigma)
    with pytest.raises(ValueError, match="backend: expected one of"):
        with cmfast.use_backend("fast"):
            pass


# ---- GPU-only: CUDA graphs -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(backend, gen):
    x, f, sigma = inputs((4, 3, 32, 32), torch.float16, "cuda", gen)
    with cmfast.use_backend(backend):
        ops.consistency_epilogue(x, f, sigma)  # warm-up: Triton compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.consistency_epilogue(x, f, sigma, clamp=True)
    x.copy_(torch.randn(x.shape, generator=gen).to(x))
    graph.replay()
    want, _, _ = reference_outputs(x, f, sigma, "consistency", True)
    assert_matches(out, want)
