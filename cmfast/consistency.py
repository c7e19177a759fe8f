"""The consistency function f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, 250 ln sigma, y)
(docs/model.md section 3), and the EDM teacher's denoiser D(x, sigma) (the same without the sigma_min shift), as a thin
wrapper around the raw network; the `consistency` op computes the scalings on either side of the network."""

from __future__ import annotations

import torch

from . import memory, ops
from .cuda_graphs import GraphCache
from .ops._common import per_sample
from .ops.consistency import KINDS


class Denoiser:
    """Callable (x, sigma, y=None, clamp=False) -> denoised x.

    unet: any callable with the reference's signature (x, timesteps, y) -> raw output, e.g. cmfast.UNet.
    kind: "consistency" (CD/CT models: f(x, sigma_min) = x) or "edm" (EDM teachers).
    sigma: one number or a (batch,) tensor. x keeps its dtype; the scalings are computed in fp32.
    cuda_graph: on CUDA tensors with gradients off, capture each call signature (batch, shapes, dtypes) once in a
    CUDA graph and replay it (cmfast.cuda_graphs): one launch instead of hundreds, the same numbers. Elsewhere the
    calls run eagerly. The graphs keep the backends chosen at capture and read the weights in place.
    CPU inference calls run in the U-Net's memory scope (cmfast.memory): a torch.compile'd U-Net, whose graph runs
    outside the scope of the eager forward, reuses its large tensors' memory from call to call too.
    """

    def __init__(self, unet, kind: str = "consistency", sigma_min: float = 0.002, sigma_data: float = 0.5,
                 cuda_graph: bool = False):
        if not callable(unet):
            raise TypeError(f"unet: expected a callable (x, timesteps, y) -> output, got {type(unet).__name__}")
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        self.unet, self.kind, self.sigma_min, self.sigma_data = unet, kind, float(sigma_min), float(sigma_data)
        self.graphs = GraphCache(self._denoise) if cuda_graph else None

    def __call__(self, x: torch.Tensor, sigma, y: torch.Tensor | None = None, clamp: bool = False) -> torch.Tensor:
        if self.graphs is not None and x.is_cuda and not torch.is_grad_enabled():
            sigma = per_sample("sigma", sigma, x)  # a tensor input of the graph, not a captured constant
            return self.graphs(x, sigma, y, clamp=bool(clamp))
        if x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            with memory.reusing():
                return self._denoise(x, sigma, y, clamp)
        return self._denoise(x, sigma, y, clamp)

    def _denoise(self, x, sigma, y=None, clamp=False):
        x_in, t_in = ops.consistency_prologue(x, sigma, sigma_data=self.sigma_data)
        out = self.unet(x_in, t_in, y)
        return ops.consistency_epilogue(x, out, sigma, sigma_data=self.sigma_data, sigma_min=self.sigma_min,
                                        kind=self.kind, clamp=clamp)

    def __repr__(self) -> str:
        graphs = ", cuda_graph=True" if self.graphs is not None else ""
        return f"Denoiser({type(self.unet).__name__}, kind={self.kind!r}, sigma_min={self.sigma_min}{graphs})"
