#!/usr/bin/env bash
# The whole GPU job in one call of under 10 minutes on a GPU machine (an H100 or H200 of the device tool):
#   prepare the environment (the machine's own python3 with torch/triton/pytest/matplotlib; diffusers and
#   importlib_metadata from carried wheels), load the prebuilt cmfast._C or build it with its CUDA part in place,
#   record `cmfast info`, nvidia-smi -q and pip list; then, in order of worth: the GPU tests (pytest -m gpu, in
#   parallel processes), the CPU attention kernels' tests on this other CPU, where the host time of batch-1 kernel calls goes (benchmarks/host_overhead.py), the
#   kernels at batch 1 and 64 with their torch.compile peers (and group_norm at batch 1 with the cluster kernel
#   off), the ImageNet-64 U-Net and samplers in float16 and bfloat16 at batch 1, 16, 64, 256 (with diffusers and a
#   CUDA-graph replay beside them), the compiled U-Net/pipeline peers at float16 batch 64, and the summaries. Every
#   step is time-boxed (timeout) within one deadline; a failed or stopped step is recorded in steps.tsv (a stopped
#   benchmark keeps the rows it measured) and the job goes on.
#   Everything lands in $OUT, at most 8 files (the device tool's limit):
#     gpu-job.tar.gz (all logs, CSVs, PNGs, cmfast-info.txt, nvidia-smi-q.txt, pip-list.txt), the CSVs,
#     summary.md, steps.tsv, job.log.
#
# Here, once (pip needs the network, the GPU machine has none):  bash benchmarks/gpu_job.sh --fetch-wheels
# Here, after the last change to csrc/ or kernels/:  make gpu-prebuild  (cmfast._C for the GPU image: Python 3.12,
#   torch 2.11.0+cu130, sm_90a, into .gpu-build/; 54 s on 2 cores here; the job loads it instead of building there;
#   a stale or mismatched one is noticed there and the job builds as before)
# Then, through the device tool:  run(command="bash benchmarks/gpu_job.sh", carry=[".whl", ".gpu-build"],
#   timeout_s=600)
# Without a device tool, from a checkout on a GPU machine:         OUT=/some/dir bash benchmarks/gpu_job.sh
# Knobs: CMFAST_JOB_SECONDS (deadline of the whole job, default 560), PYTHON (default python3),
#        TORCH_CUDA_ARCH_LIST (default: this GPU's arch), MAX_JOBS (default: the core count), CMFAST_JOB_MODELS
#        (default imagenet64; imagenet64,lsun256 adds LSUN-256), CMFAST_JOB_KERNEL_BATCHES, CMFAST_JOB_KERNELS (the
#        kernel benchmarks, space-separated), CMFAST_JOB_COMPILE_BATCH (0: no compiled peers), CMFAST_JOB_TEST_WORKERS,
#        CMFAST_JOB_TESTS (pytest paths, default tests), CMFAST_JOB_BATCHES=0 (no U-Net/sampler step);
#        a short lease, the kernels only: CMFAST_JOB_TESTS=tests/test_group_norm.py CMFAST_JOB_BATCHES=0
#        CMFAST_JOB_KERNELS=group_norm CMFAST_JOB_DTYPES=float16 CMFAST_JOB_COMPILE_BATCH=0;
#        for a dry run on a CPU: CMFAST_JOB_DEVICE=cpu CMFAST_JOB_DTYPES=float32 CMFAST_JOB_BATCHES=1
#        CMFAST_JOB_KERNEL_BATCHES=1 CMFAST_JOB_COMPILE_BATCH=1 CMFAST_JOB_BENCH_ARGS=--quick.
set -uo pipefail  # no -e: a failing step is recorded and the job goes on

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
DIFFUSERS_WHEELS=("diffusers==0.42.1" "importlib_metadata==10.2.0")  # what the GPU image lacks for the peers

if [[ ${1:-} == --fetch-wheels ]]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${DIFFUSERS_WHEELS[@]}"
  ls -l .whl
  exit
