"""ControlNet variants built from any UNet: the paper's model and its Fig. 8 ablations.

- ``zero`` (the paper): diffusers' ``ControlNetModel.from_unet``. A trainable copy of the UNet's
  encoder and middle block, fed the noisy latent plus an embedding of the condition image; its 13
  outputs reach the locked UNet through 1x1 convolutions whose weight and bias start at zero. At
  step 0 the controlled UNet equals the base bit for bit, and the gradient reaches only the zero
  convolutions (everything before them is multiplied by a zero weight).
- ``gaussian`` (Fig. 8b): the same network, but those 1x1 convolutions (and the condition
  embedding's last convolution, also zero in the paper's code) start from Gaussian weights, so
  the untrained copy's features disturb the base from step 0.
- ``lite`` (Fig. 8c, "ControlNet-lite"): each trainable block replaced by a single convolution;
  the condition embedding and the zero convolutions stay. No timestep or text reaches it.

Every variant is called like a diffusers ControlNet,
``net(sample, t, encoder_hidden_states=..., controlnet_cond=..., return_dict=False)``, and returns
``(down_block_res_samples, mid_block_res_sample)`` for the UNet's
``down_block_additional_residuals`` / ``mid_block_additional_residual``.
"""

from __future__ import annotations

import math

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding, ControlNetOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F

VARIANTS = ("zero", "gaussian", "lite")
# The condition encoder's channels in the released code and diffusers; it downsamples once per
# step after the first, so an image-to-latent factor f keeps the first log2(f) + 1 entries.
CONDITION_ENCODER_CHANNELS = (16, 32, 96, 256)


def condition_encoder_channels(vae_scale_factor: int = 8) -> tuple[int, ...]:
    steps = int(math.log2(vae_scale_factor))
    if 2**steps != vae_scale_factor or not 1 <= steps <= 3:
        raise ValueError(f"vae_scale_factor must be 2, 4 or 8 (pixels per latent cell), got {vae_scale_factor}")
    return CONDITION_ENCODER_CHANNELS[: steps + 1]


