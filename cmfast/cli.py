"""The cmfast command line."""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    from .info import report

    try:
        print(report(verbose=args.choices))
    except ValueError as e:  # a bad CMFAST_BACKEND or CMFAST_TUNE: the message names the variable
        print(f"cmfast info: {e}", file=sys.stderr)
        return 2
    return 0


def _inputs_of(src: str) -> list:
    """The files convert reads from SRC (a file, or a model folder's files), which its output must never replace."""
    from pathlib import Path

    path = Path(src)
    return [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]


def _convert(args: argparse.Namespace) -> int:
    from .models import CheckpointError, load, save

    try:
        from .models.checkpoint import recorded_kind

        model = load(args.src, config=args.config, num_head_channels=args.num_head_channels)
        save(model, args.dst, overwrite="own" if args.force else False, protect=_inputs_of(args.src),
             kind=recorded_kind(args.src), weights_dtype=args.weights_dtype)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"cmfast convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({sum(p.numel() for p in model.parameters()):,} parameters, config {model.config})")
    if str(args.dst).endswith(".pt"):
        from .models.checkpoint import unrecorded

        lost = unrecorded(model)
        if lost:
            how = (f"--num-head-channels {lost['num_head_channels']}" if set(lost) == {"num_head_channels"}
                   else "--config PRESET")
            print(f"note: an openai .pt records no config, and a plain load of {args.dst} would not give back "
                  f"{', '.join(f'{k}={v!r}' for k, v in lost.items())}: read it with {how} (in Python: cmfast.load(..., "
                  f"{'num_head_channels=' + str(lost['num_head_channels']) if 'num_head_channels' in lost else 'config='}))"
                  ", or write .safetensors or a diffusers folder, which record it", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmfast",
        description="Fast, faithful inference for consistency models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    info = _command(sub, "info", _info,
        help="versions, compiled parts, and the backend each op will use",
        description="Print the torch/triton/CUDA versions, whether cmfast._C has its CPU and CUDA parts, "
        "and which backend each op runs on for CPU and (if present) CUDA tensors, with the reason.",
    )
    info.add_argument("--choices", action="store_true",
                      help="list every choice recorded by measurement, with its timings (else a summary per op)")
    convert = _command(sub, "convert", _convert,
        help="convert a U-Net checkpoint between openai .pt, .safetensors and diffusers folder",
        description="Read SRC (openai .pt state dict, .safetensors with openai or diffusers names, or a diffusers "
        "model folder) and write DST in the format its name says: NAME.pt (openai state dict), NAME.safetensors "
        "(openai names, config in the metadata), anything else a diffusers UNet2DModel folder.",
    )
    convert.add_argument("src", help="checkpoint to read")
    convert.add_argument("dst", help="where to write: *.pt, *.safetensors, or a folder name")
    convert.add_argument("--config", default=None, help="preset name when SRC's config cannot be inferred")
    convert.add_argument("--num-head-channels", type=int, default=None,
                         help="attention head width of a SRC that does not record it (an openai .pt: 64 unless given)")
    convert.add_argument("--weights-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                         help="the type DST stores the weights in: fp16 or bf16 halve the file (loading gives fp32 "
                         "again; fp16 keeps more digits, bf16 more range)")
    convert.add_argument("--force", action="store_true",
                         help="replace DST's model files if cmfast wrote them (nothing else in a folder is touched)")
    _add_sample(sub)
    _add_edit(sub)
    _add_training(sub)
    _add_tune(sub)
    return parser


def _command(sub, name: str, func, **texts) -> argparse.ArgumentParser:
    """The parser of sub-command `name` (help=, description=), which runs func(args)."""
    p = sub.add_parser(name, **texts)
    p.set_defaults(func=func)
    return p


def _add_tune(sub) -> None:
    p = _command(sub, "tune", _run("run_tune"),
        help="measure a model's calls ahead of time and record the fastest way to run each",
        description="Run one forward of the model at each batch size, precision and layout with every class of call "
        "(each op and convolution at its shape, dtype and layout) timed on each of its exact implementations, record "
        "the fastest under the cache folder ($CMFAST_CACHE, else ~/.cache/cmfast; read by every later process on "
        "this machine), and print the forward's time in the fixed order and with the measured choices.",
    )
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="checkpoint path, preset name (its architecture with random weights when its weights are not "
                        "here) or digits, the built-in model (the default)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, fp16, bf16 (default fp32)")
    p.add_argument("--layout", default="both", choices=["nchw", "channels_last", "both"],
                   help="memory layout(s) to measure (default both, and say which is faster)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--again", action="store_true", help="measure anew what was recorded before, replacing it")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="fp32, or the reference's mixed mode with fp16/bf16 block convolutions")
    p.add_argument("--seed", type=int, default=0, help="sample i uses a generator seeded from (seed, i)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")


