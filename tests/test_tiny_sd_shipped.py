"""The embedded default as shipped in data/tiny-sd: the files are the ones its card describes, it
loads offline with the stock pipeline, and cnkit's evaluation reproduces the card's figures."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from cnkit import card, generate, metrics, splits

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


def test_card_records_the_bars(shipped):
    data = card.card_data(TINY)
    ev = data["evaluation"]
    assert ev["settings"]["n"] >= 256 and ev["settings"]["steps"] <= 30
    assert data["stats"]["vae_psnr_db"] >= 30
    assert min(ev["fill"].values()) >= 0.95
    # The shapes bar (>= 75% prompted shapes, counts and colours) is not met yet (3.5% as shipped);
    # issue 3 stays open, and its assertion belongs here once a longer recipe reaches it.


def test_draws_the_prompted_circle(shipped):
    out = shipped(["red circle with blue background"] * 4, num_inference_steps=25, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (4, 64, 64, 3)
    results = [metrics.analyse_fill((im * 255).round().astype(np.uint8)) for im in out]
    assert sum(r["one_disc"] and r["fill"] == "red" and r["background"] == "blue" for r in results) >= 3


def test_evaluation_reproduces_the_card_on_a_fixed_sample(shipped):
    recorded = json.loads((TINY / "evaluation.json").read_text())
    s = recorded["settings"]
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
