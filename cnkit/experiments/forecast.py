"""The forecast study: does any cheap signal announce sudden convergence before validation sees it?

Ground truth is dense validation (``validation.csv``: fidelity every few steps; convergence as ``cnkit.metrics``
detects it: the first validated step from which fidelity stays at or above the metric's threshold). Candidate
signals are what a run logs without generating an image:

- ``signals.csv`` (``telemetry.ConditionProbe``): the probe's denoising loss with true, shuffled and blank conditions,
  their gaps (``condition_gap``, ``condition_gap_rel``, ``blank_gap``);
- ``telemetry.csv``: the injected signal (RMS over injection points of what each adds to the base on a fixed probe,
  ``injected_rms``), its growth per 100 steps (``injected_rms_growth``), the injection points' summed gradient norm;
- the training loss (``loss``, smoothed over 25 steps).

A rule (``cnkit.training.forecast.ForecastRule``) is *designed* on some runs (a grid of signals, thresholds,
patience and slope windows, scored by hits with lead, against false alarms) and *frozen*; then it is *tested* on
runs held out from the design. Per run: the step it fires, validation's convergence step, the lead in steps and in
seconds (from the run's own clock), and the outcome: ``early`` (fired before convergence: the target), ``late``
(fired at or after it), ``from the start`` (fired at the first reading it could, on a converging run: the signal
was over the threshold before anything was learned, so it forecast nothing; not counted as early), ``missed`` (never
fired on a converging run), ``false alarm`` (fired on a run that never converged) or ``quiet`` (never fired, never
converged: right).

    cnkit forecast RUN_DIR [RUN_DIR ...]          the frozen rule on finished runs: fired at, converged at, lead
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..metrics import CONVERGENCE_THRESHOLDS, convergence
from ..training.forecast import DEFAULT_RULE, ForecastRule
from . import configs
from .bench_runs import FORECAST_DIR, SHIPPED_DIR, publish
from .configs import default_workers, forecast_configs, train_all
from .runs import Run, find, read_table, run_folder

SIGNALS = ("condition_gap_rel", "condition_gap", "blank_gap", "injected_rms", "injected_rms_growth",
           "grad_norm", "loss")


def _stamp(folder) -> tuple:
    """What a finished run's tables are, for the caches below: a table rewritten (a resumed run) reads afresh."""
    return tuple((f.name, f.stat().st_mtime_ns) for f in sorted(Path(folder).glob("*.csv")))


def run_signals(folder, probe_every: int = 0) -> dict[str, tuple[list[int], list[float]]]:
    """Every candidate signal a finished run logged: name -> (steps, values). ``probe_every``: keep only the probe's
    readings at multiples of it (what a run probing less often would have logged; 0: every reading). Read once per
    run (the design judges ~150 rules on each)."""
    return _run_signals(str(folder), probe_every, _stamp(folder))


@functools.lru_cache(maxsize=256)
def _run_signals(folder: str, probe_every: int, stamp: tuple) -> dict[str, tuple[list[int], list[float]]]:
    run, out = Run(folder), {}
    signals = Path(folder) / "signals.csv"
    if signals.is_file():
        table = read_table(signals)
        keep = [i for i, s in enumerate(table["step"]) if not probe_every or int(s) % probe_every == 0]
        for name in ("condition_gap_rel", "condition_gap", "blank_gap"):
            if name in table:
                out[name] = ([int(table["step"][i]) for i in keep], [table[name][i] for i in keep])
    tel = run.telemetry()
    steps = np.asarray(tel["step"], int)
    into_base = np.array(["controlnet_cond_embedding" not in n for n in tel["name"]])
    rms = np.asarray(tel["residual_rms"], float)
    grad = np.asarray([g if g == g else 0.0 for g in tel["grad_norm"]], float)  # parameter-free points: empty
    uniq = sorted(set(steps.tolist()))
    injected = [float(np.sqrt(np.mean(rms[(steps == s) & into_base] ** 2))) for s in uniq]
    out["injected_rms"] = (uniq, injected)
    out["injected_rms_growth"] = (uniq, list(ForecastRule(transform="slope", window=5).series(uniq, injected)))
    out["grad_norm"] = (uniq, [float(np.sqrt(np.sum(grad[steps == s] ** 2))) for s in uniq])
    loss_steps, loss = run.loss() if (run.checkpoint / "trainer_state.json").is_file() else ([], [])
    if len(loss) >= 25:
        smooth = np.convolve(loss, np.ones(25) / 25, mode="valid")
        out["loss"] = (list(loss_steps[24:]), [-float(v) for v in smooth])  # rising = improving, like the others
    return out


