"""Generation from several control units at once, the way the WebUI extension and ComfyUI offer it.

``generate(base, prompt, units=[ControlUnit(...), ...], ...)`` runs diffusers'
``StableDiffusionControlNetPipeline`` with a ``MultiControlNetModel`` of the units' nets. A unit is a
ControlNet, its condition (an image, or a source plus an annotator), a scale, a start and an end
fraction of the denoising, a control mode and optional per-connection weights. What diffusers has
(scale, start, end, one global guess mode) is passed to it; what it lacks is added per unit by
``UnitControlNet``, a thin wrapper that reweights the unit's 13 residuals and can drop them from the
unconditional half of the classifier-free-guidance batch:

- ``mode="balanced"``: the residuals as they are (diffusers' default);
- ``mode="prompt"`` ("my prompt is more important"): soft weights 0.825 ** (12 - i), shallow
  connections weakest, in both branches (the original code's soft injection);
- ``mode="controlnet"`` ("ControlNet is more important"): the same soft weights, and no control in the
  unconditional branch, so guidance pushes towards the condition (the original guess mode).

``cfg_weighting`` applies the paper's CFG resolution weighting (Fig. 5) to every unit: the condition
goes into the conditional branch only, each connection weighted by ``"paper"``: w_i = H / h_i (H the
largest latent size, 64 for SD 1.5, h_i the connection's), ``"0.825"``: 0.825 ** (12 - i), or
``"logspace"``: diffusers' torch.logspace(-1, 0, 13); ``"flat"`` (for comparison) weights them all 1.

A unit that only uses what diffusers has (balanced mode, no connection weights, no CFG weighting) is
passed to diffusers unwrapped, so its images equal a plain diffusers call with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

CONTROL_MODES = ("balanced", "prompt", "controlnet")
CFG_WEIGHTINGS = ("paper", "0.825", "logspace", "flat")
RESIZE_MODES = ("crop_and_resize", "just_resize", "resize_and_fill")


@dataclass
class ControlUnit:
    """One control unit (see the module docstring)."""

    controlnet: Any  # a folder, a hub id, or a ControlNetModel / ControlNetLiteModel
    image: Any = None  # the condition, or the annotator's source: PIL image, HxWx3 uint8, toy Sample
    annotator: str | None = None  # cnkit.annotators name; None: ``image`` is the condition itself
    annotator_settings: dict = field(default_factory=dict)
    annotator_weights: str | None = None  # folder with the annotator's weight files
    scale: float = 1.0
    start: float = 0.0  # fraction of the denoising steps where control begins
    end: float = 1.0  # ... and ends
    mode: str = "balanced"  # balanced, prompt (prompt more important), controlnet (ControlNet more important)
    connection_weights: list[float] | None = None  # one per connection (13 for SD's layout)
    resize_mode: str = "crop_and_resize"  # how a condition of another size is fitted (the WebUI's modes)

    def __post_init__(self):
        from .params import coerce

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
        if self.connection_weights is not None:
            self.connection_weights = [coerce("connection_weights", w, float) for w in self.connection_weights]


# --- weights ------------------------------------------------------------------------------


def soft_weights(n: int = 13, base: float = 0.825) -> list[float]:
    """The original code's soft injection: base ** (n - 1 - i), 1 at the middle block."""
    return [base ** (n - 1 - i) for i in range(n)]


def logspace_weights(n: int = 13) -> list[float]:
    """diffusers' guess-mode weights: torch.logspace(-1, 0, n)."""
    return torch.logspace(-1, 0, n).tolist()


def resolution_weights(latent_sizes: list[int]) -> list[float]:
    """The paper's CFG resolution weighting (Fig. 5): w_i = H / h_i, H the largest latent size."""
    top = max(latent_sizes)
    return [top / h for h in latent_sizes]


def cfg_weights(form: str, latent_sizes: list[int]) -> list[float]:
    if form == "paper":
        return resolution_weights(latent_sizes)
    if form == "0.825":
        return soft_weights(len(latent_sizes))
    if form == "logspace":
        return logspace_weights(len(latent_sizes))
    if form == "flat":  # the conditional branch only, every connection at 1 (what the weightings correct)
        return [1.0] * len(latent_sizes)
    raise ValueError(f"unknown CFG weighting {form!r}; known: {', '.join(CFG_WEIGHTINGS)} or None")


def connection_latent_sizes(unet, sample_size: int | None = None) -> list[int]:
    """Latent size of each of the 13 connections (12 skips and the middle block) of ``unet``."""
    c = unet.config
    size = sample_size or c.sample_size
    sizes = [size]
    for b in range(len(c.block_out_channels)):
        sizes += [size] * c.layers_per_block
        if b < len(c.block_out_channels) - 1:
            size //= 2
            sizes.append(size)
    return sizes + [size]


# --- the per-unit wrapper -----------------------------------------------------------------


