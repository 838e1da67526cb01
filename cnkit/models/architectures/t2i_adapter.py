"""T2I-Adapter (Mou et al. 2023, arXiv 2302.08453) through diffusers' ``T2IAdapter``.

A small convolutional encoder of the condition alone (no timestep, no text: it can run once per generation) gives
one feature map per UNet down block. diffusers' ``UNet2DConditionModel.forward`` consumes them from
``down_intrablock_additional_residuals`` in order, popping one per down block: a cross-attention block adds its
feature after its last resnet/attention layer, before its downsampler; a plain block adds it to the block's output
(after its downsampler, if any). So feature k has block k's channels and, in SD's layout (three cross-attention
blocks then one plain block without a downsampler), the size latent / 2^k. ``build`` derives the expected shapes
from the UNet's config and refuses an adapter whose features would not fit.

Matching the base: ``channels`` = the UNet's ``block_out_channels`` (``full_adapter``; ``light_adapter`` makes one
more feature than it has channels, repeating the last, so it takes all but the last and needs the last two blocks
equally wide, as SD's 1280, 1280 and the tiny base's 64, 64 are); the pixel-unshuffle ``downscale_factor`` = the
VAE's factor, so the first feature is at latent resolution and the adapter's ``total_downscale_factor`` is the VAE
factor x 2^(blocks - 1) (64 for SD 1.5, 32 for the tiny base). ``num_res_blocks``: 2 (full) / 4 (light), as the
released adapters.

Step 0: the adapter is not zero-initialised (neither in the paper nor in diffusers), so its features change the base's
output from the first step. ``conditioning_scale`` multiplies every feature (diffusers' ``adapter_conditioning_scale``).
Checkpoints: ``T2IAdapter.from_pretrained(folder)``; ``StableDiffusionAdapterPipeline(adapter=...)`` generates.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import T2IAdapter

from .base import ControlAdapter, UNetControl, check_condition, check_factor, seeded

ADAPTER_TYPES = {"full_adapter": 2, "light_adapter": 4}  # type: released num_res_blocks


def feature_shapes(unet, latent_size: int) -> list[tuple[int, int]]:
    """(channels, size) that each down block of ``unet`` accepts from ``down_intrablock_additional_residuals``."""
    shapes, size = [], latent_size
    for block, channels in zip(unet.down_blocks, unet.config.block_out_channels):
        down = getattr(block, "downsamplers", None) is not None
        if getattr(block, "has_cross_attention", False):
            shapes.append((channels, size))  # added before the downsampler
        else:
            shapes.append((channels, size // 2 if down else size))  # added to the block's output
        size = size // 2 if down else size
    return shapes


class T2IAdapterArchitecture(ControlAdapter):
    name = "t2i-adapter"
    loads_with = "diffusers.T2IAdapter"
    preserves_base_at_init = False

    @classmethod
    def build(cls, unet, vae_scale_factor: int = 8, seed: int | None = None, adapter_type: str = "full_adapter",
              num_res_blocks: int | None = None, conditioning_channels: int = 3):
        if adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"unknown adapter_type {adapter_type!r}; known: {', '.join(ADAPTER_TYPES)}")
        check_factor(vae_scale_factor)
        blocks = list(unet.config.block_out_channels)
        if adapter_type == "light_adapter":
            if len(blocks) < 2 or blocks[-1] != blocks[-2]:
                raise ValueError(f"light_adapter repeats its last width for the last block: it needs the UNet's last "
                                 f"two blocks equally wide, this UNet's are {blocks}; use full_adapter")
            channels = blocks[:-1]
        else:
            channels = blocks
        with seeded(seed):
            net = T2IAdapter(in_channels=conditioning_channels, channels=channels,
                             num_res_blocks=num_res_blocks or ADAPTER_TYPES[adapter_type],
                             downscale_factor=vae_scale_factor, adapter_type=adapter_type)
        unet.requires_grad_(False)
        adapter = cls(net, vae_scale_factor)
        adapter.check_fits(unet)
        return adapter

    @classmethod
    def load_net(cls, folder: Path):
        return T2IAdapter.from_pretrained(str(folder))

    def check_fits(self, unet) -> None:
        """Refuse an adapter whose features do not fit ``unet``'s down blocks, naming both."""
        size = unet.config.sample_size
        size = size[0] if isinstance(size, list | tuple) else size
        p = next(self.net.parameters())
        probe = torch.zeros(1, self.net.config.in_channels, size * self.vae_scale_factor,
                            size * self.vae_scale_factor, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            have = [(f.shape[1], f.shape[-1]) for f in self.net(probe)]
        want = feature_shapes(unet, size)
        if have != want:
            raise ValueError(f"this T2I-Adapter's features (channels, size) {have} do not fit the UNet's down blocks, "
                             f"which take {want} at latent size {size}")

    def features(self, cond, conditioning_scale: float = 1.0) -> list[torch.Tensor]:
        """One feature per down block (the condition alone: no timestep, no text)."""
        return [f * conditioning_scale for f in self.net(cond)]

    def control(self, unet, sample, timestep, encoder_hidden_states, cond, conditioning_scale: float = 1.0):
        check_condition(self.name, sample, cond, self.vae_scale_factor, self.net.config.in_channels)
        # The method's point: the features depend on the condition alone, so a denoising loop (no gradients) that
        # passes the same condition tensor at every step computes them once per generation, not once per step.
        cached = getattr(self, "_once", None)
        if torch.is_grad_enabled() or cached is None or cached[0] is not cond or cached[1] != conditioning_scale:
            cached = (cond, conditioning_scale, self.features(cond, conditioning_scale))
            self._once = None if torch.is_grad_enabled() else cached
        return UNetControl({"down_intrablock_additional_residuals": cached[2]})  # run_controlled copies the list

    def injection_points(self):
        return [(f"adapter.body.{k}", block) for k, block in enumerate(self.net.adapter.body)]

    @torch.no_grad()
    def injections(self, unet, sample, timestep, encoder_hidden_states, cond):
        return self.features(cond)