def truth(folder) -> dict:
    """Validation's account of a run: its metric, the validated steps and fidelity, the convergence step (None if
    it never converged within its budget) and the wall seconds of each validated step since the run started."""
    return _truth(str(folder), _stamp(folder))


@functools.lru_cache(maxsize=256)
def _truth(folder: str, stamp: tuple) -> dict:
    table = read_table(Path(folder) / "validation.csv")
    metric = table["metric"][0]
    steps = [int(s) for s in table["step"]]
    c = convergence(steps, table["fidelity"], CONVERGENCE_THRESHOLDS.get(metric, 0.5))
    elapsed = np.asarray(table["elapsed_s"], float)
    return {"metric": metric, "steps": steps, "fidelity": list(table["fidelity"]),
            "elapsed_s": list(table["elapsed_s"]), "converged_at_step": c["converged_at_step"],
            # A run resumed before the kit kept the earlier sittings' clocks restarts its clock (or logs nan).
            "clock_whole": bool(np.all(np.isfinite(elapsed)) and np.all(np.diff(elapsed) > 0))}


def whole_train_loop_s(c: dict) -> float | None:
    """A finished run's training loop in seconds over all its sittings (its ``convergence.json``), or None where
    it recorded its last sitting's only (resumed from a checkpoint that predates the kit's keeping the clocks)."""
    if c.get("resumed") and c.get("clock") != "all sittings":
        return None
    return c.get("train_loop_s")


def label(folder) -> str:
    """A run in a few words for tables and titles: its folder name without the key and the world's prefixes, and
    the settings that set it apart from the kit's recipe (two controls share the name ``zero-toy-fill-seed0``)."""
    folder = Path(folder)
    name = re.sub(r"-[0-9a-f]{10}$", "", folder.name)  # the run key (cnkit.experiments.runs.run_key)
    name = name.replace("-toy-", "-").replace("shapes-", "").replace("segmentation-depth-edges-outline", "4 maps")
    cfg_file = folder / "train_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    apart = ([f"lr {cfg['learning_rate']:g}"] if cfg.get("learning_rate", 1e-3) != 1e-3 else []) + (
        [f"{cfg['timestep_sampling']} t"] if cfg.get("timestep_sampling", "cubic") != "cubic" else [])
    return name + (f" ({', '.join(apart)})" if apart else "")


def _seconds_at(t: dict, step: int) -> float:
    """The run's wall clock at ``step`` (interpolated between validations, whose times it logs)."""
    return float(np.interp(step, t["steps"], t["elapsed_s"]))


def judge(rule: ForecastRule, folder, probe_every: int = 0) -> dict:
    """The rule on one finished run, against validation: fired at, converged at, lead, outcome."""
    signals, t = run_signals(folder, probe_every), truth(folder)
    if rule.signal not in signals:
        return {"run": Path(folder).name, "signal_missing": rule.signal, "outcome": "no signal"}
    fired = rule.fire_step(*signals[rule.signal])
    from_start = fired is not None and fired == rule.earliest_step(*signals[rule.signal])
    conv = t["converged_at_step"]
    if conv is None:
        outcome = "false alarm" if fired is not None else "quiet"
    else:  # firing at the first reading it could is no forecast: the signal carried no news of convergence
        outcome = ("missed" if fired is None else "from the start" if from_start else "early" if fired < conv
                   else "late")
    row = {"run": Path(folder).name, "fired_at_step": fired, "fired_from_start": from_start,
           "converged_at_step": conv, "outcome": outcome,
           "lead_steps": conv - fired if fired is not None and conv is not None else None,
           "lead_s": (_seconds_at(t, conv) - _seconds_at(t, fired)) if fired is not None and conv is not None
           and t["clock_whole"]
           else None, "final_fidelity": t["fidelity"][-1], "metric": t["metric"]}
    return row


