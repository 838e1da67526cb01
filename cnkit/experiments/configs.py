"""The training runs behind the notebooks (02-04, 06-10), as configurations.

Notebooks build their runs here, from their parameters (``run_config`` for 02-04), so that ``make figures``
trains each run once and notebooks share them through ``cnkit.experiments.runs`` (cached by configuration): the
ablation's ``zero`` runs *are* notebook 04's sudden-convergence runs. ``cnkit runs`` trains ``make figures``' runs
ahead of the notebooks (``--bench``: notebook 10's successor runs too; resumable: what is finished is only read
back), ``--workers 2`` two at a time, one thread each: on 2 CPU cores that trains 1.23x to 1.34x faster than one run
on two threads
(the tiny model's operators are too small to keep two threads busy; bench/train_step_variants.py).

Budgets are chosen to keep the whole of ``make figures`` within 3 hours on 2 CPU cores: the
ablation trains the full recipe (600 steps, validated every 25); the dataset-size and Table 2 runs
train 400 steps (every recipe seed has converged by step 325) and validate every 100. Notebook 10's
successor runs (``bench_configs``) would add about five hours more, so ``make figures`` reads them shipped
(``cnkit.experiments.bench_runs``) and ``make architectures`` retrains them.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..models.controlnets import VARIANTS
from ..training.train import TrainConfig
from .runs import find, run_folder, train

SEEDS = (0, 1, 2)
DATASET_SIZES = (1000, 5000, 50000)
SHORT = {"steps": 400, "validate_every": 100}
SEGMENTATION = {"dataset": "toy:shapes/segmentation", "n_train": 5000}

# What the paper and its authors report about when a ControlNet converges (notebook 04 puts the kit's runs
# beside them): (source, step, samples seen, how the rise is described).
PAPER_CONVERGENCE = [
    ("paper, Fig. 4 (SD 1.5)", "6133", "~24.5k at batch 4", "sudden"),
    ("official docs/train.md", "3k-7k", "12k-28k at batch 4", "'basically usable'"),
    ("author, issue 198 (SD1)", "4k-6k", "-", ""),
]


# The smoke profile: the same code in seconds, a few steps on a few items (every notebook's smoke runs): validated
# at the first and the last step, 2 denoising steps per validation image.
SMOKE = {"steps": 4, "batch_size": 4, "validate_every": 4, "validation_size": 4, "validation_steps": 2}
SMOKE_ITEMS = 32  # training items drawn at most (4 steps of 4 use 16)


def run_config(smoke: bool = False, **overrides) -> TrainConfig:
    """The kit's recipe (``TrainConfig()``) with ``overrides``; ``smoke`` shrinks it to seconds."""
    cfg = {**asdict(TrainConfig()), **overrides}
    if smoke:
        cfg.update(SMOKE, n_train=min(cfg["n_train"], SMOKE_ITEMS))
    return TrainConfig(**cfg)


def ablation(variant: str, seed: int, smoke: bool = False, **overrides):
    """Fig. 8: the recipe with only the variant changed (zero = notebook 04's run)."""
    return run_config(smoke, variant=variant, seed=seed, **overrides)


def dataset_size(n_train: int, seed: int, smoke: bool = False, **overrides):
    """Fig. 10: the recipe on ``n_train`` pairs (nested: a smaller set is a prefix of a larger one), 400 steps."""
    return run_config(smoke, **{**SHORT, "n_train": n_train, "seed": seed, **overrides})


def reconstruction(variant: str, seed: int, smoke: bool = False, **overrides):
    """Table 2: segmentation-conditioned nets (zero and lite), 400 steps."""
    return run_config(smoke, **{**SHORT, **SEGMENTATION, "variant": variant, "seed": seed, **overrides})


def sampling_comparison(seed: int = 0, smoke: bool = False, **overrides):
    """Notebook 04's comparison: the recipe's zero run with the paper's uniform timestep sampling."""
    return ablation("zero", seed, smoke, **{"timestep_sampling": "uniform", **overrides})


# Notebook 10's tasks, each with the budget of runs the other notebooks already train, so that ControlNet's own
# runs there are those runs (fill: the ablation's zero runs, 600 steps validated every 25; segmentation: Table 2's
# zero runs, 400 steps validated every 100) and only the successors add training.
ARCHITECTURE_TASKS = {"fill": {}, "segmentation": {**SHORT, **SEGMENTATION}}
SUCCESSORS = ("control-lora", "controlnet-xs", "t2i-adapter", "controlnext")
# The union net of notebook 10: one net for all four maps of the shapes world, on the segmentation task's items and
# budget (segmentation first: the task's metric, mIoU, is the one its validation reports).
UNION_MAPS = ("segmentation", "depth", "edges", "outline")


