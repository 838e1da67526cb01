"""The editions of the embedded base that continue another (issue 28): the second, data/tiny-sd-v2, and the third,
data/tiny-sd (the default since 2026-12-04). Each one's files are the ones its card lists, it loads offline with the
stock pipeline and reads every word of Fill50K's colour names, and its card's numbers are computed from what it
recorded and come back when measured again on a fixed sample."""

import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline

from cnkit import card, metrics
from cnkit.colours import X11_WORDS
from cnkit.data import splits
from cnkit.experiments import pretraining
from cnkit.generation import generate

V2 = Path(__file__).resolve().parent.parent / "data" / "tiny-sd-v2"
# every published edition that continues another is held to the same checks (the default, the third, continues v2)
EDITIONS = [V2, V2.with_name("tiny-sd")]
SAMPLE, MAX_FLIPS = 12, 2  # as test_tiny_sd_shipped: a generation on a decision boundary may flip across CPUs



@pytest.fixture(scope="module", params=EDITIONS, ids=lambda p: p.name)
def edition(request):
    return request.param


@pytest.fixture(scope="module")
def v2(edition):
    pipe = StableDiffusionPipeline.from_pretrained(edition, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def recorded(edition):
    return card.card_data(edition), json.loads((edition / "evaluation.json").read_text())


def test_files_match_the_card_and_are_safetensors(edition):
    assert card.card_hashes(edition) == card.file_hashes(edition)
    files = [p for p in edition.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")]


def test_reads_every_colour_word_and_warns_for_others(v2):
    assert generate.unknown_words_note(v2.tokenizer, [" ".join(X11_WORDS)]) is None
    note = generate.unknown_words_note(v2.tokenizer, ["chartreusey circle with red background"])
    assert note and "chartreusey" in note


def test_card_rates_and_bars_are_computed_from_what_it_recorded(recorded):
    data, evaluation = recorded
    for world, keys in (("fill", ("one_disc", "fill_ok", "background_ok")),
                        ("fill_x11", ("one_disc", "fill_ok", "background_ok")), ("shapes", ("correct",))):
        per = evaluation["per_image"][world]
        assert len(per) == evaluation["settings"]["n"] >= 256
        rates = dict(zip(("one_disc", "fill_colour", "background_colour") if world != "shapes" else ("correct",),
                         keys))
        for rate, key in rates.items():
            assert data["evaluation"][world][rate] == pytest.approx(np.mean([r[key] for r in per]), abs=1e-9)
    bars = pretraining.targets(data["evaluation"], data["stats"], data["speed_8_images_25_steps"])
    assert bars == data["targets"]
    if "cpu_hours_since_first_edition" in data:  # the budget's measure, through the bases it continued
        before = pretraining.hours_since_first_edition(data["stats"]["start"]["from"])
        assert data["cpu_hours_since_first_edition"] == pytest.approx(
            before + sum(data["cpu_hours_of_this_machine"].values()))
    trip = data["stats"]["vae_colour_round_trip"]
    assert trip["colours_within_10"] == pytest.approx(np.mean([v <= 10 for v in trip["delta_e_by_colour"].values()]))


def test_card_says_how_to_rebuild_this_edition(edition, recorded):
    """Each edition's own recipe, not ``make pretrain``'s defaults: v3 needs warm_start v2 and no anchor."""
    from cnkit.training.pretrain import PretrainConfig

    data, _ = recorded
    line = pretraining.rebuild_command(PretrainConfig(**data["recipe"]), edition)
    assert line in (edition / "README.md").read_text()
    assert f"-p vae_anchor {data['recipe']['vae_anchor']} " in line and f"-p steps {data['recipe']['steps']} " in line


def test_vae_psnr_per_world_reproduces_the_card(v2, recorded):
    from cnkit.training.pretrain import vae_psnr

    data, _ = recorded
    for world, psnr in data["stats"]["vae_psnr_db_by_world"].items():
        now = vae_psnr(v2.vae, splits.held_out_images(64, data["recipe"]["seed"], world=world))
        assert now == pytest.approx(psnr, abs=0.05), world


def test_x11_outcomes_come_back_on_a_fixed_sample(v2, recorded):
    _, evaluation = recorded
    s = evaluation["settings"]
    rows = splits.held_out_x11_prompts(s["n"], s["seed"])[:SAMPLE]
    per = evaluation["per_image"]["fill_x11"][:SAMPLE]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in per]
    images = generate.generate_many(v2, [r["prompt"] for r in rows], None, [], [r["seed"] for r in rows],
                                    steps=s["steps"], guidance=s["guidance"])
    flips = 0
    for r, p, img in zip(rows, per, images):
        a = metrics.analyse_fill_x11(img, r["fill_rgb"], r["background_rgb"])
        flips += (a["one_disc"], a["fill_ok"], a["background_ok"]) != (p["one_disc"], p["fill_ok"], p["background_ok"])
    assert flips <= MAX_FLIPS


def test_refreshing_the_card_adds_ablations_and_keeps_every_number(tmp_path, edition, recorded):
    import shutil

    copy = tmp_path / edition.name
    shutil.copytree(edition, copy)
    row = {"choice": "a choice", "compared": "a vs b", "measured": "a 1, b 2", "decision": "a"}
    pretraining.refresh_base_card(copy, ablations=[row])
    data, _ = recorded
    new = card.card_data(copy)
    assert new["ablations"] == [row] and "| a choice | a vs b | a 1, b 2 | a |" in (copy / "README.md").read_text()
    for key in ("evaluation", "targets", "stats", "curve", "speed_8_images_25_steps"):
        assert new[key] == data[key], key
    assert card.card_hashes(copy) == card.file_hashes(copy)


def test_speed_is_timed_beside_the_first_edition_and_held_to_the_ratio():
    timing = pretraining.speed(V2, repeats=1, steps=2, reference=pretraining.FIRST_EDITION)
    assert timing["ratio"] == pytest.approx(timing["median_s"] / timing["reference_median_s"])
    bar = pretraining.targets({}, {"vae_psnr_db": 0.0}, timing)["speed_vs_first_edition"]
    assert bar == {"measured": timing["ratio"], "target": 1.5, "held": timing["ratio"] <= 1.5}
    alone = pretraining.targets({}, {"vae_psnr_db": 0.0}, {"median_s": 9.0})  # no reference: the absolute bar
    assert alone["speed_8_images_s"] == {"measured": 9.0, "target": pretraining.SPEED_BAR_S, "held": False}


def test_cpu_hours_count_from_the_first_edition_through_a_chain_of_bases(tmp_path):
    """The pretraining budget counts from the first edition: a base continuing v2 carries v2's hours too."""
    own = sum(card.card_data(V2)["cpu_hours_of_this_machine"].values())
    assert pretraining.hours_since_first_edition(str(V2)) == pytest.approx(own)
    assert pretraining.hours_since_first_edition(str(pretraining.FIRST_EDITION)) == 0.0
    assert pretraining.hours_since_first_edition("") == 0.0
    third = tmp_path / "third"
    third.mkdir()
    data = {"stats": {"start": {"from": str(V2)}}, "cpu_hours_of_this_machine": {"vae": 0.5, "unet": 1.0},
            "cpu_hours_since_first_edition": own + 1.5}
    (third / "README.md").write_text("# x\n\n## Recorded data\n\n```json\n" + json.dumps(data) + "\n```\n")
    assert pretraining.hours_since_first_edition(str(third)) == pytest.approx(own + 1.5)
    assert pretraining.hours_since_first_edition(str(tmp_path / "no-card")) is None
