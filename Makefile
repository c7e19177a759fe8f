# Developer and CI entry points. Every target installs what it needs into a venv under $(CACHE), reused
# between runs, so a fresh clone needs only `make test` (the tests) or `make run` (the main job).
#   make test        build the extension in place and run the tests (CPU; GPU tests skip without a GPU)
#   make run         build, print what this install can do (cmfast info), run the built-in model's demo (when
#                    the checkout has it) and a quick pass of the benchmarks into out/
#   make cuda-check  compile kernels/*.cu for sm_80 and sm_90a with CMake; fail on any register spill
#   make triton-check compile the Triton kernels for sm_80 and sm_90a at every launch the U-Nets make; fail on a
#                    spill, shared memory or registers past the target's limits, or a compile error
#   make cuda-link   build the CUDA part of cmfast._C against a CUDA build of torch (no GPU needed)
#   make wheel-smoke build a wheel, install it into a fresh venv, run a smoke test
#   make gpu-job-check run benchmarks/gpu_job.sh here as a dry run and check what it would return from a GPU machine
#   make ci          all of the above (what .ci/run does)
#   make gpu-prebuild cmfast._C for the GPU job's image (Python 3.12, torch 2.11.0+cu130, sm_90a) into
#                    .gpu-build/, which benchmarks/gpu_job.sh loads there instead of building (not part of ci)
PYTHON ?= python3
CACHE ?= $(HOME)/.cache/cmfast
VENV ?= $(CACHE)/venv-cpu
TORCH ?= torch==2.13.0
# The torch of the GPU job's image (2.11.0+cu130): the link check compiles the extension as it will be
# compiled there (C++17 up to torch 2.11; the CPU build here uses torch 2.13's C++20).
CUDA_TORCH ?= torch==2.11.0
CUDA_VENV ?= $(CACHE)/venv-cuda-2.11
CUDA_HOME ?= /usr/local/cuda
GPU_IMAGE_PYTHON ?= python3.12
GPU_IMAGE_VENV ?= $(CACHE)/venv-gpu-image
PY := $(VENV)/bin/python

.PHONY: build test run cuda-check triton-check cuda-link wheel-smoke gpu-job-check ci gpu-prebuild digits-model

# The CPU build of torch is pinned first: a bare "torch" requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

# The venv is shared between checkouts: (re)point its editable install at this one when it points elsewhere.
build: $(VENV)/.installed
	(cd / && $(PY) -c "import cmfast, sys; sys.exit(cmfast.__path__[0] != '$(CURDIR)/cmfast')") 2>/dev/null || \
	  $(VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -q

run: build
	$(VENV)/bin/cmfast info
	$(if $(wildcard cmfast/data/digits.safetensors),$(VENV)/bin/cmfast demo --out out/demo --force)
	$(PY) -m benchmarks --quick --out out/bench

cuda-check: $(VENV)/.installed
	$(PY) tools/ptxas_report.py

triton-check: build
	$(PY) tools/triton_report.py

$(CUDA_VENV)/.installed:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q --upgrade pip
	$(CUDA_VENV)/bin/pip install -q "$(CUDA_TORCH)" numpy ninja "setuptools>=77" wheel  # 77: SPDX license strings
	touch $@

cuda-link: $(CUDA_VENV)/.installed
	CUDA_HOME=$(CUDA_HOME) tools/cuda_link_check.sh $(CUDA_VENV)/bin/python

# The same torch as CUDA_VENV, on the GPU image's Python.
$(GPU_IMAGE_VENV)/.installed:
	$(GPU_IMAGE_PYTHON) -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_VENV)/bin/pip install -q --upgrade pip
	$(GPU_IMAGE_VENV)/bin/pip install -q "$(CUDA_TORCH)" numpy ninja "setuptools>=77" wheel
	touch $@

gpu-prebuild: $(GPU_IMAGE_VENV)/.installed
	PREBUILD_PYTHON=$(GPU_IMAGE_VENV)/bin/python CUDA_HOME=$(CUDA_HOME) bash benchmarks/gpu_job.sh --prebuild

wheel-smoke: $(VENV)/.installed
	tools/wheel_smoke.sh $(PY) "$(TORCH)"

gpu-job-check: build
	tools/gpu_job_check.sh $(PY)

ci: test cuda-check triton-check cuda-link wheel-smoke gpu-job-check

# The recipe of the built-in models (cmfast/data/digits.safetensors and digits-teacher.safetensors): an EDM teacher
# on scikit-learn's digits at 16x16, consistency distillation from it and consistency training for comparison, each
# scored by cmfast.digits.evaluate; the better consistency model ships (fp16 weights) beside the teacher. Seeded: the
# same torch and thread count give the same weights. The report: $(DIGITS_RUN)/report.md. Rerunning resumes.
DIGITS_RUN ?= runs/digits
digits-model: build
	$(PY) tools/digits_model.py --run $(DIGITS_RUN)
