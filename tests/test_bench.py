"""The benchmark suite in its --quick mode on the CPU (tiny shapes, test-sized models, no torch.compile): every
module runs, writes the CSV columns, computes the ratios to its peers, and its peers compute the op they stand in
for. Nothing here asserts a speed."""

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks/ is not installed; it runs from the source tree

from benchmarks import bench_attention, bench_consistency, bench_group_norm, run  # noqa: E402
from benchmarks.common import COLUMNS, read_csv  # noqa: E402
from benchmarks.summary import markdown, write_readme  # noqa: E402

import cmfast  # noqa: E402
from cmfast import ops  # noqa: E402


def quick_args(tmp_path, names):
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    return parser.parse_args([*names, "--quick", "--device", "cpu", "--batches", "1,2", "--threads", "1",
                              "--out", str(tmp_path)])


@pytest.mark.parametrize("name", list(run.MODULES))
def test_quick_run_writes_rows_with_ratios(name, tmp_path):
    logged = []
    session = run.run(quick_args(tmp_path, [name]), log=logged.append)
    assert not session.failures, session.failures
    csvs = list(tmp_path.glob("*.csv"))
    assert csvs == [session.csv_path]
    rows = read_csv(session.csv_path)
    assert rows and list(rows[0]) == COLUMNS
    module = __import__(f"benchmarks.{run.MODULES[name]}", fromlist=["BENCHMARKS", "PEERS"])
    assert {r["benchmark"] for r in rows} <= set(module.BENCHMARKS)
    assert {r["batch"] for r in rows} == {"1", "2"}
    for r in rows:
        assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert r["device"] and r["torch_version"] == torch.__version__ and r["timestamp"]
        rate = r["gb_per_s"] or r["tflop_per_s"]
        assert float(rate) > 0 and float(r["fraction_of_ceiling"]) > 0 and r["ceiling"]
    # every row whose benchmark and shape have a peer measured beside it names that peer with p50 ratio
    by_key = {(r["benchmark"], r["shape"], r["dtype"], r["provider"]): r for r in rows}
    checked = 0
    for r in rows:
        for peer in module.PEERS:
            other = by_key.get((r["benchmark"], r["shape"], r["dtype"], peer))
            if other is None or other is r:
                continue
            ratios = dict(part.split("=") for part in r["ratios"].split(";"))
            assert math.isclose(float(ratios[peer]), float(other["p50_ms"]) / float(r["p50_ms"]), rel_tol=0.01)
            checked += 1
    assert checked
    # the plots and the summary table
    pytest.importorskip("matplotlib")
    for benchmark in {r["benchmark"] for r in rows}:
        assert (tmp_path / f"{session.csv_path.stem}-{benchmark}.png").stat().st_size > 0
    text = markdown(session.csv_path)
    assert all(f"**{b}**" in text for b in {r["benchmark"] for r in rows})


def test_a_second_run_the_same_day_gets_its_own_csv(tmp_path):
    first = run.run(quick_args(tmp_path, ["consistency"]), log=lambda _: None)
    second = run.run(quick_args(tmp_path, ["consistency"]), log=lambda _: None)
    assert first.csv_path != second.csv_path and first.csv_path.exists() and second.csv_path.exists()


def test_summary_writes_only_between_existing_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench:start -->\nold\n<!-- bench:end -->\ntail\n")
    assert write_readme("new table\n", readme)
    assert readme.read_text() == "# x\n<!-- bench:start -->\nnew table\n<!-- bench:end -->\ntail\n"
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers\n")
    assert not write_readme("new table\n", plain)
    assert plain.read_text() == "# no markers\n"


def test_unknown_benchmark_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown benchmark"):
        run.run(quick_args(tmp_path, ["nonsense"]), log=lambda _: None)


@pytest.mark.parametrize("device, message", [("tpu", "expected cpu, cuda or cuda:N"),
                                             ("cuda:7", "no CUDA device here|numbered from 0")])
def test_bad_device_is_refused(tmp_path, device, message):
    args = quick_args(tmp_path, ["group_norm"])
    args.device = device
    with pytest.raises(SystemExit, match=message):
        run.run(args, log=lambda _: None)
    assert not any(tmp_path.iterdir())


