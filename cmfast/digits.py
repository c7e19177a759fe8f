"""scikit-learn's bundled handwritten digits (1,797 images, 8x8, ten classes; no download) as training data, and
the quality score of a digits model: the share of its samples a classifier trained on real digits recognises
as the requested class, and a Frechet distance to held-out real digits in a fixed feature space, beside the
same figures for held-out real digits and for pure noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import sampling, schedules

SPLIT_SEED = 0  # the train / held-out split, fixed so that scores are comparable between runs
HELD_OUT = 0.25


@dataclass
class Digits:
    train_x: torch.Tensor  # (N, 1, size, size) in [-1, 1]
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _require_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ImportError("the digits data and scorer (cmfast train, evaluate, demo) need scikit-learn: "
                          "pip install 'cmfast[digits]'") from None


def load(size: int = 16) -> Digits:
    _require_sklearn()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32))[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(data.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(y)), test_size=HELD_OUT, random_state=SPLIT_SEED, stratify=y.numpy())
    return Digits(x[tr], y[tr], x[te], y[te])


def _features(x: torch.Tensor) -> np.ndarray:
    """Images at any size -> the 8x8 grid of the original data, 0..16, flattened (64 features)."""
    x = x.float().mean(1, keepdim=True)
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return ((x.clamp(-1, 1) + 1) * 8).flatten(1).cpu().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return max(0.0, float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)))  # not -0.00 from rounding


class Scorer:
    """A logistic-regression classifier and a 16-d PCA feature space, both fitted on the real training digits."""

    def __init__(self, data: Digits):
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        train = _features(data.train_x)
        self.classifier = LogisticRegression(max_iter=5000).fit(train, data.train_y.numpy())
        self.pca = PCA(16, random_state=SPLIT_SEED).fit(train)
        self.reference = self.pca.transform(_features(data.test_x))

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """(share recognised as `labels`, Frechet distance to the held-out real digits)."""
        feats = _features(images)
        accuracy = float((self.classifier.predict(feats) == labels.cpu().numpy()).mean())
        return accuracy, frechet_distance(self.pca.transform(feats), self.reference)


def high_frequency(images: torch.Tensor) -> float:
    """The mean |Laplacian| of images at 16x16 (bilinear from other sizes), on [-1, 1]: how grainy they are. The real
    digits (8x8 originals resized to 16x16) set the scale a smooth sample should have."""
    x = images.float().mean(1, keepdim=True)
    if x.shape[-1] != 16:
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    return float(F.conv2d(x.clamp(-1, 1), kernel).abs().mean())


# ---- a model's samples and their scores --------------------------------------------------------------------------

TEACHER_LEVELS = 18  # Heun over an 18-point Karras grid (35 network calls) for an EDM teacher of the digits


def two_step(model) -> list[float]:
    """The model's tuned two-step schedule, else the built-in digits model's."""
    return schedules.two_step_sigmas(model.name if model.name in schedules.TWO_STEP else "digits").tolist()


def samplers(model) -> list[tuple[str, list[float]]]:
    """What evaluate samples a model with: (row name, noise levels). A consistency model in one and two steps; an
    EDM teacher (model.kind "edm") with Heun over TEACHER_LEVELS levels."""
    if model.kind == "edm":
        return [(f"Heun samples ({TEACHER_LEVELS} levels)", schedules.karras_sigmas(TEACHER_LEVELS).tolist())]
    return [("one-step samples", [float(schedules.SIGMA_MAX)]), ("two-step samples", two_step(model))]


def network_calls(model, levels) -> int:
    """Calls of one sampling run: a Heun step costs two, except the last (to sigma 0)."""
    return 2 * len(levels) - 1 if model.kind == "edm" else len(levels)


def samples(model, per_class: int, seed: int, levels, callback=None) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class samples of every class of `model` (a cmfast.pretrained.Model), each from its own seeded
    generator: the same seed gives the same images whatever else is sampled."""
    n_classes = model.unet.config.num_classes
    indices = range(n_classes * per_class)
    gens = sampling.generators_for(seed, indices)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    c, size = model.unet.config.in_channels, model.unet.config.image_size
    x = levels[0] * sampling.randn((len(indices), c, size, size), gens, "cpu")
    run = sampling.sample_heun if model.kind == "edm" else sampling.sample
    with torch.no_grad():
        return run(model.denoiser, x, levels, y=labels, generator=gens, callback=callback), labels


@dataclass(frozen=True)
class Score:
    recognised: float  # share of the images the classifier reads as their class
    frechet: float  # to the held-out real digits
    high_frequency: float  # mean |Laplacian|, relative to the real training digits'


def evaluate(model, per_class: int = 50, seed: int = 0, callback=None) -> dict[str, Score]:
    """Scores of the model's samples (rows of samplers(model)) beside held-out real digits, real training digits
    and uniform noise. callback(calls) after each network call."""
    data = load(model.unet.config.image_size)
    scorer = Scorer(data)
    smooth = high_frequency(data.train_x)
    n = min(per_class * 10, len(data.test_y))
    noise = torch.rand(n, *data.test_x.shape[1:], generator=torch.Generator().manual_seed(seed)) * 2 - 1
    rows = {}
    for name, images, labels in (("held-out real digits", data.test_x, data.test_y),
                                 ("real digits (train)", data.train_x[:n], data.train_y[:n]),
                                 ("uniform noise", noise, data.test_y[:n])):
        rows[name] = Score(*scorer.score(images, labels), high_frequency(images) / smooth)
    for name, levels in samplers(model):
        last = len(levels) - 1

        def counted(info, last=last):
            if callback is not None:
                callback(2 if model.kind == "edm" and info["i"] < last else 1)

        images, labels = samples(model, per_class, seed, levels, callback=counted)
        rows[name] = Score(*scorer.score(images, labels), high_frequency(images) / smooth)
    return rows
