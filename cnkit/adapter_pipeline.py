"""Generation with any control architecture through diffusers' own ``StableDiffusionPipeline``.

diffusers has a pipeline for the paper's ControlNet (``StableDiffusionControlNetPipeline``, what
``cnkit.generate`` runs), but none that takes an arbitrary ``cnkit.architectures.ControlAdapter``
(ControlNeXt is not in diffusers; its ControlNet-XS and T2I-Adapter pipelines each know one class). So
instead of writing a denoising loop, the adapter and the locked UNet are wrapped as one UNet
(``ControlledUNet``: its forward is ``adapter.predict_noise``) and handed to the stock text-to-image
pipeline, whose prompt encoding, classifier-free guidance, scheduler and decoding run unchanged.

The condition sits in both guidance branches (the WebUI's "balanced" mode), at ``scale`` over the steps
from ``start`` to ``end`` (diffusers' ``control_guidance_start``/``end`` rule).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from .architectures import ControlAdapter
from .pixels import condition_range, is_condition_set, stack_maps


class ControlledUNet(nn.Module):
    """A locked UNet and a control adapter, called as the pipeline calls its UNet. Set ``cond`` (one condition per
    image, [0, 1] floats) and ``reset(steps)`` before each pipeline call."""

    def __init__(self, unet, adapter: ControlAdapter, scale: float = 1.0, start: float = 0.0, end: float = 1.0):
        super().__init__()
        self.unet, self.adapter = unet, adapter
        self.scale, self.start, self.end = scale, start, end
        self.config = unet.config  # what the pipeline reads: sample_size, in_channels, time_cond_proj_dim
        self.cond: torch.Tensor | None = None
        self.reset(1)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def reset(self, steps: int) -> None:
        self.steps, self.calls, self.prepared = steps, 0, {}

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True, **unused):
        if self.cond is None:
            raise RuntimeError("ControlledUNet: set .cond before running the pipeline")
        i, n = self.calls, self.steps
        self.calls += 1
        # one call per denoising step (guidance batches both branches): control between start and end only
        keep = not (i / n < self.start or (i + 1) / n > self.end)
        repeat = sample.shape[0] // self.cond.shape[0]  # classifier-free guidance doubles the batch
        key = (repeat, sample.device, sample.dtype)
        if key not in self.prepared:  # one tensor per generation: adapters may cache what depends on it alone
            self.prepared[key] = torch.cat([self.cond] * repeat).to(sample.device, sample.dtype)
        cond = self.prepared[key]
        scale = self.scale * keep
        if scale == 0:
            out = self.unet(sample, timestep, encoder_hidden_states).sample
        else:
            out = self.adapter.predict_noise(self.unet, sample, timestep, encoder_hidden_states, cond, scale)
        return (out,)


def condition_tensor(conditions) -> torch.Tensor:
    """PIL or HxWx3 uint8 conditions -> (N, 3, H, W) floats in [0, 1], what the adapters were trained on
    (``cnkit.pixels.condition_range``); a set of maps per image (a multi-condition net's; None for a missing map)
    -> (N, 3n, H, W), the maps on the channel axis in order, as training stacks them."""
    arrays = [stack_maps(c) if is_condition_set(c) else np.asarray(c.convert("RGB") if hasattr(c, "convert") else c)
              for c in conditions]
    return condition_range(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))


def adapter_pipeline(pipe, scheduler, adapter: ControlAdapter, scale: float = 1.0, start: float = 0.0,
                     end: float = 1.0) -> StableDiffusionPipeline:
    """diffusers' text-to-image pipeline over ``pipe``'s components with ``adapter`` controlling its UNet; run it
    through ``run_adapter_pipeline``."""
    unet = ControlledUNet(pipe.unet, adapter, scale, start, end)
    run = StableDiffusionPipeline(**{**pipe.components, "unet": unet, "scheduler": scheduler},
                                  requires_safety_checker=False)
    run.set_progress_bar_config(disable=True)
    return run


def run_adapter_pipeline(run: StableDiffusionPipeline, conditions, num_images_per_prompt: int = 1, **call):
    """``run(**call)`` with ``conditions`` (one per prompt) under control; each prompt's images share its condition."""
    cond = condition_tensor(conditions)
    run.unet.cond = cond.repeat_interleave(num_images_per_prompt, 0)
    run.unet.reset(call["num_inference_steps"])
    try:
        return run(**call, num_images_per_prompt=num_images_per_prompt)
    finally:
        run.unet.cond, run.unet.prepared = None, {}
