"""The sample and edit commands end to end on a tiny checkpoint: files in the reference's formats, batch-size
invariance, and clear errors that leave no file behind."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

import cmfast
from cmfast.cli import main


def npz(folder):
    with np.load(folder / "samples.npz") as f:
        return {k: f[k] for k in f.files}


def test_sample_writes_the_reference_format(checkpoint, tmp_path):
    assert main(["sample", checkpoint, "--num", "5", "--batch", "2", "--seed", "3", "--ts", "0,22,39",
                 "--out", str(tmp_path / "a")]) == 0
    arrays = npz(tmp_path / "a")
    assert sorted(arrays) == ["arr_0", "arr_1"]
    assert arrays["arr_0"].shape == (5, 16, 16, 3) and arrays["arr_0"].dtype == np.uint8
    assert arrays["arr_1"].shape == (5,) and arrays["arr_1"].dtype == np.int64
    assert arrays["arr_0"].std() > 0
    with Image.open(tmp_path / "a" / "grid.png") as img:
        assert img.mode == "RGB" and img.size[0] > 16


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sample_is_batch_size_invariant(checkpoint, tmp_path, precision):
    """What the README says a seed fixes: the draws exactly, the images to within one grey level."""
    from cmfast import sampling

    for batch in ("1", "2", "5"):
        assert main(["sample", checkpoint, "--num", "5", "--batch", batch, "--seed", "11", "--steps", "2",
                     "--precision", precision, "--out", str(tmp_path / batch)]) == 0
    whole = sampling.randn((5, 3, 16, 16), sampling.generators_for(11, range(5)), "cpu")
    parts = [sampling.randn((len(r), 3, 16, 16), sampling.generators_for(11, r), "cpu") for r in (range(2), range(2, 5))]
    assert torch.equal(whole, torch.cat(parts))  # each sample's noise is its own, whatever the batch
    runs = [npz(tmp_path / b) for b in ("1", "2", "5")]
    for other in runs[1:]:
        assert np.array_equal(runs[0]["arr_1"], other["arr_1"])
        assert np.abs(runs[0]["arr_0"].astype(int) - other["arr_0"].astype(int)).max() <= 1


def test_sample_with_given_labels(checkpoint, tmp_path):
    assert main(["sample", checkpoint, "--num", "4", "--class-labels", "1,2", "--out", str(tmp_path / "l")]) == 0
    assert npz(tmp_path / "l")["arr_1"].tolist() == [1, 2, 1, 2]


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("task, extra", [("inpaint", ["--mask", "glyph:S"]), ("colorize", []),
                                         ("superres", ["--factor", "4"]), ("stroke", []),
                                         ("denoise", ["--add-noise", "--sigma", "0.5"]), ("interpolate", [])])
def test_edit_tasks(checkpoint, image_file, tmp_path, task, extra):
    out = tmp_path / "out"
    assert main(["edit", task, checkpoint, "--image", image_file, "--steps", "2", "--out", str(out), *extra]) == 0
    for name in (f"{task}.png", f"{task}_before_after.png"):
        with Image.open(out / name) as img:
            assert img.size[0] >= 16


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "{ckpt}", "--ts", "0,22,10"], "strictly ascending"),
        (["sample", "{ckpt}", "--ts", "0,22,40"], r"in \[0, 39\]"),
        (["sample", "{ckpt}", "--class-labels", "3,10"], r"labels must lie in \[0, 10\)"),
        (["sample", "{ckpt}", "--steps", "2", "--ts", "0,39"], "one or the other"),
        (["sample", "{ckpt}", "--num", "0"], "positive counts"),
        (["sample", "nope.pt"], "neither a file or folder nor a preset"),
        (["sample", "cd_imagenet64_l2"], "weights are not here"),
        (["edit", "inpaint", "{ckpt}", "--image", "{small}"], "expected a square image of 16 px"),
        (["edit", "inpaint", "{ckpt}", "--image", "{image}", "--mask", "{missing}"], "no such file"),
        (["edit", "colorize", "{ckpt}"], "needs an input image"),
        (["sample", "{ckpt}", "--device", "tpu"], "expected cpu, cuda or cuda:N, got 'tpu'"),
        (["sample", "{ckpt}", "--device", "cuda:7"], "no CUDA device here|numbered from 0"),
    ],
)
def test_bad_input_leaves_nothing(checkpoint, image_file, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("CMFAST_CHECKPOINTS", str(tmp_path / "none"))
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(small)
    out = tmp_path / "out"
    argv = [a.format(ckpt=checkpoint, image=image_file, small=small, missing=tmp_path / "m.png") for a in argv]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists()


def test_existing_output_is_kept(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sample", checkpoint, "--num", "2", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["sample", checkpoint, "--num", "3", "--seed", "1", "--out", str(out)]) == 2
    assert "samples.npz exists (--force replaces it)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["sample", checkpoint, "--num", "3", "--seed", "1", "--out", str(out), "--force"]) == 0
    assert npz(out)["arr_0"].shape[0] == 3


# ---- cmfast tune -------------------------------------------------------------------------------------------


def test_tune_records_choices_and_reports(checkpoint, tmp_path, monkeypatch, capsys):
    from cmfast import tuning

    monkeypatch.setenv("CMFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "TINY_ELEMENTS", 0)  # the test model's calls are all tiny
    tuning.forget()
    try:
        assert main(["tune", checkpoint, "--batch", "1,2", "--precision", "fp32,bf16", "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"fp32\s+2\s+channels_last\s+[\d.]+ ms\s+[\d.]+ ms\s+[\d.]+x\s+\d+", out), out
        assert "is faster" in out
        records = tuning.recorded_choices(torch.device("cpu"))
        assert records and all(r["source"] == "cmfast tune" for r in records.values())
        layouts = [r for k, r in records.items() if k.startswith("('layout'")]
        assert len(layouts) == 4 and all(r["choice"] in ("nchw", "channels_last") for r in layouts)
        unet = cmfast.load(checkpoint)  # a model loaded without a layout runs in the recorded one, measuring nothing
        monkeypatch.setenv("CMFAST_TUNE", "1")
        timed = tuning.stats["timed"]
        with torch.no_grad():
            unet(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0]), torch.tensor([1, 2]))
        assert tuning.stats["timed"] == timed
        monkeypatch.setenv("CMFAST_TUNE", "0")
        assert tuning.path_for(tuning.device_name(torch.device("cpu"))).is_file()
        timed = tuning.stats["timed"]
        assert main(["tune", checkpoint, "--batch", "1", "--layout", "nchw", "--device", "cpu"]) == 0
        assert tuning.stats["timed"] == timed  # recorded already: nothing measured again
        assert main(["tune", checkpoint, "--batch", "1", "--layout", "nchw", "--device", "cpu", "--again"]) == 0
        assert tuning.stats["timed"] > timed
        assert main(["info", "--choices"]) == 0
        assert "from cmfast tune" in capsys.readouterr().out
    finally:
        tuning.forget()
    assert "CMFAST_TUNE" not in __import__("os").environ or __import__("os").environ["CMFAST_TUNE"] == "0"


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch: expected positive batch sizes"),
    (["--batch", "a"], "--batch: expected comma-separated integers"),
    (["--precision", "fp8"], "--precision: expected some of fp32, fp16, bf16"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
])
def test_tune_bad_input(checkpoint, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("CMFAST_CACHE", str(tmp_path / "cache"))
    assert main(["tune", checkpoint, *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before anything was measured or written


def test_tune_bad_environment(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CMFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CMFAST_TUNE", "maybe")
    assert main(["tune", checkpoint]) == 2
    assert "CMFAST_TUNE: expected 0" in capsys.readouterr().err
    assert main(["info"]) == 0  # info reports it instead of failing
    assert "CMFAST_TUNE: expected 0" in capsys.readouterr().out


def test_progress_and_class_messages(checkpoint, image_file, tmp_path, capsys):
    assert main(["sample", checkpoint, "--num", "2", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    assert "network calls an image" in capsys.readouterr().err
    assert main(["edit", "inpaint", checkpoint, "--image", image_file, "--steps", "3", "--mask", "glyph:S",
                 "--seed", "4", "--out", str(tmp_path / "e")]) == 0
    captured = capsys.readouterr()
    assert re.search(r"class label: \d+ \(drawn from --seed 4; --class-label chooses one\)", captured.out)
    assert "inpaint: 3 network calls" in captured.err
    assert main(["edit", "inpaint", checkpoint, "--image", image_file, "--steps", "3", "--mask", "glyph:S",
                 "--class-label", "2", "--out", str(tmp_path / "e2")]) == 0
    assert "class label" not in capsys.readouterr().out


def test_missing_extra_is_one_line(monkeypatch, tmp_path, capsys):
    from cmfast import digits

    def missing():
        raise ImportError("the digits data and scorer (cmfast train, evaluate, demo) need scikit-learn: "
                          "pip install 'cmfast[digits]'")

    monkeypatch.setattr(digits, "_require_sklearn", missing)
    for argv in (["demo", "--out", str(tmp_path / "d")], ["evaluate"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "need scikit-learn: pip install 'cmfast[digits]'" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()
