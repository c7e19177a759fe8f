"""Self-attention of the ADM U-Net from its packed qkv (batch, 3C, H, W), heads = C / 64, at the ImageNet-64
attention resolutions: T = 1024 (C 384), 256 (C 576), 64 (C 768) tokens.

Providers, same inputs, one run: each cmfast backend of `attention` that runs on the device; torch eager, the
reference U-Net's chain (openai's QKVAttention: split, two einsums with the scale on q and k, softmax in fp32);
torch-sdpa, diffusers' chain (tokens-major q/k/v, scaled_dot_product_attention, transposes back to channels);
torch.compile of the eager chain. Compute bound: 4 * B * heads * T^2 * D FLOPs (QK^T and PV), as TFLOP/s and the
fraction of the dense FLOP/s of the dtype (a large matmul or 3x3 convolution, the faster).
usage: python -m benchmarks.bench_attention [runner options] (see python -m benchmarks --help)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cmfast import ops

NAME = "attention"
BENCHMARKS = ("attention",)
PEERS = ("torch-eager", "torch-sdpa", "torch-compile")
SHAPES = [(384, 32), (576, 16), (768, 8)]  # (channels, H = W); 64 channels per head
QUICK_SHAPES = [(128, 4)]
HEAD_CHANNELS = 64


def eager(qkv, heads: int):
    """openai's QKVAttention (channels (q|k|v, head, d)): the chain the reference U-Net runs."""
    batch, width, *spatial = qkv.shape
    tokens, dim = math.prod(spatial), width // (3 * heads)
    q, k, v = qkv.reshape(batch, width, tokens).chunk(3, dim=1)
    scale = 1 / math.sqrt(math.sqrt(dim))
    weight = torch.einsum("bct,bcs->bts", (q * scale).reshape(batch * heads, dim, tokens),
                          (k * scale).reshape(batch * heads, dim, tokens))
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    out = torch.einsum("bts,bcs->bct", weight, v.reshape(batch * heads, dim, tokens))
    return out.reshape(batch, width // 3, *spatial)


def sdpa(qkv, heads: int):
    """diffusers' chain: tokens-major (batch, T, 3C), heads split off, SDPA, merged and transposed back."""
    batch, width, *spatial = qkv.shape
    tokens, dim = math.prod(spatial), width // (3 * heads)
    seq = qkv.reshape(batch, width, tokens).transpose(1, 2).contiguous()
    q, k, v = (t.view(batch, tokens, heads, dim).transpose(1, 2) for t in seq.chunk(3, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width // 3)
    return out.transpose(1, 2).reshape(batch, width // 3, *spatial)


def run(session) -> None:
    session.peers.update({b: PEERS for b in BENCHMARKS})
    device, default = session.device, session.default_backend("attention")
    found = session.kernel_providers("attention", ops.attention, eager, {"torch-sdpa": sdpa})
    for dtype in session.dtypes:
        for batch in session.batches:
            for channels, side in QUICK_SHAPES if session.quick else SHAPES:
                heads, tokens = channels // HEAD_CHANNELS, side * side
                shape = (batch, 3 * channels, side, side)
                flop = 4 * batch * heads * tokens * tokens * HEAD_CHANNELS
                nbytes = 4 * batch * channels * tokens * dtype.itemsize  # qkv in, out: what rotation must beat

                def make():
                    return torch.randn(shape, device=device).to(dtype)

                sets = session.rotated(make, nbytes)
                for name, fn in found.items():
                    default_note = "; default backend" if name == f"cmfast-{default}" else ""
                    note = f"{heads} heads x 64, T={tokens}{default_note}"
                    session.record(NAME, name, [lambda fn=fn, s=s: fn(s, heads) for s in sets],
                                   shape="x".join(map(str, shape)), dtype=dtype, batch=batch,
                                   timing=session.kernel_timing, flop=flop, note=note)
                del sets


if __name__ == "__main__":
    from .run import main

    main(names=[NAME], prog="python -m benchmarks.bench_attention")
