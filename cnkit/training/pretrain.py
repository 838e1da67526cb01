"""Pretraining the embedded tiny Stable Diffusion on the toy world: "the pretrained model" of the paper.

ControlNet's premise is a strong, locked base. The kit makes its own, in three resumable stages
that write into ``out_dir``:

1. ``vae``: the ``AutoencoderKL`` on toy-world images (both worlds). Reconstruction L1 + MSE with a
   tiny KL term, as SD's autoencoder is mostly a reconstruction model. It is fully convolutional
   apart from one attention block, so it trains on random crops (``vae_crop``), 4x cheaper than
   whole images, and is evaluated on whole held-out images.
2. ``latents``: every training image encoded once (posterior mean and std cached), and the latent
   scaling factor set to 1/std as SD's 0.18215 was chosen.
3. ``unet``: the UNet and the CLIP text encoder trained together on the cached latents with SD's
   noise-prediction objective, ``empty_prompt`` of the prompts dropped for classifier-free
   guidance, Min-SNR-5 loss weights (Hang et al. 2023: the same quality in fewer steps) and an
   exponential moving average of the weights, which is what ships. The text encoder is trainable
   here only and locked forever after, like CLIP in SD.

The fill world's held-out colour pairs (``cnkit.data.splits.HELD_OUT_FILL_PAIRS``) never appear in training,
so the evaluation can use prompts the model never saw. Runs on Accelerate (mixed precision and devices
come from it); each stage checkpoints to safetensors (``cnkit.training.checkpoints``: complete at every instant)
and resumes after an interruption with the same batches and noise it would have drawn (every step's
randomness derives from (seed, step)). The EMA and the Min-SNR weights are diffusers' own
(``EMAModel``, ``compute_snr``), the learning-rate schedules its cosine schedule.

``PretrainConfig()`` is the recipe ``data/tiny-sd`` shipped with (its card records the same values).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data import toyworld
from ..data.splits import HELD_OUT_FILL_PAIRS, held_out_images
from ..models.tiny import TinySDConfig, build_tiny_sd
from ..params import coerce_fields
from ..pixels import to_model_range
from .checkpoints import Checkpoint, claim


@dataclass
class PretrainConfig:
    """The pretraining recipe; the defaults are what ``data/tiny-sd`` shipped with."""

    out_dir: str = "outputs/tiny-sd"
    seed: int = 0
    n_fill: int = 30000  # training images of the fill world (held-out colour pairs excluded)
    n_shapes: int = 45000  # training images of the shapes world
    vae_steps: int = 2500
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    vae_crop: int = 32  # pixels; 0 trains on whole images
    steps: int = 4500  # UNet + text encoder optimizer steps
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    empty_prompt: float = 0.1  # share of prompts replaced by "" (classifier-free guidance)
    snr_gamma: float = 5.0  # Min-SNR weighting; 0 turns it off
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    mixed_precision: str = "no"
    num_threads: int = 0  # CPU threads for torch; 0 leaves torch's default

    def __post_init__(self):
        coerce_fields(self)  # papermill passes ints for floats and strings for numbers
        for name in ("vae_steps", "vae_batch_size", "steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"parameter {name} must be at least 1, got {getattr(self, name)}")
        if self.n_fill < 0 or self.n_shapes < 0 or self.n_fill + self.n_shapes < 1:
            raise ValueError(f"n_fill and n_shapes must be 0 or more, not both 0; got {self.n_fill}, {self.n_shapes}")


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    # Every step's randomness is a pure function of (seed, stage, step): resuming replays it exactly.
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stage * 100_000_007 + int(step))


def training_set(cfg: PretrainConfig) -> tuple[np.ndarray, list[str]]:
    """Images (N x H x W x 3 uint8) and prompts of both worlds, fill's held-out pairs skipped."""
    held_out = set(HELD_OUT_FILL_PAIRS)
    images, prompts, i = [], [], 0
    while len(prompts) < cfg.n_fill:
        s = toyworld.sample("fill", i, seed=cfg.seed)
        i += 1
        if (s.truth["fill"], s.truth["background"]) not in held_out:
            images.append(s.image)
            prompts.append(s.prompt)
    for i in range(cfg.n_shapes):
        s = toyworld.sample("shapes", i, seed=cfg.seed)
        images.append(s.image)
        prompts.append(s.prompt)
    return np.stack(images), prompts


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
def vae_psnr(vae, images: np.ndarray, batch: int = 64) -> float:
    """Mean reconstruction PSNR (dB) of the VAE (posterior mean) on uint8 images."""
    x = to_model_range(images)
    scores = [_psnr(vae.decode(vae.encode(x[i:i + batch]).latent_dist.mean).sample, x[i:i + batch])
              for i in range(0, len(x), batch)]
    return float(torch.cat(scores).mean())


