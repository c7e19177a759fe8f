"""The 3x3 convolution (stride 1, padding 1) as Winograd's F(2x2, 3x3) algorithm, for the CPU in fp32 and bf16.

Each 2x2 block of outputs is computed from the 4x4 input patch around it: the patch d becomes V = B^T d B (16
values per channel, additions only), the filter g becomes U = G g G^T once per weight, the 16 values are multiplied
with U as 16 matrix products over the channels, and the products M fold back into the 2x2 outputs Y = A^T M A
(Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). That is 16 multiplications per
input/output channel pair and 2x2 outputs where the direct convolution does 36: 2.25x fewer.

- fp32: compiled transforms (csrc/winograd.cpp) around torch.bmm, the image run in chunks of tiles whose
  transformed values stay in cache between the three steps. The rounding differs from the direct sum's by about
  as much as another order of the direct sum (2-3e-6 against float64 where oneDNN's direct sum is at 1e-5, on
  unit-scale ImageNet-64 activations).
- bf16, on CPUs with AVX512_BF16 (csrc/winograd_bf16.cpp): the three steps in one op, a chunk of tiles at a time
  in each thread's cache; the products multiply bf16 pairs and add them in fp32, so M stays fp32: AMX tile
  multiplies where the CPU has AMX (Intel Sapphire Rapids and later), else AVX512_BF16 dot products (AMD Zen 4);
  the two add the same fp32 products in another order. V and U are rounded to bf16 (the products' operand type),
  where the direct convolution rounds only its output. Measured (either engine: the same to three digits) against
  the exact convolution of the same bf16 operands (unit-scale, 256-512 channels), root-mean-square: 3.2e-3 against
  the direct bf16 convolution's 1.7e-3; 2.8e-3 against 2.2e-3 with the ResBlocks' residual (which the direct path
  adds after rounding). Through a whole U-Net in bf16 this does not show: against the fp32 U-Net, the ImageNet-64
  and LSUN-256 outputs are 2.26e-3 and 1.79e-3 off (rms, random weights) with every 3x3 convolution direct or
  Winograd alike: the other bf16 roundings of the mixed mode dominate. It takes channel counts that are multiples
  of 32 (a tile row). Without AVX512_BF16, bf16 has no Winograd path (the bmm route would round M to bf16 as well).

`reference` is the algorithm in torch ops (any dtype), for tests.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# B^T, G and A^T of F(2x2, 3x3)
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))

# fp32: the transformed inputs and products of one chunk of tiles: small enough to stay in cache between the steps, and
# at least twice the transformed filters, which each chunk's products read whole (measured on 2 Zen 4 cores:
# 4 MB is best where the filters are small, 4x192x64x64; 16-64 MB where they are large, 4x576x16x16).
CHUNK_BYTES = 4 << 20
BF16_STEP = 32  # the bf16 kernel's block of channels: a tile row of 32 bf16


def applies(conv: torch.nn.Conv2d) -> bool:
    """Whether the module is a convolution this algorithm computes: 3x3, stride 1, padding 1, no dilation or groups."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this build runs the algorithm for `dtype` on this CPU: fp32 with the compiled transforms (cmfast._C
    with its CPU kernels), bf16 where the CPU also runs AVX512_BF16 (csrc/winograd_bf16.cpp)."""
    from .._extension import status

    if not (status.cpu and hasattr(torch.ops.cmfast_C, "winograd_input")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and bool(bf16_engines()))


@functools.cache
def bf16_engines() -> tuple[str, ...]:
    """The bf16 kernel's engines this CPU runs, fastest first: "amx" (AMX tile multiplies), "dot" (AVX512_BF16 dot
    products). conv3x3 runs the first: where both run, AMX is the faster by far (oneDNN's bf16 matrix products on 2
    Sapphire Rapids cores: 1.8 TFLOP/s with AMX, 0.17 with the dot products alone)."""
    from .._extension import compiled, status

    return tuple(compiled.winograd_bf16_engines()) if status.cpu else ()


def takes(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether conv(x) can run here as Winograd: a 3x3 convolution (applies), x fp32 or bf16 channels_last on the
    CPU, in the weights' dtype; bf16 needs AVX512_BF16 and channel counts that are multiples of 32."""
    if not (applies(conv) and x.device.type == "cpu" and x.dtype == conv.weight.dtype and available(x.dtype)):
        return False
    if not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return False
    return x.dtype == torch.float32 or (conv.in_channels % BF16_STEP == 0 and conv.out_channels % BF16_STEP == 0)


