"""The embedded default: a tiny Stable Diffusion with SD 1.5's parts and shape.

Real SD weights cannot be downloaded on build machines and cannot be trained against on a laptop
CPU in minutes. So the kit ships its own text-to-image model, built from the same diffusers and
transformers classes as SD 1.5 and loadable by the stock ``StableDiffusionPipeline``:

- 64x64 RGB images; ``AutoencoderKL`` with three encoder levels (a downsampling factor of 4, SD: 8),
  so latents are 4x16x16 (SD: 4x64x64);
- ``UNet2DConditionModel`` with SD 1.5's block layout: three cross-attention down blocks, one plain
  block, two layers per block. A ControlNet built from it therefore has SD's 13 connections
  (conv_in + 2 per block + 3 downsamplers = 12 skips, plus the middle block) at latent sizes
  16, 8, 4, 2 (SD: 64, 32, 16, 8);
- a small ``CLIPTextModel`` and an offline ``CLIPTokenizer`` (``cnkit.models.tokenizer``), 77 tokens;
- SD 1.5's noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps), DDIM for sampling.

Nothing else in the kit special-cases this model; every path also takes real SD 1.5.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..data.toyworld import VOCABULARY
from .tokenizer import BOS, EOS, MAX_LENGTH, build_tokenizer

# SD 1.5's scheduler settings (its scheduler_config.json), shared by training and sampling.
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1, prediction_type="epsilon")


@dataclass
class TinySDConfig:
    """Sizes of the embedded model; defaults are what ``data/tiny-sd`` ships."""

    image_size: int = 64
    vae_channels: tuple[int, ...] = (32, 64, 64)  # three levels: downsampling factor 4
    vae_layers_per_block: int = 2
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 64, 64)  # SD 1.5: (320, 640, 1280, 1280)
    unet_layers_per_block: int = 2
    attention_heads: int = 4
    norm_num_groups: int = 8
    text_width: int = 64  # SD 1.5: 768
    text_layers: int = 2
    text_heads: int = 4


def _vae(c: TinySDConfig) -> AutoencoderKL:
    n = len(c.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=c.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=c.vae_channels, layers_per_block=c.vae_layers_per_block,
        norm_num_groups=c.norm_num_groups, sample_size=c.image_size,
        scaling_factor=1.0,  # pretraining sets it to 1 / std of the latents, as SD's 0.18215 was chosen
    )


def _unet(c: TinySDConfig) -> UNet2DConditionModel:
    factor = 2 ** (len(c.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=c.image_size // factor, in_channels=c.latent_channels, out_channels=c.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=c.unet_channels, layers_per_block=c.unet_layers_per_block,
        cross_attention_dim=c.text_width, attention_head_dim=c.attention_heads,
        norm_num_groups=c.norm_num_groups,
    )


def _text_encoder(c: TinySDConfig, tokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=c.text_width, intermediate_size=4 * c.text_width,
        num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads,
        max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS), pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
    )
    return CLIPTextModel(config)


def build_tiny_sd(seed: int = 0, config: TinySDConfig | None = None, words=VOCABULARY) -> StableDiffusionPipeline:
    """The embedded model's architecture with fresh weights drawn after ``torch.manual_seed(seed)``; its tokenizer
    has a whole-word token for each of ``words`` (the toy worlds' vocabulary)."""
    c = config or TinySDConfig()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(words, tmp)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vae, unet, text_encoder = _vae(c), _unet(c), _text_encoder(c, tokenizer)
    finally:
        torch.random.set_rng_state(gen_state)  # building a model must not disturb the caller's seed
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