def train_vae(cfg: PretrainConfig, vae, images: np.ndarray, accelerator, log) -> dict:
    ckpt = Checkpoint(Path(cfg.out_dir) / "checkpoints" / "vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 0, cfg.vae_steps)  # cosine to 0, no warm-up
    start = 0
    if ckpt.exists():
        state, tensors = _load(ckpt, ["vae"], opt, sched)
        vae.load_state_dict(tensors["vae"])
        start = state["step"]
        log(f"vae: resumed at step {start}")
    if start >= cfg.vae_steps:
        return {}
    vae.train()
    model, opt = accelerator.prepare(vae, opt)
    size = images.shape[1]
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", initial=start, total=cfg.vae_steps,
               disable=not accelerator.is_main_process)
    for step in bar:
        g = _step_generator(cfg.seed, 1, step)
        x = to_model_range(images[torch.randint(len(images), (cfg.vae_batch_size,), generator=g).numpy()])
        if cfg.vae_crop and cfg.vae_crop < size:
            oy, ox = torch.randint(0, size - cfg.vae_crop + 1, (2,), generator=g).tolist()
            x = x[:, :, oy:oy + cfg.vae_crop, ox:ox + cfg.vae_crop]
        x = x.to(accelerator.device)
        with accelerator.autocast():
            posterior = model.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(x.device)
            rec = model.decode(z).sample
            loss = F.mse_loss(rec.float(), x) + F.l1_loss(rec.float(), x) + 1e-6 * posterior.kl().mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"vae: loss became {loss.item()} at step {step}; the last good checkpoint "
                                     f"is in {ckpt.path}. Lower vae_learning_rate and rerun to resume.")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            _save(ckpt, step + 1, {"vae": accelerator.unwrap_model(model).state_dict()}, opt, sched)
    vae.eval()
    return {"final_loss": float(loss)}


@torch.no_grad()
def encode_latents(cfg: PretrainConfig, vae, images: np.ndarray, batch: int = 256) -> dict[str, torch.Tensor]:
    """Posterior mean and std of every training image, cached in ``latents.safetensors``."""
    path = Path(cfg.out_dir) / "latents.safetensors"
    if path.is_file():
        cached = load_file(path)
        if len(cached["mean"]) == len(images):
            return cached
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encode latents"):
        post = vae.encode(to_model_range(images[i:i + batch])).latent_dist  # float32 per batch: 4x less memory
        means.append(post.mean)
        stds.append(post.std)
    cached = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}
    save_file(cached, path)
    return cached


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


def _append_loss(path: Path, step: int, loss: float, resumed_at: int | None = None) -> None:
    """One row of ``loss.csv``; on resume the rows past the checkpoint's step go (a kill may have left them)."""
    if resumed_at is not None and path.is_file():
        rows = [r for r in path.read_text().splitlines() if r and int(r.split(",")[0]) <= resumed_at]
        path.write_text("".join(r + "\n" for r in rows))
    with open(path, "a") as f:
        f.write(f"{step},{loss:.6f}\n")