def test_the_runner_parses_its_command_line():
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    args = parser.parse_args(["group_norm", "--quick", "--device", "cpu", "--dtypes", "float32"])
    assert args.names == ["group_norm"] and args.quick and args.dtypes == ["float32"]


@pytest.mark.parametrize("preset", [False, True], ids=["allocator-unset", "allocator-set"])
def test_the_runner_restarts_once_with_the_allocator_settings(preset):
    """`python -m benchmarks` sets glibc's allocator knobs by restarting itself once; with them set it runs as is."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in run.ALLOCATOR}
    if preset:
        env.update(run.ALLOCATOR)
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m benchmarks"), done.stderr


def test_the_package_does_not_reach_outside_itself():
    """cmfast imports nothing from the source tree around it (benchmarks/, tools/, tests/)."""
    import ast

    package = Path(cmfast.__file__).parent
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text, path
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in ("benchmarks", "tools", "tests") for n in names), (path, names)


# ---- the peers compute what the cmfast op computes --------------------------------------------------------------


def test_group_norm_peer_is_the_op(gen):
    x = torch.randn(2, 64, 8, 8, generator=gen)
    w, b = 1 + 0.1 * torch.randn(64, generator=gen), 0.1 * torch.randn(64, generator=gen)
    scale, shift = 0.1 * torch.randn(2, 64, generator=gen), 0.1 * torch.randn(2, 64, generator=gen)
    with cmfast.use_backend("reference"):
        want = ops.group_norm(x, w, b, scale=scale, shift=shift, silu=True)
    torch.testing.assert_close(bench_group_norm.eager(x, w, b, scale, shift), want)


def test_attention_peers_are_the_op(gen):
    qkv = torch.randn(2, 3 * 128, 4, 4, generator=gen)
    with cmfast.use_backend("reference"):
        want = ops.attention(qkv, 2)
    torch.testing.assert_close(bench_attention.eager(qkv, 2), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bench_attention.sdpa(qkv, 2), want, rtol=1e-4, atol=1e-5)


def test_consistency_peers_are_the_op(gen):
    x, f = torch.randn(3, 3, 8, 8, generator=gen), torch.randn(3, 3, 8, 8, generator=gen)
    sigma = torch.rand(3, generator=gen) * 80 + 0.002
    with cmfast.use_backend("reference"):
        epilogue = ops.consistency_epilogue(x, f, sigma, clamp=True)
        x_in, t_in = ops.consistency_prologue(x, sigma)
    torch.testing.assert_close(bench_consistency.eager_epilogue(x, f, sigma), epilogue)
    got_x, got_t = bench_consistency.eager_prologue(x, sigma)
    torch.testing.assert_close(got_x, x_in)
    torch.testing.assert_close(got_t, t_in)


def test_host_overhead_times_every_provider_and_profiles(capsys):
    from benchmarks import host_overhead

    assert host_overhead.main(["--device", "cpu", "--calls", "3", "--profile-top", "3"]) == 0
    out = capsys.readouterr().out
    for case, (op, _, peers) in host_overhead.CASES.items():
        rows = [line for line in out.splitlines() if line.startswith(case)]
        providers = {line[len(case):].split()[0] for line in rows}
        assert set(peers) <= providers and any(p.startswith("cmfast-") for p in providers)
        assert all(float(line.split()[-1]) > 0 for line in rows)  # no provider failed
    assert out.count("-- profile of cmfast-") == len(host_overhead.CASES)


def test_summary_best_peer_column(tmp_path):
    """Each row's best cmfast provider against the fastest peer of the same shape and dtype (compiled and
    channels_last peers included; the cmfast-inside pipeline and convs-only are not peers), beside the eager one."""
    from benchmarks.common import Row, write_csv

    def row(provider, ms, dtype="bfloat16"):
        return Row("unet_forward", provider, "m:1x3x8x8", dtype, 1, "cpu x", ms, ms, ms, tflop_per_s=1.0,
                   fraction_of_ceiling=0.5, ceiling="matmul 2 TFLOP/s")

    rows = [row("cmfast", 300.0), row("cmfast-channels-last", 200.0), row("diffusers", 330.0),
            row("diffusers-channels-last", 260.0), row("diffusers-compile", 250.0), row("convs-only", 100.0),
            row("diffusers-pipeline+cmfast", 150.0), row("cmfast", 900.0, "float32"), row("diffusers", 990.0, "float32")]
    path = write_csv(rows, tmp_path / "small.csv")
    lines = [line for line in markdown(path).splitlines() if line.startswith("| m:")]
    bf16, fp32 = lines
    assert bf16.endswith("| 1.65x (cmfast-channels-last) | 1.25x (diffusers-compile) |")
    assert fp32.endswith("| 1.10x (cmfast) | 1.10x (diffusers) |")


def test_bad_compile_mode_is_refused(tmp_path):
    args = quick_args(tmp_path, ["sampling"])
    args.compile_modes = ["max-autotune-please"]
    with pytest.raises(SystemExit, match="--compile-modes: expected names among default"):
        run.run(args, log=lambda _: None)
    assert not any(tmp_path.iterdir())


def test_rows_say_when_the_compiled_kernels_are_off(monkeypatch):
    """A stale build turns cmfast._C off (cmfast runs its torch paths): the U-Net rows' note says so, so a table
    measured that way cannot pass for the compiled kernels' figures."""
    from benchmarks import bench_sampling
    from cmfast import _extension

    session = argparse.Namespace(default_backend=lambda op: "reference")
    stale = _extension.ExtensionStatus(loaded=False, cpu=False, cuda=False, reason="cmfast._C is stale")
    monkeypatch.setattr(_extension, "status", stale)
    assert bench_sampling._backends_note(session).endswith("compiled kernels off: cmfast._C is stale")
    loaded = _extension.ExtensionStatus(loaded=True, cpu=True, cuda=False, reason="")
    monkeypatch.setattr(_extension, "status", loaded)
    assert "off" not in bench_sampling._backends_note(session)


