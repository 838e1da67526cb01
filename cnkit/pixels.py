"""Pixel conventions in one place: images are HxWx3 uint8 (numpy, PIL) at the kit's edges; the VAE reads
and writes [-1, 1] float tensors (N, 3, H, W); conditions enter a ControlNet as [0, 1]; diffusers'
pipelines return [0, 1] floats with ``output_type="np"``."""

from __future__ import annotations

import numpy as np
import torch


def to_model_range(images) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], what the VAE encodes."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def from_model_range(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] (what the VAE decodes) -> uint8 images (N, H, W, 3)."""
    return ((x.clamp(-1, 1).permute(0, 2, 3, 1).float().cpu().numpy() + 1) * 127.5).round().astype(np.uint8)


def condition_range(conditions: torch.Tensor) -> torch.Tensor:
    """uint8 conditions (N, 3, H, W) -> float in [0, 1], what a ControlNet's condition encoder reads."""
    return conditions.float().div(255)


def from_pipeline(images: np.ndarray) -> np.ndarray:
    """A diffusers pipeline's ``output_type="np"`` images ([0, 1] floats) -> uint8."""
    return (np.asarray(images) * 255).round().astype(np.uint8)