def filters(weight: torch.Tensor) -> torch.Tensor:
    """U = G g G^T of a (out, in, 3, 3) weight, as (16, in, out) in the weight's dtype (computed in float64): the
    definition, in torch ops (prepared computes the same numbers, compiled)."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.detach().double(), g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def prepared(weight: torch.Tensor) -> torch.Tensor:
    """The filters as conv3x3 takes them for this weight (where takes()): filters(weight) in fp32; in bf16 packed as
    the products' B operands, (out / 32, 16, in / 2, 32, 2): per block of 32 outputs and product k, a row per pair
    of input channels holding the 32 outputs' pairs. Compiled (csrc/winograd.cpp), in float64 as filters() and
    with its roundings: about 20 ms for a 768x1536 weight on 2 Sapphire Rapids cores, where the torch ops take 200,
    which a first call of every 3x3 module paid."""
    out_channels, in_channels = weight.shape[:2]
    if weight.dtype == torch.bfloat16:
        shape = (out_channels // BF16_STEP, 16, in_channels // 2, BF16_STEP, 2)
    else:
        shape = (16, in_channels, out_channels)
    u = torch.empty(shape, dtype=weight.dtype)
    torch.ops.cmfast_C.winograd_filters(weight.detach(), u)
    return u


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, add: torch.Tensor | None = None,
            engine: str | None = None) -> torch.Tensor:
    """conv2d(x, g, bias, padding=1) (+ add) from u = prepared(g), where takes(conv, x); out channels_last. bf16:
    `engine` (one of bf16_engines(); the fastest by default)."""
    if x.dtype == torch.bfloat16:
        out = torch.empty((x.shape[0], u.shape[0] * BF16_STEP, *x.shape[2:]), dtype=x.dtype,
                          memory_format=torch.channels_last)
        bias = None if bias is None else bias.float()
        torch.ops.cmfast_C.winograd_bf16(x, u, bias, add, out, engine or bf16_engines()[0])
        return out
    batch, channels, height, width = x.shape
    out_channels = u.shape[2]
    tiles = batch * ((height + 1) // 2) * ((width + 1) // 2)
    out = torch.empty((batch, out_channels, height, width), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    chunk_bytes = max(CHUNK_BYTES, 2 * u.numel() * u.element_size())
    chunk = max(16, min(tiles, chunk_bytes // (16 * x.element_size() * (channels + out_channels))))
    v = x.new_empty((16, chunk, channels))
    m = x.new_empty((16, chunk, out_channels))
    for begin in range(0, tiles, chunk):
        count = min(chunk, tiles - begin)
        vc = v.view(-1)[:16 * count * channels].view(16, count, channels)  # the buffers' first count tiles
        mc = m.view(-1)[:16 * count * out_channels].view(16, count, out_channels)
        torch.ops.cmfast_C.winograd_input(x, begin, vc)
        torch.bmm(vc, u, out=mc)
        torch.ops.cmfast_C.winograd_output(mc, bias, add, begin, out)
    return out


def reference(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same algorithm in torch ops (any device, dtype and layout; for tests): NCHW in, NCHW out."""
    batch, channels, height, width = x.shape
    th, tw = (height + 1) // 2, (width + 1) // 2
    padded = F.pad(x, (1, 2 * tw + 1 - width, 1, 2 * th + 1 - height))
    patches = padded.unfold(2, 4, 2).unfold(3, 4, 2)  # (N, C, th, tw, 4, 4)
    bt = torch.tensor(_BT, dtype=x.dtype, device=x.device)
    at = torch.tensor(_AT, dtype=x.dtype, device=x.device)
    v = torch.einsum("ai,nchwij,bj->abnhwc", bt, patches, bt).reshape(16, -1, channels)
    m = torch.bmm(v, u).reshape(4, 4, batch, th, tw, -1)
    y = torch.einsum("ra,abnhwo,sb->nohrws", at, m, at).reshape(batch, -1, 2 * th, 2 * tw)[:, :, :height, :width]
    return y if bias is None else y + bias.view(1, -1, 1, 1)
