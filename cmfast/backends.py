"""Which implementation of an op runs: backend availability, preference order, and forcing.

Preference on a tensor's device: CUDA C++ > Triton (on a GPU) > CPU C++ (on CPU tensors) > torch (torch's own
fused kernels on strided views, where an op has such a path) > reference (plain PyTorch, the ground truth).
Which backends an op has is found, not declared: compiled kernels registered in cmfast._C, a Triton module
cmfast/triton/<op>.py, and the Python paths the op module lists (`implemented`).
Unforced, the backend is the one measured fastest for the class of call (cmfast.tuning: timed once, recorded on
disk), or this order where nothing was measured (CMFAST_TUNE=0, tiny calls, inside torch.compile or a CUDA graph
capture). Force one with the environment variable CMFAST_BACKEND=<name> (or per op: group_norm=cpu,attention=torch; read once,
at the first op call of the process) or `with cmfast.use_backend(name or {op: name}):` (the context manager wins). A forced backend that cannot run raises instead of falling back, so tests
and benchmarks measure what they name. Triton runs on CPU tensors only when forced and TRITON_INTERPRET=1
was set before triton was first imported (its CPU interpreter, for tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os

import torch

from . import tuning
from .triton import interpreted as triton_interpreter
from ._extension import status as extension

BACKENDS = ("cuda", "triton", "cpu", "torch", "reference")
OPS = ("consistency", "group_norm", "attention")  # the ops a backend can be forced for (cmfast.ops.IMPLEMENTED)
_forced: contextvars.ContextVar[str | dict | None] = contextvars.ContextVar("cmfast_backend", default=None)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _check_op(op) -> str:
    if not isinstance(op, str) or op.strip() not in OPS:
        raise ValueError(f"backend: unknown op {op!r}; the ops are {', '.join(OPS)}")
    return op.strip()


def _parse(spec: str | dict) -> str | dict:
    """A backend name for every op, or per op: {"group_norm": "cpu", ...} or "group_norm=cpu,attention=torch"."""
    if isinstance(spec, str) and "=" in spec:
        items = [item for item in spec.split(",") if item.strip()]
        if any(item.count("=") != 1 for item in items):
            raise ValueError(f"backend: expected a name or op=name pairs separated by commas, got {spec!r}")
        spec = dict(item.split("=") for item in items)
    if isinstance(spec, dict):
        return {_check_op(op): _check_name(name.strip() if isinstance(name, str) else name) for op, name in spec.items()}
    return _check_name(spec.strip() if isinstance(spec, str) else spec)


ENV = "CMFAST_BACKEND"


@functools.cache
def _environment() -> str | dict | None:
    """CMFAST_BACKEND, read and parsed on the first op call of the process (every op call needs it; reading the
    environment each time would cost more than some of the kernels)."""
    value = os.environ.get(ENV, "")
    if not value.strip():
        return None
    try:
        return _parse(value)
    except ValueError as e:
        raise ValueError(f"{ENV}={value!r}: {str(e).removeprefix('backend: ')}") from None


@contextlib.contextmanager
def use_backend(spec: str | dict):
    """Run the cmfast ops inside the block on backend `spec` (a name for every op, or a mapping op -> name);
    a forced backend that cannot run raises instead of falling back."""
    token = _forced.set(_parse(spec))
    try:
        yield
    finally:
        _forced.reset(token)


def forced(op: str | None = None) -> str | dict | None:
    """The backend forced for `op` by use_backend() or CMFAST_BACKEND, else None; without `op`, the whole setting
    (a name, a mapping op -> name, or None)."""
    spec = _forced.get()  # parsed by use_backend()
    if spec is None:
        spec = _environment()
        if spec is None:
            return None
    if op is None:
        return spec
    return spec.get(op) if isinstance(spec, dict) else spec


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(importable, why not). Cached: triton is probed once per process."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install must not break cmfast
        return False, f"triton failed to import ({e})"
    return True, ""


def availability(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether `backend` can run an op on tensors of `device`, and why not."""
    is_cuda = device.type == "cuda"
    if backend == "reference":
        return True, "pure PyTorch, runs everywhere"
    if backend == "torch":
        return True, "torch's fused kernels on strided views"
    if backend == "cuda":
        if not is_cuda:
            return False, f"CUDA kernels need CUDA tensors, not {device.type}"
        if not extension.cuda:
            return False, extension.reason or "cmfast._C was built without its CUDA part"
        return True, "cmfast._C CUDA kernels"
    if backend == "cpu":
        if device.type != "cpu":
            return False, f"CPU kernels need CPU tensors, not {device.type}"
        if not extension.cpu:
            return False, extension.reason
        return True, "cmfast._C CPU kernels"
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return False, why
        if is_cuda:
            return True, "Triton kernels on the GPU"
        if device.type == "cpu" and triton_interpreter():
            return True, "Triton CPU interpreter (TRITON_INTERPRET=1), only when forced"
        return False, f"Triton needs a GPU for {device.type} tensors (or TRITON_INTERPRET=1 and forcing)"
    raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")


