"""`cmfast sample` and `cmfast edit`: argument handling, batching with per-sample seeds, progress, files.
Every output is checked before any work starts and written atomically at the end, so a failed run leaves
nothing behind."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from . import editing, images, masks, outputs, pretrained, sampling, schedules
from .devices import parse_device


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None


def resolve_device(name: str | None) -> torch.device:
    """--device: a name torch knows whose device is here (cpu, cuda, cuda:1); None: cuda when there is one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(name, "--device", meta=False)


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


def _outputs(args, names, *inputs) -> outputs.Outputs:
    """--out and --force as cmfast.outputs takes them: --force replaces only cmfast's own earlier outputs, and never
    one of the command's input files."""
    return outputs.Outputs(args.out, names, replace="own" if args.force else False,
                           protect=[p for p in inputs if p is not None and Path(p).exists()])


def run_sample(args: argparse.Namespace) -> int:
    """One process, or every process of a torchrun job (cmfast.distributed: shards, resumable, the same images)."""
    from . import distributed

    if args.num < 1 or args.batch < 1:
        raise ValueError(f"--num and --batch: expected positive counts, got {args.num} and {args.batch}")
    device = distributed.process_device(resolve_device(args.device))
    model = pretrained.find(args.checkpoint, device=device, dtype=args.precision)
    given = _ints(args.class_labels, "--class-labels") if args.class_labels else None
    check_labels(model, given)
    if model.kind == "edm":
        levels = schedules.karras_sigmas(args.steps or 40).tolist()
    else:
        levels = consistency_levels(args, model, default_steps=1)
    written = distributed.sample_to_folder(model, args.out, num=args.num, batch=args.batch, seed=args.seed,
                                           sigmas=levels, class_labels=given, force=args.force,
                                           cuda_graph=args.cuda_graph)
    if written is not None:
        print(f"wrote {written} ({args.num} images, {len(levels)} network call(s) each) and "
              f"{written.with_name('grid.png')}")
    return 0


def _check_size(name: str, image: torch.Tensor, sizes: tuple[int, ...]) -> None:
    h, w = image.shape[-2:]
    if h != w or h not in sizes:
        raise ValueError(f"{name}: expected a square image of {' or '.join(map(str, sizes))} px, got {w}x{h}")


def _calls_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=" network calls", desc=desc)


def _edit_progress(task: str):
    """A progress bar of the edit's network calls (the editing functions report each through their callback)."""
    from tqdm.auto import tqdm

    return tqdm(unit=" network calls", desc=task, disable=task in ("denoise", "interpolate"))


def run_edit(args: argparse.Namespace) -> int:
    names = [f"{args.task}.png", f"{args.task}_before_after.png"]
    with _outputs(args, names, args.checkpoint, args.image) as out:
        message = _edit(args, out, *names)
        out.commit()
    print(message)
    return 0


def _check_edit_options(args, size: int) -> None:
    if args.task == "superres" and (args.factor < 2 or size % args.factor or args.factor >= size):
        divisors = [f for f in range(2, size) if size % f == 0]
        raise ValueError(f"--factor: expected an integer >= 2 that divides the model's image size {size} "
                         f"({', '.join(map(str, divisors[:6]))}{', ...' if len(divisors) > 6 else ''}), got {args.factor}")
    if args.task == "interpolate" and args.frames < 2:
        raise ValueError(f"--frames: expected at least 2 (the two ends), got {args.frames}")
    if args.task in ("denoise", "stroke") and not (math.isfinite(args.sigma) and 0 < args.sigma <= sampling.SIGMA_MAX):
        raise ValueError(f"--sigma: expected a noise level in (0, {sampling.SIGMA_MAX}], got {args.sigma}")


