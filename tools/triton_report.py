#!/usr/bin/env python3
"""Compile cmfast's Triton kernels for sm_80 and sm_90a (no GPU needed) at every launch the U-Nets make, and report
registers, spills and shared memory.

The ImageNet-64 and LSUN-256 U-Nets run forward on the meta device (no memory, no arithmetic) with their
group_norm and attention calls recorded; each recorded call, plus the attention shapes the op promises beyond the
U-Nets (head dims 32 and 128, T = 1 and 4096) and the consistency ops, then goes through its Triton launcher with
the kernels' launches replaced by a recorder: the tiles, warps and pipeline stages are the launcher's own choice
for the target's SM count. Each distinct specialisation is compiled by Triton's own compiler for the target and
ptxas's report of it read (the options Triton passes to ptxas, not a reconstruction).

Exit status: 0 all good; 1 a kernel spills, or needs more shared memory or registers than the target has;
2 a kernel failed to compile. Needs torch and triton with its NVIDIA backend (the pip wheel has it); no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

if __name__ == "__main__":  # before triton is imported: compiled kernels, not interpreted ones
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptxas_report import parse as parse_ptxas, print_table  # noqa: E402


@dataclass(frozen=True)
class Target:
    arch: str
    capability: int
    sms: int  # what the launchers size their grids by
    shared_bytes: int  # a block's opt-in shared memory limit
    registers: int = 65536  # a multiprocessor's register file: one block's threads x registers must fit


TARGETS = {t.arch: t for t in (Target("sm_80", 80, 108, 163 * 1024), Target("sm_90a", 90, 132, 227 * 1024))}
BATCHES = (1, 64)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PRECISION = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
EXTRA_ATTENTION = [  # (channels, heads, side): what the op promises beyond the U-Nets' 64-channel heads
    (128, 4, 32), (256, 2, 32), (512, 4, 64), (192, 3, 1), (96, 3, 16),
]


@dataclass
class Launch:
    """One distinct specialisation of a kernel, and the op calls that launch it."""
    kernel: JITFunction
    args: list
    kwargs: dict
    examples: list = field(default_factory=list)


def as_mock(value):
    return MockTensor(value.dtype) if isinstance(value, torch.Tensor) else value


def op_calls(config, batch: int, channels_last: bool, dtype: torch.dtype) -> list[tuple]:
    """The (op, args) calls the U-Net of `config` makes in a forward at this batch size, on the meta device, in
    this precision (UNet.set_precision) and layout."""
    from cmfast.models import unet as unet_module
    from cmfast.ops.attention import attention_output

    calls = []
    layout = torch.channels_last if channels_last else torch.contiguous_format

    class Recorder:  # meta convolutions return NCHW whatever their input; real ones keep channels_last
        @staticmethod
        def group_norm(x, weight=None, bias=None, *, num_groups=32, eps=1e-5, scale=None, shift=None, silu=False):
            x = x.contiguous(memory_format=layout)
            calls.append(("group_norm", (x, weight, bias, scale, shift, num_groups, eps, silu)))
            return torch.empty_like(x)

        @staticmethod
        def attention(qkv, num_heads):
            qkv = qkv.contiguous(memory_format=layout)
            calls.append(("attention", (qkv, num_heads)))
            return attention_output(qkv)

    with torch.device("meta"):  # the reference's mixed mode for half types: block convolutions in that type
        model = unet_module.UNet(config).set_precision(PRECISION[dtype]).set_channels_last(channels_last)
        x = torch.empty(batch, config.in_channels, config.image_size, config.image_size)
        labels = torch.zeros(batch, dtype=torch.long) if config.num_classes else None
        t = torch.zeros(batch)
    with mock.patch.object(unet_module, "ops", Recorder):
        model(x, t, labels)
    return calls


def all_op_calls() -> list[tuple[str, tuple, str]]:
    """(op, args, description) of every call to check."""
    from cmfast.models.config import IMAGENET64, LSUN256

    found = []
    for name, config in (("imagenet64", IMAGENET64), ("lsun256", LSUN256)):
        for batch in BATCHES:
            for channels_last in (False, True):
                for dtype in DTYPES:
                    for op, args in op_calls(config, batch, channels_last, dtype):
                        layout = "NHWC" if channels_last else "NCHW"
                        found.append((op, args, f"{name} {'x'.join(map(str, args[0].shape))} {layout}"))
    for channels, heads, side in EXTRA_ATTENTION:
        for dtype in DTYPES:
            qkv = torch.empty(2, 3 * channels, side, side, dtype=dtype, device="meta")
            found.append(("attention", (qkv, heads), f"op {'x'.join(map(str, qkv.shape))} heads {heads}"))
    for side in (64, 256):
        for dtype in DTYPES:
            x = torch.empty(4, 3, side, side, dtype=dtype, device="meta")
            found.append(("consistency", (x,), f"op {'x'.join(map(str, x.shape))}"))
    return found


def launches_for(target: Target, calls) -> dict[tuple, Launch]:
    """Every distinct kernel specialisation the launchers pick for these calls at the target's SM count."""
    from cmfast.ops._common import dense_layout
    from cmfast.ops.attention import attention_output
    from cmfast.ops.group_norm import _f32
    from cmfast.triton import attention, consistency, group_norm

    modules = (attention, consistency, group_norm)
    backend = make_backend(GPUTarget("cuda", target.capability, 32))
    launches: dict[tuple, Launch] = {}
    current = [""]

    def recorder(kernel):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)

        def run(*args, grid, warmup, **kwargs):
            args, kwargs = [as_mock(a) for a in args], {k: as_mock(v) for k, v in kwargs.items()}
            bound, specialization, options = binder(*args, **kwargs)
            key = (kernel.fn.__name__, str(specialization), str(options))
            launch = launches.setdefault(key, Launch(kernel, args, kwargs))
            launch.examples.append(current[0])

        return run

    with contextlib.ExitStack() as patches:
        for module in modules:
            if hasattr(module, "sm_count"):
                patches.enter_context(mock.patch.object(module, "sm_count", lambda device: target.sms))
            for name, value in vars(module).items():
                if isinstance(value, JITFunction) and name.endswith("_kernel"):
                    patches.enter_context(mock.patch.object(value, "run", recorder(value)))
        for op, args, description in calls:
            current[0] = description
            if op == "group_norm":
                x, weight, bias, scale, shift, num_groups, eps, silu = args
                x = dense_layout(x)
                group_norm.group_norm(x, _f32(weight), _f32(bias), _f32(scale), _f32(shift), num_groups, eps, silu,
                                      torch.empty_like(x))
            elif op == "attention":
                qkv = dense_layout(args[0])
                attention.attention(qkv, args[1], attention_output(qkv))
            else:
                x = args[0]
                sigma = torch.empty(x.shape[0], device="meta")
                consistency.consistency_epilogue(x, x, sigma, 0.5, 0.002, True, torch.empty_like(x))
                consistency.consistency_prologue(x, sigma, 0.5, torch.empty_like(x), torch.empty_like(sigma))
    return launches


