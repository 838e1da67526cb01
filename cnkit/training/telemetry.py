"""What watches a ControlNet (or a successor) while it trains: injection-point probes and the validation hook.

Both attach to ``cnkit.training.train.Trainer`` through ``add_callback`` and write tidy tables into the run
folder, so notebooks plot from files:

- ``InjectionTelemetry`` (also named ``ZeroConvTelemetry``) -> ``telemetry.csv``: after every optimizer
  step, one row per injection point, the layers through which control enters the base. For the paper's
  ControlNet those are its zero convolutions, one per connection into the UNet (the 12 skips and the
  middle block), plus one row for the condition encoder's last convolution; for a successor its
  ``ControlAdapter.injection_points()`` (ControlNet-XS's control-to-base convolutions, T2I-Adapter's
  feature blocks, ControlNeXt's cross normalisation). Columns: step, samples seen, point, latent size,
  mean |weight|, weight norm, bias norm, gradient norm, and the RMS of what the point adds on a fixed
  probe batch (fixed items, noise and timesteps, so the number moves only because the weights do).
- ``ConditionProbe`` -> ``signals.csv``: whether the net uses its condition (the denoising loss on a fixed probe
  batch with the true conditions against shuffled and blank ones), every few steps, without generating an image:
  the cheap signal behind the convergence forecast (``cnkit.experiments.forecast``).
- ``Validation`` -> ``validation.csv`` and ``samples/step-XXXXXX.png``: every ``validate_every``
  steps (and at steps 0 and the last), images generated with fixed seeds from fixed held-out
  conditions through ``cnkit.generation.generate.generate_many`` (diffusers' ``StableDiffusionControlNetPipeline``
  for the paper's nets, its text-to-image pipeline around the adapter for the successors), and their
  condition fidelity.

On resume both tables are cut back to the checkpoint's step, so a resumed run's tables equal an
uninterrupted run's: one row per step (per point), whatever kills and reruns happened, a row cut short by a
kill dropped, the table rewritten atomically (``cnkit.files.write_atomic``).
"""

from __future__ import annotations

import csv
import io
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..data.splits import SEED_STREAMS, held_out_items, seeds
from ..files import write_atomic
from ..generation.generate import generate_many
from ..metrics import fidelity_metrics_for
from ..models.controlnets import make_controlnet, zero_convolutions
from ..pixels import condition_range, side_by_side
from ..viz import image_grid

TELEMETRY_FIELDS = ["step", "samples_seen", "connection", "name", "latent_size", "weight_mean_abs", "weight_norm",
                    "bias_norm", "grad_norm", "residual_rms"]


def _truncate_csv(path: Path, step: int, key=("step",)) -> set[int]:
    """Keep the header and the rows of steps <= ``step`` (what a resumed run would have written), one per ``key``
    (the first: a rerun that validated a step again adds nothing), none cut short by a kill; rewritten atomically.
    Returns the steps kept."""
    if not path.is_file():
        return set()
    text = path.read_text()
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return set()
    if rows and not text.endswith("\n"):
        rows = rows[:-1]  # a row cut short
    head, kept, seen = rows[0], [rows[0]], set()
    cols = [head.index(k) for k in key]
    for r in rows[1:]:
        try:
            s = int(r[cols[0]])
        except (ValueError, IndexError):
            continue
        ident = tuple(r[c] for c in cols)
        if len(r) == len(head) and s <= step and ident not in seen:
            seen.add(ident)
            kept.append(r)
    buf = io.StringIO()
    csv.writer(buf).writerows(kept)
    write_atomic(path, buf.getvalue())
    return {int(r[cols[0]]) for r in kept[1:]}


class _Table:
    def __init__(self, path: Path, fields: list[str], key=("step",)):
        self.path, self.fields, self.key = path, fields, key
        self.steps: set[int] = set()  # steps the table holds

    def start(self, step: int) -> None:
        if step == 0 or not self.path.is_file():
            if step > 0:
                warnings.warn(f"{self.path} is missing at step {step}: its rows of the steps before are gone (they "
                              "are measured as the run goes) and it starts again here; to have them all, delete "
                              f"{self.path.parent} and train again from step 0", stacklevel=2)
            buf = io.StringIO()
            csv.DictWriter(buf, self.fields).writeheader()
            write_atomic(self.path, buf.getvalue())
            self.steps = set()
        else:
            self.steps = _truncate_csv(self.path, step, self.key)

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerows(rows)
        self.steps |= {int(r["step"]) for r in rows}


