"""What the kit ships, and the cards that say what it is: the embedded base ``data/tiny-sd`` (pretrained by
notebook 01, ``write_base_card``) and the ControlNets in ``data/controlnets/`` (trained by the kit's recipe on
the embedded base, measured, and written as stock diffusers ControlNet folders: ``build``).

    cnkit controlnets [--only fill-outline ...] [--runs-dir runs/shipped]     (make controlnets)

Training goes through ``cnkit.experiments.runs`` (cached by configuration, resumable). Every figure on a card is
measured on held-out items through ``cnkit.experiments.evaluations`` (diffusers' pipeline, fixed seeds); every card has
the same sections (what it is, recipe, measured, rebuild, load) and the SHA-256 of its files (``cnkit.card``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..card import card_data, hardware, write_card
from ..data.readers import is_toy
from ..data.toyworld import CONDITIONS
from ..models.bases import load_pipeline
from ..params import REPO_ROOT, repo_path
from ..training.train import TrainConfig
from .evaluations import evaluate_composition, evaluate_controlnet
from .runs import FIGURE_RUNS, train

ROOT = REPO_ROOT
OUT = ROOT / "data" / "controlnets"

# name -> (what it learns, training overrides of the recipe, how it is evaluated)
SHIPPED = {
    "fill-outline": {
        "about": "Fill50K's task: a circle outline -> a filled disc where the outline is.",
        "train": {"dataset": "toy:fill"},
        # With an empty prompt both CFG branches see the same text, so a condition in both cancels guidance
        # (notebook 07 measures it); the bar is measured with the condition in the conditional branch only
        # (generate's cfg_weighting="flat"), and the plain placement is recorded beside it.
        "eval": {"dataset": "toy:fill", "prompt": "", "metric": "disc_iou", "bar": 0.8, "cfg_weighting": "flat",
                 "also": {"condition in both CFG branches": {"cfg_weighting": None}}},
    },
    "shapes-segmentation": {
        "about": "shapes world: a segmentation map (a colour per shape class) -> those shapes there.",
        "train": {"dataset": "toy:shapes/segmentation", "steps": 800, "validate_every": 50, "n_train": 5000},
        "eval": {"dataset": "toy:shapes/segmentation", "prompt": None, "metric": "miou", "bar": 0.7},
    },
    # With shapes-segmentation, the composition pair (compose()).
    "shapes-outline": {
        "about": "shapes world: outlines (scribble-like) -> shapes with those edges.",
        "train": {"dataset": "toy:shapes/outline", "steps": 800, "validate_every": 50, "n_train": 5000},
        "eval": {"dataset": "toy:shapes/outline", "prompt": None, "metric": "edge_f1", "bar": 0.7},
    },
}
N_EVAL = 64


# --- what a net was trained on, read from its card or its run (the playground's defaults and warnings) ----------

ARCHITECTURE_RUNS = ROOT / "data" / "architecture-runs"


@dataclass(frozen=True)
class TrainedOn:
    """What a net was trained on: its dataset as the run named it, the toy world (None for files) and the condition
    maps it reads (empty when its dataset does not say: a folder of pairs)."""

    dataset: str
    world: str | None
    conditions: tuple[str, ...]

    def describe(self) -> str:
        if not self.conditions:
            return f"the dataset {self.dataset} (what kind of condition it holds is not recorded)"
        maps = " + ".join(self.conditions)
        return f"the {self.world} world's {maps} maps" if self.world else f"{maps} maps ({self.dataset})"


def dataset_conditions(dataset: str) -> TrainedOn:
    """``"toy:shapes/segmentation"`` -> the shapes world's segmentation maps; ``"toy:fill"`` -> the fill world's
    outlines (its only map); a folder or hub name -> unknown maps."""
    if not is_toy(dataset):
        return TrainedOn(dataset, None, ())
    world, _, maps = dataset.removeprefix("toy:").partition("/")
    return TrainedOn(dataset, world, tuple(maps.split("+")) if maps else CONDITIONS.get(world, ())[:1])


def _recorded_config(folder: Path) -> dict | None:
    """The training configuration recorded beside a net: its card's (a shipped net), else its run's (a run folder's
    ``checkpoint/``, or the run folder itself)."""
    if (folder / "README.md").is_file():
        try:
            return card_data(folder).get("config")
        except (ValueError, IndexError, KeyError):
            pass
    for where in (folder, folder.parent):
        for name in ("train_config.json", "convergence.json"):
            f = where / name
            if f.is_file():
                data = json.loads(f.read_text())
                return data.get("config", data)
    return None


def trained_on(net) -> TrainedOn | None:
    """What the net in folder ``net`` was trained on, from its card or its run's configuration; None when neither
    says (a hub id, someone else's folder)."""
    folder = repo_path(net)
    config = _recorded_config(folder) if folder.is_dir() else None
    return dataset_conditions(config["dataset"]) if config and config.get("dataset") else None


def net_choices(shipped=OUT, architecture_runs=ARCHITECTURE_RUNS) -> dict[str, str]:
    """The nets one can pick by name (the playground's list): the shipped ControlNets by their short names, then the
    shipped successor runs that kept their weights (seed 0), as ``"<architecture> (<task>, seed 0)"``; each maps to
    its folder. Nets that read several maps at once (a union net) are left out: a unit gives one map."""
    choices = {}
    for folder in sorted(Path(shipped).glob("*/config.json")):
        choices[folder.parent.name] = str(folder.parent)
    for weights in sorted(Path(architecture_runs).glob("*/checkpoint/*.safetensors")):
        checkpoint = weights.parent
        made = trained_on(checkpoint)
        config = _recorded_config(checkpoint) or {}
        if made is None or len(made.conditions) != 1 or str(checkpoint) in choices.values():
            continue
        task = made.dataset.removeprefix("toy:").replace("/", " ")
        choices[f"{config.get('architecture', 'controlnet')} ({task}, seed {config.get('seed', 0)})"] = str(checkpoint)
    return choices


def matching_net(choices: dict[str, str], condition: str | None, world: str | None = None) -> str | None:
    """The first of ``choices`` (name -> folder) trained on ``condition`` maps, one of ``world`` first; None when none
    was (their cards decide, not their names)."""
    if condition is None:
        return None
    fits = [(name, trained_on(folder)) for name, folder in choices.items()]
    fits = [(name, made) for name, made in fits if made is not None and condition in made.conditions]
    same_world = [name for name, made in fits if world is not None and made.world == world]
    return (same_world or [name for name, _ in fits] or [None])[0]


def train_config(name: str, base: str = "") -> TrainConfig:
    """Net ``name``'s training run: the recipe with its overrides, on ``base`` (``""``: the recipe's, the default)."""
    return TrainConfig(**{**SHIPPED[name]["train"], **({"base": base} if base else {})})


def build(name: str, runs_dir: Path, out_root: Path = OUT, log=print, base: str = "") -> dict:
    spec = SHIPPED[name]
    cfg = train_config(name, base)
    start = time.perf_counter()
    run = train(cfg, runs_dir, log=log)
    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for f in ("config.json", "diffusion_pytorch_model.safetensors"):  # the stock ControlNet folder only
        shutil.copy(run.checkpoint / f, folder / f)
    pipe = load_pipeline(cfg.base)
    ev = spec["eval"]
    measured = evaluate_controlnet(pipe, str(folder), ev["dataset"], n=N_EVAL, prompt=ev["prompt"],
                                   cfg_weighting=ev.get("cfg_weighting"))
    also = {}
    for label, settings in ev.get("also", {}).items():  # the same items and seeds, other settings
        m = evaluate_controlnet(pipe, str(folder), ev["dataset"], n=N_EVAL, prompt=ev["prompt"], **settings)
        also[label] = {k: v for k, v in m.items() if k != "per_item"}
    report = run.convergence
    data = {"name": name, "about": spec["about"], "base": cfg.base, "config": report["config"],
            "training": {k: report[k] for k in ("steps", "samples_seen", "wall_time_s", "converged_at_step",
                                                 "fidelity_final", "metric")},
            "evaluation": {**{k: v for k, v in measured.items() if k != "per_item"},
                           # per held-out item, in order, so a test can reproduce a prefix of them
                           "per_item": {ev["metric"]: [round(x, 4) for x in measured["per_item"][ev["metric"]]]}},
            "also_measured": also,
            "bar": {"metric": ev["metric"], "at_least": ev["bar"], "met": measured[ev["metric"]] >= ev["bar"]},
            "hardware": hardware(), "build_seconds": time.perf_counter() - start,
            "rebuild": f"make controlnets  (cnkit controlnets --only {name})"}
    prompt = "the empty prompt" if ev["prompt"] == "" else "each scene's own prompt"
    sections = {
        "What it does": spec["about"],
        "Recipe": (f"cnkit.training.train on `{cfg.base}`, dataset `{cfg.dataset}` ({cfg.n_train} items, data seed "
                   f"{cfg.data_seed}), variant `{cfg.variant}`, {cfg.steps} optimizer steps at batch {cfg.batch_size}, "
                   f"AdamW {cfg.learning_rate:g}, {cfg.timestep_sampling} timestep sampling, "
                   f"{cfg.prompt_dropout:.0%} empty prompts, seed {cfg.seed}."),
        "Measured": (f"On {N_EVAL} held-out conditions with {prompt}, DDIM {measured['steps']} steps, guidance "
                     f"{measured['guidance']}"
                     + (f", condition in the conditional CFG branch only (cfg_weighting={ev['cfg_weighting']!r})"
                        if ev.get("cfg_weighting") else "") + ": " + ", ".join(
                         f"{k} {measured[k]:.3f}" for k in measured if isinstance(measured[k], float)
                         and k not in ("guidance",)) + f". Bar: {ev['metric']} >= {ev['bar']}: "
                     + ("met." if data["bar"]["met"] else "NOT met.")
                     + "".join(f" Same items and seeds, {label}: {ev['metric']} {m[ev['metric']]:.3f}."
                               for label, m in also.items())),
        "Rebuild": f"`{data['rebuild']}`; training wall time {report['wall_time_s'] / 60:.1f} min on {hardware()}.",
        "Load": f"`ControlNetModel.from_pretrained(\"data/controlnets/{name}\")`",
    }
    write_card(folder, f"cnkit ControlNet: {name}", sections, data)
    log(json.dumps({"name": name, **data["evaluation"], "bar_met": data["bar"]["met"]}))
    return data


def compose(out_root: Path = OUT, n: int = 32, log=print, base: str = "") -> dict:
    """Both shapes nets in one call on scenes built for it; the result goes in data/controlnets/README.md."""
    base = base or TrainConfig().base
    pipe = load_pipeline(base)
    result = evaluate_composition(pipe, str(out_root / "shapes-segmentation"), str(out_root / "shapes-outline"), n=n)
    summary = {k: v for k, v in result.items() if k != "per_item"}
    lines = ["# ControlNets shipped with cnkit", "",
             f"Trained by `make controlnets` (`cnkit controlnets`) on `{base}`; each folder is a stock "
             "diffusers ControlNet with its own card.", "", "| name | what it does | measured |", "|---|---|---|"]
    for name, spec in SHIPPED.items():
        card = out_root / name / "README.md"
        if card.is_file():
            ev = card_data(out_root / name)["evaluation"]
            metric = spec["eval"]["metric"]
            lines.append(f"| `{name}` | {spec['about']} | {metric} {ev[metric]:.3f} |")
    lines += ["", "## Composition", "",
              f"`shapes-segmentation` and `shapes-outline` in one `cnkit.generate` call on {n} held-out two-shape "
              "scenes: the segmentation net gets one shape's segmentation map, the outline net the other shape's "
              "outline; each condition is scored where it speaks (the other shape's area painted out): "
              f"segmentation mIoU {summary['segmentation_miou']:.3f}, outline edge F1 {summary['outline_edge_f1']:.3f} "
              f"(bar: 0.7 each). DDIM {summary['steps']} steps, guidance {summary['guidance']}, each scene's prompt; "
              f"{hardware()}.", "", "```json", json.dumps(summary, indent=1), "```", ""]
    (out_root / "README.md").write_text("\n".join(lines))
    log(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(SHIPPED))
    # make figures' runs folder: the fill net is notebook 02's recipe run, trained once for both.
    ap.add_argument("--runs-dir", default=str(FIGURE_RUNS))
    ap.add_argument("--base", default="", help="train and measure them on this base instead of the default (a new "
                    "edition before it becomes the default)")
    ap.add_argument("--out", default=str(OUT), help="where the nets and their cards are written")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for name in args.only or SHIPPED:
        build(name, Path(args.runs_dir), out, base=args.base)
    if all((out / name / "README.md").is_file() for name in ("shapes-segmentation", "shapes-outline")):
        compose(out, base=args.base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
