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

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding, ControlNetOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F

from ..files import check_output, write_folder
from ..params import repo_path
from . import bases, export

VARIANTS = ("zero", "gaussian", "lite")
# The condition encoder's channels in the released code and diffusers; it downsamples once per
# step after the first, so an image-to-latent factor f keeps the first log2(f) + 1 entries.
CONDITION_ENCODER_CHANNELS = (16, 32, 96, 256)


def condition_encoder_channels(vae_scale_factor: int = 8) -> tuple[int, ...]:
    steps = int(math.log2(vae_scale_factor)) if vae_scale_factor > 0 else 0
    if 2**steps != vae_scale_factor or not 1 <= steps <= 3:
        raise ValueError(f"vae_scale_factor must be 2, 4 or 8 (pixels per latent cell), got {vae_scale_factor}")
    return CONDITION_ENCODER_CHANNELS[: steps + 1]


def condition_factor(net) -> int:
    """How many condition pixels make one latent cell for ``net`` (its condition encoder's downsampling)."""
    return 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)


def _unet_and_factor(base, factor: int | None):
    """(UNet, the factor its condition encoder needs) from a pipeline, a base folder or hub id, or a UNet."""
    if isinstance(base, StableDiffusionPipeline):
        found = bases.vae_scale_factor(base.vae)
    elif isinstance(base, str | Path):
        base = bases.load_base(str(base))
        found = bases.vae_scale_factor(base.vae)
    elif isinstance(base, UNet2DConditionModel):
        return base, factor or 8  # a bare UNet says nothing of its VAE: SD's 8 unless told
    else:
        raise TypeError(f"make_controlnet takes a base (pipeline, folder or hub id) or a UNet2DConditionModel, "
                        f"got {type(base).__name__}")
    if factor not in (None, found):
        raise ValueError(f"vae_scale_factor={factor} does not match the base's VAE, which downsamples by "
                         f"{found}; leave vae_scale_factor out to take the base's")
    return base.unet, found


