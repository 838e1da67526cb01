"""Export a ControlNet to the original single-file layout, and read such a file back.

Why: the kit trains and saves diffusers ``ControlNetModel`` folders, but the tools people generate with (the
AUTOMATIC1111 WebUI ControlNet extension, ComfyUI) load the layout of the original ControlNet code
(lllyasviel/ControlNet, ``cldm.py``): one file whose keys are prefixed ``control_model.`` and named after its
modules (``input_blocks``, ``zero_convs``, ``input_hint_block``, ``middle_block``, ``middle_block_out``,
``time_embed``). diffusers reads that layout (``ControlNetModel.from_single_file``,
``loaders/single_file_utils.py::convert_controlnet_checkpoint``) but has no writer; this module is the writer, plus
a reader for the files it writes whatever their shape.

The key mapping is derived from the net's config (number of blocks, layers per block, depth of the condition
encoder), never from a fixed list: SD 1.5's 13 connections are just the case of 4 blocks of 2 layers.
Files are safetensors only, in both directions: nothing here ever unpickles.

A net whose condition encoder has a factor other than 8 (the kit's tiny base: 4) is written in the same key layout,
but only fits a base with the same VAE factor and UNet shape; it is not a drop-in SD 1.5 ControlNet, and diffusers'
reader cannot read it (it assumes the encoder's last convolution at ``input_hint_block.14``). Read it with
``load_original``.

    cnkit export --controlnet path/to/controlnet_folder --out my_controlnet.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from accelerate import init_empty_weights
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..files import check_output, temporary_sibling
from . import bases

PREFIX = "control_model."
META_CONFIG = "cnkit.controlnet_config"  # the source net's diffusers config, JSON
META_FACTOR = "cnkit.condition_encoder_factor"  # pixels of the condition image per latent cell
SD15_BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280)
# A diffusers resnet's layers and the original ResBlock's: in_layers = (GroupNorm, SiLU, conv),
# emb_layers = (SiLU, Linear), out_layers = (GroupNorm, SiLU, Dropout, conv).
RESNET_LAYERS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# Embeddings an SD 2.x unCLIP / SDXL base adds to the timestep's: label_emb = Sequential(Sequential(Linear, SiLU,
# Linear)) in the original code.
EXTRA_EMBEDDINGS = {f"{name}.linear_{i + 1}": f"label_emb.0.{2 * i}"
                    for name in ("class_embedding", "add_embedding") for i in range(2)}


def condition_encoder_factor(config: Mapping) -> int:
    """Pixels per latent cell the condition encoder assumes: it halves the size once per channel step."""
    return 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)


def module_map(config: Mapping) -> dict[str, str]:
    """diffusers module path -> original module path, for a ``ControlNetModel`` config.

    A key maps by its longest module path in the table (``down_blocks.0.attentions.0.proj_in.weight`` ->
    ``input_blocks.1.1.proj_in.weight``); the inverse table maps back.
    """
    table = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "controlnet_mid_block": "middle_block_out.0", **EXTRA_EMBEDDINGS}
    table.update(_down_path(len(config["down_block_types"]), config["layers_per_block"]))
    table.update(_middle_block())
    table.update(_condition_encoder(len(config["conditioning_embedding_out_channels"])))
    return table


def _resnet(diffusers_path: str, original_path: str) -> dict[str, str]:
    return {f"{diffusers_path}.{d}": f"{original_path}.{o}" for d, o in RESNET_LAYERS.items()}


def _down_path(n_blocks: int, layers_per_block: int) -> dict[str, str]:
    # The original input_blocks: conv_in, then per block its layers (resnet, attention) and a downsampler
    # (none after the last block); each input block feeds one zero convolution.
    table, per_block = {}, layers_per_block + 1
    for b in range(n_blocks):
        for j in range(layers_per_block):
            i = b * per_block + j + 1
            table.update(_resnet(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0"))
            table[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
        if b < n_blocks - 1:
            table[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{(b + 1) * per_block}.0.op"
    for i in range(n_blocks * per_block):
        table[f"controlnet_down_blocks.{i}"] = f"zero_convs.{i}.0"
    return table


def _middle_block() -> dict[str, str]:
    # middle_block = (ResBlock, SpatialTransformer, ResBlock); a mid block without attention has resnet 0 only.
    return {**_resnet("mid_block.resnets.0", "middle_block.0"), "mid_block.attentions.0": "middle_block.1",
            **_resnet("mid_block.resnets.1", "middle_block.2")}


def _condition_encoder(n_channels: int) -> dict[str, str]:
    # input_hint_block = (conv, SiLU, [conv, SiLU, stride-2 conv, SiLU] per channel step, zero conv): the convs sit
    # at even indices, so blocks.k is at 2k + 2 and conv_out after the last block (14 for SD's 4 channel sizes).
    n_blocks = 2 * (n_channels - 1)
    table = {"controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * n_blocks + 2}"}
    table.update({f"controlnet_cond_embedding.blocks.{k}": f"input_hint_block.{2 * k + 2}" for k in range(n_blocks)})
    return table


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return ".".join([table[head], *parts[n:]])
    return None


def _rename_all(state_dict: Mapping[str, Tensor], table: Mapping[str, str], what: str) -> dict[str, Tensor]:
    renamed = {key: _rename(key, table) for key in state_dict}
    unmapped = [key for key, new in renamed.items() if new is None]
    if unmapped:
        raise ValueError(f"{len(unmapped)} {what} have no place in the original ControlNet layout for this config "
                         f"(first: {', '.join(unmapped[:4])})")
    return {new: state_dict[key] for key, new in renamed.items()}


def _require_controlnet(net) -> ControlNetModel:
    if not isinstance(net, ControlNetModel):
        raise TypeError(f"only a diffusers ControlNetModel has the original ControlNet layout; got "
                        f"{type(net).__name__}{_lite_hint(type(net).__name__)}")
    return net


def _lite_hint(class_name: str) -> str:
    if class_name == "ControlNetLiteModel":
        return " (ControlNet-lite, the paper's Fig. 8c ablation, has no counterpart in the original code)"
    return ""


def to_original_state_dict(net: ControlNetModel) -> dict[str, Tensor]:
    """The net's weights under the original keys, prefixed ``control_model.`` (tensors shared, not copied)."""
    table = module_map(_require_controlnet(net).config)
    renamed = _rename_all(net.state_dict(), table, "of the net's tensors")
    return {PREFIX + key: tensor.detach().contiguous() for key, tensor in renamed.items()}


