"""A diffusers ConsistencyModelPipeline run by cmfast: `cmfast.swap(pipe)`.

Swapping only the unet (`pipe.unet = cmfast.swap(pipe.unet)`) keeps the pipeline's own loop: per step a scheduler
call, scalings and a copy of the sample in Python and eager torch. The swapped pipeline keeps the call
(batch_size, class_labels, num_inference_steps, timesteps, generator, latents, output_type, return_dict, callback,
callback_steps) and its draws: the latents and labels come from the pipeline's own preparation, the schedule from its
scheduler, the noise of each step from `randn_tensor` with the same generator, in the same order. So the same
generator gives the same images; only the network calls and the consistency scalings are cmfast's (a Denoiser,
replaying CUDA graphs on a GPU). Everything else (the scheduler, .to(), save_pretrained, progress bars) is the
original pipeline's.
"""

from __future__ import annotations

import torch

from .consistency import Denoiser


def is_consistency_pipeline(obj) -> bool:
    return type(obj).__name__ == "ConsistencyModelPipeline" and hasattr(obj, "scheduler") and hasattr(obj, "unet")


class ConsistencyPipeline:
    """The pipeline `pipe` with cmfast's U-Net and sampler (see the module docstring); other attributes are pipe's."""

    def __init__(self, pipe):
        from .models import swap
        from .models.swap import DiffusersUNet

        if not isinstance(pipe.unet, DiffusersUNet):
            pipe.unet = swap(pipe.unet)
        scheduler = pipe.scheduler.config
        self.pipe = pipe
        self.denoiser = Denoiser(self._network, sigma_min=scheduler.sigma_min, sigma_data=scheduler.sigma_data,
                                 cuda_graph=True)

    def _network(self, x, t, y=None):
        return self.pipe.unet.unet(x, t, y)

    def __getattr__(self, name):  # the scheduler, config, components, progress bars, save_pretrained, ...
        return getattr(self.__dict__["pipe"], name)

    def to(self, *args, **kwargs) -> "ConsistencyPipeline":
        self.pipe.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, num_inference_steps: int = 1, timesteps=None,
                 generator=None, latents=None, output_type: str | None = "pil", return_dict: bool = True,
                 callback=None, callback_steps: int = 1):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        pipe, scheduler = self.pipe, self.pipe.scheduler
        size = pipe.unet.config.sample_size
        pipe.check_inputs(num_inference_steps, timesteps, latents, batch_size, size, callback_steps)
        device = pipe._execution_device
        sample = pipe.prepare_latents(batch_size=batch_size, num_channels=pipe.unet.config.in_channels, height=size,
                                      width=size, dtype=pipe.unet.dtype, device=device, generator=generator,
                                      latents=latents)
        labels = pipe.prepare_class_labels(batch_size, device, class_labels=class_labels)
        if timesteps is not None:
            scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            scheduler.set_timesteps(num_inference_steps)
        steps = len(scheduler.timesteps)
        config = scheduler.config
        sigmas = scheduler.sigmas.tolist()  # the levels, then sigma_min
        with pipe.progress_bar(total=steps) as bar:
            for i in range(steps):
                # Algorithm 1: jump to the origin at sigma_i, then re-noise to sigma_{i+1} (the scheduler's draws)
                x0 = self.denoiser(sample, sigmas[i], labels, clamp=config.clip_denoised)
                if steps > 1:
                    z = randn_tensor(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
                else:
                    z = torch.zeros_like(x0)
                nxt = min(max(sigmas[i + 1], config.sigma_min), config.sigma_max)
                sample = x0 + z * config.s_noise * (nxt**2 - config.sigma_min**2) ** 0.5
                bar.update()
                if callback is not None and i % callback_steps == 0:
                    callback(i, scheduler.timesteps[i], sample)
        image = pipe.postprocess_image(sample, output_type=output_type)
        pipe.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)
