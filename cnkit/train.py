"""The ControlNet training loop, the paper's way, on Accelerate.

The locked base (VAE, text encoder, UNet) never gets a gradient: its parameters are frozen, and
since nothing upstream of the UNet's encoder requires a gradient, autograd builds no graph there;
only the decoder, where the ControlNet's residuals enter, carries one. The frozen VAE and text
encoder run once per training item and once per distinct prompt (cached), not every step.

The loop is plain and knows nothing of telemetry or validation: like minGPT's ``Trainer`` it fires
events (``on_train_start``, ``on_step_end``, ``on_checkpoint``, ``on_train_end``) and what watches
it is attached from outside with ``add_callback`` (``cnkit.telemetry``).

Step accounting: ``step`` is an optimizer step everywhere. One optimizer step consumes
``gradient_accumulation`` micro-batches of ``batch_size`` on each of ``num_processes`` processes,
so ``samples_seen = step * batch_size * gradient_accumulation * num_processes``.

Every micro-batch's randomness (which items, which noise, timesteps and dropped prompts) is a pure
function of (seed, step, micro-batch, process), so a resumed run replays exactly the batches the
uninterrupted one would have drawn.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import params as _params
from .controlnets import VARIANTS, make_controlnet
from .tiny import vae_scale_factor

# How training timesteps are drawn. "cubic" is T2I-Adapter's (Mou et al. 2023, section 3.4): t = (1 - u^3) T
# puts more of the batch at high noise, where the layout a spatial condition dictates is decided.
TIMESTEP_SAMPLING = ("uniform", "cubic")


@dataclass
class TrainConfig:
    base: str = "data/tiny-sd"  # a local diffusers pipeline folder or a hub id
    dataset: str = "toy:fill"  # anything cnkit.datasets.load reads, or a toy world "toy:fill"
    variant: str = "zero"  # zero (the paper), gaussian, lite
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # per process and micro-batch
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-5  # the paper's AdamW rate
    prompt_dropout: float = 0.5  # share of prompts replaced by "" (the paper: 50%)
    timestep_sampling: str = "uniform"  # uniform (the paper) or cubic (T2I-Adapter: more high-noise steps)
    mixed_precision: str = "no"  # no, fp16, bf16 (Accelerate)
    seed: int = 0  # the ControlNet's initialisation, batch order, noise, timesteps and dropped prompts
    data_seed: int = 0  # which toy-world items are drawn (training and held out); fixed across training seeds
    validate_every: int = 100  # optimizer steps between validations; 0 turns validation off
    checkpoint_every: int = 500  # optimizer steps between checkpoints
    out_dir: str = "runs/controlnet"
    n_train: int = 10000  # items drawn from a toy world (folders use all their items but the validation ones)
    validation_size: int = 32  # held-out conditions per validation (a folder's last items, never trained on)
    resolution: int = 0  # image size; 0 takes the base's (64 for the tiny model, 512 for SD 1.5)
    report_to: str = ""  # "", "tensorboard" or "wandb" (Accelerate trackers)

    def __post_init__(self):
        # papermill and CLIs pass ints for floats and strings for numbers: coerce, or name the problem.
        for f in fields(self):
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            setattr(self, f.name, _params.coerce(f.name, getattr(self, f.name), kind))
        positive = ("steps", "batch_size", "gradient_accumulation", "checkpoint_every", "n_train", "validation_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"parameter {name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.prompt_dropout <= 1:
            raise ValueError(f"parameter prompt_dropout must be within 0..1, got {self.prompt_dropout}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"parameter learning_rate must be within (0, 1), got {self.learning_rate}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; known variants: {', '.join(VARIANTS)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, "
                             f"got {self.timestep_sampling!r}")
        if self.validate_every < 0:
            raise ValueError(f"parameter validate_every must be 0 (off) or more, got {self.validate_every}")

    def samples_per_step(self, num_processes: int = 1) -> int:
        return self.batch_size * self.gradient_accumulation * num_processes


def load_base(base: str, device=None):
    """The locked base pipeline (local folder or hub id), frozen, in eval mode."""
    from diffusers import StableDiffusionPipeline

    path = _params.repo_path(base)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as e:
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


class EncodedDataset:
    """Training items with the frozen encoders already applied: latent posterior (mean, std),
    condition pixels (uint8) and an index into the distinct prompts' embeddings."""

    def __init__(self, latent_mean, latent_std, conditions, prompt_ids, prompt_embeds, empty_embed):
        self.latent_mean, self.latent_std = latent_mean, latent_std
        self.conditions, self.prompt_ids = conditions, prompt_ids
        self.prompt_embeds, self.empty_embed = prompt_embeds, empty_embed

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"latent_mean": self.latent_mean, "latent_std": self.latent_std, "conditions": self.conditions,
                "prompt_ids": self.prompt_ids, "prompt_embeds": self.prompt_embeds, "empty_embed": self.empty_embed}

    @classmethod
    def from_tensors(cls, t: dict) -> EncodedDataset:
        return cls(t["latent_mean"], t["latent_std"], t["conditions"], t["prompt_ids"], t["prompt_embeds"],
                   t["empty_embed"])


