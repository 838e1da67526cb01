"""Named colours: the toy worlds' palettes and the segmentation classes' colours.

A foundation module (numpy only) so that the worlds that paint with these colours (``cnkit.data.toyworld``) and
the measures that read them back from images (``cnkit.metrics``) share one table.
"""

from __future__ import annotations

# Named colours (CSS values). Single words, so prompts stay whole-word tokens for the tiny CLIP.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
}
COLOUR_NAMES = tuple(PALETTE)

# Segmentation colours per class (index 0 is the background), distinct from one another.
SEGMENTATION_COLOURS: dict[str, tuple[int, int, int]] = {
    "background": (0, 0, 0),
    "circle": (230, 25, 75),
    "square": (60, 180, 75),
    "triangle": (0, 130, 200),
}
