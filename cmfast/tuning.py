"""Choices made by measurement: which of several exact implementations runs a class of call on this machine.

The fastest kernel differs between machines (on a 2-core AMD Zen 4 cmfast's CPU attention kernel beat torch's SDPA
1.1-3x; on a 2-core Sapphire Rapids Xeon, where SDPA uses AMX, it was 3.5x slower), so no fixed order is right
everywhere. The first time a choice meets a new class of call (the op, the device, dtype, layout, shape, thread
count), each candidate runs on the call's own inputs (once to warm up, then in 2-5 interleaved timed rounds within
a small budget, a clear loser dropped after the first; each candidate's best round counts), the fastest is kept,
and the call returns the chosen candidate's result. Every candidate is exact against the op's reference, so the
choice changes speed, not meaning.

Choices are kept in memory and on disk, one JSON file per device name and cmfast/torch/extension version under
the cache folder (`$CMFAST_CACHE`, else ~/.cache/cmfast), written atomically: a second process times nothing.
A missing, corrupt or foreign file is ignored and rewritten. Nothing is timed

- when CMFAST_TUNE=0 (the fixed order, recorded choices unused: deterministic, as CI wants),
- for tiny calls (below TINY_ELEMENTS output elements: timing them would cost more than any choice saves),
- inside torch.compile, export, or a CUDA graph capture, and in the registered ops a compiled graph calls
  (no_timing): there a recorded choice serves, else the fixed order.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import re
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from . import __version__

TUNE_ENV = "CMFAST_TUNE"
# Below this many output elements a call takes microseconds and the fixed order serves (a GroupNorm at 1x192x8x8
# is 12,288 elements and ~10 us on 2 CPU threads; timing it would cost more than any choice could save).
TINY_ELEMENTS = 32768
# One warm-up run per candidate, then rounds of one timed run each: at least MIN_ROUNDS, more while the measurement
# has taken under BUDGET_S, at most MAX_ROUNDS (a whole forward gets two rounds; a 1 ms kernel call five).
BUDGET_S = 0.05
MIN_ROUNDS, MAX_ROUNDS = 2, 5
# Another candidate replaces the fixed order's only when it is this much faster (timings on a shared 2-core machine
# wander by 5-10% between runs; a choice on noise would flip between processes for nothing).
MARGIN = 0.05
# A candidate out of the running: both of its first two runs over (1 + CLEAR) times the leader's best round. One
# slow run can be the machine's doing; two in a row at 25% over, against a leader timed between them, are the
# candidate's (5 times the noise MARGIN allows for).
CLEAR = 0.25
FORMAT = 1

_memory: dict[tuple, str] = {}  # key -> chosen name, this process
_records: dict[str, dict[str, dict]] = {}  # device name -> its file's entries (repr(key) -> record), read once
_session = {"source": "first call", "fresh": None}  # where measurements come from (cmfast tune sets it)
stats = {"timed": 0, "loaded": 0, "written": 0}  # calls that ran a measurement; records read; file writes


def enabled() -> bool:
    value = os.environ.get(TUNE_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{TUNE_ENV}: expected 0 (fixed order) or 1 (choose by measurement), got {value!r}")
    return value == "1"


def cache_dir() -> Path:
    return Path(os.environ.get("CMFAST_CACHE") or Path.home() / ".cache" / "cmfast")


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_cap() -> str:
    """oneDNN's instruction-set cap set for this process (ONEDNN_MAX_CPU_ISA, or its former name DNNL_MAX_CPU_ISA;
    cmfast's CPU kernels follow it too), or ""."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip()


@functools.cache
def cpu_label() -> str:
    """The CPU's name, with the instruction-set cap where the process sets one: a capped process runs other code, so
    its measurements are another machine's."""
    return f"{cpu_name()}, ISA cap {isa_cap()}" if isa_cap() else cpu_name()


@functools.cache
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_label()


