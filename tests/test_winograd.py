"""The Winograd F(2x2, 3x3) convolution (cmfast/models/winograd.py, csrc/winograd.cpp, csrc/winograd_bf16.cpp) against
the direct convolution in float64: the algorithm in torch ops, the compiled transforms in chunks (odd sizes, a last
partial chunk, bias, residual), the bf16 kernel (each engine this CPU runs: AMX tiles, AVX512_BF16 dot products)
against the algorithm with its roundings and against the direct bf16 convolution, real U-Net shapes, the cached
filters following the weights, and where the U-Net may choose it."""

import pytest
import torch
import torch.nn.functional as F

import cmfast
from cmfast.models import PRESETS, winograd
from cmfast.models.conv import Conv2d
from tests.checks import assert_matches

compiled = pytest.mark.skipif(not winograd.available(), reason="cmfast._C (the compiled transforms) is not built")
bf16_kernel = pytest.mark.skipif(not winograd.available(torch.bfloat16),
                                 reason="the bf16 kernel needs cmfast._C and a CPU that runs AVX512_BF16")
ENGINES = winograd.bf16_engines() if winograd.available() else ()
# Each engine of the bf16 kernel, skipped where this CPU does not run it ("amx" needs AMX-BF16 and the OS's leave).
each_engine = pytest.mark.parametrize("engine", [
    pytest.param(e, marks=pytest.mark.skipif(e not in ENGINES, reason=f"this CPU does not run the {e} engine"))
    for e in ("amx", "dot")])


def direct(x, weight, bias, add=None):
    out = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    return out if add is None else out + add.double()


def random_conv(cin, cout, gen, bias=True):
    weight = torch.randn(cout, cin, 3, 3, generator=gen) / (3 * cin**0.5)
    return weight, (torch.randn(cout, generator=gen) if bias else None)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 8, 8), (2, 6, 9, 4)], ids=str)
def test_the_algorithm_is_the_convolution(shape, gen):
    """In float64 the transforms are exact up to rounding far below fp32's: the algorithm itself is right."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight, bias = random_conv(shape[1], 5, gen)
    got = winograd.reference(x, winograd.filters(weight.double()), bias.double())
    torch.testing.assert_close(got, direct(x, weight, bias), rtol=1e-12, atol=1e-12)


@compiled
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("with_add", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape, cout", [((1, 3, 1, 1), 4), ((2, 5, 7, 9), 7), ((3, 20, 10, 6), 36), ((1, 33, 16, 16), 17)],
                         ids=str)
def test_compiled_transforms_in_chunks(shape, cout, with_add, with_bias, gen, monkeypatch):
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)  # the smallest chunks (16 tiles): many, the last one partial
    x = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    weight, bias = random_conv(shape[1], cout, gen, with_bias)
    out_shape = (shape[0], cout, *shape[2:])
    add = torch.randn(out_shape, generator=gen).contiguous(memory_format=torch.channels_last) if with_add else None
    u = winograd.filters(weight)
    got = winograd.conv3x3(x, u, bias, add)
    assert got.shape == out_shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), direct(x, weight, bias, add), rtol=1e-5, atol=1e-5)
    algorithm = winograd.reference(x, u, bias) + (0 if add is None else add)
    torch.testing.assert_close(got, algorithm, rtol=1e-6, atol=1e-6)  # the same additions, in another order


@compiled
def test_a_real_shape_is_as_close_as_the_direct_convolution(gen):
    """ImageNet-64's first ResBlock conv (192 channels, 64x64) in fp32: no further from the float64 result than
    torch's own fp32 convolution is."""
    x = torch.randn(1, 192, 64, 64, generator=gen).contiguous(memory_format=torch.channels_last)
    weight, bias = random_conv(192, 192, gen)
    want = direct(x, weight, bias)
    err = (winograd.conv3x3(x, winograd.filters(weight), bias).double() - want).abs().max().item()
    err_direct = (F.conv2d(x, weight, bias, padding=1).double() - want).abs().max().item()
    assert err < max(2 * err_direct, 1e-5), (err, err_direct)


