"""Triton kernels of the `consistency` op (see cmfast/ops/consistency.py for the contract).

Inputs are flat [batch, n] arrays (dense, batch outermost, all laid out alike). The 1-D grid has
`blocks_per_sample` programs per sample, so there is no grid-dimension limit on the batch size. Each
program computes its sample's scalings once in fp32 with correctly rounded division and square root,
like the C++ kernels, and streams BLOCK elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import FP_FUSION, cdiv

BLOCK = 1024  # elements per program: 8 per thread at 4 warps, two 16-byte packets of fp16 or fp32
NUM_WARPS = 4  # memory-bound streaming; more warps add no bandwidth at this block size


@triton.jit
def _scalings(s, sigma_data, sigma_min):
    sd2 = sigma_data * sigma_data
    d = s - sigma_min
    r = tl.sqrt_rn(s * s + sd2)
    return tl.div_rn(sd2, d * d + sd2), tl.div_rn(d * sigma_data, r), tl.div_rn(1.0, r)


@triton.jit
def _epilogue_kernel(x_ptr, f_ptr, sigma_ptr, out_ptr, n, blocks_per_sample, sigma_data, sigma_min,
                     CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // blocks_per_sample
    offs = (pid % blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    c_skip, c_out, _ = _scalings(tl.load(sigma_ptr + b), sigma_data, sigma_min)
    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    f = tl.load(f_ptr + base + offs, mask=mask).to(tl.float32)
    v = c_skip * x + c_out * f
    if CLAMP:  # where() keeps NaN, as torch.clamp does
        v = tl.where(v < -1.0, -1.0, tl.where(v > 1.0, 1.0, v))
    tl.store(out_ptr + base + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prologue_kernel(x_ptr, sigma_ptr, out_ptr, t_in_ptr, n, blocks_per_sample, sigma_data, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // blocks_per_sample
    block = pid % blocks_per_sample
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    s = tl.load(sigma_ptr + b)
    _, _, c_in = _scalings(s, sigma_data, 0.0)
    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + base + offs, (c_in * x).to(out_ptr.dtype.element_ty), mask=mask)
    if block == 0:
        tl.store(t_in_ptr + b, 250.0 * tl.log(s + 1e-44))


def _grid(x: torch.Tensor) -> tuple[int, int]:
    batch = x.shape[0]
    n = x.numel() // max(batch, 1)
    return n, cdiv(n, BLOCK)


def consistency_epilogue(x, model_output, sigma, sigma_data, sigma_min, clamp, out):
    n, blocks = _grid(x)
    if x.numel() == 0:
        return
    _epilogue_kernel[(blocks * x.shape[0],)](
        x, model_output, sigma, out, n, blocks, sigma_data, sigma_min, CLAMP=clamp, BLOCK=BLOCK, num_warps=NUM_WARPS,
        enable_fp_fusion=FP_FUSION,
    )


def consistency_prologue(x, sigma, sigma_data, out, t_in):
    n, blocks = _grid(x)
    if x.shape[0] == 0:
        return
    _prologue_kernel[(max(blocks, 1) * x.shape[0],)](
        x, sigma, out, t_in, n, max(blocks, 1), sigma_data, BLOCK=BLOCK, num_warps=NUM_WARPS,
        enable_fp_fusion=FP_FUSION,
    )
