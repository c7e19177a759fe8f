"""python -m benchmarks [NAMES...] [options]: the benchmark runner (benchmarks/run.py). It restarts itself once with
run.ALLOCATOR's settings in the environment where they are not there yet (glibc reads them at start-up)."""

import os
import sys

from .run import ALLOCATOR, main

if any(name not in os.environ for name in ALLOCATOR):
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]], {**ALLOCATOR, **os.environ})

sys.exit(main())
