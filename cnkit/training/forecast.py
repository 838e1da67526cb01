"""Forecasting sudden convergence from the cheap signals training already logs, and acting on it.

Validation (generate images, score them) is how one sees a ControlNet's sudden convergence, and it is the most
expensive thing a run does besides its steps. The condition-use probe (``telemetry.ConditionProbe``: the denoising
loss on a fixed batch with the true conditions against shuffled ones, three forward passes every few steps) asks
the question validation answers, "does the net follow its condition yet?", without sampling.

- ``ForecastRule``: a frozen rule over one logged signal (a series of (step, value)): it *fires* at the first
  step where the signal (its level, or its slope over a window) has stayed at or above ``threshold`` for
  ``patience`` consecutive readings. The same function reads a finished run's tables (the study,
  ``cnkit.experiments.forecast``) and a live run's readings, so what was measured is what runs.
- ``Forecast``: a trainer callback that applies the rule live to the probe's readings, writes ``forecast.csv``
  (one row per reading: the signal, the state), shows the state in the progress bar ("no sign of convergence yet"
  / "condition in use, convergence expected" / "converged (validated)"), opens the validation gate when it fires
  (``validate_on="forecast"``: validation only from then on, plus steps 0 and last) and, with
  ``stop_after_convergence=N``, stops the run N steps after validation confirms convergence (fidelity at or
  above the metric's threshold, ``metrics.CONVERGENCE_THRESHOLDS``).

``DEFAULT_RULE`` is the rule the kit's study froze (``notebooks/11_forecasting_convergence.ipynb`` shows how it
does on runs held out from its design); its threshold is that study's, not a guess.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass

import numpy as np

from ..metrics import CONVERGENCE_THRESHOLDS
from .telemetry import _Table  # one writer for every run table (cut back to the checkpoint on resume)

STATES = ("no sign of convergence yet", "condition in use, convergence expected", "converged (validated)")


@dataclass(frozen=True)
class ForecastRule:
    """Fires when a transform of ``signal`` (a column of ``signals.csv``, or a series the study derives from the
    telemetry) has been at or above ``threshold`` for ``patience`` readings in a row. ``transform``: ``level`` (the
    value), ``log10`` (its decade: the probe's gap grows by orders of magnitude before it is large), ``slope`` (the
    least-squares slope per 100 steps over the last ``window`` readings) or ``log_slope`` (decades per 100 steps)."""

    signal: str = "condition_gap_rel"
    threshold: float = 0.02
    patience: int = 2
    transform: str = "level"
    window: int = 4

    def series(self, steps, values) -> np.ndarray:
        """What the threshold applies to, per reading (NaN where it is not defined yet)."""
        v = np.asarray(values, float)
        if self.transform in ("log10", "log_slope"):
            v = np.log10(np.clip(v, 1e-12, None))  # a gap at or below zero is "nothing yet"
        if self.transform in ("level", "log10"):
            return v
        s, out, w = np.asarray(steps, float), np.full(len(v), np.nan), self.window
        for i in range(w - 1, len(v)):
            x, y = s[i - w + 1:i + 1], v[i - w + 1:i + 1]
            out[i] = 100 * np.polyfit(x, y, 1)[0] if np.ptp(x) > 0 else np.nan
        return out

    def fire_step(self, steps, values) -> int | None:
        """The step at which the rule fires on this series, or None."""
        with np.errstate(invalid="ignore"):
            above = self.series(steps, values) >= self.threshold
        run = 0
        for step, ok in zip(steps, above):
            run = run + 1 if ok else 0
            if run >= self.patience:
                return int(step)
        return None

    def earliest_step(self, steps, values) -> int | None:
        """The first step at which this rule *could* fire on this series (its ``patience``-th defined reading). A
        rule that fires there says nothing about convergence: the signal was over the threshold from the start (an
        adapter that is not zero-initialized injects a large signal from step 0)."""
        defined = [int(st) for st, v in zip(steps, self.series(steps, values)) if v == v]
        return defined[self.patience - 1] if len(defined) >= self.patience else None


# Frozen by the study (notebook 11, ``cnkit.experiments.forecast.study_groups``) on 2026-12-03, before the held-out
# successor runs were trained: designed on ControlNet's fill runs (seeds 0-2, converging) and two fill runs that never
# converge (learning rate 1e-5; uniform timesteps at 200 steps), on readings every 20 steps, it picks the first
# reading at which the blank-condition gap turns positive: the zero convolutions pass something, and the true
# condition already lowers the loss below a black one. It fired 60-95 steps before validation on the design's
# converging runs and never on its controls; the held-out verdict is the notebook's.
DEFAULT_RULE = ForecastRule(signal="blank_gap", threshold=1e-6, patience=1)
# How often the probe reads for it (``TrainConfig.signals_every``): every 20 steps is 3.8% of a training step's time
# (``bench/forecast_signals.py``), under the study's 5% budget; the rule was designed on readings that sparse.
PROBE_EVERY = 20

FORECAST_FIELDS = ["step", "signal", "value", "state", "fired_at_step", "confirmed_at_step"]


class Forecast:
    """The live forecast (see the module docstring). Attach after the ``ConditionProbe`` it reads."""

    def __init__(self, probe, rule: ForecastRule = DEFAULT_RULE, stop_after_convergence: int = 0):
        self.probe, self.rule, self.stop_after = probe, rule, stop_after_convergence
        self.steps: list[int] = []
        self.values: list[float] = []
        self.fired_at: int | None = None
        self.confirmed_at: int | None = None

    @property
    def state(self) -> str:
        return STATES[2] if self.confirmed_at is not None else STATES[1] if self.fired_at is not None else STATES[0]

    def attach(self, trainer) -> Forecast:
        trainer.add_callback("on_train_start", self.on_train_start)
        trainer.add_callback("on_step_end", self.on_step_end)
        trainer.add_callback("on_validation", self.on_validation)
        trainer.forecast = self
        return self

    def on_train_start(self, trainer) -> None:
        self.table = _Table(trainer.out / "forecast.csv", FORECAST_FIELDS)
        if trainer.accelerator.is_main_process:
            self.table.start(trainer.step)
        # a resumed run replays its readings so far: the rule sees the whole series
        if trainer.step > 0 and (trainer.out / "forecast.csv").is_file():
            with open(trainer.out / "forecast.csv", newline="") as f:
                for row in csv.DictReader(f):
                    self.steps.append(int(row["step"]))
                    self.values.append(float(row["value"]))
                    self.fired_at = int(row["fired_at_step"]) if row["fired_at_step"] else None
                    self.confirmed_at = int(row["confirmed_at_step"]) if row["confirmed_at_step"] else None
        self._read(trainer)

    def _read(self, trainer) -> None:
        reading = getattr(self.probe, "last", None)
        if reading is None or reading["step"] != trainer.step or (self.steps and self.steps[-1] == trainer.step):
            return
        self.steps.append(trainer.step)
        self.values.append(float(reading[self.rule.signal]))
        if self.fired_at is None:
            self.fired_at = self.rule.fire_step(self.steps, self.values)
        if trainer.accelerator.is_main_process:
            self.table.append([{"step": trainer.step, "signal": self.rule.signal, "value": self.values[-1],
                                "state": self.state, "fired_at_step": self.fired_at or "",
                                "confirmed_at_step": self.confirmed_at or ""}])
        trainer.postfix["forecast"] = self.state

    def on_step_end(self, trainer) -> None:
        self._read(trainer)
        if self.stop_after and self.confirmed_at is not None and trainer.step >= self.confirmed_at + self.stop_after:
            trainer.request_stop(f"converged at step {self.confirmed_at} (validated); stopped {self.stop_after} "
                                 "steps later (stop_after_convergence)")

    def wants_validation(self, trainer) -> bool:
        """The validation gate for ``validate_on="forecast"``: open once the forecast has fired."""
        return self.fired_at is not None

    def on_validation(self, trainer) -> None:
        row = trainer.last_validation
        threshold = CONVERGENCE_THRESHOLDS.get(row["metric"], 0.5)
        if self.confirmed_at is None and self.fired_at is not None and row["fidelity"] >= threshold:
            self.confirmed_at = int(row["step"])
            trainer.postfix["forecast"] = self.state

    def summary(self) -> dict:
        return {"rule": asdict(self.rule), "fired_at_step": self.fired_at, "confirmed_at_step": self.confirmed_at,
                "state": self.state}
