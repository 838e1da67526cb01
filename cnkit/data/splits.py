"""What is held out from what, and which seeds each measurement draws: named, in one place.

A toy world is an infinite indexed stream per seed (``cnkit.data.toyworld``), so a split is a range of
indices. Training draws from index 0; everything a measurement uses starts far past any training
range, so no net or base ever saw it:

- ``VALIDATION``: held-out conditions (training-time validation, ``evaluate_controlnet``, the figures'
  evaluations, the VAE's held-out images, the playground's default scenes);
- ``COMPOSITION``: held-out two-shape scenes for composing two nets (Fig. 6);
- ``BASE_EVALUATION``: held-out shapes prompts for judging the pretrained base.

A folder dataset holds its last ``validation_size`` items out instead (``training_items`` /
``held_out_items``). The fill worlds' held-out colour pairs (``HELD_OUT_FILL_PAIRS``, ``HELD_OUT_X11_PAIRS``) never
reach pretraining.

Generation seeds come in named streams (``seeds("validation", n)``): item k of a measurement always
gets the same seed, whatever the batching, and two measurements never share noise by accident.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from scipy import ndimage

from ..colours import delta_e
from ..files import file_sha256
from ..pixels import fit, is_condition_set
from . import toyworld
from .readers import Example, PairFolder, fingerprint, is_toy, load

# Index offsets of the held-out ranges of every toy world (training uses 0 .. n_train - 1).
VALIDATION = 10**7
COMPOSITION = 2 * 10**7
BASE_EVALUATION = 10**8

# First seed of each generation stream; item k of the stream uses first + k.
SEED_STREAMS = {
    "validation": 1000,  # training-time validation and evaluate_controlnet
    "composition": 2000,  # two nets in one call
    "prompt_settings": 3000,  # Fig. 8's four prompt settings
    "cfg_forms": 4000,  # Fig. 5's guidance settings
    "references": 5000,  # Table 2's base-alone reference
    "telemetry_probe": 12345,  # the fixed noise of the telemetry's probe batch (a torch seed)
    "condition_probe": 23456,  # the fixed noise of the condition-use probe (telemetry.ConditionProbe)
}

# One unseen background per fill colour: fill i with background i+3 (mod 8). Never pretrained on.
HELD_OUT_FILL_PAIRS = tuple((toyworld.COLOUR_NAMES[i], toyworld.COLOUR_NAMES[(i + 3) % 8]) for i in range(8))


def _held_out_x11_pairs(share: float = 0.02) -> tuple[tuple[str, str], ...]:
    """About ``share`` of the ordered X11 (fill, background) pairs, drawn once from a fixed stream, plus the kit's
    eight: the base never sees them together, so its evaluation can ask for combinations it never saw (each
    colour alone it sees as fill and as background)."""
    rng = np.random.default_rng(11)
    names = toyworld.X11_NAMES
    pairs = [(a, b) for a in names for b in names if a != b and toyworld.X11[a] != toyworld.X11[b]]
    picked = [p for p, u in zip(pairs, rng.random(len(pairs))) if u < share]
    return tuple(dict.fromkeys(picked + list(HELD_OUT_FILL_PAIRS)))


# Fill50K's colour pairs that pretraining never draws (both X11 worlds); the kit's eight are among them.
HELD_OUT_X11_PAIRS = _held_out_x11_pairs()


def seeds(stream: str, n: int, start: int = 0) -> list[int]:
    """Seeds of items ``start .. start + n - 1`` of a named stream."""
    if stream not in SEED_STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; known: {', '.join(SEED_STREAMS)}")
    return [SEED_STREAMS[stream] + start + k for k in range(n)]


class _Head:
    """The first ``n`` items of a dataset (a folder's training part; its tail is for validation)."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds[i]

    def fingerprint(self) -> dict:
        return {**fingerprint(self.ds), "head": self.n}


def training_items(dataset: str, size: int, n_train: int, data_seed: int = 0, validation_size: int = 32):
    """The training items: ``n_train`` toy samples at ``size``, or a folder's items but its last
    ``validation_size``."""
    if is_toy(dataset):
        return load(dataset, n=n_train, seed=data_seed, size=size)
    ds = load(dataset)
    if len(ds) <= validation_size:
        raise ValueError(f"dataset {dataset!r} has {len(ds)} items; training keeps the last validation_size="
                         f"{validation_size} apart for validation: add items or lower validation_size")
    return _Head(ds, len(ds) - validation_size)


def split_overlap(dataset: str, validation_size: int) -> str | None:
    """A note when items of a folder's held-out tail repeat training items (the same image and condition bytes,
    whatever their names), else None: validation would measure items the net was trained on. Files are hashed
    only where a held-out file has the same size, so a large folder costs a stat per file."""
    if is_toy(dataset):
        return None  # drawn from disjoint index ranges
    ds = load(dataset)
    if not isinstance(ds, PairFolder) or len(ds) <= validation_size:
        return None
    image_key, condition_key, _ = ds.keys

    def files(row) -> list[str]:
        maps = row[condition_key] if isinstance(row[condition_key], list) else [row[condition_key]]
        return [os.path.join(ds.root, name) for name in [row[image_key], *maps]]

    cut = len(ds) - validation_size
    held = [files(r) for r in ds.rows[cut:]]
    sizes = {os.stat(f).st_size for fs in held for f in fs}
    digests: dict[str, str] = {}

    def key(fs) -> tuple | None:
        if any(os.stat(f).st_size not in sizes for f in fs):
            return None
        return tuple(digests.setdefault(f, file_sha256(f)) for f in fs)

    held_keys = {key(fs): ds.rows[cut + k]["_line"] for k, fs in enumerate(held)}
    repeats = []
    for row in ds.rows[:cut]:
        k = key(files(row))
        if k is not None and k in held_keys:
            repeats.append((held_keys[k], row["_line"]))
    if not repeats:
        return None
    lines = sorted({h for h, _ in repeats})
    pairs = ", ".join(f"line {h} = line {t}" for h, t in sorted(repeats)[:3])
    return (f"{len(lines)} of the {validation_size} held-out validation items of {ds.index_file} repeat training "
            f"items (the same image and condition; {pairs}{', ...' if len(repeats) > 3 else ''}): validation "
            "measures them as seen, not held out. Remove the duplicates from one side (the last validation_size "
            "rows are held out)")


class HeldOutItem:
    """A held-out toy sample seen as an Example (image, condition, prompt) that keeps its exact truth."""

    def __init__(self, ds, i: int):
        s = ds.sample(i)
        ex = ds[i]
        self.image, self.condition, self.prompt, self.truth = ex.image, ex.condition, ex.prompt, s.truth
        self.sample = s


def held_out_items(dataset: str, n: int, size: int, data_seed: int = 0, validation_size: int | None = None,
                   resize_mode: str = "crop_and_resize") -> list:
    """``n`` conditions no run on ``dataset`` trains on, at ``size``: toy samples from ``VALIDATION`` on
    (``HeldOutItem``, with truth), or a folder's last items (at most ``validation_size``, which training
    leaves out), fitted to ``size`` as training fits its pairs (``resize_mode``)."""
    if is_toy(dataset):
        ds = load(dataset, n=n, seed=data_seed, size=size, offset=VALIDATION)
        return [HeldOutItem(ds, i) for i in range(n)]
    ds = load(dataset)
    k = min(n, validation_size if validation_size is not None else n)
    return [_fitted(ds[i], size, resize_mode) for i in range(len(ds) - k, len(ds))]


def _fitted(ex: Example, size: int, mode: str) -> Example:
    """``ex`` at ``size`` x ``size``: images bicubic, conditions as generation fits them (``cnkit.pixels.fit``)."""
    condition = (tuple(fit(m, size, size, mode)[0] for m in ex.condition) if is_condition_set(ex.condition)
                 else fit(ex.condition, size, size, mode)[0])
    return Example(fit(ex.image, size, size, mode, Image.BICUBIC)[0], condition, ex.prompt)


def held_out_images(n: int = 64, seed: int = 0, world: str | None = None) -> np.ndarray:
    """Toy images never used in training, for the VAE's PSNR: of ``world``, or of the fill and shapes worlds (one
    fill in three) when None."""
    pick = (lambda i: world) if world else (lambda i: "fill" if i % 3 == 0 else "shapes")
    return np.stack([toyworld.sample(pick(i), VALIDATION + i, seed=seed).image for i in range(n)])


def held_out_prompts(n: int, seed: int = 0, fill_pairs=HELD_OUT_FILL_PAIRS, exclude_prompts=frozenset()):
    """``n`` fill samples drawn from the held-out colour pairs and ``n`` shapes samples whose prompts
    are not in ``exclude_prompts``; a fixed function of ``seed``. Each has its own generation seed."""
    fills = []
    pairs = list(fill_pairs)
    rng = np.random.default_rng([7, seed])
    for i in range(n):  # held-out pairs in turn, a fresh geometry each
        fill, bg = pairs[i % len(pairs)]
        fills.append({"world": "fill", "fill": fill, "background": bg, "seed": int(rng.integers(2**31)),
                      "prompt": f"{fill} circle with {bg} background"})
    shapes, i = [], 0
    while len(shapes) < n:
        s = toyworld.sample("shapes", BASE_EVALUATION + i, seed=seed)
        i += 1
        if s.prompt not in exclude_prompts:
            shapes.append({"world": "shapes", "truth": s.truth, "seed": int(rng.integers(2**31)),
                           "prompt": s.prompt})
    return fills, shapes


def held_out_x11_prompts(n: int, seed: int = 0, min_delta_e: float = 20.0) -> list[dict]:
    """``n`` prompts of held-out X11 pairs (``HELD_OUT_X11_PAIRS``) whose two colours differ by at least
    ``min_delta_e`` (CIEDE2000): a disc closer to its background than that cannot be told from it without trusting
    the colours, and the base's measure never does. Fixed by ``seed``; each has its own generation seed."""
    rng = np.random.default_rng([13, seed])
    pairs = [p for p in HELD_OUT_X11_PAIRS
             if delta_e(toyworld.X11[p[0]], toyworld.X11[p[1]]) >= min_delta_e]
    order = rng.permutation(len(pairs))
    out = []
    for k in range(n):
        fill, bg = pairs[order[k % len(pairs)]]
        out.append({"world": "fill-x11", "fill": fill, "background": bg, "fill_rgb": list(toyworld.X11[fill]),
                    "background_rgb": list(toyworld.X11[bg]), "seed": int(rng.integers(2**31)),
                    "prompt": f"{fill} circle with {bg} background"})
    return out


def composition_scenes(n: int, data_seed: int = 0, margin: int = 3) -> list:
    """``n`` held-out shapes scenes with exactly two shapes that stay ``margin`` px apart, so each of
    two conditions can describe one of them."""
    scenes, i = [], 0
    while len(scenes) < n:
        s = toyworld.sample("shapes", COMPOSITION + i, seed=data_seed)
        i += 1
        if len(s.truth["shapes"]) != 2:
            continue
        a, b = (ndimage.binary_dilation(s.masks[f"shape{k}"], iterations=margin) for k in (0, 1))
        if not (a & b).any():
            scenes.append(s)
    return scenes
