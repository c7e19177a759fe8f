#!/usr/bin/env python3
"""Compile kernels/*.cu with CMake (CMakeLists.txt: sm_80 + sm_90a, -Xptxas -v) and report registers and spills.

Configures build/cuda-check once and reuses it; every run rebuilds the objects (--clean-first, a few seconds)
so the ptxas report is complete even when nothing changed. Prints one row per kernel and architecture.
Exit status: 0 all good, 1 some kernel spills (or ptxas reported nothing), 2 configure or compile failed.
Needs cmake and nvcc (CUDA_HOME/bin, /usr/local/cuda/bin or PATH); no GPU, no torch.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
PROPS = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")
COLUMNS = ("kernel", "arch", "regs", "stack", "spill st", "spill ld")


def print_table(rows: list[dict], columns: tuple[tuple[str, str], ...]) -> None:
    """columns: (heading, key); columns of numbers right-aligned, the others left-aligned; None prints as -."""
    table = [tuple(h for h, _ in columns)] + [tuple("-" if r[k] is None else str(r[k]) for _, k in columns)
                                              for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    right = [all(row[i].replace(",", "").isdigit() or row[i] == "-" for row in table[1:]) for i in range(len(columns))]
    for i, row in enumerate(table):
        print("  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def fail(message):
    print(f"ptxas_report: {message}", flush=True)
    sys.exit(2)


def find_nvcc(explicit):
    candidates = [explicit] if explicit else []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates += ["/usr/local/cuda/bin/nvcc", shutil.which("nvcc")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    fail("nvcc not found (set CUDA_HOME or pass --nvcc)")


def run(cmd):
    """Runs cmd, returns (exit status, stdout + stderr)."""
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc.returncode, proc.stdout


def build(args):
    """Configures (first run only, or after a failed one) and rebuilds everything; returns the build log."""
    cmake = shutil.which("cmake")
    if cmake is None:
        fail("cmake not found on PATH (pip install cmake, or apt-get install cmake)")
    build_dir = Path(args.build_dir)
    if not (build_dir / "CMakeCache.txt").exists():
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), f"-DCMAKE_CUDA_COMPILER={find_nvcc(args.nvcc)}"]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]  # ninja prints each command's output in one piece, even with -j
        status, log = run(configure)
        if status != 0:
            print(log)
            shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
            (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
            fail("cmake configure failed (output above)")
    jobs = args.jobs if (build_dir / "build.ninja").exists() else 1  # make -j would interleave ptxas output
    status, log = run([cmake, "--build", str(build_dir), "--clean-first", "-j", str(jobs)])
    if status != 0:  # show the errors, not the ptxas -v chatter of the files that compiled
        print("\n".join(l for l in log.splitlines() if not l.startswith("ptxas info") and not FRAME.search(l)))
        fail("compilation failed (compiler output above)")
    return log


def parse(log):
    """Rows {name, arch, regs, stack, spill_st, spill_ld} from ptxas -v output, in the order ptxas printed them."""
    rows, entry, props = [], None, None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            entry = {"name": m[1], "arch": m[2], "regs": None, "stack": 0, "spill_st": 0, "spill_ld": 0}
            rows.append(entry)
        elif m := PROPS.search(line):
            props = m[1]
        elif (m := FRAME.search(line)) and props is not None:
            target = entry if entry is not None and entry["name"] == props else None
            if target is None:  # a non-inlined device function: its own row, on the arch being compiled
                arch = entry["arch"] if entry else "?"
                target = {"name": props, "arch": arch, "regs": None, "stack": 0, "spill_st": 0, "spill_ld": 0}
                rows.append(target)
            target["stack"], target["spill_st"], target["spill_ld"] = map(int, m.groups())
            props = None
        elif (m := REGS.search(line)) and entry is not None:
            entry["regs"] = int(m[1])
    return rows


def demangle(names, full):
    """Readable names via c++filt (when present); without --full-names drops 'void', parameters and anon ns."""
    out = list(names)
    if shutil.which("c++filt") and names:
        proc = subprocess.run(["c++filt"], input="\n".join(names) + "\n", stdout=subprocess.PIPE, text=True)
        if proc.returncode == 0 and len(proc.stdout.splitlines()) == len(names):
            out = proc.stdout.splitlines()
    if full:
        return out
    short = []
    for name in out:
        name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
        if name.endswith(")"):  # cut the parameter list: from the '(' that balances the last ')'
            depth = 0
            for i in range(len(name) - 1, -1, -1):
                depth += {")": 1, "(": -1}.get(name[i], 0)
                if depth == 0:
                    name = name[:i]
                    break
        short.append(name)
    return short


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", default=str(ROOT / "build" / "cuda-check"), help="CMake build directory")
    parser.add_argument("--nvcc", help="nvcc to configure with (default: $CUDA_HOME/bin/nvcc, then PATH)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    parser.add_argument("--full-names", action="store_true", help="print full demangled signatures")
    parser.add_argument("--log", action="store_true", help="also print the raw build log")
    args = parser.parse_args()

    log = build(args)
    if args.log:
        print(log)
    for line in log.splitlines():
        if "warning" in line.lower():
            print(line)
    rows = parse(log)
    if not rows:
        print("ptxas_report: no kernels in the ptxas output (is -Xptxas -v still set in CMakeLists.txt?)")
        return 1
    for row, name in zip(rows, demangle([r["name"] for r in rows], args.full_names)):
        row["pretty"] = name
    rows.sort(key=lambda r: (r["pretty"], r["arch"]))
    print_table(rows, tuple(zip(COLUMNS, ("pretty", "arch", "regs", "stack", "spill_st", "spill_ld"))))
    spilling = [r for r in rows if r["spill_st"] or r["spill_ld"]]
    for r in spilling:
        print(f"SPILL: {r['pretty']} on {r['arch']}: {r['spill_st']} B stores, {r['spill_ld']} B loads")
    print(f"{len(rows)} kernel x arch rows, {len(spilling)} spilling")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
