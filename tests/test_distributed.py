"""Sampling by several processes on torch.distributed (gloo on the CPU, started by torchrun as a user would): the
same samples.npz as one process at the same batch size, resumable after SIGINT, SIGTERM or a failed process with
any number of processes, damaged and foreign shards, a second job. The built-in digits model keeps each run to
seconds."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmfast.cli import build_parser, main
from cmfast.distributed import SHARDS
from cmfast.outputs import RECORD, Outputs

JOB = ["sample", "--num", "12", "--batch", "2", "--seed", "0"]
WORKER = str(Path(__file__).with_name("dist_worker.py"))


def torchrun(n: int, argv, env=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node n tests/dist_worker.py -- ARGV` (the README explains the --)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), WORKER, "--", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def arrays(folder: Path) -> dict:
    with np.load(folder / "samples.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one") / "out"
    assert main([*JOB, "--out", str(out)]) == 0
    return arrays(out)


def same(out: Path, want: dict) -> None:
    got = arrays(out)
    assert sorted(got) == sorted(want) == ["arr_0", "arr_1"]
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    assert sorted(p.name for p in out.iterdir()) == sorted([RECORD, "grid.png", "samples.npz"])  # shards gone


@pytest.mark.parametrize("n, options", [(2, []), (3, []), (2, ["--precision", "bf16", "--steps", "2"])],
                         ids=["2 processes", "3 processes", "2 processes, bf16, two steps"])
def test_several_processes_give_the_same_file(tmp_path, one_process, n, options):
    want = one_process
    if options:
        assert main([*JOB, *options, "--out", str(tmp_path / "one")]) == 0
        want = arrays(tmp_path / "one")
    run = torchrun(n, [*JOB, *options, "--out", str(tmp_path / "out")])
    assert run.returncode == 0, run.stderr
    same(tmp_path / "out", want)
    assert re.search(rf"12 images in [\d.]+ s by {n} processes: [\d.]+ images/s in all \(per process", run.stdout)


@pytest.mark.parametrize("signal_name, rank", [("SIGINT", "1"), ("SIGTERM", "0")])
def test_a_stopped_job_resumes_with_another_world_size(tmp_path, one_process, signal_name, rank):
    out = tmp_path / "out"
    stopped = torchrun(2, [*JOB, "--out", str(out)], env={"CMFAST_TEST_STOP": f"{signal_name}:1:{rank}"})
    assert stopped.returncode != 0
    assert not (out / "samples.npz").exists()
    assert list((out / SHARDS).glob("shard-*.npz"))  # the finished batches are kept
    assert main([*JOB, "--out", str(out)]) == 0  # one process takes it up
    same(out, one_process)


def test_a_failed_process_is_named_and_nothing_assembled(tmp_path, one_process):
    out = tmp_path / "out"
    failed = torchrun(2, [*JOB, "--out", str(out)], env={"CMFAST_TEST_FAIL": "1"})
    assert failed.returncode != 0
    assert "process 1 of 2 failed: RuntimeError: injected failure" in failed.stderr, failed.stderr
    assert "run the same command again to complete" in failed.stderr
    assert not (out / "samples.npz").exists()
    run = torchrun(3, [*JOB, "--out", str(out)])
    assert run.returncode == 0, run.stderr
    same(out, one_process)


def interrupted(out: Path, monkeypatch, argv=JOB) -> None:
    """A one-process run stopped after all its shards, before assembling them."""
    from cmfast import images

    def stop(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(images, "save_npz", stop)
        with pytest.raises(KeyboardInterrupt):
            main([*argv, "--out", str(out)])
    assert len(list((out / SHARDS).glob("shard-*.npz"))) == 6


def test_a_damaged_shard_is_redone(tmp_path, one_process, monkeypatch):
    out = tmp_path / "out"
    interrupted(out, monkeypatch)
    shard = out / SHARDS / "shard-0000003.npz"
    shard.write_bytes(shard.read_bytes()[:100])  # torn
    (out / SHARDS / "shard-0000004.npz").write_bytes(b"garbage")
    assert main([*JOB, "--out", str(out)]) == 0
    same(out, one_process)


def test_shards_of_another_job_are_refused(tmp_path, one_process, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupted(out, monkeypatch, [*JOB[:-1], "1"])  # seed 1
    before = {p.name: p.read_bytes() for p in (out / SHARDS).iterdir()}
    assert main([*JOB, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds shards of another sampling job (seed 1 here, 0 asked)" in err, err
    assert {p.name: p.read_bytes() for p in (out / SHARDS).iterdir()} == before
    assert main([*JOB, "--out", str(out), "--force"]) == 0  # discarded, redone
    same(out, one_process)


def test_a_second_job_into_the_folder_is_refused_on_every_process(tmp_path):
    out = tmp_path / "out"
    with Outputs(out, ["samples.npz"]):  # a job running there
        run = torchrun(2, [*JOB, "--out", str(out)])
    assert run.returncode != 0
    assert run.stderr.count("another cmfast job is writing into this folder now") == 2, run.stderr  # both processes
    assert not out.exists()


def test_the_readme_torchrun_commands_parse_as_written():
    """torchrun's own parser, then cmfast's, on every torchrun line of the README."""
    from torch.distributed.run import get_args_parser

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    lines = [line.split("#")[0].strip() for line in readme.splitlines() if line.startswith("torchrun ")]
    assert len(lines) >= 2
    for line in lines:
        words = line.replace("\\", " ").split()
        launched = get_args_parser().parse_args(words[1:])
        assert launched.module and launched.training_script == "cmfast", line
        args = build_parser().parse_args(launched.training_script_args)
        assert args.command == "sample" and args.num == 50000, line


def test_the_python_function_checks_its_input(tmp_path):
    from cmfast import distributed, pretrained

    model = pretrained.find(None)
    for kwargs, message in (({"num": 0, "batch": 2}, "positive counts"), ({"num": 4, "batch": "2"}, "positive counts"),
                            ({"num": 4, "batch": 2, "sigmas": "80"}, "a sequence of noise levels")):
        with pytest.raises(ValueError, match=message):
            distributed.sample_to_folder(model, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    written = distributed.sample_to_folder(model, tmp_path / "out", num=3, batch=2, progress=False)
    assert written == tmp_path / "out" / "samples.npz" and arrays(tmp_path / "out")["arr_0"].shape == (3, 16, 16, 1)


def test_a_process_group_of_the_caller_is_left_as_it_was(tmp_path, one_process):
    import torch.distributed as dist

    from cmfast import distributed, pretrained

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        distributed.sample_to_folder(pretrained.find(None), tmp_path / "out", num=12, batch=2, progress=False)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    same(tmp_path / "out", one_process)


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    import torch

    from cmfast.distributed import process_device

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert process_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # a device the user named stays
    assert process_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert process_device(torch.device("cuda")) == torch.device("cuda")
