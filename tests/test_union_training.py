"""One net for several conditions (the union architecture): read from multi-condition data, encoded, trained by
cnkit.training.train's loop with replayable per-condition dropout, validated and generated from a set of maps."""

import csv

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel

from cnkit.data import readers as datasets
from cnkit.data import splits, toyworld
from cnkit.data.encoded import png_bytes
from cnkit.data.trainset import OnTheFly, cached_store
from cnkit.experiments import evaluations
from cnkit.generation.generate import ControlUnit, generate, generate_many
from cnkit.metrics import segmentation_miou
from cnkit.models import architectures
from cnkit.pixels import side_by_side, stack_maps
from cnkit.training.telemetry import InjectionTelemetry, Validation
from cnkit.training.train import TrainConfig, Trainer

TWO = "toy:shapes/segmentation+depth"


def _cfg(base_dir, out_dir, **kw):
    return TrainConfig(**(dict(base=str(base_dir), out_dir=str(out_dir), dataset=TWO, architecture="union", steps=2,
                               batch_size=2, n_train=8, checkpoint_every=1, validate_every=1, validation_size=2) | kw))


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_toy_world_and_an_imagefolder_give_several_maps_per_item(tmp_path):
    world = toyworld.ToyWorld("shapes", n=3, condition="segmentation+depth")
    item, sample = world[1], world.sample(1)
    assert isinstance(item.condition, tuple) and len(item.condition) == 2
    assert np.array_equal(np.asarray(item.condition[1]), sample.conditions["depth"])
    assert datasets.condition_count(TWO) == 2 and datasets.condition_count("toy:fill") == 1
    with pytest.raises(ValueError, match="has no condition 'segmentation\\+segmentation'"):
        toyworld.ToyWorld("shapes", condition="segmentation+segmentation")
    # the same items written as an imagefolder (a list of conditioning images per row) read back equal
    folder = toyworld.export_imagefolder(tmp_path / "multi", n=3, world="shapes", condition="segmentation+depth")
    read = datasets.load(folder)
    assert datasets.condition_count(folder) == 2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(read[1].condition, item.condition))
    with pytest.raises(ValueError, match="one source image per item"):
        toyworld.export_fill50k(tmp_path / "f50k", n=2, world="shapes", condition="segmentation+depth")


def test_a_row_listing_a_missing_or_fewer_maps_is_a_clear_error(tmp_path):
    folder = toyworld.export_imagefolder(tmp_path / "multi", n=3, world="shapes", condition="segmentation+depth")
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "metadata.jsonl").write_text("\n".join([lines[0].replace('"conditioning_images/depth/0.png"',
                                                                       '"conditioning_images/nope.png"')]
                                                     + lines[1:]) + "\n")
    with pytest.raises(datasets.DatasetError, match="line 1: conditioning_image file .*nope.png does not exist"):
        datasets.load(folder)
    (folder / "metadata.jsonl").write_text("\n".join([lines[0].replace(', "conditioning_images/depth/0.png"', "")]
                                                     + lines[1:]) + "\n")
    with pytest.raises(datasets.DatasetError, match=r"rows list \[1, 2\] conditioning images"):
        datasets.load(folder)


def test_the_encoded_store_keeps_every_map_of_an_item(base_dir, tiny_pipe, tmp_path):
    cfg = _cfg(base_dir, tmp_path, n_train=4)
    store = cached_store(cfg, tiny_pipe, 64, tmp_path / "cache")
    fly = OnTheFly(cfg, tiny_pipe, 64)
    got, direct = store.gather([3, 0])["conditions"], fly.gather([3, 0])["conditions"]
    assert got.shape == (2, 6, 64, 64) and torch.equal(got, direct)
    world = toyworld.ToyWorld("shapes", n=4, size=64, condition="segmentation+depth")
    want = stack_maps(world[3].condition)  # HxWx6: segmentation's channels, then depth's
    assert torch.equal(got[0], torch.from_numpy(want).permute(2, 0, 1))
    assert side_by_side(world[3].condition).shape == (64, 128, 3) and len(png_bytes(want)) > 0


def test_a_union_net_trains_checkpoints_and_is_watched(base_dir, tmp_path):
    tr = Trainer(_cfg(base_dir, tmp_path))
    InjectionTelemetry().attach(tr)
    Validation().attach(tr)
    fresh = {n: p.clone() for n, p in tr.controlnet.named_parameters()}
    assert tr.run()["steps"] == 2
    assert any(not torch.equal(p, fresh[n]) for n, p in tr.controlnet.named_parameters())
    # a stock diffusers ControlNet of 2 x 3 condition channels; cnkit reads it back as the union it was
    loaded = ControlNetModel.from_pretrained(tmp_path / "checkpoint")
    assert loaded.config.conditioning_channels == 6
    union = architectures.load(tmp_path / "checkpoint")
    assert union.name == "union" and union.n_conditions == 2 and union.condition_dropout == 0.5
    # loaded for generating: no condition is dropped, so the folder and the trained net give one image
    assert not union.training
    maps = toyworld.ToyWorld("shapes", n=1, condition="segmentation+depth")[0].condition
    tr.adapter.eval()
    by_folder = generate_many(tr.pipe, ["x"], [[maps]], [str(tmp_path / "checkpoint")], [0], steps=2)
    assert np.array_equal(by_folder, generate_many(tr.pipe, ["x"], [[maps]], [tr.adapter], [0], steps=2))
    rows = _rows(tmp_path / "telemetry.csv")
    assert len(rows) == 3 * len(tr.adapter.watched_points())
    validation = _rows(tmp_path / "validation.csv")
    assert [int(r["step"]) for r in validation] == [0, 1, 2] and {r["metric"] for r in validation} == {"miou"}