class InjectionTelemetry:
    """Per-step probes of the injection points (see the module docstring): for the paper's ControlNet its 13 zero
    convolutions and the condition encoder's last convolution; for a successor ``adapter.injection_points()``,
    its outputs from ``adapter.injections`` (a point without parameters, like ControlNeXt's cross normalisation,
    has empty weight columns)."""

    def __init__(self, probe_size: int = 4, every: int = 1):
        """``every``: optimizer steps between rows (the probe is a forward pass of the ControlNet)."""
        self.probe_size, self.every = probe_size, every

    def attach(self, trainer) -> InjectionTelemetry:
        trainer.add_callback("on_train_start", self.on_train_start)
        trainer.add_callback("on_step_end", self.on_step_end)
        return self

    def on_train_start(self, trainer) -> None:
        self.table = _Table(trainer.out / "telemetry.csv", TELEMETRY_FIELDS, key=("step", "connection"))
        if trainer.accelerator.is_main_process:
            self.table.start(trainer.step)
        # The probe batch: the first items of the training set at fixed timesteps and noise.
        g = torch.Generator().manual_seed(SEED_STREAMS["telemetry_probe"])
        n = min(self.probe_size, len(trainer.data))
        items = trainer.data.gather(torch.arange(n))
        z0 = items["latent_mean"] * trainer.pipe.vae.config.scaling_factor
        t = torch.linspace(100, 900, n).long()
        noise = torch.randn(z0.shape, generator=g)
        self.probe = {"noisy": trainer.noise_scheduler.add_noise(z0, noise, t), "t": t,
                      "text": items["text"], "cond": condition_range(items["conditions"])}
        # the injection points (and for the paper's net its condition encoder's last convolution)
        self.points = trainer.accelerator.unwrap_model(trainer.adapter).watched_points()
        if trainer.step == 0:
            self.on_step_end(trainer)  # the step-0 row: zero weights, zero residuals

    @torch.no_grad()
    def residuals(self, trainer) -> list[torch.Tensor]:
        """What every point adds on the probe batch now, in ``self.points``' order."""
        adapter = trainer.accelerator.unwrap_model(trainer.adapter)
        dev = trainer.accelerator.device
        p = {k: v.to(dev) for k, v in self.probe.items()}
        was_training = adapter.training
        adapter.eval()
        try:  # under the training step's autocast: with mixed precision the locked UNet is half on a GPU
            with trainer.accelerator.autocast():
                return adapter.watched_outputs(trainer.pipe.unet, p["noisy"], p["t"], p["text"], p["cond"])
        finally:
            adapter.train(was_training)

    def on_step_end(self, trainer) -> None:
        if not trainer.accelerator.is_main_process or trainer.step % self.every:
            return
        residuals = self.residuals(trainer)
        rows = []
        for i, ((name, point), r) in enumerate(zip(self.points, residuals)):
            rows.append({"step": trainer.step, "samples_seen": trainer.samples_seen, "connection": i, "name": name,
                         "latent_size": r.shape[-1], **weight_stats(point),
                         "residual_rms": float(r.float().pow(2).mean().sqrt())})
        self.table.append(rows)


ZeroConvTelemetry = InjectionTelemetry  # the name from before successors were trained; the same table


def weight_stats(point: torch.nn.Module) -> dict:
    """The telemetry's weight columns for one injection point: of its ``weight`` and ``bias`` when it is one layer,
    else of all its parameters (as one "weight"); empty for a point without parameters."""
    params = dict(point.named_parameters())
    if not params:
        return {"weight_mean_abs": "", "weight_norm": "", "bias_norm": "", "grad_norm": ""}
    if "weight" in params:
        w, b = params["weight"].detach(), params.get("bias")
    else:
        w, b = torch.cat([q.detach().flatten() for q in params.values()]), None
    grads = [q.grad.flatten() for q in params.values() if q.grad is not None]
    return {"weight_mean_abs": float(w.abs().mean()), "weight_norm": float(torch.linalg.vector_norm(w)),
            "bias_norm": float(torch.linalg.vector_norm(b.detach())) if b is not None else 0.0,
            "grad_norm": float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0}


