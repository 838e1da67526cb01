"""The notebooks' conventions, their defaults, and the headless run of the playground. Every notebook is also run
once by nbval (``make test``: cell by cell, the smoke profile), and its last cell checks the files it declares in
``metadata.cnkit.outputs`` (``cnkit.params.check_outputs``). New notebooks are picked up without editing this
file."""

import json
import re
from pathlib import Path

import papermill as pm
import pytest
from notebook_cells import notebook_parameters

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_follows_the_conventions(path):
    nb = json.loads(path.read_text())
    assert not [c for c in nb["cells"] if c.get("outputs")], "commit notebooks with outputs stripped"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    lines = [ln for ln in "".join(tagged[0]["source"]).splitlines() if ln.strip() and not ln.startswith("#")]
    for line in lines:
        assert re.match(r"^\w+: \w+ = .+  # .+", line), f"typed literal with a comment: {line!r}"
    names = {ln.split(":")[0] for ln in lines}
    assert {"profile", "out_dir", "seed"} <= names
    assert set(pm.inspect_notebook(str(path))) == names, "papermill must parse every parameter line"
    assert nb["metadata"].get("cnkit", {}).get("outputs"), "declare the files it writes in metadata.cnkit.outputs"


@pytest.mark.notebook
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if json.loads(p.read_text())["metadata"]["cnkit"].get(
    "headless_parameters")], ids=lambda p: p.stem)
def test_headless_notebooks_run_through_papermill(path, tmp_path):
    """nbval (make test) runs every notebook once as it is; a notebook meant for a person (the playground) also runs
    headless here, as papermill and make figures run it, with parameters given as papermill passes them (an int
    for a float). Its last cell checks the files it declares."""
    out_dir = tmp_path / "out"
    meta = json.loads(path.read_text())["metadata"]["cnkit"]
    parameters = {**meta["headless_parameters"], "profile": "smoke", "out_dir": str(out_dir), "guidance": 3}
    pm.execute_notebook(str(path), str(tmp_path / path.name), parameters=parameters, cwd=str(path.parent),
                        progress_bar=False, kernel_name="python3")
    assert {p.name for p in out_dir.iterdir()} >= set(meta["outputs"])


def test_training_notebooks_default_to_the_kits_recipe_so_they_share_one_run():
    """Notebooks 02-04 default to TrainConfig's defaults (the kit's recipe), so with their defaults they train
    one run between them; 06-09 default to the budgets cnkit.experiments.configs trains ahead of them."""
    from dataclasses import asdict

    from cnkit.experiments import configs as experiments
    from cnkit.experiments.runs import NOT_IDENTITY
    from cnkit.training.train import TrainConfig

    # settings outside a run's identity (its out_dir, the live forecast that only watches) may differ
    recipe = {k: v for k, v in asdict(TrainConfig()).items() if k not in NOT_IDENTITY}
    for stem in ("02_train_controlnet", "03_zero_conv_growth", "04_sudden_convergence"):
        found = notebook_parameters(NOTEBOOKS[0].parent / f"{stem}.ipynb")
        assert {k: found[k] for k in recipe if k in found} == {k: recipe[k] for k in recipe if k in found}, stem
        assert {"base", "dataset", "variant", "steps", "batch_size", "learning_rate", "seed"} <= set(found)
    nb04 = notebook_parameters(NOTEBOOKS[0].parent / "04_sudden_convergence.ipynb")
    assert nb04["compare_uniform"] and (nb04["seed"], nb04["n_seeds"]) == (experiments.SEEDS[0], len(experiments.SEEDS))
    nb06 = notebook_parameters(NOTEBOOKS[0].parent / "06_ablation_architectures.ipynb")
    assert tuple(nb06["variants"]) == experiments.VARIANTS and nb06["steps"] == recipe["steps"]
    nb08 = notebook_parameters(NOTEBOOKS[0].parent / "08_dataset_size.ipynb")
    assert tuple(nb08["sizes"]) == experiments.DATASET_SIZES and nb08["steps"] == experiments.SHORT["steps"]
    nb09 = notebook_parameters(NOTEBOOKS[0].parent / "09_composition_and_reconstruction.ipynb")
    assert nb09["steps"] == experiments.SHORT["steps"]
    nb10 = notebook_parameters(NOTEBOOKS[0].parent / "10_control_architectures.ipynb")
    # figure_configs trains ControlNet's runs; bench_configs' (shipped) are the others
    assert nb10["architectures"] == ["controlnet", *experiments.SUCCESSORS, "union"] and nb10["shipped_runs"]
    assert nb10["tasks"] == list(experiments.ARCHITECTURE_TASKS)
    for nb in (nb06, nb08, nb09, nb10):
        assert nb["n_seeds"] >= 3 and nb["seed"] == experiments.SEEDS[0]
