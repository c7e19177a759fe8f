"""A hostile but fair user: every case asserts the exact outcome (the error named, the exit status) and that no
file was lost, changed or left behind. Writing: --force, two jobs into one folder, a kill at each write, an
interrupt, an unwritable destination. Reading: images, masks, sigmas, labels, checkpoints, configs, environment."""

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

import cmfast
from cmfast import images
from cmfast.cli import main
from cmfast.distributed import SHARDS
from cmfast.outputs import JOURNAL, PART, RECORD, Outputs

SAMPLE = ["--num", "3", "--batch", "2", "--seed", "4"]
SET = {"samples.npz", "grid.png", RECORD}


def snapshot(folder: Path) -> dict:
    """Every file under folder with its bytes (what must not change)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*argv, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cmfast", *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def clean(checkpoint, tmp_path_factory) -> dict:
    """The files of an uninterrupted `sample` run, to compare the others with."""
    out = tmp_path_factory.mktemp("clean") / "out"
    assert main(["sample", checkpoint, *SAMPLE, "--out", str(out)]) == 0
    return snapshot(out)


def same_set(out: Path, clean: dict) -> None:
    files = snapshot(out)
    assert set(files) == SET, sorted(files)  # no temporary, no journal
    for name in ("samples.npz", "grid.png"):
        assert files[name] == clean[name], name


# ---- convert --force: only cmfast's own files, never the source or the folder ------------------------------------

def test_convert_into_the_current_folder_keeps_everything_else(checkpoint, tmp_path):
    src = tmp_path / "a.safetensors"
    src.write_bytes(Path(checkpoint).read_bytes())
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    run = cli("convert", "a.safetensors", ".", "--force", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before  # the source and the user's file untouched
    assert set(after) - set(before) == {"config.json", "diffusion_pytorch_model.safetensors", RECORD}


def test_convert_force_replaces_only_what_cmfast_wrote(checkpoint, tmp_path, capsys):
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "config.json").write_text('{"mine": true}')  # a file of the user's that has a model file's name
    (dst / "keep.bin").write_bytes(b"x")
    before = snapshot(dst)
    assert main(["convert", checkpoint, str(dst), "--force"]) == 2
    err = capsys.readouterr().err
    assert "config.json exists and is not a file cmfast wrote there" in err, err
    assert snapshot(dst) == before
    (dst / "config.json").unlink()
    assert main(["convert", checkpoint, str(dst)]) == 0
    assert main(["convert", checkpoint, str(dst)]) == 2  # exists, no --force
    assert "exists (--force replaces it)" in capsys.readouterr().err
    assert main(["convert", checkpoint, str(dst), "--force"]) == 0  # cmfast's own files: replaced
    assert (dst / "keep.bin").read_bytes() == b"x"


def test_convert_never_replaces_its_source(checkpoint, tmp_path, capsys):
    folder = tmp_path / "m"
    assert main(["convert", checkpoint, str(folder)]) == 0
    before = snapshot(folder)
    assert main(["convert", str(folder), str(folder), "--force"]) == 2
    assert "would replace an input of this command" in capsys.readouterr().err
    assert snapshot(folder) == before
    pt = tmp_path / "m.pt"
    assert main(["convert", checkpoint, str(pt)]) == 0
    assert main(["convert", str(pt), str(pt), "--force"]) == 2
    assert "would replace an input" in capsys.readouterr().err


def test_convert_into_a_file_or_an_impossible_folder(checkpoint, tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert main(["convert", checkpoint, str(tmp_path / "f"), "--force"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "mine"
    assert main(["convert", checkpoint, "/dev/null/sub/m.pt"]) == 2
    assert "cannot create it" in capsys.readouterr().err


# ---- train: no silent overwrite ---------------------------------------------------------------------------------

TRAIN = ["train", "--steps", "2", "--batch", "4", "--checkpoint-every", "1"]


def test_train_refuses_a_model_it_would_not_resume(checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"the user's model")
    assert main([*TRAIN, "--out", str(run), "--force"]) == 2  # --force: only cmfast's own files
    assert "model.safetensors exists and is not a file cmfast wrote" in capsys.readouterr().err
    assert main([*TRAIN, "--out", str(run)]) == 2
    assert "model.safetensors exists (--force replaces it)" in capsys.readouterr().err
    assert snapshot(run) == {"model.safetensors": b"the user's model"}


@pytest.mark.parametrize("argv, message", [
    (["--until", "-1"], "--until: expected a positive integer, got -1"),
    (["--checkpoint-every", "0"], "--checkpoint-every: expected a positive integer, got 0"),
    (["--threads", "0"], "--threads: expected a positive integer, got 0"),
    (["--model", "foo"], "--model: unknown preset 'foo'; known: "),
    (["--lr", "nan"], "--lr: expected a positive finite number, got nan"),
    (["--n-points", "1"], "--n-points: expected at least 2 noise levels, got 1"),
    (["--mu0", "1"], "--mu0: expected a decay in [0, 1), got 1.0"),
    (["--mu0", "nan"], "--mu0: expected a decay in [0, 1), got nan"),
    (["--n-schedule", "doubling", "--n-points", "2000"], "s0, s1: expected 2 <= s0 <= s1 grid points, got 2000, 1280"),
])
def test_train_bad_options(tmp_path, capsys, argv, message):
    assert main([*TRAIN, *argv, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_with_a_corrupt_state(tmp_path, capsys):
    (tmp_path / "state.pt").write_bytes(os.urandom(256))
    assert main([*TRAIN, "--out", str(tmp_path)]) == 2
    assert "state.pt: cannot be read as a training state" in capsys.readouterr().err


# ---- two jobs into one folder -----------------------------------------------------------------------------------

def test_a_job_writing_into_the_folder_blocks_a_second(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    with Outputs(out, ["samples.npz"]):  # a job running there now
        assert main(["sample", checkpoint, *SAMPLE, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another cmfast job is writing into this folder now" in err
    assert "sampling" not in err  # refused before any work
    assert not out.exists()


def test_two_sample_runs_at_once_leave_one_whole_set(checkpoint, tmp_path, clean):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "cmfast", "sample", checkpoint, *SAMPLE, "--out", str(out)]
    jobs = [subprocess.Popen([*argv[:-4], "--seed", seed, "--out", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for seed in ("4", "5")]
    codes = sorted(j.wait(timeout=300) for j in jobs)
    errors = "".join(j.stderr.read() for j in jobs)
    assert codes == [0, 2], errors  # one wrote, the other was refused (locked out, or found the files there)
    assert "another cmfast job" in errors or "samples.npz exists" in errors
    files = snapshot(out)
    assert set(files) == SET
    with np.load(out / "samples.npz") as f:  # grid.png and samples.npz come from the same run
        expected = images.grid(f["arr_0"])
    with Image.open(out / "grid.png") as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), expected)


# ---- a kill at each write, an interrupt, SIGTERM ------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    where, at, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    calls = [0]
    def counted(real):
        def call(*args, **kwargs):
            if where != "replace" or Path(args[1]).parent == out:
                calls[0] += 1
                if calls[0] == at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call
    if where == "replace":
        os.replace = counted(os.replace)
    else:  # in the middle of writing the first temporary
        np.savez = counted(np.savez)
    from cmfast.cli import main
    sys.exit(main(sys.argv[4:]))
""")


