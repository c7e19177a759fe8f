"""Bar charts of a results CSV: one PNG per benchmark, beside the CSV (<csv stem>-<benchmark>.png); one panel per
dtype and batch, a group of bars per shape, one bar per provider: p50 in ms on a log scale, p20..p80 as the error
bar.

usage: python -m benchmarks.plots [CSV]    (default: the newest CSV in benchmarks/results)
"""

from __future__ import annotations

import sys
from pathlib import Path

from .common import read_csv


def plot(csv_path: Path) -> list[Path]:
    """Write the PNGs of `csv_path`; none (and a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    rows = read_csv(csv_path)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colours = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(providers)}
    written = []
    for benchmark in dict.fromkeys(r["benchmark"] for r in rows):
        mine = [r for r in rows if r["benchmark"] == benchmark]
        panels = list(dict.fromkeys((r["dtype"], r["batch"]) for r in mine))
        names = list(dict.fromkeys(r["provider"] for r in mine))
        most = max(len({r["shape"] for r in mine if (r["dtype"], r["batch"]) == p}) for p in panels)
        width = min(30.0, max(6.0, 0.22 * most * (len(names) + 1))) + 2.5  # + the legend on the right
        fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.2 * len(panels)), squeeze=False)
        bar = 0.8 / len(names)
        for ax, (dtype, batch) in zip(axes[:, 0], panels):
            index = {(r["shape"], r["provider"]): r for r in mine if (r["dtype"], r["batch"]) == (dtype, batch)}
            shapes = list(dict.fromkeys(shape for shape, _ in index))
            for k, name in enumerate(names):
                xs, p50, low, high = [], [], [], []
                for i, shape in enumerate(shapes):
                    r = index.get((shape, name))
                    if r is None:
                        continue
                    xs.append(i + (k - (len(names) - 1) / 2) * bar)
                    p50.append(float(r["p50_ms"]))
                    low.append(p50[-1] - float(r["p20_ms"]))
                    high.append(float(r["p80_ms"]) - p50[-1])
                ax.bar(xs, p50, bar, yerr=[low, high], label=name, color=colours[name], capsize=1.5)
            ax.set_yscale("log")
            ax.set_ylabel("p50 ms (log)")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
            ax.set_title(f"{benchmark}, {dtype}, batch {batch}, {mine[0]['device']}", fontsize=9)
            ax.grid(axis="y", which="both", alpha=0.3)
        axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))
        fig.tight_layout()
        path = Path(csv_path).with_name(f"{Path(csv_path).stem}-{benchmark}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    from .summary import newest_csv

    args = sys.argv[1:] if argv is None else argv
    for path in plot(Path(args[0]) if args else newest_csv()):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
