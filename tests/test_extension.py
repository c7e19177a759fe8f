"""The package around the kernels: the compiled extension's state, running without it or without triton,
and `cmfast info` telling the truth."""

import os
import subprocess
import sys

import pytest
import torch

import cmfast
from cmfast import _extension, backends
from cmfast.cli import main


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


def test_ops_are_registered():
    for name in ("consistency_epilogue", "consistency_prologue"):
        assert hasattr(torch.ops.cmfast, name)


@pytest.mark.skipif(not cmfast.extension.loaded, reason=f"cmfast._C not loaded: {cmfast.extension.reason}")
def test_extension_is_current_and_registered():
    info = cmfast.extension.build_info
    assert info["torch_version"] == torch.__version__
    for name in ("consistency_epilogue", "consistency_prologue"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cmfast_C::{name}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cmfast_C::{name}", "CUDA") == info["cuda"]


@pytest.mark.skipif(not cmfast.extension.loaded, reason=f"cmfast._C not loaded: {cmfast.extension.reason}")
@pytest.mark.parametrize("cap, drops", [("AVX512_CORE_BF16", {"amx"}), ("avx512_core", {"amx", "bf16", "dot"}),
                                        ("AVX2", {"amx", "bf16", "dot", "f32"}), ("AVX512_CORE_AMX", set()),
                                        ("ALL", set()), ("no-such-isa", set())])
def test_the_cpu_kernels_follow_onednns_isa_cap(cap, drops):
    """ONEDNN_MAX_CPU_ISA caps cmfast's CPU kernels as it caps torch's oneDNN: with the bf16 level, no AMX engine
    (the machine runs as one without AMX would); names without AMX or below AVX-512 drop the rest in turn; ALL and
    names oneDNN does not know cap nothing."""
    code = ("from cmfast._extension import compiled as c; "
            "print(' '.join(c.attention_cpu_kernels() + c.winograd_bf16_engines()), c.cpu_runs_amx_bf16())")
    uncapped = run_python(code, ONEDNN_MAX_CPU_ISA="ALL")
    capped = run_python(code, ONEDNN_MAX_CPU_ISA=cap)
    assert uncapped.returncode == 0 and capped.returncode == 0, capped.stderr
    *names, amx = uncapped.stdout.split()
    *capped_names, capped_amx = capped.stdout.split()
    assert capped_names == [n for n in names if n not in drops]
    assert capped_amx == ("False" if "amx" in drops else amx)


@pytest.mark.skipif(not cmfast.extension.loaded, reason=f"cmfast._C not loaded: {cmfast.extension.reason}")
def test_info_names_an_isa_cap():
    capped = subprocess.run([sys.executable, "-m", "cmfast", "info"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    assert capped.returncode == 0, capped.stderr
    assert "CPU code capped at AVX512_CORE_BF16 (ONEDNN_MAX_CPU_ISA)" in capped.stdout
    assert "amx" not in capped.stdout.split("attention CPU kernels this CPU runs:")[1].splitlines()[0]
    plain = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    uncapped = subprocess.run([sys.executable, "-m", "cmfast", "info"], capture_output=True, text=True, timeout=300,
                              env=plain)
    assert uncapped.returncode == 0 and "capped" not in uncapped.stdout


@pytest.mark.gpu
def test_a_gpu_install_has_the_cuda_kernels():
    assert cmfast.extension.cuda, cmfast.extension.reason
    assert "cuda" in cmfast.ops.IMPLEMENTED["consistency"]


def test_stale_extension_is_refused(monkeypatch):
    if not cmfast.extension.loaded:
        pytest.skip("needs a built cmfast._C")
    monkeypatch.setattr(_extension, "_source_hash", lambda: "0" * 16)
    state = _extension._load()
    assert not state.loaded and "stale" in state.reason


IMPORT_AND_RUN = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import cmfast
    import cmfast.ops
x = torch.randn(2, 3, 4, 4)
out = cmfast.ops.consistency_epilogue(x, x, torch.tensor([0.002, 80.0]))
assert torch.equal(out[0], x[0])
from cmfast import backends
print("BACKEND", backends.choose("consistency", torch.device("cpu"), cmfast.ops.IMPLEMENTED["consistency"]))
print("WARNINGS", len([w for w in caught if "cmfast" in str(w.message)]))
"""


def test_import_without_extension():
    result = run_python(IMPORT_AND_RUN, CMFAST_NO_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert "BACKEND reference" in result.stdout
    assert "WARNINGS 1" in result.stdout  # said once, however often imported


def test_import_without_triton():
    code = "import sys; sys.modules['triton'] = None\n" + IMPORT_AND_RUN + (
        "\nok, why = backends.triton_status(); assert not ok, why; print('TRITON', why)"
    )
    result = run_python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    assert "TRITON triton" in result.stdout


def test_info_tells_the_truth(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text
    if cmfast.extension.loaded:
        assert "cmfast._C: loaded; CPU part: yes" in text
        assert f"CUDA part: {'yes' if cmfast.extension.cuda else 'no'}" in text
        from cmfast.models import winograd

        engines = winograd.bf16_engines()
        bf16 = f"bf16 too ({engines[0]})" if engines else "not bf16"
        assert f"Winograd 3x3 convolutions (CPU, channels_last): fp32, {bf16}" in text
    else:
        assert f"cmfast._C: off ({cmfast.extension.reason})" in text
    kernels = ", ".join(cmfast.ops.IMPLEMENTED["consistency"])
    chosen = backends.choose("consistency", torch.device("cpu"), cmfast.ops.IMPLEMENTED["consistency"])
    assert f"    consistency  -> {chosen:<10} (kernels: {kernels})" in text


def test_info_without_extension():
    result = run_python("from cmfast.cli import main; main(['info'])", CMFAST_NO_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert "cmfast._C: off (disabled by CMFAST_NO_EXTENSION=1)" in result.stdout
    assert "    consistency  -> reference  (kernels: triton, reference)" in result.stdout
    assert "    cpu        off: disabled by CMFAST_NO_EXTENSION=1" in result.stdout


def test_env_var_forces_backend():
    result = run_python(
        "import torch, cmfast.backends as b; print(b.choose('consistency', torch.device('cpu')),"
        " b.choose('attention', torch.device('cpu')))",
        CMFAST_BACKEND="consistency=reference,attention=torch",
    )
    assert result.stdout.strip() == "reference torch", result.stderr


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