def make_controlnet(base, variant: str = "zero", *, vae_scale_factor: int | None = None,
                    conditioning_channels: int = 3, gaussian_std: float | None = None, seed: int | None = None):
    """Build a ControlNet of ``variant`` for ``base``: a pipeline, a base folder or hub id (the condition
    encoder then matches the base's VAE factor), or a bare UNet (``vae_scale_factor`` says the image-to-latent
    factor: 8 for SD 1.5, the default; 4 for the tiny model).

    ``gaussian_std`` overrides the Gaussian variant's standard deviation (default: LeCun's 1/sqrt(fan_in),
    variance-preserving). ``seed`` makes the fresh weights (condition encoder, lite blocks, Gaussian draws)
    reproducible. A condition whose size does not fit the latents is a clear error at first use.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown ControlNet variant {variant!r}; known variants: {', '.join(VARIANTS)}")
    unet, factor = _unet_and_factor(base, vae_scale_factor)
    channels = condition_encoder_channels(factor)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):  # leave the caller's RNG alone
        if seed is not None:
            torch.manual_seed(seed)
        if variant == "lite":
            net = ControlNetLiteModel.from_unet(unet, channels, conditioning_channels)
        else:
            net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels,
                                            conditioning_channels=conditioning_channels)
        if variant == "gaussian":
            for _, conv in zero_convolutions(net, include_condition_encoder=True):
                std = gaussian_std if gaussian_std is not None else 1 / math.sqrt(conv.weight[0].numel())
                nn.init.normal_(conv.weight, std=std)
                nn.init.zeros_(conv.bias)
    return watch_condition_size(net)


def _check_condition_size(net, args, kwargs) -> None:
    sample = kwargs.get("sample", args[0] if args else None)
    cond = kwargs.get("controlnet_cond", args[3] if len(args) > 3 else None)
    if sample is None or cond is None:
        return
    factor = condition_factor(net)
    if tuple(cond.shape[-2:]) != (sample.shape[-2] * factor, sample.shape[-1] * factor):
        raise ValueError(
            f"condition {cond.shape[-1]}x{cond.shape[-2]} px does not fit latents of {sample.shape[-1]}x"
            f"{sample.shape[-2]}: this ControlNet's condition encoder downsamples by {factor} (conditioning_"
            f"embedding_out_channels={tuple(net.config.conditioning_embedding_out_channels)}), so it needs "
            f"{sample.shape[-1] * factor}x{sample.shape[-2] * factor} px. Either the condition has the wrong size, or "
            "the net was built for a base with another VAE factor: build it with make_controlnet(base) "
            "(the factor is then the base's) or `cnkit init --base BASE`")


def watch_condition_size(net):
    """Make a condition of the wrong size a clear error at ``net``'s first call, instead of torch's tensor-size
    mismatch deep inside the condition encoder. Returns ``net``."""
    if not getattr(net, "_cnkit_watched", False):
        net.register_forward_pre_hook(_check_condition_size, with_kwargs=True)
        net._cnkit_watched = True
    return net


def check_fits(net, pipe) -> None:
    """Refuse a ControlNet that cannot drive the base ``pipe`` (another architecture or VAE factor), naming both."""
    unet, factor = pipe.unet, bases.vae_scale_factor(pipe.vae)
    want = list(unet.config.block_out_channels)
    have = list(net.config.block_out_channels)
    problems = []
    if have != want or net.config.layers_per_block != unet.config.layers_per_block:
        problems.append(f"its blocks are {have} x {net.config.layers_per_block} layers, the base UNet's "
                        f"{want} x {unet.config.layers_per_block}")
    cross = getattr(net.config, "cross_attention_dim", None)
    if cross is not None and cross != unet.config.cross_attention_dim:
        problems.append(f"its text width is {cross}, the base's {unet.config.cross_attention_dim}")
    if condition_factor(net) != factor:
        problems.append(f"its condition encoder downsamples by {condition_factor(net)}, the base's VAE by {factor}")
    if problems:
        raise ValueError("this ControlNet does not fit the base: " + "; ".join(problems)
                         + ". Use a ControlNet trained on this base, or build one with make_controlnet(base)")


def load_controlnet(spec, base_unet: UNet2DConditionModel | None = None):
    """A ControlNet from a model, a local folder, a hub id (stock diffusers or the kit's lite), or a single
    safetensors file in the original ControlNet layout (what the WebUI and ComfyUI load; ``cnkit.models.export``): its
    architecture comes from the config the kit stored in it, else from ``base_unet`` (the base it drives)."""
    if isinstance(spec, torch.nn.Module):
        return watch_condition_size(spec)
    path = repo_path(spec)
    if path.is_file():
        if not export.is_original_layout(path):
            raise ValueError(f"{path} is a file, but not a safetensors file in the original ControlNet layout "
                             "(control_model.* keys): pass a diffusers ControlNet folder (config.json and weights) or "
                             "such a file (cnkit export writes one)")
        stored = export.stored_config(path) is not None
        return watch_condition_size(export.load_original(path, config=None if stored else base_unet))
    if not path.exists() and not _could_be_hub_id(spec):
        raise _load_error(spec, path, FileNotFoundError(str(path)))
    config = path / "config.json"
    try:
        lite = config.is_file() and json.loads(config.read_text()).get("_class_name") == "ControlNetLiteModel"
        net = (ControlNetLiteModel if lite else ControlNetModel).from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - diffusers raises OSError, ValueError, RuntimeError or pickle's errors
        raise _load_error(spec, path, e) from e
    return watch_condition_size(net)


def _load_error(spec, path: Path, e: Exception) -> Exception:
    """Why a ControlNet folder did not load, in words that fit the case."""
    text = bases.error_chain(e)
    chain = text.split(" | ")
    if not path.exists() and not _could_be_hub_id(spec):
        shipped = repo_path("data/controlnets") / str(spec)
        hint = (f" The kit ships a net of that name: {Path('data/controlnets') / str(spec)}."
                if str(spec) and (shipped / "config.json").is_file() else "")
        return FileNotFoundError(f"no ControlNet at {path} (no such folder or file).{hint} Pass a diffusers "
                                 "ControlNet folder (config.json and weights), an original-layout .safetensors file "
                                 "or a hub id")
    if "weights_only" in text or "Unsupported global" in text or "UnpicklingError" in text:
        return ValueError(f"{path} holds only pickle weights that torch refuses to unpickle safely "
                          "(weights_only=True), so they were not loaded: use a checkpoint in safetensors, or "
                          "convert this one on a machine you trust (ControlNetModel.from_pretrained(folder)"
                          ".save_pretrained(folder, safe_serialization=True))")
    said = bases.weights_problem(e, "the ControlNet", path)
    if said is not None:
        return said
    if "size mismatch" in text or ("shape" in text and "config" in text) or "Cannot load" in text:
        return ValueError(f"the weights in {path} do not fit its config.json (they were saved from another "
                          f"architecture): {chain[0][:300]}. Use the config.json saved with these weights")
    return FileNotFoundError(
        f"could not load the ControlNet {spec!r} ({chain[0][:200]}). Pass a local diffusers ControlNet folder "
        "(e.g. data/controlnets/fill-outline), an original-layout .safetensors file, or a hub id on a machine that "
        "can download it (HF_HUB_OFFLINE unset)")


def _could_be_hub_id(spec) -> bool:
    """``owner/name`` that is not a local path: something a hub could serve (where one can be reached)."""
    text = str(spec)
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(parts[0]).exists()
            and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"))


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


def main(argv=None) -> int:
    """``cnkit init --base BASE --variant zero --out DIR``: a fresh ControlNet for any base, its condition encoder
    matched to the base's VAE factor, saved as a stock diffusers folder (so diffusers'
    ``examples/controlnet/train_controlnet.py`` can start from it with ``--controlnet_model_name_or_path DIR``)."""
    ap = argparse.ArgumentParser(prog="cnkit", description=main.__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="a fresh ControlNet for a base, saved as a diffusers folder")
    init.add_argument("--base", default="data/tiny-sd", help="a diffusers pipeline folder or hub id")
    init.add_argument("--variant", default="zero", choices=VARIANTS)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", required=True, help="the folder to write")
    init.add_argument("--overwrite", action="store_true",
                      help="replace the weights already in --out (never a training run's checkpoint)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        base = repo_path(args.base)
        check_output(out, args.overwrite, folder=True, sources=[base] if base.exists() else [])
    except FileExistsError as e:
        ap.error(str(e))
    pipe = bases.load_base(args.base)
    net = make_controlnet(pipe, args.variant, seed=args.seed)
    write_folder(out, lambda folder: net.save_pretrained(folder, safe_serialization=True))
    print(f"wrote a {args.variant} ControlNet ({sum(p.numel() for p in net.parameters()):,} parameters) for "
          f"{args.base} to {out}: its condition encoder downsamples by {condition_factor(net)}, as the base's VAE "
          f"does; condition images are {bases.image_size(pipe)} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
