"""The convergence forecast: the condition-use probe, the rule (the same function on finished runs and live), the live
forecast acting on a run (validation opened when it fires, a stop after confirmed convergence), and the study."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cnkit.experiments import forecast as study
from cnkit.training.forecast import ForecastRule
from cnkit.training.train import TrainConfig, Trainer, attach_watchers


def test_a_rule_fires_after_patience_readings_at_or_above_its_threshold():
    steps = [0, 10, 20, 30, 40, 50]
    values = [0.0, 1e-6, 0.02, 0.001, 0.05, 0.3]
    assert ForecastRule("s", 0.01, 1).fire_step(steps, values) == 20
    assert ForecastRule("s", 0.01, 2).fire_step(steps, values) == 50  # 20 is followed by a reading below
    assert ForecastRule("s", 1.0, 1).fire_step(steps, values) is None
    assert ForecastRule("s", -2.0, 1, "log10").fire_step(steps, values) == 20
    # decades per 100 steps over the last 3 readings: 0 -> 1e-6 is clipped at 1e-12, then it rises
    rising = ForecastRule("s", 10.0, 1, "log_slope", window=3).series(steps, values)
    assert np.isnan(rising[:2]).all() and rising[2] > 10


def test_the_probe_is_zero_at_step_0_and_the_forecast_opens_validation_when_it_fires(base_dir, tmp_path):
    cfg = TrainConfig(base=str(base_dir), steps=6, batch_size=2, n_train=8, validation_size=2, validate_every=2,
                      signals_every=1, forecast=True, validate_on="forecast", out_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg, cache_dir=tmp_path / "cache")
    attach_watchers(trainer)
    trainer.forecast.rule = ForecastRule("condition_gap_rel", -1.0, 3)  # fires at the third reading (step 2)
    trainer.run()
    with open(tmp_path / "run" / "signals.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(7))
    first = rows[0]  # a zero-initialised net leaves the base unchanged: every condition gives the same loss
    assert float(first["probe_loss_true"]) == float(first["probe_loss_shuffled"]) == float(first["probe_loss_blank"])
    with open(tmp_path / "run" / "forecast.csv") as f:
        forecast_rows = list(csv.DictReader(f))
    assert forecast_rows[1]["state"] == "no sign of convergence yet"
    assert forecast_rows[2]["fired_at_step"] == "2" and "convergence expected" in forecast_rows[2]["state"]
    with open(tmp_path / "run" / "validation.csv") as f:
        validated = [int(r["step"]) for r in csv.DictReader(f)]
    assert validated == [0, 2, 4, 6]  # step 0, then only once the forecast had fired (it fired at 2)
    assert trainer.postfix["forecast"]


def test_stop_after_convergence_ends_the_run_and_a_rerun_trains_no_further(base_dir, tmp_path, monkeypatch):
    from cnkit import metrics

    monkeypatch.setitem(metrics.CONVERGENCE_THRESHOLDS, "disc_iou", 0.0)  # any validation confirms convergence
    cfg = TrainConfig(base=str(base_dir), steps=20, batch_size=2, n_train=8, validation_size=2, validate_every=2,
                      signals_every=1, forecast=True, stop_after_convergence=3, out_dir=str(tmp_path / "run"))

    def run():
        trainer = Trainer(cfg, cache_dir=tmp_path / "cache")
        attach_watchers(trainer)
        trainer.forecast.rule = ForecastRule("condition_gap_rel", -1.0, 1)
        return trainer.run()

    result = run()
    # fired at step 0's reading, confirmed by step 0's validation (a bar of 0), stopped 3 steps later
    assert result["steps"] == 3 and "converged at step 0" in result["stopped"]
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["stopped"]
    again = run()
    assert again["steps"] == 3 and again["stopped"]


@pytest.mark.parametrize("signals_every, forecast, validate_on", [(0, True, "schedule"), (10, False, "forecast")])
def test_the_forecast_needs_its_probe(signals_every, forecast, validate_on):
    with pytest.raises(ValueError, match="forecast=True with signals_every > 0"):
        TrainConfig(signals_every=signals_every, forecast=forecast, validate_on=validate_on, stop_after_convergence=1)


def _fake_run(folder, fidelity, gap, every=10):
    """A finished run's tables: validation every 25 steps, the probe every ``every``."""
    folder.mkdir(parents=True)
    steps = list(range(0, 25 * len(fidelity), 25))
    with open(folder / "validation.csv", "w") as f:
        f.write("step,samples_seen,metric,fidelity,fidelity_min,fidelity_max,edge_f1,miou,loss,seconds,elapsed_s\n")
        for s, v in zip(steps, fidelity):
            f.write(f"{s},0,disc_iou,{v},{v},{v},,,0.1,1.0,{2.0 * s}\n")
    with open(folder / "signals.csv", "w") as f:
        f.write("step,samples_seen,probe_loss_true,probe_loss_shuffled,probe_loss_blank,condition_gap,"
                "condition_gap_rel,blank_gap,seconds\n")
        for k, g in enumerate(gap):
            f.write(f"{k * every},0,1,1,1,{g},{g},{g},0.01\n")
    with open(folder / "telemetry.csv", "w") as f:
        f.write("step,samples_seen,connection,name,latent_size,weight_mean_abs,weight_norm,bias_norm,grad_norm,"
                "residual_rms\n")
        for s in steps:
            f.write(f"{s},0,0,zero,16,0,0,0,0.1,0.0\n")
    (folder / "convergence.json").write_text(json.dumps({"train_loop_s": 100.0}))
    return folder


