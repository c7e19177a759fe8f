"""Test setup. Without a GPU, Triton kernels run in Triton's CPU interpreter, which must be switched on
before triton is first imported (so here, before any test module imports cmfast).

Random inputs are fresh each session: the seed is printed in the header; rerun a failure with
CMFAST_TEST_SEED=<seed>."""

import atexit
import os
import random
import shutil
import tempfile
import zlib

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The fixed backend order unless a test turns measurement on (tests/test_tuning.py), and never the user's cache.
os.environ.setdefault("CMFAST_TUNE", "0")
os.environ["CMFAST_CACHE"] = tempfile.mkdtemp(prefix="cmfast-test-cache-")
atexit.register(shutil.rmtree, os.environ["CMFAST_CACHE"], True)

from cmfast import backends  # noqa: E402

SEED = int(os.environ.get("CMFAST_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"cmfast test seed: {SEED} (CMFAST_TEST_SEED={SEED} reproduces); TRITON_INTERPRET={backends.triton_interpreter()}"


def pytest_terminal_summary(terminalreporter):
    if terminalreporter.stats.get("failed"):
        terminalreporter.write_line(f"random inputs came from CMFAST_TEST_SEED={SEED}")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


# The backends that can serve each device type (cuda kernels never take CPU tensors, nor cpu ones CUDA tensors).
DEVICE_BACKENDS = {"cpu": ("cpu", "triton", "torch", "reference"), "cuda": ("cuda", "triton", "torch", "reference")}


def backend_params(implemented) -> list:
    """(device, backend) pytest params for the backends an op `implemented`: CUDA ones marked gpu; CPU ones that
    cannot run here skipped with the reason."""
    params = []
    for device, names in DEVICE_BACKENDS.items():
        for name in (n for n in names if n in implemented):
            marks = [pytest.mark.gpu] if device == "cuda" else []
            ok, why = backends.availability(name, torch.device(device))
            if device == "cpu" and not ok:
                marks.append(pytest.mark.skip(reason=why))
            params.append(pytest.param(device, name, marks=marks, id=f"{device}-{name}"))
    return params


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def with_shapes(params, shapes_for) -> list:
    """(device, backend, shape) params: each of backend_params' rows crossed with shapes_for(device, backend), the
    shape in the test id (a failure names its shape)."""
    rows = []
    for p in params:
        device, backend = p.values
        for shape in shapes_for(device, backend):
            rows.append(pytest.param(device, backend, shape, marks=p.marks, id=f"{p.id}-{shape_id(shape)}"))
    return rows


@pytest.fixture
def gen(request):
    """A generator seeded from the session seed and the test's id: fresh inputs per session, reproducible."""
    return torch.Generator().manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny class-conditional checkpoint (the test_imagenet preset, every weight random) for the commands."""
    import cmfast
    from reference_models import randomize_

    from cmfast.models import PRESETS, UNet

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return str(cmfast.save(randomize_(UNet(PRESETS["test_imagenet"].unet), torch.Generator().manual_seed(5)), path))
