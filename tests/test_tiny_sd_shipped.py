"""The embedded default as shipped in data/tiny-sd: the files are the ones its card describes, it
loads offline with the stock pipeline, and cnkit's evaluation reproduces the card's figures."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from notebook_cells import notebook_parameters

from cnkit import card, metrics
from cnkit.data import splits
from cnkit.generation import generate

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny-sd"
# Tolerance for reproducing the card on a small fixed sample: per-image outcomes may flip where a
# generation sits on a decision boundary and the CPU's float reductions differ (thread count,
# instruction set), so at most 2 of 16 may differ per world.
SAMPLE, MAX_FLIPS = 16, 2


@pytest.fixture(scope="module")
def shipped():
    pipe = StableDiffusionPipeline.from_pretrained(TINY, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_files_match_the_hashes_in_the_card():
    recorded = card.card_hashes(TINY)
    assert recorded, "the card lists no files"
    assert recorded == card.file_hashes(TINY)


def test_size_and_formats():
    files = [p for p in TINY.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")], "safetensors only"


def test_vae_reconstruction_of_the_kits_worlds_reproduces_the_card(shipped):
    """The card's VAE PSNR on the kit's own worlds, recomputed on the same 64 held-out images each, holds the 30 dB
    bar; the card's bar is the lowest world's (Fill50K's colours, 27.0 dB: not held, and the card says so)."""
    from cnkit.data.splits import held_out_images
    from cnkit.experiments import pretraining
    from cnkit.training.pretrain import vae_psnr

    data = card.card_data(TINY)
    by_world = data["stats"]["vae_psnr_db_by_world"]
    for world in ("fill", "shapes"):
        psnr = vae_psnr(shipped.vae, held_out_images(64, data["recipe"]["seed"], world=world))
        assert psnr == pytest.approx(by_world[world], abs=0.05) and psnr >= 30, world
    lowest = min(by_world.values())
    assert data["stats"]["vae_psnr_db"] == lowest
    assert data["targets"]["vae_psnr_db"]["held"] == (lowest >= pretraining.TARGETS["vae_psnr_db"])


def test_make_pretrain_rebuilds_the_default():
    """Notebook 01's defaults (what ``make pretrain`` runs) are the shipped base's recipe, so the card's rebuild line
    and ``make pretrain`` are one recipe."""
    defaults = notebook_parameters(TINY.parent.parent / "notebooks" / "01_pretrain_tiny_sd.ipynb")
    recipe = card.card_data(TINY)["recipe"]
    shared = (defaults.keys() & recipe.keys()) - {"out_dir"}  # where a run is written is not part of its recipe
    assert {"warm_start", "vae_anchor", "steps", "decay_steps"} <= shared
    assert {k: defaults[k] for k in shared} == {k: recipe[k] for k in shared}


def test_draws_the_prompted_circle(shipped):
    out = shipped(["red circle with blue background"] * 4, num_inference_steps=25, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (4, 64, 64, 3)
    results = [metrics.analyse_fill((im * 255).round().astype(np.uint8)) for im in out]
    assert sum(r["one_disc"] and r["fill"] == "red" and r["background"] == "blue" for r in results) >= 3


def test_evaluation_reproduces_the_card_on_a_fixed_sample(shipped):
    """The card's rates are the means of the per-image outcomes evaluation.json lists, the fill bars hold on them, and
    those outcomes are what the base gives now on a fixed sample of 16 prompts per world."""
    recorded = json.loads((TINY / "evaluation.json").read_text())
    s = recorded["settings"]
    card_rates = card.card_data(TINY)["evaluation"]
    per_fill = recorded["per_image"]["fill"]
    assert s["n"] == len(per_fill) >= 256 and s["steps"] <= 30
    for rate, key in (("one_disc", "one_disc"), ("fill_colour", "fill_ok"), ("background_colour", "background_ok")):
        assert abs(card_rates["fill"][rate] - np.mean([r[key] for r in per_fill])) < 1e-9
        assert card_rates["fill"][rate] >= 0.95
    shapes_correct = np.mean([r["correct"] for r in recorded["per_image"]["shapes"]])
    assert abs(card_rates["shapes"]["correct"] - shapes_correct) < 1e-9
    # The shapes bar (>= 75% prompted shapes, counts and colours) is not met (53.1% as shipped, the third edition;
    # the card says so): issue 19 pretrains further on a GPU; its assertion belongs here then.
    # Without the training prompts to exclude, draw a longer list and match the recorded prompts.
    fills, shapes = splits.held_out_prompts(8 * SAMPLE, s["seed"])
    fills = fills[:SAMPLE]
    rec_fill, rec_shapes = recorded["per_image"]["fill"][:SAMPLE], recorded["per_image"]["shapes"][:SAMPLE]
    assert [f["prompt"] for f in fills] == [r["prompt"] for r in rec_fill]
    images = generate.generate_many(shipped, [f["prompt"] for f in fills], None, [], [f["seed"] for f in fills],
                                    steps=s["steps"], guidance=s["guidance"])
    flips = 0
    for f, r, img in zip(fills, rec_fill, images):
        a = metrics.analyse_fill(img)
        now = (a["one_disc"], a.get("fill") == f["fill"], a["background"] == f["background"])
        flips += now != (r["one_disc"], r["fill_ok"], r["background_ok"])
    assert flips <= MAX_FLIPS
    # the shapes prompts were drawn excluding training prompts; the same draw must come back
    by_prompt = {r["prompt"]: r for r in rec_shapes}
    kept = [x for x in shapes if x["prompt"] in by_prompt][:SAMPLE]
    assert len(kept) >= SAMPLE // 2
    images = generate.generate_many(shipped, [x["prompt"] for x in kept], None, [],
                                    [by_prompt[x["prompt"]]["seed"] for x in kept], steps=s["steps"],
                                    guidance=s["guidance"])
    flips = sum(metrics.analyse_shapes(img, x["truth"])["correct"] != by_prompt[x["prompt"]]["correct"]
                for x, img in zip(kept, images))
    assert flips <= MAX_FLIPS
