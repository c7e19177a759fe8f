"""Nearest 2x upsampling, and a 3x3 convolution of an upsampled image (the U-Net's up ResBlocks and Upsample blocks)
run the way measured fastest for its class of call (cmfast.tuning):

- "upsample": the reference's way, the image upsampled, then the convolution (Conv2d: its own measured way);
- "subpixel": each of the output's four pixel phases is a 2x2 convolution of the image as it is: output row 2i
  reads upsampled rows 2i-1, 2i, 2i+1, that is rows i-1, i, i, so kernel rows 1 and 2 act on one row and add up
  (row 2i+1: rows 0 and 1 add up). One convolution with 4 x out channels of summed weights (2x2, padding 1) gives
  the four phases, which are interleaved into the output. 16 products a pixel instead of 36, and no upsampled copy
  of the input: 1x256x128x128 -> 256 x 256x256 in bf16 on 2 Sapphire Rapids threads, 21.7 ms the reference's way,
  10.9 this way; fp32 114 ms (Winograd) or 173 (direct) against 85.

The summed weights are exact in fp32 arithmetic; in bf16 they are rounded once more to bf16: the output's error
was 1.4x the direct bf16 convolution's (max abs error against float64 at the shapes above, 0.022 against 0.016),
and in fp32 half of it (the sums are formed before the products).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends, tuning
from .conv import handle, memory_format, module_of
from .winograd import applies

# Kernel rows (or columns) of the 3x3 convolution that act on each of the 2x2 kernel's rows, per output phase.
_TAPS = {0: ((0,), (1, 2)), 1: ((0, 1), (2,))}


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2, mode="nearest"), exactly, as one broadcast copy on the CPU. torch's CPU kernel
    is slow on NCHW tensors (2.7 ms for 1x1152x16x16 on 2 threads; the copy: 0.9 ms) and on channels_last bfloat16
    ones (2 Sapphire Rapids threads, 4x384x32x32: 3.5 ms)."""
    if x.device.type != "cpu" or x.dim() != 4:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    b, c, h, w = x.shape
    if x.is_contiguous():
        return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
    if x.is_contiguous(memory_format=torch.channels_last):
        rows = x.permute(0, 2, 3, 1)  # (b, h, w, c), contiguous
        up = rows[:, :, None, :, None, :].expand(b, h, 2, w, 2, c).reshape(b, 2 * h, 2 * w, c)
        return up.permute(0, 3, 1, 2)  # channels_last
    return F.interpolate(x, scale_factor=2, mode="nearest")


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """(4 O, C, 2, 2): the 2x2 kernels of the output phases (a, b) (rows a, columns b) in the order 00, 01, 10, 11,
    summed in fp32 and rounded once to the weight's dtype, in its memory layout."""
    w = weight.detach().float()
    phases = []
    for a in (0, 1):
        for b in (0, 1):
            phases.append(torch.stack([torch.stack([w[:, :, list(rows)][:, :, :, list(cols)].sum(dim=(2, 3))
                                                    for cols in _TAPS[b]], dim=-1) for rows in _TAPS[a]], dim=-2))
    fmt = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) and weight.dim() == 4 \
        and not weight.is_contiguous() else torch.contiguous_format
    return torch.cat(phases).to(weight.dtype).contiguous(memory_format=fmt)


def _subpixel(conv, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    identity = conv._identity()
    cached = getattr(conv, "_phases", None)
    if cached is None or cached[0] != identity:
        conv._phases = cached = (identity, phase_weights(conv.weight))
    batch, _, height, width = x.shape
    o = conv.out_channels
    bias4 = None if bias is None else bias.to(conv.weight.dtype).repeat(4)
    phases = F.conv2d(x, cached[1], bias4, padding=1).permute(0, 2, 3, 1)  # (B, H + 1, W + 1, 4 O), a view
    fmt = torch.channels_last if phases.is_contiguous() else torch.contiguous_format
    out = torch.empty((batch, o, 2 * height, 2 * width), dtype=x.dtype, device=x.device, memory_format=fmt)
    grid = out.permute(0, 2, 3, 1).view(batch, height, 2, width, 2, o)
    for a in (0, 1):
        for b in (0, 1):  # phase (a, b) is the 2x2 output window at offset (a, b)
            k = 2 * a + b
            grid[:, :, a, :, b, :] = phases[:, a:a + height, b:b + width, k * o:(k + 1) * o]
    return out


@torch.library.custom_op("cmfast::upsample_conv", mutates_args=())
def _upsample_conv_op(x: torch.Tensor, shift: torch.Tensor | None, module: int) -> torch.Tensor:
    """conv_upsampled in a compiled graph (CPU): the recorded way, nothing timed (cmfast/models/conv.py)."""
    with tuning.no_timing():
        out = conv_upsampled(module_of(module), x, shift)
    return out.contiguous(memory_format=memory_format(x))


@_upsample_conv_op.register_fake
def _(x, shift, module):
    batch, _, height, width = x.shape
    return torch.empty((batch, module_of(module).out_channels, 2 * height, 2 * width), dtype=x.dtype,
                       device=x.device, memory_format=memory_format(x))


def conv_upsampled(conv, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """conv(upsample_nearest2x(x), shift=shift) for a 3x3 stride-1 padding-1 Conv2d, by the measured way."""
    plain = (torch.is_grad_enabled() and conv.weight.requires_grad) or x.is_meta or x.dim() != 4 \
        or not applies(conv) or x.dtype != conv.weight.dtype
    if not plain and torch.compiler.is_compiling():
        if x.device.type == "cpu" and not torch.compiler.is_exporting():
            return _upsample_conv_op(x, shift, handle(conv))
        plain = True
    if plain or backends.forced() == "reference":
        return conv(upsample_nearest2x(x), shift=shift)
    bias = conv.bias if shift is None else conv._shifted_bias(shift)

    def run(how):
        if how == "subpixel":
            return _subpixel(conv, x, bias)
        return conv(upsample_nearest2x(x), shift=shift)

    key = (x.dtype, x.is_contiguous(), tuple(x.shape), tuple(conv.weight.shape), torch.get_num_threads())
    name, out = tuning.choose("upsample_conv", x.device, key, ("upsample", "subpixel"), "upsample", run,
                              elements=4 * x.numel() + conv.weight.numel())
    if name != "subpixel":
        conv._phases = None
    return out
