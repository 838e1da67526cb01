"""ControlNet-XS (Zavadski, Feiden, Rother 2023, arXiv 2312.06573) through diffusers' own classes.

The control net is a small UNet encoder (``ControlNetXSAdapter``, channels ``size_ratio`` x the base's) that runs
beside the base's encoder and talks to it at every sub-block both ways: before each base sub-block the base's
features go into the control branch (``base_to_ctrl``, zero 1x1 convolutions, concatenated), after it the control
branch's features come back (``ctrl_to_base``, zero 1x1 convolutions, added, times ``conditioning_scale``); the
control's encoder features also reach the base's decoder (``up_connections``). diffusers runs the pair as one
``UNetControlNetXSModel``.

The base stays locked and is not copied. ``UNetControlNetXSModel.from_unet(unet, adapter)`` builds a fused model and
*copies* into it the base's weights (``load_state_dict``) and the adapter's (its blocks are new modules); training
that copy would leave the adapter, the thing to save, untrained, and would hold the base twice. So the fused model
is built on the meta device (no memory, nothing copied) and every one of its modules is then replaced by the very
module it would have been copied from (the base UNet's, locked; the adapter's, trainable): the fused model's
parameters are exactly the base's and the adapter's, which ``fused()`` checks. Only the adapter is a registered
submodule, so ``trainable_parameters()`` and ``state_dict()`` are the adapter's, and
``ControlNetXSAdapter.from_pretrained(folder)`` loads the checkpoint (diffusers' deprecated
``StableDiffusionControlNetXSPipeline(unet=..., controlnet=adapter)`` builds the same fused model from it, by copying,
for generation).

Its condition encoder is ``ControlNetConditioningEmbedding`` with diffusers' default (16, 32, 96, 256), a factor of
8; here it is matched to the base's VAE factor (4 for the tiny base: (16, 32, 96)). Attention heads default to the
base's, reduced to a divisor of each control block's width. diffusers' classes support SD and SDXL layouts only: 2
layers per down block, 3 per up block, 4 latent channels (checked). Step 0: every ``ctrl_to_base`` is zero, so the
controlled output equals the base's.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import ControlNetXSAdapter, UNetControlNetXSModel
from torch import nn

from ..controlnets import condition_encoder_channels
from .base import ControlAdapter, check_condition, seeded


@contextmanager
def _quiet_diffusers():
    """Silence diffusers' "modules that should be kept in float32: []" warning, which its from_unet calls raise
    for every model (the list is empty: nothing to keep)."""
    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_layout(unet) -> None:
    c = unet.config
    problems = []
    if c.layers_per_block != 2:
        problems.append(f"layers_per_block={c.layers_per_block} (diffusers' ControlNet-XS supports 2)")
    if c.in_channels != 4 or c.out_channels != 4:
        problems.append(f"{c.in_channels} in / {c.out_channels} out latent channels (it supports 4)")
    unknown = set(c.down_block_types) - {"CrossAttnDownBlock2D", "DownBlock2D"}
    unknown |= set(c.up_block_types) - {"CrossAttnUpBlock2D", "UpBlock2D"}
    if unknown or c.mid_block_type not in (None, "UNetMidBlock2DCrossAttn"):
        problems.append(f"blocks {sorted(unknown) or c.mid_block_type} (it supports SD's and SDXL's)")
    if problems:
        raise ValueError("ControlNet-XS cannot drive this UNet: " + "; ".join(problems))


def _tie(fused: UNetControlNetXSModel, unet, adapter: ControlNetXSAdapter) -> None:
    """Replace every module of ``fused`` by the base's or the adapter's module it was copied from."""
    for m in ("time_embedding", "conv_in", "conv_norm_out", "conv_out", "add_time_proj", "add_embedding"):
        if getattr(fused, "base_" + m, None) is not None:
            setattr(fused, "base_" + m, getattr(unet, m))
    fused.controlnet_cond_embedding = adapter.controlnet_cond_embedding
    fused.ctrl_conv_in = adapter.conv_in
    fused.ctrl_time_embedding = adapter.time_embedding
    fused.control_to_base_for_conv_in = adapter.control_to_base_for_conv_in
    for f, b, c in zip(fused.down_blocks, unet.down_blocks, adapter.down_blocks):
        f.base_resnets, f.ctrl_resnets = b.resnets, c.resnets
        if isinstance(f.base_attentions, nn.ModuleList):
            f.base_attentions, f.ctrl_attentions = b.attentions, c.attentions
        if f.base_downsamplers is not None:
            f.base_downsamplers, f.ctrl_downsamplers = b.downsamplers[0], c.downsamplers
        f.base_to_ctrl, f.ctrl_to_base = c.base_to_ctrl, c.ctrl_to_base
    fm, am = fused.mid_block, adapter.mid_block
    fm.base_midblock, fm.ctrl_midblock = unet.mid_block, am.midblock
    fm.base_to_ctrl, fm.ctrl_to_base = am.base_to_ctrl, am.ctrl_to_base
    for f, b, c in zip(fused.up_blocks, unet.up_blocks, adapter.up_connections):
        f.resnets = b.resnets
        if isinstance(f.attentions, nn.ModuleList):
            f.attentions = b.attentions
        if f.upsamplers is not None:
            f.upsamplers = b.upsamplers[0]
        f.ctrl_to_base = c.ctrl_to_base


class ControlNetXS(ControlAdapter):
    name = "controlnet-xs"
    loads_with = "diffusers.ControlNetXSAdapter"
    preserves_base_at_init = True

    def __init__(self, net: ControlNetXSAdapter, vae_scale_factor: int):
        super().__init__(net, vae_scale_factor)
        # The fused model is deliberately not a registered submodule (its parameters are the base's and net's).
        self.__dict__["_fused"] = None
        self.__dict__["_fused_unet"] = None

    @classmethod
    def build(cls, unet, vae_scale_factor: int = 8, seed: int | None = None, size_ratio: float = 0.125,
              learn_time_embedding: bool = False, conditioning_channels: int = 3):
        """``size_ratio``: the control branch's width over the base's (diffusers' SD default, (4, 8, 16, 16), is
        0.0125 of SD 1.5; the paper's SD variants have 14M, 55M and 491M parameters). ``learn_time_embedding``:
        the control branch gets its own time embedding (diffusers' option)."""
        _check_layout(unet)
        channels = [int(b * size_ratio) for b in unet.config.block_out_channels]
        if min(channels) < 1:
            raise ValueError(f"size_ratio={size_ratio} leaves a control block without channels: {channels}")
        heads = unet.config.attention_head_dim
        heads = heads if isinstance(heads, list | tuple) else [heads] * len(channels)
        heads = [math.gcd(h, c) for h, c in zip(heads, channels)]
        with seeded(seed), _quiet_diffusers():
            net = ControlNetXSAdapter.from_unet(
                unet, block_out_channels=channels, num_attention_heads=heads,
                learn_time_embedding=learn_time_embedding, conditioning_channels=conditioning_channels,
                conditioning_embedding_out_channels=condition_encoder_channels(vae_scale_factor))
        unet.requires_grad_(False)
        adapter = cls(net, vae_scale_factor)
        adapter.fused(unet)  # fails now, not at the first step, if the pair cannot be fused
        return adapter

    @classmethod
    def load_net(cls, folder: Path):
        return ControlNetXSAdapter.from_pretrained(str(folder))

    def fused(self, unet) -> UNetControlNetXSModel:
        """diffusers' fused model of ``unet`` and this adapter, sharing both's modules (built once per UNet)."""
        if self._fused_unet is not unet:
            _check_layout(unet)
            # Built on the meta device (no memory, no copy of the base): _tie replaces every module with weights.
            with warnings.catch_warnings(), _quiet_diffusers(), torch.device("meta"):
                warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
                fused = UNetControlNetXSModel.from_unet(unet, self.net)
            _tie(fused, unet, self.net)
            own = {id(p) for p in fused.parameters()}
            parts = {id(p) for p in unet.parameters()} | {id(p) for p in self.net.parameters()}
            used = {id(p) for m in (unet.time_embedding, unet.conv_in, unet.conv_norm_out, unet.conv_out,
                                    unet.down_blocks, unet.mid_block, unet.up_blocks) for p in m.parameters()}
            if not own <= parts or not used <= own or any(b.is_meta for b in fused.buffers()):
                raise RuntimeError("the fused ControlNet-XS model holds parameters that are neither the base's nor "
                                   "the adapter's (diffusers' UNetControlNetXSModel changed?)")
            self.__dict__["_fused"], self.__dict__["_fused_unet"] = fused, unet
        return self._fused

    def predict_noise(self, unet, sample, timestep, encoder_hidden_states, cond, conditioning_scale: float = 1.0):
        check_condition(self.name, sample, cond, self.vae_scale_factor, self.net.config.conditioning_channels)
        return self.fused(unet)(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=cond,
                     conditioning_scale=conditioning_scale, return_dict=False)[0]

    def injection_points(self):
        net = self.net
        points = [("control_to_base_for_conv_in", net.control_to_base_for_conv_in)]
        for i, block in enumerate(net.down_blocks):
            points += [(f"down_blocks.{i}.ctrl_to_base.{j}", m) for j, m in enumerate(block.ctrl_to_base)]
        points.append(("mid_block.ctrl_to_base", net.mid_block.ctrl_to_base))
        for i, block in enumerate(net.up_connections):
            points += [(f"up_connections.{i}.ctrl_to_base.{j}", m) for j, m in enumerate(block.ctrl_to_base)]
        return points
