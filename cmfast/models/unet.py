"""The ADM U-Net of the consistency-model checkpoints (docs/model.md section 1), with the reference's module names,
so openai state dicts load as they are, and with every GroupNorm and attention going through cmfast ops.

Precision modes (`UNet.set_precision`): "fp32"; "fp16", the reference's fp16 mode: the convolutions of the
input, middle and output blocks in fp16, while the time and label embeddings, the emb_layers Linears, the
GroupNorm affine parameters and the output head stay fp32 (GroupNorm statistics are fp32 in every mode);
"bf16": the same with bfloat16.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends, memory, ops, tuning
from .config import UNetConfig
from .conv import Conv2d
from .upsample import conv_upsampled, upsample_nearest2x

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0, *, freq_shift: int = 0,
                       cos_first: bool = True) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)] (the reference's; [sin, cos] without cos_first),
    f_i = exp(-ln(max_period) i / (half - freq_shift)), in fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    args = timesteps[:, None].float() * torch.exp(exponent / (half - freq_shift))[None]
    pair = [torch.cos(args), torch.sin(args)]
    emb = torch.cat(pair if cos_first else pair[::-1], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _precision_of(dtype: torch.dtype) -> str:
    for name, value in PRECISIONS.items():
        if value == dtype:
            return name
    raise TypeError(f"dtype: cmfast.UNet runs in {', '.join(str(d).removeprefix('torch.') for d in PRECISIONS.values())} "
                    f"(fp32 or the reference's mixed fp16/bf16 modes), not {str(dtype).removeprefix('torch.')}")


class PrecisionMoves:
    """.half(), .bfloat16(), .float(), .double() as .to(dtype), whose override selects a precision mode (nn.Module's
    versions cast every parameter behind .to's back)."""

    def half(self):
        return self.to(torch.float16)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def float(self):
        return self.to(torch.float32)

    def double(self):
        return self.to(torch.float64)  # refused, naming the modes there are


class FusedGroupNorm(nn.GroupNorm):
    """GroupNorm (32 groups in every released model) whose call can fuse the following scale/shift and SiLU
    (cmfast.ops.group_norm)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__(groups, channels, eps=1e-5)

    def forward(self, x, scale=None, shift=None, silu=False):
        return ops.group_norm(x, self.weight, self.bias, num_groups=self.num_groups, eps=self.eps,
                              scale=scale, shift=shift, silu=silu)


class ResBlock(nn.Module):
    """Keys: in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection (1x1 conv when widths differ)."""

    def __init__(self, channels, emb_channels, out_channels, *, scale_shift, dropout=0.0, up=False, down=False,
                 groups=32, activation="silu"):
        super().__init__()
        self.scale_shift, self.up, self.down, self.gelu = scale_shift, up, down, activation == "gelu"
        act = nn.GELU if self.gelu else nn.SiLU
        self.in_layers = nn.Sequential(FusedGroupNorm(channels, groups), act(),
                                       Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(act(), nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels))
        self.out_layers = nn.Sequential(FusedGroupNorm(out_channels, groups), act(), nn.Dropout(dropout),
                                        Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else Conv2d(channels, out_channels, 1)

    def _norm_act(self, norm, h, scale=None, shift=None):
        """The GroupNorm, scale/shift and activation: SiLU fused into the norm's kernel, GELU after it."""
        if self.gelu:
            return F.gelu(norm(h, scale=scale, shift=shift))
        return norm(h, scale=scale, shift=shift, silu=True)

    def forward(self, x, emb_act):
        """emb_act: the activation of the time(+label) embedding, shared by every block (emb_layers.0 is it)."""
        h = self._norm_act(self.in_layers[0], x)
        if self.up:  # in_layers[2] of the upsampled h, by its measured way (cmfast/models/upsample.py)
            x = upsample_nearest2x(x)
            first = functools.partial(conv_upsampled, self.in_layers[2], h)
        else:
            if self.down:
                h, x = F.avg_pool2d(h, kernel_size=2, stride=2), F.avg_pool2d(x, kernel_size=2, stride=2)
            first = functools.partial(self.in_layers[2], h)
        e = self.emb_layers[1](emb_act)
        norm, dropout, conv = self.out_layers[0], self.out_layers[2], self.out_layers[3]
        if self.scale_shift:
            h = first()
            scale, shift = e.to(h.dtype).chunk(2, dim=1)
            h = self._norm_act(norm, h, scale, shift)
        elif h.shape[0] == 1 and not torch.is_grad_enabled():
            # batch 1: the embedding is a per-channel constant, added with the convolution's bias (in fp32, rounded
            # once: the reference rounds the conv output, then the sum) instead of by a pass over the output
            h = self._norm_act(norm, first(shift=e[0]))
        else:
            h = first()
            e = e.to(h.dtype)[:, :, None, None]
            # in place on the fresh conv output when nothing records it for a backward: the same sum, no new buffer
            h = self._norm_act(norm, h + e if torch.is_grad_enabled() else h.add_(e))
        return conv(dropout(h), add=self.skip_connection(x))  # skip(x) + conv(h), the add fused where it can be


class Downsample(nn.Module):
    """The reference's Downsample with conv_resample (resblock_updown=False). Key: op (3x3 convolution, stride 2)."""

    def __init__(self, channels):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb_act=None):
        return self.op(x)


