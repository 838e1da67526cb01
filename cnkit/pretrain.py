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

The fill world's held-out colour pairs (``HELD_OUT_FILL_PAIRS``) never appear in training, so the
evaluation can use prompts the model never saw. Runs on Accelerate (mixed precision and devices
come from it); each stage checkpoints to safetensors and resumes after an interruption with the
same batches and noise it would have drawn (every step's randomness derives from (seed, step)).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import toyworld
from .tiny import TinySDConfig, build_tiny_sd

# One unseen background per fill colour: fill i with background i+3 (mod 8). Never trained on.
HELD_OUT_FILL_PAIRS = tuple((toyworld.COLOUR_NAMES[i], toyworld.COLOUR_NAMES[(i + 3) % 8]) for i in range(8))


@dataclass
class PretrainConfig:
    out_dir: str = "outputs/tiny-sd"
    seed: int = 0
    n_fill: int = 20000  # training images of the fill world (held-out colour pairs excluded)
    n_shapes: int = 60000  # training images of the shapes world
    vae_steps: int = 3000
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    vae_crop: int = 32  # pixels; 0 trains on whole images
    steps: int = 20000  # UNet + text encoder optimizer steps
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    empty_prompt: float = 0.1  # share of prompts replaced by "" (classifier-free guidance)
    snr_gamma: float = 5.0  # Min-SNR weighting; 0 turns it off
    ema_decay: float = 0.999
    checkpoint_every: int = 1000
    mixed_precision: str = "no"
    num_threads: int = 0  # CPU threads for torch; 0 leaves torch's default


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


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


class _Checkpoint:
    """A stage's resumable state: model weights in safetensors, the optimizer's tensors in a
    ``torch.save`` file read back with ``weights_only=True``, the step in JSON."""

    def __init__(self, folder: Path):
        self.folder = folder

    def exists(self) -> bool:
        return (self.folder / "state.json").is_file()

    def save(self, step: int, models: dict, optimizer, scheduler=None, extra: dict | None = None) -> None:
        tmp = self.folder.with_name(self.folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, model in models.items():
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / f"{name}.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step} | (extra or {})))
        if self.folder.exists():  # replace atomically enough: never leave a half-written checkpoint
            old = self.folder.with_name(self.folder.name + ".old")
            self.folder.rename(old)
            tmp.rename(self.folder)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            tmp.rename(self.folder)

    def load(self, models: dict, optimizer, scheduler=None) -> dict:
        for name, model in models.items():
            model.load_state_dict(load_file(self.folder / f"{name}.safetensors"))
        optimizer.load_state_dict(torch.load(self.folder / "optimizer.pt", weights_only=True))
        if scheduler is not None:
            scheduler.load_state_dict(torch.load(self.folder / "scheduler.pt", weights_only=True))
        return json.loads((self.folder / "state.json").read_text())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def held_out_images(n: int = 64, seed: int = 0) -> np.ndarray:
    """Toy images never used in training (indices far past the training range), both worlds."""
    return np.stack([toyworld.sample("fill" if i % 3 == 0 else "shapes", 10**7 + i, seed=seed).image
                     for i in range(n)])


@torch.no_grad()
def vae_psnr(vae, images: np.ndarray, batch: int = 64) -> float:
    """Mean reconstruction PSNR (dB) of the VAE (posterior mean) on uint8 images."""
    x = _to_tensor(images)
    scores = [_psnr(vae.decode(vae.encode(x[i:i + batch]).latent_dist.mean).sample, x[i:i + batch])
              for i in range(0, len(x), batch)]
    return float(torch.cat(scores).mean())


def train_vae(cfg: PretrainConfig, vae, images: np.ndarray, accelerator, log) -> dict:
    out = Path(cfg.out_dir)
    ckpt = _Checkpoint(out / "checkpoints" / "vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate, weight_decay=0.0)
    start = 0
    if ckpt.exists():
        start = ckpt.load({"vae": vae}, opt)["step"]
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
        lr = cfg.vae_learning_rate * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))  # cosine to 0
        for group in opt.param_groups:
            group["lr"] = lr
        x = _to_tensor(images[torch.randint(len(images), (cfg.vae_batch_size,), generator=g).numpy()])
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
                                     f"is in {ckpt.folder}. Lower vae_learning_rate and rerun to resume.")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            ckpt.save(step + 1, {"vae": accelerator.unwrap_model(model)}, opt)
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
        post = vae.encode(_to_tensor(images[i:i + batch])).latent_dist  # float32 per batch: 4x less memory
        means.append(post.mean)
        stds.append(post.std)
    cached = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}
    save_file(cached, path)
    return cached


def _min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr if gamma > 0 else torch.ones_like(snr)


def train_unet(cfg: PretrainConfig, pipe, latents: dict, prompts: list[str], accelerator, log,
               on_checkpoint=None) -> dict:
    """UNet + text encoder on cached latents; returns the EMA models. ``on_checkpoint(step, ema)``, if
    given, runs after each checkpoint (a study that evaluates the model as it trains)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    out = Path(cfg.out_dir)
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    ema = {"unet": copy.deepcopy(unet).requires_grad_(False),
           "text_encoder": copy.deepcopy(text_encoder).requires_grad_(False)}
    ckpt = _Checkpoint(out / "checkpoints" / "unet")
    start = 0
    if ckpt.exists():
        start = ckpt.load({"unet": unet, "text_encoder": text_encoder, "ema_unet": ema["unet"],
                           "ema_text_encoder": ema["text_encoder"]}, opt, sched)["step"]
        log(f"unet: resumed at step {start}")
    if start >= cfg.steps:
        return ema
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
                                     f"is in {ckpt.folder}. Lower learning_rate and rerun to resume.")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for key, model in (("unet", unet), ("text_encoder", text_encoder)):
                for e, p in zip(ema[key].parameters(), accelerator.unwrap_model(model).parameters()):
                    e.lerp_(p.detach().to(e.device), 1 - decay)
        losses.append(per_sample.mean().item())
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            ckpt.save(step + 1, {"unet": accelerator.unwrap_model(unet),
                                 "text_encoder": accelerator.unwrap_model(text_encoder),
                                 "ema_unet": ema["unet"], "ema_text_encoder": ema["text_encoder"]}, opt, sched,
                      {"loss_last_100": float(np.mean(losses[-100:]))})
            with open(out / "loss.csv", "a") as f:
                f.write(f"{step + 1},{np.mean(losses[-cfg.checkpoint_every:]):.6f}\n")
            if on_checkpoint is not None:
                on_checkpoint(step + 1, ema)
    return ema


# Settings that do not change the result; a resumed run may differ in them.
_RESUMABLE_DIFFERENCES = {"checkpoint_every", "num_threads", "out_dir"}


def _check_same_recipe(path: Path, cfg: PretrainConfig) -> None:
    """Resuming from checkpoints of another recipe would silently mix two runs: refuse instead."""
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    changed = {k: (before.get(k), v) for k, v in asdict(cfg).items()
               if k not in _RESUMABLE_DIFFERENCES and before.get(k) != v}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"{path.parent} holds a pretraining run with another recipe ({diff}); pass a new "
                         "out_dir, or delete that folder to start over")


def pretrain(cfg: PretrainConfig, tiny_config: TinySDConfig | None = None, log=print):
    """Run (or resume) all three stages; returns the pipeline with EMA weights, saved to
    ``out_dir/pipeline`` as a stock diffusers folder, and a dict of what was measured."""
    from accelerate import Accelerator

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(out / "pretrain_config.json", cfg)
    (out / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=1))
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
    ema = train_unet(cfg, pipe, latents, prompts, accelerator, log)
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
