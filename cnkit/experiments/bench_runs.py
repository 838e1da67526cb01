"""Notebook 10's successor runs, shipped finished in ``data/architecture-runs/``.

Training Control-LoRA, ControlNet-XS, T2I-Adapter and ControlNeXt on both tasks and the union net, 3 seeds
each (``experiments.bench_configs``: 27 runs), costs about five hours on 2 CPU cores (their clocks sum to 10 hours,
two at a time), more than the whole of ``make figures``' 3-hour budget. So the kit ships those runs as it ships its
ControlNets, and notebook 10 reads them where its own ``runs_dir`` has none; its ControlNet runs, the costs
(parameters, file size, seconds per step and per image), the union net's map-by-map evaluation and every verdict
are computed when the notebook runs.

    cnkit architectures [--runs-dir reports/architectures/runs] [--workers 2]     (make architectures)

trains the runs (cached by configuration and resumable, as every run) and publishes them here. A shipped run
keeps what notebook 10 reads: its configuration, telemetry, validation table and last sample grid, the loss
history, and the weights of seed 0 and of every union seed (the optimizer state and earlier sample grids stay in
the training folder). ``tests/test_bench_runs.py`` fails when the recipe changes and the shipped runs no
longer match it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..card import hardware, portable
from ..params import REPO_ROOT
from ..training.train import TrainConfig
from . import configs as experiments
from . import runs
from .runs import Run, run_folder

ROOT = REPO_ROOT
SHIPPED_DIR = ROOT / "data" / "architecture-runs"
FORECAST_DIR = ROOT / "data" / "forecast-runs"  # notebook 11's own runs: tables only (cnkit forecast runs)
RUN_FILES = ("train_config.json", "convergence.json", "validation.csv", "telemetry.csv", "signals.csv", "notes.json")
NOT_SHIPPED = ("optimizer.pt",)  # the optimizer state only resumes training: twice the weights' size


def keeps_weights(cfg: TrainConfig) -> bool:
    """Seed 0 of every architecture and task (notebook 10 times generation with it, and one can sample from it)
    and every union seed (the notebook evaluates each with each map alone)."""
    return cfg.seed == 0 or cfg.architecture == "union"


def find(cfg: TrainConfig, shipped_dir=SHIPPED_DIR) -> Run | None:
    """The finished run of ``cfg`` shipped in ``shipped_dir``, or None."""
    return runs.find(cfg, shipped_dir)


def _copy(src: Path, dest: Path) -> None:
    """A run file as shipped: JSON with its paths made portable (no path of the training machine), else as is."""
    if src.suffix == ".json":
        dest.write_text(json.dumps(portable(json.loads(src.read_text())), indent=1))
    else:
        shutil.copy2(src, dest)


def publish(run: Run, cfg: TrainConfig, shipped_dir=SHIPPED_DIR, weights: bool | None = None) -> Path:
    """Copy what notebook 10 reads of a finished ``run`` into ``shipped_dir`` (replacing an earlier copy); with its
    weights when ``weights`` (default: ``keeps_weights(cfg)``)."""
    weights = keeps_weights(cfg) if weights is None else weights
    dest = run_folder(cfg, shipped_dir)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "samples").mkdir(parents=True)
    (tmp / "checkpoint").mkdir()
    for name in RUN_FILES:
        if (run.folder / name).is_file():  # signals.csv exists for runs trained since the forecast's probe
            _copy(run.folder / name, tmp / name)
    grid = run.sample_grid(run.convergence["validated_steps"][-1])
    shutil.copy2(grid, tmp / "samples" / grid.name)
    for f in sorted(run.checkpoint.iterdir()):
        if f.name == "trainer_state.json" or (weights and f.name not in NOT_SHIPPED):
            _copy(f, tmp / "checkpoint" / f.name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # a reader never sees half a run
    return dest


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_index(shipped_dir=SHIPPED_DIR, configs=None) -> Path:
    """``README.md`` of the shipped folder: what it is, how it was made, and one line per run from its files."""
    configs = experiments.bench_configs() if configs is None else configs
    lines = ["# Notebook 10's successor runs (shipped)", "",
             "Written by `cnkit architectures` (`make architectures`), which trains them again; see the docstring of "
             "cnkit.experiments.bench_runs. Published from cnkit commit " + _commit() + " on " + hardware() + ". "
             "Each run's "
             "wall time is its own clock, with up to three other runs sharing the machine's cores: notebook 10 "
             "times steps and images again, side by side, when it runs.", "",
             "| run | steps | converged at step | final fidelity | weights | wall s |", "|---|---|---|---|---|---|"]
    for cfg in configs:
        run = find(cfg, shipped_dir)
        if run is None:
            lines.append(f"| {run_folder(cfg, shipped_dir).name} | not shipped | | | | |")
            continue
        c = run.convergence
        lines.append(f"| {run.folder.name} | {c['steps']} | {c['converged_at_step']} | {c['metric']} "
                     f"{c['fidelity_final']:.3f} | {'yes' if keeps_weights(cfg) else 'no'} | {c['wall_time_s']:.0f} |")
    index = Path(shipped_dir) / "README.md"
    index.write_text("\n".join(lines) + "\n")
    return index


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", default="reports/architectures/runs", help="where the runs train (resumable)")
    ap.add_argument("--workers", type=int, default=0, help="runs trained at a time (0: two on a CPU)")
    ap.add_argument("--shipped-dir", default=str(SHIPPED_DIR))
    ap.add_argument("--base", default="", help="train them on this base instead of the recipe's (a new edition of "
                    "the default before it replaces it: runs are keyed by the base's files, not its name)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configs = experiments.on_base(experiments.bench_configs(), args.base)

    def ship(cfg):  # each run as it finishes, so an interrupted rebuild keeps what it trained
        print("published", publish(Run(run_folder(cfg, args.runs_dir)), cfg, args.shipped_dir), flush=True)
        write_index(args.shipped_dir, configs)

    todo = experiments.not_shipped(configs, args.shipped_dir, log=lambda m: print(m, flush=True))
    experiments.train_all(todo, Path(args.runs_dir), args.workers or experiments.default_workers(), on_done=ship)
    print("index:", write_index(args.shipped_dir, configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