def _edit(args: argparse.Namespace, out: outputs.Outputs, result_png: str, compare_png: str) -> str:
    device = resolve_device(args.device)
    model = pretrained.find(args.checkpoint, device=device, dtype=args.precision)
    if model.kind != "consistency":
        raise ValueError(f"checkpoint: editing needs a consistency model, {model.name} is an EDM teacher")
    size = model.unet.config.image_size
    _check_edit_options(args, size)
    gens = sampling.generators_for(args.seed, [0])
    given = [args.class_label] if args.class_label is not None else None
    check_labels(model, given)
    y = sampling.labels_for(model.unet.config.num_classes, [0], gens, given, device)
    if y is not None and given is None:
        print(f"class label: {int(y[0])} (drawn from --seed {args.seed}; --class-label chooses one)")
    den = model.denoiser
    bar = _edit_progress(args.task)
    kw = {"y": y, "generator": gens, "callback": lambda info: bar.update(1)}
    if args.task == "interpolate":
        shape = (1, model.unet.config.in_channels, size, size)
        z0 = sampling.randn(shape, sampling.generators_for(args.seed, [0]), device)
        z1 = sampling.randn(shape, sampling.generators_for(args.seed, [1]), device)
        frames = editing.interpolate(den, z0, z1, np.linspace(0, 1, args.frames), y=y)[:, 0]
        bar.close()
        strip = images.grid(images.to_uint8(frames), columns=args.frames)
        images.save_png(out.stage(result_png), strip)
        images.save_png(out.stage(compare_png), strip)
        return f"wrote {out.path(result_png)} ({args.frames} frames)"
    if args.image is None:
        raise ValueError(f"--image: the {args.task} task needs an input image")
    image = images.load_image(args.image, channels=model.unet.config.in_channels).to(device)
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
            result = editing.colorize(den, image, consistency_levels(args, model, 39), **kw)
            before = editing.Luminance().erase(image)
        elif args.task == "stroke":
            levels = schedules.karras_sigmas((args.steps or 2) + 1, sigma_max=args.sigma).tolist()[:-1]
            before = image
            result = editing.stroke_guided(den, image, levels, **kw)
        else:  # denoise
            before = image
            if args.add_noise:
                before = image + args.sigma * sampling.randn(image.shape, gens, device)
            result = editing.denoise(den, before, args.sigma, y=y)
    bar.close()
    original = image if image.shape[-1] == size else before
    pair = images.to_uint8(torch.cat([before.clamp(-1, 1), original, result]))
    images.save_png(out.stage(result_png), images.to_uint8(result)[0])
    images.save_png(out.stage(compare_png), images.grid(pair, columns=3))
    return f"wrote {out.path(result_png)} and {out.path(compare_png)} (input as edited | original | result)"


def _positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")


