"""The `attention` op: multi-head self-attention read straight from the packed qkv of the ADM U-Net.

qkv: (batch, 3 * C, *spatial) as the checkpoint's qkv 1x1 conv produces it, channel = s * C + h * D + d with
s in (q, k, v), h the head, D = C // num_heads. Tokens are the T = prod(spatial) positions. Output:
(batch, C, *spatial), channel = h * D + d (what proj_out consumes), in qkv's memory layout (channels_last in,
channels_last out). Softmax scale 1/sqrt(D), no mask; softmax and accumulation in fp32.

Kernel contract (every backend): fill `out` from `qkv`, both either contiguous or 4-d channels_last (the op
makes them so); read them through their strides (batch, channel, token), never through copies.
"""

from __future__ import annotations

import math

import torch

from .. import backends
from .._extension import compiled
from ._common import check_tensor, dense_layout, direct, kernel_of, needs_grad

IMPLEMENTED = backends.implemented("attention", "attention", python=("torch", "reference"))


def heads_view(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """qkv (B, 3C, *spatial) as a strided view (3, B, heads, T, D): no copy, whatever the memory layout."""
    batch, three_c = qkv.shape[:2]
    head_dim = three_c // (3 * num_heads)
    tokens = qkv.reshape(batch, three_c, -1)  # a view for contiguous and channels_last alike
    return tokens.view(batch, 3, num_heads, head_dim, tokens.shape[-1]).permute(1, 0, 2, 4, 3)


def attention_output(qkv: torch.Tensor) -> torch.Tensor:
    """The (B, C, *spatial) output buffer, channels_last when qkv is."""
    batch, three_c, *spatial = qkv.shape
    shape = (batch, three_c // 3, *spatial)
    if qkv.dim() == 4 and qkv.is_contiguous(memory_format=torch.channels_last) and not qkv.is_contiguous():
        return torch.empty(shape, dtype=qkv.dtype, device=qkv.device, memory_format=torch.channels_last)
    return qkv.new_empty(shape)


def out_heads_view(out: torch.Tensor, num_heads: int) -> torch.Tensor:
    """out (B, C, *spatial) as a view (B, heads, T, D)."""
    batch, channels = out.shape[:2]
    tokens = out.reshape(batch, channels, -1)
    return tokens.view(batch, num_heads, channels // num_heads, tokens.shape[-1]).transpose(2, 3)


def attention_reference(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The op in plain (differentiable) PyTorch: explicit softmax in fp32 (float64 stays float64)."""
    q, k, v = heads_view(qkv, num_heads).to(torch.promote_types(qkv.dtype, torch.float32)).unbind(0)
    weights = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    batch, three_c, *spatial = qkv.shape
    return (weights @ v).transpose(2, 3).reshape(batch, three_c // 3, *spatial).to(qkv.dtype)


def attention_reference_out(qkv, num_heads, out):
    out.copy_(attention_reference(qkv, num_heads))


def _sdpa_ready(t: torch.Tensor) -> bool:
    """Whether SDPA takes this view as it is: unit stride along the head dimension, and on CUDA every other stride
    and the start 16-byte aligned (the memory-efficient kernel refuses others, e.g. T = 1 in NCHW, with an error
    instead of a fallback). A view that fails is cloned, not made .contiguous(): that keeps the odd strides of
    size-1 dimensions (T = 1), which the kernel checks too."""
    if t.stride(-1) != 1:
        return False
    if t.device.type != "cuda":
        return True
    align = 16 // t.element_size()
    return t.data_ptr() % 16 == 0 and all(s % align == 0 for s in t.stride()[:-1])


# On the CPU, up to this many tokens two batched matmuls in the channel layout beat SDPA (2 threads, fp32:
# 0.21 vs 0.36 ms at T = 64 and 1.42 vs 1.67 ms at T = 256, batch 1; at T = 1024 SDPA wins, 50 vs 108 ms at batch 4).
CPU_MATMUL_MAX_TOKENS = 256


def matmul_attention(qkv, num_heads, out):
    """Attention as two batched matmuls on the (B * heads, D, T) channel layout (transposes are gemm flags, not
    copies), in fp32 whatever the storage dtype (the CPU has no fast half matmul)."""
    batch, three_c = qkv.shape[:2]
    head_dim = three_c // (3 * num_heads)
    acc = torch.promote_types(qkv.dtype, torch.float32)
    q, k, v = (t.reshape(batch * num_heads, head_dim, -1).to(acc)
               for t in qkv.reshape(batch, 3, num_heads, head_dim, -1).unbind(1))
    logits = torch.baddbmm(q.new_empty(1, 1, 1), q.transpose(1, 2), k, beta=0, alpha=head_dim**-0.5)  # scale in gemm
    weights = torch.softmax(logits, dim=-1)  # (B*heads, T, T)
    if out.is_contiguous() and out.dtype == acc:  # straight into out: (B, C, T) is (B*heads, D, T)
        torch.bmm(v, weights.transpose(1, 2), out=out.view(batch * num_heads, head_dim, -1))
    else:
        out.view(batch, out.shape[1], -1).copy_(torch.bmm(v, weights.transpose(1, 2)).view(batch, three_c // 3, -1))


def sdpa_transposed(qkv, num_heads, out):
    """SDPA for contiguous (NCHW) qkv and out on the CPU: the heads turned into (T, D) rows and the result back
    into the (D, T) channel layout by the compiled tile transpose (cmfast._C.transpose_last2: 1x1152x32x32, the
    heads 0.32 ms where torch's strided copy takes 1.7 ms)."""
    batch, three_c = qkv.shape[:2]
    head_dim = three_c // (3 * num_heads)
    tokens = qkv.view(batch * 3 * num_heads, head_dim, -1)
    rows = qkv.new_empty(batch, 3, num_heads, tokens.shape[-1], head_dim)
    compiled.transpose_last2(tokens, rows.view(tokens.shape[0], -1, head_dim))
    result = torch.nn.functional.scaled_dot_product_attention(*rows.unbind(1)).contiguous()
    compiled.transpose_last2(result.view(batch * num_heads, -1, head_dim), out.view(batch * num_heads, head_dim, -1))


def torch_attention(qkv, num_heads, out):
    """torch's own kernels on strided views: on the CPU at short sequences matmul_attention; else
    scaled_dot_product_attention. (On the CPU this serves where the compiled kernel cannot run, without AVX-512 or
    the extension: csrc/attention.cpp beats it everywhere it runs.) In channels_last the views are unit-stride along the head dimension and go in as
    they are; in NCHW they are not, and copying them first is faster than letting SDPA take them strided (2 CPU
    threads, 1x192x32x32: 7.6 ms vs 16.5 ms; the reference's explicit matmul: 11.7 ms), with the compiled tile
    transpose on the CPU when the extension is there."""
    if qkv.device.type == "cpu":
        if qkv[0, 0].numel() <= CPU_MATMUL_MAX_TOKENS:
            return matmul_attention(qkv, num_heads, out)
        if compiled is not None and qkv.is_contiguous() and out.is_contiguous():
            return sdpa_transposed(qkv, num_heads, out)
    q, k, v = (t if _sdpa_ready(t) else t.clone(memory_format=torch.contiguous_format)
               for t in heads_view(qkv, num_heads).unbind(0))
    out_heads_view(out, num_heads).copy_(torch.nn.functional.scaled_dot_product_attention(q, k, v))


def kernel(backend: str):
    """The backend's kernel in its out= form: kernel(qkv, num_heads, out)."""
    return kernel_of("attention", backend, "attention",
                     (("reference", attention_reference_out), ("torch", torch_attention)))


def _run(qkv, num_heads, tune=True) -> torch.Tensor:
    qkv = dense_layout(qkv)
    out = attention_output(qkv)

    def call(backend):
        kernel(backend)(qkv, num_heads, out)
        return out

    key = (qkv.dtype, qkv.is_contiguous(), tuple(qkv.shape), num_heads)
    return backends.run("attention", qkv.device, IMPLEMENTED, key, call, elements=out.numel(), tune=tune)


@torch.library.custom_op("cmfast::attention", mutates_args=())
def _attention_op(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    return _run(qkv, num_heads, tune=False)  # compiled graphs and exports: a recorded choice, else the fixed order


@_attention_op.register_fake
def _(qkv, num_heads):
    return attention_output(dense_layout(qkv))


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Self-attention of the packed qkv (batch, 3C, *spatial) with `num_heads` heads -> (batch, C, *spatial)."""
    check_tensor("qkv", qkv, min_dim=3)
    if not isinstance(num_heads, int) or num_heads <= 0 or qkv.shape[1] % (3 * num_heads):
        raise ValueError(
            f"num_heads: expected a positive int dividing C = qkv.shape[1] / 3 = {qkv.shape[1] / 3:g}, got {num_heads!r}"
        )
    if needs_grad(qkv):  # training: the differentiable reference
        return attention_reference(qkv, num_heads)
    return (_run if direct(qkv) else torch.ops.cmfast.attention)(qkv, num_heads)