def in_words(row: dict) -> str:
    """``judge``'s row as a sentence: what the forecast said and when, beside what validation saw."""
    if row["outcome"] == "no signal":
        return f"{row['run']}: no {row['signal_missing']} logged (trained with signals_every=0?), no forecast"
    fired, conv = row["fired_at_step"], row["converged_at_step"]
    said = (f"the forecast said 'condition in use, convergence expected' at step {fired}" if fired is not None
            else "the forecast never fired ('no sign of convergence yet' to the end)")
    seen = (f"validation saw convergence at step {conv}" if conv is not None
            else "validation never saw convergence")
    verdict = {"early": f"{row['lead_steps']} steps ahead", "late": "late", "missed": "a miss",
               "from the start": "no forecast: the signal was over the threshold from the start",
               "false alarm": "a false alarm", "quiet": "rightly quiet"}[row["outcome"]]
    return f"{said}; {seen} ({verdict})"


def score(rows: list[dict]) -> dict:
    """How a rule did over runs: hits (fired early), their median lead, late, missed, false alarms, quiet."""
    outcomes = [r["outcome"] for r in rows]
    converging = [r for r in rows if r.get("converged_at_step") is not None]
    leads = [r["lead_steps"] for r in rows if r["outcome"] == "early"]
    return {"runs": len(rows), "converging": len(converging), "early": outcomes.count("early"),
            "late": outcomes.count("late"), "missed": outcomes.count("missed"),
            "from_start": outcomes.count("from the start"),
            "false_alarms": outcomes.count("false alarm"), "quiet": outcomes.count("quiet"),
            "early_share": outcomes.count("early") / len(converging) if converging else None,
            "median_lead_steps": float(np.median(leads)) if leads else None}


def scores_table(by_group: dict[str, dict]) -> str:
    """``study``'s score per group as a markdown table (notebook 11 prints one per rule it judges)."""
    from ..viz import markdown_table  # noqa: PLC0415 - matplotlib only where a table is drawn

    return markdown_table(["group", "runs", "converging", "fired early", "late", "from the start", "missed",
                           "false alarms", "quiet", "median lead (steps)"],
                          [[g, s["runs"], s["converging"], s["early"], s["late"], s["from_start"], s["missed"],
                            s["false_alarms"], s["quiet"], s["median_lead_steps"]] for g, s in by_group.items()])


def candidate_rules() -> list[ForecastRule]:
    """The grid the design searches: each signal's level (or decade) against a range of thresholds, and the gap's
    growth in decades per 100 steps, over 1-3 readings."""
    grid = []
    levels = {"condition_gap_rel": [1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1],
              "condition_gap": [1e-6, 1e-5, 1e-4, 1e-3],
              "blank_gap": [1e-6, 1e-5, 1e-4, 1e-3],
              "injected_rms": [0.05, 0.1, 0.2, 0.5, 1.0],
              "injected_rms_growth": [0.05, 0.1, 0.2, 0.5],
              "grad_norm": [0.01, 0.03, 0.1, 0.3],
              "loss": [-0.02, -0.015, -0.01, -0.008]}  # minus the smoothed loss: it rises as the loss falls
    for (signal, thresholds), patience in itertools.product(levels.items(), (1, 2, 3)):
        grid += [ForecastRule(signal, th, patience) for th in thresholds]
    for signal, patience, window in itertools.product(("condition_gap_rel", "blank_gap"), (1, 2), (3, 5)):
        grid += [ForecastRule(signal, th, patience, "log_slope", window) for th in (0.5, 1.0, 2.0, 4.0)]
    return grid


