"""Training: the schedules and distances at known values, one CT and one CD step lowering the loss, gradients
through the ops, and a resumed run equal to an uninterrupted one."""

import math

import pytest
import torch
from reference_models import randomize_

import cmfast
from cmfast import training
from cmfast.models import PRESETS, UNet
from cmfast.trainer import Run, TrainConfig

TINY = PRESETS["test_lsun"].unet.replace(num_res_blocks=1, image_size=8, channel_mult=(1, 2), attention_resolutions=(4,))


def test_paper_schedules_at_known_values():
    assert training.paper_n(0, 1000) == 2 and training.paper_n(1000, 1000) == 151
    assert training.paper_target_ema(0, 1000) == pytest.approx(0.95)
    assert training.paper_target_ema(1000, 1000) == pytest.approx(math.exp(2 * math.log(0.95) / 151))
    ns = [training.paper_n(k, 1000) for k in range(0, 1001, 50)]
    assert ns == sorted(ns)


def test_doubling_schedule():
    total = 800
    ns = [training.doubling_n(k, total) for k in range(total)]
    assert ns[0] == 11 and ns[-1] == 1281 and set(ns) == {11, 21, 41, 81, 161, 321, 641, 1281}


def test_lognormal_index_probabilities():
    sigmas = cmfast.karras_sigmas(200).flip(0)
    p = training.lognormal_index_probs(sigmas)
    assert p.sum().item() == pytest.approx(1.0) and (p >= 0).all()
    log_mid = (sigmas[:-1] * sigmas[1:]).sqrt().log().double()
    assert abs((p * log_mid).sum().item() - (-1.1)) < 0.3  # centred on P_mean in log sigma


def test_distances_at_known_values():
    a, b = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    b[0] = 1.0
    assert training.distance(a, b, "l2").tolist() == [1.0, 0.0]
    assert training.distance(a, b, "l1").tolist() == [1.0, 0.0]
    c = 0.00054 * 2
    assert training.distance(a, b, "pseudo_huber").tolist() == pytest.approx([math.sqrt(4 + c * c) - c, 0.0])
    with pytest.raises(ValueError, match="lpips needs"):
        training.distance(a, b, "lpips")


def _data(gen, n=16):
    return torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1, torch.zeros(n, dtype=torch.long)


def _teacher(tmp_path, gen) -> str:
    return str(cmfast.save(randomize_(UNet(TINY), gen), tmp_path / "teacher.safetensors", kind="edm"))


@pytest.mark.parametrize("method", ["ct", "cd", "edm"])
def test_one_step_lowers_the_loss(method, tmp_path, gen):
    teacher = _teacher(tmp_path, gen) if method == "cd" else None
    x, y = _data(gen)
    run = Run(tmp_path / "run", TrainConfig(method=method, steps=5, batch=16, lr=1e-4, teacher=teacher), TINY, x, y)
    randomize_(run.model, gen)
    losses = []
    for _ in range(2):
        loss = run.loss(training.step_generator(0, 0))  # the same batch, levels and noise both times
        losses.append(loss.item())
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
    assert losses[1] < losses[0]


def test_gradients_through_the_ops(gen):
    """With autograd on, the ops run their differentiable references: the gradients are torch's own."""
    w, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    x0, s0 = torch.randn(2, 64, 4, 4, generator=gen), torch.randn(2, 64, generator=gen)
    weights = torch.randn(2, 64, 4, 4, generator=gen)
    x, scale = x0.clone().requires_grad_(), s0.clone().requires_grad_()
    (cmfast.ops.group_norm(x, w, b, scale=scale, silu=True) * weights).sum().backward()
    x2, s2 = x0.clone().requires_grad_(), s0.clone().requires_grad_()
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x2, 32, w, b) * (1 + s2[..., None, None]))
    (ref * weights).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5) and torch.allclose(scale.grad, s2.grad, atol=1e-5)


def test_the_teacher_loss_falls(tmp_path, gen):
    """80 EDM steps on two images (the recipe's first stage at small size): the loss over fixed draws of batch,
    levels and noise ends well below where it started."""
    x, y = _data(gen, 8)
    x = x[:2].repeat(4, 1, 1, 1)  # two images: a denoiser can learn them in a few dozen steps
    run = Run(tmp_path / "run", TrainConfig(method="edm", steps=80, batch=8, lr=2e-3), TINY, x, y)

    def probe():  # the mean over fixed draws of batch, levels and noise
        with torch.no_grad():
            return sum(run.loss(training.step_generator(7, k)).item() for k in range(8)) / 8

    before = probe()
    run.train(progress=False)
    after = probe()
    assert after < 0.8 * before, (before, after)