def _versions() -> dict:
    from ._extension import status

    return {"format": FORMAT, "cmfast": __version__, "torch": torch.__version__,
            "extension": status.build_info.get("source_hash", "none") if status.loaded else "none"}


def path_for(device_label: str) -> Path:
    v = _versions()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_label).strip("-").lower()[:60]
    return cache_dir() / "tuning" / f"{slug}-cmfast{v['cmfast']}-torch{v['torch']}-ext{v['extension']}.json"


def _read(path: Path, device_label: str) -> dict[str, dict]:
    """The file's entries, or {} when it is missing, unreadable, corrupt or written for another device or version."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("device") != device_label or data.get("versions") != _versions():
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return {}
    return {k: r for k, r in entries.items()
            if isinstance(r, dict) and isinstance(r.get("choice"), str) and isinstance(r.get("times_ms"), dict)}


def _write(path: Path, device_label: str, entries: dict[str, dict]) -> None:
    """Merges `entries` into the file (another process may have added some) and replaces it atomically: a temporary
    file in the same folder, renamed over it. A cache that cannot be written is not an error: choices stay in memory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read(path, device_label), **entries}
        with open(tmp, "w") as f:
            json.dump({"device": device_label, "versions": _versions(), "entries": merged}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        stats["written"] += 1
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _file_entries(label: str) -> dict[str, dict]:
    """The records for device `label`: read from its file the first time, then kept (and added to) in memory."""
    if label not in _records:
        _records[label] = _read(path_for(label), label)
        stats["loaded"] += len(_records[label])
    return _records[label]


def recorded(key: tuple, device: torch.device) -> dict | None:
    """The record of a measured choice for `key` on `device` (in memory or on disk), or None."""
    label = device_name(device)
    return _file_entries(label).get(repr(key))


_quiet = threading.local()  # depth of no_timing() scopes on this thread


@contextlib.contextmanager
def no_timing():
    """Inside, choices are the recorded ones or the fixed order, never measured: the registered ops that compiled
    graphs call run their module's eager code under it (a compiled forward times nothing)."""
    depth = getattr(_quiet, "depth", 0)
    _quiet.depth = depth + 1
    try:
        yield
    finally:
        _quiet.depth = depth


def _busy(device: torch.device) -> bool:
    """Whether timing must not happen now: tracing (torch.compile, export), a CUDA graph capture, no_timing()."""
    if torch.compiler.is_compiling() or getattr(_quiet, "depth", 0):
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _once(run: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


@contextlib.contextmanager
def session(source: str, again: bool = False):
    """Measurements inside are recorded as coming from `source`; with `again`, choices recorded before are ignored
    and measured anew (each class once), replacing the old records."""
    global _session
    saved, _session = _session, {"source": source, "fresh": set() if again else None}
    memory = dict(_memory)
    if again:
        _memory.clear()
    try:
        yield
    finally:
        _session = saved
        if again:
            _memory.update({k: v for k, v in memory.items() if k not in _memory})


def choose(op: str, device: torch.device, key: tuple, candidates: tuple[str, ...], default: str,
           run: Callable[[str], object], *, elements: int, tune: bool = True,
           prepare: Callable[[str], None] | None = None):
    """(name, result): the candidate recorded for (op, key) on `device`, or, when none is and timing is allowed, the
    fastest of `candidates` by measurement (recorded); else `default`. `run(name)` performs the call with that
    candidate and returns its result; the result returned is always the chosen candidate's. prepare(name), when
    given, readies a candidate before each of its runs, outside the timing (the U-Net's weights to a layout: a
    cost the steady state never pays)."""
    if len(candidates) < 2 or not enabled():
        return default, run(default)
    full = (op,) + key
    known = _known(full, device, candidates)
    if known is not None:
        return known, run(known)
    if not tune or elements < TINY_ELEMENTS or _busy(device):
        return default, run(default)
    name, result, times = measure(device, candidates, run, default, prepare)
    if _session["fresh"] is not None:
        _session["fresh"].add(full)
    remember(op, device, key, name, times, _session["source"], default, candidates)
    return name, result


def _known(full: tuple, device: torch.device, candidates: tuple[str, ...]) -> str | None:
    """The choice made for (op,) + key before, in this process or recorded, among these very candidates (a record
    made before a new candidate existed does not count), or None."""
    memo = _memory.get((device,) + full)
    if memo is not None:
        return memo
    record = recorded(full, device)
    fresh = _session["fresh"]
    if (record is not None and record.get("candidates") == list(candidates) and record["choice"] in candidates
            and (fresh is None or full in fresh)):
        _memory[(device,) + full] = record["choice"]
        return record["choice"]
    return None


def recorded_with_prefix(op: str, device: torch.device, prefix: tuple) -> list[str]:
    """The choices recorded for `op` on `device` whose key begins with `prefix` (its last entries any value): the
    choices a torch.compile graph can use, whose shapes may not be known while it is traced."""
    if not enabled():
        return []
    head = repr((op,) + tuple(prefix))[:-1] + ", "  # the key's repr up to the free entries
    return [r["choice"] for k, r in _file_entries(device_name(device)).items() if k.startswith(head)]


def measure(device: torch.device, candidates, run, default: str, prepare=None):
    """(fastest name, its result, {name: ms}): each candidate run once to warm up, then timed in interleaved rounds
    (A B A B ...: a machine that slows down or speeds up meanwhile biases none of them), at least MIN_ROUNDS and
    while within BUDGET_S, at most MAX_ROUNDS; a candidate's best round counts. A candidate whose every run, its
    warm-up included, took more than (1 + CLEAR) times the leader's best is out of the running: it is timed no
    more, and when only the leader is left the measurement ends (a clear loser costs two runs, not three to six:
    a U-Net's first forward measures dozens of classes of call). The result handed back is the chosen candidate's own run
    where that ran last, else it runs once more."""
    stats["timed"] += 1
    spent, last = 0.0, (None, None)

    def timed(name):
        nonlocal spent, last
        if prepare is not None:
            prepare(name)
        elapsed, result = _once(lambda: run(name), device)
        spent, last = spent + elapsed, (name, result)
        return elapsed

    # first-call costs (primitive creation, weight packing, caches) are not the steady state
    warm = {name: timed(name) for name in candidates}
    best = dict.fromkeys(candidates, float("inf"))
    running = list(candidates)
    for rounds in range(1, MAX_ROUNDS + 1):
        for name in running:
            best[name] = min(best[name], timed(name))
        bar = (1 + CLEAR) * min(best[name] for name in running)
        running = [name for name in running if best[name] <= bar or warm[name] <= bar]
        if len(running) == 1 or (rounds >= MIN_ROUNDS and spent > BUDGET_S):
            break
    times = {name: round(seconds * 1e3, 4) for name, seconds in best.items()}
    choice = min(times, key=times.get)
    if default in times and times[choice] > (1 - MARGIN) * times[default]:
        choice = default  # within the noise of the measurement: keep the fixed order's choice
    name, result = last
    if name != choice:
        if prepare is not None:
            prepare(choice)
        result = run(choice)
    return choice, result, times


def remember(op: str, device: torch.device, key: tuple, name: str, times: dict, source: str, default: str,
             candidates: tuple[str, ...]) -> None:
    label = device_name(device)
    full = (op,) + key
    record = {"choice": name, "candidates": list(candidates), "default": default, "times_ms": times, "source": source,
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    _memory[(device,) + full] = name
    _file_entries(label)[repr(full)] = record
    _write(path_for(label), label, {repr(full): record})


def recorded_choices(device: torch.device) -> dict[str, dict]:
    """Every recorded choice for `device` (its file's and this process's), for `cmfast info`."""
    return dict(sorted(_file_entries(device_name(device)).items()))


def forget() -> None:
    """Drops what this process holds (the file stays): the next call reads the file again. For tests."""
    _memory.clear()
    _records.clear()
