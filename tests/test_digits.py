"""The built-in digits model's commands: train (resumable), evaluate, demo, and sampling with no checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmfast import pretrained
from cmfast.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--steps", "3", "--batch", "4", "--checkpoint-every", "2", "--out", str(out)]) == 0
    return out


def test_train_writes_a_loadable_checkpoint(trained):
    assert (trained / "model.safetensors").is_file() and (trained / "state.pt").is_file()
    model = pretrained.find(str(trained / "model.safetensors"))
    assert model.unet.config.in_channels == 1 and model.unet.config.num_classes == 10


def test_train_resumes_and_refuses_other_settings(trained, capsys):
    assert main(["train", "--steps", "3", "--batch", "4", "--checkpoint-every", "2", "--out", str(trained)]) == 0
    assert "at step 3 of 3 already: nothing to train" in capsys.readouterr().out
    assert main(["train", "--steps", "5", "--batch", "4", "--out", str(trained)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_train_options_reach_the_run(tmp_path):
    """The training options of the command line are the run's settings (recorded in its state)."""
    options = {"--target": "ema", "--mu0": "0.9", "--lr-schedule": "cosine", "--index-sampling": "uniform",
               "--weighting": "uniform", "--n-schedule": "fixed", "--n-points": "12"}
    argv = [a for pair in options.items() for a in pair]
    assert main(["train", "--steps", "1", "--batch", "2", "--out", str(tmp_path), *argv]) == 0
    config = json.loads(torch.load(tmp_path / "state.pt", weights_only=True)["config"])
    assert (config["target"], config["mu0"], config["lr_schedule"], config["index_sampling"], config["weighting"],
            config["n_schedule"], config["s0"]) == ("ema", 0.9, "cosine", "uniform", "uniform", "fixed", 12)


def test_evaluate_reports_samples_beside_real_digits_and_noise(trained, capsys):
    assert main(["evaluate", str(trained / "model.safetensors"), "--num-per-class", "3"]) == 0
    out = capsys.readouterr().out
    for row in ("held-out real digits", "uniform noise", "one-step samples", "two-step samples"):
        assert row in out


def test_demo_writes_its_pictures(trained, tmp_path, capsys):
    assert main(["demo", str(trained / "model.safetensors"), "--out", str(tmp_path)]) == 0
    for name, rows in (("samples.png", 2), ("edits.png", 5)):
        with Image.open(tmp_path / name) as img:
            assert img.mode == "RGB" and img.size[0] > 10 * 16 * 4 and rows * 16 * 4 < img.size[1] < (rows + 1) * 16 * 4
    assert main(["demo", str(trained / "model.safetensors"), "--out", str(tmp_path)]) == 2  # no overwrite
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "built-in")]) == 0  # the built-in model: its teacher's row too
    assert "one step, two steps (80, " in (out := capsys.readouterr().out) and "teacher, Heun (35 calls)" in out
    with Image.open(tmp_path / "built-in" / "samples.png") as img:
        assert 3 * 16 * 4 < img.size[1] < 4 * 16 * 4


def test_sample_with_no_checkpoint_uses_the_built_in_model(tmp_path):
    assert main(["sample", "--num", "10", "--class-labels", "0,1,2,3,4,5,6,7,8,9", "--out", str(tmp_path)]) == 0
    with np.load(tmp_path / "samples.npz") as f:
        assert f["arr_0"].shape == (10, 16, 16, 1) and f["arr_1"].tolist() == list(range(10))


def test_the_preset_name_digits_is_the_built_in_model(tmp_path):
    assert main(["sample", "digits", "--num", "2", "--seed", "3", "--out", str(tmp_path / "named")]) == 0
    assert main(["sample", "--num", "2", "--seed", "3", "--out", str(tmp_path / "default")]) == 0
    with np.load(tmp_path / "named" / "samples.npz") as named, np.load(tmp_path / "default" / "samples.npz") as default:
        assert np.array_equal(named["arr_0"], default["arr_0"])


# Quality floors of the shipped weights, on 10 samples per class (seed 0). `make digits-model` scored them on 50 per
# class (tools/digits_model.py's report); far below these means the weights or the network's numbers changed.
FLOORS = {"digits": {"one-step samples": (0.9, 1.5), "two-step samples": (0.9, 1.5)},
          "digits-teacher": {"Heun samples (18 levels)": (0.9, 1.5)}}


@pytest.mark.parametrize("name", FLOORS)
def test_the_built_in_models_draw_the_digits_they_are_asked_for(name):
    from cmfast import digits

    model = pretrained.find(name)
    assert model.kind == ("edm" if name == "digits-teacher" else "consistency")
    scores = digits.evaluate(model, per_class=10, seed=0)
    for row, (recognised, grain) in FLOORS[name].items():
        assert scores[row].recognised >= recognised, f"{row}: {scores[row].recognised:.0%} recognised as asked"
        assert scores[row].high_frequency <= grain, f"{row}: high-frequency energy {scores[row].high_frequency:.2f}x"


