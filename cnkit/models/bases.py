"""The locked base: any Stable Diffusion-shaped diffusers pipeline, from a local folder or a hub id.

Every path of the kit takes ``base=``: ``"data/tiny-sd"`` (the embedded default) or real SD 1.5
(``"stable-diffusion-v1-5/stable-diffusion-v1-5"`` where a hub can be reached, or a folder). Sizes are
read from the base's own configs, never assumed: the image size is the UNet's latent size times the
VAE's downsampling factor (64 = 16 x 4 for the tiny base, 512 = 64 x 8 for SD 1.5).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from ..files import file_sha256
from ..params import repo_path


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell: 8 for SD 1.5, 4 for the tiny model."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def image_size(pipe) -> int:
    """The base's native image size in pixels."""
    size = pipe.unet.config.sample_size
    size = size[0] if isinstance(size, list | tuple) else size
    return size * vae_scale_factor(pipe.vae)


def error_chain(e: BaseException) -> str:
    """An exception and its causes, one text (what the libraries said, outermost first)."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return " | ".join(chain)


def weights_problem(e: BaseException, what: str, path) -> Exception | None:
    """``e`` in words when a model folder's files are the problem (pickled weights refused, a weights file cut
    short or damaged, a JSON config cut off), with the fix; None when it is something else."""
    text = error_chain(e)
    if "weights_only" in text or "Unsupported global" in text or "UnpicklingError" in text:
        return ValueError(f"{what} {path} holds pickle weights (.bin) that torch refuses to unpickle safely "
                          "(weights_only=True), so they were not loaded: use one saved in safetensors, or convert it "
                          "on a machine you trust (from_pretrained(folder).save_pretrained(folder, "
                          "safe_serialization=True))")
    if any(k in text for k in ("Unable to load weights", "SafetensorError", "HeaderTooLarge", "MetadataIncomplete",
                               "incomplete metadata", "InvalidHeader", "file not fully covered")):
        return ValueError(f"a weights file of {what} {path} is damaged: it does not read as safetensors (cut short or "
                          f"overwritten; {text[:200]}). Restore it from where it came (copy it again, export or "
                          "train it again)")
    if "JSONDecodeError" in text or "Expecting" in text and "delimiter" in text:
        return ValueError(f"a config.json of {what} {path} is not valid JSON (cut off or edited: {text[:200]}). "
                          "Restore it: save_pretrained writes it with the weights")
    return None


@contextlib.contextmanager
def quiet_loading():
    """diffusers' and transformers' loading bars off (a second's bars that a saved notebook shows stuck at 0%)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for m, _ in was:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in was:
            if on:
                m.enable_progress_bar()


def load_base(base: str, device=None) -> StableDiffusionPipeline:
    """The locked base pipeline (local folder or hub id), frozen, in eval mode."""
    path = repo_path(base)
    try:
        with quiet_loading():
            pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None,
                                                           requires_safety_checker=False)
    except Exception as e:  # noqa: BLE001 - diffusers and transformers raise OSError, ValueError or pickle's errors
        said = weights_problem(e, "the base", path)
        if said is not None:
            raise said from e
        if not isinstance(e, OSError | ValueError):
            raise
        raise FileNotFoundError(
            f"could not load the base model {base!r} ({type(e).__name__}: {str(e)[:300]}). Pass a local "
            "diffusers pipeline folder, or a hub id on a machine that can download it (with HF_HUB_OFFLINE "
            "unset), or download it once with StableDiffusionPipeline.from_pretrained(id).save_pretrained(folder)"
        ) from e
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False).eval()
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_LOADED: dict[str, Any] = {}


def forget(base=None) -> None:
    """Drop ``base`` (or every base) from ``load_pipeline``'s cache; an SD-scale base holds ~4 GB."""
    if base is None:
        _LOADED.clear()
    else:
        _LOADED.pop(str(base), None)


def is_loaded(base) -> bool:
    """Whether ``load_pipeline(base)`` would return at once (a pipeline, or a base already loaded)."""
    return isinstance(base, StableDiffusionPipeline) or str(base) in _LOADED


def load_pipeline(base) -> StableDiffusionPipeline:
    """``load_base``, once per process (generation and evaluations call it per image set), on
    ``generation_device()``; a pipeline passed in is returned as it is."""
    if isinstance(base, StableDiffusionPipeline):
        return base
    key = str(base)
    if key not in _LOADED:
        _LOADED[key] = load_base(base, generation_device())
    return _LOADED[key]


def generation_device() -> str | None:
    """Where generation runs: the GPU when there is one (SD 1.5 at 512 px takes minutes an image on a CPU), else
    the CPU (None: where the weights were loaded). Seeds stay CPU generators, so an image does not depend on it."""
    return "cuda" if torch.cuda.is_available() else None


# A base folder's own notes, which say what it is but never change what it computes.
NOT_WEIGHTS = ("README.md", "evaluation.json")


def weights_identity(base) -> str:
    """What a base computes with, as a short digest: for a local folder, of every file of it that decides the
    pipeline's numbers (weights, configs, tokenizer; not its card or evaluation), so that a base republished in
    place (``make pretrain``) never passes for the one before it and one base under two folder names is one base;
    for a hub id, the id (its files are the hub's to keep). Runs are keyed by it (``cnkit.experiments.runs``)."""
    folder = repo_path(base)
    if not folder.is_dir():
        return str(base)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in NOT_WEIGHTS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    stamp = tuple((p.relative_to(folder).as_posix(), *_size_and_time(p)) for p in files)
    return _digest(str(folder), stamp)


def _size_and_time(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _digest(folder: str, stamp: tuple) -> str:
    # hashed once per process and state of the files (an SD 1.5 folder's ~4 GB take seconds)
    h = hashlib.sha256()
    for name, *_ in stamp:
        h.update(name.encode() + b"\0" + bytes.fromhex(file_sha256(Path(folder) / name)))
    return "sha256:" + h.hexdigest()[:16]
