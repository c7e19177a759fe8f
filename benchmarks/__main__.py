"""python -m benchmarks [NAMES...] [options]: the benchmark runner (benchmarks/run.py)."""

import sys

from .run import main

sys.exit(main())