def design(folders, rules=None, max_false_alarms: int = 0, probe_every: int = 0) -> tuple[ForecastRule, list[dict]]:
    """The rule of the grid that fires early on the most converging design runs, with at most
    ``max_false_alarms`` on the design's non-converging runs (without such runs the design cannot learn to stay
    quiet: a rule that fires on everything at step 2 scores perfectly); ties go to the longer median lead, then to
    the higher threshold (the more conservative rule). ``probe_every``: design on the readings a run probing that
    often logs. Returns the rule and every candidate's score, for the record."""
    table = []
    for rule in rules or candidate_rules():
        rows = [judge(rule, f, probe_every) for f in folders]
        if any(r["outcome"] == "no signal" for r in rows):
            continue
        table.append({"rule": asdict(rule), **score(rows)})
    ok = [s for s in table if s["false_alarms"] <= max_false_alarms] or table
    best = max(ok, key=lambda s: (s["early"], s["median_lead_steps"] or 0, -s["late"], s["rule"]["threshold"]))
    return ForecastRule(**best["rule"]), table


# The study's targets (issue 30): on held-out converging runs the rule fires before validation's convergence in at
# least 80% with a median lead of at least 50 steps; at most one false alarm over all non-converging runs; the signal
# costs at most 5% of training time.
TARGETS = {"early_share": 0.8, "median_lead_steps": 50, "false_alarms": 1, "signal_cost_share": 0.05}


def study_groups(runs_dir, shipped_runs: bool = True, smoke: bool = False) -> dict[str, list[Path]]:
    """The finished runs the study reads, by group. ``design``: the paper's ControlNet on the fill world (notebook
    04's seeds and its uniform-timesteps run, notebook 08's dataset sizes) and, on seed 0, notebook 11's two fill runs
    that never converge (without them the design cannot learn to stay quiet). Every other group is held out from the
    design: segmentation (09), the Gaussian and lite ablations (06, 09), ControlNet's successors and the union net
    (10), the same controls on seed 1, conditions no other notebook trains on, and the kit's runs on Fill50K-format
    data it did not make. A run is read from ``runs_dir`` when trained there, else from the shipped folders
    (``data/architecture-runs``, ``data/forecast-runs``) when ``shipped_runs``; of two copies of one run, the one
    that carries the probe's ``signals.csv`` is read. Missing runs are left out."""
    where = [Path(runs_dir)] + ([SHIPPED_DIR, FORECAST_DIR] if shipped_runs else [])

    def found(cfgs) -> list[Path]:
        out = []
        for cfg in cfgs:
            copies = [run.folder for run in (find(cfg, folder) for folder in where)
                      if run is not None and (run.folder / "validation.csv").is_file()]
            if copies:
                out.append(next((c for c in copies if (c / "signals.csv").is_file()), copies[0]))
        return list(dict.fromkeys(out))  # one run may serve two notebooks (the smoke profile makes many alike)

    s = configs.SEEDS
    controls = {k: [configs.run_config(smoke, **{**o, "seed": k}) for o in configs.FORECAST_CONTROLS.values()]
                for k in (0, 1)}
    groups = {
        "design: ControlNet on fill (04, 08, 11)": found([configs.ablation("zero", k, smoke) for k in s]
                                                          + [configs.sampling_comparison(s[0], smoke)]
                                                          + [configs.dataset_size(n, k, smoke)
                                                             for n in configs.DATASET_SIZES for k in s]
                                                          + controls[0]),
        "ControlNet on segmentation (09)": found([configs.reconstruction("zero", k, smoke) for k in s]),
        "Gaussian and lite ablations (06, 09)": found([configs.ablation(v, k, smoke) for v in ("gaussian", "lite")
                                                       for k in s] + [configs.reconstruction("lite", k, smoke)
                                                                      for k in s]),
        "successors and union (10)": found(configs.bench_configs(smoke)),
        "controls on another seed (11)": found(controls[1]),
        "new conditions (11)": found([configs.run_config(smoke, **{**o, "seed": 0})
                                      for o in configs.FORECAST_NEW_CONDITIONS.values()]),
    }
    extra = sorted(p.parent for p in FORECAST_DIR.glob("independent-*/validation.csv")) if shipped_runs else []
    if extra:
        groups["Fill50K-format data the kit did not make"] = extra
    return groups