def train_unet(cfg: PretrainConfig, pipe, latents: dict, prompts: list[str], accelerator, log,
               on_checkpoint=None) -> dict:
    """UNet + text encoder on cached latents; returns the EMA models. ``on_checkpoint(step, ema_models)``, if
    given, runs after each checkpoint (a study that evaluates the model as it trains)."""
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
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    ema = {key: EMAModel(model.parameters(), decay=cfg.ema_decay) for key, model in models.items()}
    names = {key: [n for n, _ in model.named_parameters()] for key, model in models.items()}
    ckpt = Checkpoint(out / "checkpoints" / "unet")
    start, resumed_at = 0, None
    if ckpt.exists():
        state, tensors = _load(ckpt, [*models, *(f"ema_{k}" for k in models)], opt, sched)
        for key, model in models.items():
            model.load_state_dict(tensors[key])
            ema[key].load_state_dict({"optimization_step": state["ema_step"],
                                      "shadow_params": [tensors[f"ema_{key}"][n] for n in names[key]]})
        start = resumed_at = state["step"]
        log(f"unet: resumed at step {start}")
    if start >= cfg.steps:
        return _ema_models(ema, models)
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
            _save(ckpt, step + 1, tensors, opt, sched, {"loss_last_100": float(np.mean(losses[-100:])),
                                                        "ema_step": ema["unet"].optimization_step})
            _append_loss(out / "loss.csv", step + 1, float(np.mean(losses[-cfg.checkpoint_every:])), resumed_at)
            resumed_at = None
            if on_checkpoint is not None:
                on_checkpoint(step + 1, _ema_models(ema, models))
    return _ema_models(ema, models)


# Settings that do not change the result; a resumed run may differ in them.
_RESUMABLE_DIFFERENCES = ("checkpoint_every", "num_threads", "out_dir")


def pretrain(cfg: PretrainConfig | None = None, tiny_config: TinySDConfig | None = None, log=print,
             on_checkpoint=None):
    """Run (or resume) all three stages; returns the pipeline with EMA weights, saved to
    ``out_dir/pipeline`` as a stock diffusers folder, and a dict of what was measured. ``on_checkpoint``: see
    ``train_unet``."""
    cfg = cfg or PretrainConfig()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    lock = claim(out, asdict(cfg), "pretrain_config.json", "a pretraining run", ignore=_RESUMABLE_DIFFERENCES)
    try:
        return _pretrain(cfg, tiny_config, log, on_checkpoint)
    finally:
        lock.release()


def _pretrain(cfg: PretrainConfig, tiny_config, log, on_checkpoint):
    out = Path(cfg.out_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    timings, t0 = {}, time.perf_counter()
    pipe = build_tiny_sd(seed=cfg.seed, config=tiny_config)
    images, prompts = training_set(cfg)
    timings["data_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    train_vae(cfg, pipe.vae, images, accelerator, log)
    timings["vae_s"] = time.perf_counter() - t
    pipe.vae.eval()
    psnr = vae_psnr(pipe.vae, held_out_images(64, cfg.seed))
    log(f"vae: held-out PSNR {psnr:.2f} dB")

    t = time.perf_counter()
    latents = encode_latents(cfg, pipe.vae, images)
    std = float(latents["mean"].std())
    pipe.vae.register_to_config(scaling_factor=1.0 / std)
    timings["latents_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ema = train_unet(cfg, pipe, latents, prompts, accelerator, log, on_checkpoint)
    timings["unet_s"] = time.perf_counter() - t
    pipe.unet.load_state_dict(ema["unet"].state_dict())  # ship the moving average
    pipe.text_encoder.load_state_dict(ema["text_encoder"].state_dict())
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.unet.to(memory_format=torch.contiguous_format)
    pipe.save_pretrained(out / "pipeline")
    stats = {"vae_psnr_db": psnr, "latent_scaling_factor": 1.0 / std, "n_train_images": len(images),
             "timings_s": timings}
    (out / "pretrain_stats.json").write_text(json.dumps(stats, indent=1))
    return pipe, stats


def main(argv=None) -> dict:
    """``cnkit pretrain --out_dir DIR [--steps N ...]``: every PretrainConfig field is a flag; resumes from ``out_dir``.
    ``make pretrain`` runs notebook 01 instead, which also evaluates the base and writes its card."""
    ap = argparse.ArgumentParser(prog="cnkit pretrain", description=main.__doc__)
    for f in fields(PretrainConfig):
        ap.add_argument(f"--{f.name}", default=None, help=f"default: {f.default!r}")
    args = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    _, stats = pretrain(PretrainConfig(**args))
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
