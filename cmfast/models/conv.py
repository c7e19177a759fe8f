"""The U-Net's convolutions, each run the way measured fastest for its class of call (cmfast.tuning):

- "conv": torch's convolution (oneDNN on the CPU, cuDNN on a GPU), as the reference runs it;
- "packed" (CPU, channels_last: oneDNN returns channels_last whatever it is given, and a layout the user did
  not ask for is not the op's to pick): oneDNN's convolution on weights reordered once into the blocked layout oneDNN picks for this
  input shape. torch's eager convolution reorders the weights on every call, which dominates where the weights
  outweigh the activations (2 Sapphire Rapids cores, bf16, 1x768x8x8 3x3: 1.44 ms eager, 0.48 ms packed), and
  at other shapes costs (4x384x64x64 bf16 3x3: 36 ms eager, 99 ms packed), hence a measured choice per shape;
- "matmul" (1x1 convolutions: attention's qkv and proj_out, the skip connections): the same product as a matrix
  multiplication on the same weights, as diffusers runs its attention projections;
- "winograd" (CPU, channels_last, 3x3 stride 1 padding 1: the ResBlocks' and Upsample's convolutions; fp32, or bf16
  where the CPU has AVX512_BF16 and the channels come in 32s): Winograd's F(2x2, 3x3) algorithm
  (cmfast/models/winograd.py), 2.25x fewer multiplications;
- "taps" (CPU, fp32, channels_last, 3x3 stride 1 padding 1, at most MAX_TAPS_OUT output channels: the output head,
  256 -> 3): one matrix product for the nine taps at once, (pixels, C) x (C, 9 O), then each tap's O columns added
  to the output shifted by its offset. oneDNN's direct kernels are made for many output channels (1x256x256x256 ->
  3 on 2 Sapphire Rapids threads: 10.9 ms; this way 3.9).

Under torch.compile (CPU inference) each convolution is one registered op, cmfast::conv2d, which runs the module's
own code with the choice recorded for its class of call (else the fixed order), nothing timed: a compiled U-Net
keeps the measured ways (Inductor would otherwise run every convolution the reference's way, giving back cmfast's
lead). The op names its module by a number (handle): a module's state (derived weights, records) stays out of the
graph, and the graph reads the weights when it runs, as the eager module does.

The first three and "taps" compute the same sums (fp32 accumulation; only the order of additions differs);
Winograd's transforms round differently: in fp32 by no more than the direct sum's own rounding, in bf16 by up to
2x the direct convolution's error, invisible at a U-Net's output (figures in cmfast/models/winograd.py). Under
autograd, torch.compile on a GPU, torch.export (a program that outlives the process: no module handles in it),
and with the reference backend forced for every op, the module is a plain nn.Conv2d.
"""

from __future__ import annotations

import functools
import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends, tuning
from . import winograd

MAX_TAPS_OUT = 8  # "taps": its product's output is 9x the convolution's, fine for a few channels only


@functools.cache
def packed_available() -> bool:
    """Whether this torch has oneDNN's prepacked convolution ops (its CPU builds with mkldnn do)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_convolution_weight  # noqa: B018 (looked up: raises where the op is missing)
        torch.ops.mkldnn._convolution_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


_modules: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()
_numbers = itertools.count()


@torch.compiler.assume_constant_result
def handle(module: nn.Module) -> int:
    """The number naming `module` for the registered ops (torch.compile calls this while tracing and keeps the
    number in the graph; a copy of the module gets a number of its own)."""
    number = module.__dict__.get("_handle")
    if number is None or _modules.get(number) is not module:
        number = next(_numbers)
        module.__dict__["_handle"] = number
        _modules[number] = module
    return number


def module_of(number: int) -> nn.Module:
    module = _modules.get(number)
    if module is None:
        raise RuntimeError(f"cmfast: the module a compiled graph names ({number}) no longer exists")
    return module


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the convolutions return for input x (and a registered op's output must have)."""
    return torch.channels_last if _channels_last(x) else torch.contiguous_format


