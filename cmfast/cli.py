"""The cmfast command line."""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    from .info import report

    print(report())
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .models import CheckpointError, load, save

    try:
        model = load(args.src, config=args.config)
        save(model, args.dst, overwrite=args.force)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"cmfast convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({sum(p.numel() for p in model.parameters()):,} parameters, config {model.config})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmfast",
        description="Fast, faithful inference for consistency models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    info = sub.add_parser(
        "info",
        help="versions, compiled parts, and the backend each op will use",
        description="Print the torch/triton/CUDA versions, whether cmfast._C has its CPU and CUDA parts, "
        "and which backend each op runs on for CPU and (if present) CUDA tensors, with the reason.",
    )
    info.set_defaults(func=_info)
    convert = sub.add_parser(
        "convert",
        help="convert a U-Net checkpoint between openai .pt, .safetensors and diffusers folder",
        description="Read SRC (openai .pt state dict, .safetensors with openai or diffusers names, or a diffusers "
        "model folder) and write DST in the format its name says: NAME.pt (openai state dict), NAME.safetensors "
        "(openai names, config in the metadata), anything else a diffusers UNet2DModel folder.",
    )
    convert.add_argument("src", help="checkpoint to read")
    convert.add_argument("dst", help="where to write: *.pt, *.safetensors, or a folder name")
    convert.add_argument("--config", default=None, help="preset name when SRC's config cannot be inferred")
    convert.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    convert.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