def test_a_row_is_timed_round_by_round():
    """Session.record_row: every provider's warm-up, then one timed call of each a round, in order and in reverse
    alternately; a provider that fails is logged and dropped, the others go on; a provider still short of
    min_seconds goes on alone."""
    import time

    from benchmarks.common import Session
    from benchmarks.measure import Timing

    session = Session.__new__(Session)  # no ceilings measured: only the row's timing is under test
    session.device, session.gpu, session.failures, session.log = torch.device("cpu"), False, [], lambda *a: None
    added = {}
    session._add = lambda benchmark, provider, m, **kw: added.__setitem__(provider, m)
    calls = []

    def provider(name, fail_at=None, sleep=0.0):
        def call():
            calls.append(name)
            time.sleep(sleep)
            if calls.count(name) == fail_at:
                raise RuntimeError("boom")
        return call

    entries = [("a", provider("a"), "", None), ("b", provider("b", fail_at=3), "", None), ("c", provider("c"), "", None)]
    session.record_row("toy", entries, shape="s", dtype=torch.float32, batch=1,
                       timing=Timing(warmup=1, min_reps=4, min_seconds=0.0))
    assert calls == ["a", "b", "c", "a", "b", "c", "c", "b", "a", "a", "c", "c", "a"]
    assert set(added) == {"a", "c"} and added["a"].reps == added["c"].reps == 4
    assert len(session.failures) == 1 and "toy b" in session.failures[0] and "boom" in session.failures[0]

    calls.clear()
    added.clear()
    entries = [("slow", provider("slow", sleep=0.03), "", None), ("fast", provider("fast", sleep=0.005), "", None)]
    session.record_row("toy", entries, shape="s", dtype=torch.float32, batch=1,
                       timing=Timing(warmup=0, min_reps=2, min_seconds=0.05))
    assert calls[:4] == ["slow", "fast", "fast", "slow"] and calls.count("slow") == 2
    assert set(calls[4:]) == {"fast"} and 4 <= calls.count("fast") <= 11 and added["fast"].reps == calls.count("fast")