@torch.library.custom_op("cmfast::conv2d", mutates_args=())
def _conv_op(x: torch.Tensor, add: torch.Tensor | None, shift: torch.Tensor | None, module: int) -> torch.Tensor:
    with tuning.no_timing():
        out = module_of(module)(x, add=add, shift=shift)
    return out.contiguous(memory_format=memory_format(x))


@_conv_op.register_fake
def _(x, add, shift, module):
    return torch.empty(module_of(module).output_shape(x), dtype=x.dtype, device=x.device,
                       memory_format=memory_format(x))


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters and state-dict names) whose inference calls run the measured-fastest way."""

    _packed: tuple | None = None  # (input shape, weight identity, packed weight) for "packed"
    _winograd: tuple | None = None  # (weight identity, transformed filters) for "winograd"
    _phases: tuple | None = None  # (weight identity, 2x2 phase kernels) for upsample.conv_upsampled's "subpixel"

    def candidates(self, x: torch.Tensor) -> tuple[str, ...]:
        names = ["conv"]
        pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and self.groups == 1
        if pointwise and x.dim() == 4:
            names.append("matmul")
        if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and _channels_last(x)
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple) and packed_available()):
            names.append("packed")
        if _channels_last(x) and winograd.takes(self, x):
            names.append("winograd")
        if (_channels_last(x) and x.device.type == "cpu" and x.dtype == torch.float32
                and self.out_channels <= MAX_TAPS_OUT and winograd.applies(self)):
            names.append("taps")
        return tuple(names)

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        """conv(x), plus `add` (the residual: same shape as the output) when given, fused where the kernel can; `shift`
        (out_channels values, any float dtype) is added to the bias, in fp32 and rounded once to the weights' dtype
        (fp32 where the kernel takes an fp32 bias): a ResBlock's time embedding at batch 1."""
        plain = (torch.is_grad_enabled() and self.weight.requires_grad) or type(x) is not torch.Tensor or x.is_meta \
            or x.dtype != self.weight.dtype
        if not plain and torch.compiler.is_compiling():
            if x.device.type == "cpu" and isinstance(self.padding, tuple) and not torch.compiler.is_exporting():
                return _conv_op(x, add, shift, handle(self))  # (padding not "same" / "valid": output_shape)
            plain = True  # a GPU (Inductor's convolutions and layout choice), or an export (no module handles)
        bias = self.bias if shift is None else self._shifted_bias(shift)
        if plain or backends.forced() == "reference":
            out = self._conv_forward(x, self.weight, None if bias is None else bias.to(self.weight.dtype))
            return out if add is None else add + out
        candidates = self.candidates(x)
        if add is not None and add.stride() != _output_strides(x, add):
            candidates = tuple(c for c in candidates if c not in ("packed", "winograd"))  # they fuse the add in place
        key = (x.dtype, x.is_contiguous(), tuple(x.shape), tuple(self.weight.shape), self.stride, self.padding,
               self.groups, add is not None, torch.get_num_threads())
        name, out = tuning.choose("conv2d", x.device, key, candidates, "conv",
                                  functools.partial(self._run, x, add, bias), elements=x.numel() + self.weight.numel())
        # Only the modules that run packed or Winograd keep those second copies of their weights (kept where this
        # class of call could not run them: the layout measurement alternates NCHW and channels_last calls).
        if name != "packed" and "packed" in candidates:
            self._packed = None
        if name != "winograd" and "winograd" in candidates:
            self._winograd = None
        return out

    def output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        sizes = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                 zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride)]
        return (x.shape[0], self.out_channels, *sizes)

    def _shifted_bias(self, shift: torch.Tensor) -> torch.Tensor:
        if shift.shape != (self.out_channels,):
            raise ValueError(f"shift: expected shape ({self.out_channels},), got {tuple(shift.shape)}")
        return shift.float() if self.bias is None else self.bias.float() + shift.float()

    def _run(self, x: torch.Tensor, add: torch.Tensor | None, bias: torch.Tensor | None, how: str) -> torch.Tensor:
        if how == "winograd":  # takes an fp32 bias in every dtype
            return winograd.conv3x3(x, self._winograd_filters(), bias, add)
        bias = None if bias is None else bias.to(self.weight.dtype)
        if how == "packed":
            return self._packed_conv(x, add, bias)
        if how == "taps":
            return self._taps(x, add, bias)
        out = self._matmul(x, bias) if how == "matmul" else self._conv_forward(x, self.weight, bias)
        return out if add is None else out.add_(add)  # in place on the fresh output: add + out, no new buffer

    def _taps(self, x: torch.Tensor, add: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        o = self.out_channels
        taps = self.weight.permute(1, 2, 3, 0).reshape(channels, 9 * o)  # columns (dy, dx, out)
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # a view: (B*H*W, C)
        p = torch.mm(rows, taps).view(batch, height, width, 3, 3, o)
        out = p[:, :, :, 1, 1].clone(memory_format=torch.contiguous_format)  # the centre tap covers every pixel
        for dy in range(3):
            for dx in range(3):
                if (dy, dx) == (1, 1):
                    continue
                y0, y1 = max(0, 1 - dy), height - max(0, dy - 1)  # output rows whose input row y + dy - 1 exists
                x0, x1 = max(0, 1 - dx), width - max(0, dx - 1)
                out[:, y0:y1, x0:x1] += p[:, y0 + dy - 1:y1 + dy - 1, x0 + dx - 1:x1 + dx - 1, dy, dx]
        if bias is not None:
            out += bias
        if add is not None:
            out += add.permute(0, 2, 3, 1)
        return out.permute(0, 3, 1, 2)  # channels_last, as the convolution returns

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        weight = self.weight.view(self.out_channels, channels)
        if _channels_last(x):
            rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # a view: (B*H*W, C)
            out = F.linear(rows, weight, bias)
            return out.view(batch, height, width, -1).permute(0, 3, 1, 2)  # channels_last, as the conv returns
        out = torch.matmul(weight, x.reshape(batch, channels, -1))
        if bias is not None:
            out += bias.view(-1, 1)
        return out.view(batch, -1, height, width)

    def relaid(self) -> None:
        """The weights were put in another memory layout, their values unchanged (UNet.set_channels_last): what was
        derived from them still holds (the layout measurement flips the layout before each timed call)."""
        identity = self._identity()
        if self._winograd is not None:
            self._winograd = (identity, self._winograd[1])
        if self._packed is not None:
            self._packed = (self._packed[0], identity, self._packed[2])
        self._phases = None  # made again in the new layout, which oneDNN's convolution wants them in

    def _identity(self) -> tuple:
        return (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device)

    def _winograd_filters(self) -> torch.Tensor:
        identity = self._identity()
        if self._winograd is None or self._winograd[0] != identity:
            self._winograd = (identity, winograd.prepared(self.weight))
        return self._winograd[1]

    def _packed_conv(self, x: torch.Tensor, add: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        shape = tuple(x.shape)
        identity = self._identity()
        if self._packed is None or self._packed[:2] != (shape, identity):
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(shape))
            self._packed = (shape, identity, packed)
        args = (self._packed[2], bias, list(self.padding), list(self.stride), list(self.dilation), self.groups)
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(x, *args, "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, add, *args, "add", None, None, [], None)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _output_strides(x: torch.Tensor, out: torch.Tensor) -> tuple[int, ...]:
    """The strides of a dense output of out's shape in x's memory layout (what the convolution returns)."""
    b, c, h, w = out.shape
    return (h * w * c, 1, w * c, c) if _channels_last(x) else (c * h * w, h * w, w, 1)