@compiled
def test_the_raw_ops_refuse_what_they_would_misindex(gen):
    x = torch.randn(1, 4, 6, 6, generator=gen)  # NCHW
    v = torch.empty(16, 9, 4)
    with pytest.raises(RuntimeError, match="channels_last"):
        torch.ops.cmfast_C.winograd_input(x, 0, v)
    x = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.cmfast_C.winograd_input(x, 1, v)  # 9 tiles from tile 1: one past the end
    with pytest.raises(RuntimeError, match="16, tiles, channels"):
        torch.ops.cmfast_C.winograd_input(x, 0, torch.empty(16, 9, 5))
    y = torch.empty(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="add"):
        torch.ops.cmfast_C.winograd_output(v, None, torch.empty(1, 4, 6, 6), 0, y)  # the residual in NCHW


def bf16_case(shape, cout, gen, with_add=True, with_bias=True):
    """A bf16 channels_last input, weight (scaled for unit-scale outputs), bias and residual."""
    x = torch.randn(shape, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
    weight, bias = random_conv(shape[1], cout, gen, with_bias)
    add = torch.randn(shape[0], cout, *shape[2:], generator=gen).bfloat16().contiguous(
        memory_format=torch.channels_last) if with_add else None
    return x, weight.bfloat16(), None if bias is None else bias.bfloat16(), add


def algorithm_with_roundings(x, weight, bias, add):
    """What the bf16 kernel computes, in float64 but for its roundings: V = B^T d B and U = G g G^T rounded to bf16,
    their products and Y = A^T M A exact, plus bias and residual, rounded once to bf16."""
    u = winograd.filters(weight.double()).bfloat16().double()
    batch, channels, height, width = x.shape
    th, tw = (height + 1) // 2, (width + 1) // 2
    patches = F.pad(x.double(), (1, 2 * tw + 1 - width, 1, 2 * th + 1 - height)).unfold(2, 4, 2).unfold(3, 4, 2)
    bt = torch.tensor(winograd._BT, dtype=torch.float64)
    v = torch.einsum("ai,nchwij,bj->abnhwc", bt, patches, bt).reshape(16, -1, channels).bfloat16().double()
    m = torch.bmm(v, u).reshape(4, 4, batch, th, tw, -1)
    at = torch.tensor(winograd._AT, dtype=torch.float64)
    y = torch.einsum("ra,abnhwo,sb->nohrws", at, m, at).reshape(batch, -1, 2 * th, 2 * tw)[:, :, :height, :width]
    y = y + (0 if bias is None else bias.double().view(1, -1, 1, 1)) + (0 if add is None else add.double())
    return y.bfloat16()


@each_engine
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("with_add", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape, cout", [((1, 32, 1, 1), 32), ((2, 64, 5, 7), 96), ((3, 96, 10, 6), 32),
                                         ((1, 32, 33, 17), 64), ((1, 32, 70, 66), 64)], ids=str)
def test_the_bf16_kernel_is_the_algorithm_with_its_roundings(shape, cout, with_add, with_bias, engine, gen):
    """Odd image sizes (tiles cut by the edge), one tile, several chunks with a partial last one and a last step
    past the image's tiles (1155 tiles at 70x66: each thread's share in chunks of about 200, for AMX): every
    output within one bf16 ulp of the algorithm computed in float64 with the
    kernel's two roundings (M is accumulated in fp32, by either engine)."""
    x, weight, bias, add = bf16_case(shape, cout, gen, with_add, with_bias)
    got = winograd.conv3x3(x, winograd.prepared(weight), bias, add, engine)
    assert got.dtype == torch.bfloat16 and got.shape == (shape[0], cout, *shape[2:])
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_matches(got, algorithm_with_roundings(x, weight, bias, add), ulps=1, rtol=1e-5)


@each_engine
@pytest.mark.parametrize("shape, cout", [((1, 64, 3, 3), 96), ((1, 96, 8, 8), 64), ((2, 32, 9, 13), 32),
                                         ((1, 128, 24, 24), 64), ((1, 32, 70, 66), 64)], ids=str)
