"""Generation with any control architecture through diffusers' own ``StableDiffusionPipeline``.

diffusers has a pipeline for the paper's ControlNet (``StableDiffusionControlNetPipeline``, what
``cnkit.generation.generate`` runs), but none that takes an arbitrary ``cnkit.models.architectures.ControlAdapter``
(ControlNeXt is not in diffusers; its ControlNet-XS and T2I-Adapter pipelines each know one class). So
instead of writing a denoising loop, the adapter and the locked UNet are wrapped as one UNet
(``ControlledUNet``: its forward is ``adapter.predict_noise``) and handed to the stock text-to-image
pipeline, whose prompt encoding, classifier-free guidance, scheduler and decoding run unchanged.

The condition sits in both guidance branches (the WebUI's "balanced" mode), at ``scale`` over the steps
from ``start`` to ``end`` (diffusers' ``control_guidance_start``/``end`` rule). Several adapters, of any kinds that
add to the UNet's call (residuals, features, a hooked block), control one generation together, each with its own
condition, scale, start and end; their additions are summed, as diffusers' MultiControlNet sums its nets'.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from ..models.architectures.base import fused_alone, run_controlled
from ..pixels import condition_range, is_condition_set, stack_maps


class ControlledUNet(nn.Module):
    """A locked UNet and one or more control adapters, called as the pipeline calls its UNet. Set ``conds`` (per
    adapter, one condition per image, [0, 1] floats) and ``reset(steps)`` before each pipeline call. Several adapters
    share one UNet call (``architectures.base.run_controlled``), each at its own scale between its own start and end."""

    def __init__(self, unet, adapters, scales=None, starts=None, ends=None):
        super().__init__()
        adapters = list(adapters) if isinstance(adapters, list | tuple) else [adapters]
        n = len(adapters)
        self.unet, self.adapters = unet, nn.ModuleList(adapters)
        self.scales = list(scales) if scales is not None else [1.0] * n
        self.starts = list(starts) if starts is not None else [0.0] * n
        self.ends = list(ends) if ends is not None else [1.0] * n
        fused = [a for a in adapters if not a.composable]
        if n > 1 and fused:
            raise fused_alone(fused[0].name)
        self.config = unet.config  # what the pipeline reads: sample_size, in_channels, time_cond_proj_dim
        self.conds: list[torch.Tensor] | None = None
        self.reset(1)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def reset(self, steps: int) -> None:
        self.steps, self.calls, self.prepared = steps, 0, {}

    def _cond(self, k: int, sample) -> torch.Tensor:
        repeat = sample.shape[0] // self.conds[k].shape[0]  # classifier-free guidance doubles the batch
        key = (k, repeat, sample.device, sample.dtype)
        if key not in self.prepared:  # one tensor per generation: adapters may cache what depends on it alone
            self.prepared[key] = torch.cat([self.conds[k]] * repeat).to(sample.device, sample.dtype)
        return self.prepared[key]

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True, **unused):
        if self.conds is None:
            raise RuntimeError("ControlledUNet: set .conds before running the pipeline")
        i, n = self.calls, self.steps
        self.calls += 1
        # one call per denoising step (guidance batches both branches): each unit between its start and end only
        active = [(k, a, self.scales[k]) for k, a in enumerate(self.adapters)
                  if self.scales[k] != 0 and not (i / n < self.starts[k] or (i + 1) / n > self.ends[k])]
        if not active:
            return (self.unet(sample, timestep, encoder_hidden_states).sample,)
        if len(self.adapters) == 1:  # one adapter: its own predict_noise (a fused one has nothing else)
            k, adapter, scale = active[0]
            return (adapter.predict_noise(self.unet, sample, timestep, encoder_hidden_states, self._cond(k, sample),
                                          scale),)
        controls = [a.control(self.unet, sample, timestep, encoder_hidden_states, self._cond(k, sample), scale)
                    for k, a, scale in active]
        return (run_controlled(self.unet, sample, timestep, encoder_hidden_states, controls),)


def condition_tensor(conditions) -> torch.Tensor:
    """PIL or HxWx3 uint8 conditions -> (N, 3, H, W) floats in [0, 1], what the adapters were trained on
    (``cnkit.pixels.condition_range``); a set of maps per image (a multi-condition net's; None for a missing map)
    -> (N, 3n, H, W), the maps on the channel axis in order, as training stacks them."""
    arrays = [stack_maps(c) if is_condition_set(c) else np.asarray(c.convert("RGB") if hasattr(c, "convert") else c)
              for c in conditions]
    return condition_range(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))


def adapter_pipeline(pipe, scheduler, adapters, scales=None, starts=None, ends=None) -> StableDiffusionPipeline:
    """diffusers' text-to-image pipeline over ``pipe``'s components with ``adapters`` (one, or a list that shares each
    UNet call) controlling its UNet, each at its scale from its start to its end; run it through
    ``run_adapter_pipeline``."""
    unet = ControlledUNet(pipe.unet, adapters, scales, starts, ends)
    run = StableDiffusionPipeline(**{**pipe.components, "unet": unet, "scheduler": scheduler},
                                  requires_safety_checker=False)
    run.set_progress_bar_config(disable=True)
    return run.to(pipe.device)  # adapters are read onto the CPU; the base may be on a GPU


def run_adapter_pipeline(run: StableDiffusionPipeline, conditions, num_images_per_prompt: int = 1, **call):
    """``run(**call)`` under control. ``conditions``: one per prompt, or with several adapters, per prompt a list of
    one condition per adapter. Each prompt's images share its conditions."""
    n = len(run.unet.adapters)
    per_adapter = [conditions] if n == 1 else [[item[k] for item in conditions] for k in range(n)]
    run.unet.conds = [condition_tensor(c).repeat_interleave(num_images_per_prompt, 0) for c in per_adapter]
    run.unet.reset(call["num_inference_steps"])
    try:
        return run(**call, num_images_per_prompt=num_images_per_prompt)
    finally:
        run.unet.conds, run.unet.prepared = None, {}