def _load_controlnet(controlnet) -> ControlNetModel:
    if isinstance(controlnet, nn.Module):
        return _require_controlnet(controlnet)
    folder = Path(controlnet)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} is not a diffusers ControlNet folder (no config.json): pass the folder that "
                         "holds config.json and the weights (a training run's is its checkpoint/)")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
        if class_name == "ControlNetModel":
            return ControlNetModel.from_pretrained(folder, use_safetensors=True)  # never unpickles a .bin either
    except Exception as e:  # noqa: BLE001 - said in words when the folder's files are the problem
        said = bases.weights_problem(e, "the ControlNet", folder)
        if said is None:
            raise
        raise said from e
    raise ValueError(f"only a diffusers ControlNetModel has the original ControlNet layout; {folder} holds a "
                     f"{class_name}{_lite_hint(class_name)}")


def export_original(controlnet, out_file) -> Path:
    """Write ``controlnet`` (a diffusers ControlNetModel or its folder) to ``out_file`` in the original layout.

    The safetensors metadata keeps the net's diffusers config and its condition encoder's factor, so
    ``load_original(out_file)`` needs nothing else.
    """
    net = _load_controlnet(controlnet)
    out = Path(out_file)
    if out.suffix != ".safetensors":
        raise ValueError(f"the original layout is written as safetensors: {out} should end in .safetensors")
    if not isinstance(controlnet, nn.Module):
        check_output(out, overwrite=True, sources=[controlnet])  # never into the folder it reads
    metadata = {"format": "pt", META_CONFIG: net.to_json_string(),
                META_FACTOR: str(condition_encoder_factor(net.config))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    try:
        save_file(to_original_state_dict(net), str(tmp), metadata=metadata)
        os.replace(tmp, out)  # whole or not at all
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    original = {key[len(PREFIX):]: t for key, t in state_dict.items() if key.startswith(PREFIX)}
    if not original and "time_embed.0.weight" in state_dict:  # already without the prefix
        original = dict(state_dict)
    if not original:
        raise ValueError(f"not the original ControlNet layout: no key starts with {PREFIX!r}")
    return original


def _condition_encoder_shape(original: Mapping[str, Tensor]) -> tuple[tuple[int, ...], int]:
    """(conditioning_embedding_out_channels, conditioning_channels) read off the input_hint_block weights."""
    hint = {int(key.split(".")[1]): t for key, t in original.items()
            if key.startswith("input_hint_block.") and key.endswith(".weight")}
    n_convs = len(hint)
    if n_convs < 2 or n_convs % 2 or sorted(hint) != list(range(0, 2 * n_convs, 2)):
        raise ValueError(f"unexpected input_hint_block layout: convolutions at {sorted(hint)}")
    # conv_in, then per channel step a same-size conv and a stride-2 conv (blocks.2s+1, index 4s+4), then conv_out.
    channels = (hint[0].shape[0], *(hint[4 * s + 4].shape[0] for s in range(n_convs // 2 - 1)))
    return channels, hint[0].shape[1]


def _is_unet_config(config: Mapping) -> bool:
    return config.get("_class_name") == "UNet2DConditionModel" or "up_block_types" in config


def _read_config_folder(folder: Path) -> dict:
    for candidate in (folder / "config.json", folder / "unet" / "config.json"):  # a net's folder, or a pipeline's
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise ValueError(f"{folder} has no config.json: pass config= a diffusers ControlNet folder, a UNet or pipeline "
                     f"folder, a config dict or a UNet2DConditionModel")


def _empty_controlnet(config, original: Mapping[str, Tensor]) -> ControlNetModel:
    """A ControlNetModel without weights (parameters on the meta device) shaped by ``config``."""
    if isinstance(config, (str, Path)):
        config = _read_config_folder(Path(config))
    with init_empty_weights():
        if isinstance(config, Mapping) and _is_unet_config(config):
            config = UNet2DConditionModel.from_config(dict(config))
        if isinstance(config, UNet2DConditionModel):
            channels, conditioning_channels = _condition_encoder_shape(original)
            return ControlNetModel.from_unet(config, conditioning_embedding_out_channels=channels,
                                             conditioning_channels=conditioning_channels, load_weights_from_unet=False)
        if isinstance(config, Mapping):
            return ControlNetModel.from_config(dict(config))
    raise TypeError(f"config= must be a diffusers ControlNet folder, a config dict or a UNet2DConditionModel; got "
                    f"{type(config).__name__}")


def from_original_state_dict(state_dict: Mapping[str, Tensor], config) -> ControlNetModel:
    """A ControlNetModel holding an original-layout state dict's tensors (used as they are, not copied).

    ``config``: a diffusers ControlNet folder or config dict, or the base's UNet (a ``UNet2DConditionModel``, its
    config dict or folder, or a pipeline folder); from a UNet the condition encoder's depth and input channels are
    read off the state dict's ``input_hint_block``.
    """
    original = _strip_prefix(state_dict)
    net = _empty_controlnet(config, original)
    inverse = {o: d for d, o in module_map(net.config).items()}
    converted = _rename_all(original, inverse, "of the file's tensors")
    try:
        net.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"the file's tensors do not fit the ControlNet config given: {error}") from error
    return net.eval()


def _safetensors_path(file) -> Path:
    path = Path(file)
    if path.suffix != ".safetensors":
        raise ValueError(f"only safetensors files are read (loading never unpickles): {path.name} is not .safetensors; "
                         f"convert it to .safetensors with a tool you trust")
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def stored_config(file) -> dict | None:
    """The ControlNet config ``export_original`` stored in an original-layout file, or None (files from elsewhere)."""
    stored = _metadata(_safetensors_path(file)).get(META_CONFIG)
    return json.loads(stored) if stored else None


def load_original(file, config=None) -> ControlNetModel:
    """Read an original-layout safetensors file into a diffusers ControlNetModel.

    ``config``: as in ``from_original_state_dict``; None uses the config ``export_original`` stored in the file.
    """
    path = _safetensors_path(file)
    state_dict = load_file(str(path))
    if config is None:
        _strip_prefix(state_dict)  # say "not the original layout" before "no config"
        stored = _metadata(path).get(META_CONFIG)
        if stored is None:
            raise ValueError(f"{path.name} does not say which ControlNet it is (it was not written by cnkit export): "
                             f"pass config= (a diffusers ControlNet folder or the base's UNet)")
        config = json.loads(stored)
    return from_original_state_dict(state_dict, config)


def is_original_layout(path) -> bool:
    """Whether ``path`` is a safetensors file holding ``control_model.*`` tensors (what ``load_original`` reads)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return any(key.startswith(PREFIX) for key in f.keys())
    except (SafetensorError, OSError):
        return False


def compatibility_note(config: Mapping) -> str | None:
    """What a file exported from a net of this config fits, when that is not SD 1.5's bases; else None."""
    factor = condition_encoder_factor(config)
    channels = tuple(config["block_out_channels"])
    if factor != 8:
        return (f"NOTE: this file is in the original ControlNet key layout, but its condition encoder has a factor of "
                f"{factor} (SD 1.5: 8) and the UNet channels are {channels}. It only fits a base with the same VAE "
                f"factor and UNet shape; the WebUI extension and ComfyUI expect SD 1.5's layout (factor 8, channels "
                f"{SD15_BLOCK_OUT_CHANNELS}). So it is for cnkit (cnkit.models.export.load_original) and tools that "
                f"read it with a matching config, not a drop-in SD 1.5 ControlNet; diffusers' from_single_file cannot "
                f"read it "
                f"(its reader expects the encoder's last convolution at input_hint_block.14).")
    if channels != SD15_BLOCK_OUT_CHANNELS:
        return (f"NOTE: the UNet channels are {channels} (SD 1.5: {SD15_BLOCK_OUT_CHANNELS}): the file only fits a "
                f"base with that UNet shape, not SD 1.5. diffusers reads it with "
                f"ControlNetModel.from_single_file(file, config=<the ControlNet folder>).")
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cnkit export",
                                     description="Write a diffusers ControlNet folder as one safetensors file in the "
                                                 "original ControlNet layout (control_model.*), as the WebUI "
                                                 "ControlNet extension and ComfyUI load.")
    parser.add_argument("--controlnet", required=True, help="a diffusers ControlNetModel folder (a cnkit checkpoint)")
    parser.add_argument("--out", required=True, help="the file to write (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace the file --out if it exists")
    args = parser.parse_args(argv)
    try:
        check_output(args.out, args.overwrite, sources=[args.controlnet], folder=False)
        net = _load_controlnet(args.controlnet)
        out = export_original(net, args.out)
    except (TypeError, ValueError, FileExistsError) as error:
        parser.error(str(error))
    with safe_open(str(out), framework="pt") as f:
        n_tensors = len(list(f.keys()))
    print(f"wrote {out}: {n_tensors} tensors, {out.stat().st_size / 2**20:.1f} MiB, original ControlNet layout "
          f"(control_model.*), condition encoder factor {condition_encoder_factor(net.config)}, UNet channels "
          f"{tuple(net.config.block_out_channels)}")
    note = compatibility_note(net.config)
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