def test_the_study_judges_early_late_missed_from_the_start_false_alarm_and_quiet(tmp_path):
    rise = [0.3, 0.3, 0.3, 0.3, 0.85, 0.9, 0.9]  # converged at step 100
    flat = [0.3] * 7
    runs = {
        "early": _fake_run(tmp_path / "early-a", rise, [0, 0, 0, 0, 0, 0.05, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3]),
        "late": _fake_run(tmp_path / "late-a", rise, [0] * 11 + [0.05, 0.1]),
        "missed": _fake_run(tmp_path / "missed-a", rise, [0] * 13),
        "false alarm": _fake_run(tmp_path / "alarm-a", flat, [0, 0, 0.05, 0.05, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        "quiet": _fake_run(tmp_path / "quiet-a", flat, [0] * 13),
        # over the threshold from the first reading (an adapter that is not zero-initialized): no forecast
        "from the start": _fake_run(tmp_path / "start-a", rise, [0.1] * 13),
    }
    rule = ForecastRule("condition_gap_rel", 0.02, 2)
    rows = {k: study.judge(rule, f) for k, f in runs.items()}
    assert {k: r["outcome"] for k, r in rows.items()} == {k: k for k in runs}
    assert rows["early"]["fired_at_step"] == 60 and rows["early"]["lead_steps"] == 40
    assert rows["early"]["lead_s"] == pytest.approx(80.0)  # the run's clock: 2 s a step here
    s = study.score(list(rows.values()))
    assert (s["early"], s["late"], s["missed"], s["false_alarms"], s["quiet"], s["from_start"]) == (1, 1, 1, 1, 1, 1)
    assert rows["from the start"]["fired_at_step"] == 10 and rows["from the start"]["fired_from_start"]
    assert s["early_share"] == pytest.approx(1 / 4) and s["median_lead_steps"] == 40
    # the design picks, from its grid, a rule that fires early on the design runs without a false alarm
    chosen, grid = study.design([runs["early"], runs["quiet"]])
    assert study.judge(chosen, runs["early"])["outcome"] == "early" and grid
    assert study.signal_cost(runs["early"]) == pytest.approx(0.13 / (100 - 7 - 0.13))
    # probing every 20 steps instead of 10: the 7 readings at multiples of 20, against the same training time
    assert study.signal_cost(runs["early"], probe_every=20) == pytest.approx(0.07 / (100 - 7 - 0.13))


def test_savings_are_the_validations_before_firing_and_the_steps_after_a_confirmed_stop(tmp_path):
    rise = [0.3, 0.3, 0.3, 0.3, 0.85, 0.9, 0.9]  # validated every 25 steps to 150, 1 s each; converged at 100
    folder = _fake_run(tmp_path / "run-a", rise, [0, 0, 0, 0, 0, 0.05, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3])
    s = study.savings(folder, ForecastRule("condition_gap_rel", 0.02, 2), stop_after=25)
    assert s["fired_at_step"] == 60 and s["validations_skipped"] == 2  # steps 25 and 50; 0 and the last are kept
    assert s["validation_s_saved"] == pytest.approx(2.0)
    assert s["confirmed_at_step"] == 100 and s["stopped_at_step"] == 125
    assert s["fidelity_at_stop"] == pytest.approx(0.9) and s["fidelity_final"] == pytest.approx(0.9)
    assert s["train_s_saved"] == pytest.approx((100 - 7) / 150 * 25)


def test_the_design_learns_to_stay_quiet_only_from_runs_that_never_converge(tmp_path):
    rise = [0.3, 0.3, 0.3, 0.3, 0.85, 0.9, 0.9]  # converged at step 100
    early = _fake_run(tmp_path / "early-a", rise, [0, 0, 0, 0, 0.005, 0.05, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3])
    # a run that never converges, whose gap creeps up to 0.005: a rule set below that would call it converging
    control = _fake_run(tmp_path / "control-a", [0.3] * 7, [0, 0, 0, 0.005, 0.005, 0.005, 0.005] + [0.005] * 6)
    eager, _ = study.design([early])
    assert study.judge(eager, control)["outcome"] == "false alarm"  # designed on converging runs alone
    careful, grid = study.design([early, control])
    assert study.judge(careful, control)["outcome"] == "quiet"
    assert study.judge(careful, early)["outcome"] == "early"
    assert any(s["false_alarms"] for s in grid)  # the control did rule candidates out


def test_savings_over_the_study_add_up_and_give_up_no_fidelity_without_stopping(tmp_path):
    rise = [0.3, 0.3, 0.3, 0.3, 0.85, 0.9, 0.9]
    gap = [0, 0, 0, 0, 0, 0.05, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3]
    groups = {"design": [_fake_run(tmp_path / "a-a", rise, gap)], "other": [_fake_run(tmp_path / "b-a", rise, gap)]}
    rule = ForecastRule("condition_gap_rel", 0.02, 2)
    kept = study.savings_summary(groups, rule)
    assert kept["total"]["runs"] == 2 and kept["total"]["validation_s_saved"] == pytest.approx(4.0)
    assert kept["total"]["train_s_saved"] == 0 and kept["total"]["largest_fidelity_drop"] is None
    assert kept["total"]["share_saved"] == pytest.approx(4.0 / 200.0)
    stopped = study.savings_summary(groups, rule, stop_after=25)
    assert stopped["total"]["stopped_early"] == 2 and stopped["total"]["largest_fidelity_drop"] == pytest.approx(0.0)
    assert stopped["total"]["train_s_saved"] == pytest.approx(2 * (100 - 7) / 150 * 25)


def test_the_study_reads_the_copy_of_a_run_that_carries_the_probe(tmp_path, monkeypatch):
    from cnkit.experiments import configs
    from cnkit.experiments.runs import run_folder

    shipped, forecast_dir = tmp_path / "architecture-runs", tmp_path / "forecast-runs"
    monkeypatch.setattr(study, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(study, "FORECAST_DIR", forecast_dir)
    cfg = configs.bench_configs()[0]
    rise = [0.3, 0.3, 0.3, 0.3, 0.85, 0.9, 0.9]
    for where in (shipped, forecast_dir):
        folder = _fake_run(run_folder(cfg, where), rise, [0.1] * 13)
        (folder / "convergence.json").write_text(json.dumps({"train_loop_s": 100.0, "steps": cfg.steps}))
    (run_folder(cfg, shipped) / "signals.csv").unlink()  # shipped before the probe existed
    groups = study.study_groups(tmp_path / "runs")
    assert groups["successors and union (10)"] == [run_folder(cfg, forecast_dir)]


def test_a_run_is_labelled_by_what_sets_it_apart(tmp_path):
    folder = _fake_run(tmp_path / "zero-toy-fill-seed0-0123456789", [0.3], [0])
    assert study.label(folder) == "zero-fill-seed0"
    (folder / "train_config.json").write_text(json.dumps({"learning_rate": 1e-5, "timestep_sampling": "uniform"}))
    assert study.label(folder) == "zero-fill-seed0 (lr 1e-05, uniform t)"
    assert study.label(_fake_run(tmp_path / "independent-fill50k-like-seed0", [0.3], [0])) == \
        "independent-fill50k-like-seed0"


def test_make_forecast_runs_reads_the_figures_runs_where_make_figures_trains_them(monkeypatch):
    """The study's design group is make figures' runs: the Makefile must point where `cnkit figures --profile full`
    leaves them (it once named reports/runs, where nothing is, and shipped none of them)."""
    import re

    from cnkit.experiments import shipped
    from cnkit.experiments.runs import FIGURE_RUNS
    from cnkit.params import REPO_ROOT
    from cnkit.surfaces import report

    make = (REPO_ROOT / "Makefile").read_text()
    given = re.search(r"cnkit forecast runs --figure-runs (\S+)", make).group(1)
    assert REPO_ROOT / given == FIGURE_RUNS
    assert report.report_dir("full") / "runs" == FIGURE_RUNS  # cnkit figures --profile full trains there
    seen = {}
    monkeypatch.setattr(shipped, "build", lambda name, runs_dir, *a, **k: seen.setdefault("shipped", Path(runs_dir)))
    monkeypatch.setattr(shipped, "compose", lambda *a, **k: None)
    shipped.main(["--only", "fill-outline"])
    assert seen["shipped"] == FIGURE_RUNS
