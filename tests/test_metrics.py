import numpy as np

from cnkit import metrics, toyworld


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
        x, y = toyworld._grid(64)
        region = toyworld._shape_geometry(kind, 0.5, 0.5, 0.2, x, y) <= 0
        assert metrics.classify_shape(region, np.zeros_like(region))[0] == kind