def trains_on(architecture: str, task: str) -> bool:
    """Does notebook 10 train ``architecture`` on ``task``? Every one does, but the union net: not on fill's one map."""
    return architecture != "union" or task == "segmentation"


def architecture_run(architecture: str, task: str, seed: int, smoke: bool = False, **overrides):
    """Notebook 10: the recipe with only the architecture changed, on a task of ``ARCHITECTURE_TASKS``; a union net
    learns every map of the task's world (``UNION_MAPS``: the segmentation task only)."""
    if task not in ARCHITECTURE_TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(ARCHITECTURE_TASKS)}")
    union = {}
    if architecture == "union":
        if not trains_on(architecture, task):
            raise ValueError(f"a union net learns several conditions; the {task} task has one: use task "
                             "'segmentation' (the shapes world's four maps)")
        union = {"dataset": "toy:shapes/" + "+".join(UNION_MAPS)}
    return run_config(smoke, **{**ARCHITECTURE_TASKS[task], "architecture": architecture, "seed": seed, **union,
                                **overrides})


def figure_configs(smoke: bool = False) -> list:
    """The runs ``make figures`` trains: notebooks 02-09's, which include notebook 10's ControlNet runs."""
    return ([ablation(v, s, smoke) for s in SEEDS for v in VARIANTS] + [sampling_comparison(SEEDS[0], smoke)]
            + [reconstruction(v, s, smoke) for s in SEEDS for v in ("zero", "lite")]
            + [dataset_size(n, s, smoke) for n in DATASET_SIZES for s in SEEDS])


def bench_configs(smoke: bool = False) -> list:
    """Notebook 10's other runs (the successors on both tasks and the union net): about five hours more on 2 CPU
    cores, so the kit ships them finished (``cnkit.experiments.bench_runs``, ``make architectures`` retrains them)."""
    return ([architecture_run(a, t, s, smoke) for t in ARCHITECTURE_TASKS for a in SUCCESSORS for s in SEEDS]
            + [architecture_run("union", "segmentation", s, smoke) for s in SEEDS])


# The forecast study's own runs (notebook 11), beside those of notebooks 04-10: runs that should never converge
# within their budget (the paper's learning rate, 1e-5, far too low for the tiny base; the paper's uniform timesteps
# at a budget too small for them) to count false alarms, and conditions no other notebook trains on (the shapes
# world's edges and depth) to test the rule where it was not designed.
FORECAST_CONTROLS = {"lr-1e-5": {"learning_rate": 1e-5, "steps": 400, "validate_every": 50},
                     "uniform-200": {"timestep_sampling": "uniform", "steps": 200}}
FORECAST_NEW_CONDITIONS = {"edges": {**SHORT, "dataset": "toy:shapes/edges", "n_train": 5000, "validate_every": 50},
                           "depth": {**SHORT, "dataset": "toy:shapes/depth", "n_train": 5000, "validate_every": 50}}


# Notebook 10's runs again, with the probe (the shipped ones predate it), to test the rule on other architectures:
# each successor on segmentation, and ControlNet-XS on fill too (which never converges there on seeds 1 and 2).
FORECAST_ARCHITECTURES = ([("controlnet-xs", "fill", 1)] + [(a, "segmentation", 0) for a in SUCCESSORS])


def forecast_configs(smoke: bool = False) -> list:
    """Notebook 11's own runs (``FORECAST_CONTROLS`` on seeds 0 and 1, ``FORECAST_NEW_CONDITIONS`` on seed 0,
    ``FORECAST_ARCHITECTURES``), validated densely (the forecast's ground truth); shipped as tables (``cnkit forecast
    runs``)."""
    return ([run_config(smoke, **{**o, "seed": s}) for o in FORECAST_CONTROLS.values() for s in (0, 1)]
            + [run_config(smoke, **{**o, "seed": 0}) for o in FORECAST_NEW_CONDITIONS.values()]
            + [architecture_run(a, t, s, smoke) for a, t, s in FORECAST_ARCHITECTURES])


def all_configs(smoke: bool = False) -> list:
    """Every run behind the notebooks."""
    return figure_configs(smoke) + bench_configs(smoke)


