"""What the convergence forecast's signals cost beside the training step they watch, and beside validation.

    .venv/bin/python bench/forecast_signals.py [--repeats 8] [--batch 32] [--architecture controlnet]

One trainer (the kit's recipe on the fill world, the embedded base), then, interleaved in rounds so that a slow
spell of the machine falls on all of them: one optimizer step, one condition-use probe
(``telemetry.ConditionProbe``: 16 items, true / shuffled / blank conditions, three forward passes), one
injection-telemetry row (``telemetry.InjectionTelemetry``) and, once per round, one validation (32 held-out
conditions, 20 DDIM steps). Prints medians and what each costs as a share of training at the recipe's intervals
(probe every 10 steps, telemetry every step, validation every 25).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from cnkit.training.telemetry import ConditionProbe, InjectionTelemetry, Validation
from cnkit.training.train import TrainConfig, Trainer


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--architecture", default="controlnet")
    ap.add_argument("--validations", type=int, default=2)
    args = ap.parse_args(argv)
    times = {"step": [], "probe": [], "telemetry": [], "validation": []}
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(architecture=args.architecture, steps=10**6, batch_size=args.batch, n_train=512,
                          validate_every=0, checkpoint_every=10**9, out_dir=out)
        trainer = Trainer(cfg)
        probe, telemetry, validation = ConditionProbe(every=1), InjectionTelemetry(every=1), Validation(every=0)
        for watcher in (probe, telemetry, validation):
            watcher.attach(trainer)
        rounds = {"left": args.repeats + 2}

        def measure(tr) -> None:  # runs after every optimizer step, inside the trainer's own loop
            t = time.perf_counter()
            probe.on_step_end(tr)
            times["probe"].append(time.perf_counter() - t)
            if rounds["left"] <= args.validations:
                t = time.perf_counter()
                validation.validate(tr)
                times["validation"].append(time.perf_counter() - t)
            rounds["left"] -= 1
            if rounds["left"] <= 0:
                raise StopIteration

        last = [None]

        def tick(tr) -> None:
            now = time.perf_counter()
            if last[0] is not None:
                times["step"].append(now - last[0])
            last[0] = now

        # the step's clock ticks first, then the watchers; telemetry is timed around its own callback
        trainer.callbacks["on_step_end"].insert(0, tick)
        original = telemetry.on_step_end

        def timed_telemetry(tr) -> None:
            t = time.perf_counter()
            original(tr)
            times["telemetry"].append(time.perf_counter() - t)

        trainer.callbacks["on_step_end"] = [timed_telemetry if f == original else f
                                            for f in trainer.callbacks["on_step_end"] if f != probe.on_step_end]
        trainer.add_callback("on_step_end", measure)
        trainer.add_callback("on_step_end", lambda tr: last.__setitem__(0, time.perf_counter()))
        try:
            trainer.run()
        except StopIteration:
            pass
    med = {k: statistics.median(v[2:] if k != "validation" else v) for k, v in times.items() if v}
    result = {"median_s": med, "batch_size": args.batch, "architecture": args.architecture,
              "share_of_training": {"probe every 10 steps": med["probe"] / (10 * med["step"]),
                                    "telemetry every step": med["telemetry"] / med["step"],
                                    "validation every 25 steps": med["validation"] / (25 * med["step"])}}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