def signal_cost(folder, probe_every: int = 0) -> float | None:
    """The condition probe's share of the run's training time (its own clock, validations taken out), counting only
    the readings at multiples of ``probe_every`` (what probing that often costs; each reading's seconds are
    measured)."""
    folder = Path(folder)
    if not (folder / "signals.csv").is_file():
        return None
    table = read_table(folder / "signals.csv")
    seconds = np.asarray(table["seconds"], float)
    every = np.array([not probe_every or int(st) % probe_every == 0 for st in table["step"]])
    probe_all, probe = float(np.nansum(seconds)), float(np.nansum(seconds[every]))
    c = json.loads((folder / "convergence.json").read_text())
    validation = float(np.nansum(read_table(folder / "validation.csv")["seconds"]))
    loop = whole_train_loop_s(c)
    training = None if loop is None else loop - validation - probe_all
    return probe / training if training is not None and training > 0 else None


# The signals every run of the kit has logged since its first (telemetry.csv and the loss); the probe's came later,
# so the shipped successor runs can be judged only by rules over these.
TELEMETRY_SIGNALS = ("injected_rms", "injected_rms_growth", "grad_norm", "loss")


def study(groups: dict[str, list[Path]], rule: ForecastRule | None = None, signals=None, probe_every: int = 0) -> dict:
    """Design the rule on ``groups``' design group (or take ``rule``; ``signals``: only rules over these), freeze
    it, judge every run with it (``probe_every``: design and judge as if the probe had read only at multiples of
    it). Returns the rule, the design grid's scores, one row per run (with its group), the score per group and over
    the held-out groups, and the targets against what was measured."""
    design_key = next(k for k in groups if k.startswith("design"))
    grid = []
    if rule is None:
        rules = [r for r in candidate_rules() if signals is None or r.signal in signals]
        rule, grid = design(groups[design_key], rules, probe_every=probe_every)
    rows = [{"group": g, **judge(rule, f, probe_every)} for g, folders in groups.items() for f in folders]
    held_out = [r for r in rows if r["group"] != design_key and r["outcome"] != "no signal"]
    by_group = {g: score([r for r in rows if r["group"] == g and r["outcome"] != "no signal"]) for g in groups}
    test = score(held_out) if held_out else {}
    costs = [c for folders in groups.values() for f in folders if (c := signal_cost(f, probe_every)) is not None]
    measured = {"early_share": test.get("early_share"), "median_lead_steps": test.get("median_lead_steps"),
                "false_alarms": test.get("false_alarms"),
                "signal_cost_share": float(np.median(costs)) if costs else None}
    held = {k: (v is not None and (v <= TARGETS[k] if k in ("false_alarms", "signal_cost_share") else v >= TARGETS[k]))
            for k, v in measured.items()}
    return {"rule": asdict(rule), "design_grid": grid, "rows": rows, "by_group": by_group, "held_out": test,
            "targets": {k: {"measured": measured[k], "target": TARGETS[k], "held": held[k]} for k in TARGETS}}


def savings(folder, rule: ForecastRule, stop_after: int | None = None, probe_every: int = 0) -> dict:
    """What the forecast would have saved a finished, densely validated run, computed from its own tables (the weights
    do not depend on when validation runs, so the counterfactual is exact): the validations before the rule fired
    (``validate_on="forecast"`` keeps step 0's), their seconds; with ``stop_after``, the training after validation
    confirmed convergence plus ``stop_after`` steps, its seconds, and the fidelity the run would have ended with
    against the one it ended with."""
    folder = Path(folder)
    t, signals = truth(folder), run_signals(folder, probe_every)
    table = read_table(folder / "validation.csv")
    seconds = dict(zip((int(s) for s in table["step"]), table["seconds"]))
    c = json.loads((folder / "convergence.json").read_text())
    fired = rule.fire_step(*signals[rule.signal]) if rule.signal in signals else None
    last = t["steps"][-1]
    skipped = [s for s in t["steps"] if 0 < s < last and (fired is None or s < fired)]
    out = {"run": folder.name, "fired_at_step": fired, "last_step": last, "validations": len(t["steps"]),
           "validations_skipped": len(skipped), "validation_s_saved": float(sum(seconds[s] for s in skipped)),
           "validation_s_total": float(sum(seconds.values())), "train_loop_s": whole_train_loop_s(c)}
    if stop_after is not None:
        threshold = CONVERGENCE_THRESHOLDS.get(t["metric"], 0.5)
        confirmed = next((s for s, f in zip(t["steps"], t["fidelity"])
                          if fired is not None and s >= fired and f >= threshold), None)
        stop = None if confirmed is None else min(confirmed + stop_after, last)
        at_stop = None if stop is None else float(np.interp(stop, t["steps"], t["fidelity"]))
        loop = out["train_loop_s"]
        per_step = None if loop is None else (loop - out["validation_s_total"]) / max(1, last)
        out.update(confirmed_at_step=confirmed, stopped_at_step=stop, fidelity_at_stop=at_stop,
                   fidelity_final=t["fidelity"][-1],
                   train_s_saved=0.0 if stop is None else None if per_step is None else per_step * (last - stop),
                   validation_s_saved_after_stop=float(sum(v for s, v in seconds.items()
                                                           if stop is not None and stop < s < last)))
    return out


