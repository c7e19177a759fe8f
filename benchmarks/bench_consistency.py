"""Benchmark of the consistency epilogue, c_skip * x + c_out * F clamped, at the sampler's real shapes.

Providers, same inputs, one run: each cmfast backend that runs on the device; torch eager (the chain a user
writes: scalings, two broadcast multiplies, an add and a clamp); torch.compile of that chain. The op is memory
bound: reported as GB/s (2 reads + 1 write) and the fraction of the copy bandwidth measured in the same run.
usage: python -m benchmarks.bench_consistency [--device cuda] [--dtypes float16,bfloat16] [--batches 1,64]
"""

from __future__ import annotations

import argparse

import torch

from cmfast import backends, ops

from .common import Row, add_ratios, copies_to_beat_cache, device_name, measure, measure_ceilings, write_csv

SIGMA_MIN, SIGMA_DATA = 0.002, 0.5
PEERS = ["torch-eager", "torch-compile"]


def eager_chain(x, f, sigma):
    d = sigma - SIGMA_MIN
    c_skip = SIGMA_DATA**2 / (d**2 + SIGMA_DATA**2)
    c_out = d * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2) ** 0.5
    return (c_skip[:, None, None, None] * x + c_out[:, None, None, None] * f).clamp(-1, 1)


def providers(device: torch.device) -> dict:
    found = {}
    for name in backends.BACKENDS:
        if backends.availability(name, device)[0] and (name != "triton" or device.type == "cuda"):

            def run(x, f, s, name=name):
                with backends.use_backend(name):
                    return ops.consistency_epilogue(x, f, s, clamp=True)

            found[f"cmfast-{name}"] = run
    found["torch-eager"] = eager_chain
    found["torch-compile"] = torch.compile(eager_chain, dynamic=False)
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma list (default: float32 on CPU, float16,bfloat16 on GPU)")
    parser.add_argument("--batches", default=None, help="comma list (default: 1,16,64 on CPU, 1,64,256 on GPU)")
    parser.add_argument("--size", type=int, default=64, help="image side (64 for ImageNet-64, 256 for LSUN)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("float16,bfloat16" if gpu else "float32")).split(",")]
    batches = [int(b) for b in (args.batches or ("1,64,256" if gpu else "1,16,64")).split(",")]

    ceilings = measure_ceilings(device)
    print(f"{device_name(device)}: copy bandwidth {ceilings.bytes_per_s / 1e9:.1f} GB/s")
    rows: list[Row] = []
    for dtype in dtypes:
        for batch in batches:
            shape = (batch, 3, args.size, args.size)
            nbytes = 3 * batch * 3 * args.size**2 * dtype.itemsize
            sets = [
                (torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype),
                 torch.rand(batch, device=device) * 80 + SIGMA_MIN)
                for _ in range(copies_to_beat_cache(nbytes, device))
            ]
            for name, fn in providers(device).items():
                calls = [lambda fn=fn, s=s: fn(*s) for s in sets]
                p20, p50, p80 = measure(calls, device)
                gbs = nbytes / (p50 * 1e-3) / 1e9
                rows.append(Row("consistency_epilogue", name, "x".join(map(str, shape)), str(dtype)[6:], batch,
                                device_name(device), p20, p50, p80, gb_per_s=gbs,
                                fraction_of_ceiling=gbs * 1e9 / ceilings.bytes_per_s))
    add_ratios(rows, PEERS)
    print(f"{'provider':<18}{'shape':<16}{'dtype':<10}{'p50 ms':>10}{'GB/s':>9}{'of copy':>9}  vs peers")
    for r in rows:
        print(f"{r.provider:<18}{r.shape:<16}{r.dtype:<10}{r.p50_ms:>10.4f}{r.gb_per_s:>9.1f}"
              f"{r.fraction_of_ceiling:>9.0%}  {r.ratios}")
    print("wrote", write_csv(rows, device, "consistency"))


if __name__ == "__main__":
    main()
