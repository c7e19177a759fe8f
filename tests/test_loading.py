"""Loading as a drop-in user expects: the built-in model's and presets' names in Python as on the command line, a
diffusers pipeline folder, labels as a list, inference-only parameters, and files that follow the umask."""

import json
import os
import stat

import pytest
import torch
from reference_models import diffusers_unet, randomize_

import cmfast
from cmfast import images, pretrained
from cmfast.outputs import RECORD, Outputs
from cmfast.models import PRESETS, UNet

NAME = "test_imagenet"


@pytest.fixture
def model(gen):
    return randomize_(UNet(PRESETS[NAME].unet), gen).eval()


def test_load_the_built_in_model_by_name():
    if not pretrained.BUILT_IN.is_file():
        pytest.skip("this checkout has no built-in model")
    by_name, by_path = cmfast.load("digits"), cmfast.load(pretrained.BUILT_IN)
    assert by_name.config == by_path.config
    for (k, a), (_, b) in zip(by_name.state_dict().items(), by_path.state_dict().items()):
        assert torch.equal(a, b), k


def test_load_a_preset_by_name(model, tmp_path, monkeypatch):
    cmfast.save(model, tmp_path / f"{NAME}.safetensors")
    monkeypatch.setenv("CMFAST_CHECKPOINTS", str(tmp_path))
    loaded = cmfast.load(NAME)
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_preset_whose_weights_are_not_here(tmp_path, monkeypatch):
    monkeypatch.setenv("CMFAST_CHECKPOINTS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # and no ~/.cache/cmfast/checkpoints
    with pytest.raises(FileNotFoundError, match="cd_imagenet64_l2 is a known preset but its weights are not here"):
        cmfast.load("cd_imagenet64_l2")
    with pytest.raises(cmfast.CheckpointError, match="no such file"):
        cmfast.load("no_such_model_or_file")


def test_load_a_pipeline_folder_takes_its_unet(tmp_path, gen):
    ref = diffusers_unet(NAME, gen)
    ref.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "ConsistencyModelPipeline"}))
    ours = cmfast.load(tmp_path / "pipe")
    x, t, y = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([10.0, -50.0]), torch.tensor([3, 9])
    with torch.no_grad():
        want, got = ref(x, t, class_labels=y).sample, ours(x, t, y)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_labels_as_a_list(model, gen):
    x, t = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([10.0, 20.0])
    with torch.no_grad():
        assert torch.equal(model(x, t, [3, 9]), model(x, t, torch.tensor([3, 9])))
        assert torch.equal(model(x, t, (3, 9)), model(x, t, torch.tensor([3, 9])))
        with pytest.raises(ValueError, match="y: expected integer class labels"):
            model(x, t, ["a", "b"])
        with pytest.raises(ValueError, match="y: expected integer labels"):
            model(x, t, [0.5, 1.5])


def test_loaded_parameters_are_inference_only(model, tmp_path, gen):
    path = cmfast.save(model, tmp_path / "m.safetensors")
    loaded = cmfast.load(path)
    assert not any(p.requires_grad for p in loaded.parameters())
    x, t, y = torch.randn(1, 3, 16, 16, generator=gen), torch.tensor([10.0]), torch.tensor([3])
    assert not loaded(x, t, y).requires_grad  # outside torch.no_grad() too: the fused paths, no graph
    trainee = randomize_(UNet(PRESETS[NAME].unet), gen).train()
    assert all(p.requires_grad for p in cmfast.swap(trainee).parameters())  # it replaces a model being trained
    assert not any(p.requires_grad for p in cmfast.swap(trainee.eval()).parameters())


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with Outputs(tmp_path, ["a.png", "a.npz"]) as out:
            images.save_png(out.stage("a.png"), torch.zeros(4, 4, 3, dtype=torch.uint8).numpy())
            images.save_npz(out.stage("a.npz"), torch.zeros(1, 4, 4, 3, dtype=torch.uint8).numpy())
            out.commit()
    finally:
        os.umask(old)
    for name in ("a.png", "a.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != RECORD) == ["a.npz", "a.png"]


@pytest.mark.parametrize("move, precision", [(lambda m: m.to(torch.bfloat16), "bf16"), (lambda m: m.half(), "fp16"),
                                             (lambda m: m.bfloat16(), "bf16"), (lambda m: m.to("cpu", torch.float16), "fp16")],
                         ids=["to-bf16", "half", "bfloat16", "to-cpu-fp16"])
def test_dtype_moves_select_the_precision_mode(model, gen, move, precision):
    x, t, y = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([10.0, 20.0]), torch.tensor([3, 9])
    with torch.no_grad():
        want = model(x, t, y)
        moved = move(model)
        assert moved is model and model.precision == precision and model.dtype == {"bf16": torch.bfloat16,
                                                                                   "fp16": torch.float16}[precision]
        assert model.time_embed[0].weight.dtype == torch.float32  # the mixed mode's fp32 parts stay fp32
        got = model(x, t, y)
        assert got.dtype == torch.float32
        assert float((got - want).abs().max() / want.abs().max()) <= 5e-2
        assert model.float().precision == "fp32" and model.dtype == torch.float32
        model(x, t, y)
    with pytest.raises(TypeError, match="not float64"):
        model.double()


def test_swapped_diffusers_model_moves_and_reports_its_dtype(gen):
    ref = diffusers_unet(NAME, gen)
    swapped = cmfast.swap(ref)
    assert swapped.dtype == torch.float32 and swapped.device == torch.device("cpu")
    assert swapped.to(torch.bfloat16) is swapped and swapped.dtype == torch.bfloat16
    x = torch.randn(1, 3, 16, 16, generator=gen).bfloat16()
    with torch.no_grad():
        out = swapped(x, torch.tensor(10.0), torch.tensor([3])).sample
    assert out.dtype == torch.bfloat16
    assert swapped.half().dtype == torch.float16 and swapped.float().dtype == torch.float32
