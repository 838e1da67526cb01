"""The training runs behind the paper's figures (notebooks 04, 06, 08, 09), as configurations.

Notebooks build their runs here, from their parameters, so that ``make figures`` trains each run once
and notebooks share them through ``cnkit.runs`` (cached by configuration): the ablation's ``zero``
runs *are* notebook 04's sudden-convergence runs. ``python -m cnkit.experiments`` trains them all
ahead of the notebooks (resumable; what is finished is only read back).

Budgets are chosen to keep the whole of ``make figures`` within 3 hours on 2 CPU cores: the
ablation trains the full recipe (600 steps, validated every 25); the dataset-size and Table 2 runs
train 400 steps (every recipe seed has converged by step 325) and validate every 100.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .runs import RECIPE

SEEDS = (0, 1, 2)
VARIANTS = ("zero", "gaussian", "lite")
DATASET_SIZES = (1000, 5000, 50000)
SHORT = {"steps": 400, "validate_every": 100}
SEGMENTATION = {"dataset": "toy:shapes/segmentation", "n_train": 5000}


def _config(overrides: dict, smoke: bool):
    from .train import TrainConfig

    cfg = {**RECIPE, "checkpoint_every": 200, **overrides}  # checkpoints as notebooks 02-04 keep them
    if smoke:  # the same code in seconds: a few steps on a few items (as notebook 04's smoke runs, so shared)
        cfg.update(steps=4, batch_size=4, validate_every=2, validation_size=4, n_train=min(cfg["n_train"], 64))
    return TrainConfig(**cfg)


def ablation(variant: str, seed: int, smoke: bool = False, **overrides):
    """Fig. 8: the recipe with only the variant changed (zero = notebook 04's run)."""
    return _config({"variant": variant, "seed": seed, **overrides}, smoke)


def dataset_size(n_train: int, seed: int, smoke: bool = False, **overrides):
    """Fig. 10: the recipe on ``n_train`` pairs (nested: a smaller set is a prefix of a larger one), 400 steps."""
    return _config({**SHORT, "n_train": n_train, "seed": seed, **overrides}, smoke)


def reconstruction(variant: str, seed: int, smoke: bool = False, **overrides):
    """Table 2: segmentation-conditioned nets (zero and lite), 400 steps."""
    return _config({**SHORT, **SEGMENTATION, "variant": variant, "seed": seed, **overrides}, smoke)


def all_configs(smoke: bool = False) -> list:
    return ([ablation(v, s, smoke) for s in SEEDS for v in VARIANTS]
            + [reconstruction(v, s, smoke) for s in SEEDS for v in ("zero", "lite")]
            + [dataset_size(n, s, smoke) for n in DATASET_SIZES for s in SEEDS])


def main(argv=None) -> int:
    from .runs import train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", default="reports/full/runs")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    for cfg in all_configs(args.smoke):
        run = train(cfg, Path(args.runs_dir))
        c = run.convergence
        print(f"{run.folder.name}: {c['metric']} {c['fidelity_initial']:.3f} -> {c['fidelity_final']:.3f}, "
              f"converged at {c['converged_at_step']}, {c['wall_time_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