class UnitControlNet(torch.nn.Module):
    """A unit's net as diffusers' MultiControlNetModel sees it, with what diffusers lacks per net:
    per-connection weights and dropping control from the unconditional half of the CFG batch."""

    def __init__(self, net, weights: list[float] | None, conditional_only: bool):
        super().__init__()
        self.net = net
        self.weights = weights
        self.conditional_only = conditional_only
        self.cfg_active = False  # set by generate(): is the batch [unconditional, conditional]?

    @property
    def config(self):  # diffusers reads global_pool_conditions from every net's config
        return self.net.config

    @property
    def dtype(self):
        return self.net.dtype

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                guess_mode=False, return_dict=False, **kwargs):
        down, mid = self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             controlnet_cond=controlnet_cond, conditioning_scale=conditioning_scale,
                             guess_mode=guess_mode, return_dict=False, **kwargs)
        residuals = [*down, mid]
        if self.weights is not None:
            if len(self.weights) != len(residuals):
                raise ValueError(f"connection_weights has {len(self.weights)} values; this ControlNet has "
                                 f"{len(residuals)} connections")
            residuals = [r * w for r, w in zip(residuals, self.weights)]
        if self.conditional_only and self.cfg_active:
            half = sample.shape[0] // 2
            residuals = [torch.cat([torch.zeros_like(r[:half]), r[half:]]) for r in residuals]
        return residuals[:-1], residuals[-1]


# --- conditions ---------------------------------------------------------------------------


def fit_condition(image, width: int, height: int, mode: str = "crop_and_resize") -> tuple[Image.Image, str | None]:
    """``image`` at width x height by the WebUI's resize modes, and a note saying what was done (None
    when it already had that size): ``just_resize`` stretches, ``crop_and_resize`` scales to cover and
    crops the centre, ``resize_and_fill`` scales to fit and pads with black."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).astype(np.uint8))
    img = img.convert("RGB")
    if img.size == (width, height):
        return img, None
    w, h = img.size
    if mode == "just_resize":
        out = img.resize((width, height), Image.BILINEAR)
    elif mode == "crop_and_resize":
        k = max(width / w, height / h)
        scaled = img.resize((max(width, round(w * k)), max(height, round(h * k))), Image.BILINEAR)
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        out = scaled.crop((left, top, left + width, top + height))
    elif mode == "resize_and_fill":
        k = min(width / w, height / h)
        scaled = img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BILINEAR)
        out = Image.new("RGB", (width, height))
        out.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    else:
        raise ValueError(f"unknown resize mode {mode!r}; known: {', '.join(RESIZE_MODES)}")
    return out, f"condition {w}x{h} fitted to {width}x{height} by {mode}"


def unit_condition(unit: ControlUnit) -> np.ndarray:
    """The unit's condition map before fitting: its image, or its annotator applied to its source."""
    from . import annotators, toyworld

    if unit.annotator:
        return annotators.annotate(unit.annotator, unit.image, weights=unit.annotator_weights,
                                   **unit.annotator_settings)
    if isinstance(unit.image, toyworld.Sample):
        raise ValueError("a toy-world sample is a source: give the unit an annotator (toy_outline, "
                         "toy_segmentation, toy_depth, toy_edges, canny, ...)")
    return annotators.as_rgb(unit.image, "a condition image")


# --- loading ------------------------------------------------------------------------------


def load_controlnet(spec):
    """A ControlNet from a model, a local folder or a hub id (stock diffusers or the kit's lite)."""
    if isinstance(spec, torch.nn.Module):
        return spec
    import json

    from diffusers import ControlNetModel

    from .controlnets import ControlNetLiteModel
    from .params import repo_path

    path = repo_path(spec)
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("_class_name") == "ControlNetLiteModel":
        return ControlNetLiteModel.from_pretrained(path)
    try:
        return ControlNetModel.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not load the ControlNet {spec!r} ({type(e).__name__}: {str(e)[:200]}). Pass a local diffusers "
            "ControlNet folder (e.g. data/controlnets/fill-outline), or a hub id on a machine that can download it "
            "(HF_HUB_OFFLINE unset)") from e


_BASES: dict[str, Any] = {}


def load_pipeline(base):
    """The locked base as a diffusers pipeline (folder or hub id), loaded once per process."""
    from diffusers import StableDiffusionPipeline

    if isinstance(base, StableDiffusionPipeline):
        return base
    from .train import load_base

    key = str(base)
    if key not in _BASES:
        _BASES[key] = load_base(base)
    return _BASES[key]


# --- generation ---------------------------------------------------------------------------


def _unit_net(controlnet, mode: str, connection_weights, latent_sizes: list[int], guidance: float,
              cfg_weighting: str | None):
    """A unit's net as it goes into MultiControlNetModel: as it is when only diffusers' features are
    used, else wrapped (UnitControlNet) with its connection weights and branch."""
    net = load_controlnet(controlnet)
    weights = None if connection_weights is None else list(connection_weights)
    conditional_only = mode == "controlnet" or cfg_weighting is not None
    for extra in ([soft_weights(len(latent_sizes))] if mode != "balanced" else []) + (
            [cfg_weights(cfg_weighting, latent_sizes)] if cfg_weighting else []):
        weights = [a * b for a, b in zip(weights or [1.0] * len(extra), extra)]
    if weights is None and not conditional_only:
        return net  # only what diffusers has: passed to it as it is
    wrapped = UnitControlNet(net, weights, conditional_only)
    wrapped.cfg_active = guidance > 1  # diffusers batches [unconditional, conditional] when guidance > 1
    return wrapped