def savings_summary(groups: dict[str, list[Path]], rule: ForecastRule, stop_after: int | None = None,
                    probe_every: int = 0) -> dict:
    """``savings`` over every run of the study that carries the rule's signal: per run, and in total (what
    ``validate_on="forecast"``, with ``stop_after_convergence=stop_after`` unless None, would have saved those runs:
    validation seconds, training seconds, as shares of their train loops) with the fidelity given up by stopping
    (none without ``stop_after``: the weights are the same, only fewer of them are scored)."""
    rows = []
    for g, folders in groups.items():
        for f in folders:
            if rule.signal in run_signals(f, probe_every):
                rows.append({"group": g, **savings(f, rule, stop_after, probe_every)})
    # Shares of time over the runs whose whole clock is known; the others still count in steps and fidelity.
    timed = [r for r in rows if r["train_loop_s"] is not None]
    loop = sum(r["train_loop_s"] for r in timed)
    val = sum(r["validation_s_saved"] + r.get("validation_s_saved_after_stop", 0.0) for r in timed)
    train = sum(r.get("train_s_saved") or 0.0 for r in timed)
    drops = [r["fidelity_final"] - r["fidelity_at_stop"] for r in rows  # over the runs it did stop early
             if r.get("stopped_at_step") is not None and r["stopped_at_step"] < r["last_step"]]
    total = {"runs": len(rows), "runs_timed": len(timed), "train_loop_s": loop, "validation_s_saved": val,
             "train_s_saved": train,
             "share_saved": (val + train) / loop if loop else None,
             "validation_s_total": sum(r["validation_s_total"] for r in timed),
             "stopped_early": sum(r.get("stopped_at_step") is not None and r["stopped_at_step"] < r["last_step"]
                                  for r in rows),
             "largest_fidelity_drop": max(drops) if drops else None,
             "median_fidelity_drop": float(np.median(drops)) if drops else None}
    return {"rule": asdict(rule), "stop_after": stop_after, "rows": rows, "total": total}