def encode_prompts(pipe, prompts: list[str], batch: int = 256) -> torch.Tensor:
    tok = pipe.tokenizer
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            ids = tok(prompts[i:i + batch], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(pipe.text_encoder.device)
            out.append(pipe.text_encoder(ids)[0].float().cpu())
    return torch.cat(out)


class _Head:
    """The first ``n`` items of a dataset (a folder's training part; its tail is for validation)."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds[i]


def is_toy(dataset: str) -> bool:
    return str(dataset).startswith("toy:")


def open_dataset(cfg: TrainConfig, resolution: int):
    """The training items: ``n_train`` toy samples, or a folder's items but its last ``validation_size``."""
    from .datasets import load

    if is_toy(cfg.dataset):
        return load(cfg.dataset, n=cfg.n_train, seed=cfg.data_seed, size=resolution)
    ds = load(cfg.dataset)
    if len(ds) <= cfg.validation_size:
        raise ValueError(f"dataset {cfg.dataset!r} has {len(ds)} items; training keeps the last validation_size="
                         f"{cfg.validation_size} apart for validation: add items or lower validation_size")
    return _Head(ds, len(ds) - cfg.validation_size)


def encode_dataset(pipe, dataset, resolution: int, batch: int = 64, desc: str = "encode") -> EncodedDataset:
    """Run the frozen VAE and text encoder once over ``dataset``; conditions kept as uint8."""
    from PIL import Image

    means, stds, conds, prompts = [], [], [], []
    device = pipe.vae.device
    for i in tqdm(range(0, len(dataset), batch), desc=desc, leave=False):
        items = [dataset[j] for j in range(i, min(i + batch, len(dataset)))]
        imgs, cs = [], []
        for ex in items:
            img, cond = ex.image, ex.condition
            if img.size != (resolution, resolution):
                img = img.resize((resolution, resolution), Image.BICUBIC)
                cond = cond.resize((resolution, resolution), Image.NEAREST)
            imgs.append(np.asarray(img))
            cs.append(np.asarray(cond))
            prompts.append(ex.prompt)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
        with torch.no_grad():
            post = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
        conds.append(torch.from_numpy(np.stack(cs)).permute(0, 3, 1, 2).contiguous())
    distinct = sorted(set(prompts))
    index = {p: i for i, p in enumerate(distinct)}
    return EncodedDataset(torch.cat(means), torch.cat(stds), torch.cat(conds),
                          torch.tensor([index[p] for p in prompts]), encode_prompts(pipe, distinct),
                          encode_prompts(pipe, [""]))


def cached_encoding(cfg: TrainConfig, pipe, resolution: int, cache_dir: Path) -> EncodedDataset:
    """``encode_dataset`` of the training set, cached on disk by what determines it."""
    from safetensors.torch import load_file, save_file

    held_out = 0 if is_toy(cfg.dataset) else cfg.validation_size  # a folder's training part depends on it
    key = hashlib.sha256(json.dumps([str(_params.repo_path(cfg.base)), cfg.dataset, cfg.n_train, cfg.data_seed,
                                     resolution, held_out]).encode()).hexdigest()[:16]
    path = cache_dir / f"encoded-{key}.safetensors"
    from filelock import FileLock

    cache_dir.mkdir(parents=True, exist_ok=True)
    # Runs trained side by side (cnkit.experiments --workers) may need the same set: one encodes it, the
    # others wait for its file instead of encoding it again.
    with FileLock(str(path.with_suffix(".lock"))):
        if path.is_file():
            return EncodedDataset.from_tensors(load_file(path))
        encoded = encode_dataset(pipe, open_dataset(cfg, resolution), resolution, desc="encode training set")
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in encoded.tensors().items()}, tmp)
        tmp.rename(path)
    return encoded


