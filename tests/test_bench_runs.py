"""Notebook 10's successor runs, shipped in data/architecture-runs (cnkit.experiments.bench_runs)."""

import json
import re

import pytest

from cnkit.card import portable
from cnkit.experiments import bench_runs
from cnkit.experiments import configs as experiments
from cnkit.experiments.runs import run_folder, train
from cnkit.models import architectures


@pytest.mark.parametrize("cfg", experiments.bench_configs(), ids=lambda c: run_folder(c, "r").name)
def test_every_successor_run_of_notebook_10_ships_finished_for_the_current_recipe(cfg):
    # Fails when the recipe (or an architecture's options) changes and the shipped runs no longer match it:
    # retrain them with `make architectures`.
    run = bench_runs.find(cfg)
    assert run is not None, f"{run_folder(cfg, bench_runs.SHIPPED_DIR).name} is not shipped: run make architectures"
    c = run.convergence
    assert c["steps"] == cfg.steps and c["validated_steps"][-1] == cfg.steps
    assert run.validation()["step"][-1] == cfg.steps and run.telemetry()["step"][-1] == cfg.steps
    assert run.sample_grid(cfg.steps).is_file() and run.loss()[0]
    assert not (run.checkpoint / "optimizer.pt").exists()
    assert any(run.checkpoint.glob("*.safetensors")) == bench_runs.keeps_weights(cfg)


def test_published_run_keeps_what_notebook_10_reads_and_loads(tmp_path, base_dir):
    shipped = tmp_path / "shipped"
    for seed in (0, 1):
        cfg = experiments.architecture_run("controlnext", "fill", seed, smoke=True, base=str(base_dir))
        run = train(cfg, tmp_path / "runs")
        dest = bench_runs.publish(run, cfg, shipped)
        found = bench_runs.find(cfg, shipped)
        assert found is not None and found.folder == dest
        # the same tables; JSON the same but for paths, which hold nothing of the training machine
        assert found.convergence == portable(run.convergence) and found.convergence["steps"] == cfg.steps
        for name in ("validation.csv", "telemetry.csv", "signals.csv"):
            assert (dest / name).read_bytes() == (run.folder / name).read_bytes()
        assert json.loads((dest / "checkpoint" / "trainer_state.json").read_text()) == portable(
            json.loads((run.checkpoint / "trainer_state.json").read_text()))
        shipped_text = "".join(f.read_text() for f in dest.rglob("*.json"))
        assert str(tmp_path) not in shipped_text and not re.search(r'"/(tmp|work|home|root)/', shipped_text)
        last = run.convergence["validated_steps"][-1]
        assert sorted(p.name for p in (dest / "samples").iterdir()) == [run.sample_grid(last).name]
        assert not (dest / "checkpoint" / "optimizer.pt").exists() and (run.checkpoint / "optimizer.pt").exists()
        if seed == 0:
            adapter = found.controlnet()
            assert isinstance(adapter, architectures.ControlNeXt)
        else:
            with pytest.raises(FileNotFoundError, match="no weights.*make architectures"):
                found.controlnet()
    # publishing again replaces the copy, and the index lists every run from its files
    bench_runs.publish(run, cfg, shipped)
    index = bench_runs.write_index(shipped, [experiments.architecture_run("controlnext", "fill", s, smoke=True,
                                                                          base=str(base_dir)) for s in (0, 1, 2)])
    text = index.read_text()
    assert text.count("| yes |") == 1 and text.count("| no |") == 1 and "not shipped" in text
    assert not list(shipped.glob("*.partial"))
    assert json.loads((dest / "train_config.json").read_text())["seed"] == 1


def test_notebook_10_reads_the_shipped_runs_and_lays_out_its_table_and_figures(tmp_path):
    """cnkit.experiments.successors on the shipped runs: read back (nothing trained), one row per architecture,
    the table and the costs figure (a seed that never converged drawn as never, not as a bar)."""
    import matplotlib.pyplot as plt

    from cnkit.experiments import successors

    configs = {"fill": {a: [experiments.architecture_run(a, "fill", s) for s in (0, 1, 2)]
                        for a in ("controlnet-xs", "t2i-adapter")}}
    said = []
    trained = successors.trained_runs(configs, tmp_path, train_missing=False, log=said.append)
    assert set(trained["fill"]) == {"controlnet-xs", "t2i-adapter"} and not said
    steps = successors.convergence_steps(trained)["fill"]
    measured = {a: {"trainable_params": 1000 * (k + 1), "file_bytes": 2048, "seconds_per_step": 0.5,
                    "seconds_per_image": 0.3, "seconds_per_step_rounds": [0.5], "seconds_per_image_rounds": [0.3]}
                for k, a in enumerate(trained["fill"])}
    rows = successors.comparison_rows(trained, measured)
    table = successors.architectures_table(rows, measured, ["fill"])
    assert table.count("\n") == 4 and "t2i-adapter" in table
    never = [a for a, s in steps.items() if sum(x is None for x in s) * 2 > len(s)]
    fig = successors.costs_figure(rows, trained)
    panel = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith("fill"))
    assert len([p for p in panel.patches if p.get_width() > 0]) == len(rows) - len(never)
    plt.close(fig)
    assert successors.trained_runs({"fill": {"t2i-adapter": [experiments.architecture_run("t2i-adapter", "fill", 0,
                                                                                          smoke=True)]}},
                                   tmp_path, shipped_runs=True, train_missing=False, log=said.append) == {"fill": {}}
    assert said and "not trained yet" in said[0]
