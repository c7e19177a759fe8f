"""Builds cmfast and its extension cmfast._C.

The CPU part (csrc/*.cpp) is always built; the CUDA part (kernels/*.cu) when CMFAST_CUDA says so:
  CMFAST_CUDA=auto (default): when torch is a CUDA build and a CUDA toolkit is found (CUDA_HOME or nvcc on PATH)
  CMFAST_CUDA=1: always (fails if it cannot); CMFAST_CUDA=0: never.
Other knobs: TORCH_CUDA_ARCH_LIST (default "8.0;9.0a+PTX": A100 and H100 code; sm_90a's PTX does not run on
later GPUs, so for Blackwell add "10.0" or "9.0+PTX"), MAX_JOBS (parallel compile jobs, read by torch's
BuildExtension), CMFAST_NATIVE=1 (tune CPU code for this machine with -march=native).
Build without build isolation so the extension compiles against the torch you run with:
  pip install --no-build-isolation -e .
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_ARCHS = "8.0;9.0a+PTX"


def source_hash() -> str:
    """The sources' fingerprint, computed by the same code cmfast runs at import (loaded by path: no torch)."""
    spec = importlib.util.spec_from_file_location("_build_hash", ROOT / "cmfast" / "_build_hash.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_hash(ROOT)


def want_cuda(torch, cpp_extension) -> bool:
    mode = os.environ.get("CMFAST_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"CMFAST_CUDA must be auto, 0 or 1, got {mode!r}")
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not possible:
        raise SystemExit(
            "CMFAST_CUDA=1 but the CUDA part cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return possible if mode == "auto" else mode == "1"


def extensions():
    import torch
    from torch.utils import cpp_extension

    native = os.environ.get("CMFAST_NATIVE", "0") == "1"
    cuda = want_cuda(torch, cpp_extension)
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    defines = [
        f"-DCMFAST_SOURCE_HASH={source_hash()}",
        f"-DCMFAST_TORCH_VERSION={torch.__version__}",
        f"-DCMFAST_CPU_FLAGS={'native' if native else 'portable'}",
    ]
    if cuda:
        archs = "/".join(os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split())  # no commas in a macro
        defines += ["-DCMFAST_WITH_CUDA", f"-DCMFAST_CUDA_ARCHS={archs}"]
    # torch's BuildExtension adds the -std its headers need (C++20 since torch 2.10).
    # -fopenmp: without it ATen's at::parallel_for runs on one thread (the header checks _OPENMP); the library
    # then shares torch's own libgomp.
    cxx = ["-O3", "-g0", "-fopenmp", *defines] + (["-march=native"] if native else [])
    def files(*patterns):
        return sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(pattern))

    headers = files("csrc/*.h", "kernels/*.h", "kernels/*.cuh")  # a header change must rebuild too
    if not cuda:
        return [cpp_extension.CppExtension("cmfast._C", files("csrc/*.cpp"), depends=headers,
                                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    nvcc = ["-O3", *defines]
    return [cpp_extension.CUDAExtension("cmfast._C", files("csrc/*.cpp", "kernels/*.cu"), depends=headers,
                                        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


def requirements() -> list[str]:
    """The torch this build compiles against, pinned (its release, whatever the local build tag: 2.13.0 for
    2.13.0+cpu): cmfast._C loads only with that torch, and a wheel that allowed another would install and then run
    without its kernels."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "numpy", "safetensors", "pillow", "tqdm"]


setup(ext_modules=extensions(), cmdclass=cmdclass(), install_requires=requirements())
