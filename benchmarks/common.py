"""What every benchmark shares beyond the measuring (benchmarks/measure.py): the run's rows, their ratios and CSV,
and the Session that rotates inputs, measures, records and writes them.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

import cmfast
from cmfast import backends

from .measure import (Measured, OtherLoad, Timing, copies_to_beat_cache, device_name, device_slug, dtype_label,
                      measure, measure_ceilings, summarize, timed_calls)

RESULTS = Path(__file__).resolve().parent / "results"


# ---- rows and the run ----------------------------------------------------------------------------------------


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
    reps: int = 0
    gb_per_s: float | None = None  # memory-bound benchmarks: the fewest bytes the call must move / p50
    tflop_per_s: float | None = None  # compute-bound benchmarks: FLOPs / p50
    fraction_of_ceiling: float | None = None  # of the copy bandwidth or the dense FLOP/s of this dtype
    ceiling: str = ""  # which ceiling, and its value
    ratios: str = ""  # "peer=x.xx;...": how many times faster than each peer (peer p50 / this p50)
    other_load: float | None = None
    note: str = ""
    torch_version: str = torch.__version__
    triton_version: str = ""
    cmfast_version: str = cmfast.__version__
    timestamp: str = ""


COLUMNS = [f.name for f in fields(Row)]


def add_ratios(rows: list[Row], peers: dict[str, tuple[str, ...]]) -> None:
    """Fill each row's `ratios` against the peers of its benchmark measured at the same shape, dtype and batch."""
    by_key = {(r.benchmark, r.shape, r.dtype, r.batch, r.provider): r for r in rows}
    for r in rows:
        parts = []
        for peer in peers.get(r.benchmark, ()):
            other = by_key.get((r.benchmark, r.shape, r.dtype, r.batch, peer))
            if other is not None and other is not r:
                parts.append(f"{peer}={other.p50_ms / r.p50_ms:.3g}")
        r.ratios = ";".join(parts)


def triton_version() -> str:
    ok, _ = backends.triton_status()
    if not ok:
        return "none"
    import triton

    return triton.__version__


