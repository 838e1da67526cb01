"""Pretraining the embedded tiny Stable Diffusion on the toy world: "the pretrained model" of the paper.

ControlNet's premise is a strong, locked base. The kit makes its own, in three resumable stages
that write into ``out_dir``, from scratch or continuing an earlier base (``warm_start``):

1. ``vae``: the ``AutoencoderKL`` on toy-world images (every world). Reconstruction L1 + MSE with a
   tiny KL term, as SD's autoencoder is mostly a reconstruction model. It is fully convolutional
   apart from one attention block, so it trains on random crops (``vae_crop``), 4x cheaper than
   whole images, and is evaluated on whole held-out images. Continuing a base, ``vae_anchor`` keeps the
   encoder's latents of the worlds the old base knew where they were (an MSE to the old encoder's posterior
   means), so that its UNet, and the ControlNets trained on it, still read them while the VAE learns new colours.
2. ``latents``: every training image encoded once (posterior mean and std cached), and the latent
   scaling factor set to 1/std as SD's 0.18215 was chosen.
3. ``unet``: the UNet and the CLIP text encoder trained together on the cached latents with SD's
   noise-prediction objective, ``empty_prompt`` of the prompts dropped for classifier-free
   guidance, Min-SNR-5 loss weights (Hang et al. 2023: the same quality in fewer steps) and an
   exponential moving average of the weights, which is what ships. The text encoder is trainable
   here only and locked forever after, like CLIP in SD. Continuing a base with a wider vocabulary, the
   text encoder is widened first (``cnkit.models.vocabulary``: trained rows carried over, new colour words
   optionally placed by their colour, ``text_layers`` appended as identities).

The learning rate follows ``schedule``: ``cosine`` (warm-up, then cosine to zero at ``steps``) or ``wsd``
(warm-up, constant, then linear to zero over the last ``decay_steps``), which can be extended: a ``wsd`` run
stopped at any step and continued with a larger ``steps`` is the run that had asked for it from the start.

Every stage counts the CPU time it spent (``time.process_time``, all threads, summed over sittings) and, with
``eval_every``, scores the EMA weights on held-out prompts as it trains: ``curve.csv``, quality against CPU
minutes, for the card.

The fill world's held-out colour pairs (``cnkit.data.splits.HELD_OUT_FILL_PAIRS``) never appear in training,
so the evaluation can use prompts the model never saw. Runs on Accelerate (mixed precision and devices
come from it); each stage checkpoints to safetensors (``cnkit.training.checkpoints``: complete at every instant)
and resumes after an interruption with the same batches and noise it would have drawn (every step's
randomness derives from (seed, step)). The EMA and the Min-SNR weights are diffusers' own
(``EMAModel``, ``compute_snr``), the learning-rate schedules its cosine schedule.

``PretrainConfig()`` is the recipe ``data/tiny-sd`` shipped with (its card records the same values).
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..card import portable
from ..data import toyworld
from ..data.splits import HELD_OUT_FILL_PAIRS, HELD_OUT_X11_PAIRS, held_out_images
from ..files import write_atomic, write_json
from ..models.bases import load_pipeline
from ..models.tiny import TinySDConfig, build_tiny_sd
from ..models.vocabulary import widen
from ..params import coerce_fields
from ..pixels import to_model_range
from .checkpoints import Checkpoint, claim


@dataclass
class PretrainConfig:
    """The pretraining recipe; the defaults are what ``data/tiny-sd`` shipped with."""

    out_dir: str = "outputs/tiny-sd"
    seed: int = 0
    warm_start: str = ""  # a base (pipeline folder) this run continues; "" builds a new one from nothing
    n_fill: int = 30000  # training images of the fill world (held-out colour pairs excluded)
    n_shapes: int = 45000  # training images of the shapes world
    n_fill50k: int = 0  # training images of the fill50k world (Fill50K's colours and geometry; held-out pairs out)
    n_fill_x11: int = 0  # training images of the fill-x11 world (Fill50K's colours, the kit's geometry)
    vae_steps: int = 2500
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    vae_crop: int = 32  # pixels; 0 trains on whole images
    vae_anchor: float = 0.0  # continuing a base: weight of the MSE that keeps the old worlds' latents in place
    text_layers: int = 0  # text encoder layers; 0 keeps the base's (or TinySDConfig's), more appends identities
    colour_init: bool = False  # new colour words start from their colours (cnkit.models.vocabulary)
    steps: int = 4500  # UNet + text encoder optimizer steps
    batch_size: int = 64
    learning_rate: float = 1e-3
    schedule: str = "cosine"  # cosine (to zero at steps) or wsd (constant, then linear to zero over decay_steps)
    warmup_steps: int = 500
    decay_steps: int = 0  # wsd: the final linear decay
    empty_prompt: float = 0.1  # share of prompts replaced by "" (classifier-free guidance)
    snr_gamma: float = 5.0  # Min-SNR weighting; 0 turns it off
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    eval_every: int = 0  # UNet steps between scores of the EMA weights on held-out prompts (curve.csv); 0: none
    n_eval: int = 64  # held-out prompts per world for each point of the curve
    mixed_precision: str = "no"
    num_threads: int = 0  # CPU threads for torch; 0 leaves torch's default

    def __post_init__(self):
        coerce_fields(self)  # papermill passes ints for floats and strings for numbers
        for name in ("vae_batch_size", "steps", "batch_size", "checkpoint_every", "n_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"parameter {name} must be at least 1, got {getattr(self, name)}")
        if self.vae_steps < 0 or (self.vae_steps == 0 and not self.warm_start):
            raise ValueError(f"vae_steps must be at least 1 (0 only when continuing a base), got {self.vae_steps}")
        counts = (self.n_fill, self.n_shapes, self.n_fill50k, self.n_fill_x11)
        if min(counts) < 0 or sum(counts) < 1:
            raise ValueError(f"n_fill, n_shapes, n_fill50k and n_fill_x11 must be 0 or more, not all 0; got {counts}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule must be cosine or wsd, got {self.schedule!r}")
        if self.schedule == "wsd" and not 0 <= self.decay_steps <= self.steps:
            raise ValueError(f"decay_steps must be within 0..steps ({self.steps}), got {self.decay_steps}")


WORLD_COUNTS = {"fill": "n_fill", "shapes": "n_shapes", "fill50k": "n_fill50k", "fill-x11": "n_fill_x11"}


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    # Every step's randomness is a pure function of (seed, stage, step): resuming replays it exactly.
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stage * 100_000_007 + int(step))


def training_set(cfg: PretrainConfig) -> tuple[np.ndarray, list[str]]:
    """Images (N x H x W x 3 uint8) and prompts of every world with a count, in the order fill, shapes, fill50k,
    fill-x11; the fill worlds' held-out colour pairs are skipped."""
    images, prompts = [], []
    for world, field_name in WORLD_COUNTS.items():
        n = getattr(cfg, field_name)
        held_out = set(HELD_OUT_FILL_PAIRS if world == "fill" else HELD_OUT_X11_PAIRS)
        kept, i = 0, 0
        while kept < n:
            s = toyworld.sample(world, i, seed=cfg.seed, edges=False)  # images and prompts only
            i += 1
            if world == "shapes" or (s.truth["fill"], s.truth["background"]) not in held_out:
                images.append(s.image)
                prompts.append(s.prompt)
                kept += 1
    return np.stack(images), prompts


