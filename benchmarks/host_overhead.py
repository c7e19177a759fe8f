"""Where a batch-1 kernel call's time goes on the host: the calls the GPU finishes faster than Python issues them.

For each case (attention and group_norm at the U-Net's smallest batch-1 shapes) and each provider (the cmfast op on
each backend of the device, the eager and SDPA peers of the kernel benchmarks): the host time a call takes to
issue (N calls back to back, no synchronisation, divided by N) and the time with the GPU's work included (the same
plus a final synchronisation). When the first is about the second, the call is host-bound and only less Python,
fewer launches or a CUDA graph can speed it up. Then a cProfile of the default cmfast provider: the functions the
host time goes to.
usage: python -m benchmarks.host_overhead [--device cuda] [--calls N] [--profile-top K]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from cmfast import backends, ops

from . import bench_attention, bench_group_norm
from .measure import synchronize

ATTENTION_PEERS = {"torch-eager": bench_attention.eager, "torch-sdpa": bench_attention.sdpa}


def _attention(channels: int, side: int):
    return lambda d, t: (torch.randn(1, 3 * channels, side, side, device=d, dtype=t), channels // 64)


def _group_norm(d, t):
    return (torch.randn(1, 192, 8, 8, device=d, dtype=t), torch.randn(192, device=d), torch.randn(192, device=d),
            torch.randn(1, 192, device=d, dtype=t), torch.randn(1, 192, device=d, dtype=t))


CASES = {  # name: (op, inputs on (device, dtype), peers)
    "attention 1x2304x8x8 (T 64, 12 heads)": ("attention", _attention(768, 8), ATTENTION_PEERS),
    "attention 1x1152x32x32 (T 1024, 6 heads)": ("attention", _attention(384, 32), ATTENTION_PEERS),
    "group_norm 1x192x8x8, scale/shift, SiLU": ("group_norm", _group_norm, {"torch-eager": bench_group_norm.eager}),
}
CMFAST = {"attention": lambda qkv, heads: ops.attention(qkv, heads), "group_norm": bench_group_norm.cmfast_group_norm}


def per_call_us(fn, args, device, calls: int, seconds: float = 0.5) -> tuple[float, float]:
    """(host us a call, us a call with the device's work included), after a warm-up; fewer calls than `calls` where
    they would take over `seconds` (slow providers, the CPU)."""
    start = time.perf_counter()
    for _ in range(10):
        fn(*args)
    synchronize(device)
    calls = max(10, min(calls, int(seconds / ((time.perf_counter() - start) / 10))))
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    issued = time.perf_counter()
    synchronize(device)
    done = time.perf_counter()
    return (issued - start) / calls * 1e6, (done - start) / calls * 1e6


def profile(fn, args, calls: int, top: int, seconds: float = 1.0) -> str:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(calls):
        fn(*args)
        if time.perf_counter() - start > seconds:
            break
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on a GPU, float32 on the CPU")
    parser.add_argument("--calls", type=int, default=2000, help="calls timed per provider (at most 0.5 s of them)")
    parser.add_argument("--profile-top", type=int, default=15, help="functions listed per profile (0: no profile)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    print(f"{device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} {dtype}; torch "
          f"{torch.__version__}; up to {args.calls} calls a provider; microseconds a call")
    print(f"{'case':42s} {'provider':26s} {'host issue':>10s} {'with device':>11s}")
    for case, (op, make, peers) in CASES.items():
        inputs = make(device, dtype)
        default = backends.choose(op, device, ops.IMPLEMENTED[op])
        providers = {}
        for name in ops.IMPLEMENTED[op]:
            if backends.availability(name, device)[0] and (name != "triton" or device.type == "cuda"):
                def forced(*a, name=name):
                    with backends.use_backend({op: name}):
                        return CMFAST[op](*a)
                providers[f"cmfast-{name}" + (" (default)" if name == default else " (forced)")] = (
                    CMFAST[op] if name == default else forced)
        providers.update(peers)
        for provider, fn in providers.items():
            try:
                host, total = per_call_us(fn, inputs, device, args.calls)
            except Exception as error:  # a provider that cannot run here is reported, not fatal
                print(f"{case:42s} {provider:26s} failed: {type(error).__name__}: {error}")
                continue
            print(f"{case:42s} {provider:26s} {host:10.1f} {total:11.1f}")
        if args.profile_top:
            print(f"-- profile of cmfast-{default}, {case}:")
            print(profile(CMFAST[op], inputs, args.calls, args.profile_top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
