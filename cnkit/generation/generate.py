"""Generation from several control units at once, the way the WebUI extension and ComfyUI offer it.

``generate(base, prompt, units=[ControlUnit(...), ...], ...)`` runs diffusers'
``StableDiffusionControlNetPipeline`` with a ``MultiControlNetModel`` of the units' nets. A unit is a
ControlNet, its condition (an image, or a source plus an annotator), a scale, a start and an end
fraction of the denoising, a control mode and optional per-connection weights. What diffusers has
(scale, start, end, one global guess mode) is passed to it; what it lacks (per-unit modes, connection
weights, CFG resolution weighting) is added by ``cnkit.generation.weighting``. A unit that only uses what
diffusers has is passed to diffusers unwrapped, so its images equal a plain diffusers call with the
same seed.

``generate_many`` is the one batched loop behind every measurement of the kit (training-time
validation, the evaluations, the figures): one prompt, condition set and seed per image, so an
image depends on its own item and seed only. With no nets it is plain text-to-image.

Both read a net's folder once while its files are unchanged (``cnkit.generation.nets``), and both warn, once per
call, when a prompt holds words a base built from a word list (the embedded one) was never trained on
(``UnknownWordsWarning``; ``generate`` also lists them in its notes, beside prompts cut at 77 tokens).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image
from tqdm.auto import tqdm

import cnkit.generation.annotators as annotators
import cnkit.pixels as pixels

from ..data import toyworld
from ..models.architectures import ControlAdapter, ControlNet, ControlNetLite, UnionControlNet
from ..models.bases import image_size, load_pipeline
from ..models.controlnets import ControlNetLiteModel, check_fits, load_controlnet
from ..models.vocabulary import unknown_prompt_words
from ..params import coerce
from ..pixels import from_pipeline
from .adapter_pipeline import adapter_pipeline, run_adapter_pipeline
from .nets import is_successor_folder, load_net
from .weighting import CFG_WEIGHTINGS, CONTROL_MODES, connection_latent_sizes, unit_net

RESIZE_MODES = pixels.RESIZE_MODES
SCHEDULERS = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler}


@dataclass
class ControlUnit:
    """One control unit (see the module docstring)."""

    controlnet: Any  # a folder, a hub id, an original-layout .safetensors file, a ControlNetModel / lite model, or
    # any cnkit.models.architectures adapter (or the folder it saved)
    image: Any = None  # the condition, or the annotator's source: PIL image, HxWx3 uint8, toy Sample; a union
    # (multi-condition) net's unit: a tuple of condition maps, in its training order (None for a missing map)
    annotator: str | None = None  # cnkit.generation.annotators name; None: ``image`` is the condition itself
    annotator_settings: dict = field(default_factory=dict)
    annotator_weights: str | None = None  # folder with the annotator's weight files
    scale: float = 1.0
    start: float = 0.0  # fraction of the denoising steps where control begins
    end: float = 1.0  # ... and ends
    mode: str = "balanced"  # balanced, prompt (prompt more important), controlnet (ControlNet more important)
    connection_weights: list[float] | None = None  # one per connection (13 for SD's layout)
    resize_mode: str = "crop_and_resize"  # how a condition of another size is fitted (the WebUI's modes)

    def __post_init__(self):
        self.scale = coerce("scale", self.scale, float, minimum=0.0)
        self.start = coerce("start", self.start, float, minimum=0.0, maximum=1.0)
        self.end = coerce("end", self.end, float, minimum=0.0, maximum=1.0)
        if self.start >= self.end:
            raise ValueError(f"a unit's start ({self.start}) must be below its end ({self.end})")
        if self.mode not in CONTROL_MODES:
            raise ValueError(f"unknown control mode {self.mode!r}; known: {', '.join(CONTROL_MODES)}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; known: {', '.join(RESIZE_MODES)}")
        if self.image is None:
            raise ValueError("a unit needs an image: the condition, or the source for its annotator")
        if self.annotator and pixels.is_condition_set(self.image):
            raise ValueError("a set of condition maps (a union net's) is given as the maps themselves: leave "
                             "annotator at None, or annotate each source first (cnkit.generation.annotators.annotate)")
        if self.connection_weights is not None:
            self.connection_weights = [coerce("connection_weights", w, float) for w in self.connection_weights]


# --- conditions ---------------------------------------------------------------------------


def fit_condition(image, width: int, height: int, mode: str = "crop_and_resize") -> tuple[Image.Image, str | None]:
    """A condition at width x height by the WebUI's resize modes (``cnkit.pixels.fit``, as training fits its
    conditions), and a note saying what was done (None when it already had that size). A set of maps (a tuple, for
    a multi-condition net; None for a missing map) is fitted map by map and stays a tuple."""
    if pixels.is_condition_set(image):
        fitted = [(None, None) if m is None else fit_condition(m, width, height, mode) for m in image]
        return tuple(m for m, _ in fitted), next((n for _, n in fitted if n), None)
    out, note = pixels.fit(image, width, height, mode)
    return out, note and f"condition {note}"


def unit_condition(unit: ControlUnit) -> tuple[np.ndarray, list[str]]:
    """The unit's condition map before fitting (its image, or its annotator applied to its source), and notes on
    what was changed on the way (transparency composited, as training does)."""
    if unit.annotator:
        source, notes = unit.image, []
        if not isinstance(source, toyworld.Sample):
            source, note = pixels.to_rgb(source, pixels.WHITE)  # a photo's transparency shows as a viewer shows it
            notes = [f"source image: {note}"] if note else []
            source = np.asarray(source)
        return annotators.annotate(unit.annotator, source, weights=unit.annotator_weights,
                                   **unit.annotator_settings), notes
    if isinstance(unit.image, toyworld.Sample):
        raise ValueError("a toy-world sample is a source: give the unit an annotator (toy_outline, "
                         "toy_segmentation, toy_depth, toy_edges, canny, ...)")
    if pixels.is_condition_set(unit.image):  # a multi-condition net's maps, each converted as a single one
        converted = [None if m is None else pixels.to_rgb(m, pixels.BLACK) for m in unit.image]
        notes = [f"condition {k + 1}: {c[1]}" for k, c in enumerate(converted) if c is not None and c[1]]
        return tuple(None if c is None else np.asarray(c[0]) for c in converted), notes
    image, note = pixels.to_rgb(unit.image, pixels.BLACK)  # conditions draw on black, as in training
    return np.asarray(image), [f"condition: {note}"] if note else []


class UnknownWordsWarning(UserWarning):
    """A prompt holds words the base was not trained on (its word-list tokenizer has no token for them)."""


def unknown_words_note(tokenizer, prompts) -> str | None:
    """A note naming the words of ``prompts`` that the base was not trained on, for a base whose tokenizer was built
    from its training words (the embedded base; ``cnkit.models.vocabulary.word_list_tokenizer``); None when there are
    none, and always for SD's CLIP tokenizer, which splits rare words into pieces it knows."""
    words = unknown_prompt_words(tokenizer, prompts)
    if not words:
        return None
    return (f"words unknown to this base: {', '.join(words)} (it was not trained on them: its tokenizer, built from "
            "its training words, has no token for them, so they do not steer the image)")


