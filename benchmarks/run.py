"""The benchmark runner: `python -m benchmarks [NAMES...]`, from a checkout (the installed package has no benchmarks).

Runs the chosen benchmarks in one process on one device, every provider side by side on the same inputs and
weights, measures the machine's ceilings at the start and the end, and writes
  OUT/<device>-<date>.csv                one row per measurement, long format (written after every measurement)
  OUT/<device>-<date>-<benchmark>.png    p50 per provider per shape (p20..p80 as error bars)
then prints a summary table. A second run on the same day writes <device>-<date>-2.csv, and so on.

Defaults: CPU float32 at batch 1 and 4; GPU float16 and bfloat16 at batch 1, 16, 64, 256. The kernels' torch.compile
peers are in by default; the U-Net's and pipelines' compiled peers only with --compile (a cold compile of the U-Net
takes minutes on a CPU). --quick: tiny shapes and test-sized models, no torch.compile, a few repetitions (seconds;
for tests). A default CPU run of the whole suite takes 9 minutes on a quiet 2-core machine (17 with one thread
while other processes hold the other core).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
import traceback
from pathlib import Path

MODULES = {"group_norm": "bench_group_norm", "attention": "bench_attention", "consistency": "bench_consistency",
           "sampling": "bench_sampling"}
DTYPES = ("float32", "float16", "bfloat16")
MODELS = ("imagenet64", "lsun256")  # the sampling benchmark's two architectures
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")  # torch.compile modes a tuned user tries
# glibc's malloc hands out blocks over 32 MiB as fresh mmap'd pages on every call and gives the top of its heap back to
# the system after a free, so a large activation pays its page faults again on every call (4x768x64x64 GroupNorm:
# 20 ms instead of 5). Every provider runs with blocks from the heap, kept after a free (`python -m benchmarks` sets
# these; set them yourself to override).
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}


def _list(text: str, kind=str) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser, names: bool = True) -> None:
    if names:
        parser.add_argument("names", nargs="*", metavar="NAME",
                            help=f"benchmarks to run (default: all): {', '.join(MODULES)}")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when there is one)")
    parser.add_argument("--dtypes", default=None, type=_list,
                        help="comma list of float32, float16, bfloat16 (default: float32 on CPU, float16,bfloat16 "
                             "on GPU)")
    parser.add_argument("--batches", default=None, type=lambda s: _list(s, int),
                        help="comma list (default: 1,4 on CPU, 1,16,64,256 on GPU)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and test models, no torch.compile (seconds)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--compile", action="store_true",
                       help="add torch.compile peers of the U-Net and pipelines (minutes of cold compile on a CPU)")
    group.add_argument("--no-compile", action="store_true", help="leave out every torch.compile peer")
    parser.add_argument("--compile-modes", default=["default"], type=_list,
                        help="with --compile: torch.compile modes of the diffusers U-Net peer, comma list of default, "
                             "max-autotune-no-cudagraphs, reduce-overhead (each a cold compile; default: default)")
    parser.add_argument("--models", default=None, type=_list,
                        help="sampling: comma list of imagenet64 (U-Net forward, 1 and 2 steps), lsun256 (1 step); "
                             "default both")
    parser.add_argument("--threads", default=None, type=int,
                        help="CPU threads for torch (default: torch's, one per core); a busy shared machine times "
                             "more steadily with fewer")
    parser.add_argument("--out", default=None, type=Path, help="results folder (default: benchmarks/results)")


def run(args: argparse.Namespace, log=print) -> "Session":  # noqa: F821
    import torch

    from cmfast.commands import resolve_device

    from .common import RESULTS, Session

    names = list(dict.fromkeys(args.names)) if args.names else list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown[0]!r}; expected some of: {', '.join(MODULES)}")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    gpu = device.type == "cuda"
    dtype_names = args.dtypes or (["float16", "bfloat16"] if gpu else ["float32"])
    for name in dtype_names:
        if name not in DTYPES:
            raise SystemExit(f"--dtypes: expected names among {', '.join(DTYPES)}, got {name!r}")
    for name in args.models or ():
        if name not in MODELS:
            raise SystemExit(f"--models: expected names among {', '.join(MODELS)}, got {name!r}")
    for mode in args.compile_modes:
        if mode not in COMPILE_MODES:
            raise SystemExit(f"--compile-modes: expected names among {', '.join(COMPILE_MODES)}, got {mode!r}")
    if args.batches is not None and (not args.batches or min(args.batches) < 1):
        raise SystemExit("--batches: expected positive integers")
    batches = args.batches or ([1, 16, 64, 256] if gpu else [1, 4])
    threads = torch.get_num_threads()
    previous_handler = _stop_cleanly_on_sigterm()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        session = Session(device, [getattr(torch, n) for n in dtype_names], batches, quick=args.quick,
                          compile_models=args.compile, compile_kernels=not args.no_compile,
                          models=args.models or MODELS, out=args.out or RESULTS, log=log,
                          compile_modes=args.compile_modes)
        _run(session, names, log)
    finally:
        torch.set_num_threads(threads)
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return session


def _run(session, names: list[str], log) -> None:
    from .plots import plot
    from .summary import markdown

    started = time.perf_counter()
    try:
        for name in names:
            log(f"== {name}")
            module = importlib.import_module(f"{__package__}.{MODULES[name]}")
            try:
                module.run(session)
            except Exception as e:  # noqa: BLE001  (one broken benchmark must not lose the others)
                session.failures.append(f"{name}: {type(e).__name__}: {e}")
                log(f"FAILED {name}:\n{traceback.format_exc()}")
        session.finish()
    finally:
        session.flush()
        written = [session.csv_path] if session.rows else []
        if session.rows:
            written += plot(session.csv_path)
        log("")
        log(markdown(session.csv_path, ceilings=session.ceilings.describe()) if session.rows else "no rows measured")
        for failure in session.failures:
            log(f"failed: {failure}")
        elapsed = time.perf_counter() - started
        log(f"{len(session.rows)} measurements in {elapsed / 60:.1f} min; wrote " + ", ".join(map(str, written)))


def _stop_cleanly_on_sigterm():
    """`timeout` sends SIGTERM: stop like Ctrl-C, so the rows so far are written and plotted. Returns the previous
    handler (None when handlers cannot be set here)."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def main(argv=None, names=None, prog=None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, names=names is None)
    args = parser.parse_args(argv)
    if names is not None:
        args.names = names
    try:
        session = run(args)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    return 1 if session.failures else 0


if __name__ == "__main__":
    sys.exit(main())
