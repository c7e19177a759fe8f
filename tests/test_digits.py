"""The built-in digits model's commands: train (resumable), evaluate, demo, and sampling with no checkpoint."""

import numpy as np
import pytest
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


def test_evaluate_reports_samples_beside_real_digits_and_noise(trained, capsys):
    assert main(["evaluate", str(trained / "model.safetensors"), "--num-per-class", "3"]) == 0
    out = capsys.readouterr().out
    for row in ("held-out real digits", "uniform noise", "one-step samples", "two-step samples"):
        assert row in out


def test_demo_writes_its_pictures(trained, tmp_path):
    assert main(["demo", str(trained / "model.safetensors"), "--out", str(tmp_path)]) == 0
    for name, rows in (("samples.png", 2), ("edits.png", 5)):
        with Image.open(tmp_path / name) as img:
            assert img.mode == "RGB" and img.size[0] > 10 * 16 * 4 and img.size[1] > rows * 16 * 4
    assert main(["demo", str(trained / "model.safetensors"), "--out", str(tmp_path)]) == 2  # no overwrite


def test_sample_with_no_checkpoint_uses_the_built_in_model(tmp_path):
    assert main(["sample", "--num", "10", "--class-labels", "0,1,2,3,4,5,6,7,8,9", "--out", str(tmp_path)]) == 0
    with np.load(tmp_path / "samples.npz") as f:
        assert f["arr_0"].shape == (10, 16, 16, 1) and f["arr_1"].tolist() == list(range(10))


def test_the_preset_name_digits_is_the_built_in_model(tmp_path):
    assert main(["sample", "digits", "--num", "2", "--seed", "3", "--out", str(tmp_path / "named")]) == 0
    assert main(["sample", "--num", "2", "--seed", "3", "--out", str(tmp_path / "default")]) == 0
    with np.load(tmp_path / "named" / "samples.npz") as named, np.load(tmp_path / "default" / "samples.npz") as default:
        assert np.array_equal(named["arr_0"], default["arr_0"])


def test_the_built_in_model_draws_the_digits_it_is_asked_for():
    """One-step samples of the shipped weights, 10 per class, labelled by the real-digit classifier: `cmfast evaluate`
    reports ~90% on 50 per class; far fewer means the weights or the network's numbers changed."""
    import torch

    from cmfast import commands, digits

    model = pretrained.find(None)
    scorer = digits.Scorer(digits.load(model.unet.config.image_size))
    with torch.no_grad():
        images, labels = commands.digits_samples(model, 10, 0, [80.0])
    recognised, _ = scorer.score(images, labels)
    assert recognised >= 0.8, f"{recognised:.0%} of one-step samples recognised as asked"



def test_the_built_in_model_in_bf16_mode_draws_what_fp32_does(capsys):
    """The reference's bf16 mixed mode (what `--precision bf16` loads) on trained weights: the same seeds give
    one-step samples within a few 8-bit levels of fp32's, on average a fraction of one (measured: 0.001 mean,
    0.02 max on [-1, 1])."""
    import torch

    from cmfast import commands

    half = pretrained.find(None, dtype="bf16")
    assert half.unet.input_blocks[0][0].weight.dtype == torch.bfloat16
    with torch.no_grad():
        want, _ = commands.digits_samples(pretrained.find(None), 5, 0, [80.0])
        got, _ = commands.digits_samples(half, 5, 0, [80.0])
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