def test_the_built_in_model_in_bf16_mode_draws_what_fp32_does(capsys):
    """The reference's bf16 mixed mode (what `--precision bf16` loads) on trained weights: the same seeds give
    one-step samples within a few 8-bit levels of fp32's, on average a fraction of one (measured: 0.001 mean,
    0.010 max on [-1, 1], with the weights of 2026-12-06)."""
    import torch

    from cmfast import digits

    half = pretrained.find(None, dtype="bf16")
    assert half.unet.input_blocks[0][0].weight.dtype == torch.bfloat16
    want, _ = digits.samples(pretrained.find(None), 5, 0, [80.0])
    got, _ = digits.samples(half, 5, 0, [80.0])
    diff = (got - want).abs()
    assert float(diff.mean()) < 0.5 / 127.5 and float(diff.max()) < 8 / 127.5, (float(diff.mean()), float(diff.max()))
    assert main(["evaluate", "--precision", "bf16", "--num-per-class", "2"]) == 0
    assert "one-step samples" in capsys.readouterr().out


def test_labelled_grid_puts_each_tile_in_its_place():
    from cmfast import images

    tiles = np.stack([np.full((4, 4, 1), 10 * (i + 1), np.uint8) for i in range(3)])
    picture = images.labelled_grid([("row a", tiles), ("row b", tiles[::-1])], ["0", "1", "2"], zoom=2, pad=2)
    h, w = picture.shape[:2]
    # the last column of the last row holds the first tile, enlarged to 8x8, in the bottom-right corner (inside the
    # margin of 2 pad: the gap after each tile and the border)
    corner = picture[h - 4 - 8:h - 4, w - 4 - 8:w - 4]
    assert (corner == 10).all()
    assert (picture[:, :5] < 255).any()  # labels drawn in the left margin


def test_a_teacher_is_known_as_one_wherever_it_goes(tmp_path, capsys):
    """An EDM teacher's file says what it is: sample, evaluate and convert treat it as a teacher (Heun)."""
    from cmfast import pretrained

    run = tmp_path / "teacher"
    assert main(["train", "--method", "edm", "--steps", "2", "--batch", "4", "--out", str(run)]) == 0
    assert pretrained.find(str(run / "model.safetensors")).kind == "edm"
    assert main(["convert", str(run / "model.safetensors"), str(tmp_path / "copy.safetensors")]) == 0
    assert pretrained.find(str(tmp_path / "copy.safetensors")).kind == "edm"
    assert main(["evaluate", str(run / "model.safetensors"), "--num-per-class", "1"]) == 0
    assert "Heun samples (18 levels)" in capsys.readouterr().out
    consistency = pretrained.find(None)
    assert consistency.kind == "consistency"


def test_the_recipe_at_small_size(tmp_path, capsys):
    """tools/digits_model.py end to end with a few steps of each run: the teacher, CD from it and CT train, each is
    scored from its fp16 file, the report holds every row and target, and the chosen model ships beside the
    teacher, each with its kind; rerun, every run is already finished and the same files ship."""
    import importlib.util

    from cmfast.models.checkpoint import recorded_kind

    spec = importlib.util.spec_from_file_location("digits_model", Path(__file__).parent.parent / "tools" /
                                                  "digits_model.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    argv = ["--run", str(tmp_path / "run"), "--ship", str(tmp_path / "ship"), "--teacher-steps", "3", "--cd-steps",
            "2", "--ct-steps", "2", "--batch", "4", "--per-class", "2", "--cd-batch", "3", "--cd-target", "online",
            "--cd-mu0", "0.9"]
    assert recipe.main(argv) == 0
    cd = json.loads(torch.load(tmp_path / "run" / "cd" / "state.pt", weights_only=True)["config"])
    assert (cd["batch"], cd["target"], cd["mu0"]) == (3, "online", 0.9)
    report = (tmp_path / "run" / "report.md").read_text()
    for row in ("| teacher | Heun (18 levels) |", "| cd | one-step |", "| cd | two-step |", "| ct | one-step |",
                "| one-step recognised |", "| Heun recognised |", "shipped as digits.safetensors: "):
        assert row in report, row
    ship = tmp_path / "ship"
    assert recorded_kind(ship / "digits.safetensors") == "consistency"
    assert recorded_kind(ship / "digits-teacher.safetensors") == "edm"
    def shipped():  # tensors and metadata (safetensors orders the metadata differently from one write to another)
        from safetensors import safe_open

        files = {}
        for path in sorted(ship.glob("*.safetensors")):
            with safe_open(path, framework="pt") as fh:
                files[path.name] = (fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()})
        return files

    first = shipped()
    assert recipe.main(argv) == 0
    assert "nothing to train" in capsys.readouterr().out
    again = shipped()
    assert set(again) == set(first) == {"digits.safetensors", "digits-teacher.safetensors"}
    for name, (metadata, tensors) in first.items():
        assert again[name][0] == metadata and all(torch.equal(again[name][1][k], t) for k, t in tensors.items())