def _schedule_options(p: argparse.ArgumentParser, steps_help: str) -> None:
    p.add_argument("--steps", type=int, default=None, help=steps_help)
    p.add_argument("--ts", default=None, help="schedule as ascending indices into the grid, e.g. 0,22,39")
    p.add_argument("--grid", type=int, default=None, help="grid points of --ts / --steps (default 40)")


def _add_sample(sub) -> None:
    p = _command(sub, "sample", _run("run_sample"),
        help="generate images: one step, multistep, or Heun for EDM teachers",
        description="Sample N images and write OUT/samples.npz (the reference's format: arr_0 uint8 NHWC, arr_1 "
        "labels for class-conditional models) and OUT/grid.png. A seed fixes every sample's noise and label whatever "
        "--batch (the images then agree to one grey level; bit for bit at the same --batch). Runs as one process or "
        "as each process of a torchrun job (`torchrun --nproc-per-node 8 -m cmfast -- sample ...`; the -- keeps "
        "torchrun from reading --num as its own option), each on the GPU of its LOCAL_RANK: the same file whatever "
        "the number of processes. Finished batches are kept in OUT/.cmfast-shards/ until the set is written, so the "
        "same command started again after a stop completes the job.",
    )
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="checkpoint path (.pt, .safetensors, diffusers folder) or preset name (cd_imagenet64_l2, ...)")
    p.add_argument("--num", type=int, default=16, help="number of images")
    p.add_argument("--batch", type=int, default=16, help="images per network call")
    p.add_argument("--class-labels", default=None, help="comma-separated labels, cycled (default: random per sample)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on a GPU, replay each network call from a CUDA graph (captured once per batch size): much "
                        "faster at small batches, the same images")
    _schedule_options(p, "network calls for consistency models (default 1; 2 uses the tuned schedule where the "
                         "checkpoint has one); grid points of Heun for EDM teachers (default 40)")
    _model_options(p)


def _add_edit(sub) -> None:
    p = _command(sub, "edit", _run("run_edit"),
        help="zero-shot editing: inpaint, colorize, superres, stroke, denoise, interpolate",
        description="Edit an image with a consistency model (paper Algorithm 4) and write OUT/TASK.png and "
        "OUT/TASK_before_after.png. The image must have the model's size (superres: also size / factor). "
        "By default the schedule visits every point of a 40-point grid, as the paper's editing runs do.",
    )
    p.add_argument("task", choices=["inpaint", "colorize", "superres", "stroke", "denoise", "interpolate"])
    p.add_argument("checkpoint", nargs="?", default=None, help="checkpoint path or preset name")
    p.add_argument("--image", default=None, help="input image file (all tasks but interpolate)")
    p.add_argument("--mask", default="box",
                   help="inpaint: box, left-half, right-half, top-half, bottom-half, glyph:TEXT, or a mask image "
                        "(white = keep)")
    p.add_argument("--factor", type=int, default=8, help="superres: upscaling factor (patch size)")
    p.add_argument("--sigma", type=float, default=10.0,
                   help="stroke: starting noise level (< 80); denoise: the image's noise level")
    p.add_argument("--add-noise", action="store_true", help="denoise: add noise of level --sigma to the image first")
    p.add_argument("--frames", type=int, default=8, help="interpolate: number of frames")
    p.add_argument("--class-label", type=int, default=None, help="class for class-conditional models")
    _schedule_options(p, "network calls (default: every grid index)")
    _model_options(p)


