"""The paper's ControlNet and its Fig. 8 ablations (Gaussian, lite) behind the ``ControlAdapter`` interface.

Nothing new is built here: ``cnkit.models.controlnets.make_controlnet`` makes the net (``zero``: diffusers'
``ControlNetModel.from_unet``; ``gaussian``; ``lite``: the kit's ``ControlNetLiteModel``), and ``predict_noise`` is
the computation of ``cnkit.training.train.Trainer.loss`` today, bit for bit: the net's 12 skip residuals and
middle residual go to the UNet's ``down_block_additional_residuals`` / ``mid_block_additional_residual`` (``control``).

Injection points: the 13 zero convolutions (``cnkit.models.controlnets.zero_convolutions``). Step 0: the zero and
lite nets leave the base's output unchanged (their injections are exactly zero); the Gaussian net does not (by design).
Checkpoints: the stock ``ControlNetModel.from_pretrained(folder)`` loads zero and Gaussian nets (what the trainer
saves today); ``ControlNetLiteModel.from_pretrained`` the lite one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel

from ..controlnets import (
    ControlNetLiteModel,
    condition_factor,
    make_controlnet,
    watch_condition_size,
    zero_convolutions,
)
from .base import ControlAdapter, UNetControl


class ControlNet(ControlAdapter):
    """The paper's ControlNet (``make_controlnet(unet, "zero")``)."""

    name = "controlnet"
    variant = "zero"
    loads_with = "diffusers.ControlNetModel"
    preserves_base_at_init = True

    @classmethod
    def build(cls, unet, vae_scale_factor: int = 8, seed: int | None = None, conditioning_channels: int = 3,
              gaussian_std: float | None = None):
        net = make_controlnet(unet, cls.variant, vae_scale_factor=vae_scale_factor,
                              conditioning_channels=conditioning_channels, gaussian_std=gaussian_std, seed=seed)
        unet.requires_grad_(False)
        return cls(net, vae_scale_factor)

    @classmethod
    def load_net(cls, folder: Path):
        return watch_condition_size(ControlNetModel.from_pretrained(str(folder)))

    @classmethod
    def factor_of(cls, net):
        return condition_factor(net)

    def residuals(self, sample, timestep, encoder_hidden_states, cond, conditioning_scale: float = 1.0):
        """(12 skip residuals, middle residual), for the UNet's additional-residual arguments."""
        return self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=cond,
                        conditioning_scale=conditioning_scale, return_dict=False)

    def control(self, unet, sample, timestep, encoder_hidden_states, cond, conditioning_scale: float = 1.0):
        down, mid = self.residuals(sample, timestep, encoder_hidden_states, cond, conditioning_scale)
        return UNetControl({"down_block_additional_residuals": down, "mid_block_additional_residual": mid})

    def injection_points(self):
        return zero_convolutions(self.net)

    def watched_points(self):
        return [*self.injection_points(), ("controlnet_cond_embedding.conv_out", self.condition_encoder().conv_out)]

    def condition_encoder(self):
        return self.net.controlnet_cond_embedding

    @torch.no_grad()
    def watched_outputs(self, unet, sample, timestep, encoder_hidden_states, cond):
        return [*self.injections(unet, sample, timestep, encoder_hidden_states, cond), self.condition_encoder()(cond)]

    @torch.no_grad()
    def injections(self, unet, sample, timestep, encoder_hidden_states, cond):
        # The residuals are the zero convolutions' outputs: the base UNet need not run.
        down, mid = self.residuals(sample, timestep, encoder_hidden_states, cond)
        return [*down, mid]


class ControlNetGaussian(ControlNet):
    """Fig. 8b: the same net, its zero convolutions (and the condition encoder's last one) drawn Gaussian."""

    name = "controlnet-gaussian"
    variant = "gaussian"
    preserves_base_at_init = False


class ControlNetLite(ControlNet):
    """Fig. 8c, ControlNet-lite: one convolution per trainable block; the zero convolutions kept."""

    name = "controlnet-lite"
    variant = "lite"
    loads_with = "cnkit.models.controlnets.ControlNetLiteModel"
    preserves_base_at_init = True

    @classmethod
    def load_net(cls, folder: Path):
        return watch_condition_size(ControlNetLiteModel.from_pretrained(str(folder)))