class Upsample(nn.Module):
    """The reference's Upsample with conv_resample: nearest 2x, then conv (3x3)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb_act=None):
        return conv_upsampled(self.conv, x)


class AttentionBlock(nn.Module):
    """Keys: norm, qkv (1x1 conv C -> 3C, channels ordered (q|k|v, head, d)), proj_out (1x1 conv)."""

    def __init__(self, channels, num_head_channels, groups=32):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"num_head_channels: {num_head_channels} does not divide {channels} channels")
        self.num_heads = channels // num_head_channels
        self.norm = FusedGroupNorm(channels, groups)
        self.qkv = Conv2d(channels, 3 * channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x, emb_act=None):
        qkv = self.qkv(self.norm(x))
        return self.proj_out(ops.attention(qkv, self.num_heads), add=x)


class Block(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: layers applied in order (keys .0, .1, .2)."""

    def forward(self, h, emb_act):
        for layer in self:
            h = layer(h, emb_act) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(h)
        return h


def _may_sync(t: torch.Tensor) -> bool:
    """Whether a value check may read `t` on the host: not while compiling nor while capturing a CUDA graph, and not
    on the meta device (no values: shape tracing)."""
    if t.is_meta or torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


@torch.compiler.assume_constant_result
def _compiled_layout(unet, dtype: torch.dtype, unlabelled: bool, device: torch.device) -> bool:
    """Whether a compiled CPU forward of `unet` (set_channels_last(None)) runs channels_last: the layout recorded for
    this model, precision and dtype where its records (at any input shape: a graph may serve several, and its shapes
    need not be known while it is traced) agree, else the fixed one. Called while tracing; the answer is a constant
    of the graph."""
    if backends.forced() == "reference":
        return False
    names = set(tuning.recorded_with_prefix("layout", device, unet.layout_model_key(dtype, unlabelled)))
    name = names.pop() if len(names) == 1 else unet.fixed_layout()
    return name == "channels_last"


