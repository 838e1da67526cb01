"""Control-LoRA (Stability AI, 2023): the paper's ControlNet with its trainable copy kept frozen at the base's own
encoder weights, learning only low-rank updates (LoRA, peft) of the copy's convolutions and linear layers; the parts
the base does not have (the condition encoder and the zero convolutions) train in full.

What it buys: the file holds only what was trained (the LoRA factors and the new parts), a fraction of a ControlNet's,
because the copy itself is the base's encoder and is rebuilt from the base at load time. That is also its cost: a
Control-LoRA cannot be loaded without the base it was trained on.

It is diffusers' own Control-LoRA path, not a new model: ``ControlNetModel.from_unet(unet)`` then
``load_lora_adapter(folder, weight_name="control_lora.safetensors", prefix=None)`` (``PeftAdapterMixin``; what
diffusers' control_lora example does with Stability's files) rebuilds the trained net exactly; the LoRA config travels
in the safetensors metadata. At init the LoRA updates are zero (peft's B factors) and the zero convolutions are zero,
so the controlled UNet's output equals the base's, as for the paper's net. Generation goes through diffusers'
ControlNet pipeline (it is a ``ControlNetModel``), so it mixes with the paper's nets in one call.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from diffusers import ControlNetModel
from peft import LoraConfig
from peft.utils import ModulesToSaveWrapper, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from ...params import coerce
from ..controlnets import make_controlnet, watch_condition_size
from .base import ARCHITECTURE_FILE, seeded
from .controlnet import ControlNet

WEIGHTS = "control_lora.safetensors"
ADAPTER = "default"
# The parts of a ControlNet that the base UNet does not have: trained in full (peft's modules_to_save).
NEW_PARTS = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")


def lora_config(net: ControlNetModel, rank: int) -> LoraConfig:
    """LoRA of ``rank`` (alpha = rank: scale 1, as diffusers reads Stability's files) on every convolution and
    linear layer of the copy; the new parts listed whole (a ModuleList cannot be one: its convolutions are)."""
    layers = [name for name, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    copied = [n for n in layers if not n.startswith(NEW_PARTS)]
    new = (["controlnet_cond_embedding", "controlnet_mid_block"]
           + [f"controlnet_down_blocks.{i}" for i in range(len(net.controlnet_down_blocks))])
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=copied, modules_to_save=new)


@contextmanager
def _contiguous(params):
    """Parameters in contiguous memory for the duration (safetensors refuses the channels-last weights the trainer
    uses on a CPU), put back as they were after."""
    kept = [(p, p.data) for p in params if not p.data.is_contiguous()]
    for p, data in kept:
        p.data = data.contiguous()
    try:
        yield
    finally:
        for p, data in kept:
            p.data = data


def _active(module: nn.Module) -> nn.Module:
    """The trained module behind peft's wrapper (the original stays beside it, frozen and unused)."""
    return module.modules_to_save[ADAPTER] if isinstance(module, ModulesToSaveWrapper) else module


class ControlLoRA(ControlNet):
    """The paper's ControlNet, its copy frozen, trained through LoRA of ``rank`` (see the module docstring)."""

    name = "control-lora"
    loads_with = "diffusers.ControlNetModel.from_unet + load_lora_adapter"
    needs_base_to_load = True

    @classmethod
    def build(cls, unet, vae_scale_factor: int = 8, seed: int | None = None, rank: int = 8,
              conditioning_channels: int = 3):
        rank = coerce("rank", rank, int, minimum=1)
        net = make_controlnet(unet, "zero", vae_scale_factor=vae_scale_factor,
                              conditioning_channels=conditioning_channels, seed=seed)
        net.requires_grad_(False)
        with seeded(seed):  # peft draws the A factors
            net.add_adapter(lora_config(net, rank), adapter_name=ADAPTER)
        unet.requires_grad_(False)
        return cls(net, vae_scale_factor, rank=rank, conditioning_channels=conditioning_channels,
                   conditioning_embedding_out_channels=list(net.config.conditioning_embedding_out_channels))

    @classmethod
    def load(cls, folder, unet=None):
        folder = Path(folder)
        if unet is None:
            raise ValueError(f"{folder} holds a Control-LoRA: low-rank changes to its base's own encoder, which is not "
                             "in the folder. Load it with the base it was trained on: "
                             "cnkit.models.architectures.load(folder, unet=pipe.unet)")
        meta = cls.read_meta(folder)
        opts = meta.get("options", {})
        unet.requires_grad_(False)
        net = ControlNetModel.from_unet(unet, conditioning_channels=opts.get("conditioning_channels", 3),
                                        conditioning_embedding_out_channels=opts["conditioning_embedding_out_channels"])
        net.load_lora_adapter(str(folder), weight_name=WEIGHTS, prefix=None, adapter_name=ADAPTER)
        net.requires_grad_(False)  # a loaded net is for generating; build one to train
        return cls(watch_condition_size(net), meta["vae_scale_factor"], **opts).eval()

    def save_pretrained(self, folder) -> Path:
        """The trained parts only (LoRA factors, condition encoder, zero convolutions; the LoRA config in the
        safetensors metadata), as diffusers' ``save_lora_adapter`` writes them, and the architecture file."""
        folder = Path(folder)
        with _contiguous(self.net.parameters()):
            self.net.save_lora_adapter(str(folder), adapter_name=ADAPTER, weight_name=WEIGHTS)
        self.write_meta(folder)
        return folder

    def load_weights(self, folder) -> None:
        set_peft_model_state_dict(self.net, load_file(Path(folder) / WEIGHTS), adapter_name=ADAPTER)

    def injection_points(self):
        return [(name, _active(m)) for name, m in super().injection_points()]

    def condition_encoder(self):
        return _active(self.net.controlnet_cond_embedding)


__all__ = ["ControlLoRA", "lora_config", "ARCHITECTURE_FILE"]
