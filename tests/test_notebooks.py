"""Every notebook under notebooks/ is a test: papermill runs it with the smoke profile and the files
it declares in its metadata (``metadata.cnkit.outputs``) must appear. New notebooks are picked up
without editing this file."""

import json
import re
from pathlib import Path

import papermill as pm
import pytest
from diffusers import StableDiffusionPipeline

from cnkit.tiny import vae_scale_factor

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
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_with_the_smoke_profile(path, tmp_path):
    out_dir = tmp_path / "out"
    meta = json.loads(path.read_text())["metadata"]["cnkit"]
    # headless_parameters: what a notebook needs to run without a person (the playground's interactive=False).
    parameters = {**meta.get("headless_parameters", {}), "profile": "smoke", "out_dir": str(out_dir)}
    pm.execute_notebook(str(path), str(tmp_path / path.name), parameters=parameters, cwd=str(path.parent),
                        progress_bar=False, kernel_name="python3")
    for name in meta["outputs"]:
        f = out_dir / name
        assert f.is_file() and f.stat().st_size > 0, f"{path.name} did not write {name}"
    for folder in meta.get("pipelines", []):  # diffusers folders it writes must load with the stock class
        pipe = StableDiffusionPipeline.from_pretrained(out_dir / folder, local_files_only=True)
        assert pipe.unet.config.sample_size * vae_scale_factor(pipe.vae) == 64


def _parameters(path: Path) -> dict:
    import ast

    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    return {node.target.id: ast.literal_eval(node.value) for node in ast.parse("".join(cell["source"])).body
            if isinstance(node, ast.AnnAssign)}


def test_training_notebooks_default_to_the_kits_recipe_so_they_share_one_run():
    from cnkit.runs import RECIPE

    for stem in ("02_train_controlnet", "03_zero_conv_growth", "04_sudden_convergence"):
        found = _parameters(NOTEBOOKS[0].parent / f"{stem}.ipynb")
        assert {k: found[k] for k in RECIPE if k in found} == {k: RECIPE[k] for k in RECIPE if k in found}, stem
        assert {"base", "dataset", "variant", "steps", "batch_size", "learning_rate", "seed"} <= set(found)


def test_figure_notebooks_share_runs_through_cnkit_experiments():
    """The ablation's zero runs are notebook 04's (same configuration, so cnkit.runs trains them once), and
    notebooks 06-09 default to the budgets cnkit.experiments trains ahead of them."""
    from dataclasses import replace

    from cnkit import experiments
    from cnkit.runs import RECIPE, run_key
    from cnkit.train import TrainConfig

    nb04 = _parameters(NOTEBOOKS[0].parent / "04_sudden_convergence.ipynb")
    for seed in experiments.SEEDS:
        # what notebook 04 builds from its defaults (its configs cell), for each of its seeds
        cfg = TrainConfig(**{**RECIPE, **{k: nb04[k] for k in RECIPE if k in nb04}, "seed": seed,
                             "checkpoint_every": min(200, nb04["steps"])})
        assert run_key(cfg) == run_key(experiments.ablation("zero", seed))
        if seed == nb04["seed"] and nb04["compare_uniform"]:  # notebook 04's uniform-sampling comparison
            assert run_key(replace(cfg, timestep_sampling="uniform")) == run_key(experiments.sampling_comparison(seed))
    nb06 = _parameters(NOTEBOOKS[0].parent / "06_ablation_architectures.ipynb")
    assert tuple(nb06["variants"]) == experiments.VARIANTS and nb06["steps"] == RECIPE["steps"]
    nb08 = _parameters(NOTEBOOKS[0].parent / "08_dataset_size.ipynb")
    assert tuple(nb08["sizes"]) == experiments.DATASET_SIZES and nb08["steps"] == experiments.SHORT["steps"]
    nb09 = _parameters(NOTEBOOKS[0].parent / "09_composition_and_reconstruction.ipynb")
    assert nb09["steps"] == experiments.SHORT["steps"]
    for nb in (nb06, nb08, nb09):
        assert nb["n_seeds"] >= 3 and nb["seed"] == experiments.SEEDS[0]