def write_csv(rows: list[Row], path: Path) -> Path:
    """The rows, long format, one per measurement (written to a temporary file, then moved in place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    tmp.replace(path)
    return path


def read_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def unique_path(out: Path, stem: str, suffix: str = ".csv") -> Path:
    """out/stem.csv, or out/stem-2.csv, ... when a run of the same day already wrote one."""
    path, n = out / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = out / f"{stem}-{n}{suffix}"
    return path


class Session:
    """One run of the suite on one device: its options, ceilings, rows and CSV. Rows are written after every
    measurement, so a run that is stopped leaves what it measured."""

    def __init__(self, device: torch.device, dtypes, batches, *, quick: bool = False, compile_models: bool = False,
                 compile_kernels: bool = True, models=("imagenet64", "lsun256"), out: Path = RESULTS, log=print,
                 compile_modes=("default",)):
        self.device, self.dtypes, self.batches, self.models = device, list(dtypes), list(batches), tuple(models)
        self.quick, self.compile_models, self.compile_kernels = quick, compile_models, compile_kernels
        self.compile_modes = tuple(compile_modes)
        self.gpu = device.type == "cuda"
        self.log = log
        self.rows: list[Row] = []
        self.failures: list[str] = []
        self.peers: dict[str, tuple[str, ...]] = {}
        self.name = device_name(device)
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.csv_path = unique_path(Path(out), f"{device_slug(device)}-{self.started.date().isoformat()}")
        self._triton = triton_version()
        busy = OtherLoad().start()
        self.ceilings_start = measure_ceilings(device, self._ceiling_dtypes(), small=quick)
        self.ceilings = self.ceilings_start
        log(f"{self.name}: {self.ceilings.describe()} (ceilings at start)")
        other = busy.stop()
        if not self.gpu and other is not None and other > 0.1:
            log(f"WARNING: other processes are using {other:.0%} of the CPUs: timings will be slower than this machine "
                "is (see the other_load column)")

    def _ceiling_dtypes(self) -> list[torch.dtype]:
        return sorted(set(self.dtypes) | {torch.float32}, key=str)  # fp32: the U-Net's embeddings and head

    # timing budgets: kernels take microseconds to milliseconds, whole models up to tens of seconds on a CPU
    TIMINGS = {  # (what, on a GPU): its Timing; --quick: QUICK for everything
        ("kernel", True): Timing(warmup=3, min_reps=25, min_seconds=0.1),
        ("kernel", False): Timing(warmup=3, min_reps=10, min_seconds=0.3),
        ("model", True): Timing(warmup=2, min_reps=5, min_seconds=0.2),
        ("model", False): Timing(warmup=1, min_reps=10, min_seconds=0.0),  # 10 rounds (Session.record_row)
    }
    QUICK = Timing(warmup=1, min_reps=3, min_seconds=0.0)

    @property
    def kernel_timing(self) -> Timing:
        return self.QUICK if self.quick else self.TIMINGS["kernel", self.gpu]

    @property
    def model_timing(self) -> Timing:
        return self.QUICK if self.quick else self.TIMINGS["model", self.gpu]

    def compile(self, fn, mode: str = "default"):
        """torch.compile of `fn` as a user would write it: static shapes on the CPU (each call site of the U-Net has
        one shape), automatic dynamic shapes on a GPU (fewer recompiles in a time-boxed GPU job)."""
        return torch.compile(fn, dynamic=False if not self.gpu else None, mode=mode)

    def cmfast_backends(self, op: str) -> list[str]:
        """The backends of `op` that run on this device (Triton on a GPU only: its CPU interpreter is for tests)."""
        from cmfast.ops import IMPLEMENTED

        return [name for name in IMPLEMENTED[op]
                if backends.availability(name, self.device)[0] and (name != "triton" or self.gpu)]

    def kernel_providers(self, op: str, cmfast_fn, eager_fn, peers: dict | None = None) -> dict:
        """The providers of a kernel benchmark, in column order: cmfast-<backend> (cmfast_fn; with that backend
        forced unless it is the default) for each backend of `op` on this device, torch-eager (eager_fn), the other `peers`, torch-compile."""

        def on_backend(name):
            def run(*args):
                with backends.use_backend(name):
                    return cmfast_fn(*args)

            return run

        default = self.default_backend(op)  # called as users call it: forcing costs a context manager a call
        found = {f"cmfast-{name}": cmfast_fn if name == default else on_backend(name) for name in self.cmfast_backends(op)}
        found["torch-eager"] = eager_fn
        found.update(peers or {})
        if self.compile_kernels and not self.quick:
            found["torch-compile"] = self.compile(eager_fn)
        return found

    def default_backend(self, op: str) -> str:
        from cmfast.ops import IMPLEMENTED

        return backends.choose(op, self.device, IMPLEMENTED[op])

    def rotated(self, make, bytes_per_call: int) -> list:
        return [make() for _ in range(copies_to_beat_cache(bytes_per_call, self.device))]

    def record(self, benchmark: str, provider: str, calls, *, shape: str, dtype, batch: int, timing: Timing,
               nbytes: int | None = None, flop: float | None = None, note: str = "") -> Row | None:
        """Time `calls` (callables in rotation) and add a row; a provider that fails is logged and skipped."""
        try:
            m = measure(calls, self.device, timing)
        except Exception as e:  # noqa: BLE001  (a failing provider must not stop the suite)
            self._failed(benchmark, provider, shape, dtype, e)
            return None
        return self._add(benchmark, provider, m, shape=shape, dtype=dtype, batch=batch, nbytes=nbytes, flop=flop,
                         note=note)

    def record_row(self, benchmark: str, entries, *, shape: str, dtype, batch: int, timing: Timing,
                   flop: float | None = None) -> None:
        """The providers of one row, entries (provider, call, note, context: a callable giving the context manager
        each call runs in, or None): each provider's warm-up calls, then rounds of one timed call of each, in order
        and in reverse alternately, until each has timing.min_reps calls and timing.min_seconds. These VMs' speed
        steps by 10-20% within minutes, and a machine runs slower for a while after a heavy provider (a model built
        or compiled, memory returned): timed round by round, every provider meets the machine as it is at each
        moment, where timed a pass at a time the first and last providers of a row took such a step alone (the
        same U-Net 17% apart in one row, 2026-12-06)."""
        times = {entry[0]: [] for entry in entries}
        loads: dict[str, list[float]] = {entry[0]: [] for entry in entries}
        once = Timing(warmup=0, min_reps=1, min_seconds=0.0)

        def run(provider, call, context, how: Timing) -> None:
            try:
                with context() if context is not None else contextlib.nullcontext():
                    got, other = timed_calls([call], self.device, how)
            except Exception as e:  # noqa: BLE001  (a failing provider must not stop the suite)
                self._failed(benchmark, provider, shape, dtype, e)
                del times[provider]
                return
            times[provider] += got
            if other is not None and got:
                loads[provider].append(other)

        for provider, call, _, context in entries:
            run(provider, call, context, Timing(warmup=timing.warmup, min_reps=0, min_seconds=0.0))

        def wanting(provider) -> bool:  # a fast provider goes on alone once the slow ones have their calls
            t = times.get(provider)
            return t is not None and (len(t) < timing.min_reps or sum(t) < timing.min_seconds * 1e3)

        for rounds in range(timing.max_reps):
            order = [entry for entry in (entries if rounds % 2 == 0 else entries[::-1]) if wanting(entry[0])]
            if not order:
                break
            for provider, call, _, context in order:
                run(provider, call, context, once)
        for provider, _, note, _ in entries:
            if provider in times:
                other = max(loads[provider]) if loads[provider] else None
                self._add(benchmark, provider, summarize(times[provider], other), shape=shape, dtype=dtype,
                          batch=batch, flop=flop, note=note)

    def _failed(self, benchmark, provider, shape, dtype, e: Exception) -> None:
        if self.gpu and isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        dtype_name = dtype if isinstance(dtype, str) else dtype_label(dtype)
        message = f"{benchmark} {provider} {shape} {dtype_name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        self.failures.append(message)
        self.log("FAILED " + message)

    def _add(self, benchmark, provider, m: Measured, *, shape, dtype, batch, nbytes=None, flop=None, note="") -> Row:
        dtype_name = dtype if isinstance(dtype, str) else dtype_label(dtype)
        other = m.other_load
        row = Row(benchmark, provider, shape, dtype_name, batch, self.name, m.p20, m.p50, m.p80, reps=m.reps,
                  other_load=None if self.gpu or other is None else round(other, 3), note=note,
                  triton_version=self._triton)
        if nbytes is not None:
            row.gb_per_s = nbytes / (m.p50 * 1e-3) / 1e9
            row.ceiling = "copy"
        elif flop is not None:
            row.tflop_per_s = flop / (m.p50 * 1e-3) / 1e12
            row.ceiling = f"dense-{dtype_name}"
        self.rows.append(row)
        rate = (f"{row.gb_per_s:8.1f} GB/s" if row.gb_per_s is not None
                else f"{row.tflop_per_s:8.3f} TFLOP/s" if row.tflop_per_s is not None else "")
        busy = f"  (other processes: {other:.0%} of the CPUs)" if not self.gpu and other and other > 0.05 else ""
        self.log(f"  {benchmark:<22}{provider:<28}{shape:<30}{dtype_name:<10}p50 {m.p50:10.4f} ms {rate}{busy}")
        self.flush()
        return row

    def finish(self) -> None:
        """Measure the ceilings again (the better of start and end counts) and write the final CSV."""
        end = measure_ceilings(self.device, self._ceiling_dtypes(), small=self.quick)
        self.log(f"{self.name}: {end.describe()} (ceilings at end)")
        self.ceilings = self.ceilings_start.best(end)
        self.flush()

    def flush(self) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for r in self.rows:
            if r.ceiling.startswith("copy"):
                value = self.ceilings.bytes_per_s
                r.fraction_of_ceiling = r.gb_per_s * 1e9 / value
                r.ceiling = f"copy {value / 1e9:.1f} GB/s"
            elif r.ceiling.startswith("dense-"):
                kind = r.ceiling.split()[0]
                value = self.ceilings.flop_per_s.get(kind.removeprefix("dense-"))
                if value:
                    r.fraction_of_ceiling = r.tflop_per_s * 1e12 / value
                    r.ceiling = f"{kind} {value / 1e12:.3g} TFLOP/s"
            r.timestamp = r.timestamp or stamp
        add_ratios(self.rows, self.peers)
        if self.rows:
            write_csv(self.rows, self.csv_path)