SIGNAL_FIELDS = ["step", "samples_seen", "probe_loss_true", "probe_loss_shuffled", "probe_loss_blank",
                 "condition_gap", "condition_gap_rel", "blank_gap", "seconds"]


class ConditionProbe:
    """Whether the net *uses* its condition, measured without generating an image -> ``signals.csv``.

    Every ``every`` optimizer steps, on a fixed probe batch (``size`` training items, empty prompts, fixed noise and
    timesteps spread over the schedule), the controlled UNet's denoising loss is computed three times: with each
    item's own condition, with the conditions shuffled among the items (a derangement: no item keeps its own), and
    with no condition (black). ``condition_gap`` = shuffled minus true: how much the right condition, rather than
    any condition of the same kind, lowers the loss; ``condition_gap_rel`` divides it by the shuffled loss;
    ``blank_gap`` = blank minus true. Three forward passes of the UNet and the adapter, no backward, no sampling: at
    ``size`` 16 one probe costs about 0.8 of a training step of batch 32, so 3.8% of training time every 20 steps
    (the default), 7.6% every 10 (measured: ``bench/forecast_signals.py``).
    Everything but the weights is fixed, so the numbers move only because the net does; a resumed run's table equals
    an uninterrupted one's."""

    def __init__(self, size: int = 16, every: int = 20):
        self.size, self.every = size, every

    def attach(self, trainer) -> ConditionProbe:
        trainer.add_callback("on_train_start", self.on_train_start)
        trainer.add_callback("on_step_end", self.on_step_end)
        return self

    def on_train_start(self, trainer) -> None:
        self.table = _Table(trainer.out / "signals.csv", SIGNAL_FIELDS)
        if trainer.accelerator.is_main_process:
            self.table.start(trainer.step)
        g = torch.Generator().manual_seed(SEED_STREAMS["condition_probe"])
        n = min(self.size, len(trainer.data))
        items = trainer.data.gather(torch.arange(n))
        z0 = items["latent_mean"] * trainer.pipe.vae.config.scaling_factor
        t = torch.linspace(50, 950, n).long()
        noise = torch.randn(z0.shape, generator=g)
        cond = condition_range(items["conditions"])
        shift = torch.roll(torch.arange(n), 1)  # every item gets another's condition
        self.probe = {"noisy": trainer.noise_scheduler.add_noise(z0, noise, t), "t": t, "noise": noise,
                      "text": trainer.data.empty_embed.expand(n, *trainer.data.empty_embed.shape[1:]),
                      "true": cond, "shuffled": cond[shift], "blank": torch.zeros_like(cond)}
        if trainer.step == 0:
            self.on_step_end(trainer)

    @torch.no_grad()
    def losses(self, trainer) -> dict[str, float]:
        adapter = trainer.accelerator.unwrap_model(trainer.adapter)
        dev = trainer.accelerator.device
        p = {k: v.to(dev) for k, v in self.probe.items()}
        was_training = adapter.training
        adapter.eval()
        try:
            out = {}
            with trainer.accelerator.autocast():  # as the training step (a half UNet on a GPU)
                for which in ("true", "shuffled", "blank"):
                    pred = adapter.predict_noise(trainer.pipe.unet, p["noisy"], p["t"], p["text"], p[which])
                    out[which] = float(torch.nn.functional.mse_loss(pred.float(), p["noise"]))
            return out
        finally:
            adapter.train(was_training)

    def on_step_end(self, trainer) -> None:
        if not trainer.accelerator.is_main_process or trainer.step % self.every:
            return
        start = time.perf_counter()
        loss = self.losses(trainer)
        gap = loss["shuffled"] - loss["true"]
        self.last = {"step": trainer.step, "samples_seen": trainer.samples_seen,
                     "probe_loss_true": loss["true"], "probe_loss_shuffled": loss["shuffled"],
                     "probe_loss_blank": loss["blank"], "condition_gap": gap,
                     "condition_gap_rel": gap / loss["shuffled"] if loss["shuffled"] > 0 else 0.0,
                     "blank_gap": loss["blank"] - loss["true"], "seconds": time.perf_counter() - start}
        self.table.append([self.last])


# fidelity is the primary metric (named in "metric"); edge_f1 and miou are filled for the shapes world.
# seconds: this validation's cost; elapsed_s: wall time since the run started, over all its sittings (nan for a run
# resumed from a checkpoint that predates the kit's keeping the earlier sittings' clocks).
VALIDATION_FIELDS = ["step", "samples_seen", "metric", "fidelity", "fidelity_min", "fidelity_max", "edge_f1", "miou",
                     "loss", "seconds", "elapsed_s"]


