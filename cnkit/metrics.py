"""Measurements: pure functions of images, masks and curves (numpy), using the toy world's exact ground
truth instead of downloaded evaluators. Nothing here loads a model or generates an image; the drivers
that generate images to measure them are ``cnkit.experiments.evaluations``.

Base quality (is the pretrained model any good?):

- ``analyse_fill(image)``: the background colour is read from the border, the foreground is every
  pixel far from it (so the fill colour is not trusted to find the disc); the image passes as
  "one disc" when exactly one sizeable foreground region exists and it overlaps the disc of the
  same area at its centroid with IoU >= 0.8. Colours are the nearest palette names of the
  border's and the region's median colours.
- ``analyse_shapes(image, truth)``: pixels are labelled with their nearest palette colour; each
  prompted colour must form exactly one sizeable region, no unprompted colour may, and each region's
  kind (circle, square, triangle) is the template that fits it best, pixels of other shapes being
  ignored (they may hide part of it).

Condition fidelity (does a ControlNet follow its condition?): ``disc_iou`` (fill), ``edge_f1`` (ControlNet++'s
Canny F1), ``segmentation_miou`` (re-detected by colour clustering); ``fidelity_metrics_for(dataset)`` picks
them per dataset. Image statistics: ``saturation``, ``off_palette`` (Fig. 5). Curves: ``convergence``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from scipy import ndimage

# each module by its own path: the package's front door (cnkit/__init__) is above every module
import cnkit.colours as colours
import cnkit.geometry as geometry

_PALETTE_NAMES = colours.COLOUR_NAMES
_PALETTE = np.array([colours.PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)


def nearest_colour(rgb) -> str:
    d = ((_PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(-1)
    return _PALETTE_NAMES[int(d.argmin())]


def _border(image: np.ndarray, width: int = 2) -> np.ndarray:
    return np.concatenate([image[:width].reshape(-1, 3), image[-width:].reshape(-1, 3),
                           image[:, :width].reshape(-1, 3), image[:, -width:].reshape(-1, 3)])


def foreground_mask(image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels whose colour is far (RGB distance) from the border's median colour."""
    bg = np.median(_border(image), axis=0)
    return np.sqrt(((image.astype(np.float32) - bg) ** 2).sum(-1)) > threshold


