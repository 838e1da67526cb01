"""cnkit.colours: Fill50K's 140 colours as its prompts write them, and the perceptual distance the kit judges with."""

import numpy as np
import pytest

from cnkit import colours


def test_the_x11_table_is_fill50ks_vocabulary():
    assert len(colours.X11) == 140 and len(colours.X11_WORDS) == 106
    assert colours.X11["pale golden rod"] == (238, 232, 170) and colours.X11["old lace"] == (253, 245, 230)
    assert "grey" not in " ".join(colours.X11) and "rebecca purple" not in colours.X11
    for name, rgb in colours.PALETTE.items():  # the kit's eight are CSS names with the same values
        assert colours.X11[name] == rgb


@pytest.mark.parametrize("lab_a, lab_b, expected", [  # Sharma, Wu and Dalal (2005), pairs 1, 7, 13, 17, 25, 34
    ((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425), ((50, 0, 0), (50, -1, 2), 2.3669),
    ((50, -0.001, 2.49), (50, 0.0009, -2.49), 4.8045), ((50, 2.5, 0), (73, 25, -18), 27.1492),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373)])
def test_ciede2000_matches_the_published_test_data(lab_a, lab_b, expected):
    assert float(colours.delta_e_lab(lab_a, lab_b)) == pytest.approx(expected, abs=1e-4)


def test_distance_is_zero_for_a_colour_and_names_come_back():
    rgb = np.array([[250, 128, 114], [0, 128, 0]])
    assert np.allclose(colours.delta_e(rgb, rgb), 0)
    assert colours.nearest_x11((250, 128, 114)) == "salmon" and colours.nearest_x11((1, 127, 1)) == "green"
