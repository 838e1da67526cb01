"""Notebook 10's bench, as functions: ControlNet and its successors trained on the same tasks, their costs beside
their convergence, the figures, the union net given each map alone, and what goes into ``summary.json``.

The notebook is a thin driver over these (as the others are over theirs):

    trained = trained_runs(configs, runs_dir)              # read back, else shipped, else trained
    measured = costs.measure_all(first_runs(trained), ...)  # parameters, file size, s/step, s/image
    rows = comparison_rows(trained, measured)               # one row per architecture (summary.json's)
    architectures_table(rows, measured), costs_figure(rows, trained), fidelity_figure(trained), ...
    union_by_map(pipe, trained, rows)                       # the union net's maps one at a time
    summary_data(rows, verdicts, trained, measured)         # summary.json's fields

Numbers and verdicts come from ``cnkit.experiments.costs`` and ``cnkit.experiments.successor_claims``; this
module only gathers runs, lays out tables and figures, and names things as the README does.
"""

from __future__ import annotations

import cnkit.viz as viz

from ..training.telemetry import injected_rms
from . import bench_runs, costs, evaluations, runs
from .runs import Run

Trained = dict[str, dict[str, list[Run]]]  # task -> architecture -> runs, one per seed


def run_of(cfg, runs_dir, shipped_runs: bool = True, train_missing: bool = True, log=print) -> Run | None:
    """The run of ``cfg``: read back from ``runs_dir``, else shipped (``data/architecture-runs``), else trained (or
    resumed); with ``train_missing`` off, a finished one or None (said)."""
    found = runs.find(cfg, runs_dir)
    if found is None and shipped_runs:
        found = bench_runs.find(cfg)
    if found is not None:
        return found
    if train_missing:
        return runs.train(cfg, runs_dir, log=log)
    log(f"not trained yet, left out: {runs.run_folder(cfg, runs_dir).name}")
    return None


def trained_runs(configs: dict, runs_dir, shipped_runs: bool = True, train_missing: bool = True,
                 log=print) -> Trained:
    """``configs`` (task -> architecture -> one TrainConfig per seed) as runs; architectures with no run left out."""
    out = {}
    for task, by_arch in configs.items():
        found = {a: [r for r in (run_of(c, runs_dir, shipped_runs, train_missing, log) for c in cs) if r is not None]
                 for a, cs in by_arch.items()}
        out[task] = {a: rs for a, rs in found.items() if rs}
    return out


def architectures_of(trained: Trained, order) -> list[str]:
    """The architectures of ``order`` that have a run on some task."""
    return [a for a in order if any(a in by_arch for by_arch in trained.values())]


def convergence_steps(trained: Trained) -> dict:
    """task -> architecture -> the detected convergence step per seed (None: never)."""
    return {t: {a: [r.convergence["converged_at_step"] for r in rs] for a, rs in by_arch.items()}
            for t, by_arch in trained.items()}


def first_runs(trained: Trained, architectures) -> dict[str, Run]:
    """Each architecture's first run (its first task's first seed): the one whose costs are timed."""
    return {a: next(by_arch[a][0] for by_arch in trained.values() if a in by_arch) for a in architectures}


def comparison_rows(trained: Trained, measured: dict) -> dict[str, dict]:
    """One row per measured architecture: its costs beside each task's convergence and fidelity per seed
    (``costs.comparison_row``; summary.json's ``rows``)."""
    return {a: costs.comparison_row(a, measured[a], {t: by_arch[a] for t, by_arch in trained.items() if a in by_arch})
            for a in measured}


def _median_seconds(seconds: list, n_seeds: int) -> str:
    done = sorted(s for s in seconds if s is not None)
    return f"{done[len(done) // 2]:.0f}" if len(done) * 2 > n_seeds else "never (most seeds)"


