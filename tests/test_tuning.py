"""Choices by measurement (cmfast.tuning): the fastest candidate is taken and its result returned, choices are
recorded on disk and reused by a second process without timing, a corrupt or foreign record file is ignored and
rewritten, CMFAST_TUNE=0 gives the fixed order, forcing wins, and torch.compile times nothing. The convolution
alternatives it chooses between (conv, packed, matmul, winograd) agree with the reference in every precision."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import cmfast
from cmfast import backends, tuning
from cmfast.models import PRESETS, winograd
from cmfast.models.conv import MAX_TAPS_OUT, Conv2d, packed_available
from cmfast.ops import IMPLEMENTED


@pytest.fixture
def tune(monkeypatch, tmp_path):
    """Measurement on, a cache folder of the test's own, nothing remembered from earlier tests."""
    monkeypatch.setenv("CMFAST_TUNE", "1")
    monkeypatch.setenv("CMFAST_CACHE", str(tmp_path))
    tuning.forget()
    before = dict(tuning.stats)
    yield lambda: {k: tuning.stats[k] - before[k] for k in before}
    tuning.forget()


def sleepy(delays: dict):
    """run(name) for tuning.choose: sleeps delays[name] seconds and returns the name (its 'result')."""
    calls = []

    def run(name):
        calls.append(name)
        time.sleep(delays[name])
        return f"result of {name}"

    return run, calls


DEVICE = torch.device("cpu")


def test_fastest_is_chosen_and_its_result_returned(tune):
    run, calls = sleepy({"a": 0.004, "b": 0.0005, "c": 0.002})
    name, result = tuning.choose("toy", DEVICE, (1,), ("a", "b", "c"), "a", run, elements=10**6)
    assert (name, result) == ("b", "result of b")
    assert calls[-1] == "b" and set(calls) == {"a", "b", "c"}
    assert tune()["timed"] == 1
    calls.clear()  # a second call of the class: no timing, the recorded choice
    assert tuning.choose("toy", DEVICE, (1,), ("a", "b", "c"), "a", run, elements=10**6) == ("b", "result of b")
    assert calls == ["b"] and tune()["timed"] == 1


def test_default_kept_within_the_noise(tune):
    run, _ = sleepy({"a": 0.0030, "b": 0.0029})  # b is 3% faster: under the margin
    assert tuning.choose("toy", DEVICE, (2,), ("a", "b"), "a", run, elements=10**6)[0] == "a"


def test_a_clear_loser_is_timed_no_more(tune):
    """Both runs of "a" (warm-up, first round) over 1.25x the leader's best: one round, and b's own run is the
    result (no run more)."""
    run, calls = sleepy({"a": 0.06, "b": 0.01})  # b would have to take 48 ms once to keep a in: wide of the noise
    assert tuning.choose("toy", DEVICE, (10,), ("a", "b"), "a", run, elements=10**6) == ("b", "result of b")
    assert calls == ["a", "b", "a", "b"]
    assert set(tuning.recorded(("toy", 10), DEVICE)["times_ms"]) == {"a", "b"}


def test_close_candidates_and_one_slow_run_keep_being_timed(tune):
    """Within 1.25x: at least two rounds each. And a candidate slow in one round only (a spike of the machine's) is
    timed again: its warm-up was within reach of the leader."""
    usual = {"a": 0.021, "b": 0.020}  # a within 1.25x of b by 4 ms: sleeps overshoot by far less
    run, calls = sleepy(usual)
    tuning.choose("toy", DEVICE, (11,), ("a", "b"), "a", run, elements=10**6)
    assert calls.count("a") >= 3 and calls.count("b") >= 3
    spikes = {"a": [usual["a"], 0.08]}  # a's warm-up, then one slow round, then its usual time

    def spiky(name):
        calls.append(name)
        time.sleep(spikes[name].pop(0) if spikes.get(name) else usual[name])
        return name

    calls.clear()
    tuning.choose("toy", DEVICE, (12,), ("a", "b"), "a", spiky, elements=10**6)
    assert calls.count("a") >= 3
    assert tuning.recorded(("toy", 12), DEVICE)["times_ms"]["a"] < 40


