import json

import numpy as np
import pytest

from cnkit.data import readers as datasets
from cnkit.data import toyworld


@pytest.mark.parametrize("world", toyworld.WORLDS)
def test_samples_are_deterministic_random_access_and_seeded(world):
    a = toyworld.sample(world, 5, seed=3)
    b = toyworld.sample(world, 5, seed=3)
    assert np.array_equal(a.image, b.image) and a.prompt == b.prompt and a.truth == b.truth
    for name in a.conditions:
        assert np.array_equal(a.conditions[name], b.conditions[name])
    assert not np.array_equal(a.image, toyworld.sample(world, 5, seed=4).image)
    assert not np.array_equal(a.image, toyworld.sample(world, 6, seed=3).image)


@pytest.mark.parametrize("size", [32, 64, 512])
def test_any_size_keeps_the_same_scene(size):
    s = toyworld.sample("fill", 0, size=size)
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
    assert s.conditions["outline"].shape == (size, size, 3)
    assert s.truth == toyworld.sample("fill", 0, size=64).truth  # geometry in relative units


def test_every_prompt_word_is_in_the_vocabulary_and_colours_are_distinct():
    words = {w for i in range(200) for world in toyworld.WORLDS
             for w in toyworld.sample(world, i).prompt.replace(",", " ,").split()}
    assert words <= set(toyworld.VOCABULARY)
    colours = list(toyworld.PALETTE.values())
    assert len(set(colours)) == len(colours)  # a colour must name one RGB value for the metrics to read it


def test_fill_ground_truth_matches_the_pixels():
    for i in range(20):
        s = toyworld.sample("fill", i)
        t = s.truth
        assert s.prompt == f"{t['fill']} circle with {t['background']} background"
        assert t["fill"] != t["background"]
        disc = s.masks["disc"]
        fill = np.all(s.image == toyworld.PALETTE[t["fill"]], axis=-1)
        assert np.array_equal(disc, fill)
        area = np.pi * (t["radius"] * 64) ** 2
        assert abs(disc.sum() - area) / area < 0.1
        # the outline sits on the disc's boundary: white pixels, none deep inside or far outside
        yy, xx = np.nonzero(s.conditions["outline"][..., 0] == 255)
        d = np.hypot((xx + 0.5) / 64 - t["centre"][0], (yy + 0.5) / 64 - t["centre"][1])
        assert len(d) > 0 and np.all(np.abs(d - t["radius"]) < 2 / 64)


def test_shapes_ground_truth_matches_prompt_and_maps():
    kinds_seen = set()
    for i in range(30):
        s = toyworld.sample("shapes", i)
        shapes = s.truth["shapes"]
        assert 1 <= len(shapes) <= 3
        colours = [x["colour"] for x in shapes] + [s.truth["background"]]
        assert len(set(colours)) == len(colours)
        for x in shapes:
            assert f"{x['colour']} {x['kind']}" in s.prompt
            kinds_seen.add(x["kind"])
        assert s.prompt.endswith(f"on {s.truth['background']} background")
        for j, x in enumerate(shapes):
            visible = s.masks[f"shape{j}"]
            assert visible.sum() > 0
            assert np.all(s.image[visible] == toyworld.PALETTE[x["colour"]])
            assert np.all(s.conditions["segmentation"][visible] == toyworld.SEGMENTATION_COLOURS[x["kind"]])
        # depth: nearer layers brighter, background zero
        any_shape = np.any([s.masks[f"shape{j}"] for j in range(len(shapes))], axis=0)
        assert np.all(s.conditions["depth"][~any_shape] == 0)
        for j in range(len(shapes) - 1):
            a, b = s.masks[f"shape{j}"], s.masks[f"shape{j + 1}"]
            if a.any() and b.any():
                assert s.conditions["depth"][a][0, 0] < s.conditions["depth"][b][0, 0]
        edges = s.conditions["edges"]
        assert edges.shape == (64, 64, 3) and edges.max() == 255 and edges.mean() < 60
    assert kinds_seen == set(toyworld.SHAPE_KINDS)


def test_toyworld_dataset_and_errors():
    ds = toyworld.ToyWorld("shapes", n=4, condition="depth")
    assert len(ds) == 4
    ex = ds[1]
    assert ex.image.size == (64, 64) and ex.condition.mode == "RGB"
    assert np.array_equal(np.asarray(ex.condition), toyworld.sample("shapes", 1).conditions["depth"])
    with pytest.raises(ValueError, match="outline"):
        toyworld.ToyWorld("fill", condition="depth")
    with pytest.raises(ValueError, match="fill, shapes"):
        toyworld.sample("circles", 0)
    with pytest.raises(IndexError):
        ds[4]


@pytest.mark.parametrize("exporter", [toyworld.export_fill50k, toyworld.export_imagefolder])
@pytest.mark.parametrize("world", ["fill", "shapes"])
def test_export_then_load_round_trips_exactly(tmp_path, exporter, world):
    exporter(tmp_path, n=6, size=64, seed=2, world=world)
    ds = datasets.load(tmp_path)
    assert len(ds) == 6
    ref = toyworld.ToyWorld(world, n=6, seed=2)
    truths = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()]
    for i in range(6):
        got, want = ds[i], ref.sample(i)
        assert np.array_equal(np.asarray(got.image), want.image)
        assert np.array_equal(np.asarray(got.condition), want.conditions[ref.condition])
        assert got.prompt == want.prompt
        assert truths[i] == json.loads(json.dumps(want.truth))


def test_fill50k_layout_is_the_official_one(tmp_path):
    toyworld.export_fill50k(tmp_path, n=2, size=64, seed=0)
    first = json.loads((tmp_path / "prompt.json").read_text().splitlines()[0])
    assert set(first) == {"source", "target", "prompt"}
    assert first["source"] == "source/0.png" and first["target"] == "target/0.png"
    assert first["prompt"].endswith("background")
