"""The `consistency` op: the consistency model's preconditioning around the raw network (docs/model.md section 3).

  prologue:  x_in = c_in(sigma) * x,  t_in = 250 * ln(sigma)          (what the U-Net is called with)
  epilogue:  out  = c_skip(sigma) * x + c_out(sigma) * model_output   (optionally clamped to [-1, 1])

sigma is per sample (shape (batch,)). kind="consistency" uses the scalings with the sigma_min shift, so that
f(x, sigma_min) = x exactly; kind="edm" the EDM teacher's unshifted ones. Arithmetic is fp32 whatever the
storage dtype; the output has x's dtype and (when dense, batch outermost) x's memory layout.
"""

from __future__ import annotations


import torch

from .. import backends
from ._common import (
    check_same_device,
    check_tensor,
    direct,
    f32,
    laid_out_like,
    needs_grad,
    elementwise_output,
    kernel_of,
    per_sample,
)

KINDS = ("consistency", "edm")
IMPLEMENTED = backends.implemented("consistency_epilogue", "consistency")


# ---- pure-PyTorch reference: the ground truth of the tests -------------------------------------------------


def consistency_scalings(sigma: torch.Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """(c_skip, c_out, c_in) in fp32, in the kernels' operation order. sigma_min=0 gives the EDM scalings."""
    s = sigma.to(torch.float32)
    sd = f32(sigma_data)
    sd2 = f32(sd * sd)
    d = s - f32(sigma_min)
    r = torch.sqrt(s * s + sd2)
    return sd2 / (d * d + sd2), d * sd / r, 1.0 / r


def time_input(sigma: torch.Tensor) -> torch.Tensor:
    """The network's time input 1000 * 0.25 * ln(sigma + 1e-44), fp32."""
    return 250.0 * torch.log(sigma.to(torch.float32) + 1e-44)


def _per_sample_view(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return c.reshape(c.shape[0], *([1] * (x.dim() - 1)))


def epilogue_reference(x, model_output, sigma, sigma_data, sigma_min, clamp) -> torch.Tensor:
    """The epilogue in plain (differentiable) PyTorch, fp32 arithmetic, x's dtype out."""
    c_skip, c_out, _ = consistency_scalings(sigma, sigma_data, sigma_min)
    v = _per_sample_view(c_skip, x) * x.float() + _per_sample_view(c_out, x) * model_output.float()
    return (v.clamp(-1.0, 1.0) if clamp else v).to(x.dtype)


def prologue_reference(x, sigma, sigma_data) -> tuple[torch.Tensor, torch.Tensor]:
    c_in = consistency_scalings(sigma, sigma_data, 0.0)[2]
    return (_per_sample_view(c_in, x) * x.float()).to(x.dtype), time_input(sigma)


def epilogue_reference_out(x, model_output, sigma, sigma_data, sigma_min, clamp, out):
    out.copy_(epilogue_reference(x, model_output, sigma, sigma_data, sigma_min, clamp))


def prologue_reference_out(x, sigma, sigma_data, out, t_in):
    x_in, t = prologue_reference(x, sigma, sigma_data)
    out.copy_(x_in)
    t_in.copy_(t)


# ---- backends: each fills `out` (and `t_in`) from flat, identically laid-out inputs --------------------------


def epilogue_kernel(backend: str):
    return kernel_of("consistency_epilogue", backend, "consistency", (("reference", epilogue_reference_out),))


def prologue_kernel(backend: str):
    return kernel_of("consistency_prologue", backend, "consistency", (("reference", prologue_reference_out),))


# ---- the implementations, and the registered ops around them (torch.ops.cmfast.*: what torch.compile sees) -----------------------


def _run_epilogue(x, model_output, sigma, sigma_data, sigma_min, clamp, tune=True) -> torch.Tensor:
    out = elementwise_output(x)
    x = laid_out_like(x, out)
    model_output = laid_out_like(model_output, out)
    sigma = sigma.to(torch.float32).contiguous()

    def call(backend):
        epilogue_kernel(backend)(x, model_output, sigma, sigma_data, sigma_min, clamp, out)
        return out

    return _dispatch("epilogue", x, call, tune)


def _dispatch(part: str, x: torch.Tensor, call, tune: bool):
    key = (part, x.dtype, x.is_contiguous(), tuple(x.shape))
    return backends.run("consistency", x.device, IMPLEMENTED, key, call, elements=x.numel(), tune=tune)


@torch.library.custom_op("cmfast::consistency_epilogue", mutates_args=())
def _epilogue_op(
    x: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor, sigma_data: float, sigma_min: float, clamp: bool
) -> torch.Tensor:
    return _run_epilogue(x, model_output, sigma, sigma_data, sigma_min, clamp, tune=False)


@_epilogue_op.register_fake
def _(x, model_output, sigma, sigma_data, sigma_min, clamp):
    return elementwise_output(x)


def _run_prologue(x, sigma, sigma_data, tune=True) -> tuple[torch.Tensor, torch.Tensor]:
    out = elementwise_output(x)
    x = laid_out_like(x, out)
    sigma = sigma.to(torch.float32).contiguous()
    t_in = torch.empty(sigma.shape, dtype=torch.float32, device=x.device)

    def call(backend):
        prologue_kernel(backend)(x, sigma, sigma_data, out, t_in)
        return out, t_in

    return _dispatch("prologue", x, call, tune)


@torch.library.custom_op("cmfast::consistency_prologue", mutates_args=())
def _prologue_op(x: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _run_prologue(x, sigma, sigma_data, tune=False)


@_prologue_op.register_fake
def _(x, sigma, sigma_data):
    return elementwise_output(x), x.new_empty(sigma.shape, dtype=torch.float32)


# ---- public functions: validation, then the op ---------------------------------------------------------------


def _check_constants(sigma_data: float, sigma_min: float | None = None) -> None:
    if not (isinstance(sigma_data, (int, float)) and sigma_data > 0):
        raise ValueError(f"sigma_data: expected a positive number, got {sigma_data!r}")
    if sigma_min is not None and not (isinstance(sigma_min, (int, float)) and 0 <= sigma_min < float("inf")):
        raise ValueError(f"sigma_min: expected a finite number >= 0, got {sigma_min!r}")


def consistency_epilogue(
    x: torch.Tensor,
    model_output: torch.Tensor,
    sigma,
    *,
    sigma_data: float = 0.5,
    sigma_min: float = 0.002,
    kind: str = "consistency",
    clamp: bool = False,
) -> torch.Tensor:
    """c_skip(sigma) * x + c_out(sigma) * model_output, clamped to [-1, 1] if `clamp`.

    x: (batch, ...) float32/float16/bfloat16; model_output: x's shape (cast to x's dtype if it differs);
    sigma: (batch,) floating tensor, or one number for the whole batch.
    """
    check_tensor("x", x, min_dim=1)
    check_tensor("model_output", model_output)
    check_same_device("model_output", model_output, "x", x)
    if model_output.shape != x.shape:
        raise ValueError(f"model_output: expected the shape of x {tuple(x.shape)}, got {tuple(model_output.shape)}")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    _check_constants(sigma_data, sigma_min)
    sigma = per_sample("sigma", sigma, x)
    shift = float(sigma_min) if kind == "consistency" else 0.0
    if needs_grad(x, model_output, sigma):  # training: the differentiable reference
        return epilogue_reference(x, model_output.to(x.dtype), sigma, float(sigma_data), shift, bool(clamp))
    op = _run_epilogue if direct(x) else torch.ops.cmfast.consistency_epilogue
    return op(x, model_output, sigma, float(sigma_data), shift, bool(clamp))


def consistency_prologue(x: torch.Tensor, sigma, *, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_in(sigma) * x, 250 * ln(sigma)): the network's input and its time input (fp32, shape (batch,))."""
    check_tensor("x", x, min_dim=1)
    _check_constants(sigma_data)
    sigma = per_sample("sigma", sigma, x)
    if needs_grad(x, sigma):
        return prologue_reference(x, sigma, float(sigma_data))
    return (_run_prologue if direct(x) else torch.ops.cmfast.consistency_prologue)(x, sigma, float(sigma_data))


__all__ = [
    "consistency_epilogue",
    "consistency_prologue",
    "consistency_scalings",
    "time_input",
]