def architectures_table(rows: dict, measured: dict, tasks) -> str:
    """The markdown table: parameters, file, s/step and s/image (median of the timing rounds, their range in
    brackets), then per task the convergence step per seed, the seconds to it and the final fidelity."""
    header = ["architecture", "trainable params", "file (KB)", "s / step", "s / image"]
    for t in tasks:
        header += [f"{t}: converged at step (seeds)", f"{t}: s to convergence (median)", f"{t}: final fidelity"]
    lines = []
    for a, r in rows.items():
        timed = []
        for k in ("seconds_per_step", "seconds_per_image"):
            rounds = measured[a][k + "_rounds"]
            timed.append(f"{r[k]:.3f}" + (f" ({min(rounds):.3f}-{max(rounds):.3f})" if len(rounds) > 1 else ""))
        line = [a, f"{r['trainable_params']:,}", f"{r['file_bytes'] / 1024:,.0f}", *timed]
        for t in tasks:
            if t not in r["converged_at_step"]:
                line += ["-", "-", "-"]
                continue
            steps = r["converged_at_step"][t]
            line += [", ".join("never" if s is None else str(s) for s in steps),
                     _median_seconds(r["converged_at_s"][t], len(steps)), viz.spread(r["fidelity_final"][t])]
        lines.append(line)
    return viz.markdown_table(header, lines)


def costs_figure(rows: dict, trained: Trained):
    """Costs and convergence, one panel each: trainable parameters and the weights file (log scales), seconds per
    training step and per generated image, and per task the step each seed converged at; a seed that never did is
    drawn as never, beyond the step budget."""
    first = next(iter(next(iter(trained.values())).values()))[0]
    batch = first.config.get("batch_size")
    panels = {
        "trainable parameters (millions)": {a: [r["trainable_params"] / 1e6] for a, r in rows.items()},
        "weights file (KB)": {a: [r["file_bytes"] / 1024] for a, r in rows.items()},
        f"seconds per training step (batch {batch})": {a: [r["seconds_per_step"]] for a, r in rows.items()},
        "seconds per generated image (DDIM 20)": {a: [r["seconds_per_image"]] for a, r in rows.items()},
    }
    budget = {}
    for t, by_arch in trained.items():
        title = f"{t}: step each seed converged at (bar: median)"
        panels[title] = {a: r["converged_at_step"][t] for a, r in rows.items() if t in r["converged_at_step"]}
        budget[title] = next(iter(by_arch.values()))[0].config["steps"]
    return viz.hbar_panels(panels, log_panels=("trainable parameters (millions)", "weights file (KB)"),
                           never_at=budget, formats={"weights file (KB)": lambda v: f"{v:,.0f}"})


def fidelity_figure(trained: Trained):
    """Held-out fidelity at each validation, per task (band: the seeds), the convergence threshold dashed."""
    metric = {t: next(iter(by_arch.values()))[0].convergence["metric"] for t, by_arch in trained.items()}
    title = {t: f"{t} task: {viz.METRIC_LABELS.get(m, m)}" for t, m in metric.items()}
    panels = {title[t]: {a: [(r.validation()["step"], r.validation()["fidelity"]) for r in rs]
                         for a, rs in by_arch.items()} for t, by_arch in trained.items()}
    return viz.spread_panels(panels, "condition fidelity on held-out items",
                             thresholds={title[t]: runs.THRESHOLDS[m] for t, m in metric.items()}, ylim=(0, 1))


def injection_figure(trained: Trained):
    """The RMS over injection points of what each adds to the base on the fixed probe batch, every step, per task."""
    panels = {f"{t} task": {a: [injected_rms(r.telemetry()) for r in rs] for a, rs in by_arch.items()}
              for t, by_arch in trained.items()}
    return viz.spread_panels(panels, "RMS of what it injects into the base\n(fixed probe batch, latent units)",
                             yscale="symlog")


