"""The toy world: synthetic image/condition/prompt triples with exact ground truth.

ControlNet papers measure condition fidelity with downloaded evaluators (segmenters, edge and
depth estimators). The toy world replaces them with geometry we drew ourselves, so every metric
of the kit is exact and offline. Four worlds:

- ``fill``: the Fill50K task of the official ControlNet tutorial. The condition is a circle's
  outline; the image is the same circle filled with one named colour on a background of another;
  the prompt reads ``"{fill} circle with {background} background"`` as in Fill50K's prompt.json.
  The kit's eight single-word colours, discs inside the frame.
- ``fill50k``: the same task as the real Fill50K draws it: its 140 CSS/X11 colours written as its prompts
  write them ("pale golden rod circle with old lace background"), radius 1/8 to 1/2 of the side, circles that may
  leave the frame, an outline 5 px wide at 512 px. ``fill-x11``: Fill50K's colours with the kit's geometry.
- ``shapes``: one to three circles, squares and triangles in named colours on a named background,
  drawn back to front. Condition maps: ``outline`` (scribble-like), ``segmentation`` (a colour per
  class), ``depth`` (by layer order, nearer is brighter, as MiDaS draws it) and ``edges`` (Canny
  through controlnet-aux, the annotator users apply to real photos).

Every sample is a pure function of ``(world, seed, index, size)``: sample 7 is the same whether or
not samples 0..6 were drawn, at any image size (geometry is drawn in relative units). Pixels are
drawn analytically at pixel centres (no anti-aliasing), so masks are exact and PNG round trips are
bit-exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ..colours import COLOUR_NAMES, PALETTE, SEGMENTATION_COLOURS, X11, X11_NAMES, X11_WORDS
from ..geometry import SHAPE_KINDS, canny, grid, outline_half_width, shape_field

__all__ = ["COLOUR_NAMES", "PALETTE", "SEGMENTATION_COLOURS", "SHAPE_KINDS", "canny"]  # the world's vocabulary

MAX_SHAPES = 3
# fill50k and fill-x11 come last: a world's random streams are keyed by its index here, so the first two draw what
# they always drew.
WORLDS = ("fill", "shapes", "fill50k", "fill-x11")
CONDITIONS = {"fill": ("outline",), "shapes": ("outline", "segmentation", "depth", "edges"), "fill50k": ("outline",),
              "fill-x11": ("outline",)}
FILL_WORLDS = ("fill", "fill50k", "fill-x11")

# Every word a toy-world prompt can use; the tiny tokenizer gives each a whole-word token.
VOCABULARY = (
    *COLOUR_NAMES,
    *X11_WORDS,
    *SHAPE_KINDS,
    "circle", "with", "background", "on", "and", ",",
    # The paper's "insufficient" prompt (Fig. 8) and other words experiments use.
    "a", "high", "-", "quality", "detailed", "professional", "image", "photo", "of",
)  # fmt: skip


class Example(NamedTuple):
    """One training item as every dataset reader returns it: PIL RGB image and condition, and the prompt. A
    multi-condition dataset's ``condition`` is a tuple of PIL RGB maps, in the dataset's order."""

    image: Image.Image
    condition: Image.Image
    prompt: str


def to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(array))


@dataclass
class Sample:
    """One toy-world example. Arrays are HxWx3 uint8 RGB; ``truth`` is JSON-serialisable."""

    image: np.ndarray
    conditions: dict[str, np.ndarray]
    prompt: str
    truth: dict
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # boolean HxW, exact


def _rng(world: str, seed: int, index: int) -> np.random.Generator:
    # One independent stream per (world, seed, index): random access without drawing the prefix.
    return np.random.default_rng([WORLDS.index(world), int(seed), int(index)])


def _paint(mask: np.ndarray, colour: tuple[int, int, int], out: np.ndarray) -> None:
    out[mask] = np.asarray(colour, dtype=np.uint8)


def _fill(seed: int, index: int, size: int) -> Sample:
    rng = _rng("fill", seed, index)
    fill, background = rng.choice(len(COLOUR_NAMES), size=2, replace=False)
    fill, background = COLOUR_NAMES[fill], COLOUR_NAMES[background]
    r = rng.uniform(0.12, 0.35)
    cx, cy = rng.uniform(r + 0.04, 1 - r - 0.04, size=2)
    x, y = grid(size)
    d = shape_field("circle", cx, cy, r, x, y)
    disc = d <= 0
    image = np.empty((size, size, 3), np.uint8)
    image[:] = PALETTE[background]
    _paint(disc, PALETTE[fill], image)
    outline = np.zeros_like(image)
    _paint(np.abs(d) <= outline_half_width(size), (255, 255, 255), outline)
    truth = {"world": "fill", "fill": fill, "background": background, "centre": [cx, cy], "radius": r}
    return Sample(image, {"outline": outline}, f"{fill} circle with {background} background", truth,
                  {"disc": disc})


# Fill50K's geometry, as fractions of the image side (measured on its sources; studies/fill50k_like.py says how):
# radius uniform on [1/8, 1/2], centre coordinates uniform on [0.18, 0.80] (circles may leave the frame), a binary
# outline 5 px wide at 512 px.
FILL50K_RADIUS = (1 / 8, 1 / 2)
FILL50K_CENTRE = (0.18, 0.80)
FILL50K_LINE_AT_512 = 5


def x11_pair(rng: np.random.Generator) -> tuple[str, str]:
    """Two different X11 names (fill, background) of different RGB (aqua and cyan are one colour: never paired)."""
    while True:
        i, j = rng.choice(len(X11_NAMES), size=2, replace=False)
        if X11[X11_NAMES[i]] != X11[X11_NAMES[j]]:
            return X11_NAMES[i], X11_NAMES[j]


def _fill_x11(world: str, seed: int, index: int, size: int) -> Sample:
    """``fill50k``: Fill50K's vocabulary and geometry; ``fill-x11``: its vocabulary, the kit's geometry."""
    rng = _rng(world, seed, index)
    fill, background = x11_pair(rng)
    x, y = grid(size)
    if world == "fill50k":
        r = rng.uniform(*FILL50K_RADIUS)
        cx, cy = rng.uniform(*FILL50K_CENTRE, size=2)
        half_width = max(1, round(FILL50K_LINE_AT_512 * size / 512)) / 2 / size
    else:
        r = rng.uniform(0.12, 0.35)
        cx, cy = rng.uniform(r + 0.04, 1 - r - 0.04, size=2)
        half_width = outline_half_width(size)
    d = shape_field("circle", cx, cy, r, x, y)
    disc = d <= 0
    image = np.empty((size, size, 3), np.uint8)
    image[:] = X11[background]
    _paint(disc, X11[fill], image)
    outline = np.zeros_like(image)
    _paint(np.abs(d) <= half_width, (255, 255, 255), outline)
    truth = {"world": world, "fill": fill, "background": background, "centre": [cx, cy], "radius": r,
             "fill_rgb": list(X11[fill]), "background_rgb": list(X11[background])}
    return Sample(image, {"outline": outline}, f"{fill} circle with {background} background", truth, {"disc": disc})


def _shapes_prompt(shapes: list[dict], background: str) -> str:
    parts = [f"{s['colour']} {s['kind']}" for s in shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on {background} background"


def _shapes(seed: int, index: int, size: int, edges: bool = True) -> Sample:
    rng = _rng("shapes", seed, index)
    n = int(rng.integers(1, MAX_SHAPES + 1))
    colours = rng.choice(len(COLOUR_NAMES), size=n + 1, replace=False)
    background = COLOUR_NAMES[colours[0]]
    x, y = grid(size)
    # Rejection-sample placements so every shape keeps most of its area visible (countable).
    for _attempt in range(100):
        shapes, fields = [], []
        for i in range(n):
            kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
            r = rng.uniform(0.12, 0.22)
            cx, cy = rng.uniform(r + 0.03, 1 - r - 0.03, size=2)
            shapes.append({"kind": kind, "colour": COLOUR_NAMES[colours[i + 1]], "centre": [cx, cy],
                           "radius": r, "layer": i})
            fields.append(shape_field(kind, cx, cy, r, x, y))
        full = [f <= 0 for f in fields]
        visible = [m & ~np.any(full[i + 1:], axis=0) if i + 1 < n else m for i, m in enumerate(full)]
        if all(v.sum() >= 0.6 * max(m.sum(), 1) for v, m in zip(visible, full)):
            break
    image = np.empty((size, size, 3), np.uint8)
    image[:] = PALETTE[background]
    seg = np.empty_like(image)
    seg[:] = SEGMENTATION_COLOURS["background"]
    depth = np.zeros_like(image)
    outline = np.zeros_like(image)
    hw = outline_half_width(size)
    class_masks = {k: np.zeros((size, size), bool) for k in SHAPE_KINDS}
    for s, f, m, v in zip(shapes, fields, full, visible):  # back to front
        _paint(m, PALETTE[s["colour"]], image)
        _paint(m, SEGMENTATION_COLOURS[s["kind"]], seg)
        level = round(255 * (s["layer"] + 1) / MAX_SHAPES)  # fixed scale: comparable across scenes
        _paint(m, (level, level, level), depth)
        _paint(m, (0, 0, 0), outline)  # a nearer shape hides the outlines behind it
        _paint(np.abs(f) <= hw, (255, 255, 255), outline)
        class_masks[s["kind"]] |= v
    masks = {f"shape{i}": v for i, v in enumerate(visible)} | class_masks
    truth = {"world": "shapes", "background": background, "shapes": shapes}
    conditions = {"outline": outline, "segmentation": seg, "depth": depth}
    if edges:  # Canny is the one map that costs (an OpenCV pass); pretraining, which reads no map, skips it
        conditions["edges"] = canny(image)
    return Sample(image, conditions, _shapes_prompt(shapes, background), truth, masks)


def sample(world: str, index: int, seed: int = 0, size: int = 64, edges: bool = True) -> Sample:
    """Draw sample ``index`` of ``world`` (``"fill"``, ``"shapes"``, ``"fill50k"`` or ``"fill-x11"``) at ``size`` x
    ``size``."""
    if world not in WORLDS:
        raise ValueError(f"unknown toy world {world!r}; known worlds: {', '.join(WORLDS)}")
    if int(size) != size or size < 16:
        raise ValueError(f"size must be an integer of at least 16 pixels, got {size!r}")
    if world in ("fill50k", "fill-x11"):
        return _fill_x11(world, int(seed), int(index), int(size))
    if world == "fill":
        return _fill(int(seed), int(index), int(size))
    return _shapes(int(seed), int(index), int(size), edges)


class ToyWorld:
    """An indexable toy-world dataset of (image, condition, prompt), like ``cnkit.data.readers`` returns.

    ``condition`` names the map (``outline`` for fill; ``outline``, ``segmentation``, ``depth`` or
    ``edges`` for shapes), or several joined by ``+`` (``"segmentation+depth"``): then an item's
    condition is a tuple of maps in that order, what a multi-condition net (``union``) trains on.
    ``offset`` shifts the indices, so train and validation splits of one seed never share a sample:
    ``ToyWorld("fill", n=32, offset=10**6)``.
    """

    def __init__(self, world: str = "fill", n: int = 1000, seed: int = 0, size: int = 64,
                 condition: str | None = None, offset: int = 0):
        if world not in WORLDS:
            raise ValueError(f"unknown toy world {world!r}; known worlds: {', '.join(WORLDS)}")
        condition = condition or CONDITIONS[world][0]
        self.maps = tuple(condition.split("+"))
        unknown = [m for m in self.maps if m not in CONDITIONS[world]]
        if unknown or len(set(self.maps)) != len(self.maps):
            raise ValueError(f"world {world!r} has no condition {condition!r}; it has: {', '.join(CONDITIONS[world])}"
                             " (several, each once, joined by '+')")
        self.world, self.n, self.seed, self.size = world, int(n), int(seed), int(size)
        self.condition, self.offset = condition, int(offset)

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> Sample:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for a toy world of {self.n} samples")
        return sample(self.world, self.offset + (i % self.n), self.seed, self.size)

    def __getitem__(self, i: int) -> Example:
        s = self.sample(i)
        maps = tuple(to_pil(s.conditions[m]) for m in self.maps)
        return Example(to_pil(s.image), maps if len(maps) > 1 else maps[0], s.prompt)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def export_fill50k(path, n: int, size: int = 64, seed: int = 0, world: str = "fill",
                   condition: str | None = None) -> Path:
    """Write the official Fill50K layout: ``source/i.png``, ``target/i.png`` and ``prompt.json``
    (JSON lines ``{"source", "target", "prompt"}``). ``truth.jsonl`` beside it keeps the exact
    geometry for metrics; readers of the official format ignore it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = ToyWorld(world, n, seed, size, condition)
    if len(data.maps) > 1:
        raise ValueError("the Fill50K layout has one source image per item; write several conditions with "
                         "export_imagefolder (a list of conditioning images per row)")
    with open(path / "prompt.json", "w") as f, open(path / "truth.jsonl", "w") as t:
        for i in range(n):
            s = data.sample(i)
            _save_png(s.conditions[data.condition], path / "source" / f"{i}.png")
            _save_png(s.image, path / "target" / f"{i}.png")
            f.write(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png",
                                "prompt": s.prompt}) + "\n")
            t.write(json.dumps(s.truth) + "\n")
    return path


def export_imagefolder(path, n: int, size: int = 64, seed: int = 0, world: str = "fill",
                       condition: str | None = None) -> Path:
    """Write ``metadata.jsonl`` rows ``{"image", "conditioning_image", "text"}`` (the column names
    diffusers' ``train_controlnet.py`` reads) with ``images/`` and ``conditioning_images/``. Several
    conditions (``"segmentation+depth"``) give a list of paths per row, ``conditioning_images/<map>/``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = ToyWorld(world, n, seed, size, condition)
    with open(path / "metadata.jsonl", "w") as f, open(path / "truth.jsonl", "w") as t:
        for i in range(n):
            s = data.sample(i)
            _save_png(s.image, path / "images" / f"{i}.png")
            names = [f"conditioning_images/{i}.png"] if len(data.maps) == 1 else \
                [f"conditioning_images/{m}/{i}.png" for m in data.maps]
            for m, name in zip(data.maps, names):
                _save_png(s.conditions[m], path / name)
            f.write(json.dumps({"image": f"images/{i}.png", "conditioning_image": names[0] if len(names) == 1
                                else names, "text": s.prompt}) + "\n")
            t.write(json.dumps(s.truth) + "\n")
    return path
