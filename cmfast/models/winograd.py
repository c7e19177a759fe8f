"""The 3x3 convolution (stride 1, padding 1) as Winograd's F(2x2, 3x3) algorithm, for the CPU in fp32.

Each 2x2 block of outputs is computed from the 4x4 input patch around it: the patch d becomes V = B^T d B (16
values per channel, additions only), the filter g becomes U = G g G^T once per weight, the 16 values are multiplied
with U as 16 matrix products over the channels (torch.bmm), and the products M fold back into the 2x2 outputs
Y = A^T M A (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). That is 16 multiplications
per input/output channel pair and 2x2 outputs where the direct convolution does 36: 2.25x fewer. The rounding
differs from the direct sum's (the transforms add and subtract inputs before the products), by about as much as
another order of the direct sum does in fp32; in fp16/bf16 it would not (the transformed inputs would be rounded
to 8 or 11 bits before the products, and torch's CPU bmm has no fp32 output for them), so this is fp32 only.

The input and output transforms are compiled kernels (csrc/winograd.cpp); the image is run in chunks of tiles
whose transformed values stay in cache between the three steps. `reference` is the same algorithm in torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# B^T, G and A^T of F(2x2, 3x3)
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))

# The transformed inputs and products of one chunk of tiles: small enough to stay in cache between the steps, and
# at least twice the transformed filters, which each chunk's products read whole (measured on 2 Zen 4 cores:
# 4 MB is best where the filters are small, 4x192x64x64; 16-64 MB where they are large, 4x576x16x16).
CHUNK_BYTES = 4 << 20


def applies(conv: torch.nn.Conv2d) -> bool:
    """Whether the module is a convolution this algorithm computes: 3x3, stride 1, padding 1, no dilation or groups."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def available() -> bool:
    """Whether the compiled transforms are loaded (cmfast._C with its CPU kernels)."""
    from .._extension import status

    return status.cpu and hasattr(torch.ops.cmfast_C, "winograd_input")


def filters(weight: torch.Tensor) -> torch.Tensor:
    """U = G g G^T of a (out, in, 3, 3) weight, as (16, in, out) in the weight's dtype (computed in float64)."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.detach().double(), g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, add: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(x, g, bias, padding=1) (+ add) from u = filters(g); x fp32 channels_last on the CPU; out channels_last."""
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
