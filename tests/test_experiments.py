"""cnkit.experiments.configs: the figures' runs trained ahead of the notebooks, several at a time."""

import json

import pytest

from cnkit.experiments import configs as experiments
from cnkit.experiments.runs import run_folder


def test_runs_train_side_by_side_share_one_encoding_and_are_then_only_read_back(tmp_path):
    configs = [experiments.ablation("zero", 0, smoke=True), experiments.ablation("gaussian", 0, smoke=True)]
    lines, shipped = [], []
    results = experiments.train_all(configs, tmp_path, workers=2, log=lines.append, on_done=shipped.append)
    assert sorted(map(repr, shipped)) == sorted(map(repr, configs))  # each handed on as it finished
    assert sorted(r["name"] for r in results) == sorted(run_folder(c, tmp_path).name for c in configs)
    for cfg in configs:
        folder = run_folder(cfg, tmp_path)
        conv = json.loads((folder / "convergence.json").read_text())
        assert conv["steps"] == cfg.steps and conv["threads"] >= 1
        assert (tmp_path / "logs" / f"{folder.name}.log").is_file()  # the worker's progress, not the terminal's
    assert len(list((tmp_path / "cache").glob("encoded-*/store.json"))) == 1  # encoded once, under a lock
    assert "2 to train, 2 at a time" in lines[0] and len(lines) == 3
    again, found = [], []
    assert experiments.train_all(configs, tmp_path, workers=2, log=again.append, on_done=found.append) == []
    assert len(found) == 2  # finished runs found at the start are handed on too
    assert "2 of 2 found, 0 to train" in again[0]
    other = experiments.ablation("zero", 1, smoke=True)  # a run folder is a shipped folder too: only new ones are left
    assert experiments.not_shipped([*configs, other], tmp_path, log=again.append) == [other]
    assert again[-1] == f"2 of 3 already shipped in {tmp_path}"


def test_every_run_the_figure_notebooks_train_is_in_all_configs():
    keys = {run_folder(c, "r").name for c in experiments.all_configs()}
    wanted = ([experiments.ablation(v, s) for v in experiments.VARIANTS for s in experiments.SEEDS]
              + [experiments.sampling_comparison(experiments.SEEDS[0])]
              + [experiments.dataset_size(n, s) for n in experiments.DATASET_SIZES for s in experiments.SEEDS]
              + [experiments.reconstruction(v, s) for v in ("zero", "lite") for s in experiments.SEEDS]
              + [experiments.architecture_run(a, t, s) for a in ("controlnet", *experiments.SUCCESSORS)
                 for t in experiments.ARCHITECTURE_TASKS for s in experiments.SEEDS]
              + [experiments.architecture_run("union", "segmentation", s) for s in experiments.SEEDS])
    assert {run_folder(c, "r").name for c in wanted} == keys and len(keys) == 25 + 24 + 3


def test_make_figures_trains_notebook_10s_controlnet_runs_and_not_the_shipped_successor_runs():
    figures = {run_folder(c, "r").name for c in experiments.figure_configs()}
    bench = {run_folder(c, "r").name for c in experiments.bench_configs()}
    assert len(figures) == 25 and len(bench) == 24 + 3 and not figures & bench
    assert all(c.architecture in (*experiments.SUCCESSORS, "union") for c in experiments.bench_configs())
    controlnet = {run_folder(experiments.architecture_run("controlnet", t, s), "r").name
                  for t in experiments.ARCHITECTURE_TASKS for s in experiments.SEEDS}
    assert controlnet <= figures


def test_notebook_10s_union_net_learns_the_four_maps_of_the_segmentation_task():
    union = experiments.architecture_run("union", "segmentation", 0)
    seg = experiments.architecture_run("controlnet", "segmentation", 0)
    assert union.dataset == "toy:shapes/segmentation+depth+edges+outline"
    assert (union.steps, union.n_train, union.validate_every) == (seg.steps, seg.n_train, seg.validate_every)
    with pytest.raises(ValueError, match="the fill task has one: use task 'segmentation'"):
        experiments.architecture_run("union", "fill", 0)


def test_notebook_10s_controlnet_runs_are_the_ablation_and_table_2_runs():
    for s in experiments.SEEDS:
        assert experiments.architecture_run("controlnet", "fill", s) == experiments.ablation("zero", s)
        assert experiments.architecture_run("controlnet", "segmentation", s) == experiments.reconstruction("zero", s)
    xs = experiments.architecture_run("controlnet-xs", "fill", 0)
    assert run_folder(xs, "r").name.startswith("controlnet-xs-toy-fill-seed0-")


def test_runs_start_longest_first_and_side_by_side_runs_use_different_training_sets():
    order = experiments.schedule(experiments.all_configs())
    steps = [c.steps for c in order]
    assert steps == sorted(steps, reverse=True)
    short = [(c.dataset, c.n_train) for c in order if c.steps == experiments.SHORT["steps"]]
    assert len(set(short[:4])) == 4  # the first short runs each encode their own set: nobody waits
    assert sorted(run_folder(c, "r").name for c in order) == sorted(
        run_folder(c, "r").name for c in experiments.all_configs())
