"""The one interface every control architecture implements, and why each of its methods exists.

A control architecture adds a trainable network to a locked base UNet so that a spatial condition (an image of
``conditioning_channels`` x ``latent size * vae_scale_factor`` pixels) steers the UNet's noise prediction. The
architectures differ in where the control enters the base and how (residuals added to the skips, features added
inside the down blocks, a fused UNet, one normalised injection), but the trainer, the telemetry and generation only
need the same few things from each, so each architecture is a ``ControlAdapter``:

- ``build(unet, vae_scale_factor, seed=None, **options)`` (classmethod): a fresh adapter for any base UNet, its
  condition encoder matched to the base's VAE factor, its fresh weights reproducible from ``seed`` without touching
  the caller's RNG. It locks the base UNet (``requires_grad_(False)``), as ``cnkit.models.bases.load_base`` does: every
  architecture here trains the adapter only.
- ``predict_noise(unet, sample, timestep, encoder_hidden_states, cond, conditioning_scale=1.0)``: the controlled
  UNet's noise prediction, what the training loss compares with the noise and what a denoising loop steps with
  (also the module's ``forward``, so a DDP-wrapped adapter is called the same way). Architectures that add to the
  UNet's call (residuals, features, a hooked block) implement ``control(...)`` instead, what they add, so that
  several of them, of different kinds, share one call (``run_controlled``); one fused with the base cannot.
- ``injection_points()``: ``(name, module)`` for every layer through which the control enters the base, in the
  base's order. It generalises the paper's "zero convolutions": what telemetry watches (weights, gradients).
- ``injections(unet, sample, timestep, encoder_hidden_states, cond)``: what each injection point adds to the base on
  that input (at conditioning scale 1), one tensor per point, in the same order: telemetry's residual RMS.
- ``trainable_parameters()``: what the optimizer gets (never a parameter of the base).
- ``save_pretrained(folder)`` / ``load(folder)``: the adapter's weights in safetensors through the model class that
  loads them (diffusers' own where one exists: ``ControlNetModel``, ``T2IAdapter``, ``ControlNetXSAdapter``), plus
  ``cnkit_architecture.json`` naming the architecture and its wrapper options, so ``cnkit.models.architectures.load``
  rebuilds the same adapter. diffusers ignores that extra file.

Class attributes say what each method cannot: ``name`` (the registry's), ``loads_with`` (the class whose
``from_pretrained`` reads the saved folder) and ``preserves_base_at_init`` (whether the controlled UNet's output
equals the base's before any training step, as the method defines it).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn

from .. import bases

ARCHITECTURE_FILE = "cnkit_architecture.json"


@contextmanager
def seeded(seed: int | None):
    """Fresh weights drawn after ``torch.manual_seed(seed)``; the caller's RNG is left as it was."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def resolve_base(base, vae_scale_factor: int | None = None) -> tuple[UNet2DConditionModel, int]:
    """(UNet, pixels per latent cell) from a pipeline, a base folder or hub id, or a bare UNet (then
    ``vae_scale_factor`` says the factor; SD's 8 unless told)."""
    if isinstance(base, UNet2DConditionModel):
        return base, vae_scale_factor or 8
    if isinstance(base, str | Path):
        base = bases.load_base(str(base))
    if not isinstance(base, StableDiffusionPipeline):
        raise TypeError(f"an architecture is built from a base (pipeline, folder or hub id) or a "
                        f"UNet2DConditionModel, got {type(base).__name__}")
    found = bases.vae_scale_factor(base.vae)
    if vae_scale_factor not in (None, found):
        raise ValueError(f"vae_scale_factor={vae_scale_factor} does not match the base's VAE, which downsamples by "
                         f"{found}; leave vae_scale_factor out to take the base's")
    return base.unet, found


def check_factor(vae_scale_factor: int) -> int:
    steps = int(math.log2(vae_scale_factor)) if vae_scale_factor > 0 else 0
    if 2**steps != vae_scale_factor or not 1 <= steps <= 3:
        raise ValueError(f"vae_scale_factor must be 2, 4 or 8 (pixels per latent cell), got {vae_scale_factor}")
    return steps