def test_the_bf16_kernel_gives_the_same_bits_on_any_number_of_threads(shape, cout, engine, gen):
    """The image is cut into chunks per thread (and a small image's output blocks shared among threads): every
    output's sum runs in the same order whatever the cut, so 1 to 5 threads give the same bits, and they are the
    algorithm's within an ulp."""
    x, weight, bias, add = bf16_case(shape, cout, gen)
    u = winograd.prepared(weight)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 4, 5):
            torch.set_num_threads(n)
            outs.append(winograd.conv3x3(x, u, bias, add, engine))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    assert_matches(outs[0], algorithm_with_roundings(x, weight, bias, add), ulps=1, rtol=1e-5)


@each_engine
@pytest.mark.parametrize("shape, cout", [((1, 256, 64, 64), 256), ((1, 512, 32, 32), 256), ((4, 192, 16, 16), 192),
                                         ((1, 1024, 8, 8), 1024)], ids=str)
def test_the_bf16_kernel_at_unet_shapes_is_near_the_direct_convolution(shape, cout, engine, gen):
    """The U-Nets' widths (LSUN-256's 256-1024 channels, ImageNet-64's 192): against the exact convolution of the
    same bf16 operands, the kernel's root-mean-square error is at most 1.6x the direct bf16 convolution's (measured
    1.2-1.3x with a residual, about 2x without, where the output's rounding weighs less)."""
    x, weight, bias, add = bf16_case(shape, cout, gen)
    want = direct(x, weight, bias, add)

    def rms(y):
        return float((y.double() - want).norm() / want.norm())

    got = winograd.conv3x3(x, winograd.prepared(weight), bias, add, engine)
    assert rms(got) <= 1.6 * rms(F.conv2d(x, weight, bias, padding=1) + add)


@compiled
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype, cin, cout", [(torch.float32, 5, 7), (torch.float32, 33, 17), (torch.float32, 40, 70),
                                              (torch.bfloat16, 64, 96), (torch.bfloat16, 96, 32),
                                              (torch.bfloat16, 34, 64)], ids=str)
