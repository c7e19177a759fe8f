"""A results CSV as short markdown tables, one per benchmark: p50 (ms) of every provider per shape and dtype, then
the best cmfast provider's achieved rate as a fraction of the ceiling, and its speed-up over the main (eager) peer and
over the fastest peer of the same shape and dtype in the run ("vs best peer": every configuration of the peers a user
tuning them would try, torch.compile included; the "+cmfast" pipeline and convs-only are not peers).

usage: python -m benchmarks.summary [CSV] [--write [--readme README.md]]
CSV defaults to the newest file in benchmarks/results. --write replaces the text between the markers
<!-- bench:start --> and <!-- bench:end --> of the README, if it has both; it never adds them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import RESULTS, read_csv

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"
MAIN_PEER = {"unet_forward": "diffusers", "sample_1step": "diffusers-pipeline", "sample_2step": "diffusers-pipeline"}


def _float(value: str) -> float | None:
    return float(value) if value not in ("", "None") else None


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _table(benchmark: str, rows: list[dict]) -> list[str]:
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    unit = "GB/s" if rows[0]["gb_per_s"] not in ("", "None") else "TFLOP/s"
    peer = MAIN_PEER.get(benchmark, "torch-eager")
    ceilings = "; ".join(dict.fromkeys(r["ceiling"] for r in rows if r["ceiling"]))  # one per dtype for FLOP/s
    lines = [f"**{benchmark}** (p50 ms; rate in {unit}, ceiling {ceilings or 'n/a'})", "",
             "| shape | dtype | " + " | ".join(providers) + f" | best cmfast: {unit} (of ceiling) | vs {peer} | vs best peer |",
             "|---|---|" + "---:|" * (len(providers) + 3)]
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["dtype"]), {})[r["provider"]] = r
    for (shape, dtype), by_provider in groups.items():
        fastest = min(by_provider.values(), key=lambda r: float(r["p50_ms"]))
        cells = []
        for p in providers:
            r = by_provider.get(p)
            text = "" if r is None else _ms(float(r["p50_ms"]))
            cells.append(f"**{text}**" if r is fastest else text)
        mine = [r for p, r in by_provider.items() if p.startswith("cmfast") and "compile" not in p]
        best = min(mine, key=lambda r: float(r["p50_ms"])) if mine else None
        rate = vs = vs_best = ""
        peers = [r for p, r in by_provider.items() if not p.startswith("cmfast") and p != "convs-only"
                 and not p.endswith("+cmfast")]
        if best is not None and peers:
            top = min(peers, key=lambda r: float(r["p50_ms"]))
            vs_best = f"{float(top['p50_ms']) / float(best['p50_ms']):.2f}x ({top['provider']})"
        if best is not None:
            value = _float(best["gb_per_s"]) if unit == "GB/s" else _float(best["tflop_per_s"])
            fraction = _float(best["fraction_of_ceiling"])
            rate = f"{value:.3g}" + (f" ({fraction:.0%})" if fraction is not None else "") if value is not None else ""
            if peer in by_provider:
                vs = f"{float(by_provider[peer]['p50_ms']) / float(best['p50_ms']):.2f}x ({best['provider']})"
        lines.append(f"| {shape} | {dtype} | " + " | ".join(cells) + f" | {rate} | {vs} | {vs_best} |")
    return lines


def markdown(csv_path: Path, ceilings: str | None = None) -> str:
    rows = read_csv(csv_path)
    if not rows:
        return f"{csv_path}: no rows"
    first = rows[0]
    loads = [float(r["other_load"]) for r in rows if r.get("other_load") not in (None, "", "None")]
    header = (f"{first['device']}, torch {first['torch_version']}, triton {first['triton_version']}, "
              f"cmfast {first['cmfast_version']}, {first['timestamp'][:10]} ({Path(csv_path).name})")
    lines = [header]
    if ceilings:
        lines.append(f"ceilings: {ceilings}")
    if loads and max(loads) > 0.05:
        lines.append(f"other processes took up to {max(loads):.0%} of the CPUs while rows were measured "
                     "(column other_load): those rows are slower than this machine is")
    lines.append("")
    by_benchmark: dict[str, list[dict]] = {}
    for r in rows:
        by_benchmark.setdefault(r["benchmark"], []).append(r)
    for benchmark, group in by_benchmark.items():
        lines += _table(benchmark, group) + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_readme(text: str, readme: Path = README) -> bool:
    """Replace what lies between the markers of `readme`; False (nothing written) when it lacks them."""
    content = readme.read_text()
    start, end = content.find(START), content.find(END)
    if start < 0 or end < start:
        return False
    readme.write_text(content[: start + len(START)] + "\n" + text + content[end:])
    return True


def newest_csv(folder: Path = RESULTS) -> Path:
    found = sorted(folder.glob("*.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no CSV in {folder}")
    return found[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="?", type=Path, default=None)
    parser.add_argument("--write", action="store_true", help="update the README's marked section")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = markdown(args.csv or newest_csv())
    print(text)
    if args.write:
        if not write_readme(text, args.readme):
            print(f"{args.readme}: no {START} ... {END} markers; nothing written", file=sys.stderr)
            return 1
        print(f"updated {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
