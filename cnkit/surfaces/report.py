"""``make figures``: run the notebooks through papermill and write a report.

    cnkit figures [--profile full] [--run NAME] [--only 00 04 ...] [--force]

Each notebook runs with ``profile`` and ``out_dir=reports/<run>/<notebook>/``; the executed copy
lands beside its outputs. ``reports/<run>/index.md`` gets one section per notebook: its title, the
figures it declares (``metadata.cnkit.outputs``) and its ``summary.json`` if it writes one. The
figures named in ``metadata.cnkit.key_figures`` are copied to ``docs/`` for the README.

A notebook is skipped when its last run in this folder finished with the same notebook source,
parameters and shipped data (a stamp file holds their hash; the shipped data by the index or card that
each ``data/`` folder's rebuild rewrites), so an interrupted ``make figures`` resumes where it stopped
and a rebuilt base or rebuilt shipped runs are read again. Notebooks that set
``metadata.cnkit.surfaces.report = false`` (pretraining) are never run here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import papermill as pm
import torch

from ..card import hardware
from ..experiments import configs as experiments
from ..experiments.runs import run_folder
from ..experiments.shipped import SHIPPED, train_config
from ..files import write_atomic
from ..params import REPO_ROOT
from ..summary import read_summary

ROOT = REPO_ROOT


def report_dir(name: str) -> Path:
    """``reports/<name>``: a report's executed notebooks, its index and, in ``runs/``, the training runs its notebooks
    share (``reports/full/runs``, make figures', is ``runs.FIGURE_RUNS``)."""
    return ROOT / "reports" / name


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        meta = json.loads(path.read_text()).get("metadata", {}).get("cnkit", {})
        if meta.get("report", True) and (not only or any(path.stem.startswith(o) for o in only)):
            found.append(path)
    return found


def _stamp(path: Path, parameters: dict, data_dir: Path | None = None) -> str:
    h = hashlib.sha256(path.read_bytes())
    h.update(json.dumps(parameters, sort_keys=True).encode())
    # Notebooks read the shipped base, nets and runs: each shipped folder's README (its card or index, which every
    # rebuild rewrites) stands for it, so that a rebuilt one is not answered from a report made on the old one.
    for index in sorted((data_dir or ROOT / "data").glob("*/README.md")):
        h.update(index.parent.name.encode() + index.read_bytes())
    return h.hexdigest()


def _title(nb: dict, fallback: str) -> str:
    for cell in nb["cells"]:
        src = "".join(cell["source"]).strip()
        if cell["cell_type"] == "markdown" and src.startswith("#"):
            return src.splitlines()[0].lstrip("# ").strip()
    return fallback


def run_notebook(path: Path, run_dir: Path, profile: str, force: bool = False,
                 data_dir: Path | None = None) -> tuple[str, float]:
    out_dir = run_dir / path.stem
    meta = json.loads(path.read_text()).get("metadata", {}).get("cnkit", {})
    parameters = {**meta.get("headless_parameters", {}), "profile": profile, "out_dir": str(out_dir)}
    stamp_file, stamp = out_dir / ".cnkit-stamp", _stamp(path, parameters, data_dir)
    if not force and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return "cached", 0.0
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pm.execute_notebook(str(path), str(out_dir / path.name), parameters=parameters, cwd=str(path.parent),
                        progress_bar=False, kernel_name="python3")
    write_atomic(stamp_file, stamp)
    return "ran", time.perf_counter() - start


def _checks(checks: dict) -> str:
    return "; ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in checks.items())


def write_index(run_dir: Path, paths: list[Path]) -> Path:
    lines = [f"# cnkit report: {run_dir.name}", "",
             f"Notebooks run by `make figures` on {hardware()}; each section: the paper's claim, what the kit "
             "measured, whether it held, the key figures and tables. Times are each notebook's last full run "
             "(training runs shared between notebooks count where they were first trained).", ""]
    recorded = {}
    for path in paths:
        nb = json.loads(path.read_text())
        meta = nb["metadata"].get("cnkit", {})
        out_dir = run_dir / path.stem
        executed = out_dir / path.name  # papermill records its run's duration in the executed copy
        if executed.is_file():
            duration = json.loads(executed.read_text())["metadata"].get("papermill", {}).get("duration")
            if duration:
                recorded[path.stem] = float(duration)
        lines += [f"## {_title(nb, path.stem)}", "", f"Notebook: [{path.name}]({path.stem}/{path.name})"
                  + (f", {recorded[path.stem] / 60:.1f} min" if path.stem in recorded else ""), ""]
        summary = read_summary(out_dir)
        if "paper_claim" in summary:  # the paper's claim, the kit's measurement, and whether it held
            held = {True: "**yes**", False: "**no**", None: "not decided"}[summary.get("held")]
            lines += [f"- **Paper:** {summary['paper_claim']}", f"- **Kit (measured):** {summary['kit_result']}",
                      f"- **Held:** {held}" + (f" ({_checks(summary['checks'])})" if summary.get("checks") else ""),
                      ""]
        for name in meta.get("key_figures", []) or [n for n in meta.get("outputs", []) if n.endswith(".png")]:
            if (out_dir / name).is_file():
                lines += [f"![{name}]({path.stem}/{name})", ""]
        for name in meta.get("outputs", []):
            if name.endswith(".md") and (out_dir / name).is_file():
                lines += [(out_dir / name).read_text(), ""]
        others = [n for n in meta.get("outputs", []) if n.endswith(".png") and n not in meta.get("key_figures", [])]
        if others and meta.get("key_figures"):
            lines += ["More figures: " + ", ".join(f"[{n}]({path.stem}/{n})" for n in others), ""]
        if summary:
            lines += ["<details><summary>summary.json</summary>", "", "```json",
                      json.dumps(summary, indent=1)[:4000], "```", "</details>", ""]
    # Runs only `make controlnets` trains (it shares runs/), not counted as the figures' cost.
    shipped = ({run_folder(train_config(name), run_dir / "runs").name for name in SHIPPED}
               - {run_folder(c, run_dir / "runs").name for c in experiments.figure_configs()})
    trained = [json.loads(f.read_text()) for f in sorted((run_dir / "runs").glob("*/convergence.json"))
               if f.parent.name not in shipped]
    fresh = [c for c in trained if not c.get("resumed")]
    # Runs trained side by side (cnkit.experiments.configs --workers) overlap: weight each by its share of the threads.
    threads = max([c.get("threads", 0) for c in fresh] + [torch.get_num_threads()])
    train_s = sum(c["wall_time_s"] * c.get("threads", threads) / threads for c in fresh)
    lines[2:2] = [
        f"Notebooks' last runs: {sum(recorded.values()) / 60:.0f} min ("
        + ", ".join(f"{k[:2]} {v / 60:.1f}" for k, v in recorded.items()) + "); training runs they share "
        f"({len(trained)} in `runs/`, each trained once, wall times from their convergence.json, each weighted by "
        f"its share of the {threads} threads): {train_s / 60:.0f} min. From scratch, `make figures` costs about "
        f"the sum: {(sum(recorded.values()) + train_s) / 60:.0f} min.", ""]
    measured = _measured_line(run_dir)
    if measured:
        lines[2:2] = [measured, ""]
    index = run_dir / "index.md"
    index.write_text("\n".join(lines))
    return index


class Clock:
    """``timing.json``: this ``make figures``' own clock, saved every few seconds while it runs, so that a run
    that is interrupted and resumed adds up to one total over its sittings (until one finishes; the next
    ``make figures`` after a finished one starts a new record)."""

    def __init__(self, run_dir: Path, from_scratch: bool, only=None, every_s: float = 30.0):
        self.path = run_dir / "timing.json"
        old = json.loads(self.path.read_text()) if self.path.is_file() else None
        if old and old.get("sittings") and not old["sittings"][-1]["finished"] and old.get("only") == only:
            self.record = old  # an interrupted make figures: this sitting continues its record
        else:
            self.record = {"from_scratch": from_scratch, "only": only, "hardware": hardware(), "sittings": []}
        # Each sitting names its machine: a make figures resumed in another session may run on another CPU.
        self.sitting = {"started": _now(), "finished": None, "wall_s": 0.0, "training_runs_s": None,
                        "hardware": hardware(), "notebooks": {}}
        self.record["sittings"].append(self.sitting)
        self.t0, self.every_s = time.perf_counter(), every_s
        # The heartbeat thread saves while the main thread records: one lock around both.
        self._lock, self._stop = threading.Lock(), threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()
        self.save()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            self.save()

    def stop(self) -> None:
        """Save once more and stop, leaving the sitting unfinished: what an interrupted run leaves for the
        next one to resume."""
        self.save()
        self._stop.set()

    def record_training(self, seconds: float) -> None:
        with self._lock:
            self.sitting["training_runs_s"] = round(seconds, 1)
        self.save()

    def record_notebook(self, stem: str, status: str, seconds: float) -> None:
        with self._lock:
            self.sitting["notebooks"][stem] = {"status": status, "seconds": round(seconds, 1)}
        self.save()

    def save(self, finished: bool = False) -> None:
        with self._lock:
            self.sitting["wall_s"] = round(time.perf_counter() - self.t0, 1)
            if finished:
                self.sitting["finished"] = _now()
                self._stop.set()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.record, indent=1))
            tmp.replace(self.path)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def _measured_line(run_dir: Path) -> str:
    """The end-to-end time of ``make figures`` here (over its sittings), and whether it started from nothing."""
    f = run_dir / "timing.json"
    if not f.is_file():
        return ""
    t = json.loads(f.read_text())
    sittings = t["sittings"]
    notebooks = [n for s in sittings for n in s["notebooks"].values()]
    ran = sum(1 for n in notebooks if n["status"] == "ran")
    what = ("from scratch (no trained run or executed notebook in this folder before)" if t["from_scratch"]
            else f"resuming an earlier report ({ran} notebooks ran, the others were cached)")
    if len(sittings) > 1:
        what += f", in {len(sittings)} sittings (interrupted and resumed)"
    # A sitting interrupted while training records no training time, so a sum over some sittings would mislead.
    training = [s["training_runs_s"] for s in sittings]
    runs = (f", of which {sum(training) / 60:.0f} min training the runs ahead of the notebooks"
            if training and None not in training else "")
    state = "" if sittings[-1]["finished"] else " so far (its last sitting did not finish: rerun to resume)"
    minutes: dict[str, float] = {}  # per machine, in the order the sittings met them
    for s in sittings:
        machine = s.get("hardware", t["hardware"])  # records from before sittings named theirs
        minutes[machine] = minutes.get(machine, 0.0) + s["wall_s"] / 60
    where = next(iter(minutes)) if len(minutes) == 1 else "machines that differed between sittings: " + "; ".join(
        f"{m} ({v:.0f} min)" for m, v in minutes.items())
    return (f"Measured: `make figures` here ran {what}, from {sittings[0]['started']}: "
            f"**{sum(s['wall_s'] for s in sittings) / 60:.0f} min** end to end{state}{runs}, on {where} "
            "(set-up of the venv not included).")