def _old_worlds(cfg: PretrainConfig) -> np.ndarray:
    """Which training images belong to the worlds the first base knew (fill, shapes): the VAE anchor's images."""
    return np.arange(cfg.n_fill + cfg.n_shapes)


def _save(ckpt: Checkpoint, step: int, tensors: dict[str, dict], optimizer, scheduler, extra: dict | None = None):
    """A stage's resumable state: tensors in safetensors (one file per name), the optimizer's and the
    schedule's state in ``torch.save`` files read back with ``weights_only=True``, the step in JSON."""

    def write(folder: Path) -> None:
        for name, state in tensors.items():
            save_file({k: v.detach().contiguous() for k, v in state.items()}, folder / f"{name}.safetensors")
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")

    ckpt.save(write, {"step": step} | (extra or {}))


def _load(ckpt: Checkpoint, names: list[str], optimizer, scheduler) -> tuple[dict, dict]:
    """(state json, {name: tensors}) of a stage's checkpoint; the optimizer and schedule restored."""
    optimizer.load_state_dict(torch.load(ckpt.path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt.path / "scheduler.pt", weights_only=True))
    return ckpt.state(), {name: load_file(ckpt.path / f"{name}.safetensors") for name in names}


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


@torch.no_grad()
@torch.no_grad()
def vae_psnr(vae, images: np.ndarray, batch: int = 64) -> float:
    """Mean reconstruction PSNR (dB) of the VAE (posterior mean) on uint8 images."""
    x = to_model_range(images)
    scores = [_psnr(vae.decode(vae.encode(x[i:i + batch]).latent_dist.mean).sample, x[i:i + batch])
              for i in range(0, len(x), batch)]
    return float(torch.cat(scores).mean())