@pytest.mark.parametrize("where, at", [("savez", 1), ("replace", 1), ("replace", 2), ("replace", 3), ("replace", 4)],
                         ids=["writing", "journal", "first move", "second move", "record"])
def test_a_kill_at_each_write_loses_nothing(checkpoint, tmp_path, clean, capsys, where, at):
    """A SIGKILL (no cleanup runs) at each step of the commit; the next run in the folder completes or redoes the
    set: the folder ends with exactly the clean run's files."""
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLER, where, str(at), str(out), "sample", checkpoint, *SAMPLE,
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = set(snapshot(out)) if out.exists() else set()
    # what a kill may leave: the set, a journal, temporaries, finished shards (all taken up by the next run)
    assert all(n in SET | {JOURNAL} or Path(n).name.startswith(PART) or n.startswith(SHARDS) for n in left), left
    code = main(["sample", checkpoint, *SAMPLE, "--out", str(out)])
    # the journal's moves were done by the rerun (the set was complete): it finds the files there; else it wrote them
    assert code == (2 if where == "replace" and at > 1 else 0)
    same_set(out, clean)


def test_an_interrupt_between_the_two_files_leaves_nothing(checkpoint, tmp_path, clean, monkeypatch):
    out = tmp_path / "out"
    real = images.save_png

    def interrupted(path, image):
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "save_png", interrupted)  # after samples.npz was written
    with pytest.raises(KeyboardInterrupt):
        main(["sample", checkpoint, *SAMPLE, "--out", str(out)])
    left = snapshot(out)  # no half set: only the finished batches, hidden, for the rerun to take up
    assert left and all(n.startswith(SHARDS + "/shard-") for n in left), sorted(left)
    monkeypatch.setattr(images, "save_png", real)
    assert main(["sample", checkpoint, *SAMPLE, "--out", str(out)]) == 0  # the rerun is not refused
    same_set(out, clean)


