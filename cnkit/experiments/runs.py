"""Training runs kept by their configuration, so notebooks share them and interrupted ones resume.

``train(cfg, runs_dir)`` trains a ControlNet with telemetry and validation attached, in a folder
named by the configuration (``runs_dir/<variant>-<dataset>-seed<seed>-<hash>``); a second call with
the same configuration finds it finished and only reads it back, and a call after an interruption
resumes from its checkpoint. Notebooks 02, 03 and 04 (and the ablation) therefore train the default
recipe (``TrainConfig()``) once between them. Encoded training sets are shared too (``runs_dir/cache``).

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

from ..files import write_json
from ..metrics import CONVERGENCE_THRESHOLDS, convergence
from ..models import architectures
from ..models.bases import load_pipeline, weights_identity
from ..params import REPO_ROOT
from ..training.train import LATER_SETTINGS, TrainConfig, Trainer, attach_watchers

THRESHOLDS = CONVERGENCE_THRESHOLDS  # the name notebooks use
# where `make figures` (cnkit figures --profile full) trains the figures' runs: make controlnets and make forecast-runs
# read them there
FIGURE_RUNS = REPO_ROOT / "reports" / "full" / "runs"


def _slug(text: str) -> str:
    """A dataset named for a folder: its last 40 letters, digits and single dashes (no dash at either end)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[-40:].strip("-") or "dataset"


# Settings that change where a run is written or what watches it, never its numbers (the live forecast only reads
# the probe; validate_on and stop_after_convergence, which act on it, do count).
NOT_IDENTITY = ("out_dir", "report_to", "num_workers", "signals_every", "forecast")


