"""The recipe of the built-in models (`make digits-model`): on scikit-learn's digits at 16x16, an EDM teacher, then
consistency distillation (CD) from it and, for comparison, consistency training (CT); each scored by
cmfast.digits.evaluate (50 samples per class, seed 0) from the fp16 file it would ship as; the consistency model
that meets more of the targets ships as cmfast/data/digits.safetensors, the teacher beside it.

Every run is `cmfast train` in a folder under --run, so an interrupted recipe resumes where it stopped and a
finished step is not redone. Seeded: the same torch, CPU and thread count give the same weights.

    python tools/digits_model.py                       # the recipe (60 minutes on a 2-core Xeon)
    python tools/digits_model.py --run /tmp/r --ship /tmp/s --teacher-steps 4 --cd-steps 2 --ct-steps 2 \
        --batch 4 --cd-batch 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

REAL_ROWS = ("held-out real digits", "real digits (train)", "uniform noise")  # digits.evaluate's reference rows
# (name, row of digits.evaluate, field, comparison, bound); "1.5 real": 1.5 times the real training digits' value
TARGETS = {
    "consistency": [("one-step recognised", "one-step samples", "recognised", ">=", 0.97),
                    ("two-step recognised", "two-step samples", "recognised", ">=", 0.98),
                    ("one-step Frechet distance", "one-step samples", "frechet", "<=", "1.5 real"),
                    ("one-step high-frequency energy", "one-step samples", "high_frequency", "<=", 1.3)],
    "edm": [("Heun recognised", None, "recognised", ">=", 0.98)],
}


def arguments(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "digits", help="where the training runs go")
    p.add_argument("--ship", type=Path, default=ROOT / "cmfast" / "data", help="where the chosen models are written")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128, help="the teacher's and CT's batch")
    p.add_argument("--teacher-steps", type=int, default=2500)
    p.add_argument("--teacher-ema", type=float, default=0.995)
    p.add_argument("--cd-steps", type=int, default=8000)
    p.add_argument("--cd-lr", type=float, default=2e-4)
    p.add_argument("--cd-init", default="fresh", choices=["teacher", "fresh"],
                   help="where the student starts (fresh: on these digits, started from the teacher's weights at lr "
                        "1e-4, 1000 steps gave grainy one-step samples: 91.4%% recognised, 2.19x the real digits' "
                        "high-frequency energy)")
    # the CD variants tried, and what they scored: docs/digits-model.md
    p.add_argument("--cd-n", type=int, default=40, help="CD's fixed number of noise levels (the paper's N)")
    p.add_argument("--cd-batch", type=int, default=32, help="CD's batch")
    p.add_argument("--cd-target", default="ema", choices=["online", "ema"],
                   help="CD's target: the student itself, gradient stopped, or an EMA of it of decay --cd-mu0")
    p.add_argument("--cd-mu0", type=float, default=0.95, help="with --cd-target ema: the target's EMA decay")
    p.add_argument("--ct-steps", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=50, help="evaluation samples per class")
    return p.parse_args(argv)


def train(run: Path, batch: int, *options: str, args: argparse.Namespace) -> float:
    from cmfast.cli import main

    start = time.perf_counter()
    command = ["train", "--model", "digits", "--batch", str(batch), "--seed", "0", "--threads",
               str(args.threads), "--out", str(run), *options]
    print("cmfast " + " ".join(command), flush=True)
    if main(command) != 0:
        raise SystemExit(f"digits_model: cmfast train failed in {run}")
    return time.perf_counter() - start


def met(target, scores: dict) -> tuple[float, float, bool]:
    _, row, field, sign, bound = target
    value = getattr(scores[row], field)
    if isinstance(bound, str):  # a multiple of the real training digits' value
        bound = float(bound.split()[0]) * getattr(scores["real digits (train)"], field)
    return value, bound, value >= bound if sign == ">=" else value <= bound


def report(results: dict, minutes: dict, chosen: str, threads: int) -> str:
    from cmfast.tuning import cpu_name  # imported by main from this checkout
    lines = ["| model | sampler | recognised | Frechet distance | high-frequency energy |", "|---|---|---:|---:|---:|"]
    for name, scores in results.items():
        for row, s in scores.items():
            if row not in REAL_ROWS:
                lines.append(f"| {name} | {row.replace(' samples', '')} | {s.recognised:.1%} | {s.frechet:.2f} | "
                             f"{s.high_frequency:.2f}x |")
    real = next(iter(results.values()))
    for row in REAL_ROWS:
        s = real[row]
        lines.append(f"| {row} | - | {s.recognised:.1%} | {s.frechet:.2f} | {s.high_frequency:.2f}x |")
    lines += ["", "| target | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for kind in ("consistency", "edm"):
        for target in TARGETS[kind]:
            cells = []
            for name, scores in results.items():
                if (name == "teacher") != (kind == "edm"):
                    cells.append("-")
                    continue
                tgt = target if target[1] else (target[0], next(r for r in scores if r.startswith("Heun")), *target[2:])
                value, bound, ok = met(tgt, scores)
                cells.append(f"{value:.3g} {target[3]} {bound:.3g}: {'met' if ok else 'not met'}")
            lines.append(f"| {target[0]} | " + " | ".join(cells) + " |")
    lines += ["", f"minutes on {cpu_name()}, {threads} threads: " + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items())
              + f"; total {sum(minutes.values()):.1f}", "", f"shipped as digits.safetensors: {chosen}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = arguments(argv)
    sys.path.insert(0, str(ROOT))  # this checkout's cmfast
    import cmfast
    from cmfast import digits, pretrained
    from cmfast.outputs import Outputs, write_one

    teacher, cd, ct = args.run / "teacher", args.run / "cd", args.run / "ct"
    stages = {
        "teacher": (teacher, args.batch, "--method", "edm", "--steps", str(args.teacher_steps), "--ema-decay", str(args.teacher_ema)),
        "cd": (cd, args.cd_batch, "--method", "cd", "--teacher", str(teacher / "model.safetensors"),
               "--steps", str(args.cd_steps), "--lr", str(args.cd_lr), "--n-schedule", "fixed", "--n-points",
               str(args.cd_n), "--init", args.cd_init, "--target", args.cd_target, "--mu0", str(args.cd_mu0)),
        "ct": (ct, args.batch, "--method", "ct", "--steps", str(args.ct_steps), "--ema-decay", "0.999"),
    }
    # minutes spent in each stage, summed over the runs of the recipe that resumed it (a finished stage adds seconds)
    spent = args.run / "minutes.json"
    minutes = json.loads(spent.read_text()) if spent.is_file() else {}
    for name, (folder, batch, *options) in stages.items():
        minutes[name] = minutes.get(name, 0.0) + train(folder, batch, *options, args=args) / 60
        write_one(spent, lambda path: path.write_text(json.dumps(minutes)), replace=True)

    start = time.perf_counter()
    results, files = {}, {}
    for name, run in (("teacher", teacher), ("cd", cd), ("ct", ct)):
        files[name] = args.run / f"{name}-fp16.safetensors"  # as it would ship: scored from these
        found = pretrained.find(str(run / "model.safetensors"))
        cmfast.save(found.unet, files[name], overwrite=True, kind=found.kind, weights_dtype="fp16")
        model = pretrained.find(str(files[name]))
        results[name] = digits.evaluate(model, args.per_class, seed=0)
    minutes["evaluate"] = (time.perf_counter() - start) / 60

    def targets_met(name):
        return sum(met(t, results[name])[2] for t in TARGETS["consistency"])

    chosen = max(("cd", "ct"), key=lambda n: (targets_met(n), results[n]["one-step samples"].recognised))
    text = report(results, minutes, chosen, args.threads)
    with Outputs(args.run, ["report.md", "scores.json"], replace=True, what="run folder") as out:
        out.stage("report.md").write_text(text)
        out.stage("scores.json").write_text(json.dumps(
            {name: {row: vars(s) for row, s in scores.items()} for name, scores in results.items()}, indent=1))
        out.commit()
    print(text)
    args.ship.mkdir(parents=True, exist_ok=True)
    for name, dest in ((chosen, "digits.safetensors"), ("teacher", "digits-teacher.safetensors")):
        model = pretrained.find(str(files[name]))
        cmfast.save(model.unet, args.ship / dest, overwrite=True, kind=model.kind, weights_dtype="fp16")
        print(f"wrote {args.ship / dest} ({name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