class UNet(PrecisionMoves, nn.Module):
    """The reference's UNetModel: forward(x, timesteps, y=None) -> the raw network output (batch, out, H, W)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        c0, emb = c.model_channels, 4 * c.model_channels
        self.time_embed = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes, emb)

        def res(cin, cout, **kw):
            return ResBlock(cin, emb, cout, scale_shift=c.use_scale_shift_norm, dropout=c.dropout, groups=c.num_groups,
                            activation=c.activation, **kw)

        def attention(channels):
            return AttentionBlock(channels, c.num_head_channels, c.num_groups)

        ch = c0 * c.channel_mult[0]
        self.input_blocks = nn.ModuleList([Block([Conv2d(c.in_channels, ch, 3, padding=1)])])
        skips = [ch]
        last = len(c.channel_mult) - 1
        for level, (mult, attn) in enumerate(zip(c.channel_mult, c.attention_levels)):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, c0 * mult)]
                ch = c0 * mult
                if attn:
                    layers.append(attention(ch))
                self.input_blocks.append(Block(layers))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(Block([res(ch, ch, down=True) if c.resblock_updown else Downsample(ch)]))
                skips.append(ch)
        self.middle_block = Block([res(ch, ch), attention(ch), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(c.channel_mult))):
            mult, attn = c.channel_mult[level], c.attention_levels[level]
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), c0 * mult)]
                ch = c0 * mult
                if attn:
                    layers.append(attention(ch))
                if level and i == c.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if c.resblock_updown else Upsample(ch))
                self.output_blocks.append(Block(layers))
        self.out = nn.Sequential(FusedGroupNorm(ch, c.num_groups), nn.SiLU(), Conv2d(ch, c.out_channels, 3, padding=1))
        self.precision = "fp32"
        self.channels_last = False

    @property
    def block_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def dtype(self) -> torch.dtype:
        """The precision mode's dtype (that of the block convolutions; embeddings and head stay fp32)."""
        return PRECISIONS[self.precision]

    @property
    def device(self) -> torch.device:
        return self.time_embed[0].weight.device

    def to(self, *args, **kwargs) -> "UNet":
        """nn.Module.to, where a dtype selects the precision mode (float32, float16, bfloat16: set_precision) instead
        of casting every parameter, which would leave the fp32 parts of the mixed mode in the wrong dtype. Casting
        is lossy as for any module: fp32 -> bf16 -> fp32 does not give the fp32 weights back."""
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            self.set_precision(_precision_of(dtype))
        if device is not None or memory_format is not None:
            super().to(device=device, non_blocking=non_blocking, memory_format=memory_format)
        return self


    def set_precision(self, precision: str) -> "UNet":
        """fp32, or the reference's mixed mode with fp16 or bf16 block convolutions (see the module docstring)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in blocks.modules():
                if isinstance(module, nn.Conv2d):
                    module.to(PRECISIONS[precision])
        self.precision = precision
        return self

    def set_channels_last(self, enabled: bool | None = True) -> "UNet":
        """Run the convolutions (and so every activation) in channels_last memory layout (True), in NCHW (False), or
        (None) in the layout measured faster for this model, device, precision and input shape (cmfast.tuning: both
        timed at the first inference call of a shape, then recorded). Where nothing is measured (CMFAST_TUNE=0, tiny
        calls) or the two are within the measurement's noise: channels_last in fp16/bf16 (the layout oneDNN's and
        cuDNN's half-precision convolutions prefer; 1.5x NCHW's speed on an AMX Xeon, about 5% on a Zen 4 at batch
        4), NCHW in fp32; NCHW in training and under torch.compile on a GPU (on the CPU a compiled forward takes the
        recorded layout, else the fixed one, without moving the weights). With None the output is NCHW whatever runs
        inside."""
        if enabled is not None:
            self._weights_layout(enabled)
        self.channels_last = enabled
        return self

    def _weights_layout(self, channels_last: bool) -> None:
        if getattr(self, "_weights_cl", False) != channels_last:  # a no-op when already so (CUDA-graph capture)
            self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            for module in self.modules():
                if isinstance(module, Conv2d):
                    module.relaid()
            self._weights_cl = channels_last

    def layout_key(self, x: torch.Tensor, y) -> tuple:
        """The class of call a layout is measured for: this architecture, precision, input dtype, labels or none,
        threads, and the input's shape (last: a compiled graph looks for the records at any shape)."""
        return self.layout_model_key(x.dtype, y is None) + (tuple(x.shape),)

    def layout_model_key(self, dtype: torch.dtype, unlabelled: bool) -> tuple:
        return (zlib.crc32(repr(self.config).encode()), self.precision, dtype, unlabelled, torch.get_num_threads())

    def fixed_layout(self) -> str:
        """The layout set_channels_last(None) takes where nothing is measured, or on a tie (see there)."""
        return "nchw" if self.precision == "fp32" else "channels_last"

    def _measured_layout(self, x, timesteps, y) -> torch.Tensor:
        """The forward in the layout measured faster for this class of call (set_channels_last(None))."""
        if (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())) or x.is_meta \
                or x.dim() != 4:
            return self._forward(x, timesteps, y, channels_last=False)
        if torch.compiler.is_compiling():  # the layout recorded (else the fixed one); the weights left as they are
            channels_last = x.device.type == "cpu" and not torch.compiler.is_exporting() \
                and _compiled_layout(self, x.dtype, y is None, x.device)
            return self._forward(x, timesteps, y, channels_last=channels_last).contiguous()
        if backends.forced() == "reference":
            return self._forward(x, timesteps, y, channels_last=False)

        def prepare(name):  # outside the timing: a converted model stays converted
            self._weights_layout(name == "channels_last")

        def run(name):
            prepare(name)
            return self._forward(x, timesteps, y, channels_last=name == "channels_last")

        name, out = tuning.choose("layout", x.device, self.layout_key(x, y), ("nchw", "channels_last"),
                                  self.fixed_layout(), run, elements=tuning.TINY_ELEMENTS, prepare=prepare)
        self._weights_layout(name == "channels_last")
        return out.contiguous()

    def _check_inputs(self, x, timesteps, y):
        c = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != c.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (batch, {c.in_channels}, H, W), got {got}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        levels = 2 ** (len(c.channel_mult) - 1)
        if x.shape[2] % levels or x.shape[3] % levels:
            raise ValueError(f"x: height and width must be multiples of {levels}, got {tuple(x.shape[2:])}")
        if timesteps.dim() != 1 or timesteps.shape[0] != x.shape[0]:
            raise ValueError(f"timesteps: expected shape ({x.shape[0]},), got {tuple(timesteps.shape)}")
        if c.num_classes is None:
            if y is not None:
                raise ValueError("y: this model is unconditional; class labels must be None")
            return
        if y is None:
            raise ValueError(f"y: this model is class-conditional ({c.num_classes} classes); class labels are required")
        if y.shape != (x.shape[0],) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"y: expected integer labels of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        if _may_sync(y) and y.numel() and (y.min() < 0 or y.max() >= c.num_classes):
            raise ValueError(f"y: class labels must lie in [0, {c.num_classes}), got [{int(y.min())}, {int(y.max())}]")

    def forward(self, x: torch.Tensor, timesteps, y: torch.Tensor | None = None) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if y is not None and not isinstance(y, torch.Tensor):  # labels as a list or tuple of ints
            try:
                y = torch.as_tensor(y, device=x.device)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"y: expected integer class labels, got {type(y).__name__} {y!r:.80}") from None
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        self._check_inputs(x, timesteps, y)
        if y is not None and y.dtype != torch.long:
            y = y.long()  # uint8, int32, ...: nn.Embedding indexes with int64 (a uint8 index would be a mask)
        if x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            with memory.reusing():  # the large activations' memory reused from the last forward: no page faults
                return self._dispatch(x, timesteps, y)
        return self._dispatch(x, timesteps, y)

    def _dispatch(self, x, timesteps, y) -> torch.Tensor:
        if self.channels_last is None:
            return self._measured_layout(x, timesteps, y)
        return self._forward(x, timesteps, y, self.channels_last)

    def _forward(self, x, timesteps, y, channels_last: bool) -> torch.Tensor:
        c = self.config
        emb = self.time_embed(timestep_embedding(timesteps, c.model_channels, freq_shift=c.freq_shift,
                                                 cos_first=c.flip_sin_to_cos))
        if self.config.num_classes is not None:
            emb = emb + self.label_emb(y)
        emb_act = F.gelu(emb) if c.activation == "gelu" else F.silu(emb)
        h = (2 * x - 1.0 if c.center_input_sample else x).to(self.block_dtype)
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb_act)
            skips.append(h)
        h = self.middle_block(h, emb_act)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb_act)
        h = self.out[0](h.to(x.dtype), silu=True)
        return self.out[2](h.to(self.out[2].weight.dtype))