def compile_launch(target: Target, launch: Launch) -> dict:
    """Compiles one specialisation for the target; returns its report row."""
    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", target.capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # knobs.nvidia.dump_ptxas_log prints ptxas's -v report
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", target.capability, 32), options=options.__dict__)
    entries = [r for r in parse_ptxas(log.getvalue()) if r["regs"] is not None]
    if len(entries) != 1:
        raise RuntimeError(f"expected one ptxas report for {kernel.fn.__name__}, got {len(entries)}:\n{log.getvalue()}")
    row = entries[0]
    meta = compiled.metadata
    constants = {k: v for k, v in kwargs.items() if k.isupper()}
    dtype = next(t for t in signature.values() if t.startswith("*"))[1:]  # the first pointer's: x's or qkv's
    return {
        "kernel": kernel.fn.__name__, "arch": target.arch, "dtype": dtype, "warps": meta.num_warps,
        "stages": meta.num_stages, "regs": row["regs"], "spill_st": row["spill_st"], "spill_ld": row["spill_ld"],
        "shared": meta.shared,
        "constants": " ".join(f"{k}={v}" for k, v in constants.items() if not k.startswith("HAS_")),
        "example": launch.examples[0], "calls": len(launch.examples),
        "fp_fusion_stated": "enable_fp_fusion" in launch.kwargs,
    }


