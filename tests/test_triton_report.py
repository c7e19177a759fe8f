"""tools/triton_report.py: the U-Net trace it compiles from, its resource checks, and one real compile for sm_90a."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmfast.models.config import IMAGENET64, LSUN256

TOOL = Path(__file__).resolve().parent.parent / "tools" / "triton_report.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("triton_report", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_trace_of_the_imagenet64_unet(channels_last):
    """The ADM ImageNet-64 U-Net makes 95 GroupNorm and 22 attention calls a forward (issue 5's count), attention
    at 32x32, 16x16 and 8x8 with 64-channel heads; mixed precision: the blocks' calls in fp16, the final norm fp32."""
    calls = load_tool().op_calls(IMAGENET64, 3, channels_last, torch.float16)
    norms = [args for op, args in calls if op == "group_norm"]
    attentions = [args for op, args in calls if op == "attention"]
    assert (len(norms), len(attentions)) == (95, 22)
    assert all(x.shape[0] == 3 and x.is_meta for x, *_ in norms)
    assert {(qkv.shape[1] // 3 // heads, qkv.shape[2]) for qkv, heads in attentions} == {(64, 32), (64, 16), (64, 8)}
    assert [x.dtype for x, *_ in norms].count(torch.float32) == 1
    assert all(x.is_contiguous(memory_format=torch.channels_last) == channels_last for x, *_ in norms[:-1])
    silu_scale = sum(1 for x, w, b, scale, shift, g, eps, silu in norms if silu and scale is not None)
    assert silu_scale == 36  # the second norm of each of the 36 ResBlocks (15 down the U, 2 middle, 19 up)


def test_trace_of_the_lsun256_unet():
    calls = load_tool().op_calls(LSUN256, 1, False, torch.float32)
    norms = [args for op, args in calls if op == "group_norm"]
    # 42 ResBlocks (6 levels x 2 + 5 down, 2 middle, 6 x 3 + 5 up) x 2 norms, 16 attention blocks (2 + 3 at each of
    # 32, 16 and 8, and the middle's), the final norm
    assert (len(norms), len(calls) - len(norms)) == (101, 16)
    assert all(scale is None for x, w, b, scale, shift, g, eps, silu in norms)  # no scale/shift norm in LSUN-256
    assert {x.shape[-1] for x, *_ in norms} == {256, 128, 64, 32, 16, 8}


def test_problems_flags_spills_shared_memory_and_registers():
    tool = load_tool()
    target = tool.TARGETS["sm_90a"]
    clean = dict(regs=128, warps=8, spill_st=0, spill_ld=0, shared=target.shared_bytes, fp_fusion_stated=True)
    assert tool.problems(target, clean) == []
    assert "spills" in tool.problems(target, dict(clean, spill_ld=4))[0]
    assert "shared memory" in tool.problems(target, dict(clean, shared=target.shared_bytes + 1))[0]
    assert "registers" in tool.problems(target, dict(clean, regs=255, warps=16))[0]  # 255 x 512 > 64K
    assert "fp_fusion" in tool.problems(target, dict(clean, fp_fusion_stated=False))[0]


def test_compiles_a_kernel_for_sm90a():
    """The tool end to end on the smallest kernel: traced, launched through the recorder, compiled, ptxas read."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    proc = subprocess.run([sys.executable, str(TOOL), "--arch", "sm_90a", "--kernel", "_prologue_kernel", "--all",
                           "-j", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("_prologue_kernel")]
    assert {row[2] for row in rows} == {"fp16", "bf16", "fp32"}
    assert all(row[1] == "sm_90a" and int(row[5]) > 0 and row[6] == row[7] == "0" for row in rows)  # regs, no spills
    assert "0 problems, 0 compile failures" in proc.stdout
