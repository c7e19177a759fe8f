"""The CUDA group_norm's launch plan (kernels/group_norm_plan.h, bound in every build as
cmfast._C.group_norm_cuda_plan) for GPUs this machine does not have: every plan within its kernel's and its device's
limits over a grid of shapes, the test shapes reaching the kernels they are meant for, and the cases the kernels
were built for."""

import itertools
import math

import pytest
import torch
from test_group_norm import CUDA_PATHS
from test_triton_report import load_tool

import cmfast
from cmfast.models.config import IMAGENET64

pytestmark = pytest.mark.skipif(not cmfast.extension.cpu, reason=cmfast.extension.reason or "no cmfast._C")

GPUS = {"H100": dict(sms=132, shared_optin=227 * 1024, major=9), "A100": dict(sms=108, shared_optin=163 * 1024, major=8)}
# The kernels' limits, as kernels/group_norm.cu builds them: 256 threads holding 4 or 16 packets each, clusters of
# at most 8 blocks, two-stage splits of at most 32 blocks of at least 2 packets a thread, 1 KB of the opt-in shared
# memory left to the block reduction.
THREADS, ITEMS, MAX_CLUSTER, MAX_SPLITS, SHARED_RESERVE = 256, (4, 16), 8, 32, 1024


def plan(batch, channels, spatial, *, bytes_, gpu, groups=32, channels_last=False, alignment=16, clusters=True):
    from cmfast._extension import compiled

    return compiled.group_norm_cuda_plan(batch=batch, channels=channels, spatial=spatial, groups=groups,
                                         channels_last=channels_last, element_bytes=bytes_, alignment=alignment,
                                         clusters=clusters, **GPUS[gpu])


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("clusters", [True, False], ids=["clusters", "no-clusters"])
def test_test_shapes_reach_their_kernels(gpu, clusters):
    for shape, dtype, path in CUDA_PATHS:
        if path == "cluster" and (GPUS[gpu]["major"] < 9 or not clusters):
            path = "two-stage"
        for channels_last in (False, True):
            got = plan(shape[0], shape[1], math.prod(shape[2:]), bytes_=dtype.itemsize, gpu=gpu,
                       channels_last=channels_last, clusters=clusters)
            assert got["kernel"] == path, (shape, dtype, channels_last, got)


def test_the_cases_the_kernels_were_built_for():
    # 64x768x64x64 fp16: 196 KB groups, held in one H100 block's shared memory (read once); an A100 block's 163 KB
    # cannot hold one: two stages there.
    assert plan(64, 768, 4096, bytes_=2, gpu="H100") == dict(kernel="shared", vec=8, items=0, splits=1,
                                                            shared_bytes=196608, workspace_floats=0)
    assert plan(64, 768, 4096, bytes_=2, gpu="A100")["kernel"] == "two-stage"
    # Batch 1 of the ImageNet-64 U-Net on sm_90: every norm one launch (a block or a cluster per group), no workspace,
    # but one: channels_last 1x576x64x64, whose 18 channels a group allow only 2-element packets, 36K of them, past
    # a cluster's registers.
    two_stage = set()
    for channels_last, dtype in itertools.product((False, True), (torch.float16, torch.float32)):
        for op, args in load_tool().op_calls(IMAGENET64, 1, channels_last, dtype):
            if op == "group_norm":
                x = args[0]
                got = plan(1, x.shape[1], math.prod(x.shape[2:]), bytes_=x.element_size(), gpu="H100",
                           channels_last=channels_last)
                if got["kernel"] not in ("fused", "cluster"):
                    two_stage.add((tuple(x.shape), channels_last, got["kernel"]))
    assert two_stage == {((1, 576, 64, 64), True, "two-stage")}


def test_every_plan_is_within_its_kernel_and_device():
    shapes = itertools.product((1, 2, 64), (64, 96, 192, 320, 576, 768, 1536), (1, 3, 64, 256, 4096, 65536))
    for (batch, channels, spatial), bytes_, channels_last, alignment, gpu, clusters in itertools.product(
            shapes, (2, 4), (False, True), (16, 8, 4, 2), GPUS, (True, False)):
        if alignment < bytes_:
            continue  # tensors are at least element-aligned
        limits = GPUS[gpu]
        got = plan(batch, channels, spatial, bytes_=bytes_, gpu=gpu, channels_last=channels_last,
                   alignment=alignment, clusters=clusters)
        where = (batch, channels, spatial, bytes_, channels_last, alignment, gpu, clusters, got)
        n, pairs = channels // 32 * spatial, batch * 32
        run = channels // 32 if channels_last else spatial
        # the widest packet of at most 16 bytes that stays inside a run and is aligned
        fits = [v for v in (16 // bytes_, 2, 1) if run % v == 0 and alignment % (v * bytes_) == 0]
        assert got["vec"] == fits[0], where
        packets = n // got["vec"]
        kernel, splits = got["kernel"], got["splits"]
        assert (got["workspace_floats"] > 0) == (kernel == "two-stage"), where
        assert (got["shared_bytes"] > 0) == (kernel == "shared"), where
        if kernel == "fused":
            assert splits == 1 and got["items"] in ITEMS and packets <= THREADS * got["items"], where
            assert (got["items"] == ITEMS[0]) == (packets <= THREADS * ITEMS[0]), where
        elif kernel == "cluster":
            assert limits["major"] >= 9 and clusters and 2 <= splits <= MAX_CLUSTER, where
            assert got["items"] in ITEMS and -(-packets // splits) <= THREADS * got["items"], where
        elif kernel == "shared":
            assert splits == 1 and packets > THREADS * ITEMS[1], where  # only past the registers
            assert got["shared_bytes"] == n * bytes_ <= limits["shared_optin"] - SHARED_RESERVE, where
        else:
            assert kernel == "two-stage" and 1 <= splits <= MAX_SPLITS, where
            assert got["workspace_floats"] == pairs * splits * 3, where
            assert splits == 1 or packets // splits >= 2 * THREADS, where
            assert splits > 1 or packets > THREADS * ITEMS[1], where  # one block per group only past the registers
        # too few groups for the GPU and room to split: the group is split
        if 2 * pairs < limits["sms"] and packets >= 2 * 2 * THREADS:
            assert splits > 1, where


def test_unsupported_shapes_say_so():
    assert plan(1, 96, 16, bytes_=2, gpu="H100", groups=32 * 5)["kernel"] == "unsupported"  # 96 % 160
    assert plan(1, 64, 2**31, bytes_=2, gpu="H100", groups=1)["kernel"] == "unsupported"  # a group past 2^31 - 1
