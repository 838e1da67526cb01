"""The playground's state without a browser (tests/test_browser.py drives the same in JupyterLab): nets picked from
their cards, not their names; messages that belong to a widget and clear when it is fixed; a status that tells
the truth; units numbered from 1 that share the scene; the prompt from the scene and its unknown words."""

import json

import numpy as np
import pytest
from PIL import Image

from cnkit.card import write_card
from cnkit.data import splits, toyworld
from cnkit.experiments import shipped
from cnkit.models.controlnets import make_controlnet
from cnkit.surfaces import widgets


def _net(folder, tiny_pipe, dataset: str):
    """A ControlNet folder whose card says it was trained on ``dataset`` (its name says nothing)."""
    make_controlnet(tiny_pipe, "zero", seed=0).save_pretrained(folder)
    write_card(folder, "test net", {"What it does": "test"}, {"config": {"dataset": dataset}})
    return str(folder)


@pytest.fixture(scope="module")
def nets(tmp_path_factory, tiny_pipe):
    root = tmp_path_factory.mktemp("nets")
    # names chosen to mislead: the cards decide
    return {"alpha": _net(root / "alpha", tiny_pipe, "toy:fill"),
            "beta": _net(root / "beta", tiny_pipe, "toy:shapes/outline"),
            "gamma": _net(root / "gamma", tiny_pipe, "toy:shapes/segmentation")}


@pytest.fixture
def playground(nets, base_dir):
    pg = widgets.Playground(base=str(base_dir), controlnets=list(nets.values()))
    pg.steps.value = 2
    return pg


def test_cards_say_what_a_net_was_trained_on_and_pick_the_net_for_a_kind_of_map(nets, tmp_path):
    assert shipped.trained_on(nets["beta"]) == shipped.TrainedOn("toy:shapes/outline", "shapes", ("outline",))
    assert shipped.trained_on(nets["alpha"]).conditions == ("outline",)  # the fill world's one map
    assert shipped.trained_on(tmp_path) is None  # no card, no run: not known
    choices = {name: nets[name] for name in ("alpha", "beta", "gamma")}
    assert shipped.matching_net(choices, "segmentation", "shapes") == "gamma"
    assert shipped.matching_net(choices, "outline", "shapes") == "beta"  # its world first
    assert shipped.matching_net(choices, "outline", "fill") == "alpha"
    assert shipped.matching_net(choices, "depth", "shapes") is None


def test_the_shipped_nets_are_offered_by_short_name_and_match_their_annotators():
    choices = shipped.net_choices()
    assert {"fill-outline", "shapes-outline", "shapes-segmentation"} <= set(choices)
    assert shipped.matching_net(choices, "segmentation", "shapes") == "shapes-segmentation"
    assert not any("union" in name for name in choices)  # a unit gives one map


def test_defaults_make_sense_and_a_mismatch_is_said_in_the_unit(playground):
    unit = playground.units[0]
    assert "Unit 1" in unit.title.value and unit.scene == ("shapes", splits.VALIDATION)
    assert unit.net.value == "gamma" and "cnkit-net-warning" not in unit.net_message._dom_classes
    assert playground.prompt.value == toyworld.sample("shapes", splits.VALIDATION).prompt
    assert unit.condition_image.layout.display != "none" and unit.source_image.layout.display != "none"
    unit.annotator.value = "toy_outline"  # the net follows the annotator until the user picks one
    assert unit.net.value == "beta"
    unit.net.value = "alpha"  # picked: trained on the fill world's outlines, given a shapes outline
    assert "fill world" in unit.net_message.value and "cnkit-net-warning" not in unit.net_message._dom_classes
    unit.annotator.value = "toy_segmentation"
    assert unit.net.value == "alpha" and "cnkit-net-warning" in unit.net_message._dom_classes
    assert "trained on the fill world" in unit.net_message.value and "Choose gamma" in unit.net_message.value


