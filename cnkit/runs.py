"""Training runs kept by their configuration, so notebooks share them and interrupted ones resume.

``train(cfg, runs_dir)`` trains a ControlNet with telemetry and validation attached, in a folder
named by the configuration (``runs_dir/<variant>-<dataset>-seed<seed>-<hash>``); a second call with
the same configuration finds it finished and only reads it back, and a call after an interruption
resumes from its checkpoint. Notebooks 02, 03 and 04 (and the ablation) therefore train the default
recipe once between them. Encoded training sets are shared too (``runs_dir/cache``).

A finished run folder holds: ``checkpoint/`` (a diffusers ControlNetModel folder), ``telemetry.csv``,
``validation.csv``, ``samples/step-XXXXXX.png`` and ``convergence.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .train import TrainConfig, Trainer

# The kit's recipe for the embedded tiny base (notebooks 02-04 default to it, so they share one run).
# It differs from the paper's in two measured ways (notebook 04 shows the paper's sampling beside it):
# AdamW at 1e-3 (at 3e-4 with uniform timesteps the fill task was still flat after 500 steps), and
# T2I-Adapter's cubic timestep sampling: seed 0 converges at step 175 with it, at 400 without.
RECIPE = {"base": "data/tiny-sd", "dataset": "toy:fill", "variant": "zero", "steps": 600, "batch_size": 32,
          "learning_rate": 1e-3, "timestep_sampling": "cubic", "prompt_dropout": 0.5, "validate_every": 25,
          "validation_size": 32, "n_train": 10000}

# Fidelity a run must keep from some validation on to count as converged, per metric. Disc IoU 0.8
# is the fill issue's bar; edge F1 and mIoU thresholds are where samples visibly follow the map.
THRESHOLDS = {"disc_iou": 0.8, "edge_f1": 0.5, "miou": 0.6}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[-40:] or "dataset"


def run_key(cfg: TrainConfig) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "report_to")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def run_folder(cfg: TrainConfig, runs_dir) -> Path:
    return Path(runs_dir) / f"{cfg.variant}-{_slug(cfg.dataset)}-seed{cfg.seed}-{run_key(cfg)}"


def default_runs_dir(out_dir, runs_dir: str = "") -> Path:
    """Notebooks' ``runs_dir`` parameter: ``""`` means ``runs/`` beside the notebook's ``out_dir``
    (``reports/full/runs`` under ``make figures``), so every notebook of a report shares it."""
    return Path(runs_dir).expanduser() if runs_dir else Path(out_dir).expanduser().resolve().parent / "runs"


def read_table(path: Path) -> dict[str, list]:
    """A csv table as columns of floats (text columns stay text)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}
    for k, values in cols.items():
        try:
            cols[k] = [float(v) if v != "" else float("nan") for v in values]
        except ValueError:
            pass
    return cols


class Run:
    """A finished run folder, read back."""

    def __init__(self, folder):
        self.folder = Path(folder)

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"

    @property
    def convergence(self) -> dict:
        return json.loads((self.folder / "convergence.json").read_text())

    @property
    def config(self) -> dict:
        return self.convergence["config"]

    def telemetry(self) -> dict[str, list]:
        return read_table(self.folder / "telemetry.csv")

    def validation(self) -> dict[str, list]:
        return read_table(self.folder / "validation.csv")

    def loss(self) -> tuple[list[int], list[float]]:
        state = json.loads((self.checkpoint / "trainer_state.json").read_text())
        steps, losses = zip(*state["loss_history"]) if state["loss_history"] else ((), ())
        return list(steps), list(losses)

    def sample_grid(self, step: int) -> Path:
        return self.folder / "samples" / f"step-{int(step):06d}.png"

    def controlnet(self):
        from .generate import load_controlnet

        return load_controlnet(self.checkpoint)


def is_finished(folder: Path, cfg: TrainConfig) -> bool:
    f = folder / "convergence.json"
    return f.is_file() and json.loads(f.read_text()).get("steps") == cfg.steps


def train(cfg: TrainConfig, runs_dir, threshold: float | None = None, validation_prompt: str | None = None,
          log=print) -> Run:
    """Train (or resume, or just read back) the run of ``cfg`` under ``runs_dir``; see the module doc."""
    from .metrics import convergence
    from .telemetry import Validation, ZeroConvTelemetry

    folder = run_folder(cfg, runs_dir)
    cfg = TrainConfig(**{**asdict(cfg), "out_dir": str(folder)})
    if is_finished(folder, cfg):
        log(f"run found, not retrained: {folder}")
        return Run(folder)
    log(f"training into {folder}")
    start = time.perf_counter()
    trainer = Trainer(cfg, cache_dir=Path(runs_dir) / "cache")
    ZeroConvTelemetry().attach(trainer)
    validation = Validation(prompt=validation_prompt).attach(trainer)
    result = trainer.run()
    wall = time.perf_counter() - start
    table = read_table(folder / "validation.csv")
    metric = table["metric"][0] if table.get("metric") else validation.metric_name
    threshold = THRESHOLDS.get(metric, 0.5) if threshold is None else threshold
    report = {
        "metric": metric, **convergence(table["step"], table["fidelity"], threshold),
        "validated_steps": [int(s) for s in table["step"]], "fidelity": table["fidelity"],
        "steps": cfg.steps, "samples_seen": result["samples_seen"], "micro_batches": result["micro_batches"],
        "samples_per_step": cfg.samples_per_step(trainer.accelerator.num_processes),
        "num_processes": trainer.accelerator.num_processes, "threads": torch.get_num_threads(),
        # Wall time of this process: loading, encoding (unless cached), training and validation.
        "wall_time_s": wall, "train_loop_s": result["wall_time_s"], "resumed": result["resumed"],
        "validation_size": len(validation.items), "validation_prompt": validation_prompt,
        "config": asdict(cfg),
    }
    at = report["converged_at_step"]
    report["converged_at_elapsed_s"] = (table["elapsed_s"][table["step"].index(at)]
                                        if at is not None and not result["resumed"] else None)
    (folder / "convergence.json").write_text(json.dumps(report, indent=1))
    return Run(folder)