def copy_key_figures(run_dir: Path, paths: list[Path], docs: Path) -> list[Path]:
    docs.mkdir(exist_ok=True)
    copied = []
    for path in paths:
        for name in json.loads(path.read_text())["metadata"].get("cnkit", {}).get("key_figures", []):
            src = run_dir / path.stem / name
            if src.is_file():
                copied.append(Path(shutil.copy(src, docs / f"{path.stem}_{name}")))
    return copied


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="full", choices=["full", "smoke"])
    ap.add_argument("--run", default=None, help="folder name under reports/ (default: the profile)")
    ap.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 00 04")
    ap.add_argument("--force", action="store_true", help="rerun notebooks even when their stamp matches")
    ap.add_argument("--workers", type=int, default=0,
                    help="full profile: train the figures' runs this many at a time before the notebooks "
                         "(0: cnkit.experiments.configs.default_workers(), 2 on a CPU; 1: one after another)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_dir = report_dir(args.run or args.profile)
    paths = notebooks(args.only)
    # From scratch: nothing of an earlier make figures here (no trained run, no executed notebook).
    from_scratch = not (any(run_dir.glob("runs/*/convergence.json")) or any(run_dir.glob("*/.cnkit-stamp")))
    clock = Clock(run_dir, from_scratch, args.only)
    if args.profile == "full" and not args.only:
        # The notebooks' training runs first, side by side (notebooks then read them back): on a CPU two
        # one-thread runs at a time train faster than one two-thread run (bench/train_step_variants.py).
        start = time.perf_counter()
        print("[runs] the figures' training runs (cnkit.experiments.configs), kept in", run_dir / "runs", flush=True)
        experiments.train_all(experiments.figure_configs(), run_dir / "runs",
                              args.workers or experiments.default_workers(), log=lambda m: print(m, flush=True))
        clock.record_training(time.perf_counter() - start)
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name} ({args.profile}) ...", end=" ", flush=True)
        try:
            status, seconds = run_notebook(path, run_dir, args.profile, args.force)
        except Exception as e:
            print(f"FAILED: {type(e).__name__}: {str(e)[:2000]}")
            print(f"the executed notebook is in {run_dir / path.stem}; fix and rerun: finished ones are cached")
            clock.stop()  # unfinished: the rerun resumes this record
            return 1
        clock.record_notebook(path.stem, status, seconds)
        print(f"{status} in {seconds:.0f} s" if status == "ran" else status, flush=True)
    clock.save(finished=True)
    index = write_index(run_dir, paths)
    copied = copy_key_figures(run_dir, paths, ROOT / "docs") if args.profile == "full" else []
    print(f"report: {index.relative_to(ROOT)}; {len(copied)} figures copied to docs/; "
          f"{clock.sitting['wall_s']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
