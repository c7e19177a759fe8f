"""Helpers every op module shares: input validation with messages that name the argument, the layout rule
of the kernels (dense, batch outermost), and backend dispatch."""

from __future__ import annotations

import functools
import importlib

import struct

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def f32(v: float) -> float:
    """v rounded to the nearest float32, so Python-side constants equal the kernels' fp32 ones."""
    return struct.unpack("f", struct.pack("f", v))[0]


def check_tensor(name: str, t, *, dtypes=FLOAT_DTYPES, min_dim: int = 0) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {allowed}, got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (the device of {like_name}), got {t.device}")


def check_optional(name: str, t, shape: tuple[int, ...], x: torch.Tensor) -> None:
    """t is None, or a float tensor of `shape` on the device of x. The common case costs a few attribute reads
    (ops run ~100 times a U-Net forward); the messages are built only when a check fails."""
    if t is None or (isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES and t.shape == shape
                     and t.device == x.device):
        return
    check_tensor(name, t)
    check_same_device(name, t, "x", x)
    raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def per_sample(name: str, value, x: torch.Tensor) -> torch.Tensor:
    """A per-sample float tensor of shape (batch,): a number or 0-dim tensor is broadcast over the batch."""
    batch = x.shape[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((batch,), float(value), dtype=torch.float32, device=x.device)
    check_tensor(name, value, dtypes=None)
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {str(value.dtype).removeprefix('torch.')}")
    check_same_device(name, value, "x", x)
    if value.dim() == 0:
        return value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (one value per sample of x), got {tuple(value.shape)}")
    return value


def is_dense(t: torch.Tensor) -> bool:
    """Its elements fill a block of memory exactly once, in some order of the dimensions."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def is_flat(t: torch.Tensor) -> bool:
    """Dense with the batch dimension outermost: the kernels can treat it as a flat [batch, n] array."""
    if not is_dense(t):
        return False
    return t.dim() == 0 or t.shape[0] <= 1 or t.stride(0) * t.shape[0] == t.numel()


@functools.cache  # once per (kernel, backend): an import statement and torch.ops lookups per call add up
def kernel_of(name: str, backend: str, module: str, python: tuple = ()):
    """The out= form of kernel `name` on `backend`: the compiled op torch.ops.cmfast_C.<name> for "cpu" and "cuda"
    (the dispatcher picks by device), cmfast.triton.<module>.<name> for "triton", and for "reference" / "torch" the
    Python function given in `python` as (backend, function) pairs."""
    for candidate, function in python:
        if candidate == backend:
            return function
    if backend == "triton":
        return getattr(importlib.import_module(f"cmfast.triton.{module}"), name)
    op = getattr(torch.ops.cmfast_C, name)
    return getattr(op, "default", op)


def dense_layout(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels take it: contiguous, or channels_last when it already is (4-d)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def elementwise_output(x: torch.Tensor) -> torch.Tensor:
    """The output buffer of an elementwise op: x's layout when the kernels can use it, else contiguous."""
    if is_flat(x):
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def laid_out_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t with exactly the strides of `like` (a copy only when they differ)."""
    if t.stride() == like.stride() and t.dtype == like.dtype:
        return t
    return torch.empty_like(like).copy_(t)


def needs_grad(*tensors) -> bool:
    """Whether autograd must see through the op (training): the ops' kernels have no backward, their references do."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def direct(x: torch.Tensor) -> bool:
    """Whether an eager call may run an op's implementation directly, skipping the registered op's dispatch (about
    20 us a call, which adds up over a U-Net's 117 norm and attention calls at small batches). Only torch.compile,
    export, and tensor subclasses (fake, functional) or meta tensors need the registered op."""
    return type(x) is torch.Tensor and not x.is_meta and not torch.compiler.is_compiling()

