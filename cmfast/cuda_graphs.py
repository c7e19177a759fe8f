"""CUDA-graph replay of a function of fixed-shape tensors: the launch overhead of a whole network call (hundreds of
kernels, milliseconds of Python and driver time at batch 1) becomes one graph launch.

`GraphCache(fn)` captures `fn(*tensors, **static)` once per signature (shapes, strides, dtypes and device of the
tensors, the static keyword values, the forced backends) and
replays it: the inputs are copied into the captured buffers, the graph replays, and a copy of the output comes back
(the captured output buffer is overwritten by the next replay). All graphs of one cache share one memory pool, so
capturing several batch sizes costs little more than the largest one. The backends are chosen at capture time and
stay in the graph; parameters are read where they were at capture time (load weights in place, not by replacing
the tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backends

WARMUP_CALLS = 2  # eager calls on a side stream before capture: lazy initialisation (cuDNN, Triton JIT) stays out


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple  # the captured input buffers (None where the argument was None)
    output: torch.Tensor


def _signature(t: torch.Tensor | None):
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device)


class GraphCache:
    """Replays `fn(*args, **static)` (args: tensors or None; static: hashable values fixed in the graph; one tensor
    output) from CUDA graphs, one per signature."""

    def __init__(self, fn):
        self.fn = fn
        self.graphs: dict = {}
        self._pool = None

    def __call__(self, *args: torch.Tensor | None, **static) -> torch.Tensor:
        signature = (tuple(_signature(a) for a in args), tuple(sorted(static.items())), repr(backends.forced()),
                     torch.is_autocast_enabled())
        captured = self.graphs.get(signature)
        if captured is None:
            captured = self.graphs[signature] = self._capture(args, static)
        for buffer, value in zip(captured.inputs, args):
            if buffer is not None:
                buffer.copy_(value)
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, args, static: dict) -> _Captured:
        device = next(a.device for a in args if a is not None)
        inputs = tuple(None if a is None else a.clone() for a in args)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(WARMUP_CALLS):
                self.fn(*inputs, **static)
        torch.cuda.current_stream(device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool):
            output = self.fn(*inputs, **static)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"GraphCache: expected the function to return one tensor, got {type(output).__name__}")
        return _Captured(graph, inputs, output)