def test_the_compiled_filters_are_the_definition(dtype, cin, cout, layout, gen):
    """prepared (csrc/winograd.cpp) gives filters()' bits, in bf16 packed as the products read them, from weights in
    any memory layout, at sizes that leave its blocks of 32 outputs and 16 inputs partial."""
    if dtype == torch.bfloat16 and not winograd.available(dtype):
        pytest.skip("the bf16 kernel needs a CPU that runs AVX512_BF16")
    weight = random_conv(cin, 2 * cout if layout == "strided" else cout, gen)[0].to(dtype)
    weight = {"contiguous": weight, "channels_last": weight.contiguous(memory_format=torch.channels_last),
              "strided": weight[::2]}[layout]
    want = winograd.filters(weight)
    got = winograd.prepared(weight)
    if dtype == torch.bfloat16:
        assert got.shape == (cout // 32, 16, cin // 2, 32, 2) and got.is_contiguous()
        got = got.permute(1, 2, 4, 0, 3).reshape(16, cin, cout)  # [out block][k][in pair][out][pair member]
    assert got.dtype == dtype and torch.equal(got, want)


@compiled
def test_the_filter_transform_refuses_what_it_would_misindex():
    def op(weight, u):
        torch.ops.cmfast_C.winograd_filters(weight, u)

    weight = torch.zeros(32, 4, 3, 3)
    with pytest.raises(RuntimeError, match="shape \\(out, in, 3, 3\\)"):
        op(torch.zeros(32, 4, 5, 5), torch.empty(16, 4, 32))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(weight.double(), torch.empty(16, 4, 32, dtype=torch.double))
    with pytest.raises(RuntimeError, match="the weight's dtype"):
        op(weight, torch.empty(16, 4, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="contiguous"):
        op(weight, torch.empty(16, 32, 4).transpose(1, 2))
    with pytest.raises(RuntimeError, match="shape \\(16, in, out\\)"):
        op(weight, torch.empty(16, 32, 4))
    with pytest.raises(RuntimeError, match="out a multiple of 32"):
        op(torch.zeros(16, 4, 3, 3, dtype=torch.bfloat16), torch.empty(1, 16, 2, 32, 2, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="in / 2, 32, 2"):
        op(weight.bfloat16(), torch.empty(16, 4, 32, dtype=torch.bfloat16))


@bf16_kernel
def test_the_bf16_kernel_refuses_what_it_would_misindex(gen):
    x, weight, _, _ = bf16_case((1, 32, 4, 4), 32, gen, with_add=False)
    u = winograd.prepared(weight)
    y = torch.empty_like(x)

    def op(*args, engine=ENGINES[0]):
        torch.ops.cmfast_C.winograd_bf16(*args, engine)

    for engine in ("tiles", "AMX", "") + (() if "amx" in ENGINES else ("amx",)):
        with pytest.raises(RuntimeError, match=f"cannot run the engine '{engine}' \\(it runs: {', '.join(ENGINES)}\\)"):
            op(x, u, None, None, y, engine=engine)
    with pytest.raises(RuntimeError, match="bfloat16"):
        op(x.float(), u, None, None, y)
    with pytest.raises(RuntimeError, match="channels_last"):
        op(x.contiguous(), u, None, None, y)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        op(torch.zeros(1, 16, 4, 4, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last), u, None,
           None, y)
    with pytest.raises(RuntimeError, match="packed filters"):
        op(x, winograd.filters(weight), None, None, y)  # unpacked
    with pytest.raises(RuntimeError, match="add"):
        op(x, u, None, torch.empty(1, 32, 4, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last), y)
    with pytest.raises(RuntimeError, match="bias"):
        op(x, u, torch.zeros(32, dtype=torch.bfloat16), None, y)  # the bias goes in as fp32
    with pytest.raises(RuntimeError, match="image size"):
        op(x, u, None, None, torch.empty(1, 32, 4, 2, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last))


@compiled
def test_the_filters_follow_the_weights(gen):
    conv = Conv2d(8, 8, 3, padding=1).requires_grad_(False).to(memory_format=torch.channels_last)
    x = torch.randn(1, 8, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    assert "winograd" in conv.candidates(x)
    first = conv._run(x, None, conv.bias, "winograd")
    with torch.no_grad():
        conv.weight.mul_(2)  # in place: the transformed filters must be renewed
    torch.testing.assert_close(conv._run(x, None, conv.bias, "winograd"), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert not torch.allclose(first, conv._run(x, None, conv.bias, "winograd"))


@compiled
def test_where_the_unet_may_choose_it(gen):
    def candidates(conv, dtype, channels_last=True, size=8):
        x = torch.randn(1, conv.in_channels, size, size, generator=gen).to(dtype)
        return conv.candidates(x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    conv = Conv2d(8, 8, 3, padding=1)
    assert "winograd" in candidates(conv, torch.float32)
    assert "winograd" not in candidates(conv, torch.float32, channels_last=False)
    assert "winograd" not in candidates(conv.to(torch.bfloat16), torch.bfloat16)  # bf16: channels in 32s
    wide = Conv2d(64, 32, 3, padding=1).to(torch.bfloat16)
    assert ("winograd" in candidates(wide, torch.bfloat16)) == winograd.available(torch.bfloat16)  # AVX512_BF16
    assert "winograd" not in candidates(wide, torch.bfloat16, channels_last=False)
    assert "winograd" not in candidates(Conv2d(8, 8, 3, stride=2, padding=1), torch.float32)  # Downsample
    assert "winograd" not in candidates(Conv2d(8, 8, 1), torch.float32)


@compiled
def test_a_layout_flip_keeps_the_filters(monkeypatch):
    """set_channels_last moves the weights without changing them: the filters are not transformed again (the
    layout measurement flips the layout before every timed call)."""
    torch.manual_seed(3)
    unet = cmfast.UNet(PRESETS["test_imagenet"].unet).eval()
    for p in unet.parameters():
        p.requires_grad_(False)
        p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5 if p.dim() > 1 else 3))
    convs = [m for m in unet.modules() if isinstance(m, Conv2d) and winograd.applies(m)]
    unet.set_channels_last(True)
    for conv in convs:
        conv._winograd_filters()
    kept = [conv._winograd[1] for conv in convs]
    unet.set_channels_last(False)
    unet.set_channels_last(True)
    monkeypatch.setattr(winograd, "filters", lambda weight: pytest.fail("the filters were transformed again"))
    assert convs and all(conv._winograd_filters() is u for conv, u in zip(convs, kept))