def _control_pipeline(pipe, scheduler, nets: list[tuple], latent_size: int, guidance: float,
                      cfg_weighting: str | None):
    """diffusers' pipeline over ``nets``: (controlnet, mode, connection_weights) per unit."""
    from diffusers import StableDiffusionControlNetPipeline

    sizes = connection_latent_sizes(pipe.unet, latent_size)
    nets = [_unit_net(*n, sizes, guidance, cfg_weighting) for n in nets]
    # The base's components carry requires_safety_checker in its config; the kit's tiny base has none to require.
    control = StableDiffusionControlNetPipeline(**{**pipe.components, "scheduler": scheduler}, controlnet=nets,
                                                requires_safety_checker=False)
    control.set_progress_bar_config(disable=True)
    return control


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
    from diffusers import (
        DDIMScheduler,
        StableDiffusionPipeline,
        UniPCMultistepScheduler,
    )

    from .params import coerce

    steps = coerce("steps", steps, int, minimum=1)
    guidance = coerce("guidance", guidance, float, minimum=0.0)
    seed = coerce("seed", seed, int)
    num_images = coerce("num_images", num_images, int, minimum=1)
    if cfg_weighting is not None and cfg_weighting not in CFG_WEIGHTINGS:
        raise ValueError(f"unknown cfg_weighting {cfg_weighting!r}; known: {', '.join(CFG_WEIGHTINGS)} or None")
    pipe = load_pipeline(base)
    factor = pipe.vae_scale_factor
    size = coerce("size", size, int, minimum=8) if size else pipe.unet.config.sample_size * factor
    if size % factor:
        raise ValueError(f"size must be a multiple of {factor} (the VAE's factor), got {size}")
    schedulers = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler}
    if scheduler not in schedulers:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(schedulers)}")
    sched = schedulers[scheduler].from_config(pipe.scheduler.config)
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
        return Generation(plain(**common).images, [], [], settings)

    notes, conditions = [], []
    for k, unit in enumerate(units):
        cond, note = fit_condition(unit_condition(unit), size, size, unit.resize_mode)
        if note:
            notes.append(f"unit {k + 1}: {note}")
        conditions.append(cond)
    nets = [(u.controlnet, u.mode, u.connection_weights) for u in units]
    control = _control_pipeline(pipe, sched, nets, size // factor, guidance, cfg_weighting)
    out = control(image=[list(conditions) for _ in range(num_images)],
                  controlnet_conditioning_scale=[u.scale for u in units],
                  control_guidance_start=[u.start for u in units], control_guidance_end=[u.end for u in units],
                  **common)
    return Generation(out.images, conditions, notes, settings)


def generate_many(base, prompts: list[str], conditions: list[list], controlnets: list, seeds: list[int],
                  negative_prompt: str = "", steps: int = 20, guidance: float = 3.0,
                  cfg_weighting: str | None = None, mode: str = "balanced", batch: int = 32) -> np.ndarray:
    """One image per item, batched (evaluations): item k has its own prompt, one condition per net
    (``conditions[k][u]``, fitted to the base's size by crop_and_resize) and its own seed; every net
    at scale 1 over the whole denoising, in ``mode``. Returns uint8 images. An image depends on its own
    item and seed only, up to float round-off between batch sizes."""
    from diffusers import DDIMScheduler

    if not (len(prompts) == len(conditions) == len(seeds)):
        raise ValueError(f"prompts ({len(prompts)}), conditions ({len(conditions)}) and seeds ({len(seeds)}) "
                         "must have one entry per image")
    pipe = load_pipeline(base)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    if mode not in CONTROL_MODES:
        raise ValueError(f"unknown control mode {mode!r}; known: {', '.join(CONTROL_MODES)}")
    if cfg_weighting is not None and cfg_weighting not in CFG_WEIGHTINGS:
        raise ValueError(f"unknown cfg_weighting {cfg_weighting!r}; known: {', '.join(CFG_WEIGHTINGS)} or None")
    nets = [(net, mode, None) for net in controlnets]
    control = _control_pipeline(pipe, sched, nets, size // pipe.vae_scale_factor, guidance, cfg_weighting)
    out = []
    for i in range(0, len(prompts), batch):
        j = min(i + batch, len(prompts))
        images = [[fit_condition(c, size, size)[0] for c in item] for item in conditions[i:j]]
        result = control(prompts[i:j], image=images, negative_prompt=[negative_prompt] * (j - i),
                         num_inference_steps=steps, guidance_scale=guidance,
                         generator=[torch.Generator().manual_seed(int(s)) for s in seeds[i:j]],
                         height=size, width=size, output_type="np").images
        out.append((result * 255).round().astype(np.uint8))
    return np.concatenate(out)
