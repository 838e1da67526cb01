"""cnkit.experiments.evaluations: the prompt settings of Fig. 8, the guidance forms of Fig. 5, Table 2's references."""

import numpy as np
import pytest

from cnkit import metrics
from cnkit.data import toyworld
from cnkit.experiments import evaluations as E
from cnkit.models.controlnets import make_controlnet


def test_prompt_settings_follow_the_paper_and_conflict_with_the_item():
    truth = toyworld.sample("fill", 0).truth
    assert E.fill_prompt("none", truth, 0) == ("", None)
    assert E.fill_prompt("insufficient", truth, 0) == ("a high-quality, detailed, and professional image", None)
    perfect, wanted = E.fill_prompt("perfect", truth, 0)
    assert perfect == toyworld.sample("fill", 0).prompt and wanted == (truth["fill"], truth["background"])
    for k in range(10):
        prompt, (fill, background) = E.fill_prompt("conflicting", truth, k)
        assert "square" in prompt and fill != background
        assert not {fill, background} & {truth["fill"], truth["background"]}
    with pytest.raises(ValueError, match="unknown prompt setting"):
        E.fill_prompt("vague", truth, 0)


def test_saturation_and_off_palette_measures():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    assert metrics.saturation(red) == 1.0 and metrics.off_palette(red) == 0.0  # red is a palette colour
    grey = np.full((8, 8, 3), 128, np.uint8)
    assert metrics.saturation(grey) == 0.0 and metrics.off_palette(grey) > 0


@pytest.fixture(scope="module")
def net(tiny_pipe):
    return make_controlnet(tiny_pipe.unet, "gaussian", vae_scale_factor=4, seed=1).eval()


def test_evaluations_run_and_measure_what_they_generate(tiny_pipe, net):
    r = E.evaluate_prompt_settings(tiny_pipe, net, n=2, steps=2)
    assert set(E.PROMPT_SETTINGS) <= set(r) and len(r["conditions"]) == 2
    for s in E.PROMPT_SETTINGS:
        item = r[s]
        assert item["images"].shape == (2, 64, 64, 3)
        assert item["disc_iou"] == pytest.approx(np.mean(item["disc_iou_per_item"]))
        assert (item["adherence"] is None) == (s in ("none", "insufficient"))
    c = E.evaluate_cfg_forms(tiny_pipe, net, n=2, steps=2)
    # With no prompt both branches see the same text: the condition in both cancels guidance (up to the
    # round-off of a doubled batch).
    both, none = c["guidance, condition in both branches"], c["no guidance"]
    assert np.abs(both["images"].astype(int) - none["images"]).max() <= 1
    assert not np.array_equal(c["guidance, conditional branch only, unweighted"]["images"], none["images"])
    refs = E.segmentation_references(tiny_pipe, n=2, steps=2)
    assert refs["ground truth"]["miou"] == 1.0 and 0 <= refs["ground truth through the VAE"]["miou"] <= 1


def test_vae_colour_round_trip_gives_back_the_palette_the_base_learned():
    """The first base's VAE learned the kit's eight colours: they come back within CIEDE2000 10; the summary rates are
    what the per-colour distances and per-prompt judgements say."""
    from cnkit.colours import PALETTE, X11
    from cnkit.models.bases import load_pipeline
    from cnkit.params import repo_path

    r = E.vae_colour_round_trip(load_pipeline(str(repo_path("data/tiny-sd-v1"))).vae, n=8)
    de = r["delta_e_by_colour"]
    assert sorted(de) == sorted(X11) and r["n"] == 8
    assert all(de[name] <= 10 for name in PALETTE if name in X11)
    assert r["colours_within_10"] == pytest.approx(np.mean([v <= 10 for v in de.values()]))
    assert r["colours_median_delta_e"] == pytest.approx(np.median(list(de.values())), abs=0.01)
    assert list(r["worst_colours"].values()) == sorted(r["worst_colours"].values(), reverse=True)
    assert 0 <= r["fill_colour"] <= 1 and 0 <= r["background_colour"] <= 1
