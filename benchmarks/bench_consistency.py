"""The consistency op around the network, at the sampler's real shapes (batch, 3, 64, 64) and (batch, 3, 256, 256):
  epilogue: c_skip(sigma) * x + c_out(sigma) * F, clamped to [-1, 1]   (2 reads, 1 write)
  prologue: c_in(sigma) * x and 250 ln(sigma)                           (1 read, 1 write)

Providers, same inputs, one run: each cmfast backend of `consistency` that runs on the device; torch eager (the chain
a user writes: the scalings, broadcast multiplies, an add and a clamp); torch.compile of that chain. Memory bound:
GB/s and the fraction of the copy bandwidth measured in the same run.
usage: python -m benchmarks.bench_consistency [runner options] (see python -m benchmarks --help)
"""

from __future__ import annotations

import torch

from cmfast import ops

NAME = "consistency"
BENCHMARKS = ("consistency_epilogue", "consistency_prologue")
PEERS = ("torch-eager", "torch-compile")
SIDES, QUICK_SIDES = (64, 256), (16,)
SIGMA_MIN, SIGMA_DATA = 0.002, 0.5


def _per_sample(c):
    return c[:, None, None, None]


def eager_epilogue(x, f, sigma):
    d = sigma - SIGMA_MIN
    c_skip = SIGMA_DATA**2 / (d**2 + SIGMA_DATA**2)
    c_out = d * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2) ** 0.5
    return (_per_sample(c_skip) * x + _per_sample(c_out) * f).clamp(-1, 1)


def eager_prologue(x, sigma):
    c_in = 1 / (sigma**2 + SIGMA_DATA**2) ** 0.5
    return _per_sample(c_in) * x, 250.0 * torch.log(sigma + 1e-44)


def cmfast_epilogue(x, f, sigma):
    return ops.consistency_epilogue(x, f, sigma, clamp=True)


def cmfast_prologue(x, sigma):
    return ops.consistency_prologue(x, sigma)


def run(session) -> None:
    session.peers.update({b: PEERS for b in BENCHMARKS})
    device, default = session.device, session.default_backend("consistency")
    kinds = {"consistency_epilogue": (session.kernel_providers("consistency", cmfast_epilogue, eager_epilogue), 3),
             "consistency_prologue": (session.kernel_providers("consistency", cmfast_prologue, eager_prologue), 2)}
    for dtype in session.dtypes:
        for batch in session.batches:
            for side in QUICK_SIDES if session.quick else SIDES:
                shape = (batch, 3, side, side)

                def make():
                    return (torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype),
                            torch.rand(batch, device=device) * 80 + SIGMA_MIN)

                for benchmark, (found, tensors) in kinds.items():
                    nbytes = tensors * batch * 3 * side * side * dtype.itemsize
                    sets = session.rotated(make, nbytes)
                    for name, fn in found.items():
                        args = (lambda s: s) if benchmark == "consistency_epilogue" else (lambda s: (s[0], s[2]))
                        note = "default backend" if name == f"cmfast-{default}" else ""
                        session.record(benchmark, name, [lambda fn=fn, a=args(s): fn(*a) for s in sets],
                                       shape="x".join(map(str, shape)), dtype=dtype, batch=batch,
                                       timing=session.kernel_timing, nbytes=nbytes, note=note)
                    del sets


if __name__ == "__main__":
    from .run import main

    main(names=[NAME], prog="python -m benchmarks.bench_consistency")