class _CPUClock:
    """CPU seconds a stage has spent (all threads of this process), summed over sittings: what it costs on any
    machine, whatever else ran beside it (wall time is kept too)."""

    def __init__(self, before: float = 0.0):
        self.before, self.start = before, time.process_time()

    def __call__(self) -> float:
        return self.before + time.process_time() - self.start


def train_vae(cfg: PretrainConfig, vae, images: np.ndarray, accelerator, log, anchor=None) -> dict:
    """The VAE on random crops of ``images``; ``anchor``: the old encoder (continuing a base), whose posterior means
    on the old worlds' images the new encoder is held to with weight ``cfg.vae_anchor``."""
    ckpt = Checkpoint(Path(cfg.out_dir) / "checkpoints" / "vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 0, cfg.vae_steps)  # cosine to 0, no warm-up
    start, cpu_before = 0, 0.0
    if ckpt.exists():
        state, tensors = _load(ckpt, ["vae"], opt, sched)
        vae.load_state_dict(tensors["vae"])
        start, cpu_before = state["step"], state.get("cpu_s", 0.0)
        log(f"vae: resumed at step {start}")
    if start >= cfg.vae_steps:
        return {"cpu_s": cpu_before}
    clock = _CPUClock(cpu_before)
    vae.train()
    model, opt = accelerator.prepare(vae, opt)
    size = images.shape[1]
    old = _old_worlds(cfg) if anchor is not None and cfg.vae_anchor > 0 else None
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", initial=start, total=cfg.vae_steps,
               disable=not accelerator.is_main_process)
    for step in bar:
        g = _step_generator(cfg.seed, 1, step)
        pick = torch.randint(len(images), (cfg.vae_batch_size,), generator=g).numpy()
        if old is not None:  # half of each batch from the old worlds, so the anchor always has something to hold
            half = cfg.vae_batch_size // 2
            pick[:half] = old[torch.randint(len(old), (half,), generator=g).numpy()]
        x = to_model_range(images[pick])
        if cfg.vae_crop and cfg.vae_crop < size:
            oy, ox = torch.randint(0, size - cfg.vae_crop + 1, (2,), generator=g).tolist()
            x = x[:, :, oy:oy + cfg.vae_crop, ox:ox + cfg.vae_crop]
        x = x.to(accelerator.device)
        with accelerator.autocast():
            posterior = model.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(x.device)
            rec = model.decode(z).sample
            loss = F.mse_loss(rec.float(), x) + F.l1_loss(rec.float(), x) + 1e-6 * posterior.kl().mean()
            if old is not None:
                with torch.no_grad():
                    target = anchor.encode(x[:half]).latent_dist.mean
                loss = loss + cfg.vae_anchor * F.mse_loss(posterior.mean[:half].float(), target.float())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"vae: loss became {loss.item()} at step {step}; the last good checkpoint "
                                     f"is in {ckpt.path}. Lower vae_learning_rate and rerun to resume.")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            _save(ckpt, step + 1, {"vae": accelerator.unwrap_model(model).state_dict()}, opt, sched,
                  {"cpu_s": clock()})
    vae.eval()
    return {"final_loss": loss.item(), "cpu_s": clock()}