def run_key(cfg: TrainConfig) -> str:
    """A run's identity: every setting that changes its numbers (settings added later count only when set), the
    base by what its files hold (``weights_identity``), not by its name: runs on a base since republished in place
    are not reused, and runs on one base under another name are."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY
                and not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}
    settings["base"] = weights_identity(cfg.base)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def run_folder(cfg: TrainConfig, runs_dir) -> Path:
    """``<variant or architecture>-<dataset>-seed<seed>-<key>``: the paper's net is named by its variant (zero,
    gaussian, lite), a successor by its architecture."""
    kind = cfg.variant if cfg.architecture == "controlnet" else cfg.architecture
    return Path(runs_dir) / f"{kind}-{_slug(cfg.dataset)}-seed{cfg.seed}-{run_key(cfg)}"


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

    @property
    def architecture(self) -> str:
        return self.config.get("architecture", "controlnet")

    def controlnet(self):
        """The trained net, as its architecture's adapter (``cnkit.models.architectures.load``, what ``cnkit.generate``
        takes): ``.net`` is the model the checkpoint holds, which the matching diffusers class loads
        (``ControlNetModel`` for the paper's net)."""
        if not any(self.checkpoint.glob("*.safetensors")):
            how = ("cnkit.experiments.runs.train(cfg, runs_dir) trains it again from step 0 (it notices the missing "
                   "checkpoint)" if not (self.checkpoint / "trainer_state.json").is_file() else
                   f"delete {self.folder} and call cnkit.experiments.runs.train(cfg, runs_dir) to train it again "
                   "(from step 0), or run `make architectures`")
            raise FileNotFoundError(
                f"run {self.folder.name} has no weights in {self.checkpoint} (deleted, or a shipped successor run: "
                f"those keep seed 0's and the union net's only, cnkit.experiments.bench_runs): {how}")
        name = self.config.get("architecture", "controlnet")
        if not architectures.architecture(name).needs_base_to_load:
            return architectures.load(self.checkpoint)
        # a Control-LoRA's copy of the encoder is rebuilt from its base's UNet. A shipped run names its base
        # relative to the checkout (card.portable), so a relative name is read from there
        base = self.config["base"]
        if not Path(base).is_absolute() and (REPO_ROOT / base).exists():
            base = REPO_ROOT / base
        return architectures.load(self.checkpoint, load_pipeline(base).unet)

    def curve(self, label: str, **style) -> dict:
        """The run's validation fidelity and loss, as ``viz.convergence_figure`` draws one curve."""
        val, (loss_steps, loss) = self.validation(), self.loss()
        return {"label": label, "steps": val["step"], "fidelity": val["fidelity"],
                "converged_at_step": self.convergence["converged_at_step"], "loss_steps": loss_steps, "loss": loss,
                **style}

    def key_steps(self) -> list[tuple[str, int]]:
        """Validated steps worth showing: before the rise, at the detected convergence, the end (or start, middle
        and end when fidelity never settled above the threshold)."""
        c = self.convergence
        validated, at, rise = c["validated_steps"], c["converged_at_step"], c["step_10pct"]
        if not validated:
            return []  # trained with validate_every=0
        if at is None or rise is None:
            return [("start", validated[0]), ("middle", validated[len(validated) // 2]), ("end", validated[-1])]
        before = max([s for s in validated if s < rise], default=validated[0])
        return [("before the rise", before), ("at the detected step", at), ("end", validated[-1])]


def is_finished(folder: Path, cfg: TrainConfig) -> bool:
    """Does ``folder`` hold the finished run of ``cfg`` (its convergence.json, whole, for ``cfg.steps``)? One cut
    short by hand is not finished: ``train`` writes it again from the run's tables."""
    f = folder / "convergence.json"
    try:
        return f.is_file() and json.loads(f.read_text()).get("steps") == cfg.steps
    except (OSError, ValueError, AttributeError):
        return False


def find(cfg: TrainConfig, runs_dir) -> Run | None:
    """The finished run of ``cfg`` under ``runs_dir``, or None (nothing there, or not finished)."""
    folder = run_folder(cfg, runs_dir)
    return Run(folder) if is_finished(folder, cfg) else None


def train(cfg: TrainConfig, runs_dir, threshold: float | None = None, validation_prompt: str | None = None,
          log=print) -> Run:
    """Train (or resume, or just read back) the run of ``cfg`` under ``runs_dir``; see the module doc."""
    found = find(cfg, runs_dir)
    if found is not None and not (found.checkpoint / "trainer_state.json").is_file():
        log(f"run found without its checkpoint (deleted?): training it again from step 0 in {found.folder}")
        (found.folder / "convergence.json").unlink()
        found = None
    if found is not None:
        log(f"run found, not retrained: {found.folder}")
        return found
    folder = run_folder(cfg, runs_dir)
    cfg = TrainConfig(**{**asdict(cfg), "out_dir": str(folder)})
    log(f"training into {folder}")
    start = time.perf_counter()
    trainer = Trainer(cfg, cache_dir=Path(runs_dir) / "cache")
    validation = attach_watchers(trainer, validation_prompt)
    result = trainer.run()
    wall = time.perf_counter() - start
    table = read_table(folder / "validation.csv")
    metric = table["metric"][0] if table.get("metric") else validation.metric_name
    threshold = THRESHOLDS.get(metric, 0.5) if threshold is None else threshold
    steps, fidelity = table.get("step", []), table.get("fidelity", [])  # none with validate_every=0
    measured = (convergence(steps, fidelity, threshold) if steps else
                {"fidelity_initial": None, "fidelity_final": None, "fidelity_max": None, "threshold": threshold,
                 "converged_at_step": None, "abruptness": None, "step_10pct": None, "step_90pct": None})
    report = {
        "metric": metric, **measured,
        "validated_steps": [int(s) for s in steps], "fidelity": fidelity,
        "steps": cfg.steps, "steps_trained": result["steps"], "stopped": result.get("stopped"),
        "samples_seen": result["samples_seen"], "micro_batches": result["micro_batches"],
        "samples_per_step": cfg.samples_per_step(trainer.accelerator.num_processes),
        "num_processes": trainer.accelerator.num_processes, "threads": torch.get_num_threads(),
        # Wall time (loading, encoding unless cached, training, validation) and the training loop's, over all the
        # run's sittings; a run resumed from a checkpoint that predates the kit's keeping the earlier sittings'
        # clocks has its last sitting's only, and "clock" says which.
        "wall_time_s": wall + (trainer.earlier["elapsed_s"] if trainer.earlier else 0.0),
        "train_loop_s": result["train_loop_s_all_sittings"] if trainer.earlier else result["wall_time_s"],
        "clock": "all sittings" if trainer.earlier else "the last sitting only",
        "resumed": result["resumed"],
        "validation_size": len(validation.items), "validation_prompt": validation_prompt,
        "notes": trainer.notes, "config": asdict(cfg),
        "forecast": trainer.forecast.summary() if getattr(trainer, "forecast", None) else None,
    }
    at = report["converged_at_step"]
    report["converged_at_elapsed_s"] = (table["elapsed_s"][table["step"].index(at)]
                                        if at is not None and report["clock"] == "all sittings" else None)
    write_json(folder / "convergence.json", report)  # whole or not at all: a kill leaves the run unfinished
    return Run(folder)