def test_distillation_starts_from_the_teacher(tmp_path, gen):
    """As the reference's CD (init="teacher", the default): the student, its EMA and its target are the teacher's
    weights at step 0; init="fresh" starts them as CT does, whatever the teacher."""
    teacher = _teacher(tmp_path, gen)
    x, y = _data(gen)
    want = cmfast.load(teacher).state_dict()
    for target in ("online", "ema"):
        run = Run(tmp_path / target, TrainConfig(method="cd", steps=2, batch=4, teacher=teacher, target=target),
                  TINY, x, y)
        for module in filter(None, (run.model, run.ema, run.target)):
            for key, value in module.state_dict().items():
                assert torch.equal(value, want[key]), key
    fresh = Run(tmp_path / "fresh", TrainConfig(method="cd", steps=2, batch=4, teacher=teacher, init="fresh"), TINY, x, y)
    ct = Run(tmp_path / "ct", TrainConfig(method="ct", steps=2, batch=4), TINY, x, y)
    for (key, a), b in zip(fresh.model.state_dict().items(), ct.model.state_dict().values()):
        assert torch.equal(a, b), key
    assert not all(torch.equal(a, want[k]) for k, a in fresh.model.state_dict().items())


@pytest.mark.parametrize("method", ["ct", "cd", "edm"])
def test_resumed_run_equals_uninterrupted(method, tmp_path, gen):
    x, y = _data(gen)
    teacher = _teacher(tmp_path, gen) if method == "cd" else None
    config = TrainConfig(method=method, steps=4, batch=8, checkpoint_every=2, teacher=teacher)
    whole = Run(tmp_path / "whole", config, TINY, x, y)
    whole.train(progress=False)
    part = Run(tmp_path / "part", config, TINY, x, y)
    part.train(until=2, progress=False)
    resumed = Run(tmp_path / "part", config, TINY, x, y)  # a new process would do exactly this
    assert resumed.step == 2
    resumed.train(progress=False)
    for a, b in zip(whole.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    loaded = cmfast.load(tmp_path / "part" / "model.safetensors")  # the checkpoint cmfast.load takes unchanged
    for a, b in zip(loaded.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_a_run_refuses_other_settings(tmp_path, gen):
    x, y = _data(gen)
    Run(tmp_path / "r", TrainConfig(steps=2, batch=4), TINY, x, y).train(progress=False)
    with pytest.raises(ValueError, match="other settings"):
        Run(tmp_path / "r", TrainConfig(steps=2, batch=8), TINY, x, y)
    with pytest.raises(ValueError, match="teacher"):
        TrainConfig(method="cd")


def test_fixed_discretisation_keeps_n():
    from cmfast.trainer import TrainConfig

    config = TrainConfig(method="ct", steps=100, n_schedule="fixed", s0=40)
    assert {config.n_points(k) for k in range(0, 100, 7)} == {40}
    assert TrainConfig(method="ct", steps=100).n_points(99) > TrainConfig(method="ct", steps=100).n_points(0)


def test_cosine_learning_rate_reaches_zero_at_the_last_step(tmp_path, gen):
    config = TrainConfig(method="ct", steps=8, batch=4, lr=1e-3, lr_schedule="cosine")
    assert config.learning_rate(0) == pytest.approx(1e-3) and config.learning_rate(4) == pytest.approx(5e-4)
    assert config.learning_rate(8) == pytest.approx(0, abs=1e-12)
    assert TrainConfig(method="ct", lr=1e-3).learning_rate(7) == 1e-3
    x, y = _data(gen)
    run = Run(tmp_path / "r", config, TINY, x, y)
    seen = []
    step = run.optimizer.step
    run.optimizer.step = lambda: (seen.append(run.optimizer.param_groups[0]["lr"]), step())
    run.train(progress=False)
    assert seen == pytest.approx([config.learning_rate(k) for k in range(8)])


@pytest.mark.parametrize("schedule, want", [("fixed", lambda k: 0.9), ("paper", lambda k: training.paper_target_ema(
    k, 3, mu0=0.9))])
def test_target_ema_decay(schedule, want, tmp_path, gen):
    """With a fixed N the target's EMA decays by mu0 at every step (the paper's CD); else the paper's CT schedule."""
    x, y = _data(gen)
    config = TrainConfig(method="ct", steps=3, batch=4, target="ema", mu0=0.9, n_schedule=schedule, s0=10 if
                         schedule == "fixed" else 2, s1=150)
    run = Run(tmp_path / schedule, config, TINY, x, y)
    for k in range(3):
        before = {n: p.detach().clone() for n, p in run.target.named_parameters()}
        run.train(until=k + 1, progress=False)
        model = dict(run.model.named_parameters())
        for name, p in run.target.named_parameters():
            mu = want(k)
            torch.testing.assert_close(p, mu * before[name] + (1 - mu) * model[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mu0"):
        TrainConfig(target="ema", mu0=1.0)