def check_condition(name: str, sample: torch.Tensor, cond: torch.Tensor, factor: int, channels: int) -> None:
    """A condition of the wrong size or channel count is a clear error, not a shape mismatch deep inside."""
    want = (sample.shape[-2] * factor, sample.shape[-1] * factor)
    if cond.ndim != 4 or cond.shape[1] != channels or tuple(cond.shape[-2:]) != want:
        raise ValueError(f"{name}: the condition has shape {tuple(cond.shape)}; latents of {sample.shape[-1]}x"
                         f"{sample.shape[-2]} need (batch, {channels}, {want[0]}, {want[1]}) (this adapter's "
                         f"condition encoder downsamples by {factor}: build it for the base it drives)")


@dataclass
class UNetControl:
    """What one adapter adds to one call of the locked UNet, so that several adapters can share the call:
    ``kwargs`` of ``UNet2DConditionModel.forward`` (residual lists, or one tensor; several adapters' are summed, as
    diffusers' MultiControlNet and MultiAdapter sum theirs) and ``hooks``, ``(module, forward hook)`` pairs that add to
    a block's output (each hook sees the output the earlier ones left)."""

    kwargs: dict = field(default_factory=dict)
    hooks: list = field(default_factory=list)


def _summed(a, b):
    if isinstance(a, list | tuple):
        return [x + y for x, y in zip(a, b, strict=True)]
    return a + b


def run_controlled(unet, sample, timestep, encoder_hidden_states, controls: list[UNetControl]) -> torch.Tensor:
    """The locked UNet's noise prediction under every control in ``controls`` at once."""
    kwargs: dict = {}
    for control in controls:
        for key, value in control.kwargs.items():
            kwargs[key] = _summed(kwargs[key], value) if key in kwargs else value
    # diffusers pops from its residual lists: each call gets fresh ones
    kwargs = {k: list(v) if isinstance(v, list | tuple) else v for k, v in kwargs.items()}
    handles = [module.register_forward_hook(hook) for control in controls for module, hook in control.hooks]
    try:
        return unet(sample, timestep, encoder_hidden_states, **kwargs).sample
    finally:
        for h in handles:
            h.remove()


def fused_alone(name: str) -> ValueError:
    """The error for an architecture that cannot share a UNet call with others."""
    return ValueError(f"a {name} net runs the base fused with its own network, so it cannot share a UNet call with "
                      "other control units; generate with it alone")