def test_preparing_a_candidate_is_not_timed(tune):
    """A switch between candidates (the U-Net's weights to another layout) costs what the steady state never pays:
    prepare() runs before each run, outside the timing, and before the chosen candidate's final call."""
    run, calls = sleepy({"a": 0.004, "b": 0.002})
    state = {"ready": None}

    def prepare(name):
        time.sleep(0.01)  # far more than either run: timed, it would hide the difference
        state["ready"] = name

    def checked(name):
        assert state["ready"] == name
        return run(name)

    name, result = tuning.choose("toy", DEVICE, (9,), ("a", "b"), "a", checked, elements=10**6, prepare=prepare)
    assert (name, result) == ("b", "result of b")
    times = tuning.recorded(("toy", 9), DEVICE)["times_ms"]
    assert times["b"] < times["a"] < 9, times  # timed, the 10 ms preparation would count in both


def test_tiny_calls_and_tune_off_keep_the_fixed_order(tune, monkeypatch):
    run, calls = sleepy({"a": 0.002, "b": 0.0})
    assert tuning.choose("toy", DEVICE, (3,), ("a", "b"), "a", run, elements=tuning.TINY_ELEMENTS - 1)[0] == "a"
    monkeypatch.setenv("CMFAST_TUNE", "0")
    assert tuning.choose("toy", DEVICE, (4,), ("a", "b"), "a", run, elements=10**6)[0] == "a"
    assert calls == ["a", "a"] and tune()["timed"] == 0
    monkeypatch.setenv("CMFAST_TUNE", "yes")
    with pytest.raises(ValueError, match="CMFAST_TUNE: expected 0 .* or 1"):
        tuning.choose("toy", DEVICE, (5,), ("a", "b"), "a", run, elements=10**6)


def test_record_file_is_written_atomically_and_reread(tune):
    run, _ = sleepy({"a": 0.003, "b": 0.0})
    tuning.choose("toy", DEVICE, (6,), ("a", "b"), "a", run, elements=10**6)
    path = tuning.path_for(tuning.device_name(DEVICE))
    data = json.loads(path.read_text())
    assert data["device"] == tuning.cpu_label() and data["versions"]["torch"] == torch.__version__
    (entry,) = data["entries"].values()
    assert entry["choice"] == "b" and set(entry["times_ms"]) == {"a", "b"}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left beside it
    tuning.forget()
    run2, calls = sleepy({"a": 0.0, "b": 0.0})
    assert tuning.choose("toy", DEVICE, (6,), ("a", "b"), "a", run2, elements=10**6)[0] == "b"
    assert calls == ["b"] and tune()["timed"] == 1 and tune()["loaded"] == 1


def test_a_new_candidate_is_measured_again(tune):
    """A choice recorded among other candidates (a later cmfast added one) is not reused: the class is timed anew."""
    run, _ = sleepy({"a": 0.003, "b": 0.0})
    tuning.choose("toy", DEVICE, (16,), ("a", "b"), "a", run, elements=10**6)
    tuning.forget()  # as a later process: the record comes from the file
    run2, calls = sleepy({"a": 0.003, "b": 0.002, "c": 0.0})
    assert tuning.choose("toy", DEVICE, (16,), ("a", "b", "c"), "a", run2, elements=10**6)[0] == "c"
    assert set(calls) == {"a", "b", "c"} and tune()["timed"] == 2
    entry = tuning.recorded(("toy", 16), DEVICE)
    assert entry["choice"] == "c" and entry["candidates"] == ["a", "b", "c"]


def test_a_process_under_an_isa_cap_keeps_its_own_records(tune, monkeypatch):
    """ONEDNN_MAX_CPU_ISA changes the code torch and cmfast run (an AMX machine capped runs as one without AMX): its
    measurements go to a file of their own, and an uncapped process does not reuse them."""
    def relabel():
        tuning.cpu_label.cache_clear()
        tuning.device_name.cache_clear()
        tuning.forget()

    run, _ = sleepy({"a": 0.003, "b": 0.0})
    tuning.choose("toy", DEVICE, (8,), ("a", "b"), "a", run, elements=10**6)
    plain = tuning.path_for(tuning.device_name(DEVICE))
    try:
        for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
            monkeypatch.setenv(name, "AVX512_CORE_BF16")
            relabel()
            assert tuning.device_name(DEVICE) == f"{tuning.cpu_name()}, ISA cap AVX512_CORE_BF16"
            assert tuning.path_for(tuning.device_name(DEVICE)) != plain
            assert tuning.recorded(("toy", 8), DEVICE) is None
            monkeypatch.delenv(name)
    finally:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        relabel()
    assert tuning.device_name(DEVICE) == tuning.cpu_name() and tuning.recorded(("toy", 8), DEVICE) is not None


