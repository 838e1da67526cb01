"""What watches a ControlNet while it trains: zero-convolution probes and the validation hook.

Both attach to ``cnkit.train.Trainer`` through ``add_callback`` and write tidy tables into the run
folder, so notebooks plot from files:

- ``ZeroConvTelemetry`` -> ``telemetry.csv``: after every optimizer step, one row per connection
  into the UNet (the 12 skips and the middle block) and one for the condition encoder's last
  convolution: step, samples seen, connection, latent size, mean |weight|, weight norm, bias norm,
  gradient norm, and the RMS of the residual it adds on a fixed probe batch (fixed items, noise
  and timesteps, so the number moves only because the weights do).
- ``Validation`` -> ``validation.csv`` and ``samples/step-XXXXXX.png``: every ``validate_every``
  steps (and at steps 0 and the last), images generated with fixed seeds from fixed held-out
  conditions by diffusers' ``StableDiffusionControlNetPipeline``, and their condition fidelity.

On resume both tables are cut back to the checkpoint's step, so a resumed run's tables equal an
uninterrupted run's.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from .controlnets import zero_convolutions

TELEMETRY_FIELDS = ["step", "samples_seen", "connection", "name", "latent_size", "weight_mean_abs", "weight_norm",
                    "bias_norm", "grad_norm", "residual_rms"]


def _truncate_csv(path: Path, step: int) -> None:
    """Keep the header and the rows of steps <= ``step`` (what a resumed run would have written)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    col = rows[0].index("step")
    kept = [rows[0]] + [r for r in rows[1:] if int(r[col]) <= step]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(kept)


class _Table:
    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields

    def start(self, step: int) -> None:
        if step == 0 or not self.path.is_file():
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, self.fields).writeheader()
        else:
            _truncate_csv(self.path, step)

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerows(rows)