def run_train(args: argparse.Namespace) -> int:
    """Train on the bundled digits (the recipe of the built-in model is `make digits-model`)."""
    from . import digits
    from .models import PRESETS
    from .trainer import Run, TrainConfig

    _positive(args, "steps", "batch", "until", "threads", "checkpoint_every")
    if args.model not in PRESETS:
        raise ValueError(f"--model: unknown preset {args.model!r}; known: {', '.join(PRESETS)}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        raise ValueError(f"--lr: expected a positive finite number, got {args.lr}")
    if not 0 <= args.mu0 < 1:
        raise ValueError(f"--mu0: expected a decay in [0, 1), got {args.mu0}")
    if args.n_points is not None and args.n_points < 2:
        raise ValueError(f"--n-points: expected at least 2 noise levels, got {args.n_points}")
    start = {"doubling": 10, "paper": 2, "fixed": 40}[args.n_schedule] if args.n_points is None else args.n_points
    schedule = {"n_schedule": args.n_schedule, "s0": start, **({"s1": 150} if args.n_schedule == "paper" else {})}
    config = TrainConfig(method=args.method, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                         distance=args.distance, teacher=args.teacher, checkpoint_every=args.checkpoint_every,
                         ema_decay=args.ema_decay, init=args.init, lr_schedule=args.lr_schedule, target=args.target,
                         mu0=args.mu0, index_sampling=args.index_sampling, weighting=args.weighting, **schedule)
    unet_config = PRESETS[args.model].unet
    data = digits.load(unet_config.image_size)
    torch.set_num_threads(args.threads)
    run = Run(args.out, config, unet_config, data.train_x, data.train_y, overwrite="own" if args.force else False)
    until = config.steps if args.until is None else min(args.until, config.steps)
    if run.step >= until:
        print(f"{args.out} is at step {run.step} of {config.steps} already: nothing to train "
              f"({Path(args.out) / 'model.safetensors'} is unchanged)")
        return 0
    if run.step:
        print(f"resuming {args.out} at step {run.step} of {config.steps}")
    loss = run.train(until=until)
    print(f"wrote {Path(args.out) / 'model.safetensors'} (EMA weights, step {run.step}, last loss {loss:.4f})")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """The digits model's quality: recognised share and Frechet distance, beside real digits and noise."""
    from . import digits

    _positive(args, "num_per_class")
    model = pretrained.find(args.checkpoint, dtype=args.precision)
    if model.unet.config.num_classes != 10 or model.unet.config.image_size not in (8, 16, 32):
        raise ValueError("checkpoint: evaluate scores class-conditional digits models (10 classes)")
    calls = sum(digits.network_calls(model, levels) for _, levels in digits.samplers(model))
    with _calls_bar(calls, f"sampling {args.num_per_class * 10} digits") as bar:
        rows = digits.evaluate(model, args.num_per_class, args.seed, callback=bar.update)
    print(f"{'':<26}{'recognised as asked':>20}{'Frechet distance':>18}{'high-frequency energy':>23}")
    for name, score in rows.items():
        print(f"{name:<26}{score.recognised:>19.1%}{score.frechet:>18.2f}{score.high_frequency:>21.2f}x")
    print("(classifier: logistic regression on the real training digits; distance: 16-d PCA of them, to the "
          "held-out quarter of the digits; high-frequency energy: mean |Laplacian| at 16x16, against the real "
          "training digits')")
    return 0


DEMO_ZOOM = 4  # nearest-neighbour: 16-pixel digits shown 64 pixels wide


def run_demo(args: argparse.Namespace) -> int:
    """What the built-in model does, as two labelled PNG files: a sample of every class in one and two steps, and
    an inpainting and a denoising example."""
    names = ["samples.png", "edits.png"]
    with _outputs(args, names, args.checkpoint) as out:
        shown = _demo(args, out)
        out.commit()
    print(f"wrote {out.path('samples.png')} (a sample of each digit: {', '.join(shown)}) and {out.path('edits.png')} "
          "(the bottom half inpainted, noise at sigma 0.5 removed)")
    return 0


def _demo(args: argparse.Namespace, out: outputs.Outputs) -> list[str]:
    from . import digits

    model = pretrained.find(args.checkpoint)
    data = digits.load(model.unet.config.image_size)  # first: a missing scikit-learn stops the demo before any work
    edit_levels = consistency_levels(args, model, 39)
    two_levels = digits.two_step(model)
    # the built-in model's pictures show its teacher too (with Heun: the sampler of the released edm_* models)
    teacher = pretrained.find("digits-teacher") if args.checkpoint is None and \
        pretrained.BUILT_INS["digits-teacher"].is_file() else None
    heun_levels = digits.samplers(teacher)[0][1] if teacher else []
    calls = 1 + len(two_levels) + len(edit_levels) + 1 + (digits.network_calls(teacher, heun_levels) if teacher else 0)
    bar = _calls_bar(calls, "demo")
    step = {"callback": lambda info: bar.update(1)}
    one, _ = digits.samples(model, 1, args.seed, [80.0], **step)
    two, _ = digits.samples(model, 1, args.seed, two_levels, **step)
    rows = [("one step", images.to_uint8(one)), (f"two steps (80, {two_levels[1]:.3g})", images.to_uint8(two))]
    if teacher:
        last = len(heun_levels) - 1
        heun, _ = digits.samples(teacher, 1, args.seed, heun_levels,
                                 callback=lambda info: bar.update(2 if info["i"] < last else 1))
        rows.append((f"teacher, Heun ({digits.network_calls(teacher, heun_levels)} calls)", images.to_uint8(heun)))
    real = torch.stack([data.test_x[data.test_y == c][0] for c in range(10)])
    labels = torch.arange(10)
    gens = sampling.generators_for(args.seed, range(10))
    mask = masks.half(real.shape[-1], "top")
    filled = editing.inpaint(model.denoiser, real, mask, edit_levels, y=labels, generator=gens, **step)
    noisy = real + 0.5 * sampling.randn(real.shape, gens, "cpu")
    denoised = editing.denoise(model.denoiser, noisy, 0.5, y=labels)
    bar.update(1)
    bar.close()
    erased = editing.Pixels(mask.expand_as(real)).erase(real)
    titles = [str(c) for c in range(10)]
    u8 = images.to_uint8
    pictures = {
        "samples.png": rows,
        "edits.png": [("real", u8(real)), ("bottom erased", u8(erased)), ("inpainted", u8(filled)),
                      ("noisy, 0.5", u8(noisy.clamp(-1, 1))), ("denoised", u8(denoised))],
    }
    for name, rows in pictures.items():
        images.save_png(out.stage(name), images.labelled_grid(rows, titles, zoom=DEMO_ZOOM))
    return [title for title, _ in pictures["samples.png"]]


def _random_weights(unet) -> None:
    """Every parameter drawn (the reference zero-initialises some layers): timings of a model as it will run."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.dim() > 1 else 10))


def tune_model(args: argparse.Namespace):
    """The U-Net `cmfast tune` measures: the checkpoint's, or a preset's architecture with random weights when its
    weights are not here (the timings depend on the shapes, not the values)."""
    from .models import PRESETS, UNet

    device = resolve_device(args.device)
    name = args.checkpoint
    if name in PRESETS and not Path(name).exists():
        try:
            return pretrained.find(name, device=device).unet, name, device
        except FileNotFoundError:
            with torch.device("meta"):
                unet = UNet(PRESETS[name].unet)
            unet = unet.to_empty(device=device).eval()
            _random_weights(unet)
            return unet, f"{name} (architecture, random weights)", device
    model = pretrained.find(name, device=device)
    return model.unet, model.name, device


def _p50_ms(run, reps: int = 3) -> float:
    import time

    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def run_tune(args: argparse.Namespace) -> int:
    import os

    from tqdm.auto import tqdm

    from . import tuning

    batches = _ints(args.batch, "--batch")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    from .models.unet import PRECISIONS

    if not batches or min(batches) < 1:
        raise ValueError(f"--batch: expected positive batch sizes, got {args.batch!r}")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ValueError(f"--precision: expected some of {', '.join(PRECISIONS)} (comma-separated), got {args.precision!r}")
    tuning.enabled()  # a bad CMFAST_TUNE is an error here too
    unet, name, device = tune_model(args)
    unet.requires_grad_(False)
    c = unet.config
    layouts = {"nchw": False, "channels_last": True} if args.layout == "both" else {args.layout: args.layout == "channels_last"}
    saved = os.environ.get(tuning.TUNE_ENV)
    print(f"cmfast tune: {name} on {tuning.device_name(device)} ({torch.get_num_threads()} threads), "
          f"records in {tuning.path_for(tuning.device_name(device))}")
    rows = []
    jobs = [(p, b, lay) for p in precisions for b in batches for lay in layouts]
    try:
        with tqdm(total=len(jobs), unit="setting", desc="measuring") as bar, torch.no_grad():
            for precision, batch, layout in jobs:
                unet.set_precision(precision).set_channels_last(layouts[layout])
                x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, device=device)
                t = torch.full((batch,), 10.0, device=device)
                y = torch.zeros(batch, dtype=torch.long, device=device) if c.num_classes else None
                os.environ[tuning.TUNE_ENV] = "1"
                before = len(tuning.recorded_choices(device))
                with tuning.session("cmfast tune", again=args.again):
                    unet(x, t, y)  # the measurements: each class of call once
                measured = len(tuning.recorded_choices(device)) - before
                tuned = _p50_ms(lambda: unet(x, t, y))
                os.environ[tuning.TUNE_ENV] = "0"
                fixed = _p50_ms(lambda: unet(x, t, y))
                rows.append((precision, batch, layout, fixed, tuned, measured))
                bar.update()
    finally:
        if saved is None:
            os.environ.pop(tuning.TUNE_ENV, None)
        else:
            os.environ[tuning.TUNE_ENV] = saved
    print(f"{'precision':<10}{'batch':>6}  {'layout':<14}{'fixed order':>12}{'measured':>10}{'speed-up':>9}  new records")
    for precision, batch, layout, fixed, tuned, measured in rows:
        print(f"{precision:<10}{batch:>6}  {layout:<14}{fixed:>9.1f} ms{tuned:>7.1f} ms{fixed / tuned:>8.2f}x  {measured}")
    if len(layouts) > 1:  # recorded as the layout cmfast.load's models (channels_last=None) run in
        for precision in precisions:
            for batch in batches:
                by = {r[2]: r[4] for r in rows if r[:2] == (precision, batch)}
                best, fixed = min(by, key=by.get), unet.set_precision(precision).fixed_layout()
                if by[best] > (1 - tuning.MARGIN) * by[fixed]:
                    best = fixed  # within the noise: the fixed order's layout
                x = torch.empty(batch, c.in_channels, c.image_size, c.image_size, device=device)
                tuning.remember("layout", device, unet.layout_key(x, None if c.num_classes is None else x), best,
                                {k: round(v, 3) for k, v in by.items()}, "cmfast tune", fixed, tuple(layouts))
                print(f"{precision} batch {batch}: {best} is faster ({by['nchw']:.1f} vs {by['channels_last']:.1f} ms); "
                      "recorded: models loaded without a layout run in it")
    changed = {}
    for key, record in tuning.recorded_choices(device).items():
        if record.get("source") == "cmfast tune" and record["choice"] != record.get("default", record["choice"]):
            op = key.split(",")[0].strip("('")
            changed.setdefault((op, record["default"], record["choice"]), []).append(record)
    for (op, default, choice), records in sorted(changed.items()):
        gain = sum(r["times_ms"][default] for r in records) / sum(r["times_ms"][choice] for r in records)
        print(f"  {op}: {choice} instead of {default} for {len(records)} class(es) of call, {gain:.2f}x on those calls")
    return 0
