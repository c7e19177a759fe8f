"""`cmfast` as torchrun runs it, with a fault injected into one process (tests/test_distributed.py):
  CMFAST_TEST_STOP="SIGNAL:K:RANK"  the process of that rank sends itself SIGNAL after writing its K-th shard;
  CMFAST_TEST_FAIL=RANK             the process of that rank raises in its first batch.
Every process exits non-zero if cmfast left the process group it created initialised: a live gloo group can abort a
process's exit (at random: "terminate called without an active exception")."""

import os
import signal
import sys

import torch.distributed as dist

from cmfast import distributed, sampling
from cmfast.cli import main

rank = os.environ.get("RANK", "0")
stop = os.environ.get("CMFAST_TEST_STOP")
if stop:
    name, after, who = stop.split(":")
    if who == rank:
        written = distributed._write_shard
        count = [0]

        def write_then_stop(*args, **kwargs):
            written(*args, **kwargs)
            count[0] += 1
            if count[0] == int(after):
                os.kill(os.getpid(), getattr(signal, name))

        distributed._write_shard = write_then_stop
if os.environ.get("CMFAST_TEST_FAIL") == rank:
    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    sampling.sample = fail

code = main(sys.argv[1:])
if dist.is_initialized():
    print(f"process {rank}: the process group is still initialised after the command", file=sys.stderr)
    code = code or 3
sys.exit(code)