def make_controlnet(unet: UNet2DConditionModel, variant: str = "zero", *, vae_scale_factor: int = 8,
                    conditioning_channels: int = 3, gaussian_std: float | None = None, seed: int | None = None):
    """Build a ControlNet of ``variant`` for ``unet``.

    ``vae_scale_factor`` is the image-to-latent factor (8 for SD 1.5, 4 for the tiny model): the
    condition image is that many times larger than the latent. ``gaussian_std`` overrides the
    Gaussian variant's standard deviation (default: LeCun's 1/sqrt(fan_in), variance-preserving).
    ``seed`` makes the fresh weights (condition encoder, lite blocks, Gaussian draws) reproducible.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown ControlNet variant {variant!r}; known variants: {', '.join(VARIANTS)}")
    channels = condition_encoder_channels(vae_scale_factor)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):  # leave the caller's RNG alone
        if seed is not None:
            torch.manual_seed(seed)
        if variant == "lite":
            return ControlNetLiteModel.from_unet(unet, channels, conditioning_channels)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels,
                                        conditioning_channels=conditioning_channels)
        if variant == "gaussian":
            for _, conv in zero_convolutions(net, include_condition_encoder=True):
                std = gaussian_std if gaussian_std is not None else 1 / math.sqrt(conv.weight[0].numel())
                nn.init.normal_(conv.weight, std=std)
                nn.init.zeros_(conv.bias)
    return net


def zero_convolutions(net, include_condition_encoder: bool = False) -> list[tuple[str, nn.Conv2d]]:
    """The connections into the UNet, in the UNet's order: 12 skips then the middle block (13 for
    SD's layout); optionally the condition encoder's last convolution, also zero at the start."""
    convs = [(f"controlnet_down_blocks.{i}", m) for i, m in enumerate(net.controlnet_down_blocks)]
    convs.append(("controlnet_mid_block", net.controlnet_mid_block))
    if include_condition_encoder:
        convs.append(("controlnet_cond_embedding.conv_out", net.controlnet_cond_embedding.conv_out))
    return convs


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _scale(down, mid, conditioning_scale: float, guess_mode: bool):
    # Same scaling rule as diffusers' ControlNetModel: guess mode ramps 0.1 -> 1 from shallow to deep.
    if guess_mode:
        scales = torch.logspace(-1, 0, len(down) + 1, device=mid.device) * conditioning_scale
        return [d * s for d, s in zip(down, scales)], mid * scales[-1]
    return [d * conditioning_scale for d in down], mid * conditioning_scale


class ControlNetLiteModel(ModelMixin, ConfigMixin):
    """ControlNet-lite (paper Fig. 8c): one convolution per trainable block, zero convolutions kept.

    For each of the UNet's down-path outputs (conv_in, each resnet layer, each downsampler) and
    the middle block there is one 3x3 convolution (stride 2 where the UNet downsamples) followed by
    SiLU and a zero 1x1 convolution, so residual shapes equal the full ControlNet's.
    """

    @register_to_config
    def __init__(self, in_channels: int = 4, block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
                 layers_per_block: int = 2, conditioning_channels: int = 3,
                 conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                 global_pool_conditions: bool = False):
        # global_pool_conditions: read by diffusers' ControlNet pipelines from every net's config.
        super().__init__()
        c0 = block_out_channels[0]
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            c0, conditioning_channels, tuple(conditioning_embedding_out_channels))
        self.blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([_zero_conv(c0)])
        prev = c0
        for b, ch in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                self.blocks.append(nn.Conv2d(prev, ch, 3, padding=1))
                self.controlnet_down_blocks.append(_zero_conv(ch))
                prev = ch
            if b < len(block_out_channels) - 1:  # the UNet downsamples after every block but the last
                self.blocks.append(nn.Conv2d(ch, ch, 3, padding=1, stride=2))
                self.controlnet_down_blocks.append(_zero_conv(ch))
        self.mid_block = nn.Conv2d(prev, prev, 3, padding=1)
        self.controlnet_mid_block = _zero_conv(prev)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, conditioning_embedding_out_channels=(16, 32, 96, 256),
                  conditioning_channels: int = 3) -> ControlNetLiteModel:
        c = unet.config
        return cls(in_channels=c.in_channels, block_out_channels=tuple(c.block_out_channels),
                   layers_per_block=c.layers_per_block, conditioning_channels=conditioning_channels,
                   conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))

    def forward(self, sample, timestep=None, encoder_hidden_states=None, controlnet_cond=None,
                conditioning_scale: float = 1.0, guess_mode: bool = False, return_dict: bool = True,
                **unused):
        # timestep and text are accepted for the common call signature; lite ignores them by design.
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond.to(sample.dtype))
        down = [self.controlnet_down_blocks[0](h)]
        for block, zero in zip(self.blocks, self.controlnet_down_blocks[1:]):
            h = F.silu(block(h))
            down.append(zero(h))
        mid = self.controlnet_mid_block(F.silu(self.mid_block(h)))
        down, mid = _scale(down, mid, conditioning_scale, guess_mode)
        if not return_dict:
            return down, mid
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)


def connection_table(net, unet: UNet2DConditionModel, vae_scale_factor: int = 8) -> list[dict]:
    """One row per connection into the UNet, measured by running ``net`` once on zeros.

    ``sd_latent_size`` is the latent size the connection would have in SD 1.5 (latent 64), the
    ``h_i`` of the paper's CFG resolution weighting ``w_i = 64 / h_i``.
    """
    size = unet.config.sample_size
    size = size[0] if isinstance(size, list | tuple) else size
    param = next(net.parameters())
    sample = torch.zeros(1, unet.config.in_channels, size, size, dtype=param.dtype, device=param.device)
    text = torch.zeros(1, 1, unet.config.cross_attention_dim, dtype=param.dtype, device=param.device)
    cond = torch.zeros(1, net.config.conditioning_channels, size * vae_scale_factor, size * vae_scale_factor,
                       dtype=param.dtype, device=param.device)
    with torch.no_grad():
        down, mid = net(sample, 0, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
    names = [n for n, _ in zero_convolutions(net)]
    rows = []
    for i, (name, r) in enumerate(zip(names, [*down, mid])):
        rows.append({"connection": i, "name": name, "kind": "middle" if i == len(down) else "skip",
                     "channels": r.shape[1], "latent_size": r.shape[-1],
                     "sd_latent_size": r.shape[-1] * 64 // size})
    return rows
