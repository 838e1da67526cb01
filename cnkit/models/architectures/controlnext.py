"""ControlNeXt (Peng et al. 2024, arXiv 2408.06070): a light condition branch and cross normalisation, one injection.

diffusers has no ControlNeXt, so the model is the kit's (``ControlNeXtModel``, a diffusers ``ModelMixin``: its own
``from_pretrained`` loads the safetensors checkpoint). What was followed:

- The paper (arXiv 2408.06070, its method as read for this kit): the heavy trainable copy is replaced by a
  lightweight convolutional module that extracts the condition's features; they are added to the denoising branch
  at a single point, and "cross normalisation" replaces zero convolutions: the control features are normalised with
  the statistics of the main branch's features at that point, so the two are on one scale from the first step and
  the control acts at once (the paper's reason: zero convolutions make training slow to start; the kit's notebook
  04 measures ControlNet's "sudden convergence").
- The authors' released SD 1.5 training code (``ControlNeXt-SD1.5-Training``, dvlab-research/ControlNeXt:
  ``models/controlnext.py`` and ``models/unet.py``), for what the paper leaves open, scaled to the base's width:
  the module is a stride-2 convolutional embedding of the condition (three 3x3 convolutions with GroupNorm and
  ReLU), two stages of (``ResnetBlock2D`` with the timestep embedding, ``Downsample2D``), a residual pair of 3x3
  convolutions and a 1x1 convolution to the injection point's width; it sees the timestep but no text. The
  injection point is the output of the UNet's first down block (``down_idx == 0`` in that code; after its
  downsampler, so at half the latent size for SD's layout: the control features are average-pooled to it). Cross
  normalisation as that code computes it: per item, the control features are standardised by their own mean and
  standard deviation over (channels, height, width), given the main features' mean and standard deviation, and
  added times a fixed ``scale`` (1.0, the code's ``controlnext_scale``) times ``conditioning_scale``. Only the
  main path into the next block gets it; the first block's skip connections are left as they are, as there.
  (The paper's cross-normalisation equation, as v2 of the arXiv text gives it, is x_c' = gamma (x_c - mu_m) /
  sqrt(sigma_m^2 + eps): the main branch's statistics alone, a scale gamma and no shift. The released code, which
  matches both mean and spread, is what the authors trained, so it is followed here.) Widths: the code's SD 1.5
  module (embedding 64/128, stages 128 and 256, time embedding 256, output 320) is ``width_ratio`` 0.4 of SD's
  first block width (320); the tiny base (32) gets 16/32 (rounded up to multiples of 8).
- Left out: the authors also unfreeze a chosen part of the base UNet; here the base stays locked (the bench's rule)
  and only the module trains.

Step 0: the method does NOT leave the base unchanged at initialisation: by construction the injected features have
the main features' standard deviation, so the controlled output differs from the base's from the first step (the
point of cross normalisation). The single injection point is ``cross_norm`` (parameter-free); its output, before the
scales, is what ``injections`` reports.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from torch import nn

from .base import ControlAdapter, UNetControl, check_condition, check_factor, seeded


class CrossNormalization(nn.Module):
    """The control features pooled to the main features' size, given the main features' per-item mean and
    standard deviation (over channels, height, width). No parameters: the injection point of ControlNeXt."""

    def forward(self, control: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
        control = F.adaptive_avg_pool2d(control, main.shape[-2:]).to(main.dtype)
        dims = (1, 2, 3)
        mean_m, std_m = main.mean(dims, keepdim=True), main.std(dims, keepdim=True)
        mean_c, std_c = control.mean(dims, keepdim=True), control.std(dims, keepdim=True)
        return (control - mean_c) * (std_m / (std_c + 1e-12)) + mean_m


class ControlNeXtModel(ModelMixin, ConfigMixin):
    """ControlNeXt's condition branch (see the module docstring): condition image (and timestep) -> features of
    ``out_channels`` at latent resolution."""

    @register_to_config
    def __init__(self, conditioning_channels: int = 3, vae_scale_factor: int = 8,
                 channels: tuple[int, int] = (128, 256), out_channels: int = 320, inject_after_block: int = 0,
                 scale: float = 1.0):
        super().__init__()
        c0, c1 = channels
        e = c0 // 2
        self.time_proj = Timesteps(c0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(c0, c1)
        self.embedding = nn.Sequential(
            nn.Conv2d(conditioning_channels, e, 3, stride=2, padding=1), nn.GroupNorm(2, e), nn.ReLU(),
            nn.Conv2d(e, e, 3, padding=1), nn.GroupNorm(2, e), nn.ReLU(),
            nn.Conv2d(e, c0, 3, padding=1), nn.GroupNorm(2, c0), nn.ReLU(),
        )
        # The embedding halves the size; the stages halve it log2(factor) - 1 more times (SD's 8: both stages).
        downs = check_factor(vae_scale_factor) - 1
        self.down_res = nn.ModuleList([ResnetBlock2D(in_channels=c0, out_channels=c0, temb_channels=c1, groups=4),
                                       ResnetBlock2D(in_channels=c0, out_channels=c1, temb_channels=c1, groups=8)])
        self.down_sample = nn.ModuleList([
            Downsample2D(c, use_conv=True, out_channels=c, padding=1, name="op") if i < downs else nn.Identity()
            for i, c in enumerate(channels)])
        self.mid_convs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, c1),
                          nn.Conv2d(c1, c1, 3, padding=1), nn.GroupNorm(8, c1)),
            nn.Conv2d(c1, out_channels, 1),
        ])
        self.cross_norm = CrossNormalization()

    def forward(self, cond: torch.Tensor, timestep) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=cond.device)
        t = t[None] if t.ndim == 0 else t
        emb = self.time_embedding(self.time_proj(t.expand(cond.shape[0])).to(cond.dtype))
        h = self.embedding(cond)
        for res, down in zip(self.down_res, self.down_sample):
            h = down(res(h, emb))
        h = self.mid_convs[0](h) + h
        return self.mid_convs[1](h)


def _width(c: float) -> int:
    return max(8, math.ceil(c / 8) * 8)


class ControlNeXt(ControlAdapter):
    name = "controlnext"
    loads_with = "cnkit.models.architectures.controlnext.ControlNeXtModel"
    preserves_base_at_init = False

    @classmethod
    def build(cls, unet, vae_scale_factor: int = 8, seed: int | None = None, width_ratio: float = 0.4,
              inject_after_block: int = 0, scale: float = 1.0, conditioning_channels: int = 3):
        """``width_ratio`` x the UNet's first block width = the first stage's width (0.4: the released SD 1.5
        module's 128 for SD's 320); the second stage is twice that. ``inject_after_block``: which down block's
        output gets the control (0, the released code's)."""
        blocks = unet.config.block_out_channels
        if not 0 <= inject_after_block < len(blocks):
            raise ValueError(f"inject_after_block must name one of the UNet's {len(blocks)} down blocks")
        c0 = _width(width_ratio * blocks[0])
        with seeded(seed):
            net = ControlNeXtModel(conditioning_channels, vae_scale_factor, (c0, 2 * c0), blocks[inject_after_block],
                                   inject_after_block, scale)
        unet.requires_grad_(False)
        return cls(net, vae_scale_factor)

    @classmethod
    def load_net(cls, folder: Path):
        return ControlNeXtModel.from_pretrained(str(folder))

    def control(self, unet, sample, timestep, encoder_hidden_states, cond, conditioning_scale: float = 1.0):
        check_condition(self.name, sample, cond, self.vae_scale_factor, self.net.config.conditioning_channels)
        control = self.net(cond.to(sample.dtype), timestep)
        weight = self.net.config.scale * conditioning_scale

        def inject(block, args, output):
            main, skips = output
            return main + self.net.cross_norm(control, main) * weight, skips

        return UNetControl(hooks=[(unet.down_blocks[self.net.config.inject_after_block], inject)])

    def injection_points(self):
        return [("cross_norm", self.net.cross_norm)]
