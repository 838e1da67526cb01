"""cnkit.experiments.costs (an architecture's costs, measured on equal terms) and cnkit.experiments.successor_claims
(the verdicts)."""

import shutil

import pytest

from cnkit.experiments import costs, runs, successor_claims
from cnkit.models import architectures
from cnkit.training.train import TrainConfig


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(base=str(base_dir), architecture="controlnext", steps=4, batch_size=2, n_train=8,
                      validate_every=2, validation_size=2, seed=0)
    return runs.train(cfg, runs_dir, threshold=0.0), runs_dir


def test_a_runs_costs_are_measured_from_its_own_architecture_base_and_data(trained):
    run, runs_dir = trained
    assert run.folder.name.startswith("controlnext-toy-fill-seed0-") and run.architecture == "controlnext"
    m = costs.measure(run, runs_dir, timing_steps=2, n_images=2)
    adapter = architectures.load(run.checkpoint)
    assert m["trainable_params"] == sum(p.numel() for p in adapter.trainable_parameters()) == 46_456
    assert m["file_bytes"] == (run.checkpoint / "diffusion_pytorch_model.safetensors").stat().st_size
    assert len(m["step_times"]) == 2 * 3 and len(m["seconds_per_step_rounds"]) == 3  # 3 rounds of 2 steps
    assert m["seconds_per_step"] == sorted(m["seconds_per_step_rounds"])[1] > 0
    assert m["seconds_per_image"] == sorted(m["seconds_per_image_rounds"])[1] > 0
    row = costs.comparison_row("controlnext", m, {"fill": [run]})
    at = run.convergence["converged_at_step"]
    assert row["converged_at_step"] == {"fill": [at]} == {"fill": [0]}  # threshold 0: converged from the start
    assert row["converged_at_s"]["fill"] == [at * m["seconds_per_step"]]
    assert row["converged_at_s_as_trained"]["fill"][0] >= 0
    assert row["fidelity_final"]["fill"] == [run.convergence["fidelity_final"]]


def test_several_runs_are_timed_in_interleaved_rounds(trained, monkeypatch, tmp_path):
    run, runs_dir = trained
    other = runs.Run(shutil.copytree(run.folder, tmp_path / "b"))
    order = []
    monkeypatch.setattr(costs, "step_seconds", lambda cfg, cache, steps: order.append(("step", cfg.seed)) or {
        "seconds_per_step": 1.0 + cfg.seed, "step_times": [1.0] * steps, "batch_size": 2, "threads": 1,
        "trainable_params": 7})
    monkeypatch.setattr(costs, "image_seconds", lambda pipe, ckpt, conds, prompts, repeats: order.append(
        ("image", str(ckpt))) or {"seconds_per_image": 0.5, "images": len(prompts), "denoising_steps": 20})
    m = costs.measure_all({"a": run, "b": other}, runs_dir, timing_steps=2, n_images=2, rounds=2)
    assert [kind for kind, _ in order] == ["step", "image"] * 4
    a, b = str(run.checkpoint), str(other.checkpoint)
    assert [at for kind, at in order if kind == "image"] == [a, b, a, b]  # interleaved, not a, a, b, b
    assert m["a"]["seconds_per_step_rounds"] == [1.0, 1.0] and m["b"]["seconds_per_image"] == 0.5
    assert m["a"]["trainable_params"] == 7  # counted by the trainer that was timed


def _row(params, step_s, image_s, fill_steps, fidelity):
    return {"trainable_params": params, "seconds_per_step": step_s, "seconds_per_image": image_s, "file_bytes": 1,
            "converged_at_step": {"fill": fill_steps}, "fidelity_final": {"fill": fidelity, "seg": fidelity}}


def test_verdicts_are_computed_from_the_rows():
    rows = {"controlnet": _row(1000, 1.0, 1.0, [300, 400, None], [0.8, 0.8, 0.8]),
            "controlnet-xs": _row(100, 0.5, 0.9, [200, 200, 200], [0.9, 0.9, 0.9]),
            "controlnext": _row(101, 0.9, 0.9, [100, None, 100], [0.5, 0.5, 0.5])}
    got = {(v["architecture"], v["claim"][:20]): v["held"] for v in successor_claims.verdicts(rows)}
    xs = [v for v in successor_claims.verdicts(rows) if v["architecture"] == "controlnet-xs"]
    assert [v["held"] for v in xs] == [True, True, False, True]  # 10% params, 2.0x per step, 1.1x per image, fidelity
    assert "2.00x" in xs[1]["kit"]
    nxt = [v for v in successor_claims.verdicts(rows) if v["architecture"] == "controlnext"]
    assert [v["held"] for v in nxt] == [False, False]  # 10.1% params; one seed never converged
    rows["controlnext"]["converged_at_step"]["fill"] = [100, 500, 100]
    assert [v["held"] for v in successor_claims.verdicts(rows) if v["architecture"] == "controlnext"][1] is True
    assert all(v is None for (a, _), v in got.items() if a == "t2i-adapter")  # not measured: no verdict
    for r in rows.values():  # a notebook run on the segmentation task alone: no fill verdict, not an error
        r["converged_at_step"] = {"seg": r["converged_at_step"]["fill"]}
    assert [v["held"] for v in successor_claims.verdicts(rows) if v["architecture"] == "controlnext"][1] is None
    rows["control-lora"] = {**_row(300, 1.0, 1.0, [300, 300, 300], [0.8] * 3), "file_bytes": 0.09}
    lora = [v for v in successor_claims.verdicts(rows) if v["architecture"] == "control-lora"]
    assert [v["held"] for v in lora] == [True] and "9.0%" in lora[0]["kit"]  # the file: 9% of ControlNet's


def test_the_union_verdict_compares_one_map_alone_with_controlnet_trained_on_it():
    rows = {"controlnet": _row(1000, 1.0, 1.0, [300, 300, 300], [0.8, 0.8, 0.8]),
            "union": _row(1001, 1.0, 1.0, [300, 300, 300], [0.9, 0.9, 0.9])}
    rows["controlnet"]["fidelity_final"]["segmentation"] = [0.60, 0.70, 0.65]
    union = lambda: [v for v in successor_claims.verdicts(rows) if v["architecture"] == "union"][0]
    assert union()["held"] is None  # not evaluated map by map: no verdict
    rows["union"]["fidelity_by_map"] = {"all": [0.9, 0.8], "segmentation": [0.62, 0.60], "depth": [0.3, 0.3]}
    assert union()["held"] is True and "0.61 (seeds 0.62, 0.60)" in union()["kit"]
    assert "depth alone 0.30" in union()["kit"]
    rows["union"]["fidelity_by_map"]["segmentation"] = [0.58, 0.59]
    assert union()["held"] is False