def timelines_figure(folders: list[Path], rule: ForecastRule, columns: int = 4, probe_every: int = 0):
    """Per run: the rule's signal (log scale; the readings at multiples of ``probe_every``) and validation's fidelity
    against step, the step the rule fired (solid line) and validation's convergence step (dashed)."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - only the notebook's figure needs it

    rows = max(1, -(-len(folders) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False)
    for ax, folder in zip(axes.flat, folders):
        t, signals = truth(folder), run_signals(folder, probe_every)
        ax.plot(t["steps"], t["fidelity"], color="C0", marker=".", label="validation fidelity")
        ax.axhline(CONVERGENCE_THRESHOLDS.get(t["metric"], 0.5), color="C0", linestyle=":", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("optimizer step", fontsize=9)
        if rule.signal in signals:
            twin = ax.twinx()
            steps, values = signals[rule.signal]
            twin.plot(steps, np.clip(values, 1e-8, None), color="C3", linewidth=1, label=rule.signal)
            twin.set_yscale("log")
            twin.tick_params(labelsize=8)
            fired = rule.fire_step(steps, values)
            if fired is not None:
                ax.axvline(fired, color="C3", linewidth=1.5)
        if t["converged_at_step"] is not None:
            ax.axvline(t["converged_at_step"], color="C0", linestyle="--", linewidth=1.5)
        ax.set_title(label(folder)[:40], fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(folders):]:
        ax.axis("off")
    fig.suptitle("red: the probe's signal (log scale), red line where the rule fired; blue: validation fidelity, "
                 "dashed at its convergence step", fontsize=10)
    fig.tight_layout()
    return fig


def write_index(folder=FORECAST_DIR) -> Path:
    """``README.md`` of ``data/forecast-runs``: what it holds and one line per run, from the run's own files."""
    lines = ["# The forecast study's runs (tables only)", "",
             "Written by `cnkit forecast runs` (`make forecast-runs`): notebook 11's own runs (controls that never "
             "converge, conditions no other notebook trains on, successors trained again with the probe), the "
             "figures' runs that carry the probe (the study's design group) and, as `independent-*`, runs on "
             "Fill50K-format data the kit did not make (`bench/forecast_savings.py --publish`). Tables and the last "
             "sample grid, no weights: notebook 11 reads `validation.csv`, `signals.csv` and `telemetry.csv`.", "",
             "| run | steps | converged at step | final fidelity | probe readings |", "|---|---|---|---|---|"]
    for run in sorted(p.parent for p in Path(folder).glob("*/convergence.json")):
        c = json.loads((run / "convergence.json").read_text())
        readings = len(read_table(run / "signals.csv")["step"]) if (run / "signals.csv").is_file() else 0
        lines.append(f"| {run.name} | {c['steps']} | {c['converged_at_step']} | {c['metric']} "
                     f"{c['fidelity_final']:.3f} | {readings} |")
    index = Path(folder) / "README.md"
    index.write_text("\n".join(lines) + "\n")
    return index


def main(argv=None) -> int:
    """``cnkit forecast judge RUN_DIR [...]``: the frozen forecast rule on finished runs, beside their validation.
    ``cnkit forecast runs``: train notebook 11's own runs (``configs.forecast_configs``: controls that never converge,
    conditions no other notebook uses) and ship their tables in ``data/forecast-runs``."""
    ap = argparse.ArgumentParser(prog="cnkit forecast", description=main.__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    j = sub.add_parser("judge", help="the rule on finished runs")
    j.add_argument("runs", nargs="+", help="finished run folders (with validation.csv and signals.csv)")
    j.add_argument("--rule", default="", help="a JSON ForecastRule (default: the kit's frozen rule)")
    r = sub.add_parser("runs", help="train and ship notebook 11's own runs")
    r.add_argument("--runs-dir", default="reports/forecast/runs", help="where they train (resumable)")
    r.add_argument("--workers", type=int, default=0, help="runs trained at a time (0: two on a CPU)")
    r.add_argument("--figure-runs", default="", help="also ship the tables of the figures' runs found here that "
                   "carry the probe (make figures leaves them in reports/full/runs), so that the study's design "
                   "group is in the checkout")
    r.add_argument("--base", default="", help="train (and look for) them on this base instead of the recipe's")
    r.add_argument("--shipped-dir", default=str(FORECAST_DIR), help="where their tables are shipped")
    args = ap.parse_args(argv)
    if args.command == "runs":
        own = configs.on_base(forecast_configs(), args.base)

        def ship(cfg):  # each run as it finishes, so an interrupted rebuild keeps what it trained
            print("published", publish(Run(run_folder(cfg, args.runs_dir)), cfg, args.shipped_dir, weights=False),
                  flush=True)
            write_index(args.shipped_dir)

        todo = configs.not_shipped(own, args.shipped_dir)  # an interrupted rebuild continues on another checkout
        train_all(todo, Path(args.runs_dir), args.workers or default_workers(), on_done=ship)
        for cfg in (configs.on_base(configs.figure_configs(), args.base) if args.figure_runs else []):
            run = find(cfg, args.figure_runs)
            finished = run is not None and (run.folder / "convergence.json").is_file()
            if finished and (run.folder / "signals.csv").is_file():
                print("published", publish(run, cfg, args.shipped_dir, weights=False))
        print("index:", write_index(args.shipped_dir))
        return 0
    rule = ForecastRule(**json.loads(args.rule)) if args.rule else DEFAULT_RULE
    rows = [judge(rule, f) for f in args.runs]
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"rule": asdict(rule), **score([row for row in rows if row["outcome"] != "no signal"])}))
    return 0