def samples_figure(trained: Trained):
    """Each architecture's last validation grid of its first seed: held-out conditions above, images below."""
    paths, titles = [], []
    for t, by_arch in trained.items():
        for a, rs in by_arch.items():
            r, step = rs[0], rs[0].convergence["validated_steps"][-1]
            paths.append(r.sample_grid(step))
            titles.append(f"{t} task, {a} (seed {r.config['seed']}, step {step})")
    return viz.stacked_images(paths, titles, height=1.8)


def union_by_map(pipe, trained: Trained, rows: dict) -> dict[str, list[float]] | None:
    """The union net's final checkpoint of every seed given all its maps, then each map alone (the others black),
    on its validation items, prompts and seeds (``evaluations.evaluate_condition_subsets``), beside ControlNet
    trained on segmentation alone. Adds ``fidelity_by_map`` to the union row; returns label -> one value per seed
    (None without a union run)."""
    union_runs = trained.get("segmentation", {}).get("union", [])
    if not union_runs:
        return None
    by_seed = [evaluations.evaluate_condition_subsets(pipe, r.checkpoint, r.config["dataset"],
                                                      n=r.config["validation_size"],
                                                      steps=r.config.get("validation_steps", evaluations.STEPS))
               for r in union_runs]
    metric = union_runs[0].convergence["metric"]
    rows["union"]["fidelity_by_map"] = {k: [e[k][metric] for e in by_seed] for k in by_seed[0]}
    bars = {"union: all maps" if k == "all" else f"union: {k} alone": v
            for k, v in rows["union"]["fidelity_by_map"].items()}
    if "controlnet" in rows and "segmentation" in rows["controlnet"]["fidelity_final"]:
        bars["controlnet: segmentation (its only map)"] = rows["controlnet"]["fidelity_final"]["segmentation"]
    return bars


def union_table(bars: dict, metric: str = "miou") -> str:
    return viz.markdown_table(["given", f"final {viz.METRIC_LABELS.get(metric, metric)} (seeds)"],
                              [[k, viz.spread(v)] for k, v in bars.items()])


def union_figure(bars: dict, metric: str = "miou"):
    return viz.hbar_panels({f"segmentation task: final {viz.METRIC_LABELS.get(metric, metric)}, per seed": bars},
                           columns=1)


def claims_table(verdicts: list[dict]) -> str:
    says = {True: "**yes**", False: "**no**", None: "not measured"}
    return viz.markdown_table(["architecture", "published claim (source)", "the kit measured", "held"],
                              [[v["architecture"], f"{v['claim']} ({v['source']})", v["kit"], says[v["held"]]]
                               for v in verdicts])


CLAIM = ("ControlNet's successors: ControlNet-XS a fraction of the parameters and about twice as fast; T2I-Adapter "
         "light and run once per generation; ControlNeXt up to 90% fewer trainable parameters and fast convergence; "
         "Control-LoRA far smaller files; a union net serves several conditions at once.")


def summary_data(rows: dict, verdicts: list[dict], trained: Trained, measured: dict, seeds, tasks) -> dict:
    """``write_summary``'s arguments for notebook 10: the claim, the result in words, the checks (one per verdict
    that could be computed) and the data behind them."""
    result = "; ".join(f"{a}: {r['trainable_params']:,} params, {r['seconds_per_step']:.3f} s/step, converged at "
                       + ", ".join(f"{t} {steps}" for t, steps in r["converged_at_step"].items())
                       for a, r in rows.items())
    return dict(
        claim=CLAIM, result=result,
        checks={f"{v['architecture']}: {v['claim']}": v["held"] for v in verdicts if v["held"] is not None},
        seeds=seeds, tasks=tasks, rows=list(rows.values()), verdicts=verdicts,
        shipped_runs_read=sorted(r.folder.name for by_arch in trained.values() for rs in by_arch.values()
                                 for r in rs if r.folder.parent == bench_runs.SHIPPED_DIR),
        timing={a: {k: measured[a][k] for k in ("step_times", "seconds_per_step_rounds", "seconds_per_image_rounds",
                                                "batch_size", "threads", "images", "denoising_steps")}
                for a in measured})
