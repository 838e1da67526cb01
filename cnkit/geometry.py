"""Shape geometry and edges, in relative units: what the toy worlds draw with and what the measures re-detect with.

A foundation module (numpy; controlnet-aux for Canny, imported lazily) shared by ``cnkit.data.toyworld``, which
draws shapes from these fields, and ``cnkit.metrics``, which fits the same shapes back to generated images.
"""

from __future__ import annotations

import warnings

import numpy as np

SHAPE_KINDS = ("circle", "square", "triangle")


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres in relative units 0..1, so geometry does not depend on the image size.
    c = (np.arange(size) + 0.5) / size
    return np.meshgrid(c, c, indexing="xy")


def outline_half_width(size: int) -> float:
    # About two pixels at 64 px, four at 512 px: visible, still thin like Fill50K's outlines.
    return max(0.8, size / 256) / size


def shape_field(kind: str, cx: float, cy: float, r: float, x: np.ndarray, y: np.ndarray):
    """Signed distance-like field: negative inside, zero on the boundary (relative units)."""
    if kind == "circle":
        return np.hypot(x - cx, y - cy) - r
    if kind == "square":
        return np.maximum(np.abs(x - cx), np.abs(y - cy)) - r * 0.85
    if kind == "triangle":
        # Upward triangle inscribed in the circle of radius r: three half-plane distances.
        verts = [(cx + r * np.cos(a), cy - r * np.sin(a)) for a in np.deg2rad([90, 210, 330])]
        d = None
        for (x0, y0), (x1, y1) in zip(verts, verts[1:] + verts[:1]):
            nx, ny = -(y1 - y0), x1 - x0  # outward normal: y points down on screen
            n = np.hypot(nx, ny)
            di = ((x - x0) * nx + (y - y0) * ny) / n
            d = di if d is None else np.maximum(d, di)
        return d
    raise ValueError(f"unknown shape kind {kind!r}; known: {', '.join(SHAPE_KINDS)}")


def canny(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges through controlnet-aux, at the image's own resolution (HxWx3 uint8)."""
    with warnings.catch_warnings():  # controlnet-aux imports all its annotators, each with warnings
        warnings.simplefilter("ignore")
        from controlnet_aux import CannyDetector  # lazily: it pulls in OpenCV, timm and more

    size = image.shape[0]
    out = CannyDetector()(image, low_threshold=low, high_threshold=high, detect_resolution=size,
                          image_resolution=size, output_type="np")
    return np.ascontiguousarray(out[:, :, :3])
