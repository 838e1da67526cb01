import numpy as np

from cnkit import geometry, metrics
from cnkit.data import splits, toyworld
from cnkit.experiments import evaluations


def test_fill_analysis_passes_ground_truth_and_reads_colours():
    for i in range(30):
        s = toyworld.sample("fill", i)
        a = metrics.analyse_fill(s.image)
        assert a["one_disc"] and a["fill"] == s.truth["fill"] and a["background"] == s.truth["background"]
        assert a["disc_iou"] > 0.9


def test_fill_analysis_rejects_what_is_not_one_disc():
    blank = np.zeros((64, 64, 3), np.uint8)
    assert not metrics.analyse_fill(blank)["one_disc"]
    two = blank.copy()
    two[10:20, 10:20] = 255
    two[40:50, 40:50] = 255
    assert metrics.analyse_fill(two)["regions"] == 2 and not metrics.analyse_fill(two)["one_disc"]
    bar = blank.copy()
    bar[30:34, 5:60] = 255  # one region, not a disc
    assert not metrics.analyse_fill(bar)["one_disc"]


def test_shapes_analysis_on_ground_truth_and_wrong_prompts():
    right = [metrics.analyse_shapes(s.image, s.truth)["correct"]
             for s in (toyworld.sample("shapes", i) for i in range(40))]
    assert np.mean(right) >= 0.95  # the ceiling: heavy occlusion can defeat the template fit
    wrong = 0
    for i in range(20):
        a, b = toyworld.sample("shapes", i), toyworld.sample("shapes", i + 1000)
        wrong += metrics.analyse_shapes(a.image, b.truth)["correct"]
    assert wrong == 0


def test_shape_kinds_are_told_apart():
    for kind in toyworld.SHAPE_KINDS:
        x, y = geometry.grid(64)
        region = geometry.shape_field(kind, 0.5, 0.5, 0.2, x, y) <= 0
        assert metrics.classify_shape(region, np.zeros_like(region))[0] == kind


def test_segmentation_redetected_from_the_ground_truth_image_is_exact():
    for i in range(20):
        s = toyworld.sample("shapes", i)
        assert metrics.segmentation_miou(s.image, s) == 1.0
        # Colours are not trusted: the same scene with every shape recoloured still scores 1.
        recoloured = s.image.copy()
        used = {sh["colour"] for sh in s.truth["shapes"]} | {s.truth["background"]}
        spare = [c for c in toyworld.COLOUR_NAMES if c not in used]
        for k, _sh in enumerate(s.truth["shapes"]):
            recoloured[s.masks[f"shape{k}"]] = toyworld.PALETTE[spare[k]]
        assert metrics.segmentation_miou(recoloured, s) == 1.0


def test_segmentation_miou_falls_when_shapes_are_missing_or_moved():
    s = toyworld.sample("shapes", 3)
    blank = np.empty_like(s.image)
    blank[:] = toyworld.PALETTE[s.truth["background"]]
    assert metrics.segmentation_miou(blank, s) < 0.5  # background right, every shape class missing
    other = toyworld.sample("shapes", 4)
    assert metrics.segmentation_miou(other.image, s) < 0.8


def test_fidelity_metrics_per_dataset():
    assert list(metrics.fidelity_metrics_for("toy:fill")) == ["disc_iou"]
    assert list(metrics.fidelity_metrics_for("toy:shapes/segmentation")) == ["miou", "edge_f1"]
    assert list(metrics.fidelity_metrics_for("toy:shapes/edges")) == ["edge_f1", "miou"]
    assert list(metrics.fidelity_metrics_for("my-shapes-folder", with_truth=False)) == ["edge_f1"]


def test_composition_scenes_split_two_shapes_between_two_conditions():
    scenes = splits.composition_scenes(4)
    for s in scenes:
        assert len(s.truth["shapes"]) == 2
        seg, outline = evaluations.composition_conditions(s)
        assert seg[s.masks["shape0"]].any() and not seg[s.masks["shape1"]].any()
        assert outline.any() and not outline[s.masks["shape0"]].any()
        assert metrics.composition_fidelity(s.image, s) == {"segmentation_miou": 1.0, "outline_edge_f1": 1.0}
    blank = np.empty_like(scenes[0].image)
    blank[:] = toyworld.PALETTE[scenes[0].truth["background"]]
    low = metrics.composition_fidelity(blank, scenes[0])
    assert low["segmentation_miou"] < 0.6 and low["outline_edge_f1"] < 0.1