def implemented(kernel: str, triton_module: str, python: tuple[str, ...] = ("reference",)) -> tuple[str, ...]:
    """The backends that have code for an op: `kernel` registered in cmfast_C (CPU / CUDA dispatch keys), the
    module cmfast.triton.<triton_module>, and the Python backends `python`."""
    found = set(python)
    if extension.loaded and hasattr(torch.ops.cmfast_C, kernel):
        for name, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"cmfast_C::{kernel}", key):
                found.add(name)
    if importlib.util.find_spec(f"cmfast.triton.{triton_module}") is not None:
        found.add("triton")
    return tuple(name for name in BACKENDS if name in found)


def choose(op: str, device: torch.device, implemented: tuple[str, ...] = BACKENDS) -> str:
    """The backend `op` runs on for tensors on `device`, among the backends it `implemented`."""
    name = forced(op)
    if name is not None:
        ok, why = availability(name, device) if name in implemented else (False, f"{op} has no {name} kernels")
        if not ok:
            raise RuntimeError(f"backend {name!r} was forced for {op} but cannot run on {device}: {why}")
        return name
    return _preferred(device, implemented)


def run(op: str, device: torch.device, implemented: tuple[str, ...], key: tuple, call, *, elements: int,
        tune: bool = True):
    """call(backend) on the backend that serves this call of `op`: the forced one; else the one measured fastest for
    this class of call (`key`: dtype, layout, shape, ...; cmfast.tuning), timing the candidates the first time; else
    the fixed order. `tune=False` (the registered op, which torch.compile and export call) never times."""
    name = forced(op)
    if name is not None:
        return call(choose(op, device, implemented))
    candidates = _candidates(device, implemented)
    return tuning.choose(op, device, key + (torch.get_num_threads(),), candidates, _preferred(device, implemented),
                         call, elements=elements, tune=tune)[1]


@functools.cache
def _candidates(device: torch.device, implemented: tuple[str, ...]) -> tuple[str, ...]:
    """The backends a measurement compares on `device`: every available one but the reference (the slow ground
    truth) and Triton off a GPU (its CPU interpreter is for tests)."""
    return tuple(name for name in BACKENDS if name in implemented and name != "reference"
                 and not (name == "triton" and device.type != "cuda") and availability(name, device)[0])


@functools.cache
def _preferred(device: torch.device, implemented: tuple[str, ...]) -> str:
    """The first backend in preference order that runs on `device` (fixed for a process: the extension and triton
    are probed once), so an unforced op call pays a dictionary lookup."""
    for name in BACKENDS:
        if name not in implemented or (name == "triton" and device.type != "cuda"):
            continue  # the Triton interpreter is for tests; never chosen unasked
        if availability(name, device)[0]:
            return name
    return "reference"