def problems(target: Target, row: dict) -> list[str]:
    found = []
    if not row["fp_fusion_stated"]:
        found.append("the launch leaves enable_fp_fusion to Triton's default (which 3.10 changes)")
    if row["spill_st"] or row["spill_ld"]:
        found.append(f"spills {row['spill_st']} B stores, {row['spill_ld']} B loads")
    if row["shared"] > target.shared_bytes:
        found.append(f"needs {row['shared']} B of shared memory, the block limit is {target.shared_bytes}")
    if row["regs"] * row["warps"] * 32 > target.registers:
        found.append(f"{row['regs']} registers x {row['warps'] * 32} threads exceed the {target.registers} of an SM")
    return found


SUMMARY_KEYS = ("kernel", "arch", "dtype")


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (kernel, arch, dtype): how many specialisations, the largest registers, spills, shared memory."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(r[k] for k in SUMMARY_KEYS)
        g = groups.setdefault(key, dict(zip(SUMMARY_KEYS, key), variants=0, calls=0, regs=0, spill_st=0, spill_ld=0,
                                        shared=0, warps=set()))
        g["variants"] += 1
        g["calls"] += r["calls"]
        g["warps"].add(r["warps"])
        for k in ("regs", "spill_st", "spill_ld", "shared"):
            g[k] = max(g[k], r[k])
    for g in groups.values():
        g["warps"] = ",".join(map(str, sorted(g["warps"])))
    return list(groups.values())


FULL_COLUMNS = (("kernel", "kernel"), ("arch", "arch"), ("dtype", "dtype"), ("warps", "warps"), ("stages", "stages"),
                ("regs", "regs"), ("spill st", "spill_st"), ("spill ld", "spill_ld"), ("shared", "shared"),
                ("calls", "calls"), ("constants", "constants"), ("example call", "example"))
SUMMARY_COLUMNS = (("kernel", "kernel"), ("arch", "arch"), ("dtype", "dtype"), ("variants", "variants"),
                   ("calls", "calls"), ("warps", "warps"), ("max regs", "regs"), ("spill st", "spill_st"),
                   ("spill ld", "spill_ld"), ("max shared", "shared"))

_PENDING: list[tuple[Target, Launch]] = []  # what the forked workers compile, by index


def _compile_pending(index: int) -> tuple[dict | None, str | None]:
    target, launch = _PENDING[index]
    try:
        return compile_launch(target, launch), None
    except Exception as error:  # every failure is reported, then the exit status is 2
        return None, (f"{launch.kernel.fn.__name__} on {target.arch} ({launch.examples[0]}): "
                      f"{type(error).__name__}: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=sorted(TARGETS), help="target(s) (default: all)")
    parser.add_argument("--kernel", action="append", help="only kernels whose name contains this (repeatable)")
    parser.add_argument("--all", action="store_true", help="a row per specialisation, not per kernel and dtype")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args()
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cached kernel would compile without a ptxas report

    start = time.perf_counter()
    calls = all_op_calls()
    for arch in args.arch or sorted(TARGETS):
        target = TARGETS[arch]
        launches = [l for l in launches_for(target, calls).values()
                    if not args.kernel or any(k in l.kernel.fn.__name__ for k in args.kernel)]
        print(f"{arch}: {len(launches)} distinct launches of {len(calls)} op calls", flush=True)
        _PENDING.extend((target, l) for l in launches)
    indices = range(len(_PENDING))
    if args.jobs > 1 and len(_PENDING) > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(_compile_pending, indices, chunksize=4)
    else:
        results = [_compile_pending(i) for i in indices]
    rows = [r for r, _ in results if r is not None]
    failed = [f for _, f in results if f is not None]
    rows.sort(key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["constants"]))
    print_table(rows if args.all else summarise(rows), FULL_COLUMNS if args.all else SUMMARY_COLUMNS)
    bad = [(r, p) for r in rows for p in problems(TARGETS[r["arch"]], r)]
    for row, problem in bad:
        print(f"PROBLEM: {row['kernel']} on {row['arch']} ({row['dtype']} {row['constants']}; {row['example']}): "
              f"{problem}")
    for failure in failed:
        print(f"FAILED: {failure}")
    print(f"{len(rows)} kernel specialisations x arch compiled, {len(bad)} problems, {len(failed)} compile failures "
          f"({time.perf_counter() - start:.0f} s; Triton {triton.__version__}, torch {torch.__version__})")
    return 2 if failed else 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
