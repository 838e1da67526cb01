"""studies/fill50k_like.py: Fill50K's layout, deterministic, readable by the kit, outlines that match the truth."""

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "studies"))
import fill50k_like  # noqa: E402


def test_writes_fill50k_layout_deterministically_and_the_kit_reads_it(tmp_path):
    from cnkit.data.readers import load
    from cnkit.metrics import condition_disc, iou

    a = fill50k_like.write(tmp_path / "a", n=12, size=64, seed=3)
    b = fill50k_like.write(tmp_path / "b", n=6, size=64, seed=3)
    rows = [json.loads(line) for line in (a / "prompt.json").read_text().splitlines()]
    assert rows[0] == {"source": "source/0.png", "target": "target/0.png", "prompt": rows[0]["prompt"]}
    assert all(r["prompt"].endswith(" background") and " circle with " in r["prompt"] for r in rows)
    for i in range(6):  # a longer folder begins with the items of a shorter one
        assert (a / "source" / f"{i}.png").read_bytes() == (b / "source" / f"{i}.png").read_bytes()
        assert (a / "target" / f"{i}.png").read_bytes() == (b / "target" / f"{i}.png").read_bytes()
    ds = load(str(a))
    truths = fill50k_like.read_truth(a)
    assert len(ds) == len(truths) == 12
    for ex, t in zip(ds, truths):
        source, target = np.asarray(ex.condition), np.asarray(ex.image)
        assert set(np.unique(source)) <= {0, 255}  # binary, like Fill50K's sources
        disc = fill50k_like.truth_disc(t)
        assert (target[disc] == t["fill_rgb"]).all() and (target[~disc] == t["background_rgb"]).all()
        if t["inside"]:  # a closed outline encloses the true disc
            assert iou(condition_disc(source), disc) > 0.85


def test_colour_names_are_the_css_names_split_into_words():
    assert len(fill50k_like.NAMES) == 140
    assert all(words.replace(" ", "") == name for name, words in fill50k_like.COLOUR_WORDS.items())
    for seen in ("pale golden rod", "old lace", "light golden rod yellow", "honey dew", "fire brick", "corn silk",
                 "cornflower blue", "light sea green", "burly wood"):  # as in Fill50K's prompt.json
        assert seen in fill50k_like.COLOUR_WORDS.values()
