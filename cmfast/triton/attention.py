"""Triton kernel of the `attention` op (see cmfast/ops/attention.py for the contract).

Flash attention (forward) straight from the packed qkv: q, k and v of head h are the channels s * C + h * D + d of
qkv viewed as (batch, 3C, T), read through its strides (token stride 1 when contiguous, 3C when channels_last), and
the output goes to channels h * D + d of out (batch, C, T) the same way: no copies or transposes. One program
owns BLOCK_M queries of one (sample, head) and walks the keys BLOCK_N at a time with the online softmax: running
row max and sum in fp32, exp2 with log2(e) folded into the scale, the accumulator rescaled when the max grows.
Products run on tensor cores in the storage type with fp32 accumulation; P is rounded to the storage type for
the PV product, as flash attention does (fp32 inputs keep exact fp32 products: no TF32).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import FP_FUSION, cdiv, interpreted, next_power_of_2, sm_count

# GPU tiles, free of register spills for sm_80 and sm_90a (`make triton-check`; run on an H100 with Triton 3.6).
# fp16/bf16 on tensor cores, 8 warps (two warpgroups), K/V loads pipelined 3 deep (at most 80 KB of shared memory):
BLOCK_M_LARGE = 128  # queries per program while that still gives every SM a program
BLOCK_M_SMALL = 64  # otherwise: twice the programs for small batches
BLOCK_N_HALF = 64  # keys per step at D <= 64, half that at D = 128: S/P tiles beside the D-wide accumulator
# fp32 keeps exact products (no TF32: 1e-5 accuracy), which run on the FMA units: small square tiles, 4 warps.
BLOCK_FP32 = 32  # BLOCK_M = BLOCK_N at D <= 64, half that at D = 128
INTERPRETED_BLOCKS = (32, 32)  # (BLOCK_M, BLOCK_N) in the interpreter: the tests' short sequences take several steps


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """a @ b (+ acc, where not None) with fp32 accumulation: the kernel's products."""
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _dot_via_fp32(a, b, acc, PRECISION: tl.constexpr):
    """The same product with the operands widened to fp32 first (exactly: their values are unchanged), for bf16 in
    Triton's CPU interpreter, whose bf16 tl.dot is wrong (errors of 1e8 in Triton 3.9). Compiled kernels use _dot."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def _attention_kernel(qkv_ptr, out_ptr, T, heads, C, qk_scale, stride_qb, stride_qc, stride_qt, stride_ob, stride_oc,
                      stride_ot, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    sample = (bh // heads).to(tl.int64)
    head_channel = (bh % heads) * HEAD_DIM
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM  # head dims that are not a power of two (or under 16) are padded with zeros
    q_ptr = qkv_ptr + sample * stride_qb + head_channel * stride_qc
    k_ptr = q_ptr + C * stride_qc
    v_ptr = k_ptr + C * stride_qc
    q = tl.load(q_ptr + m[:, None] * stride_qt + d[None, :] * stride_qc, mask=(m < T)[:, None] & d_ok[None, :],
                other=0.0)
    kt_offs = d[:, None] * stride_qc + n[None, :] * stride_qt  # K^T tile [BLOCK_D, BLOCK_N]
    v_offs = n[:, None] * stride_qt + d[None, :] * stride_qc  # V tile [BLOCK_N, BLOCK_D]
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, T, BLOCK_N):
        n_ok = start + n < T
        kt = tl.load(k_ptr + start * stride_qt + kt_offs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(v_ptr + start * stride_qt + v_offs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = DOT(q, kt, None, DOT_PRECISION) * qk_scale  # log2 units
        s = tl.where(n_ok[None, :], s, float("-inf"))  # every step has a valid key: rows never all -inf
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        p = tl.exp2(s - new_max[:, None])
        alpha = tl.exp2(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        acc = DOT(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        row_max = new_max
    out = acc / row_sum[:, None]
    out_ptr += sample * stride_ob + (head_channel + d[None, :]) * stride_oc + m[:, None] * stride_ot
    tl.store(out_ptr, out.to(out_ptr.dtype.element_ty), mask=(m < T)[:, None] & d_ok[None, :])


def _gpu_config(T: int, block_d: int, pairs: int, qkv: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); a short sequence shrinks the tiles to its length."""
    half = 1 if block_d <= 64 else 2
    if qkv.dtype == torch.float32:
        block_m = block_n = BLOCK_FP32 // half
        warps, stages = 4, 2
    else:
        large = cdiv(T, BLOCK_M_LARGE) * pairs >= sm_count(qkv.device)
        block_m, block_n = BLOCK_M_LARGE if large else BLOCK_M_SMALL, BLOCK_N_HALF // half
        warps, stages = 8, 3
    short = max(16, next_power_of_2(T))
    block_m, block_n = min(block_m, short), min(block_n, short)
    return block_m, block_n, warps if block_m >= 64 else 4, stages


def attention(qkv, num_heads, out):
    if qkv.numel() == 0:
        return
    batch, three_c = qkv.shape[:2]
    channels = three_c // 3
    head_dim = channels // num_heads
    block_d = max(16, next_power_of_2(head_dim))
    tokens = qkv.view(batch, three_c, -1)  # views (contiguous or channels_last): raises rather than copies
    out_tokens = out.view(batch, channels, -1)
    T, pairs = tokens.shape[-1], batch * num_heads
    if pairs > 65535:
        raise ValueError(f"attention: batch * num_heads = {pairs} exceeds the grid's 65535")
    in_interpreter = interpreted()
    if in_interpreter:
        (block_m, block_n), warps, stages = INTERPRETED_BLOCKS, 4, 1
    else:
        block_m, block_n, warps, stages = _gpu_config(T, block_d, pairs, qkv)
    _attention_kernel[(cdiv(T, block_m), pairs)](
        tokens, out_tokens, T, num_heads, channels, math.log2(math.e) / math.sqrt(head_dim),
        *tokens.stride(), *out_tokens.stride(),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT=_dot_via_fp32 if in_interpreter and qkv.dtype == torch.bfloat16 else _dot,
        DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
        enable_fp_fusion=FP_FUSION,
    )
