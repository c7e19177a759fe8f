"""torch.compile of the U-Net on the CPU keeps the measured ways: each convolution (and each convolution of an
upsampled image) is one registered op that runs its module with the choice recorded for its class of call, and the
compiled forward takes the recorded layout. Nothing is timed while tracing or running the compiled graph."""

import copy
import gc

import pytest
import torch

import cmfast
from cmfast import tuning
from cmfast.models import PRESETS
from cmfast.models import conv as conv_module


@pytest.fixture
def tune(monkeypatch, tmp_path):
    """Measurement on in a cache of the test's own; every measurement picks the last candidate (never the fixed
    order's), so a compiled forward that ignored the records would run other ways than the eager one."""
    monkeypatch.setenv("CMFAST_TUNE", "1")
    monkeypatch.setenv("CMFAST_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "TINY_ELEMENTS", 0)

    def last(device, candidates, run, default, prepare=None):
        tuning.stats["timed"] += 1
        name = candidates[-1]
        if prepare is not None:
            prepare(name)
        return name, run(name), {c: 0.0 if c == name else 1.0 for c in candidates}

    monkeypatch.setattr(tuning, "measure", last)
    tuning.forget()
    yield
    tuning.forget()


def choices_log(monkeypatch):
    """Every choice made, as (op, key, name)."""
    log = []
    choose = tuning.choose

    def logged(op, device, key, *args, **kwargs):
        name, out = choose(op, device, key, *args, **kwargs)
        log.append((op, key, name))
        return name, out

    monkeypatch.setattr(tuning, "choose", logged)
    return log


def random_unet(preset, precision, gen):
    unet = cmfast.UNet(PRESETS[preset].unet).eval().set_precision(precision)
    with torch.no_grad():
        for p in unet.parameters():
            p.requires_grad_(False)
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.dim() > 1 else 3))
    return unet.set_channels_last(None)


CASES = [  # preset, precision, batch, backend: a scale-shift model, and one whose time embedding goes in the bias
    ("test_imagenet", "fp32", 2, "aot_eager"),
    ("test_lsun", "bf16", 1, "aot_eager"),
    ("test_lsun", "fp32", 1, "inductor"),  # Inductor plans its buffers from the ops' declared output layouts
]


@pytest.mark.parametrize("preset, precision, batch, backend", CASES)
def test_compiled_forward_runs_the_recorded_choices(tune, monkeypatch, gen, preset, precision, batch, backend):
    unet = random_unet(preset, precision, gen)
    c = unet.config
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=gen)
    t = torch.rand(batch, generator=gen) * 40
    y = None if c.num_classes is None else torch.randint(c.num_classes, (batch,), generator=gen)
    with torch.no_grad():
        unet(x, t, y)  # measures (the rigged measurement: the last candidate everywhere) and records
        log = choices_log(monkeypatch)
        want = unet(x, t, y)
        eager = [entry for entry in log if entry[0] != "layout"]
        log.clear()
        timed = tuning.stats["timed"]
        got = torch.compile(unet, fullgraph=True, dynamic=False, backend=backend)(x, t, y)
    assert tuning.stats["timed"] == timed  # traced and run: nothing timed
    names = {name for _, _, name in eager}
    assert "conv" not in names and "upsample" not in names  # the records are not the fixed order's ways
    # the same ways for the same classes of call (layout and shapes in the keys); Inductor may reorder independent ops
    assert sorted(map(repr, log)) == sorted(map(repr, eager))
    assert any(not key[1] for op, key, _ in eager if op == "conv2d")  # channels_last: the recorded layout
    tol = 1e-5 if precision == "fp32" else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_compiled_graph_holds_the_registered_ops(tune, gen):
    unet = random_unet("test_lsun", "fp32", gen)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    x, t = torch.randn(1, 3, 32, 32, generator=gen), torch.tensor([3.0])
    with torch.no_grad():
        torch.compile(unet, fullgraph=True, backend=capture)(x, t)
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert "cmfast.conv2d.default" in targets and "cmfast.upsample_conv.default" in targets
    assert not any("conv" in target and not target.startswith("cmfast") for target in targets)


def test_nothing_recorded_gives_the_fixed_order(monkeypatch, tmp_path, gen):
    monkeypatch.setenv("CMFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("CMFAST_TUNE", "1")
    tuning.forget()
    unet = random_unet("test_lsun", "bf16", gen)
    log = choices_log(monkeypatch)
    x, t = torch.randn(1, 3, 32, 32, generator=gen), torch.tensor([3.0])
    timed = tuning.stats["timed"]
    with torch.no_grad():
        got = torch.compile(unet, fullgraph=True, backend="aot_eager")(x, t)
        assert tuning.stats["timed"] == timed
        convs = [name for op, _, name in log if op in ("conv2d", "upsample_conv")]
        assert convs and all(name in ("conv", "upsample") for name in convs)
        assert all(not key[1] for op, key, _ in log if op == "conv2d")  # channels_last, bf16's fixed layout
        with tuning.no_timing():
            want = unet._forward(x, t, None, channels_last=True)
    torch.testing.assert_close(got, want.contiguous(), rtol=0, atol=0)
    tuning.forget()


def test_a_copy_has_its_own_handle_and_a_dead_module_is_a_clear_error():
    conv = conv_module.Conv2d(8, 8, 3, padding=1)
    twin = copy.deepcopy(conv)
    a, b = conv_module.handle(conv), conv_module.handle(twin)
    assert a != b and conv_module.module_of(a) is conv and conv_module.module_of(b) is twin
    assert conv_module.handle(conv) == a
    del twin
    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists"):
        conv_module.module_of(b)


@pytest.mark.parametrize("strict", [False, True])
def test_an_export_holds_no_module_handles(tune, gen, strict):
    """An exported program outlives the process: plain convolutions in NCHW, as the reference runs them."""
    unet = random_unet("test_lsun", "fp32", gen)
    x, t = torch.randn(1, 3, 32, 32, generator=gen), torch.tensor([3.0])
    with torch.no_grad():
        unet(x, t)  # records choices (the rigged measurement: channels_last and the non-default ways)
        program = torch.export.export(unet, (x, t), strict=strict)
        want = unet._forward(x, t, None, channels_last=False)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.conv2d.default" in targets and not any(target.startswith("cmfast.") and "conv" in target
                                                        for target in targets)
    assert not any(node.kwargs.get("memory_format") == torch.channels_last for node in program.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, t), want, rtol=1e-5, atol=1e-5)

