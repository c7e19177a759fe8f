"""What this install can do: versions, the compiled extension's parts, and the backend each op uses."""

from __future__ import annotations

import platform

import torch

from . import __version__, backends, memory, tuning
from ._extension import compiled, status as extension
from .ops import IMPLEMENTED


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    return devices


def report(verbose: bool = False) -> str:
    lines = [
        f"cmfast {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA build: {torch.version.cuda or 'no'}), {torch.get_num_threads()} CPU threads",
    ]
    ok, why = backends.triton_status()
    if ok:
        import triton

        mode = ", CPU interpreter on (TRITON_INTERPRET=1)" if backends.triton_interpreter() else ""
        lines.append(f"triton {triton.__version__}{mode}")
    else:
        lines.append(f"triton: off ({why})")
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("GPU: none visible to torch")
    if extension.loaded:
        info = extension.build_info
        cuda = f"yes (CUDA runtime {info['cuda_runtime']}, archs {info['cuda_arch_list']})" if extension.cuda else "no"
        lines.append(f"cmfast._C: loaded; CPU part: yes ({info['cpu_flags']} flags); CUDA part: {cuda}")
        kernels = compiled.attention_cpu_kernels()
        lines.append("attention CPU kernels this CPU runs: " + (", ".join(kernels) if kernels else
                     "none (they need AVX-512; the torch backend serves)"))
        from .models import winograd

        engines = winograd.bf16_engines()
        bf16 = f"bf16 too ({engines[0]})" if engines else "not bf16 (it needs AVX512_BF16)"
        lines.append(f"Winograd 3x3 convolutions (CPU, channels_last): fp32, {bf16}")
        lines.append("CPU forwards' large tensors: " + _memory_reuse())
        if tuning.isa_cap():
            lines.append(f"CPU code capped at {tuning.isa_cap()} (ONEDNN_MAX_CPU_ISA): torch's oneDNN and cmfast's "
                         "CPU kernels")
    else:
        lines.append(f"cmfast._C: off ({extension.reason})")
    forced = {op: backends.forced(op) for op in IMPLEMENTED if backends.forced(op)}
    if forced:
        lines.append("forced backends: " + ", ".join(f"{op}={name}" for op, name in forced.items()))
    lines.append("backends (preference: " + " > ".join(backends.BACKENDS) + "):")
    for device in _devices():
        lines.append(f"  on {device}:")
        for name in backends.BACKENDS:
            ok, reason = backends.availability(name, device)
            lines.append(f"    {name:<10} {'available' if ok else 'off'}: {reason}")
        for op, implemented in IMPLEMENTED.items():
            try:
                chosen = backends.choose(op, device, implemented)
            except RuntimeError as e:  # a forced backend that cannot run here
                chosen = f"none ({e})"
            lines.append(f"    {op:<12} -> {chosen:<10} (kernels: {', '.join(implemented)})")
        lines.extend(_measured(device, verbose))
    return "\n".join(lines)


def _memory_reuse() -> str:
    try:
        cap = memory.keep_bytes()
    except ValueError as e:
        return f"memory reuse refused: {e}"
    if not cap:
        return f"memory not reused ({memory.KEEP_ENV}=0)"
    kept = memory.stats()["kept_bytes"]
    return f"memory reused, {kept / 2**20:.0f} MiB kept now, at most {cap / 2**20:.0f} MiB ({memory.KEEP_ENV})"


def _measured(device: torch.device, verbose: bool) -> list[str]:
    """The choices recorded by measurement for `device` (cmfast.tuning), summarised per op or listed."""
    try:
        on = tuning.enabled()
    except ValueError as e:
        return [f"    measured choices: off ({e})"]
    records = tuning.recorded_choices(device)
    state = "on" if on else f"off ({tuning.TUNE_ENV}=0: the fixed order above)"
    lines = [f"    measured choices ({state}): {len(records)} recorded in {tuning.path_for(tuning.device_name(device))}"]
    summary: dict = {}
    for key, record in records.items():
        op = key.split(",")[0].strip("('\"")
        entry = summary.setdefault((op, record["choice"], record.get("source", "?")), [0, 0.0, 0.0])
        entry[0] += 1
        default = record.get("default")
        if default in record["times_ms"]:
            entry[1] += record["times_ms"][default]
            entry[2] += record["times_ms"][record["choice"]]
        if verbose:
            times = ", ".join(f"{n} {t:.3f} ms" for n, t in record["times_ms"].items())
            lines.append(f"      {key} -> {record['choice']} ({times}; {record.get('source', '?')}, {record.get('when', '?')})")
    for (op, choice, source), (count, fixed, chosen) in sorted(summary.items()):
        gain = f", {fixed / chosen:.2f}x the fixed order's time on those calls" if chosen else ""
        lines.append(f"      {op:<12} {choice:<8} {count:>4} class(es) of call (from {source}{gain})")
    return lines