@pytest.mark.parametrize("content", ["{not json", "[]", '{"device": "another CPU", "versions": {}, "entries": {}}',
                                     "\x00\xff garbage", "FOREIGN_VERSIONS"])
def test_corrupt_or_foreign_file_is_ignored_and_rewritten(tune, content):
    path = tuning.path_for(tuning.device_name(DEVICE))
    path.parent.mkdir(parents=True)
    if content == "FOREIGN_VERSIONS":  # this device, another cmfast: its choices were measured on other kernels
        content = json.dumps({"device": tuning.cpu_label(), "versions": {"cmfast": "0.0.0"},
                              "entries": {repr(("toy", 7)): {"choice": "a", "times_ms": {"a": 1.0}}}})
    path.write_bytes(content.encode("latin-1"))
    run, _ = sleepy({"a": 0.003, "b": 0.0})
    assert tuning.choose("toy", DEVICE, (7,), ("a", "b"), "a", run, elements=10**6)[0] == "b"
    assert tune()["timed"] == 1
    data = json.loads(path.read_text())
    assert list(data["entries"]) == [repr(("toy", 7))] and data["versions"] == tuning._versions()


def test_unwritable_cache_is_not_an_error(tune, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("CMFAST_CACHE", str(blocker))
    run, _ = sleepy({"a": 0.003, "b": 0.0})
    assert tuning.choose("toy", DEVICE, (8,), ("a", "b"), "a", run, elements=10**6)[0] == "b"
    assert blocker.read_text() == "a file where the cache folder would be"


SECOND_PROCESS = """
import json, torch, cmfast
from cmfast import tuning
from cmfast.models import PRESETS
torch.manual_seed(0)
unet = cmfast.UNet(PRESETS["test_imagenet"].unet).eval().set_channels_last()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    out = unet(x, torch.tensor([10.0, 20.0]), torch.tensor([1, 2]))
print(json.dumps({"stats": tuning.stats, "sum": out.double().sum().item(),
                  "choices": {k: r["choice"] for k, r in tuning.recorded_choices(torch.device("cpu")).items()}}))
"""


def test_a_second_process_times_nothing(tmp_path):
    env = dict(os.environ, CMFAST_TUNE="1", CMFAST_CACHE=str(tmp_path))

    def run():
        done = subprocess.run([sys.executable, "-c", SECOND_PROCESS], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["stats"]["timed"] > 0 and first["choices"]
    assert second["stats"]["timed"] == 0 and second["stats"]["written"] == 0
    assert second["stats"]["loaded"] == len(first["choices"]) and second["choices"] == first["choices"]
    assert second["sum"] == first["sum"]  # the same choices, the same numbers


def test_forcing_wins_over_measurement(tune, gen):
    qkv = torch.randn(1, 3 * 128, 32, 32, generator=gen)
    seen = []
    real = backends._candidates

    def spy(device, implemented):
        seen.append(device)
        return real(device, implemented)

    with cmfast.use_backend({"attention": "reference"}):
        backends._candidates, saved = spy, backends._candidates
        try:
            out = cmfast.ops.attention(qkv, 2)
        finally:
            backends._candidates = saved
    assert not seen and tune()["timed"] == 0
    torch.testing.assert_close(out, sys.modules["cmfast.ops.attention"].attention_reference(qkv, 2))


def test_candidates_are_the_tested_backends():
    """The chooser compares only backends the op tests hold to the reference (never the reference itself, never
    Triton's interpreter), all available here."""
    for op, implemented in IMPLEMENTED.items():
        names = backends._candidates(DEVICE, implemented)
        assert "reference" not in names and "triton" not in names
        assert all(n in implemented and backends.availability(n, DEVICE)[0] for n in names)


def test_torch_compile_fullgraph_times_nothing(tune):
    torch.manual_seed(0)
    unet = cmfast.UNet(PRESETS["test_imagenet"].unet).eval().set_channels_last()
    for p in unet.parameters():
        p.requires_grad_(False)
    x, t, y = torch.randn(1, 3, 32, 32), torch.tensor([5.0]), torch.tensor([3])
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(x, t, y)
    assert tune()["timed"] == 0  # traced and run: the registered ops never time
    with torch.no_grad():
        torch.testing.assert_close(got, unet(x, t, y), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision, layout", [("fp32", "nchw"), ("bf16", "channels_last")])
def test_the_layout_where_nothing_is_measured(tune, monkeypatch, precision, layout):
    """CMFAST_TUNE=0: a model loaded without a layout runs NCHW in fp32 and channels_last in the half types (ties
    of a measurement go the same way); its output is NCHW either way."""
    monkeypatch.setenv("CMFAST_TUNE", "0")
    torch.manual_seed(0)
    unet = cmfast.UNet(PRESETS["test_imagenet"].unet).eval().set_precision(precision).set_channels_last(None)
    for p in unet.parameters():
        p.requires_grad_(False)
    assert unet.fixed_layout() == layout
    with torch.no_grad():
        out = unet(torch.randn(1, 3, 16, 16), torch.tensor([5.0]), torch.tensor([3]))
    assert out.is_contiguous() and getattr(unet, "_weights_cl", False) == (layout == "channels_last")
    assert tune()["timed"] == 0


# ---- the convolution alternatives against the reference --------------------------------------------------

CONV_CASES = [  # (in, out, kernel, padding, input shape)
    (24, 72, 1, 0, (2, 24, 8, 8)),  # attention's qkv
    (40, 24, 1, 0, (1, 40, 5, 7)),  # a skip connection
    (16, 24, 3, 1, (2, 16, 9, 8)),  # a ResBlock conv
    (3, 16, 3, 1, (1, 3, 16, 16)),  # the input conv
    (64, 32, 3, 1, (1, 64, 7, 6)),  # a ResBlock conv whose channels the bf16 Winograd kernel takes (32s)
    (32, 3, 3, 1, (2, 32, 9, 7)),  # the output head ("taps")
]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shifted", [False, True], ids=["bias", "bias+shift"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}to{c[1]}k{c[2]}")
def test_conv_alternatives_match_the_reference(case, dtype, layout, residual, shifted, gen):
    """Each way to run a convolution, with the residual add fused or not and with a per-channel shift of the bias
    (a ResBlock's time embedding at batch 1) or not, against the direct sum in float64."""
    cin, cout, k, pad, shape = case
    conv = Conv2d(cin, cout, k, padding=pad)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.dim() > 1 else 3))
    conv = conv.to(dtype).requires_grad_(False)
    x = torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    out_shape = (shape[0], cout, shape[2], shape[3])
    add = torch.randn(out_shape, generator=gen).to(dtype).contiguous(memory_format=x.dim() == 4 and (
        torch.channels_last if layout == "channels_last" else torch.contiguous_format)) if residual else None
    shift = torch.randn(cout, generator=gen) if shifted else None
    bias = conv._shifted_bias(shift) if shifted else conv.bias
    want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double() + (shift.double() if shifted else 0),
                    padding=pad)
    if residual:
        want = want + add.double()
    names = conv.candidates(x)
    assert "matmul" in names if k == 1 else "matmul" not in names
    if layout == "channels_last" and packed_available():
        assert "packed" in names
    if layout == "channels_last" and k == 3 and winograd.available(dtype) and (
            dtype == torch.float32 or cin % 32 == cout % 32 == 0):
        assert "winograd" in names
    assert ("taps" in names) == (layout == "channels_last" and k == 3 and cout <= MAX_TAPS_OUT
                                 and dtype == torch.float32)
    for how in names:
        got = conv._run(x, add, bias, how)
        assert got.dtype == dtype and got.shape == out_shape
        assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last") or got.shape[2:] == (1, 1)
        torch.testing.assert_close(got.double(), want, **TOLERANCE[dtype], msg=f"{how}")
    got = conv(x, add=add, shift=shift)  # the module's call: its chosen way (the fixed order in the tests)
    torch.testing.assert_close(got.double(), want, **TOLERANCE[dtype])
    with pytest.raises(ValueError, match=r"shift: expected shape"):
        conv(x, shift=torch.zeros(cout + 1))