def test_settings_errors_stay_in_their_unit_until_fixed(playground):
    unit = playground.units[0]
    unit.source_kind.value = "upload"  # the toy maps read a scene, not pixels: the annotator becomes canny
    assert unit.annotator.value == "canny" and unit.upload_box.layout.display != "none"
    assert unit.toy_box.layout.display == "none" and "upload an image" in unit.source_message.value
    unit.source_kind.value = "toy world"
    assert not unit.source_message.value
    assert "low_threshold" in unit.settings_hint.value and not unit.settings.disabled
    unit.settings.value = '{"low_threshold": 5'
    assert "not JSON" in unit.source_message.value and unit.condition_image.layout.display == "none"
    unit.settings.value = '{"low_threshold": 5}'
    assert not unit.source_message.value and unit.condition_image.layout.display != "none"
    unit.settings.value = '{"lowest": 5}'
    assert "no setting(s) lowest" in unit.source_message.value


def test_a_missing_net_is_named_and_generate_then_fails_truthfully(playground):
    unit = playground.units[0]
    unit.net.value = widgets.OWN
    unit.net_path.value = "shapes-outline"
    assert "no ControlNet at shapes-outline" in unit.net_message.value
    assert playground.generate() is None
    assert "failed" in playground.status.value and "done" not in playground.status.value
    assert "no ControlNet at shapes-outline" in playground.error.value and not playground.results.children
    unit.net_path.value = ""
    assert playground.generate() is None and "type the path" in unit.net_message.value


def test_status_is_done_only_after_a_run_and_the_last_result_goes_when_a_new_run_fails(playground):
    seen = []
    playground.status.observe(lambda change: seen.append(change["new"]), names="value")
    result = playground.generate()
    assert result is not None and len(playground.results.children) == 1
    assert any("loading" in s for s in seen) and any("step 2/2" in s for s in seen)
    assert "done in" in seen[-1] and not any("done" in s for s in seen[:-1])
    playground.units[0].annotator.value = "canny"
    playground.units[0].settings.value = "{bad"
    assert playground.generate() is None
    assert not playground.results.children and playground.live.layout.display == "none"
    assert "failed" in playground.status.value and "unit 1" in playground.error.value


def test_units_are_numbered_from_1_share_the_scene_and_the_prompt_follows_it(playground):
    second = playground.add_unit("toy_outline")
    assert second.scene == playground.units[0].scene and second.net.value == "beta"
    third = playground.add_unit()
    playground.remove_unit(second)
    fourth = playground.add_unit()
    assert [u.title.value for u in playground.units] == ["<b>Unit 1</b>", "<b>Unit 2</b>", "<b>Unit 3</b>"]
    assert fourth.scene == third.scene
    playground.units[0].index.value = splits.VALIDATION + 3  # the first unit's scene is the shared one
    assert third.scene == fourth.scene == ("shapes", splits.VALIDATION + 3)
    assert playground.prompt.value == toyworld.sample("shapes", splits.VALIDATION + 3).prompt
    playground.prompt.value = "red circle"  # the user's own prompt stays
    playground.units[0].index.value = splits.VALIDATION + 4
    assert playground.prompt.value == "red circle"


def test_the_prompt_hint_lists_the_words_and_unknown_words_are_flagged(playground):
    assert "circle" in playground.prompt_hint.value and "red" in playground.prompt_hint.value
    playground.prompt.value = "red dog with zebra background"
    assert "dog, zebra" in playground.prompt_message.value
    playground.prompt.value = "red circle with blue background"
    assert not playground.prompt_message.value
    playground.prompt.value = "red dog"
    result = playground.generate()
    assert result is not None and "dog" in playground.status.value  # the run's notes say it too


def test_the_headless_run_saves_what_it_made(playground, tmp_path):
    with pytest.raises(RuntimeError, match="nothing generated yet"):
        playground.save(tmp_path)
    assert playground.generate() is not None
    names = {p.name for p in playground.save(tmp_path)}
    assert names == {"image_0.png", "condition_0.png"}
    image = np.asarray(Image.open(tmp_path / "image_0.png"))
    assert image.shape == (64, 64, 3)
    assert json.loads(json.dumps(playground.result.settings))["units"] == 1


def test_another_world_brings_a_map_it_has_and_the_net_trained_on_it(playground):
    unit = playground.units[0]
    unit.world.value = "fill"  # the fill world has outlines only
    assert unit.annotator.value == "toy_outline" and unit.net.value == "alpha" and not unit.source_message.value
    assert playground.prompt.value == toyworld.sample("fill", splits.VALIDATION).prompt
