"""ControlNet and its successors, built from any base UNet behind one interface (``base.ControlAdapter``).

One idea per file: ``base`` (the interface), ``controlnet`` (the paper's net and its Fig. 8 ablations),
``control_lora`` (the paper's net trained through LoRA, peft), ``controlnet_xs``, ``t2i_adapter``, ``controlnext``,
``union`` (several conditions in one net). ``build(name, base)`` makes a fresh adapter, ``load(folder)`` a saved one
(``load(folder, unet)`` for a Control-LoRA, which is stored as changes to its base).

    pipe = cnkit.models.tiny.build_tiny_sd()
    adapter = build("t2i-adapter", pipe, seed=0)   # matched to the base's VAE factor (4) and block widths
    eps = adapter.predict_noise(pipe.unet, latents, t, text, cond)   # cond: (batch, 3, 4 x latent, 4 x latent)
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import ARCHITECTURE_FILE, ControlAdapter, resolve_base
from .control_lora import ControlLoRA
from .controlnet import ControlNet, ControlNetGaussian, ControlNetLite
from .controlnet_xs import ControlNetXS
from .controlnext import ControlNeXt
from .t2i_adapter import T2IAdapterArchitecture
from .union import UnionControlNet

ARCHITECTURES: dict[str, type[ControlAdapter]] = {
    cls.name: cls for cls in (ControlNet, ControlNetGaussian, ControlNetLite, ControlLoRA, ControlNetXS,
                              T2IAdapterArchitecture, ControlNeXt, UnionControlNet)
}

# The paper's net and its Fig. 8 ablations by ControlNet variant: what diffusers' ControlNet pipeline runs.
PAPER_NETS: dict[str, str] = {cls.variant: cls.name for cls in (ControlNet, ControlNetGaussian, ControlNetLite)}


def architecture(name: str) -> type[ControlAdapter]:
    """The class registered as ``name``; a clear error naming the known ones."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known architectures: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build(name: str, base_or_unet, vae_scale_factor: int | None = None, seed: int | None = None,
          **options) -> ControlAdapter:
    """A fresh ``name`` adapter for a base (a pipeline, a base folder or hub id: the VAE factor is the base's) or a
    bare UNet (``vae_scale_factor``: 8 unless told). ``options`` are the architecture's own (its ``build``). The
    base UNet is locked (``requires_grad_(False)``)."""
    cls = architecture(name)
    unet, factor = resolve_base(base_or_unet, vae_scale_factor)
    return cls.build(unet, factor, seed=seed, **options)


def load(folder, unet=None) -> ControlAdapter:
    """The adapter saved by ``ControlAdapter.save_pretrained`` in ``folder`` (its ``cnkit_architecture.json`` names
    it); a folder without that file is read as a plain ControlNet. ``unet``: the base it drives (a Control-LoRA
    needs it: its copy of the encoder is rebuilt from it)."""
    folder = Path(folder)
    meta_file = folder / ARCHITECTURE_FILE
    if meta_file.is_file():
        name = json.loads(meta_file.read_text())["architecture"]
    else:
        config = json.loads((folder / "config.json").read_text())
        name = "controlnet-lite" if config.get("_class_name") == "ControlNetLiteModel" else "controlnet"
    return architecture(name).load(folder, unet)


__all__ = ["ARCHITECTURES", "PAPER_NETS", "ControlAdapter", "ControlLoRA", "ControlNet",
           "ControlNetGaussian", "ControlNetLite", "ControlNetXS", "ControlNeXt", "T2IAdapterArchitecture",
           "UnionControlNet", "architecture", "build", "load"]