def warn_unknown_words(tokenizer, prompts) -> list[str]:
    """``unknown_words_note`` as a warning (once per call) and as a list of notes (empty or one)."""
    note = unknown_words_note(tokenizer, prompts)
    if note:
        warnings.warn(note, UnknownWordsWarning, stacklevel=3)
    return [note] if note else []


def prompt_notes(tokenizer, prompts: dict[str, str]) -> list[str]:
    """Notes for prompts longer than the text encoder reads (it sees the first ``model_max_length`` tokens)."""
    limit, notes = tokenizer.model_max_length, []
    for what, text in prompts.items():
        n = len(tokenizer(text, truncation=False).input_ids) if text else 0
        if n > limit:
            notes.append(f"{what}: {n} tokens, cut to the {limit} the text encoder reads")
    return notes


def loaded_adapters(nets: list, unet) -> list:
    """``nets`` with every folder that only cnkit reads (a successor's, a Control-LoRA's) loaded as its adapter (read
    from disk once while it is unchanged: ``cnkit.generation.nets``); the rest as given (a folder of the paper's kind
    is read by the ControlNet pipeline's loader: the trainer writes the architecture file for every run, so the name
    decides, before anything is loaded)."""
    return [load_net(net, unet) if is_successor_folder(net) else net for net in nets]


