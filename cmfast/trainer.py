"""A training run: the loop of cmfast.training's losses with Adam, an EMA of the weights, checkpoints written
atomically every few hundred steps (the EMA weights as model.safetensors with openai key names, loadable by
cmfast.load; the whole state as state.pt for resuming), and a progress bar with the loss."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import training
from .backends import use_backend
from .consistency import Denoiser
from .models import CheckpointError, UNet, UNetConfig, load
from .models.checkpoint import recorded_kind, stage
from .outputs import Outputs

OUTPUTS = ("state.pt", "model.safetensors")


@dataclass(frozen=True)
class TrainConfig:
    method: str = "ct"  # ct | cd (needs teacher) | edm (trains a teacher)
    steps: int = 2000
    batch: int = 128
    lr: float = 2e-4
    seed: int = 0
    distance: str = "pseudo_huber"  # l2 | l1 | pseudo_huber (| lpips in the API, with your network)
    # doubling (improved CT: s0 -> s1) | paper (N(k) of the paper, s0=2, s1=150) | fixed (N = s0 throughout: the
    # paper's CD, N = 18 or 40; with CD from a digits teacher the doubling schedule peaked near N = 160 and fell after)
    n_schedule: str = "doubling"
    s0: int = 10
    s1: int = 1280
    index_sampling: str = "lognormal"  # lognormal (improved CT) | uniform (paper)
    weighting: str = "inverse_gap"  # inverse_gap: 1 / (t_{n+1} - t_n) (improved CT) | uniform
    # online: stop-gradient of the online network (improved CT) | ema: an EMA of it, decay mu(k) of the paper's CT,
    # or, with a fixed N, mu0 throughout (the paper's CD)
    target: str = "online"
    mu0: float = 0.95
    lr_schedule: str = "constant"  # constant | cosine (from lr down to zero at the last step)
    ema_decay: float = 0.995
    checkpoint_every: int = 250
    teacher: str | None = None  # CD: path of the EDM teacher's checkpoint
    # CD: where the student starts: "teacher" (its weights, as the reference's CD) or "fresh" (the reference's
    # initialisation). On the digits, 1000 steps of a fresh student (lr 2e-4) gave smoother one-step samples than
    # a teacher-started one (lr 1e-4): tools/digits_model.py uses fresh.
    init: str = "teacher"

    def __post_init__(self):
        checks = {"method": training.METHODS, "distance": ("l2", "l1", "pseudo_huber"),
                  "n_schedule": ("doubling", "paper", "fixed"), "index_sampling": ("lognormal", "uniform"),
                  "weighting": ("inverse_gap", "uniform"), "target": ("online", "ema"), "init": ("teacher", "fresh"),
                  "lr_schedule": ("constant", "cosine")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.method == "cd" and not self.teacher:
            raise ValueError("teacher: consistency distillation needs an EDM teacher checkpoint")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay: expected a number in [0, 1), got {self.ema_decay!r}")
        if not isinstance(self.s0, int) or self.s0 < 2 or (self.n_schedule != "fixed" and self.s1 < self.s0):
            raise ValueError(f"s0, s1: expected 2 <= s0 <= s1 grid points, got {self.s0}, {self.s1}")
        if not 0 <= self.mu0 < 1:
            raise ValueError(f"mu0: expected a number in [0, 1), got {self.mu0!r}")
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps, batch: expected positive, got {self.steps}, {self.batch}")

    def learning_rate(self, step: int) -> float:
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps))
        return self.lr

    def target_ema(self, step: int) -> float:
        if self.n_schedule == "fixed":
            return self.mu0
        return training.paper_target_ema(step, self.steps, mu0=self.mu0)

    def n_points(self, step: int) -> int:
        if self.n_schedule == "fixed":
            return self.s0
        if self.n_schedule == "paper":
            return training.paper_n(step, self.steps, self.s0, self.s1)
        return training.doubling_n(step, self.steps, self.s0, self.s1)


def _read_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, a pickle carrying code
        raise CheckpointError(f"{path}: cannot be read as a training state (corrupt or not cmfast's?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    needed = {"config", "step", "model", "ema", "optimizer"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(f"{path}: not a cmfast training state (expected the entries {', '.join(sorted(needed))})")
    return state


def _teacher(path, unet_config: UNetConfig | None) -> UNet:
    """CD's teacher: an EDM network; of the student's architecture `unet_config` when given (the student starts
    from its weights)."""
    from .pretrained import locate

    file = Path(path) if Path(path).exists() else locate(str(path))  # a path, or a name ("digits-teacher")
    if file is not None and recorded_kind(file) == "consistency":
        raise ValueError(f"teacher: {path} is a consistency model; distillation needs an EDM teacher "
                         "(cmfast train --method edm)")
    teacher = load(path).eval()
    # dropout aside: the reference's teachers train with it, their students without
    if unet_config is not None and teacher.config.replace(dropout=unet_config.dropout) != unet_config:
        raise ValueError(f"teacher: {path} is another architecture than the student's ({teacher.config} against "
                         f"{unet_config}); the student starts from the teacher's weights, so they must match")
    return teacher


def reference_init_(unet: UNet) -> UNet:
    """Zero the layers the reference zero-initialises (each ResBlock's last conv, attention proj_out, out.2)."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
                module.weight.zero_()
                module.bias.zero_()
    return unet


class Run:
    """One training run in a folder; constructing it resumes from the folder's state.pt when there is one."""

    def __init__(self, folder, config: TrainConfig, unet_config: UNetConfig, data_x, data_y, *,
                 overwrite: bool | str = False):
        """overwrite: for a folder without a run to resume, whether its model.safetensors may be replaced (False:
        refused; "own": when cmfast wrote it, the command line's --force; True: always)."""
        self.folder, self.config = Path(folder), config
        self.overwrite = overwrite
        self.x, self.y = data_x, data_y
        torch.manual_seed(config.seed)
        self.model = reference_init_(UNet(unet_config)).train()
        self.ema = UNet(unet_config).eval()
        self.ema.load_state_dict(self.model.state_dict())
        self.target = None
        if config.target == "ema" and config.method != "edm":
            self.target = UNet(unet_config).eval()
            self.target.load_state_dict(self.model.state_dict())
        self.teacher = None
        if config.method == "cd":
            self.teacher = Denoiser(_teacher(config.teacher, unet_config if config.init == "teacher" else None),
                                    kind="edm")
            if config.init == "teacher":  # as the reference's CD: student, EMA and target start as the teacher
                for module in (self.model, self.ema, self.target):
                    if module is not None:
                        module.load_state_dict(self.teacher.unet.state_dict())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.step = 0
        state_file = self.folder / "state.pt"
        if state_file.exists():
            self._resume(_read_state(state_file))
        with self._outputs():  # checked now, before any training: writable, free, nothing of the user's replaced
            pass

    def _outputs(self) -> Outputs:
        # resuming: the run's own files; a fresh run: what `overwrite` allows
        return Outputs(self.folder, OUTPUTS, replace=True if self.step else self.overwrite, what="run folder")

    def _resume(self, state: dict) -> None:
        saved = json.loads(state["config"]) if isinstance(state.get("config"), str) else None
        if isinstance(saved, dict):  # a field added since the run began has its default, which is what ran
            saved = {f.name: saved.get(f.name, f.default) for f in dataclasses.fields(TrainConfig)} | saved
        if saved != dataclasses.asdict(self.config):
            raise ValueError(f"config: {self.folder} holds a run with other settings ({saved}); use another folder")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if self.target is not None:
            self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def save(self, out: Outputs | None = None) -> None:
        """A checkpoint: state.pt and model.safetensors, written as a set (into `out` when a block holds the folder)."""
        if out is None:
            with self._outputs() as out:
                return self.save(out)
        state = {"config": json.dumps(dataclasses.asdict(self.config)), "step": self.step,
                 "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict()}
        if self.target is not None:
            state["target"] = self.target.state_dict()
        torch.save(state, out.stage("state.pt"))
        stage(self.ema, out, "model.safetensors", kind="edm" if self.config.method == "edm" else "consistency")
        out.commit()

    def loss(self, gen: torch.Generator) -> torch.Tensor:
        c = self.config
        idx = torch.randint(0, self.x.shape[0], (c.batch,), generator=gen)
        x0, y = self.x[idx], (self.y[idx] if self.model.config.num_classes else None)
        if c.method == "edm":
            return training.edm_loss(Denoiser(self.model, kind="edm"), x0, y, gen)
        levels = training.draw_levels(c.batch, c.n_points(self.step), gen,
                                      lognormal=c.index_sampling == "lognormal", inverse_gap=c.weighting == "inverse_gap")
        noise = torch.randn(x0.shape, generator=gen)
        online = Denoiser(self.model)
        target = online if self.target is None else Denoiser(self.target)
        return training.consistency_loss(online, target, x0, y, levels, noise, c.distance, teacher=self.teacher)

    def train(self, until: int | None = None, progress: bool = True) -> float:
        """Train to step `until` (default: the configured total); returns the last loss."""
        from tqdm.auto import tqdm

        c = self.config
        until = c.steps if until is None else min(until, c.steps)
        last = float("nan")
        # The reference backends throughout: the weights then depend only on torch, the seed and the thread count,
        # not on which compiled kernels this install has.
        with use_backend("reference"), self._outputs() as out, tqdm(
                total=until, initial=self.step, disable=not progress, desc=f"{c.method} training") as bar:
            while self.step < until:
                gen = training.step_generator(c.seed, self.step)
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))  # dropout, if any
                loss = self.loss(gen)
                for group in self.optimizer.param_groups:
                    group["lr"] = c.learning_rate(self.step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if self.target is not None:
                    training.ema_update(self.target, self.model, c.target_ema(self.step))
                training.ema_update(self.ema, self.model, c.ema_decay)
                self.step += 1
                last = loss.detach().item()
                bar.set_postfix(loss=f"{last:.4f}", N=c.n_points(self.step - 1) if c.method != "edm" else "-")
                bar.update(1)
                if self.step % c.checkpoint_every == 0 or self.step == until:
                    self.save(out)
        return last


__all__ = ["Run", "TrainConfig", "reference_init_"]
