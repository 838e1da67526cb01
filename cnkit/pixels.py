"""Pixel conventions in one place: images are HxWx3 uint8 (numpy, PIL) at the kit's edges; the VAE reads
and writes [-1, 1] float tensors (N, 3, H, W); conditions enter a ControlNet as [0, 1]; diffusers'
pipelines return [0, 1] floats with ``output_type="np"``.

What changes pixels on the way in is done here once, for training and generation alike, and said in words
(``fit`` and ``to_rgb`` return a note, or None when nothing changed): an image of another size is fitted by one
of the WebUI's resize modes; transparency is composited over a background (black for conditions, which draw
on black; white for images, as a viewer shows them); grey levels are replicated into three channels.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RESIZE_MODES = ("crop_and_resize", "just_resize", "resize_and_fill")
BLACK, WHITE = (0, 0, 0), (255, 255, 255)


def to_model_range(images) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], what the VAE encodes."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def from_model_range(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] (what the VAE decodes) -> uint8 images (N, H, W, 3)."""
    return ((x.clamp(-1, 1).permute(0, 2, 3, 1).float().cpu().numpy() + 1) * 127.5).round().astype(np.uint8)


def condition_range(conditions: torch.Tensor) -> torch.Tensor:
    """uint8 conditions (N, 3, H, W) -> float in [0, 1], what a ControlNet's condition encoder reads."""
    return conditions.float().div(255)


def is_condition_set(condition) -> bool:
    """Is ``condition`` several condition maps of one item (a tuple or list, for a multi-condition net), not one?"""
    return isinstance(condition, tuple | list)


def stack_maps(maps) -> np.ndarray:
    """Several HxWx3 uint8 condition maps of one item -> one HxWx(3n) array, in order (a missing map, None, is
    black: "no condition"), the channel layout a multi-condition net's encoder reads."""
    arrays = [None if m is None else np.asarray(m.convert("RGB") if hasattr(m, "convert") else m) for m in maps]
    like = next((a for a in arrays if a is not None), None)
    if like is None:
        raise ValueError("a condition set needs at least one map (None marks a missing one)")
    shapes = {a.shape for a in arrays if a is not None}
    if len(shapes) > 1:
        raise ValueError(f"the maps of one condition set differ in shape ({', '.join(map(str, sorted(shapes)))}); "
                         "fit them to one size first")
    return np.concatenate([a if a is not None else np.zeros_like(like) for a in arrays], axis=-1)


def side_by_side(condition) -> np.ndarray:
    """A condition (one map, or a set of maps) as one HxW'x3 picture to look at: a set's maps left to right."""
    if not is_condition_set(condition):
        return np.asarray(condition)
    maps = stack_maps(condition)
    return np.concatenate(np.split(maps, maps.shape[-1] // 3, axis=-1), axis=1)


def from_pipeline(images: np.ndarray) -> np.ndarray:
    """A diffusers pipeline's ``output_type="np"`` images ([0, 1] floats) -> uint8."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


def to_rgb(img, background=BLACK) -> tuple[Image.Image, str | None]:
    """RGB with alpha composited over ``background``, 16-bit or float maps scaled to 0..255 by their format's
    range (``_to_8bit``), grey levels replicated; and a note when pixels changed beyond that replication (None
    otherwise)."""
    if isinstance(img, np.ndarray):
        array = img
        if array.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 (0..255), got {array.dtype}: convert it first")
        if array.ndim == 3 and array.shape[2] == 4:
            img = Image.fromarray(np.ascontiguousarray(array), "RGBA")
        elif array.ndim == 3 and array.shape[2] == 3 or array.ndim == 2:
            img = Image.fromarray(np.ascontiguousarray(array))
        else:
            raise ValueError(f"an image must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    if img.mode == "RGB":
        return img, None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:  # fully opaque: dropping alpha changes nothing
            return rgba.convert("RGB"), None
        base = Image.new("RGBA", rgba.size, (*background, 255))
        colour = "black" if tuple(background) == BLACK else "white" if tuple(background) == WHITE else str(background)
        return (Image.alpha_composite(base, rgba).convert("RGB"),
                f"transparent pixels composited over {colour}")
    if img.mode.startswith("I") or img.mode == "F":
        a, note = _to_8bit(np.asarray(img, dtype=np.float64), img.mode)
        return Image.fromarray(a).convert("RGB"), note
    return img.convert("RGB"), None


def _to_8bit(a: np.ndarray, mode: str) -> tuple[np.ndarray, str]:
    """Grey levels of a 16-bit, 32-bit or float image at 0..255, by the range its format means (so a dark image
    stays dark); only values outside that range are stretched from the image's own minimum and maximum."""
    lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)
    if mode == "F" and 0 <= lo and hi <= 1:
        return (a * 255).round().astype(np.uint8), "float values in 0..1 scaled to 0..255"
    if mode != "F" and 0 <= lo and hi <= 65535:  # a 16-bit PNG or TIFF, whether PIL says I;16 or I
        note = "16-bit values scaled to 0..255 by their full range (v / 257)"
        if hi < 4096:
            note += ("; they use under 1/16 of that range, so these images are dark: if they are not meant on "
                     "0..65535, convert them to 8 bits yourself")
        return (a / 257).round().astype(np.uint8), note
    span = hi - lo
    a = (a - lo) / span * 255 if span > 0 else np.zeros_like(a)
    return (a.round().astype(np.uint8),
            f"{'float' if mode == 'F' else 'integer'} values outside {'0..1' if mode == 'F' else '0..65535'} "
            "stretched from each image's own minimum and maximum to 0..255")


def fit(image, width: int, height: int, mode: str = "crop_and_resize",
        resample=Image.BILINEAR) -> tuple[Image.Image, str | None]:
    """``image`` at width x height by the WebUI's resize modes, and a note saying what was done (None when it
    already had that size): ``just_resize`` stretches, ``crop_and_resize`` scales to cover and crops the centre,
    ``resize_and_fill`` scales to fit and pads with black."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).astype(np.uint8))
    img = img.convert("RGB")
    if img.size == (width, height):
        return img, None
    w, h = img.size
    if mode == "just_resize":
        out = img.resize((width, height), resample)
    elif mode == "crop_and_resize":
        k = max(width / w, height / h)
        scaled = img.resize((max(width, round(w * k)), max(height, round(h * k))), resample)
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        out = scaled.crop((left, top, left + width, top + height))
    elif mode == "resize_and_fill":
        k = min(width / w, height / h)
        scaled = img.resize((max(1, round(w * k)), max(1, round(h * k))), resample)
        out = Image.new("RGB", (width, height))
        out.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    else:
        raise ValueError(f"unknown resize mode {mode!r}; known: {', '.join(RESIZE_MODES)}")
    return out, f"{w}x{h} fitted to {width}x{height} by {mode}"