def _fingerprint(module) -> str:
    """A short hash of a module's weights: a cache made with other weights is not reused."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_latents(cfg: PretrainConfig, vae, images: np.ndarray, batch: int = 256) -> dict[str, torch.Tensor]:
    """Posterior mean and std of every training image, cached in ``latents.safetensors`` (reused only for the same
    images and the same VAE weights)."""
    path = Path(cfg.out_dir) / "latents.safetensors"
    key = {"vae": _fingerprint(vae), "images": str(len(images)),
           "data": hashlib.sha256(images[:: max(1, len(images) // 64)].tobytes()).hexdigest()[:16]}
    if path.is_file():
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if {k: meta.get(k) for k in key} == key:
            return load_file(path)
    clock = _CPUClock()
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encode latents"):
        post = vae.encode(to_model_range(images[i:i + batch])).latent_dist  # float32 per batch: 4x less memory
        means.append(post.mean)
        stds.append(post.std)
    cached = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}
    tmp = path.with_suffix(".tmp")
    # the encoding's CPU seconds travel with the cache, so a run resumed in a later sitting still counts them
    save_file(cached, tmp, metadata={**key, "cpu_s": f"{clock():.1f}"})
    os.replace(tmp, path)  # never a half-written cache
    return cached


def latents_cpu_s(path: Path) -> float:
    """CPU seconds the cached latents cost to encode, as recorded with them (0.0 for a cache from before the
    kit recorded it)."""
    with safe_open(path, "pt") as f:
        return float((f.metadata() or {}).get("cpu_s", 0.0))


def _min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for noise prediction (Hang et al. 2023): min(SNR, gamma) / SNR."""
    if gamma <= 0:
        return torch.ones(timesteps.shape)
    snr = compute_snr(scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / snr


def _ema_models(ema: dict[str, EMAModel], models: dict) -> dict:
    """Copies of ``models`` holding the moving averages (what ships, and what a study evaluates)."""
    out = {}
    for key, model in models.items():
        copy_ = copy.deepcopy(model).requires_grad_(False)
        ema[key].copy_to(copy_.parameters())
        out[key] = copy_
    return out


def _append_row(path: Path, row: str, step: int, resumed_at: int | None = None) -> None:
    """One line of a csv log; on resume the rows past the checkpoint's step go (a kill may have left them)."""
    if resumed_at is not None and path.is_file():
        lines = path.read_text().splitlines()
        head = [r for r in lines[:1] if not r[:1].isdigit()]
        rows = [r for r in lines[len(head):] if r and int(float(r.split(",")[0])) <= resumed_at]
        write_atomic(path, "".join(r + "\n" for r in head + rows))
    with open(path, "a") as f:
        f.write(row + "\n")


def _append_loss(path: Path, step: int, loss: float, resumed_at: int | None = None) -> None:
    _append_row(path, f"{step},{loss:.6f}", step, resumed_at)


def learning_rate_schedule(opt, cfg: PretrainConfig):
    """``cosine``: diffusers' warm-up then cosine to zero at ``steps``. ``wsd``: warm-up, constant, then linear to
    zero over the last ``decay_steps``; its factor at a step depends on ``steps`` only through the decay, so a run
    extended before its decay began is the run that had asked for the longer budget."""
    if cfg.schedule == "cosine":
        return get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        decay_from = cfg.steps - cfg.decay_steps
        return 1.0 if step < decay_from else max(0.0, (cfg.steps - step) / max(1, cfg.decay_steps))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


CURVE_FIELDS = ["step", "samples_seen", "cpu_s", "wall_s", "eval_cpu_s", "fill_one_disc", "fill_colours",
                "fill_x11_one_disc", "fill_x11_fill_colour", "fill_x11_background_colour", "shapes_correct",
                "shapes_colours_and_counts"]


def _curve_row(step: int, cfg: PretrainConfig, cpu_s: float, wall_s: float, pipe, ema_models: dict,
               judge) -> tuple[str, float]:
    """One point of the quality curve, the EMA weights scored by ``judge(pipeline)`` (``evaluate_base``'s result):
    the csv row and the CPU seconds the scoring took (not charged to training)."""
    start = time.process_time()
    scored = copy.copy(pipe)
    scored.unet, scored.text_encoder = ema_models["unet"].eval(), ema_models["text_encoder"].eval()
    r = judge(scored)
    f, x, s = r["fill"], r["fill_x11"], r["shapes"]
    spent = time.process_time() - start
    values = [step, step * cfg.batch_size, round(cpu_s, 1), round(wall_s, 1), round(spent, 1),
              f["one_disc"], min(f["fill_colour"], f["background_colour"]), x["one_disc"], x["fill_colour"],
              x["background_colour"], s["correct"], s["colours_and_counts"]]
    return ",".join(str(v) for v in values), spent


def train_unet(cfg: PretrainConfig, pipe, latents: dict, prompts: list[str], accelerator, log,
               on_checkpoint=None, cpu_before: float = 0.0, judge=None) -> dict:
    """UNet + text encoder on cached latents; returns the EMA models. ``on_checkpoint(step, ema_models)``, if
    given, runs after each checkpoint (a study that evaluates the model as it trains). ``judge(pipeline)``: scores
    the EMA weights every ``eval_every`` steps into ``curve.csv`` (``cpu_before``: CPU seconds the earlier stages
    spent, where the curve's clock starts)."""
    out = Path(cfg.out_dir)
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    models = {"unet": unet, "text_encoder": text_encoder}
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
    sched = learning_rate_schedule(opt, cfg)
    ema = {key: EMAModel(model.parameters(), decay=cfg.ema_decay) for key, model in models.items()}
    names = {key: [n for n, _ in model.named_parameters()] for key, model in models.items()}
    ckpt = Checkpoint(out / "checkpoints" / "unet")
    start, resumed_at, cpu_unet, wall_before = 0, None, 0.0, 0.0
    if ckpt.exists():
        state, tensors = _load(ckpt, [*models, *(f"ema_{k}" for k in models)], opt, sched)
        for key, model in models.items():
            model.load_state_dict(tensors[key])
            ema[key].load_state_dict({"optimization_step": state["ema_step"],
                                      "shadow_params": [tensors[f"ema_{key}"][n] for n in names[key]]})
        start = resumed_at = state["step"]
        cpu_unet, wall_before = state.get("cpu_s", 0.0), state.get("wall_s", 0.0)
        # The optimizer kept the rate its own schedule last set; a run extended since (more steps: its decay moved)
        # steps with this schedule's rate from here, as the run that had asked for the longer budget did.
        rates = [base * factor(sched.last_epoch) for base, factor in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, rate in zip(opt.param_groups, rates):
            group["lr"] = rate
        sched._last_lr = rates
        log(f"unet: resumed at step {start}")
    if start >= cfg.steps:
        return _ema_models(ema, models)
    clock, wall_start = _CPUClock(cpu_unet), time.perf_counter()
    curve, scoring = out / "curve.csv", judge is not None and cfg.eval_every
    if scoring and start == 0:  # the curve starts from what the run starts with
        write_atomic(curve, ",".join(CURVE_FIELDS) + "\n")
        _append_row(curve, _curve_row(0, cfg, cpu_before, 0.0, pipe, models, judge)[0], 0)
        clock = _CPUClock(cpu_unet)  # the step-0 score is not training
    unet.train()
    text_encoder.train()
    unet.to(memory_format=torch.channels_last)  # measured faster for convolutions on CPU
    unet, text_encoder, opt = accelerator.prepare(unet, text_encoder, opt)
    scale = pipe.vae.config.scaling_factor
    bar = tqdm(range(start, cfg.steps), desc="unet", initial=start, total=cfg.steps,
               disable=not accelerator.is_main_process)
    losses = []
    for step in bar:
        g = _step_generator(cfg.seed, 3, step)
        idx = torch.randint(len(ids), (cfg.batch_size,), generator=g)
        z0 = (latents["mean"][idx] + latents["std"][idx] * torch.randn(latents["mean"][idx].shape, generator=g))
        z0 = z0 * scale
        batch_ids = torch.where(torch.rand(cfg.batch_size, 1, generator=g) < cfg.empty_prompt, empty, ids[idx])
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        zt = noise_scheduler.add_noise(z0, noise, t)
        dev = accelerator.device
        with accelerator.autocast():
            text = text_encoder(batch_ids.to(dev))[0]
            pred = unet(zt.to(dev), t.to(dev), text).sample
        per_sample = F.mse_loss(pred.float(), noise.to(dev), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * _min_snr_weights(noise_scheduler, t, cfg.snr_gamma).to(dev)).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"unet: loss became {loss.item()} at step {step}; the last good checkpoint "
                                     f"is in {ckpt.path}. Lower learning_rate and rerun to resume.")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for key, model in (("unet", unet), ("text_encoder", text_encoder)):
            ema[key].step(accelerator.unwrap_model(model).parameters())
        losses.append(per_sample.mean().item())
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            tensors = {key: accelerator.unwrap_model(m).state_dict() for key, m in (("unet", unet),
                                                                                    ("text_encoder", text_encoder))}
            tensors |= {f"ema_{key}": dict(zip(names[key], ema[key].shadow_params)) for key in models}
            wall = wall_before + time.perf_counter() - wall_start
            _save(ckpt, step + 1, tensors, opt, sched, {"loss_last_100": float(np.mean(losses[-100:])),
                                                        "ema_step": ema["unet"].optimization_step,
                                                        "cpu_s": clock(), "wall_s": wall})
            _append_loss(out / "loss.csv", step + 1, float(np.mean(losses[-cfg.checkpoint_every:])), resumed_at)
            if scoring and (step + 1) % cfg.eval_every == 0:
                row, spent = _curve_row(step + 1, cfg, cpu_before + clock(), wall, pipe, _ema_models(ema, models),
                                        judge)
                _append_row(curve, row, step + 1, resumed_at)
                clock.before -= spent  # scoring is timed on its own (eval_cpu_s), not charged to training
            resumed_at = None
            if on_checkpoint is not None:
                on_checkpoint(step + 1, _ema_models(ema, models))
    return _ema_models(ema, models)


# Settings that do not change the result; a resumed run may differ in them (a wsd run may also be extended).
_RESUMABLE_DIFFERENCES = ("checkpoint_every", "num_threads", "out_dir", "eval_every", "n_eval")


def pretrain(cfg: PretrainConfig | None = None, tiny_config: TinySDConfig | None = None, log=print,
             on_checkpoint=None, judge=None, data=None):
    """Run (or resume) all three stages; returns the pipeline with EMA weights, saved to
    ``out_dir/pipeline`` as a stock diffusers folder, and a dict of what was measured. ``on_checkpoint`` and
    ``judge`` (the quality curve's scorer, e.g. ``cnkit.experiments.evaluations.evaluate_base``): see
    ``train_unet``. ``data``: ``training_set(cfg)`` when the caller has drawn it already."""
    cfg = cfg or PretrainConfig()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    ignore = _RESUMABLE_DIFFERENCES + (("steps",) if cfg.schedule == "wsd" else ())
    lock = claim(out, asdict(cfg), "pretrain_config.json", "a pretraining run", ignore=ignore)
    try:
        return _pretrain(cfg, tiny_config, log, on_checkpoint, judge, data)
    finally:
        lock.release()


def starting_pipeline(cfg: PretrainConfig, tiny_config: TinySDConfig | None = None):
    """(pipeline to train, the old VAE to anchor to or None, how its text encoder was made): a new tiny SD, or
    ``warm_start``'s with its text encoder widened to the toy worlds' vocabulary (``cnkit.models.vocabulary``)."""
    if not cfg.warm_start:
        c = tiny_config or TinySDConfig()
        if cfg.text_layers:
            c = TinySDConfig(**{**asdict(c), "text_layers": cfg.text_layers})
        return build_tiny_sd(seed=cfg.seed, config=c), None, {"from": "nothing"}
    pipe = load_pipeline(cfg.warm_start)
    pipe = copy.deepcopy(pipe)  # the cached pipeline stays as loaded
    old_vae = copy.deepcopy(pipe.vae).requires_grad_(False).eval()
    text_encoder, tokenizer, report = widen(pipe.text_encoder, pipe.tokenizer, toyworld.VOCABULARY,
                                            folder=Path(cfg.out_dir) / "tokenizer", colour_init=cfg.colour_init,
                                            text_layers=cfg.text_layers, seed=cfg.seed)
    pipe.text_encoder, pipe.tokenizer = text_encoder, tokenizer
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, old_vae, {"from": str(cfg.warm_start), **report}


def _pretrain(cfg: PretrainConfig, tiny_config, log, on_checkpoint, judge, data=None):
    out = Path(cfg.out_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    timings, t0 = {}, time.perf_counter()
    pipe, old_vae, start_report = starting_pipeline(cfg, tiny_config)
    images, prompts = data if data is not None else training_set(cfg)
    timings["data_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    vae_stats = train_vae(cfg, pipe.vae, images, accelerator, log, anchor=old_vae) if cfg.vae_steps else {}
    timings["vae_s"] = time.perf_counter() - t
    pipe.vae.eval()
    psnr = {w: vae_psnr(pipe.vae, held_out_images(64, cfg.seed, world=w)) for w in WORLD_COUNTS}
    log("vae: held-out PSNR " + ", ".join(f"{w} {v:.2f} dB" for w, v in psnr.items()))

    t = time.perf_counter()
    latents = encode_latents(cfg, pipe.vae, images)
    if not cfg.warm_start or cfg.vae_anchor == 0 and cfg.vae_steps:
        # a new latent space: scale it as SD's 0.18215 was chosen. An anchored one keeps the old scale (its UNet's)
        pipe.vae.register_to_config(scaling_factor=1.0 / float(latents["mean"].std()))
    timings["latents_s"] = time.perf_counter() - t
    latents_cpu = latents_cpu_s(out / "latents.safetensors")

    t = time.perf_counter()
    before = vae_stats.get("cpu_s", 0.0) + latents_cpu
    ema = train_unet(cfg, pipe, latents, prompts, accelerator, log, on_checkpoint, cpu_before=before, judge=judge)
    timings["unet_s"] = time.perf_counter() - t
    pipe.unet.load_state_dict(ema["unet"].state_dict())  # ship the moving average
    pipe.text_encoder.load_state_dict(ema["text_encoder"].state_dict())
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.unet.to(memory_format=torch.contiguous_format)
    for module in (pipe, pipe.unet, pipe.vae):  # the warm start's path is the builder's: ship it machine-free
        module.register_to_config(_name_or_path=portable(module.config.get("_name_or_path", "")))
    pipe.save_pretrained(out / "pipeline")
    unet_state = Checkpoint(out / "checkpoints" / "unet").state() or {}
    stats = {"vae_psnr_db": min(psnr.values()), "vae_psnr_db_by_world": psnr,
             "latent_scaling_factor": pipe.vae.config.scaling_factor, "n_train_images": len(images),
             "timings_s": timings, "start": start_report,
             "cpu_s": {"vae": vae_stats.get("cpu_s", 0.0), "latents": latents_cpu, "unet": unet_state.get("cpu_s")}}
    write_json(out / "pretrain_stats.json", stats)
    return pipe, stats