fi
if [[ ${1:-} == --prebuild ]]; then  # PREBUILD_PYTHON: a python like the GPU image's (make gpu-prebuild makes one)
  PREBUILD_PY=${PREBUILD_PYTHON:-$HOME/.cache/cmfast/venv-gpu-image/bin/python}
  CUDA_LINK_OUT=$ROOT/build/gpu-image TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} \
    tools/cuda_link_check.sh "$PREBUILD_PY" || exit 1
  mkdir -p .gpu-build
  grep -qx '/.gpu-build/' .git/info/exclude 2>/dev/null || echo '/.gpu-build/' >> .git/info/exclude
  rm -f .gpu-build/_C*.so
  cp build/gpu-image/lib/cmfast/_C*.so .gpu-build/ && ls -l .gpu-build
  exit
fi
if [[ $# -gt 0 ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi

DEVICE=${CMFAST_JOB_DEVICE:-cuda}
DTYPES=${CMFAST_JOB_DTYPES:-float16,bfloat16}
BATCHES=${CMFAST_JOB_BATCHES:-1,16,64,256}  # the U-Net and samplers
KERNEL_BATCHES=${CMFAST_JOB_KERNEL_BATCHES:-1,64}
COMPILE_BATCH=${CMFAST_JOB_COMPILE_BATCH:-64}  # the compiled U-Net/pipeline peers: one batch, the first dtype
read -r -a BENCH_ARGS <<< "${CMFAST_JOB_BENCH_ARGS:-}"
START=$(date +%s)
BUDGET=${CMFAST_JOB_SECONDS:-560}
RESERVE=25  # seconds kept for the summaries and the packing at the end
OUT=${OUT:-$ROOT/out/gpu-job}
WORK=$(mktemp -d /tmp/cmfast-gpu-job.XXXXXX)
mkdir -p "$OUT" "$WORK/logs" "$WORK/results"
printf 'step\trc\tseconds\tlimit\n' > "$WORK/steps.tsv"
exec > >(tee "$WORK/job.log") 2>&1

# step NAME LIMIT CMD...: CMD under `timeout` (LIMIT seconds, less if the deadline is nearer), output in
# logs/NAME.log (its tail echoed), rc and duration in steps.tsv. rc 124 = stopped by the time box.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((START + BUDGET - RESERVE - $(date +%s)))
  if ((left < 10)); then
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$WORK/steps.tsv"
    echo "== $name: skipped, no time left"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== $name (up to ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout -k 15 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  tail -n 15 "$WORK/logs/$name.log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >> "$WORK/steps.tsv"
  echo "== $name: rc $rc after $(($(date +%s) - t0))s"
  return $rc
}

pack() {
  cp "$WORK"/results/*.csv "$OUT"/ 2>/dev/null
  cp "$WORK/steps.tsv" "$OUT/steps.tsv"
  [[ -f $WORK/summary.md ]] && cp "$WORK/summary.md" "$OUT/summary.md"
  tar czf "$OUT/gpu-job.tar.gz" -C "$WORK" --exclude=job.log . 2>/dev/null
  cp "$WORK/job.log" "$OUT/job.log" 2>/dev/null
  echo "== $(($(date +%s) - START))s in all; in $OUT:"
  ls -l "$OUT"
}
trap pack EXIT

# 1. environment: the machine's python, plus the carried wheels; the source tree on the path (in-place build)
if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/cmfast-site .whl/*.whl
  export PYTHONPATH=/tmp/cmfast-site
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ARCH=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}" + ("a" if m == 9 else ""))' 2>/dev/null)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${ARCH:-9.0a}} MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$PY" -m pip list > "$WORK/pip-list.txt" 2>&1
nvidia-smi -q > "$WORK/nvidia-smi-q.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "CUDA", torch.version.cuda, "triton", triton.__version__)'
"$PY" -c 'import diffusers, matplotlib; print("diffusers", diffusers.__version__, "matplotlib", matplotlib.__version__)' ||
  echo "diffusers or matplotlib missing: the diffusers peers or the plots are left out (carry .whl, see the header)"

# 2. the CUDA extension, in place (cmfast/_C.cpython-3xx-*.so beside the sources): the one prebuilt for this image
#    (.gpu-build/) when it loads here with its CUDA kernels, for these sources and this GPU's arch; else built here
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
PREBUILT=0
if [[ -f .gpu-build/_C$SUFFIX ]]; then
  cp ".gpu-build/_C$SUFFIX" cmfast/
  if "$PY" - "${ARCH:-none}" <<'EOF'; then
import sys
import warnings

warnings.simplefilter("ignore")
from cmfast._extension import status

archs = str(status.build_info.get("cuda_arch_list", "")).replace("+PTX", "").split("/")
print(f"prebuilt cmfast._C: {status.reason or 'loads'}; built for {archs}, this GPU is {sys.argv[1]}")
sys.exit(not (status.loaded and status.cuda and sys.argv[1] in archs))
EOF
    echo "== build: the prebuilt cmfast._C serves"
    PREBUILT=1
  else
    rm -f "cmfast/_C$SUFFIX"
  fi
fi
((PREBUILT)) || step build 240 env CMFAST_CUDA=1 "$PY" setup.py build_ext --inplace
step info 60 "$PY" -m cmfast info
cp "$WORK/logs/info.log" "$WORK/cmfast-info.txt"

# 3. in order of worth, each step time-boxed: the GPU tests (what the GPU is for; in parallel processes when
#    pytest-xdist is there: Triton compiles each kernel variant once per process), the kernels at batch 1 and 64
#    (issue 5's targets) in both half types and group_norm's cluster A/B, the U-Net and samplers in both at every
#    batch, then the compiled U-Net/pipeline peers (minutes of cold compile) at one batch.
export CMFAST_TEST_SEED=${CMFAST_TEST_SEED:-$((RANDOM * 32768 + RANDOM))}
echo "test seed: CMFAST_TEST_SEED=$CMFAST_TEST_SEED"
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)
"$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST+=(--timeout 120)  # one hung test must not eat the step
PARALLEL=()
"$PY" -c 'import xdist' 2>/dev/null && PARALLEL=(-n "${CMFAST_JOB_TEST_WORKERS:-8}")
read -r -a TESTS <<< "${CMFAST_JOB_TESTS:-tests}"
step test-gpu 180 env OMP_NUM_THREADS=2 "${PYTEST[@]}" "${PARALLEL[@]}" -m gpu "${TESTS[@]}"
# the CPU attention kernels (AVX-512 intrinsics) on the GPU machine's CPU, often another model than the development machine's
step test-cpu-attention 30 "${PYTEST[@]}" tests/test_attention.py -k "cpu_kernel or cpu_op"
step host-overhead 45 "$PY" -m benchmarks.host_overhead --device "$DEVICE"  # batch-1 calls: host issue time, profile
read -r -a KERNELS <<< "${CMFAST_JOB_KERNELS:-group_norm attention consistency}"
step bench-kernels 120 "$PY" -m benchmarks "${KERNELS[@]}" --device "$DEVICE" --dtypes "$DTYPES" \
  --batches "$KERNEL_BATCHES" --out "$WORK/results" "${BENCH_ARGS[@]}"
# group_norm at batch 1 again with the sm_90 cluster kernel off (the two-stage kernels instead): their A/B, in
# <device>-<date>-cluster-off.csv
step bench-no-cluster 40 env CMFAST_GROUP_NORM_CLUSTER=0 "$PY" -m benchmarks group_norm --device "$DEVICE" \
  --dtypes "${DTYPES%%,*}" --batches 1 --no-compile --out "$WORK/no-cluster" "${BENCH_ARGS[@]}"
for csv in "$WORK"/no-cluster/*.csv; do
  [[ -f $csv ]] && cp "$csv" "$WORK/results/$(basename "$csv" .csv)-cluster-off.csv"
done
if [[ $BATCHES != 0 ]]; then
  step bench-models 150 "$PY" -m benchmarks sampling --models "${CMFAST_JOB_MODELS:-imagenet64}" \
    --device "$DEVICE" --dtypes "$DTYPES" --batches "$BATCHES" --out "$WORK/results" "${BENCH_ARGS[@]}"
fi
if [[ $COMPILE_BATCH != 0 ]]; then
  step bench-compile 240 "$PY" -m benchmarks sampling --compile --models imagenet64 --device "$DEVICE" \
    --dtypes "${DTYPES%%,*}" --batches "$COMPILE_BATCH" --out "$WORK/results" "${BENCH_ARGS[@]}"
fi

# 4. the summaries (also of a run stopped by its time box: its CSV holds the rows measured so far)
RESERVE=0
for csv in "$WORK"/results/*.csv; do
  [[ -f $csv ]] || continue
  step "plots-$(basename "$csv" .csv)" 20 "$PY" -m benchmarks.plots "$csv"
  "$PY" -m benchmarks.summary "$csv" >> "$WORK/summary.md" 2>&1
done
exit 0