def _add_training(sub) -> None:
    p = _command(sub, "train", _run("run_train"),
        help="consistency training/distillation on scikit-learn's bundled digits",
        description="Train a model of the ADM family on the handwritten digits bundled with scikit-learn (no "
        "download). Checkpoints go to OUT every --checkpoint-every steps (model.safetensors: the EMA weights, which "
        "cmfast.load/sample/edit take; state.pt: everything needed to resume). Rerunning the same command resumes; "
        "the result equals an uninterrupted run. Defaults are improved CT (pseudo-Huber, lognormal noise index, "
        "doubling N, no target EMA); `make digits-model` is the built-in model's recipe.",
    )
    p.add_argument("--model", default="digits", help="preset of the network (default: digits, 1.4M parameters)")
    p.add_argument("--method", default="ct", choices=["ct", "cd", "edm"], help="ct, cd (needs --teacher), edm")
    p.add_argument("--teacher", default=None,
                   help="cd: the EDM teacher's checkpoint, of the --model architecture (the student starts from its "
                        "weights, as in the reference); digits-teacher is the built-in one")
    p.add_argument("--init", default="teacher", choices=["teacher", "fresh"],
                   help="cd: start the student from the teacher's weights (the reference's CD) or afresh")
    p.add_argument("--steps", type=int, default=2000, help="length of the run (sets the N and EMA schedules)")
    p.add_argument("--until", type=int, default=None, help="stop at this step (rerun without it to finish)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant, or cosine: from --lr down to zero at the last of --steps")
    p.add_argument("--target", default="online", choices=["online", "ema"],
                   help="ct/cd: the network the targets come from: online (itself, gradient stopped: improved CT) or "
                        "ema (an EMA of it: decay --mu0 throughout with a fixed N, the paper's CD; else the paper's "
                        "CT schedule from --mu0)")
    p.add_argument("--index-sampling", default="lognormal", choices=["lognormal", "uniform"],
                   help="ct/cd: how a step's pair of adjacent levels is drawn: lognormal in sigma (improved CT) or "
                        "uniform over the N - 1 pairs (the paper)")
    p.add_argument("--weighting", default="inverse_gap", choices=["inverse_gap", "uniform"],
                   help="ct/cd: the loss weight of a pair: 1 / (t_n+1 - t_n) (improved CT) or 1 (the paper)")
    p.add_argument("--mu0", type=float, default=0.95, help="ct/cd with --target ema: the target EMA's decay")
    p.add_argument("--distance", default="pseudo_huber", choices=["pseudo_huber", "l2", "l1"])
    p.add_argument("--ema-decay", type=float, default=0.995, help="decay of the EMA of the weights that are saved")
    p.add_argument("--n-schedule", default="doubling", choices=["doubling", "paper", "fixed"],
                   help="ct/cd: the number of noise levels N over training: doubling (improved CT, from --n-points to "
                        "1280), paper (the paper's CT growth), fixed (N = --n-points throughout, the paper's CD)")
    p.add_argument("--n-points", type=int, default=None,
                   help="ct/cd: N to start from (doubling: default 10; paper: 2) or, with fixed, N (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the same weights need the same count)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--force", action="store_true",
                   help="start afresh in a folder holding a model.safetensors that cmfast wrote (without state.pt)")

    p = _command(sub, "evaluate", _run("run_evaluate"), help="score a digits model against real digits and noise",
                       description="Sample --num-per-class images of every digit in one and two steps and report "
                       "the share a classifier trained on real digits recognises as the requested class, and a "
                       "Frechet distance to held-out real digits, beside real digits and uniform noise.")
    p.add_argument("checkpoint", nargs="?", default=None, help="default: the built-in digits model")
    p.add_argument("--num-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="sample in fp32 or in the reference's mixed mode with fp16/bf16 block convolutions (what "
                   "a half type costs in quality)")

    p = _command(sub, "demo", _run("run_demo"), help="the built-in model at work: samples, inpainting, denoising as PNG files",
                       description="Write OUT/samples.png (a sample of each digit, one step and two steps; a column "
                       "per digit, titled) and OUT/edits.png (real digits, their top half erased and inpainted, "
                       "noised and denoised; each row labelled) with the built-in digits model.")
    p.add_argument("checkpoint", nargs="?", default=None, help="default: the built-in digits model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ts", default=None, help=argparse.SUPPRESS)
    p.add_argument("--grid", type=int, default=None, help=argparse.SUPPRESS)


def _run(name: str):
    def run(args: argparse.Namespace) -> int:
        from . import commands
        from .distributed import JobFailed
        from .models import CheckpointError

        try:
            return getattr(commands, name)(args)
        except JobFailed as e:  # a process of a sampling job: every process says which
            print(f"cmfast {args.command}: {e}", file=sys.stderr)
            return 1
        except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, ImportError) as e:
            # ImportError: an optional extra is missing (scikit-learn for the digits commands); the message names it
            print(f"cmfast {args.command}: {e}", file=sys.stderr)
            return 2

    return run


def _exit_on_sigterm() -> None:
    """SIGTERM (a job scheduler's stop, `kill`) as an exit that runs the cleanups, like ^C: no temporaries left."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (main() called from a thread): leave the handler as it is
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _exit_on_sigterm()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
