"""The cmfast command line."""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    from .info import report

    print(report())
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