def test_packed_weights_follow_weight_changes(gen):
    conv = Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 8, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    if "packed" not in conv.candidates(x):
        pytest.skip("this torch has no oneDNN prepacked convolution")
    first = conv._run(x, None, conv.bias, "packed")
    with torch.no_grad():
        conv.weight.mul_(2)  # in place: the packed copy must be renewed
    torch.testing.assert_close(conv._run(x, None, conv.bias, "packed"), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert not torch.allclose(first, conv._run(x, None, conv.bias, "packed"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_unet_with_measured_choices_matches_fixed_order(tune, precision):
    """The whole U-Net with every choice measured against the same U-Net in the fixed order."""
    torch.manual_seed(1)
    unet = cmfast.UNet(PRESETS["test_imagenet"].unet).eval().set_precision(precision).set_channels_last()
    for p in unet.parameters():
        p.requires_grad_(False)
        p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5 if p.dim() > 1 else 3))
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5.0, 50.0]), torch.tensor([3, 7])
    tuning.TINY_ELEMENTS, saved = 0, tuning.TINY_ELEMENTS  # measure every call of the small model
    try:
        tuned = unet(x, t, y)
    finally:
        tuning.TINY_ELEMENTS = saved
    assert tune()["timed"] > 0
    os.environ["CMFAST_TUNE"] = "0"
    fixed = unet(x, t, y)
    torch.testing.assert_close(tuned, fixed, **TOLERANCE[torch.float32 if precision == "fp32" else torch.bfloat16])