def successor(net) -> ControlAdapter | None:
    """``net`` when it is one of ControlNet's successors (an adapter, a union net among them), else None: the paper's
    nets and Control-LoRA (ControlNetModels, also as adapters) go to diffusers' ControlNet pipeline."""
    if not isinstance(net, ControlAdapter):
        return None
    # a union net is a ControlNetModel too, but of 3n condition channels: its maps are packed by the adapter pipeline
    return None if isinstance(net, ControlNet) and not isinstance(net, UnionControlNet) else net


def check_condition_sets(nets: list, conditions: list) -> None:
    """A set of maps goes to a multi-condition (union) net and a single map to any other: a clear error otherwise,
    before anything runs. ``conditions``: one per net."""
    for k, (net, cond) in enumerate(zip(nets, conditions)):
        union = isinstance(net, UnionControlNet)
        if pixels.is_condition_set(cond) and not union:
            raise ValueError(f"unit {k + 1}: a set of {len(cond)} condition maps was given to a single-condition "
                             "net; give it one map, or give the set to a union (multi-condition) net")
        if union and not pixels.is_condition_set(cond):
            raise ValueError(f"unit {k + 1}: a union net reads {net.n_conditions} condition maps; give the unit a "
                             f"tuple of {net.n_conditions} maps in its training order (None for a missing one)")


def _plain_nets(nets: list) -> list:
    """The paper's nets as diffusers' ControlNet pipeline takes them (an adapter of the paper's kind: its model)."""
    return [net.net if isinstance(net, ControlNet) else net for net in nets]


def _as_adapter(net, pipe) -> ControlAdapter:
    """A unit's net as an adapter: the paper's nets (a folder, a hub id, an original-layout file, a ControlNetModel or
    lite model) wrapped as its ControlNet, so that they share the adapter pipeline's UNet call with successors."""
    if isinstance(net, ControlAdapter):
        return net
    model = load_controlnet(load_net(net, pipe.unet), pipe.unet)
    check_fits(model, pipe)
    return (ControlNetLite if isinstance(model, ControlNetLiteModel) else ControlNet)(model, pipe.vae_scale_factor)


def _adapter_units(pipe, units_nets: list, modes=(), weights=(), cfg_weighting=None) -> list[ControlAdapter] | None:
    """Every unit's net as an adapter when any unit is a successor (the adapter pipeline then runs them all in one
    UNet call: residuals, features and hooked blocks add up), else None (diffusers' ControlNet pipeline runs the
    paper's nets). A clear error for what the kit cannot mix."""
    found = [successor(net) for net in units_nets]
    first = next((a for a in found if a is not None), None)
    if first is None:
        return None
    if any(m != "balanced" for m in modes) or any(w is not None for w in weights) or cfg_weighting is not None:
        raise ValueError(f"control modes, connection weights and cfg_weighting act on a ControlNet's 13 connections "
                         f"in diffusers' ControlNet pipeline; with a {first.name} unit in the call, use "
                         "mode='balanced', no connection weights and cfg_weighting=None")
    return [a if a is not None else _as_adapter(net, pipe) for a, net in zip(found, units_nets)]


def _control_pipeline(pipe, scheduler, nets: list[tuple], latent_size: int, guidance: float,
                      cfg_weighting: str | None):
    """diffusers' pipeline over ``nets``: (controlnet, mode, connection_weights) per unit."""
    sizes = connection_latent_sizes(pipe.unet, latent_size)
    # a folder, a hub id or an original-layout single file (read against this base's UNet when it says nothing)
    nets = [unit_net(load_controlnet(load_net(net, pipe.unet), pipe.unet), *rest, sizes, guidance, cfg_weighting)
            for net, *rest in nets]
    for net in nets:  # a net made for another base fails here, by name, not deep inside the UNet
        check_fits(getattr(net, "net", net), pipe)
    # The base's components carry requires_safety_checker in its config; the kit's tiny base has none to require.
    control = StableDiffusionControlNetPipeline(**{**pipe.components, "scheduler": scheduler}, controlnet=nets,
                                                requires_safety_checker=False)
    control.set_progress_bar_config(disable=True)
    return control.to(pipe.device)  # nets are read onto the CPU; the base may be on a GPU


