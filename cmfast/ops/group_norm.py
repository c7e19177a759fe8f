"""The `group_norm` op: GroupNorm with the ADM U-Net's fused epilogue.

  y = GroupNorm(x; num_groups, eps, weight, bias)
  y = y * (1 + scale) + shift        when scale/shift are given (per sample and channel, shape (batch, C))
  y = SiLU(y)                        when silu=True

Statistics and arithmetic in fp32 whatever the storage dtype (the reference computes GroupNorm in fp32 even
in its fp16 mode); the output has x's dtype and x's memory layout.

An eager call on the compiled backends is one C++ call after the checks (cmfast._C.group_norm: layout, output,
fp32 parameters, kernel): at the U-Net's small shapes the Python around a kernel used to cost as much as the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from .._extension import compiled
from ._common import check_optional, check_tensor, dense_layout, direct, kernel_of, needs_grad

IMPLEMENTED = backends.implemented("group_norm", "group_norm")


def group_norm_reference(x, weight, bias, scale, shift, num_groups, eps, silu) -> torch.Tensor:
    """The op in plain (differentiable) PyTorch, computed in fp32 (float64 stays float64), returned in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    # As (batch, C, tokens): torch's channels_last GroupNorm on the CPU computes the variance as E[x^2] - E[x]^2,
    # which loses precision on small groups; the contiguous kernel does not.
    flat = x.to(acc).reshape(x.shape[0], x.shape[1], -1)
    y = F.group_norm(flat, num_groups, None if weight is None else weight.to(acc),
                     None if bias is None else bias.to(acc), eps).view(x.shape)
    per_channel = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1.0 + scale.to(acc).reshape(per_channel))
    if shift is not None:
        y = y + shift.to(acc).reshape(per_channel)
    return (F.silu(y) if silu else y).to(x.dtype)


def group_norm_reference_out(x, weight, bias, scale, shift, num_groups, eps, silu, out):
    out.copy_(group_norm_reference(x, weight, bias, scale, shift, num_groups, eps, silu))


def kernel(backend: str):
    """The backend's kernel in its out= form: kernel(x, weight, bias, scale, shift, num_groups, eps, silu, out)."""
    return kernel_of("group_norm", backend, "group_norm", (("reference", group_norm_reference_out),))


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):  # the common case, without two calls into torch
        return t
    return t.to(torch.float32).contiguous()


def _run(x, weight, bias, scale, shift, num_groups, eps, silu, tune=True) -> torch.Tensor:
    def call(backend):
        if backend in ("cpu", "cuda"):  # all of the below in one C++ call (small shapes are overhead-bound)
            return compiled.group_norm(x, weight, bias, scale, shift, num_groups, eps, silu)
        xk = dense_layout(x)
        out = torch.empty_like(xk)
        kernel(backend)(xk, _f32(weight), _f32(bias), _f32(scale), _f32(shift), num_groups, eps, silu, out)
        return out

    key = (x.dtype, x.is_contiguous(), tuple(x.shape), num_groups, scale is not None, silu)
    return backends.run("group_norm", x.device, IMPLEMENTED, key, call, elements=x.numel(), tune=tune)


@torch.library.custom_op("cmfast::group_norm", mutates_args=())
def _group_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
) -> torch.Tensor:
    return _run(x, weight, bias, scale, shift, num_groups, eps, silu, tune=False)  # compiled: recorded or fixed


@_group_norm_op.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, silu):
    return torch.empty_like(dense_layout(x))


def group_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    num_groups: int = 32,
    eps: float = 1e-5,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """GroupNorm of x (batch, C, ...), then `* (1 + scale) + shift` (each (batch, C)), then SiLU if `silu`."""
    check_tensor("x", x, min_dim=2)
    batch, channels = x.shape[:2]
    if not isinstance(num_groups, int) or num_groups <= 0 or channels % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of the {channels} channels of x, got {num_groups!r}")
    check_optional("weight", weight, (channels,), x)
    check_optional("bias", bias, (channels,), x)
    check_optional("scale", scale, (batch, channels), x)
    check_optional("shift", shift, (batch, channels), x)
    if not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    if needs_grad(x, weight, bias, scale, shift):  # training: the differentiable reference
        return group_norm_reference(x, weight, bias, scale, shift, num_groups, float(eps), bool(silu))
    op = _run if direct(x) else torch.ops.cmfast.group_norm
    return op(x, weight, bias, scale, shift, num_groups, float(eps), bool(silu))