class Validation:
    """Fixed-seed generations on held-out conditions, their fidelity, and a grid per validation."""

    def __init__(self, n: int | None = None, steps: int | None = None, guidance: float = 3.0, batch: int = 32,
                 every: int | None = None, prompt: str | None = None):
        """``steps``: denoising steps per image (None: the run's ``validation_steps``)."""
        self.n, self.steps, self.guidance, self.batch, self.every = n, steps, guidance, batch, every
        self.prompt = prompt  # None: each item's own prompt; "" tests the condition alone

    def attach(self, trainer) -> Validation:
        trainer.add_callback("on_train_start", self.on_train_start)
        trainer.add_callback("on_step_end", self.on_step_end)
        trainer.add_callback("on_train_end", self.on_train_end)
        return self

    def on_train_start(self, trainer) -> None:
        self.every = self.every if self.every is not None else trainer.cfg.validate_every
        self.steps = self.steps if self.steps is not None else trainer.cfg.validation_steps
        self.table = _Table(trainer.out / "validation.csv", VALIDATION_FIELDS)
        (trainer.out / "samples").mkdir(exist_ok=True)
        # Held-out conditions: toy worlds draw past the training range; folders use their last items.
        cfg = trainer.cfg
        self.items = held_out_items(cfg.dataset, self.n or cfg.validation_size, trainer.resolution, cfg.data_seed,
                                    cfg.validation_size, cfg.resize_mode)
        self.metrics = fidelity_metrics_for(trainer.cfg.dataset, with_truth=hasattr(self.items[0], "sample"))
        self.metric_name = next(iter(self.metrics))
        if trainer.accelerator.is_main_process:
            self.table.start(trainer.step)
            if trainer.step == 0 and self.every:
                self.validate(trainer)

    def on_step_end(self, trainer) -> None:
        if self.every and trainer.step % self.every == 0 and trainer.step < trainer.cfg.steps and self.open(trainer):
            self.validate(trainer)

    @staticmethod
    def open(trainer) -> bool:
        """The gate: always open, but with ``validate_on="forecast"`` only once the run's forecast has fired."""
        forecast = getattr(trainer, "forecast", None)
        return getattr(trainer.cfg, "validate_on", "schedule") != "forecast" or (
            forecast is not None and forecast.wants_validation(trainer))

    def on_train_end(self, trainer) -> None:
        if self.every and trainer.step not in self.table.steps:  # a finished run entered again validates nothing
            self.validate(trainer)

    def images(self, trainer) -> np.ndarray:
        """The held-out items' images with the net as it is now: fixed seeds (the validation stream)."""
        net = trainer.accelerator.unwrap_model(trainer.adapter)  # generate takes any architecture's adapter
        was_training = net.training
        net.eval()
        prompts = [self.prompt if self.prompt is not None else it.prompt for it in self.items]
        with trainer.accelerator.autocast():  # with mixed precision on a GPU: half UNet, fp32 net and VAE
            images = generate_many(trainer.pipe, prompts, [[it.condition] for it in self.items], [net],
                                   seeds("validation", len(self.items)), steps=self.steps, guidance=self.guidance,
                                   batch=self.batch, size=trainer.resolution,
                                   progress=f"validation at step {trainer.step} ({len(self.items)} images)")
        net.train(was_training)
        return images

    def validate(self, trainer) -> None:
        if not trainer.accelerator.is_main_process:
            return
        start = time.perf_counter()
        images = self.images(trainer)
        scores = {name: [fn(img, it) for img, it in zip(images, self.items)] for name, fn in self.metrics.items()}
        primary = scores[self.metric_name]
        k = min(8, len(images))
        fig = image_grid([[side_by_side(it.condition) for it in self.items[:k]], list(images[:k])], cell=1.0)
        fig.savefig(trainer.out / "samples" / f"step-{trainer.step:06d}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        loss = getattr(trainer, "last_loss", float("nan"))
        row = {"step": trainer.step, "samples_seen": trainer.samples_seen, "metric": self.metric_name,
               "fidelity": float(np.mean(primary)), "fidelity_min": float(np.min(primary)),
               "fidelity_max": float(np.max(primary)),
               **{k: float(np.mean(scores[k])) if k in scores else "" for k in ("edge_f1", "miou")},
               "loss": loss, "seconds": time.perf_counter() - start, "elapsed_s": trainer.elapsed()}
        self.table.append([row])
        trainer.last_validation = row
        trainer.trigger("on_validation")


# --- reading the growth (notebook 03) ---------------------------------------------------------


def step0_facts(pipe, variant: str = "zero", seed: int = 0) -> dict:
    """The paper's step-0 argument, measured: a fresh ControlNet of ``variant`` on the locked base, one random
    batch: how far the controlled UNet's noise prediction is from the base's, and which parameters one backward
    pass of the training loss reaches (for ``zero``: only the zero convolutions, output equal to the base)."""
    net = make_controlnet(pipe, variant, seed=seed)
    size, factor = pipe.unet.config.sample_size, pipe.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([100, 400, 700, 900])
    noisy = torch.randn(len(t), pipe.unet.config.in_channels, size, size, generator=g)
    text = torch.randn(len(t), pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim, generator=g)
    cond = (torch.rand(len(t), 3, size * factor, size * factor, generator=g) > 0.9).float()
    target = torch.randn(noisy.shape, generator=g)
    down, mid = net(noisy, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
    with torch.no_grad():
        plain = pipe.unet(noisy, t, text).sample
    controlled = pipe.unet(noisy, t, text, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample
    torch.nn.functional.mse_loss(controlled, target).backward()
    zero_names = {f"{name}.{p}" for name, _ in zero_convolutions(net) for p in ("weight", "bias")}
    with_grad = sorted(n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().max() > 0)
    return {
        "variant": variant,
        "max_abs_difference_from_base": (controlled - plain).detach().abs().max().item(),
        "residual_max_abs": max(r.detach().abs().max().item() for r in [*down, mid]),
        "parameter_tensors": sum(1 for _ in net.parameters()),
        "tensors_with_nonzero_gradient": len(with_grad),
        "all_of_them_zero_convolutions": set(with_grad) <= zero_names,
        "zero_convolution_tensors": len(zero_names),
        "base_parameters_with_gradient": sum(p.grad is not None for p in pipe.unet.parameters()),
        "tensors": with_grad,
    }


def growth_summary(telemetry: dict) -> dict:
    """From a run's ``telemetry.csv`` (columns): per latent size (and the condition encoder), the connections
    and their mean residual RMS and mean |weight| at the last step; the first step each connection's weight
    left zero; the last step and the rows per step."""
    conn = np.asarray(telemetry["connection"], int)
    steps = np.asarray(telemetry["step"])
    last = steps == steps.max()
    by_size: dict = {}
    for c in sorted(set(conn)):
        row = np.flatnonzero(last & (conn == c))[0]
        key = "condition_encoder" if "cond" in telemetry["name"][row] else str(int(telemetry["latent_size"][row]))
        by_size.setdefault(key, []).append((int(c), telemetry["residual_rms"][row], telemetry["weight_mean_abs"][row]))
    first_moved = {}
    for c in sorted(set(conn)):
        w = np.asarray(telemetry["weight_mean_abs"])[conn == c]
        first_moved[int(c)] = int(steps[conn == c][np.argmax(w > 0)]) if (w > 0).any() else None
    return {"by_latent_size": {k: {"connections": [r[0] for r in v],
                                   "residual_rms_mean": float(np.mean([r[1] for r in v])),
                                   "weight_mean_abs_mean": float(np.mean([r[2] for r in v]))}
                               for k, v in by_size.items()},
            "first_step_with_nonzero_weight": first_moved, "steps": int(steps.max()), "rows_per_step": int(last.sum())}


def injected_rms(telemetry: dict) -> tuple[list[int], list[float]]:
    """From a run's ``telemetry.csv`` (columns): per step, the RMS over the injection points of what each adds to
    the base on the probe batch (a ControlNet's condition-encoder row is not an injection into the base and is
    left out). One number per step that any architecture has, so their growth can be drawn side by side."""
    steps = np.asarray(telemetry["step"], int)
    rms = np.asarray(telemetry["residual_rms"], float)
    into_base = np.array(["controlnet_cond_embedding" not in n for n in telemetry["name"]])
    out_steps = sorted(set(steps.tolist()))
    return out_steps, [float(np.sqrt(np.mean(rms[(steps == s) & into_base] ** 2))) for s in out_steps]
