"""Checkpoint formats: key round trips, save/load of every format bitwise, diffusers' own folders, the
command line, and every kind of bad file."""

import os
import pickle

import pytest
import torch
from reference_models import diffusers_unet, randomize_

import cmfast
from cmfast.outputs import RECORD
from cmfast.cli import main
from cmfast.models import PRESETS, CheckpointError, UNet, keymap

NAME = "test_imagenet"
CONFIG = PRESETS[NAME].unet


@pytest.fixture
def model(gen):
    return randomize_(UNet(CONFIG), gen).eval()


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["test_imagenet", "test_lsun", "cd_imagenet64_l2", "ct_cat256"])
def test_key_round_trip(name):
    config = PRESETS[name].unet
    with torch.device("meta"):
        state = UNet(config).state_dict()
    there = keymap.openai_to_diffusers(state, config)
    with torch.device("meta"):
        assert there.keys() == diffusers_unet(name, device="meta").state_dict().keys()
    back = keymap.diffusers_to_openai(there, config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}


def test_key_round_trip_keeps_values(model):
    state = model.state_dict()
    assert_same_state(keymap.diffusers_to_openai(keymap.openai_to_diffusers(state, CONFIG), CONFIG), state)


@pytest.mark.parametrize("dest", ["model.pt", "model.safetensors", "diffusers_folder"])
def test_save_and_load_back_bitwise(model, tmp_path, dest):
    path = cmfast.save(model, tmp_path / dest)
    config = NAME if dest.endswith(".pt") else None  # a .pt records no config and heads of 16 are not inferable
    loaded = cmfast.load(path, config=config)
    assert loaded.config == CONFIG
    assert_same_state(loaded.state_dict(), model.state_dict())
    # nothing else left behind (the record of what cmfast wrote aside, which --force reads)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != RECORD) == [dest]


def test_loads_a_folder_written_by_diffusers(tmp_path, gen):
    ref = diffusers_unet(NAME, gen)
    ref.save_pretrained(tmp_path / "ref")
    ours = cmfast.load(tmp_path / "ref")
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t, y = torch.tensor([10.0, -500.0]), torch.tensor([3, 9])
    with torch.no_grad():
        want, got = ref(x, t, class_labels=y).sample, ours(x, t, y)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_infers_the_config_of_a_released_architecture(tmp_path):
    with torch.device("meta"):
        state = UNet(PRESETS["ct_bedroom256"].unet).state_dict()
    model = cmfast.load({k: torch.zeros(v.shape) for k, v in state.items()}, device="meta")
    assert model.config == PRESETS["ct_bedroom256"].unet


def test_save_refuses_to_overwrite(model, tmp_path):
    path = cmfast.save(model, tmp_path / "m.pt")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="exists"):
        cmfast.save(model, path)
    assert path.read_bytes() == before


def test_convert_command(model, tmp_path, capsys):
    src = cmfast.save(model, tmp_path / "m.safetensors")
    assert main(["convert", str(src), str(tmp_path / "folder")]) == 0
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "back.pt")]) == 0
    assert_same_state(cmfast.load(tmp_path / "back.pt", config=NAME).state_dict(), model.state_dict())
    assert main(["convert", str(src), str(tmp_path / "back.pt")]) == 2
    assert "exists" in capsys.readouterr().err


# ---- bad files -----------------------------------------------------------------------------------------------


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_a_pickle_carrying_code(tmp_path):
    path = tmp_path / "evil.pt"
    with path.open("wb") as fh:
        pickle.dump({"weight": RunsCode()}, fh)
    with pytest.raises(CheckpointError, match="refused"):
        cmfast.load(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(model, tmp_path, suffix):
    path = cmfast.save(model, tmp_path / f"m{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        cmfast.load(path, config=NAME)


def test_mismatches_are_listed_together(model):
    state = dict(model.state_dict())
    del state["out.2.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["middle_block.1.qkv.weight"] = torch.zeros(5, 5, 1, 1)
    with pytest.raises(CheckpointError) as e:
        cmfast.load(state, config=NAME)
    text = str(e.value)
    assert "missing keys (1):\n    out.2.bias" in text
    assert "unexpected keys (1):\n    extra.weight" in text
    assert "middle_block.1.qkv.weight: file (5, 5, 1, 1), model (192, 64, 1, 1)" in text
    assert "config: UNetConfig(model_channels=32" in text


def test_other_bad_sources(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        cmfast.load(tmp_path / "missing.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="needs config.json"):
        cmfast.load(tmp_path / "empty_dir")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        cmfast.load({"a": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        cmfast.load({}, config="nope")
    with pytest.raises(CheckpointError, match="cannot infer the U-Net config"):
        cmfast.load({"a.weight": torch.zeros(1)})


def test_convert_to_pt_says_what_it_cannot_record(model, tmp_path, capsys):
    src = cmfast.save(model, tmp_path / "m.safetensors")  # heads 16 wide: a .pt cannot say so
    assert main(["convert", str(src), str(tmp_path / "m.pt")]) == 0
    assert "would not give back num_head_channels=16: read it with --num-head-channels 16" in capsys.readouterr().err
    assert cmfast.load(tmp_path / "m.pt").config.num_head_channels == 64  # a plain load: the released models' 64
    back = cmfast.load(tmp_path / "m.pt", num_head_channels=16)
    assert back.config == CONFIG
    assert main(["convert", str(tmp_path / "m.pt"), str(tmp_path / "again.safetensors"), "--num-head-channels",
                 "16"]) == 0
    assert cmfast.load(tmp_path / "again.safetensors").config == CONFIG
    with pytest.raises(ValueError, match="num_head_channels: 8 given, but the source records 16"):
        cmfast.load(src, num_head_channels=8)
