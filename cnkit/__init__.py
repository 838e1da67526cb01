"""cnkit: a kit for understanding and reproducing ControlNet (Zhang, Rao, Agrawala, ICCV 2023).

The everyday names live here (``from cnkit import TrainConfig, train, generate, ControlUnit, load_base``); every
module stays importable by its full path (``cnkit.training.telemetry``). The tree is the map, bottom-up: a module
imports only its own folder and the folders below it, so the package has no import cycle and no upward arrow
(``tests/test_layout.py`` reads the layers from the folders and checks both).

- top: foundations and pure measures: ``params`` (notebook parameters), ``pixels`` (pixel conventions),
  ``colours`` and ``geometry`` (what the toy worlds paint with), ``card`` (model cards), ``summary``
  (summary.json), ``viz`` (plots from numbers), ``metrics`` (pure numpy measures of images and curves), ``files``
  (files written whole: atomic writes, outputs that never overwrite weights unless told)
- ``data/``: ``toyworld``, ``readers``, ``splits``, ``encoded``, ``trainset``
- ``models/``: ``tokenizer``, ``tiny``, ``sd15``, ``bases``, ``controlnets``, ``export``, ``architectures/``
- ``generation/``: ``weighting``, ``annotators``, ``adapter_pipeline``, ``nets`` (nets read once while unchanged),
  ``generate``
- ``training/``: ``checkpoints``, ``train``, ``telemetry``, ``pretrain``
- ``experiments/``: ``runs``, ``configs``, ``evaluations``, ``shipped``, ``bench_runs``, ``costs``,
  ``successor_claims``, ``successors`` (notebook 10's bench)
- ``surfaces/``: ``report`` (make figures), ``widgets`` (the playground), ``cli`` (the ``cnkit`` command)

Data flows one way: data -> train (with probes attached from outside) -> run folder (config, checkpoint,
telemetry.csv, validation.csv, samples, convergence.json) -> evaluations / viz / report. Notebooks are thin
drivers over these modules and read results back from files.

Names are imported on first use (PEP 562), so ``import cnkit`` and ``cnkit --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> module that defines it. The curated surface a notebook or a user script needs; deeper names stay
# reachable by their module.
_API = {
    # training
    "TrainConfig": "cnkit.training.train", "Trainer": "cnkit.training.train", "RECIPES": "cnkit.training.train",
    "InjectionTelemetry": "cnkit.training.telemetry", "Validation": "cnkit.training.telemetry",
    "PretrainConfig": "cnkit.training.pretrain", "pretrain": "cnkit.training.pretrain",
    # runs kept by configuration
    "train": "cnkit.experiments.runs", "Run": "cnkit.experiments.runs", "find_run": "cnkit.experiments.runs",
    "default_runs_dir": "cnkit.experiments.runs", "read_table": "cnkit.experiments.runs",
    # generation
    "generate": "cnkit.generation.generate", "generate_many": "cnkit.generation.generate",
    "ControlUnit": "cnkit.generation.generate", "annotate": "cnkit.generation.annotators",
    "CONTROL_MODES": "cnkit.generation.weighting",
    # models
    "load_base": "cnkit.models.bases", "load_pipeline": "cnkit.models.bases", "image_size": "cnkit.models.bases",
    "make_controlnet": "cnkit.models.controlnets", "load_controlnet": "cnkit.models.controlnets",
    "build_adapter": "cnkit.models.architectures", "load_adapter": "cnkit.models.architectures",
    "build_tiny_sd": "cnkit.models.tiny", "export_original": "cnkit.models.export",
    # data
    "ToyWorld": "cnkit.data.toyworld", "toy_sample": "cnkit.data.toyworld", "load_dataset": "cnkit.data.readers",
    "held_out_items": "cnkit.data.splits",
    # summaries and the playground
    "write_summary": "cnkit.summary", "read_summary": "cnkit.summary", "Playground": "cnkit.surfaces.widgets",
}
# names that differ from the module's own
_ALIASES = {"find_run": "find", "build_adapter": "build", "load_adapter": "load", "toy_sample": "sample",
            "load_dataset": "load"}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'cnkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), _ALIASES.get(name, name))
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:  # for editors and type checkers; at run time the names load on first use
    from .data.readers import load as load_dataset  # noqa: F401
    from .data.splits import held_out_items  # noqa: F401
    from .data.toyworld import ToyWorld  # noqa: F401
    from .data.toyworld import sample as toy_sample  # noqa: F401
    from .experiments.runs import Run, default_runs_dir, read_table, train  # noqa: F401
    from .experiments.runs import find as find_run  # noqa: F401
    from .generation.annotators import annotate  # noqa: F401
    from .generation.generate import ControlUnit, generate, generate_many  # noqa: F401
    from .generation.weighting import CONTROL_MODES  # noqa: F401
    from .models.architectures import build as build_adapter  # noqa: F401
    from .models.architectures import load as load_adapter  # noqa: F401
    from .models.bases import image_size, load_base, load_pipeline  # noqa: F401
    from .models.controlnets import load_controlnet, make_controlnet  # noqa: F401
    from .models.export import export_original  # noqa: F401
    from .models.tiny import build_tiny_sd  # noqa: F401
    from .summary import read_summary, write_summary  # noqa: F401
    from .surfaces.widgets import Playground  # noqa: F401
    from .training.pretrain import PretrainConfig, pretrain  # noqa: F401
    from .training.telemetry import InjectionTelemetry, Validation  # noqa: F401
    from .training.train import RECIPES, TrainConfig, Trainer  # noqa: F401
