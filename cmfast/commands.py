"""`cmfast sample` and `cmfast edit`: argument handling, batching with per-sample seeds, progress, files.
Every output is checked before any work starts and written atomically at the end, so a failed run leaves
nothing behind."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from . import editing, images, masks, pretrained, sampling, schedules


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def consistency_levels(args, model: pretrained.Model, default_steps: int) -> list[float]:
    """--ts/--grid, or --steps (the tuned schedule for two steps where the checkpoint has one)."""
    if args.ts is not None:
        if args.steps is not None:
            raise ValueError("--steps and --ts: give one or the other")
        return schedules.sigmas_from_indices(_ints(args.ts, "--ts"), args.grid or 40).tolist()
    steps = default_steps if args.steps is None else args.steps
    if steps == 2 and model.name in schedules.TWO_STEP and args.grid is None:
        return schedules.two_step_sigmas(model.name).tolist()
    grid = args.grid or 40
    return schedules.sigmas_from_indices(schedules.evenly_spaced_indices(steps, grid), grid).tolist()


def check_labels(model: pretrained.Model, given: list[int] | None) -> None:
    n_classes = model.unet.config.num_classes
    if given and n_classes is None:
        raise ValueError("class labels: this model is unconditional")
    bad = [v for v in given or [] if not 0 <= v < n_classes]
    if bad:
        raise ValueError(f"class labels: labels must lie in [0, {n_classes}), got {bad}")


def labels_for(model: pretrained.Model, indices, gens, given: list[int] | None, device) -> torch.Tensor | None:
    """Class labels: the given list, cycled over the sample indices, or one drawn from each sample's generator."""
    n_classes = model.unet.config.num_classes
    if n_classes is None:
        return None
    if given:
        return torch.tensor([given[i % len(given)] for i in indices], device=device)
    return torch.cat([torch.randint(n_classes, (1,), generator=g, device=g.device) for g in gens]).to(device)


def run_sample(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.num < 1 or args.batch < 1:
        raise ValueError(f"--num and --batch: expected positive counts, got {args.num} and {args.batch}")
    out = Path(args.out)
    npz, png = out / "samples.npz", out / "grid.png"
    images.check_writable([npz, png], args.force)
    device = _device(args.device)
    model = pretrained.find(args.checkpoint, device=device, dtype=args.precision)
    given = _ints(args.class_labels, "--class-labels") if args.class_labels else None
    check_labels(model, given)
    if model.kind == "edm":
        levels = schedules.karras_sigmas(args.steps or 40).tolist()
        run = sampling.sample_heun
    else:
        levels = consistency_levels(args, model, default_steps=1)
        run = sampling.sample
    size, channels = model.unet.config.image_size, model.unet.config.in_channels
    results, all_labels = [], []
    with tqdm(total=args.num, unit="img", desc=f"{model.name}: {len(levels)} level(s)") as bar:
        for start in range(0, args.num, args.batch):
            indices = range(start, min(start + args.batch, args.num))
            gens = sampling.generators_for(args.seed, indices)
            y = labels_for(model, indices, gens, given, device)
            x = levels[0] * sampling.randn((len(indices), channels, size, size), gens, device)
            results.append(images.to_uint8(run(model.denoiser, x, levels, y=y, generator=gens)))
            if y is not None:
                all_labels.append(y.cpu().numpy())
            bar.update(len(indices))
    arr = np.concatenate(results)
    labels = np.concatenate(all_labels).astype(np.int64) if all_labels else None
    images.save_npz(npz, arr, labels)
    images.save_png(png, images.grid(arr))
    print(f"wrote {npz} ({arr.shape[0]} images, {len(levels)} network call(s) each) and {png}")
    return 0


def _check_size(name: str, image: torch.Tensor, sizes: tuple[int, ...]) -> None:
    h, w = image.shape[-2:]
    if h != w or h not in sizes:
        raise ValueError(f"{name}: expected a square image of {' or '.join(map(str, sizes))} px, got {w}x{h}")


def run_edit(args: argparse.Namespace) -> int:
    out = Path(args.out)
    result_png, compare_png = out / f"{args.task}.png", out / f"{args.task}_before_after.png"
    images.check_writable([result_png, compare_png], args.force)
    device = _device(args.device)
    model = pretrained.find(args.checkpoint, device=device, dtype=args.precision)
    if model.kind != "consistency":
        raise ValueError(f"checkpoint: editing needs a consistency model, {model.name} is an EDM teacher")
    size = model.unet.config.image_size
    gens = sampling.generators_for(args.seed, [0])
    given = [args.class_label] if args.class_label is not None else None
    check_labels(model, given)
    y = labels_for(model, [0], gens, given, device)
    den = model.denoiser
    kw = {"y": y, "generator": gens}
    if args.task == "interpolate":
        z0 = sampling.randn((1, 3, size, size), sampling.generators_for(args.seed, [0]), device)
        z1 = sampling.randn((1, 3, size, size), sampling.generators_for(args.seed, [1]), device)
        frames = editing.interpolate(den, z0, z1, np.linspace(0, 1, args.frames), y=y)[:, 0]
        strip = images.grid(images.to_uint8(frames), columns=args.frames)
        images.save_png(result_png, strip)
        images.save_png(compare_png, strip)
        print(f"wrote {result_png} ({args.frames} frames)")
        return 0
    if args.image is None:
        raise ValueError(f"--image: the {args.task} task needs an input image")
    image = images.load_image(args.image).to(device)
    if args.task == "superres":
        _check_size("--image", image, (size, size // args.factor))
        low = image if image.shape[-1] != size else torch.nn.functional.avg_pool2d(image, args.factor)
        before = torch.nn.functional.interpolate(low, scale_factor=args.factor, mode="nearest")
        result = editing.super_resolve(den, low, consistency_levels(args, model, 39), factor=args.factor, **kw)
    else:
        _check_size("--image", image, (size,))
        if args.task == "inpaint":
            mask = masks.from_spec(args.mask, size).to(device)
            before = editing.Pixels(mask.expand_as(image)).erase(image)
            result = editing.inpaint(den, image, mask, consistency_levels(args, model, 39), **kw)
        elif args.task == "colorize":
            before = editing.Luminance().erase(image)
            result = editing.colorize(den, image, consistency_levels(args, model, 39), **kw)
        elif args.task == "stroke":
            levels = schedules.karras_sigmas((args.steps or 2) + 1, sigma_max=args.sigma).tolist()[:-1]
            before = image
            result = editing.stroke_guided(den, image, levels, **kw)
        else:  # denoise
            before = image
            if args.add_noise:
                before = image + args.sigma * sampling.randn(image.shape, gens, device)
            result = editing.denoise(den, before, args.sigma, y=y)
    original = image if image.shape[-1] == size else before
    pair = images.to_uint8(torch.cat([before.clamp(-1, 1), original, result]))
    images.save_png(result_png, images.to_uint8(result)[0])
    images.save_png(compare_png, images.grid(pair, columns=3))
    print(f"wrote {result_png} and {compare_png} (input as edited | original | result)")
    return 0
