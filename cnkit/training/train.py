"""The ControlNet training loop, the paper's way, on Accelerate.

The locked base (VAE, text encoder, UNet) never gets a gradient: its parameters are frozen, and
since nothing upstream of the UNet's encoder requires a gradient, autograd builds no graph there;
only the decoder, where the ControlNet's residuals enter, carries one. The frozen VAE and text
encoder run once per training item and once per distinct prompt, into an on-disk store read a batch
at a time (``cnkit.data.trainset``, ``cnkit.data.encoded``: memory flat in the dataset), or on the fly.

Memory options for real GPUs, the paper's behaviour by default: ``gradient_checkpointing`` (the
ControlNet and the locked UNet recompute activations in the backward pass), ``mixed_precision``
fp16/bf16 (autocast; on a GPU the locked UNet and text encoder are stored in that precision, the
ControlNet's master weights stay fp32, the VAE always fp32: fp16 VAEs give black or NaN images;
fp16 on a CPU is refused), ``use_8bit_adam`` (bitsandbytes' AdamW8bit).

The loop is plain and knows nothing of telemetry or validation: like minGPT's ``Trainer`` it fires
events (``on_train_start``, ``on_step_end``, ``on_checkpoint``, ``on_train_end``) and what watches
it is attached from outside with ``add_callback`` (``cnkit.training.telemetry``).

Step accounting: ``step`` is an optimizer step everywhere. One optimizer step consumes
``gradient_accumulation`` micro-batches of ``batch_size`` on each of ``num_processes`` processes,
so ``samples_seen = step * batch_size * gradient_accumulation * num_processes``.

Every micro-batch's randomness (which items, which noise, timesteps and dropped prompts) is a pure
function of (seed, step, micro-batch, process), so a resumed run replays exactly the batches the
uninterrupted one would have drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

import cnkit.params as _params

from ..data.readers import condition_count, is_toy
from ..data.splits import training_items
from ..data.trainset import OnTheFly, cached_store, draw_items, micro_batch_generator
from ..files import write_json
from ..models import architectures
from ..models.bases import image_size, load_base, vae_scale_factor
from ..models.controlnets import VARIANTS
from ..pixels import RESIZE_MODES, condition_range
from .checkpoints import Checkpoint, checkpoint_error, claim
from .forecast import Forecast
from .telemetry import ConditionProbe, InjectionTelemetry, Validation

# What cnkit.training.train trains (for controlnet, the variant picks one of architectures.PAPER_NETS).
TRAINABLE_ARCHITECTURES = ("controlnet", "control-lora", "controlnet-xs", "t2i-adapter", "controlnext", "union")

# How training timesteps are drawn. "cubic" is T2I-Adapter's (Mou et al. 2023, section 3.4): t = (1 - u^3) T
# puts more of the batch at high noise, where the layout a spatial condition dictates is decided.
TIMESTEP_SAMPLING = ("uniform", "cubic")


@dataclass
class TrainConfig:
    """One ControlNet training run. The defaults are the kit's recipe for the embedded tiny base (the one the
    shipped nets and notebooks 02-04 use); ``TrainConfig.recipe("paper")`` gives the paper's (``RECIPES``)."""

    base: str = "data/tiny-sd"  # a local diffusers pipeline folder or a hub id
    dataset: str = "toy:fill"  # anything cnkit.data.readers.load reads, or a toy world "toy:fill"
    variant: str = "zero"  # zero (the paper), gaussian, lite: the ControlNet's initialisation or Fig. 8's lite net
    architecture: str = "controlnet"  # how control enters the base (cnkit.models.architectures): controlnet,
    # control-lora, controlnet-xs, t2i-adapter, controlnext, union (several conditions: a dataset with several maps
    # per item); ``variant`` applies to controlnet only
    lora_rank: int = 8  # control-lora: the rank of the LoRA updates of its frozen copy
    condition_dropout: float = 0.5  # union: the chance that each condition map of each item is zeroed (all subsets)
    steps: int = 600  # optimizer steps
    batch_size: int = 32  # per process and micro-batch
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-3  # AdamW; the kit's recipe for the tiny base (the paper's 1e-5 is for SD 1.5)
    prompt_dropout: float = 0.5  # share of prompts replaced by "" (the paper: 50%)
    timestep_sampling: str = "cubic"  # cubic (T2I-Adapter: more high-noise steps; the kit's) or uniform (the paper)
    max_grad_norm: float = 0.0  # clip the gradient's norm at this (diffusers' script: 1.0); 0 does not clip
    mixed_precision: str = "no"  # no, fp16, bf16 (Accelerate)
    seed: int = 0  # the ControlNet's initialisation, batch order, noise, timesteps and dropped prompts
    data_seed: int = 0  # which toy-world items are drawn (training and held out); fixed across training seeds
    validate_every: int = 25  # optimizer steps between validations; 0 turns validation off
    checkpoint_every: int = 200  # optimizer steps between checkpoints
    out_dir: str = "runs/controlnet"
    n_train: int = 10000  # items drawn from a toy world (folders use all their items but the validation ones)
    validation_size: int = 32  # held-out conditions per validation (a folder's last items, never trained on)
    resolution: int = 0  # image size; 0 takes the base's (64 for the tiny model, 512 for SD 1.5)
    report_to: str = ""  # "", "tensorboard" or "wandb" (Accelerate trackers)
    resize_mode: str = "crop_and_resize"  # pairs of another size: crop_and_resize, just_resize or resize_and_fill
    encode: str = "cache"  # cache (encoded once into a store on disk) or on_the_fly (VAE and text encoder per batch)
    num_workers: int = 0  # DataLoader workers reading items for encode="on_the_fly"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit: optimizer state in 8 bits (GPUs)
    telemetry_every: int = 1  # optimizer steps between telemetry rows (the probe costs a forward pass)
    signals_every: int = 20  # optimizer steps between condition-use probes (signals.csv: 3 forward passes); 0: off
    forecast: bool = False  # forecast convergence live from the probe (forecast.csv, the progress bar)
    validate_on: str = "schedule"  # schedule (every validate_every) or forecast (from the forecast's firing on)
    stop_after_convergence: int = 0  # with forecast: stop this many steps after validation confirms it; 0: never
    validation_steps: int = 20  # denoising steps of each validation image (DDIM)

    def __post_init__(self):
        _params.coerce_fields(self)  # papermill and CLIs pass ints for floats and strings for numbers
        positive = ("steps", "batch_size", "gradient_accumulation", "checkpoint_every", "n_train", "validation_size",
                    "telemetry_every", "lora_rank", "validation_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"parameter {name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.condition_dropout < 1:
            raise ValueError(f"parameter condition_dropout must be within [0, 1), got {self.condition_dropout}")
        if not 0 <= self.prompt_dropout <= 1:
            raise ValueError(f"parameter prompt_dropout must be within 0..1, got {self.prompt_dropout}")
        if self.max_grad_norm < 0:
            raise ValueError(f"parameter max_grad_norm must be 0 (no clipping) or more, got {self.max_grad_norm}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"parameter learning_rate must be within (0, 1), got {self.learning_rate}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; known variants: {', '.join(VARIANTS)}")
        if self.architecture not in TRAINABLE_ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r} for cnkit.training.train; it trains: "
                             f"{', '.join(TRAINABLE_ARCHITECTURES)}")
        if self.architecture == "union" and is_toy(self.dataset) and condition_count(self.dataset) < 2:
            raise ValueError(f"architecture='union' learns several conditions at once; dataset {self.dataset!r} has "
                             "one per item: name several, e.g. 'toy:shapes/segmentation+depth', or give an "
                             "imagefolder that lists several conditioning images per row")
        if self.architecture != "controlnet" and self.variant != "zero":
            raise ValueError(f"variant={self.variant!r} is a ControlNet variant; with architecture="
                             f"{self.architecture!r} leave variant at 'zero'")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, "
                             f"got {self.timestep_sampling!r}")
        if self.validate_every < 0:
            raise ValueError(f"parameter validate_every must be 0 (off) or more, got {self.validate_every}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.encode not in ("cache", "on_the_fly"):
            raise ValueError(f"encode must be cache or on_the_fly, got {self.encode!r}")
        if self.num_workers < 0 or self.resolution < 0 or self.signals_every < 0 or self.stop_after_convergence < 0:
            raise ValueError("num_workers, resolution, signals_every and stop_after_convergence must be 0 or more")
        if self.validate_on not in ("schedule", "forecast"):
            raise ValueError(f"validate_on must be schedule or forecast, got {self.validate_on!r}")
        needs_forecast = self.validate_on == "forecast" or self.stop_after_convergence
        if needs_forecast and not (self.forecast and self.signals_every):
            raise ValueError("validate_on='forecast' and stop_after_convergence act on the live forecast: set "
                             "forecast=True with signals_every > 0 (the condition probe it reads)")
        if self.stop_after_convergence and not self.validate_every:
            raise ValueError("stop_after_convergence waits for validation to confirm convergence: set "
                             "validate_every > 0")

    @property
    def adapter_name(self) -> str:
        """The ``cnkit.models.architectures`` name this run builds (for controlnet, its variant's paper net)."""
        return architectures.PAPER_NETS[self.variant] if self.architecture == "controlnet" else self.architecture

    @property
    def adapter_options(self) -> dict:
        """The build options of ``adapter_name`` this config sets (a union's condition count is its dataset's)."""
        if self.architecture == "union":
            return {"n_conditions": condition_count(self.dataset), "condition_dropout": self.condition_dropout}
        return {"rank": self.lora_rank} if self.architecture == "control-lora" else {}

    def samples_per_step(self, num_processes: int = 1) -> int:
        return self.batch_size * self.gradient_accumulation * num_processes

    @classmethod
    def recipe(cls, name: str = "kit", **overrides) -> TrainConfig:
        """A named recipe (``RECIPES``) with ``overrides`` on top."""
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
        return cls(**{**RECIPES[name], **overrides})


# The training methods, as TrainConfig settings over its defaults (the budget, data and base stay the caller's).
# kit: measured on the tiny base (notebook 04): AdamW 1e-3 (at 3e-4 with uniform timesteps the fill task was still
# flat after 500 steps) and T2I-Adapter's cubic timestep sampling (seed 0 converges at step 175 with it, 400
# without). paper: AdamW 1e-5 and uniform timesteps, as the paper trains SD 1.5; 50% empty prompts in both.
RECIPES = {
    "kit": {},
    "paper": {"learning_rate": 1e-5, "timestep_sampling": "uniform", "prompt_dropout": 0.5},
}


# Settings a resumed run may change: how long it runs, how often it logs and how it reads; the rest fixes the run.
RESUMABLE = ("out_dir", "steps", "validate_every", "checkpoint_every", "report_to", "num_workers", "telemetry_every",
             "signals_every", "forecast")
# Settings added after the first runs were kept: they count in a run's identity (cnkit.experiments.runs) only when
# they differ
# from these values, so the runs kept before they existed are still found.
LATER_SETTINGS = {"architecture": "controlnet", "resize_mode": "crop_and_resize", "encode": "cache", "num_workers": 0,
                  "gradient_checkpointing": False, "use_8bit_adam": False, "telemetry_every": 1, "lora_rank": 8,
                  "condition_dropout": 0.5, "signals_every": 20, "forecast": False, "validate_on": "schedule",
                  "stop_after_convergence": 0, "max_grad_norm": 0.0,
                  "validation_steps": 20}


def open_dataset(cfg: TrainConfig, resolution: int):
    """The training items of ``cfg``: ``n_train`` toy samples, or a folder's items but its last ``validation_size``."""
    return training_items(cfg.dataset, resolution, cfg.n_train, cfg.data_seed, cfg.validation_size)


class Trainer:
    """Owns the loop; callbacks watch it. ``Trainer(cfg).run()`` trains, checkpoints and resumes."""

    def __init__(self, cfg: TrainConfig, cache_dir: str | Path | None = None):
        """``cache_dir``: where the encoded training set is kept (default ``out_dir/cache``); runs that
        share one reuse each other's encodings."""
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else self.out / "cache"
        self.started = time.perf_counter()  # wall clock of this process's part of the run
        # The clocks of the sittings before this one (a resumed run), from the checkpoint; None where a checkpoint
        # written before the kit kept them cannot say: the run's whole time is then unknown, not this sitting's.
        self.earlier: dict[str, float] | None = {"elapsed_s": 0.0, "train_loop_s": 0.0}
        self._loop_started: float | None = None
        # On a machine without an accelerator, `accelerate launch --multi_gpu --num_processes N` (or
        # torchrun) starts N CPU processes; Accelerate only joins them (gloo) when told it runs on the CPU.
        on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():  # never train fp32 while saying fp16
            raise ValueError("mixed_precision='fp16' needs a CUDA GPU (none here); use 'bf16' or 'no'")
        # Accelerate keeps one precision per process; a notebook that trains twice with different settings needs
        # it reset (the distributed part, PartialState, is kept).
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(
            cpu=on_cpu, mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation,
            log_with=cfg.report_to or None, project_config=ProjectConfiguration(project_dir=str(self.out)))
        self.callbacks = defaultdict(list)
        self.postfix: dict[str, str] = {}  # what watchers show beside the loss in the progress bar
        self.stop_reason: str | None = None  # set by request_stop: the run ends after this step
        self.step = 0
        self.loss_history: list[tuple[int, float]] = []
        self.notes: list[str] = []  # what was changed on the way in (notes.json in the run folder)
        self.pipe = load_base(cfg.base, device=self.accelerator.device)
        self.resolution = cfg.resolution or image_size(self.pipe)
        step = vae_scale_factor(self.pipe.vae) * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)
        if self.resolution % step:
            raise ValueError(f"resolution {self.resolution} does not fit this base: it must be a multiple of {step} "
                             f"(the VAE's factor {vae_scale_factor(self.pipe.vae)} times the UNet's "
                             f"{len(self.pipe.unet.config.block_out_channels) - 1} downsamplings), e.g. "
                             f"{max(step, round(self.resolution / step) * step)}")
        # Mixed precision: on a GPU the locked UNet and text encoder are stored in half precision, as diffusers'
        # script does; the ControlNet keeps fp32 master weights (autocast), and the VAE stays fp32 (fp16 VAEs give
        # NaN images). CPU autocast leaves GroupNorm in fp32 and cannot take half weights there: the base stays fp32.
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        if half is not None and self.accelerator.device.type == "cuda":
            self.pipe.unet.to(half)
            self.pipe.text_encoder.to(half)
        # The trainable part, behind cnkit.models.architectures' one interface: the paper's ControlNet (for it,
        # ``adapter.predict_noise`` is the UNet call this loop always made, bit for bit) or a successor.
        name, options = cfg.adapter_name, cfg.adapter_options
        maps = options.get("n_conditions") or condition_count(cfg.dataset)  # a folder's count opens it: once
        if (maps > 1) != (cfg.architecture == "union"):
            raise ValueError(
                f"dataset {cfg.dataset!r} has {maps} condition map(s) per item; architecture={cfg.architecture!r} "
                + ("learns one: train architecture='union' on it, or give a dataset of one condition" if maps > 1
                   else "needs several: give a dataset with several maps per item"))
        self.adapter = architectures.build(name, self.pipe, seed=cfg.seed, **options)
        if hasattr(self.adapter, "drops_in_predict"):  # the loop drops conditions from its own batch stream (resume)
            self.adapter.drops_in_predict = False
        if self.accelerator.device.type == "cpu":
            # oneDNN's convolutions (forward and backward) are ~7% faster on NHWC (bench/train_throughput.py).
            for module in (self.pipe.unet, self.adapter.net):
                module.to(memory_format=torch.channels_last)
        if cfg.gradient_checkpointing:
            if not getattr(self.adapter.net, "_supports_gradient_checkpointing", False):
                raise ValueError(f"gradient_checkpointing: the {name} model ({type(self.adapter.net).__name__}) "
                                 "does not support it; train it with gradient_checkpointing=False")
            self.adapter.net.enable_gradient_checkpointing()
            self.pipe.unet.enable_gradient_checkpointing()
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)

    @property
    def controlnet(self):
        """The trained model itself (a diffusers ``ControlNetModel`` for the paper's architecture): what a
        checkpoint holds and what the matching diffusers class loads."""
        return self.accelerator.unwrap_model(self.adapter).net

    # --- events, as minGPT's Trainer -------------------------------------------------------
    def add_callback(self, event: str, fn) -> None:
        self.callbacks[event].append(fn)

    def trigger(self, event: str) -> None:
        for fn in self.callbacks[event]:
            fn(self)

    def request_stop(self, reason: str) -> None:
        """End the run after the current step (checkpointed, validated as at the end, and kept so: a rerun does
        not train on). Watchers call it (``cnkit.training.forecast``: after convergence)."""
        self.stop_reason = self.stop_reason or reason

    @property
    def samples_seen(self) -> int:
        return self.step * self.cfg.samples_per_step(self.accelerator.num_processes)

    @property
    def micro_batches(self) -> int:
        return self.step * self.cfg.gradient_accumulation

    # --- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.checkpoint_dir, state_file="trainer_state.json")

    def elapsed(self) -> float:
        """Wall seconds since the run started, over all its sittings (nan when an earlier sitting's is unknown)."""
        if self.earlier is None:
            return math.nan
        return self.earlier["elapsed_s"] + time.perf_counter() - self.started

    def train_loop_s(self, this_sitting: float | None = None) -> float | None:
        """Seconds in the training loop over all sittings (None when an earlier sitting's are unknown);
        ``this_sitting``: this sitting's, when measured (default: up to now)."""
        if this_sitting is None:
            this_sitting = 0.0 if self._loop_started is None else time.perf_counter() - self._loop_started
        return None if self.earlier is None else self.earlier["train_loop_s"] + this_sitting

    def save_checkpoint(self) -> None:
        """The adapter's folder (for the paper's net a stock diffusers ControlNet folder, safetensors) plus the
        optimizer's state and step, replacing the last one so that a complete checkpoint exists at every instant
        (``cnkit.training.checkpoints``)."""
        if not self.accelerator.is_main_process:
            return

        def write(folder: Path) -> None:
            self.accelerator.unwrap_model(self.adapter).save_pretrained(folder)
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

        self.checkpoint.save(write, {
            "step": self.step, "samples_seen": self.samples_seen, "micro_batches": self.micro_batches,
            "num_processes": self.accelerator.num_processes, "config": asdict(self.cfg),
            "loss_history": self.loss_history, "stopped": self.stop_reason,
            "elapsed_s": None if math.isnan(self.elapsed()) else self.elapsed(), "train_loop_s": self.train_loop_s(),
            "data": self.data.state() if hasattr(self.data, "state") else None})
        self.trigger("on_checkpoint")

    def load_checkpoint(self) -> bool:
        state = self.checkpoint.state()
        if state is None:
            return False
        try:
            self.accelerator.unwrap_model(self.adapter).load_weights(self.checkpoint_dir)
            self.optimizer.load_state_dict(torch.load(self.checkpoint_dir / "optimizer.pt", weights_only=True))
            self.step = state["step"]
            self.loss_history = [tuple(x) for x in state["loss_history"]]
            self.stop_reason = state.get("stopped")
            self.earlier = ({k: state[k] for k in ("elapsed_s", "train_loop_s")}
                            if state.get("train_loop_s") is not None else None)
            if hasattr(self.data, "load_state"):  # on the fly: what the earlier sittings counted, for notes.json
                self.data.load_state(state.get("data") or {})
        except Exception as e:  # noqa: BLE001 - missing, damaged or pickled files: said by checkpoint_error
            raise checkpoint_error(e, self.checkpoint_dir) from e
        return True

    def claim_out_dir(self) -> None:
        """Own ``out_dir`` for this run (one process at a time; another configuration refused, even before the
        first checkpoint)."""
        if not self.accelerator.is_main_process:
            return
        state = self.checkpoint.state() if self.out.is_dir() else None
        if state and state.get("step", 0) > self.cfg.steps:
            raise ValueError(f"{self.out} holds a run trained to step {state['step']}; steps={self.cfg.steps} is "
                             f"fewer, and a net cannot be untrained: pass steps>={state['step']} to continue it (or "
                             f"read it back), or another out_dir to train {self.cfg.steps} steps")
        self._lock = claim(self.out, asdict(self.cfg), "train_config.json", "a run", ignore=RESUMABLE,
                           defaults=LATER_SETTINGS,
                           saved=state["config"] if state else None)

    # --- the loop ---------------------------------------------------------------------------
    def _micro_batch(self, data, micro: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``micro`` of this step: its items (``data.gather``), noise, timesteps and dropped prompts."""
        cfg, acc = self.cfg, self.accelerator
        g = micro_batch_generator(cfg.seed, self.step, micro, acc.process_index)
        idx = draw_items(g, len(data), cfg.batch_size)
        items = data.gather(idx)
        z0 = items["latent_mean"] + items["latent_std"] * torch.randn(items["latent_mean"].shape, generator=g)
        z0 = z0 * self.pipe.vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=g)
        n_t = self.noise_scheduler.config.num_train_timesteps
        if cfg.timestep_sampling == "cubic":
            t = ((1 - torch.rand(cfg.batch_size, generator=g) ** 3) * n_t).long().clamp_(max=n_t - 1)
        else:
            t = torch.randint(0, n_t, (cfg.batch_size,), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.prompt_dropout
        text = torch.where(drop[:, None, None], data.empty_embed, items["text"])
        cond = condition_range(items["conditions"])
        adapter = self.accelerator.unwrap_model(self.adapter)
        if getattr(adapter, "condition_dropout", 0) > 0:  # a union net: each map of each item dropped, replayably
            cond = adapter.drop_conditions(cond, g)
        return {"noisy": self.noise_scheduler.add_noise(z0, noise, t), "noise": noise, "t": t, "text": text,
                "cond": cond}

    def loss(self, batch: dict) -> torch.Tensor:
        dev = self.accelerator.device
        noisy, t, text = batch["noisy"].to(dev), batch["t"].to(dev), batch["text"].to(dev)
        with self.accelerator.autocast():
            # the prepared module is called (not predict_noise) so that DDP sees the forward it synchronises
            pred = self.adapter(self.pipe.unet, noisy, t, text, batch["cond"].to(dev))
        return F.mse_loss(pred.float(), batch["noise"].to(dev))

    def run(self) -> dict:
        """Train to ``cfg.steps`` (resuming from the folder's checkpoint), holding ``out_dir`` meanwhile."""
        self.claim_out_dir()
        try:
            return self._run()
        finally:
            if getattr(self, "_lock", None) is not None:
                self._lock.release()

    def _run(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        with acc.main_process_first():
            self.data = (OnTheFly(cfg, self.pipe, self.resolution) if cfg.encode == "on_the_fly"
                         else cached_store(cfg, self.pipe, self.resolution, self.cache_dir))
        self._record_notes()
        self.adapter.train()
        self.optimizer = make_optimizer(self.adapter.trainable_parameters(), cfg)
        resumed = self.load_checkpoint()
        if hasattr(self.data, "plan"):  # on the fly: workers read ahead what the loop will ask for
            self.data.plan(self.step, acc.process_index)
        self.adapter, self.optimizer = acc.prepare(self.adapter, self.optimizer)
        if cfg.report_to:
            acc.init_trackers("cnkit", config={k: v for k, v in asdict(cfg).items()})
        self.resumed = resumed
        self.trigger("on_train_start")
        label = f"controlnet ({cfg.variant})" if cfg.architecture == "controlnet" else cfg.architecture
        bar = tqdm(total=cfg.steps, initial=self.step, desc=label,
                   disable=not acc.is_main_process)
        start = self._loop_started = time.perf_counter()
        while self.step < cfg.steps and not self.stop_reason:
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(cfg.gradient_accumulation):
                with acc.accumulate(self.adapter):
                    loss = self.loss(self._micro_batch(self.data, micro))
                    acc.backward(loss)
                    total += loss.item() / cfg.gradient_accumulation
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"loss became {total} at step {self.step}; stopped. The last good checkpoint (step "
                    f"{self._last_checkpoint_step()}) is in {self.checkpoint_dir}: lower learning_rate or use "
                    "mixed_precision='no', then rerun to resume from it")
            if cfg.max_grad_norm:  # diffusers' train_controlnet.py clips at 1.0; the kit's recipe does not (0)
                acc.clip_grad_norm_(acc.unwrap_model(self.adapter).trainable_parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.step += 1
            self.last_loss = total
            self.loss_history.append((self.step, total))
            if cfg.report_to:
                acc.log({"loss": total, "samples_seen": self.samples_seen}, step=self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", samples=self.samples_seen, **self.postfix)
            self.trigger("on_step_end")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or self.stop_reason:
                self.save_checkpoint()
        bar.close()
        self._record_notes()
        self.wall_time_s = time.perf_counter() - start
        self.trigger("on_train_end")
        if cfg.report_to:
            acc.end_training()
        return {"steps": self.step, "samples_seen": self.samples_seen, "micro_batches": self.micro_batches,
                "wall_time_s": self.wall_time_s, "train_loop_s_all_sittings": self.train_loop_s(self.wall_time_s),
                "resumed": resumed, "stopped": self.stop_reason}

    def _record_notes(self) -> None:
        """The training set's notes (what was changed on the way in) into ``notes.json``."""
        self.notes = list(self.data.notes)
        if self.accelerator.is_main_process:
            write_json(self.out / "notes.json", self.notes)

    def _last_checkpoint_step(self) -> int | None:
        state = self.checkpoint.state()
        return state["step"] if state else None


def attach_watchers(trainer: Trainer, validation_prompt: str | None = None):
    """The kit's standard watchers: injection telemetry, the condition-use probe (unless ``signals_every`` is 0),
    the live forecast (``forecast``) and validation. Returns the validation (its metric names the run's fidelity)."""
    cfg = trainer.cfg
    InjectionTelemetry(every=cfg.telemetry_every).attach(trainer)
    if cfg.signals_every:
        probe = ConditionProbe(every=cfg.signals_every).attach(trainer)
        if cfg.forecast:
            Forecast(probe, stop_after_convergence=cfg.stop_after_convergence).attach(trainer)
    return Validation(prompt=validation_prompt).attach(trainer)


def make_optimizer(params, cfg: TrainConfig):
    """AdamW at the recipe's rate; bitsandbytes' 8-bit AdamW when ``use_8bit_adam`` (a clear error without it)."""
    if not cfg.use_8bit_adam:
        return torch.optim.AdamW(params, lr=cfg.learning_rate)
    try:
        import bitsandbytes as bnb  # optional: only this option needs it
    except ImportError as e:
        raise ImportError("use_8bit_adam needs the bitsandbytes package (pip install bitsandbytes, on a machine "
                          "with a CUDA GPU); or train with use_8bit_adam=False") from e
    return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate)


def main(argv=None) -> dict:
    """``cnkit train --recipe=kit --steps=200 --dataset=toy:fill ...`` (also ``python -m cnkit train`` and
    ``python -m cnkit.training.train``); the same under ``accelerate launch --num_processes 2 -m cnkit train ...``.
    Every TrainConfig field is a flag, over the recipe."""
    ap = argparse.ArgumentParser(prog="cnkit train", description="Train a ControlNet or a successor "
                                 "(cnkit.TrainConfig; every field is a flag)")
    ap.add_argument("--recipe", default="kit", choices=list(RECIPES),
                    help="the training method the other flags start from: " + "; ".join(
                        f"{k}: {v or 'TrainConfig defaults'}" for k, v in RECIPES.items()))
    for f in fields(TrainConfig):
        ap.add_argument(f"--{f.name}", default=None, help=f"default: the recipe's, else {f.default!r}")
    args = vars(ap.parse_args(argv))
    recipe = args.pop("recipe")
    trainer = Trainer(TrainConfig.recipe(recipe, **{k: v for k, v in args.items() if v is not None}))
    attach_watchers(trainer)
    result = trainer.run()
    if trainer.accelerator.is_main_process:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