def test_the_loop_drops_maps_from_each_batchs_own_stream(base_dir, tmp_path):
    """What makes a resumed union run replay its drops (its resume is tested with the other architectures')."""
    tr = Trainer(_cfg(base_dir, tmp_path, steps=1, validate_every=0, batch_size=4))
    tr.run()
    drawn = tr._micro_batch(tr.data, 0)["cond"]
    assert torch.equal(drawn, tr._micro_batch(tr.data, 0)["cond"])  # a pure function of (seed, step, micro-batch)
    per_map = drawn.reshape(4, 2, 3, *drawn.shape[-2:]).abs().sum(dim=(2, 3, 4))
    assert (per_map == 0).any() and not tr.adapter.drops_in_predict  # the loop drops, not torch's global RNG


def test_config_errors_name_the_fix(base_dir, tmp_path):
    with pytest.raises(ValueError, match="architecture='union' learns several conditions at once; dataset 'toy:fill'"):
        TrainConfig(architecture="union")
    with pytest.raises(ValueError, match="has 2 condition map\\(s\\) per item; architecture='controlnet' learns one"):
        Trainer(_cfg(base_dir, tmp_path, architecture="controlnet"))
    with pytest.raises(ValueError, match="condition_dropout must be within"):
        _cfg(base_dir, tmp_path, condition_dropout=1)


@pytest.fixture(scope="module")
def union_net(tiny_pipe):
    net = architectures.build("union", tiny_pipe, seed=0, n_conditions=2)
    with torch.no_grad():  # not a step-0 net: its residuals visibly change the image
        for name, p in net.net.named_parameters():
            if "zero_conv" in name or "controlnet_mid_block" in name or "cond_embedding" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return net.eval()


def test_generation_takes_a_set_of_maps_and_any_subset(tiny_pipe, union_net):
    sample = toyworld.sample("shapes", 3, size=64)
    seg, depth = sample.conditions["segmentation"], sample.conditions["depth"]
    both = generate(tiny_pipe, "a red circle", [ControlUnit(union_net, (seg, depth))], steps=2, seed=0)
    only_seg = generate(tiny_pipe, "a red circle", [ControlUnit(union_net, (seg, None))], steps=2, seed=0)
    assert len(both.conditions[0]) == 2
    a, b = np.asarray(both.images[0], float), np.asarray(only_seg.images[0], float)
    assert np.abs(a - b).mean() > 0.3  # the depth map changed the image (0.62 grey levels here)
    black = generate(tiny_pipe, "a red circle", [ControlUnit(union_net, (seg, np.zeros_like(depth)))], steps=2, seed=0)
    assert np.array_equal(np.asarray(black.images[0]), np.asarray(only_seg.images[0]))  # missing = a black map
    # generate_many (every measurement) reads the same sets
    many = generate_many(tiny_pipe, ["a red circle"], [[(seg, depth)]], [union_net], [0], steps=2)
    assert many.shape == (1, 64, 64, 3)


def test_a_set_of_maps_for_a_single_condition_net_or_one_map_for_a_union_net_is_a_clear_error(tiny_pipe,
                                                                                                 union_net):
    seg = toyworld.sample("shapes", 3, size=64).conditions["segmentation"]
    single = architectures.build("t2i-adapter", tiny_pipe, seed=0)
    with pytest.raises(ValueError, match="unit 1: a set of 2 condition maps was given to a single-condition net"):
        generate(tiny_pipe, "x", [ControlUnit(single, (seg, seg))], steps=1)
    with pytest.raises(ValueError, match="unit 1: a union net reads 2 condition maps; give the unit a tuple"):
        generate(tiny_pipe, "x", [ControlUnit(union_net, seg)], steps=1)
    with pytest.raises(ValueError, match="leave annotator at None"):
        ControlUnit(union_net, (seg, seg), annotator="canny")


def test_each_map_alone_is_measured_on_the_validation_items(tiny_pipe, union_net):
    got = evaluations.evaluate_condition_subsets(tiny_pipe, union_net, TWO, n=2, steps=2)
    assert set(got) == {"all", "segmentation", "depth"} and set(got["all"]) == {"miou", "edge_f1"}
    # "all" is what a run's validation measures: the held-out items, their prompts and the validation seeds
    items = splits.held_out_items(TWO, 2, 64)
    images = generate_many(tiny_pipe, [it.prompt for it in items], [[it.condition] for it in items], [union_net],
                           splits.seeds("validation", 2), steps=2)
    assert got["all"]["miou"] == pytest.approx(np.mean([segmentation_miou(im, it.sample)
                                                        for im, it in zip(images, items)]))