def on_base(configs: list, base: str = "") -> list:
    """``configs`` trained on ``base`` instead of the recipe's (``""``: as they are). Runs are keyed by what a base's
    files hold (``cnkit.experiments.runs.run_key``), so runs trained on a folder that later becomes the default
    (``data/tiny-sd``) are the default's runs."""
    return [replace(c, base=base) for c in configs] if base else list(configs)


def default_workers() -> int:
    """Runs trained side by side: one on an accelerator; two on a CPU (each with half the threads)."""
    return 1 if torch.cuda.is_available() else max(1, min(2, torch.get_num_threads()))


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _summary(run) -> dict:
    return {"name": run.folder.name, **{k: run.convergence[k] for k in (
        "metric", "fidelity_initial", "fidelity_final", "converged_at_step", "wall_time_s")}}


def _train_logged(cfg_dict: dict, runs_dir: str) -> dict:
    """One run in a worker process; its progress bars go to ``runs_dir/logs/<run>.log``, not the terminal."""
    cfg = TrainConfig(**cfg_dict)
    log = Path(runs_dir) / "logs" / f"{run_folder(cfg, runs_dir).name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stderr(f), contextlib.redirect_stdout(f):
        return _summary(train(cfg, runs_dir))


def schedule(configs: list) -> list:
    """The order runs start in: longest first, so that workers finish together; among runs of one length,
    round-robin over their training sets, so that runs starting together encode different sets instead
    of one waiting on the other's lock (three 50k-pair runs side by side would leave one worker idle)."""
    rank, keyed = {}, []
    for i, c in enumerate(configs):
        group = (c.base, c.dataset, c.n_train, c.data_seed, c.resolution)
        rank[group] = rank.get(group, -1) + 1
        keyed.append((-c.steps, rank[group], i))
    return [configs[i] for *_, i in sorted(keyed)]


def not_shipped(configs: list, shipped_dir, log=print) -> list:
    """The configurations without a finished run under their key in ``shipped_dir``: a run already shipped is that
    run, so a rebuild interrupted on one checkout continues on another (its training folder is not there)."""
    todo = [c for c in configs if find(c, shipped_dir) is None]
    log(f"{len(configs) - len(todo)} of {len(configs)} already shipped in {shipped_dir}")
    return todo


def train_all(configs: list, runs_dir, workers: int = 1, log=print, on_done=None) -> list[dict]:
    """Train every configuration's run (finished ones are only read back), ``workers`` at a time, in
    ``schedule`` order; each worker gets an equal share of this process's threads. A run's results do not
    depend on ``workers`` except through its thread count, which changes floating-point summation order only.
    ``on_done(cfg)`` is called for each run as soon as it is finished (those found finished first), so that what a
    long command ships (``make architectures``) is shipped as it goes, not lost with an interruption."""
    runs_dir = str(runs_dir)
    todo = schedule(configs)
    left = [c for c in todo if find(c, runs_dir) is None]
    log(f"training runs: {len(todo) - len(left)} of {len(todo)} found, {len(left)} to train, {workers} at a time")
    done, results = len(todo) - len(left), []
    for cfg in todo:
        if on_done is not None and cfg not in left:
            on_done(cfg)

    def report(cfg, r: dict) -> None:
        nonlocal done
        done += 1
        log(f"  [{done}/{len(todo)}] {r['name']}: {r['metric']} {r['fidelity_initial']:.3f} -> "
            f"{r['fidelity_final']:.3f}, converged at {r['converged_at_step']}, {r['wall_time_s']:.0f} s")
        results.append(r)
        if on_done is not None:
            on_done(cfg)

    if workers <= 1 or len(left) <= 1:
        for cfg in left:
            report(cfg, _summary(train(cfg, runs_dir)))
        return results
    threads = max(1, torch.get_num_threads() // workers)
    # spawn: a fresh interpreter per worker (forking a process that holds torch's thread pools can hang).
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(_train_logged, asdict(c), runs_dir): c for c in left}
        for future in as_completed(futures):
            report(futures[future], future.result())
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", default="reports/full/runs")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--bench", action="store_true", help="notebook 10's successor runs too (bench_configs)")
    ap.add_argument("--workers", type=int, default=0, help="runs trained at a time (0: default_workers())")
    ap.add_argument("--base", default="", help="train them on this base instead of the recipe's (on_base)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configs = on_base(all_configs(args.smoke) if args.bench else figure_configs(args.smoke), args.base)
    train_all(configs, Path(args.runs_dir), args.workers or default_workers())
    return 0


if __name__ == "__main__":
    sys.exit(main())