def test_sigterm_cleans_up(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    script = ("import os, signal, sys, numpy as np\n"
              "def savez(*a, **k): os.kill(os.getpid(), signal.SIGTERM)\n"
              "np.savez = savez\nfrom cmfast.cli import main\nsys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", script, "sample", checkpoint, *SAMPLE, "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert snapshot(out) == {"mine.txt": b"x"}


def test_an_unwritable_destination_is_found_before_sampling(checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, message in (("/dev/null/out", "cannot create it"), (tmp_path / "file", "exists and is not a folder")):
        assert main(["sample", checkpoint, *SAMPLE, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "sampling" not in err, err
    assert (tmp_path / "file").read_text() == "x"


def test_edit_never_replaces_its_input_image(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sample", checkpoint, "--num", "1", "--out", str(tmp_path / "s")]) == 0
    out.mkdir()
    image = out / "inpaint.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    before = image.read_bytes()
    assert main(["edit", "inpaint", checkpoint, "--image", str(image), "--out", str(out), "--force"]) == 2
    assert "would replace an input" in capsys.readouterr().err
    assert image.read_bytes() == before


def test_api_overwrite_replaces_the_model_files_only(checkpoint, tmp_path):
    model = cmfast.load(checkpoint)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.md").write_text("mine")
    cmfast.save(model, folder)
    with pytest.raises(FileExistsError, match="config.json exists"):
        cmfast.save(model, folder)
    cmfast.save(model, folder, overwrite=True)
    assert (folder / "README.md").read_text() == "mine"


# ---- reading images, masks, options ---------------------------------------------------------------------------

def test_a_16_bit_png_keeps_its_values(tmp_path):
    levels = (np.arange(256).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(levels).save(tmp_path / "g16.png")
    got = images.load_image(tmp_path / "g16.png")
    want = torch.from_numpy(levels / 65535.0 * 2 - 1).float()
    assert got.shape == (1, 3, 16, 16)
    assert torch.allclose(got[0, 0], want, atol=1e-6) and torch.equal(got[0, 0], got[0, 2])


@pytest.mark.parametrize("kind, message", [
    ("float", "has floating-point pixels; cmfast reads 8-bit images and 16-bit grayscale"),
    ("text", "is not an image file"),
    ("truncated", "cannot be read (truncated or corrupt?)"),
    ("folder", "is a folder, not an image file"),
])
def test_bad_image_files(checkpoint, tmp_path, capsys, kind, message):
    path = tmp_path / "in.tif"
    if kind == "float":
        Image.fromarray(np.zeros((16, 16), np.float32)).save(path)
    elif kind == "text":
        path.write_text("not an image")
    elif kind == "truncated":
        Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(tmp_path / "in.png")
        path.write_bytes((tmp_path / "in.png").read_bytes()[:60])
    else:
        path.mkdir()
    assert main(["edit", "colorize", checkpoint, "--image", str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def image16(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("argv, message", [
    *[(["denoise", "--sigma", v], f"--sigma: expected a noise level in (0, 80.0], got {float(v)}")
      for v in ("-1", "nan", "inf", "1e30")],
    *[(["superres", "--factor", v], f"--factor: expected an integer >= 2 that divides the model's image size 16 "
                                    f"(2, 4, 8), got {v}") for v in ("0", "-2", "32", "3")],
    (["interpolate", "--frames", "0"], "--frames: expected at least 2 (the two ends), got 0"),
])
def test_bad_edit_options(checkpoint, image16, tmp_path, capsys, argv, message):
    task, *rest = argv
    assert main(["edit", task, checkpoint, "--image", image16, *rest, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def denoiser(checkpoint):
    return cmfast.Denoiser(cmfast.load(checkpoint))


def test_masks_and_images_out_of_range_are_refused(denoiser):
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    y = torch.tensor([1])
    for bad in (torch.full((16, 16), 8.0), torch.full((16, 16), 0.5)):
        with pytest.raises(ValueError, match=r"mask: expected values 0 \(to fill\) and 1 \(to keep\)"):
            cmfast.editing.inpaint(denoiser, image, bad, [80.0], y=y)
    with pytest.raises(ValueError, match=r"image: expected pixel values in \[-1, 1\] \(the models' range\), got \[-3\.\d+, 3\.\d+\]"):
        cmfast.editing.inpaint(denoiser, image * 4, torch.ones(16, 16), [80.0], y=y)
    with pytest.raises(ValueError, match="noisy: holds NaN or infinite values"):
        cmfast.editing.denoise(denoiser, image * float("nan"), 1.0, y=y)


@pytest.mark.parametrize("sigmas, message", [
    ("80", "expected a sequence of noise levels"),
    (80.0, "expected a sequence of noise levels"),
    (torch.ones(2, 2), "got a 2-D array"),
    ([1e30], r"levels must be <= sigma_max = 80.0"),
    ([80.0, "x"], "expected numbers"),
    ([float("nan")], "positive, strictly decreasing"),
])
def test_bad_sigmas(denoiser, sigmas, message):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=message):
        cmfast.sample(denoiser, x, sigmas, y=torch.tensor([1]))


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf"), 1e30, "x"])
def test_bad_denoise_sigma(denoiser, sigma):
    with pytest.raises(ValueError, match="sigma: expected a"):
        cmfast.editing.denoise(denoiser, torch.zeros(1, 3, 16, 16), sigma, y=torch.tensor([1]))


def test_labels_of_any_integer_type(denoiser):
    unet, x, t = denoiser.unet, torch.randn(3, 3, 16, 16), torch.tensor([1.0, 2.0, 3.0])
    with torch.no_grad():
        want = unet(x, t, torch.tensor([1, 7, 9]))
        for dtype in (torch.uint8, torch.int8, torch.int32):
            assert torch.equal(unet(x, t, torch.tensor([1, 7, 9], dtype=dtype)), want)


# ---- reading checkpoints, configs, the environment ----------------------------------------------------------

@pytest.mark.parametrize("damage, message", [
    ("nan", r"weight tensor\(s\) hold NaN or infinite values"),
    ("int", "expected floating-point weights, got torch.int64"),
])
def test_damaged_weights_are_refused_at_load(checkpoint, tmp_path, capsys, damage, message):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    state = load_file(checkpoint)
    with safe_open(checkpoint, framework="pt") as fh:
        metadata = fh.metadata()
    key = "out.2.weight"
    state[key] = state[key] * float("nan") if damage == "nan" else state[key].long()
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(cmfast.models.CheckpointError, match=message):
        cmfast.load(tmp_path / "bad.safetensors")
    assert main(["sample", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "out")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_random_bytes_are_not_called_a_pickle(tmp_path):
    (tmp_path / "r.pt").write_bytes(os.urandom(4096))
    with pytest.raises(cmfast.models.CheckpointError, match="cannot be read as a torch checkpoint"):
        cmfast.load(tmp_path / "r.pt")


def diffusers_folder(checkpoint, tmp_path) -> Path:
    folder = tmp_path / "m"
    cmfast.save(cmfast.load(checkpoint), folder)
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda text: text[:-5], r"config.json: not valid JSON"),
    (lambda text: text.replace('"layers_per_block": 1', '"layers_per_block": "two"'),
     r"config.json: diffusers config: layers_per_block='two' is not supported by cmfast \(supported: a positive int\)"),
    (lambda text: text.replace('"block_out_channels"', '"block_out_channels_"'),
     r"config.json: diffusers config: missing field\(s\) block_out_channels"),
])
def test_malformed_diffusers_config(checkpoint, tmp_path, capsys, edit, message):
    folder = diffusers_folder(checkpoint, tmp_path)
    config = folder / "config.json"
    config.write_text(edit(config.read_text()))
    with pytest.raises(cmfast.models.CheckpointError, match=message):
        cmfast.load(folder)
    assert main(["sample", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize("metadata, message", [
    ("not json", "bad cmfast_config metadata"),
    ('{"model_channels": "x", "num_res_blocks": 1, "channel_mult": [1]}', "model_channels: expected a positive int"),
    ('{"model_channels": 32, "num_res_blocks": 1, "channel_mult": [1], "colour": 1}', "fields of UNetConfig"),
])
def test_bad_recorded_config(checkpoint, tmp_path, metadata, message):
    from safetensors.torch import load_file, save_file

    save_file(load_file(checkpoint), str(tmp_path / "m.safetensors"), metadata={"cmfast_config": metadata})
    with pytest.raises(cmfast.models.CheckpointError, match=message):
        cmfast.load(tmp_path / "m.safetensors")


def test_load_on_a_missing_cuda_device(checkpoint):
    with pytest.raises(ValueError, match="no CUDA device here|numbered from 0"):
        cmfast.load(checkpoint, device="cuda:99")


@pytest.mark.parametrize("value, message", [
    ("garbage", "CMFAST_BACKEND='garbage': expected one of cuda, triton, cpu, torch, reference"),
    ("unknown_op=cpu", "CMFAST_BACKEND='unknown_op=cpu': unknown op 'unknown_op'"),
    ("group_norm=cpu,x", "CMFAST_BACKEND='group_norm=cpu,x': expected a name or op=name pairs"),
])
def test_bad_backend_environment(monkeypatch, capsys, value, message):
    from cmfast import backends

    monkeypatch.setenv("CMFAST_BACKEND", value)
    backends._environment.cache_clear()
    try:
        assert main(["info"]) == 2
        assert message in capsys.readouterr().err
    finally:
        monkeypatch.delenv("CMFAST_BACKEND")
        backends._environment.cache_clear()


def test_mask_files(tmp_path):
    from cmfast import masks

    (tmp_path / "m.png").write_text("no image")
    with pytest.raises(ValueError, match="mask: .*m.png is not an image file"):
        masks.load(tmp_path / "m.png", 16)
    wide = np.zeros((16, 16), np.uint16)
    wide[:, :8] = 65535  # the left half known, in a 16-bit file
    Image.fromarray(wide).save(tmp_path / "m16.png")
    assert torch.equal(masks.load(tmp_path / "m16.png", 16), torch.from_numpy((wide > 0).astype(np.float32)))


def test_bad_recorded_kind(checkpoint, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(checkpoint, framework="pt") as fh:
        metadata = fh.metadata()
    save_file(load_file(checkpoint), str(tmp_path / "m.safetensors"), metadata={**metadata, "cmfast_kind": "gan"})
    assert main(["sample", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "out")]) == 2
    assert "bad cmfast_kind metadata 'gan' (expected consistency or edm)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- convert --weights-dtype and train's teacher ----------------------------------------------------------------

def test_convert_to_half_weights(checkpoint, tmp_path):
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        dst = tmp_path / f"m-{dtype}.safetensors"
        assert main(["convert", checkpoint, str(dst), "--weights-dtype", dtype]) == 0
        assert 0.45 < dst.stat().st_size / Path(checkpoint).stat().st_size < 0.55
        want, got = cmfast.load(checkpoint).state_dict(), cmfast.load(dst).state_dict()
        for key in want:  # loads as fp32 again, each weight rounded once to the half type
            assert got[key].dtype == torch.float32 and torch.equal(got[key], want[key].to(torch_dtype).float()), key


def test_convert_refuses_weights_a_half_type_cannot_hold(checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(checkpoint, framework="pt") as fh:
        metadata = fh.metadata()
    state = load_file(checkpoint)
    state["out.2.bias"] = torch.full_like(state["out.2.bias"], 1e6)
    save_file(state, str(tmp_path / "big.safetensors"), metadata=metadata)
    assert main(["convert", str(tmp_path / "big.safetensors"), str(tmp_path / "out" / "m.safetensors"),
                 "--weights-dtype", "fp16"]) == 2
    assert "weights_dtype: out.2.bias has values beyond what fp16 holds; store it in fp32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the destination is touched
    with pytest.raises(SystemExit):
        main(["convert", checkpoint, str(tmp_path / "m.safetensors"), "--weights-dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()
    with pytest.raises(ValueError, match="weights_dtype: expected one of fp32, fp16, bf16, got 'half'"):
        cmfast.save(cmfast.load(checkpoint), tmp_path / "n.safetensors", weights_dtype="half")
    assert not (tmp_path / "n.safetensors").exists()


def test_distillation_refuses_a_teacher_it_cannot_start_from(checkpoint, tmp_path, capsys):
    """The student starts from the teacher's weights: a consistency model or another architecture is refused
    before any training, and the run folder is not made."""
    argv = [*TRAIN, "--method", "cd", "--out", str(tmp_path / "run")]
    assert main([*argv, "--teacher", checkpoint]) == 2  # the test_imagenet preset: not the digits network
    assert "teacher: " in (err := capsys.readouterr().err) and "another architecture than the student's" in err
    from cmfast.models import PRESETS, UNet

    consistency = cmfast.save(UNet(PRESETS["digits"].unet), tmp_path / "c.safetensors", kind="consistency")
    assert main([*argv, "--teacher", str(consistency)]) == 2
    assert "is a consistency model; distillation needs an EDM teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--teacher", checkpoint, "--init", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
