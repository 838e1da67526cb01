"""Annotators: turn a source image into a condition map (controlnet-aux underneath).

``annotate(name, source, **settings)`` returns an HxWx3 uint8 map. Names:

- weight-free, always offline: ``canny`` (low_threshold, high_threshold), ``lineart_standard``
  (guassian_sigma, as controlnet-aux spells it, and intensity_threshold), ``content_shuffle`` (seed:
  controlnet-aux draws from numpy's global generator, which is seeded here and restored after, so
  papermill runs repeat), and
  ``mediapipe_face`` when the ``mediapipe`` package is installed;
- weight-based (``hed``, ``pidi``, ``midas``, ``openpose``, ``mlsd``, ``normalbae``, ``lineart``,
  ``lineart_anime``): loaded from ``weights`` (a local folder holding the files) or the hub's
  ``lllyasviel/Annotators``; offline without the files the error names them and how to get them;
- the toy world's exact maps: ``toy_outline``, ``toy_segmentation``, ``toy_depth``, ``toy_edges``;
  their source is a ``cnkit.data.toyworld.Sample`` (they read its ground truth, not its pixels).

Detectors are built on first use and kept (``detector(name, weights)``); nothing loads at import.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

import cnkit.pixels as pixels

from ..data import toyworld

HUB_REPO = "lllyasviel/Annotators"


@dataclass(frozen=True)
class AnnotatorInfo:
    name: str
    detector: str  # controlnet-aux class name ("" for the toy world's maps)
    files: tuple[str, ...] = ()  # weight files the detector reads from a folder or the hub
    settings: tuple[str, ...] = ()  # keyword settings it accepts
    needs: str = ""  # an optional package it needs
    kind: str = ""  # the kind of condition map it draws, as a dataset names its maps (a net trained on "edges"
    # reads canny's maps; the toy world's edges are canny's)
    example: str = ""  # its settings as JSON, with their defaults (the playground's hint)


REGISTRY: dict[str, AnnotatorInfo] = {a.name: a for a in (
    AnnotatorInfo("canny", "CannyDetector", settings=("low_threshold", "high_threshold"), kind="edges",
                  example='{"low_threshold": 100, "high_threshold": 200}'),
    AnnotatorInfo("lineart_standard", "LineartStandardDetector", settings=("guassian_sigma", "intensity_threshold"),
                  kind="lineart", example='{"guassian_sigma": 6.0, "intensity_threshold": 8}'),
    AnnotatorInfo("content_shuffle", "ContentShuffleDetector", settings=("seed", "f"), kind="shuffle",
                  example='{"seed": 0}'),
    AnnotatorInfo("mediapipe_face", "MediapipeFaceDetector", settings=("max_faces", "min_confidence"),
                  needs="mediapipe", kind="face", example='{"max_faces": 1, "min_confidence": 0.5}'),
    AnnotatorInfo("hed", "HEDdetector", ("ControlNetHED.pth",), ("scribble", "safe"), kind="soft edges",
                  example='{"scribble": false}'),
    AnnotatorInfo("pidi", "PidiNetDetector", ("table5_pidinet.pth",), ("scribble", "safe"), kind="soft edges",
                  example='{"scribble": false}'),
    AnnotatorInfo("midas", "MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",), ("a", "bg_th"), kind="depth",
                  example='{"a": 6.28, "bg_th": 0.1}'),
    AnnotatorInfo("openpose", "OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
                  ("include_body", "include_hand", "include_face"), kind="pose", example='{"include_hand": true}'),
    AnnotatorInfo("mlsd", "MLSDdetector", ("mlsd_large_512_fp32.pth",), ("thr_v", "thr_d"), kind="straight lines",
                  example='{"thr_v": 0.1, "thr_d": 0.1}'),
    AnnotatorInfo("normalbae", "NormalBaeDetector", ("scannet.pt",), kind="normals"),
    AnnotatorInfo("lineart", "LineartDetector", ("sk_model.pth", "sk_model2.pth"), ("coarse",), kind="lineart",
                  example='{"coarse": false}'),
    AnnotatorInfo("lineart_anime", "LineartAnimeDetector", ("netG.pth",), kind="lineart"),
    AnnotatorInfo("toy_outline", "", settings=(), kind="outline"),
    AnnotatorInfo("toy_segmentation", "", settings=(), kind="segmentation"),
    AnnotatorInfo("toy_depth", "", settings=(), kind="depth"),
    AnnotatorInfo("toy_edges", "", settings=(), kind="edges"),
)}


class AnnotatorError(ValueError):
    """An annotator cannot run; the message says why and what to do."""


def names(available_only: bool = False) -> list[str]:
    """Registered annotators; with ``available_only``, those that can run here without downloads."""
    out = []
    for name, info in REGISTRY.items():
        if available_only and (info.files or (info.needs and not _has(info.needs))):
            continue
        out.append(name)
    return out


def _has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _import(class_name: str):
    with warnings.catch_warnings():  # controlnet-aux imports every annotator, each with its warnings
        warnings.simplefilter("ignore")
        import controlnet_aux
    return getattr(controlnet_aux, class_name)


def _weights_error(info: AnnotatorInfo, weights, cause: Exception) -> AnnotatorError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    hub = f"the hub ({HUB_REPO})" + (", HF_HUB_OFFLINE set" if offline else "")
    where = f"the folder {weights}" if weights else hub
    return AnnotatorError(
        f"annotator {info.name!r} needs the weight file(s) {', '.join(info.files)}, which could not be read from "
        f"{where} ({type(cause).__name__}: {str(cause)[:200]}). Download them once on a machine with internet "
        f"(huggingface-cli download {HUB_REPO} {' '.join(info.files)} --local-dir annotators) and pass "
        f"weights='annotators', or unset HF_HUB_OFFLINE to let controlnet-aux download them.")


@lru_cache(maxsize=16)
def detector(name: str, weights: str | None = None):
    """The controlnet-aux detector behind ``name``, built once (weights from a folder or the hub)."""
    info = info_for(name)
    if not info.detector:
        return None
    if info.needs and not _has(info.needs):
        raise AnnotatorError(f"annotator {name!r} needs the {info.needs!r} package: pip install {info.needs}")
    cls = _import(info.detector)
    if not info.files:
        return cls()
    source = weights or HUB_REPO
    if weights and not Path(weights).is_dir():
        raise AnnotatorError(f"weights={weights!r} is not a folder; pass the folder holding {', '.join(info.files)}")
    if weights:
        missing = [f for f in info.files if not (Path(weights) / f).is_file()]
        if missing:
            raise _weights_error(info, weights, FileNotFoundError(", ".join(missing)))
    try:
        return cls.from_pretrained(source)
    except Exception as e:  # hub errors, missing files, offline mode: one clear message
        raise _weights_error(info, weights, e) from e


def info_for(name: str) -> AnnotatorInfo:
    if name not in REGISTRY:
        raise AnnotatorError(f"unknown annotator {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def as_rgb(source, what: str = "a source image") -> np.ndarray:
    """``source`` (PIL or array, HxW / HxWx3 / HxWx4 uint8) as a contiguous HxWx3 uint8 array; transparency is
    composited over white, as a viewer shows a photo (``cnkit.pixels.to_rgb``)."""
    try:
        image, _ = pixels.to_rgb(source if isinstance(source, Image.Image) else np.asarray(source), pixels.WHITE)
    except ValueError as e:
        raise AnnotatorError(f"{what}: {e}") from None
    return np.ascontiguousarray(np.asarray(image))


def annotate(name: str, source, weights: str | None = None, **settings) -> np.ndarray:
    """The condition map of ``source`` (an image, or a toy-world Sample for ``toy_*``) at its own size."""
    info = info_for(name)
    unknown = set(settings) - set(info.settings) - {"seed"}
    if unknown:
        raise AnnotatorError(f"annotator {name!r} has no setting(s) {', '.join(sorted(unknown))}; "
                             f"it accepts: {', '.join(info.settings) or 'none'}")
    if name.startswith("toy_"):
        if not isinstance(source, toyworld.Sample):
            raise AnnotatorError(f"{name!r} reads a toy-world scene's exact geometry, not an image: choose a toy-world "
                                 "scene as the source (in code: cnkit.data.toyworld.sample(world, index)), or an "
                                 "annotator that reads images (canny, lineart_standard, ...)")
        kind = name.removeprefix("toy_")
        if kind not in source.conditions:
            raise AnnotatorError(f"the {source.truth['world']!r} world has no {kind!r} map; it has: "
                                 f"{', '.join(source.conditions)}")
        return source.conditions[kind]
    image = source.image if isinstance(source, toyworld.Sample) else as_rgb(source)
    det = detector(name, weights)
    # controlnet-aux rounds its working size to a multiple of 64: below 64 px that is 0 and OpenCV fails. Detect
    # at 64 px or more, then bring the map back to the source's size (below).
    size = max(64, min(image.shape[:2]))
    accepted = inspect.signature(det.__call__).parameters  # detectors differ in which of these they take
    kwargs = {k: v for k, v in {"detect_resolution": size, "image_resolution": size, "output_type": "np"}.items()
              if k in accepted}
    if name == "content_shuffle":
        # controlnet-aux draws from numpy's global generator: seed it for this call only.
        state = np.random.get_state()
        np.random.seed(int(settings.pop("seed", 0)))
        try:
            out = det(image, **kwargs, **settings)
        finally:
            np.random.set_state(state)
    else:
        settings.pop("seed", None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = det(image, **kwargs, **settings)
    out = np.asarray(out)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    if out.shape[:2] != image.shape[:2]:
        out = np.asarray(Image.fromarray(out[:, :, :3]).resize(image.shape[1::-1], Image.BILINEAR))
    return np.ascontiguousarray(out[:, :, :3]).astype(np.uint8)