class ControlAdapter(nn.Module):
    """A control architecture for a locked base UNet (see the module docstring for why each method exists).

    ``self.net`` is the trainable model that ``save_pretrained`` writes (a diffusers model where one exists);
    ``self.options`` are the wrapper's settings that its config does not hold, saved beside it.
    """

    name: ClassVar[str] = ""
    loads_with: ClassVar[str] = ""  # "diffusers.ControlNetModel", ... (the class that reads the saved folder)
    preserves_base_at_init: ClassVar[bool] = False
    # True where ``load`` rebuilds part of the net from its base's UNet (a reader must load the base first)
    needs_base_to_load: ClassVar[bool] = False

    def __init__(self, net: nn.Module, vae_scale_factor: int, **options):
        super().__init__()
        self.net = net
        self.vae_scale_factor = vae_scale_factor
        self.options = dict(options)

    # --- building and loading --------------------------------------------------------------
    @classmethod
    def build(cls, unet: UNet2DConditionModel, vae_scale_factor: int = 8, seed: int | None = None,
              **options) -> ControlAdapter:
        raise NotImplementedError

    @classmethod
    def load_net(cls, folder: Path) -> nn.Module:
        """The trained model from ``folder``, through the class named by ``loads_with``."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder, unet: UNet2DConditionModel | None = None) -> ControlAdapter:
        """The adapter saved in ``folder`` by ``save_pretrained``. ``unet``: the base it drives (locked here; only
        architectures that fuse with the base need it before their first ``predict_noise``)."""
        folder = Path(folder)
        meta = cls.read_meta(folder)
        if unet is not None:
            unet.requires_grad_(False)
        net = cls.load_net(folder)
        # eval: a loaded adapter is for generating (a union net drops conditions in training mode); build one to train
        return cls(net, meta.get("vae_scale_factor") or cls.factor_of(net), **meta.get("options", {})).eval()

    @classmethod
    def read_meta(cls, folder: Path) -> dict:
        """The folder's architecture file ({} when it has none); a folder of another architecture is a clear error."""
        meta = json.loads((folder / ARCHITECTURE_FILE).read_text()) if (folder / ARCHITECTURE_FILE).is_file() else {}
        if meta.get("architecture", cls.name) != cls.name:
            raise ValueError(f"{folder} holds a {meta['architecture']!r} adapter, not {cls.name!r}; load it with "
                             "cnkit.models.architectures.load(folder)")
        return meta

    @classmethod
    def factor_of(cls, net: nn.Module) -> int:
        """The VAE factor a loaded ``net`` was built for, when its folder has no architecture file."""
        raise ValueError(f"a {cls.name} folder needs its {ARCHITECTURE_FILE} (written by save_pretrained)")

    def save_pretrained(self, folder) -> Path:
        """``self.net`` as its model class saves it (config.json + safetensors) and the architecture file."""
        folder = Path(folder)
        self.net.save_pretrained(folder, safe_serialization=True)
        self.write_meta(folder)
        return folder

    def write_meta(self, folder: Path) -> None:
        (folder / ARCHITECTURE_FILE).write_text(json.dumps(
            {"architecture": self.name, "loads_with": self.loads_with, "vae_scale_factor": self.vae_scale_factor,
             "options": self.options}, indent=1))

    def load_weights(self, folder) -> None:
        """Put the weights ``save_pretrained`` wrote in ``folder`` back into this adapter (a resumed run)."""
        self.net.load_state_dict(load_file(Path(folder) / "diffusion_pytorch_model.safetensors"))

    # --- what the trainer, telemetry and generation call -----------------------------------
    def control(self, unet, sample, timestep, encoder_hidden_states, cond, conditioning_scale: float = 1.0
                ) -> UNetControl:
        """What this adapter adds to the locked UNet's call on this input (``UNetControl``). Architectures that add
        residuals or hook a block implement this, and then combine with each other in one generation; one that runs
        the base fused with its own net (ControlNet-XS) cannot, and says so."""
        raise fused_alone(self.name)

    @property
    def composable(self) -> bool:
        """Can this adapter share one UNet call with others (it implements ``control``)?"""
        return type(self).control is not ControlAdapter.control

    def predict_noise(self, unet, sample, timestep, encoder_hidden_states, cond, conditioning_scale: float = 1.0):
        return run_controlled(unet, sample, timestep, encoder_hidden_states,
                              [self.control(unet, sample, timestep, encoder_hidden_states, cond, conditioning_scale)])

    def forward(self, unet, sample, timestep, encoder_hidden_states, cond, conditioning_scale: float = 1.0):
        """``predict_noise``: calling the module is what Accelerate's wrappers (DDP) need to see for their gradient
        synchronisation, so a trainer calls ``adapter(unet, ...)`` on the prepared module."""
        return self.predict_noise(unet, sample, timestep, encoder_hidden_states, cond, conditioning_scale)

    def injection_points(self) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def watched_points(self) -> list[tuple[str, nn.Module]]:
        """What telemetry watches: the injection points, and for some architectures a layer worth watching beside
        them (the paper's net: its condition encoder's last convolution, also zero at the start)."""
        return self.injection_points()

    @torch.no_grad()
    def watched_outputs(self, unet, sample, timestep, encoder_hidden_states, cond) -> list[torch.Tensor]:
        """What each of ``watched_points()`` outputs on that input, in the same order (telemetry's residual RMS)."""
        return self.injections(unet, sample, timestep, encoder_hidden_states, cond)

    @torch.no_grad()
    def injections(self, unet, sample, timestep, encoder_hidden_states, cond) -> list[torch.Tensor]:
        """What each injection point outputs during one controlled forward pass at conditioning scale 1 (forward
        hooks on the points; architectures whose points are cheaper to reach override this)."""
        points = self.injection_points()
        seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(points))}
        hooks = [module.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out))
                 for i, (_, module) in enumerate(points)]
        try:
            self.predict_noise(unet, sample, timestep, encoder_hidden_states, cond)
        finally:
            for h in hooks:
                h.remove()
        missed = [points[i][0] for i, outs in seen.items() if len(outs) != 1]
        if missed:
            raise RuntimeError(f"{self.name}: injection points not called exactly once: {missed}")
        return [seen[i][0] for i in range(len(points))]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def condition_size(self, latent_size: int) -> int:
        """Condition pixels for latents of ``latent_size``."""
        return latent_size * self.vae_scale_factor
