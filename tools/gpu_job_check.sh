#!/usr/bin/env bash
# Runs benchmarks/gpu_job.sh on this CPU with its dry-run knobs (float32, quick shapes, the kernels at batch 1, no
# U-Net or compiled peers) and checks what a GPU machine would send back, so that a broken job script is found
# here and not in a lease: each step ran and passed, except the two that need CUDA (the CUDA build, which must
# refuse cleanly, and the GPU tests, of which none may fail); the files are the CSVs (the cluster-off one among
# them), summary.md, steps.tsv, job.log and gpu-job.tar.gz, 8 at most, as the device tool returns no more.
#   usage: tools/gpu_job_check.sh <python of a venv with cmfast built in place>
set -euo pipefail

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
PY=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
die() { echo "gpu_job_check: FAIL: $*" >&2; exit 1; }

start=$SECONDS
OUT=$WORK/out PYTHON=$PY CMFAST_JOB_DEVICE=cpu CMFAST_JOB_DTYPES=float32 CMFAST_JOB_BATCHES=0 \
  CMFAST_JOB_KERNEL_BATCHES=1 CMFAST_JOB_KERNELS="group_norm consistency" CMFAST_JOB_COMPILE_BATCH=0 \
  CMFAST_JOB_BENCH_ARGS=--quick CMFAST_JOB_TESTS=tests/test_group_norm_plan.py CMFAST_JOB_TEST_WORKERS=1 \
  bash "$ROOT/benchmarks/gpu_job.sh" > "$WORK/run.log" 2>&1 || { cat "$WORK/run.log"; die "gpu_job.sh exited $?"; }
echo "gpu_job.sh dry run: $((SECONDS - start)) s"

STEPS=$WORK/out/steps.tsv
[[ -f $STEPS ]] || { cat "$WORK/run.log"; die "no steps.tsv in OUT"; }
cat "$STEPS"
rc_of() { awk -F'\t' -v s="$1" '$1 == s { print $2 }' "$STEPS"; }
for step in info host-overhead bench-kernels bench-no-cluster; do
  [[ $(rc_of "$step") == 0 ]] || { cat "$WORK/run.log"; die "step $step: rc '$(rc_of "$step")', expected 0"; }
done
[[ $(rc_of build) == 1 ]] || die "step build: rc '$(rc_of build)'; expected 1 (CMFAST_CUDA=1 refused without CUDA)"
[[ $(rc_of test-gpu) =~ ^(0|5)$ ]] || die "step test-gpu: rc '$(rc_of test-gpu)'; expected 0 or 5 (none collected)"
if awk -F'\t' 'NR > 1 && $1 ~ /^plots-/ && $2 != 0 { bad = 1 } END { exit !bad }' "$STEPS"; then
  die "a plots step failed"
fi

mapfile -t files < <(cd "$WORK/out" && ls)
echo "returned: ${files[*]}"
((${#files[@]} <= 8)) || die "${#files[@]} files in OUT; the device tool returns 8 at most"
for name in steps.tsv summary.md job.log gpu-job.tar.gz; do
  [[ -s $WORK/out/$name ]] || die "$name missing or empty in OUT"
done
compgen -G "$WORK/out/*-cluster-off.csv" > /dev/null || die "no -cluster-off.csv in OUT"
(($(ls "$WORK"/out/*.csv | wc -l) >= 2)) || die "the kernels' CSV is missing from OUT"
echo "gpu_job_check: OK"