class ZeroConvTelemetry:
    """Per-step probes of the zero convolutions (see the module docstring)."""

    def __init__(self, probe_size: int = 4):
        self.probe_size = probe_size

    def attach(self, trainer) -> ZeroConvTelemetry:
        trainer.add_callback("on_train_start", self.on_train_start)
        trainer.add_callback("on_step_end", self.on_step_end)
        return self

    def on_train_start(self, trainer) -> None:
        self.table = _Table(trainer.out / "telemetry.csv", TELEMETRY_FIELDS)
        if trainer.accelerator.is_main_process:
            self.table.start(trainer.step)
        # The probe batch: the first items of the training set at fixed timesteps and noise.
        data, g = trainer.data, torch.Generator().manual_seed(12345)
        n = min(self.probe_size, len(data))
        z0 = data.latent_mean[:n] * trainer.pipe.vae.config.scaling_factor
        t = torch.linspace(100, 900, n).long()
        noise = torch.randn(z0.shape, generator=g)
        self.probe = {"noisy": trainer.noise_scheduler.add_noise(z0, noise, t), "t": t,
                      "text": data.prompt_embeds[data.prompt_ids[:n]], "cond": data.conditions[:n].float().div(255)}
        net = trainer.accelerator.unwrap_model(trainer.controlnet)
        self.convs = zero_convolutions(net, include_condition_encoder=True)
        if trainer.step == 0:
            self.on_step_end(trainer)  # the step-0 row: zero weights, zero residuals

    @torch.no_grad()
    def residuals(self, trainer) -> list[torch.Tensor]:
        net = trainer.accelerator.unwrap_model(trainer.controlnet)
        dev = trainer.accelerator.device
        p = self.probe
        was_training = net.training
        net.eval()
        down, mid = net(p["noisy"].to(dev), p["t"].to(dev), encoder_hidden_states=p["text"].to(dev),
                        controlnet_cond=p["cond"].to(dev), return_dict=False)
        cond_embedding = net.controlnet_cond_embedding(p["cond"].to(dev))
        net.train(was_training)
        return [*down, mid, cond_embedding]

    def on_step_end(self, trainer) -> None:
        if not trainer.accelerator.is_main_process:
            return
        residuals = self.residuals(trainer)
        rows = []
        for i, ((name, conv), r) in enumerate(zip(self.convs, residuals)):
            w, b = conv.weight.detach(), conv.bias.detach()
            grads = [p.grad.flatten() for p in (conv.weight, conv.bias) if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0
            rows.append({"step": trainer.step, "samples_seen": trainer.samples_seen, "connection": i, "name": name,
                         "latent_size": r.shape[-1], "weight_mean_abs": float(w.abs().mean()),
                         "weight_norm": float(torch.linalg.vector_norm(w)),
                         "bias_norm": float(torch.linalg.vector_norm(b)), "grad_norm": grad_norm,
                         "residual_rms": float(r.float().pow(2).mean().sqrt())})
        self.table.append(rows)


# fidelity is the primary metric (named in "metric"); edge_f1 and miou are filled for the shapes world.
# seconds: this validation's cost; elapsed_s: wall time since the run (this process) started.
VALIDATION_FIELDS = ["step", "samples_seen", "metric", "fidelity", "fidelity_min", "fidelity_max", "edge_f1", "miou",
                     "loss", "seconds", "elapsed_s"]


class Validation:
    """Fixed-seed generations on held-out conditions, their fidelity, and a grid per validation."""

    def __init__(self, n: int | None = None, steps: int = 20, guidance: float = 3.0, batch: int = 32,
                 every: int | None = None, prompt: str | None = None):
        self.n, self.steps, self.guidance, self.batch, self.every = n, steps, guidance, batch, every
        self.prompt = prompt  # None: each item's own prompt; "" tests the condition alone

    def attach(self, trainer) -> Validation:
        trainer.add_callback("on_train_start", self.on_train_start)
        trainer.add_callback("on_step_end", self.on_step_end)
        trainer.add_callback("on_train_end", self.on_train_end)
        return self

    def on_train_start(self, trainer) -> None:
        from .metrics import fidelity_metrics_for

        self.every = self.every if self.every is not None else trainer.cfg.validate_every
        self.table = _Table(trainer.out / "validation.csv", VALIDATION_FIELDS)
        (trainer.out / "samples").mkdir(exist_ok=True)
        # Held-out conditions: toy worlds draw past the training range; folders use their last items.
        self.items = held_out_items(trainer.cfg, trainer.resolution, self.n or trainer.cfg.validation_size)
        self.metrics = fidelity_metrics_for(trainer.cfg.dataset, with_truth=hasattr(self.items[0], "sample"))
        self.metric_name = next(iter(self.metrics))
        if trainer.accelerator.is_main_process:
            self.table.start(trainer.step)
            if trainer.step == 0 and self.every:
                self.validate(trainer)

    def on_step_end(self, trainer) -> None:
        if self.every and trainer.step % self.every == 0 and trainer.step < trainer.cfg.steps:
            self.validate(trainer)

    def on_train_end(self, trainer) -> None:
        if self.every:
            self.validate(trainer)

    def generate(self, trainer) -> np.ndarray:
        from diffusers import StableDiffusionControlNetPipeline

        net = trainer.accelerator.unwrap_model(trainer.controlnet)
        # diffusers' pipeline knows ControlNetModel by class; other nets (lite) go in as a one-net list.
        from diffusers import ControlNetModel

        single = isinstance(net, ControlNetModel)
        pipe = StableDiffusionControlNetPipeline(**trainer.pipe.components, controlnet=net if single else [net],
                                                 requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        was_training = net.training
        net.eval()
        out = []
        for i in range(0, len(self.items), self.batch):
            chunk = self.items[i:i + self.batch]
            prompts = [self.prompt if self.prompt is not None else it.prompt for it in chunk]
            gens = [torch.Generator().manual_seed(1000 + i + k) for k in range(len(chunk))]
            conditions = [it.condition for it in chunk]
            # A multi-net pipeline takes one list per batch item, with one condition per net.
            images = pipe(prompts, image=conditions if single else [[c] for c in conditions],
                          num_inference_steps=self.steps, guidance_scale=self.guidance, generator=gens,
                          output_type="np").images
            out.append((images * 255).round().astype(np.uint8))
        net.train(was_training)
        return np.concatenate(out)

    def validate(self, trainer) -> None:
        if not trainer.accelerator.is_main_process:
            return
        import time

        from .viz import image_grid

        start = time.perf_counter()
        images = self.generate(trainer)
        scores = {name: [fn(img, it) for img, it in zip(images, self.items)] for name, fn in self.metrics.items()}
        primary = scores[self.metric_name]
        k = min(8, len(images))
        fig = image_grid([[np.asarray(it.condition) for it in self.items[:k]], list(images[:k])], cell=1.0)
        fig.savefig(trainer.out / "samples" / f"step-{trainer.step:06d}.png", dpi=100, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        loss = getattr(trainer, "last_loss", float("nan"))
        self.table.append([{"step": trainer.step, "samples_seen": trainer.samples_seen, "metric": self.metric_name,
                            "fidelity": float(np.mean(primary)), "fidelity_min": float(np.min(primary)),
                            "fidelity_max": float(np.max(primary)),
                            **{k: float(np.mean(scores[k])) if k in scores else "" for k in ("edge_f1", "miou")},
                            "loss": loss, "seconds": time.perf_counter() - start,
                            "elapsed_s": time.perf_counter() - trainer.started}])


def held_out_items(cfg, resolution: int, n: int) -> list:
    """``n`` conditions a run of ``cfg`` (a TrainConfig) never trains on, at ``resolution``."""
    from .datasets import load

    if cfg.dataset.startswith("toy:"):
        # Indices past every training index of the same seed: conditions the net never saw.
        ds = load(cfg.dataset, n=n, seed=cfg.data_seed, size=resolution, offset=10**7)
        return [_ToyItem(ds, i) for i in range(n)]
    ds = load(cfg.dataset)  # the last validation_size items, which training leaves out (train.open_dataset)
    return [ds[i] for i in range(len(ds) - min(n, cfg.validation_size), len(ds))]


def held_out_toy(dataset: str, n: int, size: int, data_seed: int = 0) -> list:
    """``n`` held-out items of a toy dataset at ``size``: the ones any run with ``data_seed`` validates on."""
    from types import SimpleNamespace

    return held_out_items(SimpleNamespace(dataset=dataset, data_seed=data_seed, validation_size=n), size, n)


class _ToyItem:
    """A held-out toy sample seen as an Example (image, condition, prompt) that keeps its truth."""

    def __init__(self, ds, i):
        s = ds.sample(i)
        ex = ds[i]
        self.image, self.condition, self.prompt, self.truth = ex.image, ex.condition, ex.prompt, s.truth
        self.sample = s
