"""How the benchmarks measure: the machine, the timer, and the machine's own ceilings.

Timing: warm-up calls excluded; per-call times from CUDA events on a GPU, perf_counter on the CPU (Python's garbage
collector paused while timing); p20/p50/p80 over at least `min_reps` calls and `min_seconds`. Inputs are rotated
over enough copies that the rotated bytes exceed 4x the last-level cache (a memory-bound kernel is not timed from
cache), within a memory cap.

Ceilings, measured in the same run (at its start and again at its end; the better of the two is used):
- bytes/s: a copy of a 256 MiB (CPU) / 1 GiB (GPU) buffer, counting bytes read + written, from the p20 of the
  call times (the fast end: other processes on a shared machine can only slow a copy down, never speed it up).
  The copy uses ordinary stores, like the kernels; a kernel that reads more than it writes can pass 100% a little
  (its write-allocate traffic is a smaller share of its bytes).
- FLOP/s per dtype: a large square matmul.
On the CPU each row also records `other_load`: the share of the machine's CPU time that other processes took while
the row was measured (0 = quiet). Rows measured under load are slower than the machine is; say so when quoting.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cmfast.tuning import cpu_label


# ---- the machine ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_label()} x{torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in device_name(device).lower()).split())


def cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("K")) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 32 << 20


def copies_to_beat_cache(bytes_per_call: int, device: torch.device, limit: int = 1024) -> int:
    """How many input sets to rotate through so that a call's inputs were evicted since their last use: the
    rotated bytes reach 4x the last-level cache, within `limit` sets and a memory cap (1 GiB CPU, 4 GiB GPU)."""
    cap = (4 << 30) if device.type == "cuda" else (1 << 30)
    want = math.ceil(4 * cache_bytes(device) / max(bytes_per_call, 1))
    return max(1, min(limit, want, cap // max(bytes_per_call, 1)))


class OtherLoad:
    """The share of all CPUs' time used by other processes between start() and stop() (Linux; else None)."""

    @staticmethod
    def _sample():
        try:
            parts = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(parts) - parts[3] - (parts[4] if len(parts) > 4 else 0)  # everything but idle and iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()

    def start(self):
        self.begin = self._sample()
        return self

    def stop(self) -> float | None:
        end = self._sample()
        if self.begin is None or end is None:
            return None
        busy, own, wall = (e - b for e, b in zip(end, self.begin))
        if wall <= 0:
            return None
        return min(1.0, max(0.0, (busy - own) / (wall * (os.cpu_count() or 1))))


# ---- the timer -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    warmup: int = 3
    min_reps: int = 10
    min_seconds: float = 0.3
    max_reps: int = 10_000


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Measured:
    p20: float  # milliseconds per call
    p50: float
    p80: float
    reps: int
    other_load: float | None  # other processes' share of the CPUs during the timed calls (OtherLoad)


def measure(calls, device: torch.device, timing: Timing = Timing()) -> Measured:
    """Times the callables of `calls` in rotation, after the warm-up calls."""
    return summarize(*timed_calls(calls, device, timing))


def summarize(times: list[float], other: float | None) -> Measured:
    if len(times) == 1:
        return Measured(times[0], times[0], times[0], 1, other)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return Measured(q[1], statistics.median(times), q[7], len(times), other)


def timed_calls(calls, device: torch.device, timing: Timing) -> tuple[list[float], float | None]:
    """(milliseconds of each timed call, other processes' share of the CPUs meanwhile), after the warm-up calls."""
    for i in range(timing.warmup):
        calls[i % len(calls)]()
    synchronize(device)
    gc_was_on = gc.isenabled()
    gc.disable()  # no collection pauses inside the timed calls
    times: list[float] = []
    load = OtherLoad().start()
    try:
        start_all = time.perf_counter()
        i = 0
        while len(times) < timing.min_reps or time.perf_counter() - start_all < timing.min_seconds:
            fn = calls[i % len(calls)]
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            i += 1
            if len(times) >= timing.max_reps:
                break
    finally:
        if gc_was_on:
            gc.enable()
    return times, load.stop()


# ---- ceilings ------------------------------------------------------------------------------------------------


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Ceilings:
    bytes_per_s: float  # a large copy: read + write bytes / time
    flop_per_s: dict[str, float] = field(default_factory=dict)  # a large matmul or 3x3 conv (the faster), per dtype

    def best(self, other: "Ceilings") -> "Ceilings":
        keys = set(self.flop_per_s) | set(other.flop_per_s)
        return Ceilings(max(self.bytes_per_s, other.bytes_per_s),
                        {k: max(self.flop_per_s.get(k, 0.0), other.flop_per_s.get(k, 0.0)) for k in keys})

    def describe(self) -> str:
        flops = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in self.flop_per_s.items())
        return f"copy {self.bytes_per_s / 1e9:.1f} GB/s; dense (matmul or conv) {flops}"


def measure_ceilings(device: torch.device, dtypes=(torch.float32,), small: bool = False) -> Ceilings:
    """small: a quick estimate (16x smaller buffers and matrices), for --quick runs whose numbers mean nothing."""
    gpu = device.type == "cuda"
    n = ((1 << 30) if gpu else (256 << 20)) >> (4 if small else 0)  # bytes per buffer: 8x a 32 MiB L3, 20x 50 MiB
    src = torch.empty(n // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src).fill_(1.0)  # touched: no page faults inside the timing
    budget = 0.05 if small else 0.5
    copy = measure([lambda: dst.copy_(src)], device, Timing(warmup=2, min_reps=10, min_seconds=budget))
    del src, dst
    flops = {}
    for dtype in dtypes:
        flops[dtype_label(dtype)] = max(_matmul_rate(device, dtype, small, budget), _conv_rate(device, dtype, small, budget))
    return Ceilings(2 * n / (copy.p20 * 1e-3), flops)


def _matmul_rate(device: torch.device, dtype: torch.dtype, small: bool, budget: float) -> float:
    """FLOP/s of a large square matmul (on a CPU torch takes it to MKL or oneDNN's gemm)."""
    m = (8192 if device.type == "cuda" else 2048) >> (2 if small else 0)
    a = torch.randn(m, m, device=device).to(dtype)
    b = torch.randn(m, m, device=device).to(dtype)
    return 2 * m**3 / (measure([lambda: a @ b], device, Timing(warmup=2, min_reps=5, min_seconds=budget)).p20 * 1e-3)


def _conv_rate(device: torch.device, dtype: torch.dtype, small: bool, budget: float) -> float:
    """FLOP/s of a large 3x3 convolution in channels_last, the U-Nets' main op. On an AMD EPYC (Zen 4) torch's fp32
    matmul ran at 0.156 TFLOP/s on 2 cores while its oneDNN convolutions reached 0.19: a matmul alone is no ceiling."""
    batch, channels, size = (64, 512, 32) if device.type == "cuda" else (4, 256, 32)
    if small:
        batch, size = 1, size // 2
    x = torch.randn(batch, channels, size, size, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(channels, channels, 3, 3, device=device) / 48).to(dtype).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        timed = measure([lambda: F.conv2d(x, w, padding=1)], device, Timing(warmup=2, min_reps=5, min_seconds=budget))
    return 2 * batch * channels * channels * 9 * size * size / (timed.p20 * 1e-3)