# ---- the memory layout, where the user did not choose one -----------------------------------------------------


def small_unet(precision="fp32"):
    torch.manual_seed(2)
    unet = cmfast.UNet(PRESETS["test_imagenet"].unet).eval().set_precision(precision)
    for p in unet.parameters():
        p.requires_grad_(False)
        p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5 if p.dim() > 1 else 3))
    return unet


def test_layout_measured_where_not_chosen(tune, monkeypatch):
    unet = small_unet()
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5.0, 50.0]), torch.tensor([3, 7])
    want = unet(x, t, y)  # NCHW, as constructed
    unet.set_channels_last(None)
    monkeypatch.setattr(tuning, "TINY_ELEMENTS", 0)
    got = unet(x, t, y)
    records = {k: r for k, r in tuning.recorded_choices(DEVICE).items() if k.startswith("('layout'")}
    assert len(records) == 1 and set(next(iter(records.values()))["times_ms"]) == {"nchw", "channels_last"}
    assert got.is_contiguous()  # NCHW out whatever ran inside
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    timed = tune()["timed"]
    torch.testing.assert_close(unet(x, t, y), want, rtol=1e-5, atol=1e-5)
    assert tune()["timed"] == timed  # recorded: not measured again


def test_layout_fixed_order_and_reference(monkeypatch):
    unet = small_unet().set_channels_last(None)
    x, t, y = torch.randn(1, 3, 32, 32), torch.tensor([5.0]), torch.tensor([3])
    before = dict(tuning.stats)
    unet(x, t, y)  # CMFAST_TUNE=0 (the test default): NCHW, nothing measured
    with cmfast.use_backend("reference"):
        monkeypatch.setenv("CMFAST_TUNE", "1")
        unet(x, t, y)  # the reference forced: plain convolutions, NCHW, nothing measured
    assert tuning.stats == before and not getattr(unet, "_weights_cl", False)


def test_layout_under_torch_compile(tune):
    unet = small_unet().set_channels_last(None)
    x, t, y = torch.randn(1, 3, 32, 32), torch.tensor([5.0]), torch.tensor([3])
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    got = compiled(x, t, y)
    assert tune()["timed"] == 0
    torch.testing.assert_close(got, unet._forward(x, t, y, channels_last=False), rtol=1e-4, atol=1e-4)