def _regions(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    labels, n = ndimage.label(mask)
    areas = ndimage.sum(mask, labels, range(1, n + 1))
    return [labels == i + 1 for i, a in enumerate(areas) if a >= min_area]


def disc_of(mask: np.ndarray) -> np.ndarray:
    """The disc with the region's area, centred on its centroid."""
    h, w = mask.shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = yy[mask].mean(), xx[mask].mean()
    r = np.sqrt(mask.sum() / np.pi)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def analyse_fill(image: np.ndarray) -> dict:
    size = image.shape[0]
    min_area = max(4, int(0.004 * size * size))  # ~16 px at 64: smaller blobs are speckle
    regions = _regions(foreground_mask(image), min_area)
    out = {"regions": len(regions), "background": nearest_colour(np.median(_border(image), axis=0))}
    if regions:
        main = max(regions, key=lambda m: m.sum())
        inner = ndimage.binary_erosion(main, iterations=1)
        pixels = image[inner if inner.sum() >= 4 else main]
        out["fill"] = nearest_colour(np.median(pixels, axis=0))
        out["disc_iou"] = iou(main, disc_of(main))
    out["one_disc"] = len(regions) == 1 and out.get("disc_iou", 0) >= 0.8
    return out


def fitted_disc(mask: np.ndarray) -> np.ndarray:
    """The disc whose circle best fits the region's edge (an algebraic least-squares fit to the edge pixels that
    are not on the frame), clipped to the frame: a disc the image's edge cuts is still a disc."""
    edge = mask & ~ndimage.binary_erosion(mask, border_value=1)
    ys, xs = np.nonzero(edge)
    if len(xs) < 3:
        return np.zeros_like(mask)
    (a, b, c), *_ = np.linalg.lstsq(np.stack([xs, ys, np.ones_like(xs)], 1).astype(float),
                                    (xs**2 + ys**2).astype(float), rcond=None)
    cx, cy = a / 2, b / 2
    r = np.sqrt(max(c + cx**2 + cy**2, 0.0))
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def _two_colours(image: np.ndarray, iters: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """2-means in CIELAB, started from the border's median and the pixel farthest from it: (labels, centres)."""
    lab = colours.srgb_to_lab(image.reshape(-1, 3))
    start = colours.srgb_to_lab(np.median(_border(image), axis=0))
    far = lab[np.argmax(((lab - start) ** 2).sum(-1))]
    centres = np.stack([start, far])
    for _ in range(iters):
        labels = ((lab[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([lab[labels == k].mean(0) if (labels == k).any() else centres[k] for k in (0, 1)])
    return labels.reshape(image.shape[:2]), centres


def analyse_fill_x11(image: np.ndarray, fill_rgb, background_rgb, tolerance: float = 10.0) -> dict:
    """One disc with the prompted colours, for any of Fill50K's 140 colours and geometries (discs may leave the
    frame), without trusting the colours to find it: the image is split into its two main colours (2-means in
    CIELAB); the disc is the part a circle fits best (its edge away from the frame); it is "one disc" when that
    part is one region whose IoU with its fitted circle is at least 0.8 and the two colours explain the image (90%
    of the pixels within CIEDE2000 15 of their part's colour). A colour is right when its median is within
    ``tolerance`` CIEDE2000 of the prompted one (10: the same colour, a clearly different shade at most); the
    nearest X11 name is reported beside it."""
    size = image.shape[0]
    min_area = max(4, int(0.004 * size * size))
    labels, _ = _two_colours(image)
    fits = []
    for k in (0, 1):
        part = ndimage.binary_fill_holes(labels == k)
        fits.append(iou(part, fitted_disc(part)) if part.sum() >= min_area and (~part).sum() >= min_area else 0.0)
    k = int(np.argmax(fits))
    disc, rest = labels == k, labels != k
    inner = ndimage.binary_erosion(disc, iterations=1)
    fill = np.median(image[inner if inner.sum() >= 4 else disc], axis=0) if disc.any() else np.zeros(3)
    background = np.median(image[rest], axis=0) if rest.any() else np.zeros(3)
    fit_error = np.where(disc, colours.delta_e(image, fill), colours.delta_e(image, background))
    out = {"disc_iou": fits[k], "regions": len(_regions(disc, min_area)),
           "explained": float((fit_error <= 15).mean()),
           "fill": colours.nearest_x11(fill), "background": colours.nearest_x11(background),
           "fill_delta_e": float(colours.delta_e(fill, fill_rgb)),
           "background_delta_e": float(colours.delta_e(background, background_rgb))}
    out["one_disc"] = out["regions"] == 1 and fits[k] >= 0.8 and out["explained"] >= 0.9
    out["fill_ok"] = out["fill_delta_e"] <= tolerance
    out["background_ok"] = out["background_delta_e"] <= tolerance
    return out


def _params_grid(cx, cy, r):
    cx, cy, r = np.meshgrid(cx, cy, r, indexing="ij")
    return np.stack([cx.ravel(), cy.ravel(), r.ravel()], 1)


def _template_masks(kind: str, params: np.ndarray, size: int) -> np.ndarray:
    x, y = geometry.grid(size)
    cx, cy, r = (params[:, i].reshape(-1, 1, 1) for i in range(3))
    return (geometry.shape_field(kind, cx, cy, r, x, y) <= 0).reshape(len(params), -1).astype(np.float32)


_COARSE = _params_grid(np.linspace(0.08, 0.92, 22), np.linspace(0.08, 0.92, 22), np.linspace(0.09, 0.27, 10))
_TEMPLATE_CACHE: dict[int, dict] = {}


def _best_fit(masks: np.ndarray, target: np.ndarray, keep: np.ndarray) -> tuple[int, float]:
    inter = masks @ target
    union = masks @ keep - inter + target.sum()  # |T ∩ keep| + |R| - |T ∩ R|
    iou_ = inter / np.maximum(union, 1)
    return int(iou_.argmax()), float(iou_.max())


def classify_shape(region: np.ndarray, ignore: np.ndarray) -> tuple[str, float]:
    """The kind whose best-placed template has the highest IoU with ``region`` (``ignore`` pixels
    excluded from both: another shape may cover them). Templates are placed on a coarse grid of
    centres and radii, then refined around the best coarse placement."""
    size = region.shape[0]
    if size not in _TEMPLATE_CACHE:
        _TEMPLATE_CACHE[size] = {k: _template_masks(k, _COARSE, size) for k in geometry.SHAPE_KINDS}
    keep = (~ignore).reshape(-1).astype(np.float32)
    target = (region & ~ignore).reshape(-1).astype(np.float32)
    best = ("circle", -1.0)
    for kind, masks in _TEMPLATE_CACHE[size].items():
        cx, cy, r = _COARSE[_best_fit(masks, target, keep)[0]]
        fine = _params_grid(cx + np.linspace(-0.03, 0.03, 7), cy + np.linspace(-0.03, 0.03, 7),
                            r + np.linspace(-0.02, 0.02, 9))
        score = _best_fit(_template_masks(kind, fine, size), target, keep)[1]
        if score > best[1]:
            best = (kind, score)
    return best


def analyse_shapes(image: np.ndarray, truth: dict) -> dict:
    """Compare an image with the prompted scene (``truth`` of a shapes sample)."""
    size = image.shape[0]
    labels = ((image.astype(np.float32)[:, :, None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)
    background = nearest_colour(np.median(_border(image), axis=0))
    min_area = max(4, int(0.006 * size * size))  # ~25 px at 64; the smallest visible shape is ~45
    found = {}
    for ci, name in enumerate(_PALETTE_NAMES):
        if name == background:
            continue
        regions = _regions(labels == ci, min_area)
        if regions:
            found[name] = regions
    wanted = {s["colour"]: s["kind"] for s in truth["shapes"]}
    colours_ok = background == truth["background"] and set(found) == set(wanted) and all(
        len(r) == 1 for r in found.values())
    kinds = {}
    if colours_ok:
        shapes_mask = np.any([r[0] for r in found.values()], axis=0)
        for name, (region,) in found.items():
            kinds[name] = classify_shape(region, shapes_mask & ~region)[0]
    kinds_ok = colours_ok and all(kinds[c] == k for c, k in wanted.items())
    return {"background": background, "found": {c: len(r) for c, r in found.items()},
            "kinds": kinds, "colours_ok": bool(colours_ok), "correct": bool(kinds_ok)}


# --- image statistics (over-saturation, Fig. 5) --------------------------------------------------


def saturation(image: np.ndarray) -> float:
    """Mean HSV saturation, (max - min) / max per pixel, 0 for black; 0..1."""
    x = np.asarray(image, np.float32)
    hi, lo = x.max(axis=-1), x.min(axis=-1)
    return float(np.mean(np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)))


def off_palette(image: np.ndarray) -> float:
    """Mean RGB distance of each pixel to its nearest toy-world palette colour (0..441): the toy world
    draws palette colours only, so colour drift and over-saturation artefacts raise it."""
    x = np.asarray(image, np.float32).reshape(-1, 1, 3)
    return float(np.sqrt(((x - _PALETTE[None]) ** 2).sum(-1)).min(axis=1).mean())


# --- condition fidelity (ControlNet training) -----------------------------------------------


def condition_disc(condition: np.ndarray) -> np.ndarray:
    """The disc an outline condition draws (any Fill50K-style outline: light lines on dark). A closed outline: its
    interior, grown by half a thin line (the line is drawn across the circle's edge). An outline the image's edge
    cuts (Fill50K's circles may leave the frame) encloses nothing: the circle is then fitted to its pixels."""
    lines = np.asarray(condition)[..., :3].max(-1) > 127
    inside = ndimage.binary_fill_holes(lines) & ~lines
    if inside.any():
        return ndimage.binary_dilation(inside, iterations=1)
    ys, xs = np.nonzero(lines)
    if len(xs) < 3:
        return inside
    # algebraic least-squares circle (Kasa): x^2 + y^2 = a x + b y + c
    (a, b, c), *_ = np.linalg.lstsq(np.stack([xs, ys, np.ones_like(xs)], 1).astype(float),
                                    (xs**2 + ys**2).astype(float), rcond=None)
    cx, cy = a / 2, b / 2
    r = np.sqrt(max(c + cx**2 + cy**2, 0.0))
    yy, xx = np.mgrid[:lines.shape[0], :lines.shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def disc_iou(image: np.ndarray, condition) -> float:
    """IoU between the generated image's main foreground region (found against the border's colour,
    never by trusting the fill colour) and the disc the condition's outline encloses."""
    size = image.shape[0]
    regions = _regions(foreground_mask(image), max(4, int(0.004 * size * size)))
    if not regions:
        return 0.0
    main = ndimage.binary_fill_holes(max(regions, key=lambda m: m.sum()))
    return iou(main, condition_disc(condition))


def canny_edges(image: np.ndarray) -> np.ndarray:
    return geometry.canny(np.ascontiguousarray(image))[..., 0] > 127


def edge_f1(image: np.ndarray, reference: np.ndarray, tolerance: int = 1) -> float:
    """F1 of Canny edges of ``image`` against those of ``reference`` (ControlNet++'s Canny metric),
    an edge pixel counting as matched within ``tolerance`` pixels."""
    a, b = canny_edges(image), canny_edges(reference)
    if not a.any() and not b.any():
        return 1.0
    grow = lambda m: ndimage.binary_dilation(m, iterations=tolerance) if tolerance else m
    precision = (a & grow(b)).sum() / max(a.sum(), 1)
    recall = (b & grow(a)).sum() / max(b.sum(), 1)
    return float(2 * precision * recall / max(precision + recall, 1e-9))


SEGMENTATION_CLASSES = ("background", *geometry.SHAPE_KINDS)


def truth_segmentation(sample) -> np.ndarray:
    """Class index per pixel (0 background, then circle, square, triangle) of a shapes sample."""
    seg = np.zeros(sample.image.shape[:2], np.int64)
    for ci, kind in enumerate(SEGMENTATION_CLASSES[1:], start=1):
        seg[sample.masks[kind]] = ci
    return seg


def redetect_segmentation(image: np.ndarray, sample) -> np.ndarray:
    """Segmentation re-detected from a generated shapes image by colour clustering (Table 2's
    protocol with exact geometry in place of a trained segmenter): pixels are clustered by nearest
    palette colour, the border's cluster is background, and each ground-truth shape claims the
    non-background cluster that overlaps it most (greedily, best overlap first), so colours are
    never trusted to be the prompted ones. Unclaimed clusters count as background."""
    labels = ((image.astype(np.float32)[:, :, None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)
    background = _PALETTE_NAMES.index(nearest_colour(np.median(_border(image), axis=0)))
    shapes = sample.truth["shapes"]
    overlaps = []
    for i in range(len(shapes)):
        visible = sample.masks[f"shape{i}"]
        for c in range(len(_PALETTE_NAMES)):
            if c != background:
                overlaps.append((int((visible & (labels == c)).sum()), i, c))
    pred = np.zeros(labels.shape, np.int64)
    taken_shapes, taken_colours = set(), set()
    for overlap, i, c in sorted(overlaps, reverse=True):
        if overlap == 0 or i in taken_shapes or c in taken_colours:
            continue
        taken_shapes.add(i)
        taken_colours.add(c)
        pred[labels == c] = SEGMENTATION_CLASSES.index(shapes[i]["kind"])
    return pred


def segmentation_miou(image: np.ndarray, sample) -> float:
    """Mean IoU over the classes present in the truth or the re-detected segmentation."""
    truth, pred = truth_segmentation(sample), redetect_segmentation(image, sample)
    present = [c for c in range(len(SEGMENTATION_CLASSES)) if (truth == c).any() or (pred == c).any()]
    return float(np.mean([iou(truth == c, pred == c) for c in present]))


def fidelity_metrics_for(dataset: str, with_truth: bool = True) -> dict:
    """Every condition-fidelity metric for a training dataset's items, the primary one first:
    ``{name: fn(generated uint8 image, item)}``. Items have ``.condition`` and ``.image``; toy items
    also ``.sample`` (the exact ground truth, which ``miou`` needs: ``with_truth``)."""
    if "shapes" in dataset:
        edges = lambda img, item: edge_f1(img, np.asarray(item.image))
        miou = lambda img, item: segmentation_miou(img, item.sample)
        if not with_truth:
            return {"edge_f1": edges}
        if "segmentation" in dataset.partition("/")[2].split("+"):  # a segmentation net's (or a union's with one)
            return {"miou": miou, "edge_f1": edges}
        return {"edge_f1": edges, "miou": miou}
    return {"disc_iou": lambda img, item: disc_iou(img, item.condition)}


# Fidelity a run must keep from some validation on to count as converged, per metric. Disc IoU 0.8 is the fill
# issue's bar; edge F1 and mIoU thresholds are where samples visibly follow the map.
CONVERGENCE_THRESHOLDS = {"disc_iou": 0.8, "edge_f1": 0.5, "miou": 0.6}


def convergence(steps, fidelity, threshold: float) -> dict:
    """When fidelity rose and how abruptly, from the raw series (never smoothed).

    ``converged_at_step``: the first validated step from which fidelity stays >= ``threshold`` to the
    end (None if it never does). ``abruptness``: the steps between the first crossing of 10% and of
    90% of the gain (final - initial), as a fraction of the run's length; small means sudden.
    """
    steps, fidelity = np.asarray(steps, float), np.asarray(fidelity, float)
    initial, final = float(fidelity[0]), float(fidelity[-1])
    above = fidelity >= threshold
    converged = None
    for i in range(len(steps)):
        if above[i:].all():
            converged = int(steps[i])
            break
    out = {"fidelity_initial": initial, "fidelity_final": final, "fidelity_max": float(fidelity.max()),
           "threshold": threshold, "converged_at_step": converged, "abruptness": None,
           "step_10pct": None, "step_90pct": None}
    gain = final - initial
    if gain > 0:
        lo = steps[np.argmax(fidelity >= initial + 0.1 * gain)]
        hi = steps[np.argmax(fidelity >= initial + 0.9 * gain)]
        span = steps[-1] - steps[0]
        out.update(step_10pct=int(lo), step_90pct=int(hi), abruptness=float((hi - lo) / span) if span else None)
    return out


# --- composition (two nets in one call) ------------------------------------------------------


def _paint_background(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[region] = np.median(_border(image), axis=0).astype(np.uint8)
    return out


def _only_shape(sample, k: int):
    """``sample`` as if shape ``k`` were the only one (for measuring one condition of a composition)."""
    shape = sample.truth["shapes"][k]
    mask = sample.masks[f"shape{k}"]
    masks = {"shape0": mask} | {kind: mask if kind == shape["kind"] else np.zeros_like(mask)
                                for kind in geometry.SHAPE_KINDS}
    return SimpleNamespace(image=sample.image, truth={**sample.truth, "shapes": [shape]}, masks=masks)


def composition_fidelity(image: np.ndarray, sample) -> dict:
    """Each condition's fidelity where it speaks: mIoU of shape 0 (shape 1's area painted as background)
    and edge F1 of shape 1's outline against the true scene's edges (shape 0's area painted out)."""
    near = [ndimage.binary_dilation(sample.masks[f"shape{k}"], iterations=3) for k in (0, 1)]
    miou = segmentation_miou(_paint_background(image, near[1]), _only_shape(sample, 0))
    f1 = edge_f1(_paint_background(image, near[0]), _paint_background(sample.image, near[0]))
    return {"segmentation_miou": miou, "outline_edge_f1": f1}
