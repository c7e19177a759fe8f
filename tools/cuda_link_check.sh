#!/usr/bin/env bash
# Builds the CUDA flavour of cmfast._C (csrc/*.cpp + kernels/*.cu) against a CUDA build of torch and checks that
# it loads and registers CUDA kernels for its ops. No GPU needed: loading the library and asking the dispatcher
# never touches a device.
#   usage: CUDA_HOME=/usr/local/cuda tools/cuda_link_check.sh <python of a venv with a CUDA build of torch>
# Builds into build/cuda-link (not in place: the CPU build's cmfast/_C*.so stays untouched). Reruns are
# incremental (ninja); a change to any csrc/ or kernels/ file recompiles everything, since setup.py passes the
# source hash as a compile flag. Knobs: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default
# "8.0;9.0a+PTX"), MAX_JOBS (default 2), CUDA_LINK_OUT (the build folder, default build/cuda-link).
set -euo pipefail

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
PY=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${CUDA_LINK_OUT:-$ROOT/build/cuda-link}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a+PTX}
export MAX_JOBS=${MAX_JOBS:-2}
export CMFAST_CUDA=1
export PATH="$(dirname "$PY"):$PATH"  # the venv's ninja, if it has one

die() { echo "cuda_link_check: FAIL: $*" >&2; exit 1; }

[[ -x $PY ]] || die "$PY is not an executable python"
[[ -x $CUDA_HOME/bin/nvcc ]] || die "no nvcc in CUDA_HOME=$CUDA_HOME"
read -r TORCH_VERSION TORCH_CUDA < <("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda or "")') ||
  die "cannot import torch with $PY"
[[ -n $TORCH_CUDA ]] || die "torch $TORCH_VERSION in $PY is not a CUDA build"
NVCC_VERSION=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
echo "torch $TORCH_VERSION (CUDA $TORCH_CUDA), nvcc $NVCC_VERSION, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

# A pip-installed torch ships the CUDA headers and libraries it was built with (cuBLAS, cuSPARSE, ...) in
# site-packages/nvidia/cu<major>; torch's CUDA headers include them and a bare toolkit may not have them.
NV_DIR=$("$PY" -c '
import importlib.util, sys
spec = importlib.util.find_spec("nvidia.cu" + sys.argv[1])
print(next(iter(spec.submodule_search_locations)) if spec else "")' "${TORCH_CUDA%%.*}")
if [[ -n $NV_DIR ]]; then
  echo "CUDA headers and libraries of the torch wheel: $NV_DIR"
  export CPATH="$NV_DIR/include${CPATH:+:$CPATH}"
  export LIBRARY_PATH="$NV_DIR/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
else
  echo "no nvidia/cu${TORCH_CUDA%%.*} package next to torch; relying on $CUDA_HOME alone"
fi

# --force: setuptools alone would skip the build when only a header changed; ninja still recompiles only
# what is out of date, so this costs a relink.
start=$SECONDS
cd "$ROOT"
"$PY" setup.py -q build_ext --force --build-temp "$OUT/tmp" --build-lib "$OUT/lib" || die "build failed (output above)"
echo "built in $((SECONDS - start)) s"

SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
SO=$OUT/lib/cmfast/_C$SUFFIX
[[ -f $SO ]] || die "no $SO after the build"
echo "library: $SO ($(du -h "$SO" | cut -f1))"

# The kernels really went through nvcc (torch rewrites build.ninja on every build), for the requested archs.
NINJA_FILE=$OUT/tmp/build.ninja
for cu in kernels/*.cu; do
  obj=$OUT/tmp/${cu%.cu}.o
  grep -qx "build $obj: cuda_compile $ROOT/$cu" "$NINJA_FILE" && [[ -f $obj ]] ||
    die "$cu is not in this build: did setup.py leave the CUDA sources out?"
  echo "nvcc compiled: $cu -> ${obj#"$ROOT"/}"
done
for arch in ${TORCH_CUDA_ARCH_LIST//;/ }; do  # "9.0a+PTX" -> sm_90a code, plus compute_90a PTX
  cc=${arch%+PTX}; cc=${cc/./}
  gencodes=("arch=compute_$cc,code=sm_$cc")
  [[ $arch == *+PTX ]] && gencodes+=("arch=compute_$cc,code=compute_$cc")
  for gencode in "${gencodes[@]}"; do
    grep -q -- "-gencode=$gencode" "$NINJA_FILE" || die "nvcc flags in $NINJA_FILE lack -gencode=$gencode"
    echo "nvcc flags: -gencode=$gencode"
  done
done

# Load it with torch (no GPU needed) and ask the dispatcher which backends each op has.
"$PY" - "$SO" <<'EOF' || die "the library does not load or lacks kernels (above)"
import importlib.util
import sys

import torch

path = sys.argv[1]
torch.ops.load_library(path)
print("torch.ops.load_library: ok")
failed = []
for op in ("cmfast_C::consistency_epilogue", "cmfast_C::consistency_prologue", "cmfast_C::group_norm"):
    for key in ("CPU", "CUDA"):
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
        print(f"  {op:34s} {key:4s} kernel: {'yes' if ok else 'NO'}")
        failed += [] if ok else [f"{op} has no {key} kernel"]
spec = importlib.util.spec_from_file_location("cmfast._C", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
info = module.build_info()
print(f"build_info: {info}")
# attention: a CPU kernel only, registered where the CPU runs it (AVX-512).
registered = torch._C._dispatch_has_kernel_for_dispatch_key("cmfast_C::attention", "CPU")
runs = module.attention_cpu_kernels()
print(f"  {'cmfast_C::attention':34s} CPU  kernel: {'yes' if registered else 'no'} (this CPU runs: {runs})")
if registered != ("f32" in runs):
    failed.append("cmfast_C::attention's CPU registration disagrees with the kernels this CPU runs")
if not info.get("cuda"):
    failed.append("build_info() says the library was built without CUDA")
if failed:
    sys.exit("; ".join(failed))
EOF
echo "cuda_link_check: OK"