@dataclass
class Generation:
    images: list[Image.Image]
    conditions: list[Image.Image]  # each unit's condition as the nets saw it
    notes: list[str]  # what was done to the inputs (resizes, ...)
    settings: dict


def generate(base, prompt: str, units: list[ControlUnit] = (), negative_prompt: str = "", steps: int = 25,
             guidance: float = 5.0, seed: int = 0, size: int | None = None, num_images: int = 1,
             cfg_weighting: str | None = None, scheduler: str = "ddim", on_step=None) -> Generation:
    """Images from ``prompt`` under every unit's control (see the module docstring). ``on_step(step,
    total, latents)`` is called after every denoising step (diffusers' ``callback_on_step_end``)."""
    steps = coerce("steps", steps, int, minimum=1)
    guidance = coerce("guidance", guidance, float, minimum=0.0)
    seed = coerce("seed", seed, int)
    num_images = coerce("num_images", num_images, int, minimum=1)
    if cfg_weighting is not None and cfg_weighting not in CFG_WEIGHTINGS:
        raise ValueError(f"unknown cfg_weighting {cfg_weighting!r}; known: {', '.join(CFG_WEIGHTINGS)} or None")
    pipe = load_pipeline(base)
    factor = pipe.vae_scale_factor
    size = coerce("size", size, int, minimum=8) if size else image_size(pipe)
    if size % factor:
        raise ValueError(f"size must be a multiple of {factor} (the VAE's factor), got {size}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
    sched = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    settings = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance,
                "seed": seed, "size": size, "num_images": num_images, "cfg_weighting": cfg_weighting,
                "scheduler": scheduler, "units": len(units)}
    callback = None
    if on_step is not None:
        def callback(p, i, t, kw):
            on_step(i + 1, steps, kw["latents"])
            return kw
    common = dict(prompt=[prompt] * num_images, negative_prompt=[negative_prompt] * num_images,
                  num_inference_steps=steps, guidance_scale=guidance, generator=gens, height=size, width=size,
                  callback_on_step_end=callback)
    if not units:
        plain = StableDiffusionPipeline(**{**pipe.components, "scheduler": sched}, requires_safety_checker=False)
        plain.set_progress_bar_config(disable=True)
        notes = prompt_notes(pipe.tokenizer, {"prompt": prompt}) + warn_unknown_words(pipe.tokenizer, [prompt])
        return Generation(plain(**common).images, [], notes, settings)

    notes = prompt_notes(pipe.tokenizer, {"prompt": prompt, "negative prompt": negative_prompt})
    notes += warn_unknown_words(pipe.tokenizer, [prompt, negative_prompt])
    conditions = []
    for k, unit in enumerate(units):
        raw, changed = unit_condition(unit)
        cond, note = fit_condition(raw, size, size, unit.resize_mode)
        notes += [f"unit {k + 1}: {n}" for n in changed + ([note] if note else [])]
        conditions.append(cond)
    unit_nets = loaded_adapters([u.controlnet for u in units], pipe.unet)
    check_condition_sets(unit_nets, conditions)
    adapters = _adapter_units(pipe, unit_nets, [u.mode for u in units], [u.connection_weights for u in units],
                              cfg_weighting)
    if adapters is not None:  # a successor among the units: diffusers' text-to-image pipeline, the adapters in its UNet
        run = adapter_pipeline(pipe, sched, adapters, [u.scale for u in units], [u.start for u in units],
                               [u.end for u in units])
        per_prompt = conditions[0] if len(adapters) == 1 else list(conditions)
        out = run_adapter_pipeline(run, [per_prompt] * num_images, **common)
        return Generation(out.images, conditions, notes, settings)
    nets = [(net, u.mode, u.connection_weights) for net, u in zip(_plain_nets(unit_nets), units)]
    control = _control_pipeline(pipe, sched, nets, size // factor, guidance, cfg_weighting)
    out = control(image=[list(conditions) for _ in range(num_images)],
                  controlnet_conditioning_scale=[u.scale for u in units],
                  control_guidance_start=[u.start for u in units], control_guidance_end=[u.end for u in units],
                  **common)
    return Generation(out.images, conditions, notes, settings)


def generate_many(base, prompts: list[str], conditions: list[list] | None, controlnets: list, seeds: list[int],
                  negative_prompt: str = "", steps: int = 20, guidance: float = 3.0,
                  cfg_weighting: str | None = None, mode: str = "balanced", batch: int = 32,
                  size: int | None = None, progress: str | None = None) -> np.ndarray:
    """One image per item, batched (every measurement of the kit): item k has its own prompt, one condition
    per net (``conditions[k][u]``, fitted to the base's size by crop_and_resize) and its own seed; every net
    at scale 1 over the whole denoising, in ``mode``; DDIM. With no nets (``controlnets=[]``, ``conditions``
    None) it is plain text-to-image. ``size``: pixels (default the base's own; a run validates at its training
    resolution). ``progress``: a bar's description (a bar of denoising steps, removed when done; None: no bar).
    Returns uint8 images. An image depends on its own item and seed only, up to float round-off between batch
    sizes."""
    conditions = conditions if conditions is not None else [[] for _ in prompts]
    if not (len(prompts) == len(conditions) == len(seeds)):
        raise ValueError(f"prompts ({len(prompts)}), conditions ({len(conditions)}) and seeds ({len(seeds)}) "
                         "must have one entry per image")
    if mode not in CONTROL_MODES:
        raise ValueError(f"unknown control mode {mode!r}; known: {', '.join(CONTROL_MODES)}")
    if cfg_weighting is not None and cfg_weighting not in CFG_WEIGHTINGS:
        raise ValueError(f"unknown cfg_weighting {cfg_weighting!r}; known: {', '.join(CFG_WEIGHTINGS)} or None")
    pipe = load_pipeline(base)
    warn_unknown_words(pipe.tokenizer, [*prompts, negative_prompt])
    size = size or image_size(pipe)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    controlnets = loaded_adapters(controlnets, pipe.unet)
    adapters = _adapter_units(pipe, controlnets, [mode], [], cfg_weighting) if controlnets else None
    if adapters is not None:
        run = adapter_pipeline(pipe, sched, adapters)
    elif controlnets:
        nets = [(net, mode, None) for net in _plain_nets(controlnets)]
        run = _control_pipeline(pipe, sched, nets, size // pipe.vae_scale_factor, guidance, cfg_weighting)
    else:
        run = StableDiffusionPipeline(**{**pipe.components, "scheduler": sched}, requires_safety_checker=False)
        run.set_progress_bar_config(disable=True)
    for item in conditions[:1]:
        check_condition_sets(controlnets, item)
    out = []
    bar = tqdm(total=-(-len(prompts) // batch) * steps, desc=progress, unit="denoising step", leave=False,
               disable=progress is None)

    def tick(p, i, t, kw):
        bar.update(1)
        return kw

    for i in range(0, len(prompts), batch):
        j = min(i + batch, len(prompts))
        fitted = [[fit_condition(c, size, size)[0] for c in item] for item in conditions[i:j]]
        call = dict(prompt=prompts[i:j], negative_prompt=[negative_prompt] * (j - i), num_inference_steps=steps,
                    guidance_scale=guidance, generator=[torch.Generator().manual_seed(int(s)) for s in seeds[i:j]],
                    height=size, width=size, output_type="np", callback_on_step_end=tick)
        if adapters is not None:
            result = run_adapter_pipeline(run, [item[0] if len(adapters) == 1 else item for item in fitted],
                                          **call).images
        else:
            result = run(**call, **({"image": fitted} if controlnets else {})).images
        out.append(from_pipeline(result))
    bar.close()
    return np.concatenate(out)