class Trainer:
    """Owns the loop; callbacks watch it. ``Trainer(cfg).run()`` trains, checkpoints and resumes."""

    def __init__(self, cfg: TrainConfig, cache_dir: str | Path | None = None):
        """``cache_dir``: where the encoded training set is kept (default ``out_dir/cache``); runs that
        share one reuse each other's encodings."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else self.out / "cache"
        self.started = time.perf_counter()  # wall clock of this process's part of the run
        # On a machine without an accelerator, `accelerate launch --multi_gpu --num_processes N` (or
        # torchrun) starts N CPU processes; Accelerate only joins them (gloo) when told it runs on the CPU.
        on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
        self.accelerator = Accelerator(
            cpu=on_cpu, mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation,
            log_with=cfg.report_to or None, project_config=ProjectConfiguration(project_dir=str(self.out)))
        self.callbacks = defaultdict(list)
        self.step = 0
        self.loss_history: list[tuple[int, float]] = []
        self.pipe = load_base(cfg.base, device=self.accelerator.device)
        self.resolution = cfg.resolution or self.pipe.unet.config.sample_size * vae_scale_factor(self.pipe.vae)
        self.controlnet = make_controlnet(self.pipe.unet, cfg.variant, vae_scale_factor=vae_scale_factor(self.pipe.vae),
                                          seed=cfg.seed)
        if self.accelerator.device.type == "cpu":
            # oneDNN's convolutions (forward and backward) are ~7% faster on NHWC (bench/train_throughput.py).
            for module in (self.pipe.unet, self.controlnet):
                module.to(memory_format=torch.channels_last)
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)

    # --- events, as minGPT's Trainer -------------------------------------------------------
    def add_callback(self, event: str, fn) -> None:
        self.callbacks[event].append(fn)

    def trigger(self, event: str) -> None:
        for fn in self.callbacks[event]:
            fn(self)

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

    def save_checkpoint(self) -> None:
        """A stock diffusers ControlNet folder (safetensors) plus the optimizer's state and step."""
        if not self.accelerator.is_main_process:
            return
        tmp = self.out / "checkpoint.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.accelerator.unwrap_model(self.controlnet).save_pretrained(tmp, safe_serialization=True)
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({
            "step": self.step, "samples_seen": self.samples_seen, "micro_batches": self.micro_batches,
            "num_processes": self.accelerator.num_processes, "config": asdict(self.cfg),
            "loss_history": self.loss_history}))
        old = self.out / "checkpoint.old"
        if self.checkpoint_dir.exists():
            self.checkpoint_dir.rename(old)
        tmp.rename(self.checkpoint_dir)
        if old.exists():
            import shutil

            shutil.rmtree(old)
        self.trigger("on_checkpoint")

    def load_checkpoint(self) -> bool:
        state_file = self.checkpoint_dir / "trainer_state.json"
        if not state_file.is_file():
            return False
        from safetensors.torch import load_file

        state = json.loads(state_file.read_text())
        changed = {k: (v, getattr(self.cfg, k)) for k, v in state["config"].items()
                   if k not in ("out_dir", "steps", "validate_every", "checkpoint_every", "report_to")
                   and getattr(self.cfg, k) != v}
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{self.out} holds a run with another configuration ({diff}); pass a new out_dir "
                             "or delete that folder to start over")
        self.controlnet.load_state_dict(load_file(self.checkpoint_dir / "diffusion_pytorch_model.safetensors"))
        self.optimizer.load_state_dict(torch.load(self.checkpoint_dir / "optimizer.pt", weights_only=True))
        self.step = state["step"]
        self.loss_history = [tuple(x) for x in state["loss_history"]]
        return True

    # --- the loop ---------------------------------------------------------------------------
    def _micro_batch(self, data: EncodedDataset, micro: int) -> dict[str, torch.Tensor]:
        cfg, acc = self.cfg, self.accelerator
        g = torch.Generator().manual_seed(
            (cfg.seed * 1_000_003 + self.step * 1009 + micro) * 131 + acc.process_index)
        idx = torch.randint(len(data), (cfg.batch_size,), generator=g)
        z0 = data.latent_mean[idx] + data.latent_std[idx] * torch.randn(data.latent_mean[idx].shape, generator=g)
        z0 = z0 * self.pipe.vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=g)
        n_t = self.noise_scheduler.config.num_train_timesteps
        if cfg.timestep_sampling == "cubic":
            t = ((1 - torch.rand(cfg.batch_size, generator=g) ** 3) * n_t).long().clamp_(max=n_t - 1)
        else:
            t = torch.randint(0, n_t, (cfg.batch_size,), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.prompt_dropout
        text = torch.where(drop[:, None, None], data.empty_embed, data.prompt_embeds[data.prompt_ids[idx]])
        return {"noisy": self.noise_scheduler.add_noise(z0, noise, t), "noise": noise, "t": t, "text": text,
                "cond": data.conditions[idx].float().div(255)}

    def loss(self, batch: dict) -> torch.Tensor:
        dev = self.accelerator.device
        noisy, t, text = batch["noisy"].to(dev), batch["t"].to(dev), batch["text"].to(dev)
        with self.accelerator.autocast():
            down, mid = self.controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=batch["cond"].to(dev),
                                        return_dict=False)
            pred = self.pipe.unet(noisy, t, text, down_block_additional_residuals=down,
                                  mid_block_additional_residual=mid).sample
        return F.mse_loss(pred.float(), batch["noise"].to(dev))

    def run(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self.out.mkdir(parents=True, exist_ok=True)
        with acc.main_process_first():
            self.data = cached_encoding(cfg, self.pipe, self.resolution, self.cache_dir)
        self.controlnet.train()
        self.optimizer = torch.optim.AdamW(self.controlnet.parameters(), lr=cfg.learning_rate)
        resumed = self.load_checkpoint()
        self.controlnet, self.optimizer = acc.prepare(self.controlnet, self.optimizer)
        if cfg.report_to:
            acc.init_trackers("cnkit", config={k: v for k, v in asdict(cfg).items()})
        self.resumed = resumed
        self.trigger("on_train_start")
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"controlnet ({cfg.variant})",
                   disable=not acc.is_main_process)
        start = time.perf_counter()
        while self.step < cfg.steps:
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(cfg.gradient_accumulation):
                with acc.accumulate(self.controlnet):
                    loss = self.loss(self._micro_batch(self.data, micro))
                    acc.backward(loss)
                    total += loss.item() / cfg.gradient_accumulation
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"loss became {total} at step {self.step}; stopped. The last good checkpoint (step "
                    f"{self._last_checkpoint_step()}) is in {self.checkpoint_dir}: lower learning_rate or use "
                    "mixed_precision='no', then rerun to resume from it")
            self.optimizer.step()
            self.step += 1
            self.last_loss = total
            self.loss_history.append((self.step, total))
            if cfg.report_to:
                acc.log({"loss": total, "samples_seen": self.samples_seen}, step=self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", samples=self.samples_seen)
            self.trigger("on_step_end")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        self.wall_time_s = time.perf_counter() - start
        self.trigger("on_train_end")
        if cfg.report_to:
            acc.end_training()
        return {"steps": self.step, "samples_seen": self.samples_seen, "micro_batches": self.micro_batches,
                "wall_time_s": self.wall_time_s, "resumed": resumed}

    def _last_checkpoint_step(self) -> int | None:
        f = self.checkpoint_dir / "trainer_state.json"
        return json.loads(f.read_text())["step"] if f.is_file() else None


def main(argv=None) -> dict:
    """``python -m cnkit.train --steps=200 --dataset=toy:fill ...``; the same under
    ``accelerate launch --num_processes 2 -m cnkit.train ...``. Every TrainConfig field is a flag."""
    import argparse

    from .telemetry import Validation, ZeroConvTelemetry

    ap = argparse.ArgumentParser(description="Train a ControlNet (cnkit.train.TrainConfig)")
    for f in fields(TrainConfig):
        ap.add_argument(f"--{f.name}", default=f.default, help=f"default: {f.default!r}")
    args = vars(ap.parse_args(argv))
    trainer = Trainer(TrainConfig(**args))
    ZeroConvTelemetry().attach(trainer)
    Validation().attach(trainer)
    result = trainer.run()
    if trainer.accelerator.is_main_process:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
