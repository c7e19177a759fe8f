"""The CPU memory of a U-Net forward's large tensors, reused from one forward to the next.

A CPU tensor of 32 MiB or more gets fresh pages from the OS and gives them back when it dies (glibc serves no
such size from its heap), so each one a forward creates is page-faulted in again. At LSUN-256 in bf16 a forward
makes about 110 tensors of 4 MiB or more; on 2 cores of a virtual machine a fresh 1x256x256x256 bf16 tensor costs
5 ms of faults before its first write, against 1.5 ms for the add that fills it, and the faults took a fifth of the
forward.

Inside `reusing()` (every CPU inference forward of cmfast.UNet runs in it, and every CPU inference call of
cmfast.Denoiser, so that a torch.compile'd U-Net's graph runs in it too) the compiled extension's allocator
stands in for torch's CPU allocator. A request of 4 MiB or more is served from the freed blocks of its size class
(rounded up to 256 KiB; from 16 MiB, to 2 MiB), else by a new block aligned to 2 MiB with transparent huge pages
asked for; smaller ones as torch serves them. A freed large block is kept, whenever its tensor dies, while all
kept blocks stay within the cap, and freed when a whole scope (a forward) goes by without using it. The cap:
`CMFAST_CPU_KEEP_MB` (default a quarter of the machine's memory; 0: nothing kept and no scope at all). What stays
kept between forwards is about a forward's working set: 0.7 GiB for LSUN-256 at batch 1 in bf16. `release()`
frees it. The allocator is process-wide while a scope is open: another thread's large tensors made meanwhile are
served the same way. torch's profiler does not see the memory it serves.
"""

from __future__ import annotations

import contextlib
import functools
import os

from ._extension import compiled

KEEP_ENV = "CMFAST_CPU_KEEP_MB"


@functools.cache
def _default_keep_mb() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (4 << 20)
    except (ValueError, OSError, AttributeError):  # no sysconf (not Linux): a fixed 2 GiB
        return 2048


def keep_bytes() -> int:
    """The cap on the kept blocks' bytes, from CMFAST_CPU_KEEP_MB (read at each forward; a bad value is an error)."""
    value = os.environ.get(KEEP_ENV, "").strip()
    if not value:
        return _default_keep_mb() << 20
    if not value.isdigit():
        raise ValueError(f"{KEEP_ENV}: expected a whole number of MiB (0: keep nothing), got {value!r}")
    return int(value) << 20


@contextlib.contextmanager
def reusing():
    """A scope in which large CPU tensors reuse the memory of those freed before (see the module docstring). Without
    the compiled extension, or with CMFAST_CPU_KEEP_MB=0, it does nothing."""
    cap = keep_bytes()
    if compiled is None or cap == 0:
        yield
        return
    compiled.cpu_memory_enter(cap)
    try:
        yield
    finally:
        compiled.cpu_memory_exit()


def release() -> None:
    """Give the kept blocks back to the OS (tensors alive now are untouched)."""
    if compiled is not None:
        compiled.cpu_memory_trim()


def stats() -> dict[str, int]:
    """kept_bytes/kept_blocks (free, for reuse), live_bytes/live_blocks (large tensors alive that it served),
    cap_bytes, reused and fresh (large requests served each way, this process), active (1 inside a scope)."""
    return dict(compiled.cpu_memory_stats()) if compiled is not None else {}
