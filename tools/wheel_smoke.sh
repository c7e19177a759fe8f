#!/usr/bin/env bash
# Builds the cmfast wheel with the given python (its torch is the one the extension compiles against),
# installs it into a fresh venv with the given torch requirement, and checks from outside the source tree
# that it imports, has its compiled CPU kernels, and computes what the reference computes.
# usage: tools/wheel_smoke.sh PYTHON TORCH_REQUIREMENT      e.g. tools/wheel_smoke.sh .venv/bin/python torch==2.13.0
set -euo pipefail
python=${1:?usage: $0 PYTHON TORCH_REQUIREMENT}
torch_req=${2:?usage: $0 PYTHON TORCH_REQUIREMENT}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== building the wheel"
"$python" -m pip wheel "$root" --no-build-isolation --no-deps -q -w "$tmp/dist"
wheel=$(ls "$tmp"/dist/cmfast-*.whl)
echo "   $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"
# its compiled part loads only with the torch it was built against: the wheel must require exactly that release
built=$("$python" -c "import torch; print(torch.__version__.split('+')[0])")
"$python" - "$wheel" "$built" <<'PY'
import sys, zipfile
wheel, built = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    requires = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
torch_req = [r for r in requires if r.split(";")[0].replace(" ", "").startswith("torch")]
assert torch_req == [f"torch=={built}"], f"the wheel requires {torch_req}, not torch=={built}"
print(f"   requires torch=={built} (the torch it was built against)")
PY

echo "== installing it into a fresh venv"
"$python" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --upgrade pip
"$tmp/venv/bin/pip" install -q "$torch_req"
"$tmp/venv/bin/pip" install -q "$wheel"

echo "== smoke test (from $tmp, away from the sources)"
cd "$tmp"
"$tmp/venv/bin/python" - <<'PY'
import torch
import cmfast
from cmfast import ops
from cmfast.ops import consistency as C

assert cmfast.extension.loaded and cmfast.extension.cpu, cmfast.extension.reason
assert "site-packages" in cmfast.__file__, cmfast.__file__
x, f = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)
sigma = torch.tensor([0.002, 1.0, 80.0])
with cmfast.use_backend("cpu"):
    out = ops.consistency_epilogue(x, f, sigma, clamp=True)
want = torch.empty_like(x)
C.epilogue_reference_out(x, f, sigma, 0.5, 0.002, True, want)
assert (out - want).abs().max() <= 1e-6 * want.abs().max(), "CPU kernel disagrees with the reference"
from cmfast.models import PRESETS, UNet  # the subpackages made it into the wheel
model = UNet(PRESETS["test_lsun"].unet).eval()
assert cmfast.Denoiser(model)(torch.randn(2, 3, 16, 16), 80.0).shape == (2, 3, 16, 16)
from cmfast import pretrained  # the built-in model is package data
assert pretrained.BUILT_IN.is_file(), f"no built-in model in the wheel: {pretrained.BUILT_IN}"
digits = pretrained.find(None)
assert digits.denoiser(torch.randn(2, 1, 16, 16) * 80, 80.0, torch.tensor([3, 7])).shape == (2, 1, 16, 16)
print("wheel OK:", cmfast.__file__)
PY
"$tmp/venv/bin/cmfast" info
"$tmp/venv/bin/cmfast" sample --num 2 --out "$tmp/samples"  # the built-in model, end to end, with the wheel's deps
test -s "$tmp/samples/grid.png"
