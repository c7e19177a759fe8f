"""What every benchmark shares: a timer done right, the machine's own ceilings, and the long-format CSV.

Timing: warm-up calls excluded; per-call times from CUDA events on a GPU, perf_counter on the CPU; inputs
rotated over enough copies to exceed the last-level cache, so a memory-bound kernel is not timed from cache;
p20/p50/p80 reported. Ceilings are measured in the same run: a large copy (bytes/s) and a large matmul (FLOP/s).
"""

from __future__ import annotations

import csv
import datetime
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import cmfast

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("K")) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 32 << 20


def copies_to_beat_cache(bytes_per_call: int, device: torch.device, limit: int = 64) -> int:
    """How many input sets to rotate through so that consecutive calls miss the last-level cache."""
    return max(1, min(limit, math.ceil(2 * cache_bytes(device) / max(bytes_per_call, 1))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(calls, device: torch.device, *, warmup: int = 3, min_reps: int = 10, min_seconds: float = 0.5):
    """Times the callables of `calls` in rotation; returns (p20, p50, p80) in milliseconds per call."""
    for i in range(warmup):
        calls[i % len(calls)]()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    i = 0
    while len(times) < min_reps or time.perf_counter() - start_all < min_seconds:
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
        if len(times) >= 10_000:
            break
    q = statistics.quantiles(times, n=10)
    return q[1], statistics.median(times), q[7]


@dataclass
class Ceilings:
    bytes_per_s: float  # a large device-to-device copy: read + write bytes / time
    flop_per_s: dict[str, float] = field(default_factory=dict)  # a large matmul, per dtype


def measure_ceilings(device: torch.device, dtypes=(torch.float32,)) -> Ceilings:
    n = (256 << 20) if device.type == "cuda" else (64 << 20)  # bytes per buffer, far beyond any cache
    src = torch.empty(n // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    _, copy_ms, _ = measure([lambda: dst.copy_(src)], device, warmup=2, min_reps=5, min_seconds=0.3)
    flops = {}
    for dtype in dtypes:
        m = 8192 if device.type == "cuda" else 1536
        a = torch.randn(m, m, device=device).to(dtype)
        b = torch.randn(m, m, device=device).to(dtype)
        _, mm_ms, _ = measure([lambda: a @ b], device, warmup=2, min_reps=5, min_seconds=0.3)
        flops[str(dtype).removeprefix("torch.")] = 2 * m**3 / (mm_ms * 1e-3)
    return Ceilings(2 * n / (copy_ms * 1e-3), flops)


@dataclass
class Row:
    benchmark: str
    provider: str
    shape: str
    dtype: str
    batch: int
    device: str
    p20_ms: float
    p50_ms: float
    p80_ms: float
    gb_per_s: float | None = None
    tflop_per_s: float | None = None
    fraction_of_ceiling: float | None = None
    ratios: str = ""  # "peer=x.xx;..." : how many times faster than each peer (peer p50 / this p50)
    torch_version: str = torch.__version__
    triton_version: str = ""
    cmfast_version: str = cmfast.__version__
    timestamp: str = ""


def add_ratios(rows: list[Row], peers: list[str]) -> None:
    """Fill each row's `ratios` against the peers measured on the same benchmark, shape and dtype."""
    by_key = {(r.benchmark, r.shape, r.dtype, r.provider): r for r in rows}
    for r in rows:
        parts = []
        for peer in peers:
            other = by_key.get((r.benchmark, r.shape, r.dtype, peer))
            if other is not None and other is not r:
                parts.append(f"{peer}={other.p50_ms / r.p50_ms:.2f}")
        r.ratios = ";".join(parts)


def write_csv(rows: list[Row], device: torch.device, name: str) -> Path:
    """benchmarks/results/<name>-<device>-<date>.csv, long format, one row per measurement."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for r in rows:
        r.triton_version, r.timestamp = triton_version, stamp
    slug = "".join(c if c.isalnum() else "-" for c in device_name(device)).strip("-").lower()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{slug}-{stamp[:10]}.csv"
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    tmp.replace(path)
    return path
