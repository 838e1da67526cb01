"""What the live forecast saves a real run: the same run twice, side by side, validated on a schedule and gated by
the forecast, measured on the clock.

    .venv/bin/python bench/forecast_savings.py [--dataset DIR] [--steps 1000] [--validate-every 50]
        [--stop-after 0] [--out reports/forecast-savings]

Two ``cnkit train`` processes start together, one thread each, with the same seed and data: ``schedule`` validates
every ``--validate-every`` steps (what every run did before the forecast); ``forecast`` sets ``--forecast=true
--validate_on=forecast`` (validation at step 0, then on the same schedule only once the kit's frozen rule,
``DEFAULT_RULE``, has fired, and at the last step), and with ``--stop-after N`` stops N steps after validation
confirms convergence. Both log the probe (``signals.csv``) every 20 steps, the kit's default. Validation does not
touch the weights, so without ``--stop-after`` the two runs must end with the same ControlNet, bit for bit: the
bench checks it, and compares the wall time of the two training loops and their last fidelity.

``--dataset`` defaults to a Fill50K-format folder that ``studies/fill50k_like.py`` draws (data the kit did not make:
the real dataset's X11 colour prompts and its circle geometry; 4,000 training items and 32 held out), made once in
``OUT/data``. Writes ``OUT/summary.json``; the runs stay in ``OUT/<name>/`` (``cnkit forecast judge`` reads them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fill50k_like(out: Path, n: int = 4032) -> Path:
    """The independent Fill50K-format folder (made once)."""
    if not (out / "prompt.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "studies" / "fill50k_like.py"), str(out), f"--n={n}"], check=True)
    return out


def config(args, dataset: Path, name: str):
    from cnkit.training.train import TrainConfig  # noqa: PLC0415 - the parent process needs no torch model

    extra = ({"forecast": True, "validate_on": "forecast", "stop_after_convergence": args.stop_after}
             if name == "forecast" else {})
    base = {"base": args.base} if args.base else {}
    return TrainConfig(dataset=str(dataset), steps=args.steps, validate_every=args.validate_every,
                       checkpoint_every=args.steps, seed=args.seed, validation_size=32, signals_every=20, **base,
                       **extra)


def worker(args, dataset: Path, name: str) -> None:
    """One run, as notebooks and make figures train them (``cnkit.experiments.runs.train``: convergence.json)."""
    from cnkit.experiments.runs import train  # noqa: PLC0415

    run = train(config(args, dataset, name), args.out / name)
    (args.out / f"{name}.folder").write_text(str(run.folder))


def weights(run: Path) -> dict:
    from safetensors.torch import load_file  # noqa: PLC0415

    found = sorted((run / "checkpoint").glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no weights in {run / 'checkpoint'}: did the run finish?")
    out = {}
    for f in found:
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def publish_tables(run: Path, dest: Path) -> Path:
    """The run's tables and last sample grid, paths in them made relative to the checkout (a user's machine does
    not have this one's)."""
    from cnkit.experiments.bench_runs import RUN_FILES  # noqa: PLC0415

    (dest / "samples").mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (run / name).is_file():
            (dest / name).write_text((run / name).read_text().replace(f"{ROOT}/", ""))
    grid = sorted((run / "samples").glob("step-*.png"))[-1]
    (dest / "samples" / grid.name).write_bytes(grid.read_bytes())
    return dest


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="", help="a training folder (default: a Fill50K-format one, made once)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--validate-every", type=int, default=50)
    ap.add_argument("--stop-after", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "forecast-savings")
    ap.add_argument("--publish", default="", help="also ship the schedule run's tables as data/forecast-runs/NAME "
                    "(notebook 11 reads independent-* there as its group of Fill50K-format runs)")
    ap.add_argument("--publish-dir", type=Path, default=ROOT / "data" / "forecast-runs")
    ap.add_argument("--base", default="", help="the runs' base (default: the recipe's, data/tiny-sd)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = Path(args.dataset) if args.dataset else fill50k_like(args.out / "data")
    if args.worker:
        return worker(args, dataset, args.worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = {}
    for name in ("schedule", "forecast"):
        log = open(args.out / f"{name}.log", "a")  # noqa: SIM115 - closed when the process ends, below
        cmd = [sys.executable, __file__, f"--worker={name}", f"--dataset={dataset}", f"--steps={args.steps}",
               f"--validate-every={args.validate_every}", f"--stop-after={args.stop_after}", f"--seed={args.seed}",
               f"--out={args.out}", f"--base={args.base}"]
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (proc, log) in procs.items():
        if proc.wait():
            raise SystemExit(f"the {name} run failed: see {args.out / (name + '.log')}")
        log.close()
    summary = {"dataset": str(dataset), "steps": args.steps, "validate_every": args.validate_every,
               "stop_after": args.stop_after}
    runs = {name: Path((args.out / f"{name}.folder").read_text()) for name in procs}
    for name, run in runs.items():
        c = json.loads((run / "convergence.json").read_text())
        summary[name] = {"run": str(run.relative_to(ROOT)) if run.is_relative_to(ROOT) else str(run),
                         "train_loop_s": c.get("train_loop_s"), "validations": len(c["validated_steps"]),
                         "validated_steps": c["validated_steps"], "fidelity_final": c["fidelity_final"],
                         "converged_at_step": c["converged_at_step"], "steps_trained": c.get("steps_trained"),
                         "forecast": c.get("forecast")}
    s, f = summary["schedule"], summary["forecast"]
    summary["wall_ratio"] = f["train_loop_s"] / s["train_loop_s"]
    if not args.stop_after:
        a, b = weights(runs["schedule"]), weights(runs["forecast"])
        summary["same_weights"] = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.publish:
        from cnkit.experiments.forecast import write_index  # noqa: PLC0415

        print("published", publish_tables(runs["schedule"], args.publish_dir / args.publish))
        print("index:", write_index(args.publish_dir))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("schedule", "forecast")}, indent=1))
    for name in procs:
        print(name, {k: v for k, v in summary[name].items() if k != "validated_steps"})
    return summary


if __name__ == "__main__":
    main()
