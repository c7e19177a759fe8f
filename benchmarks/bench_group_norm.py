"""GroupNorm(32) with the ResBlock's fused epilogue, y = SiLU(GN(x) * (1 + scale) + shift), at the ImageNet-64
U-Net's widths and resolutions (C in 192..768, H = W in 64..8).

Providers, same inputs, one run: each cmfast backend of `group_norm` that runs on the device; torch eager, the
reference's composite (F.group_norm in fp32, cast back, scale/shift and SiLU in the storage dtype, as the
reference's fp16 mode does); torch.compile of that composite. Memory bound: GB/s counts x read once and y written
once (plus the per-channel vectors), the fewest bytes the op must move. At the largest batch of the run the
shapes come again in channels_last (shape label "... nhwc", the channels_last U-Net's layout; no compiled peer).
usage: python -m benchmarks.bench_group_norm [runner options] (see python -m benchmarks --help)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmfast import ops

NAME = "group_norm"
BENCHMARKS = ("group_norm",)
PEERS = ("torch-eager", "torch-compile")
SHAPES = [(c, side) for c in (192, 384, 576, 768) for side in (64, 32, 16, 8)]  # (channels, H = W)
QUICK_SHAPES = [(64, 8), (96, 4)]
GROUPS, EPS = 32, 1e-5


def eager(x, weight, bias, scale, shift):
    y = F.group_norm(x.float(), GROUPS, weight, bias, EPS).to(x.dtype)
    return F.silu(y * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def cuda_path(x) -> str:
    """Which CUDA kernel the op runs for x ("" when the build cannot say), for reading the bandwidth."""
    from cmfast._extension import compiled

    if compiled is None or not hasattr(compiled, "group_norm_cuda_path"):
        return ""
    return f"{compiled.group_norm_cuda_path(x, GROUPS)} kernel"


def cmfast_group_norm(x, weight, bias, scale, shift):
    return ops.group_norm(x, weight, bias, num_groups=GROUPS, eps=EPS, scale=scale, shift=shift, silu=True)


def run(session) -> None:
    session.peers.update({b: PEERS for b in BENCHMARKS})
    device, default = session.device, session.default_backend("group_norm")
    found = session.kernel_providers("group_norm", cmfast_group_norm, eager)
    for dtype in session.dtypes:
        for batch in session.batches:
            # channels_last too at the largest batch (the layout of the channels_last U-Net), without the compiled peer
            for channels_last in (False, True) if batch == max(session.batches) else (False,):
                for channels, side in QUICK_SHAPES if session.quick else SHAPES:
                    measure(session, found, default, dtype, (batch, channels, side, side), channels_last)


def measure(session, found, default, dtype, shape, channels_last) -> None:
    device, (batch, channels) = session.device, shape[:2]
    nbytes = 2 * batch * channels * shape[2] * shape[3] * dtype.itemsize + 2 * batch * channels * dtype.itemsize
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def make():
        return (torch.randn(shape, device=device).to(dtype).contiguous(memory_format=layout),
                1 + 0.1 * torch.randn(channels, device=device), 0.1 * torch.randn(channels, device=device),
                (0.1 * torch.randn(batch, channels, device=device)).to(dtype),
                (0.1 * torch.randn(batch, channels, device=device)).to(dtype))

    sets = session.rotated(make, nbytes)
    for name, fn in found.items():
        if channels_last and name == "torch-compile":
            continue
        note = "; ".join(filter(None, ("default backend" if name == f"cmfast-{default}" else "",
                                       cuda_path(sets[0][0]) if name == "cmfast-cuda" else "")))
        session.record(NAME, name, [lambda fn=fn, s=s: fn(*s) for s in sets],
                       shape="x".join(map(str, shape)) + (" nhwc" if channels_last else ""), dtype=dtype,
                       batch=batch, timing=session.kernel_timing, nbytes=nbytes, note=note)

if __name__ == "__main__":
    from .run import main

    main(names=[NAME], prog="python -m benchmarks.bench_group_norm")
