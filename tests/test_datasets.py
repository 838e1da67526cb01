import json

import numpy as np
import pytest
from PIL import Image

from cnkit.data import readers as datasets
from cnkit.data import toyworld
from cnkit.data.readers import DatasetError


def _fill50k(tmp_path, rows=2, size=(32, 32)):
    """A Fill50K-format folder written by hand, as a user's own data would be."""
    (tmp_path / "source").mkdir()
    (tmp_path / "target").mkdir()
    lines = []
    for i in range(rows):
        Image.new("RGB", size, (0, 0, 0)).save(tmp_path / "source" / f"{i}.png")
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / "target" / f"{i}.png")
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png",
                                 "prompt": f"pale golden rod circle with old lace background {i}"}))
    (tmp_path / "prompt.json").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_reads_a_users_fill50k_folder(tmp_path):
    ds = datasets.load(_fill50k(tmp_path))
    image, condition, prompt = ds[1]
    assert image.size == condition.size == (32, 32)
    assert prompt.endswith("background 1")
    assert ds.validate() == 2


def test_malformed_json_line_is_named(tmp_path):
    root = _fill50k(tmp_path)
    with open(root / "prompt.json", "a") as f:
        f.write('{"source": "source/0.png", "target": \n')
    with pytest.raises(DatasetError, match=r"prompt.json, line 3: malformed JSON"):
        datasets.load(root)


def test_missing_key_and_missing_file_are_named(tmp_path):
    root = _fill50k(tmp_path)
    (root / "prompt.json").write_text(json.dumps({"source": "source/0.png", "target": "target/0.png"}) + "\n")
    with pytest.raises(DatasetError, match=r"line 1: missing key\(s\) prompt"):
        datasets.load(root)
    (root / "prompt.json").write_text(json.dumps({"source": "source/9.png", "target": "target/0.png",
                                                  "prompt": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"line 1: source file .*9.png does not exist"):
        datasets.load(root)


def test_corrupt_image_is_named(tmp_path):
    root = _fill50k(tmp_path)
    (root / "target" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    ds = datasets.load(root)
    ds[0]
    with pytest.raises(DatasetError, match=r"line 2: .*1.png is not a readable image"):
        ds[1]
    with pytest.raises(DatasetError, match="1.png"):
        ds.validate()


def test_size_mismatch_is_named(tmp_path):
    root = _fill50k(tmp_path)
    Image.new("RGB", (16, 16)).save(root / "source" / "0.png")
    with pytest.raises(DatasetError, match=r"line 1: condition source/0.png is 16x16 but image target/0.png is 32x32"):
        datasets.load(root)[0]


def test_grayscale_and_rgba_conditions_are_converted(tmp_path):
    root = _fill50k(tmp_path)
    Image.new("L", (32, 32), 128).save(root / "source" / "0.png")
    rgba = Image.new("RGBA", (32, 32), (255, 255, 255, 0))
    rgba.putpixel((3, 3), (255, 255, 255, 255))
    rgba.save(root / "source" / "1.png")
    ds = datasets.load(root)
    grey = np.asarray(ds[0].condition)
    assert ds[0].condition.mode == "RGB" and np.all(grey == 128)
    alpha = np.asarray(ds[1].condition)
    assert ds[1].condition.mode == "RGB"
    assert np.all(alpha[3, 3] == 255) and alpha.sum() == 3 * 255  # transparent -> black


def test_imagefolder_with_custom_columns(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "img" / "a.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "img" / "a_c.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file": "img/a.png", "cond": "img/a_c.png",
                                                         "caption": "hello"}) + "\n")
    with pytest.raises(DatasetError, match="missing key"):
        datasets.load(tmp_path)
    ds = datasets.load(tmp_path, columns={"image": "file", "condition": "cond", "prompt": "caption"})
    assert ds[0].prompt == "hello" and np.asarray(ds[0].image)[0, 0].tolist() == [1, 2, 3]


def test_hugging_face_dataset_from_disk(tmp_path):
    hf = pytest.importorskip("datasets")
    imgs = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(3)]
    conds = [Image.new("L", (8, 8), 255) for _ in range(3)]
    ds = hf.Dataset.from_dict({"image": imgs, "conditioning_image": conds, "text": ["a", "b", "c"]},
                              features=hf.Features({"image": hf.Image(), "conditioning_image": hf.Image(),
                                                    "text": hf.Value("string")}))
    ds.save_to_disk(tmp_path / "hf")
    loaded = datasets.load(tmp_path / "hf")
    assert len(loaded) == 3 and loaded[2].prompt == "c"
    assert loaded[2].condition.mode == "RGB" and np.asarray(loaded[2].image)[0, 0, 0] == 2
    with pytest.raises(DatasetError, match="no column"):
        datasets.load(tmp_path / "hf", columns={"prompt": "caption"})


def test_toy_world_by_name_and_unknown_paths(tmp_path):
    ds = datasets.load("toy:shapes/segmentation", n=3, seed=1)
    assert len(ds) == 3 and ds[0].condition.mode == "RGB"
    with pytest.raises(DatasetError, match="not a dataset folder"):
        datasets.load(tmp_path)
    with pytest.raises(DatasetError, match="could not load hub dataset"):
        datasets.load("nobody/no-such-dataset-offline")


def test_parquet_shards_are_read_a_row_group_at_a_time(tmp_path):
    """A hub dataset's files (parquet shards with the datasets Image feature), read without loading them whole."""
    import datasets as hf
    import pyarrow.parquet as pq

    world = toyworld.ToyWorld("fill", n=10)
    rows = {"image": [world[i].image for i in range(10)], "conditioning_image": [world[i].condition for i in range(10)],
            "text": [world[i].prompt for i in range(10)]}
    ds = hf.Dataset.from_dict(rows).cast_column("image", hf.Image()).cast_column("conditioning_image", hf.Image())
    (tmp_path / "data").mkdir()
    for k, (a, b) in enumerate([(0, 6), (6, 10)]):
        ds.select(range(a, b)).to_parquet(str(tmp_path / "data" / f"train-0000{k}-of-00002.parquet"), batch_size=2)
    assert pq.ParquetFile(tmp_path / "data" / "train-00000-of-00002.parquet").num_row_groups == 3
    got = datasets.load(tmp_path)
    assert len(got) == 10 and type(got).__name__ == "ParquetShards"
    for i in (0, 7, 9, 3):
        assert np.array_equal(np.asarray(got[i].image), np.asarray(world[i].image))
        assert np.array_equal(np.asarray(got[i].condition), np.asarray(world[i].condition))
        assert got[i].prompt == world[i].prompt
    assert len(got._cached[1]) == 2  # one row group held, not the dataset
    with pytest.raises(datasets.DatasetError, match="has no column.*caption"):
        datasets.load(tmp_path, columns={"prompt": "caption"})


# --- paths stay in the dataset; what changes pixels is said (issue 31) -------------------------------------------


@pytest.mark.parametrize("name, said", [("../outside.png", "climbs out with .."), ("/etc/hostname", "absolute path"),
                                        ("~/x.png", "a home-folder path")])
def test_rows_that_leave_the_dataset_folder_are_refused(tmp_path, name, said):
    (tmp_path / "data").mkdir()
    root = _fill50k(tmp_path / "data")
    Image.new("RGB", (32, 32)).save(tmp_path / "outside.png")
    rows = [json.loads(r) for r in (root / "prompt.json").read_text().splitlines()]
    rows[1]["target"] = name
    (root / "prompt.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match=rf"prompt.json, line 2: target path .* leaves the dataset folder .*{said}"):
        datasets.load(root)


def test_a_link_out_of_the_folder_is_followed_and_said_and_its_target_fingerprinted(tmp_path):
    (tmp_path / "data").mkdir()
    root = _fill50k(tmp_path / "data")
    outside = tmp_path / "pool.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(outside)
    (root / "target" / "1.png").unlink()
    (root / "target" / "1.png").symlink_to(outside)
    with pytest.warns(UserWarning, match=r"1 file\(s\) are symbolic links that lead outside .*1.png -> .*pool.png"):
        ds = datasets.load(root)
    assert ds[1].image.getpixel((0, 0)) == (1, 2, 3)
    before = datasets.fingerprint(ds)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(outside)
    import os

    os.utime(outside, ns=(1, 1))
    with pytest.warns(UserWarning, match="symbolic links"):
        assert datasets.fingerprint(datasets.load(root))["files"] != before["files"]


def test_an_image_over_pils_decompression_limit_names_the_file_and_the_fix(tmp_path, monkeypatch):
    root = _fill50k(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 = 1024 > 2 x 100: PIL refuses
    with pytest.raises(DatasetError, match=r"prompt.json, line 1: .*target/0.png is too large for PIL .* save a "
                                           r"smaller copy .*MAX_IMAGE_PIXELS"):
        datasets.load(root)[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # between 1x and 2x: read, and said with the file
    with pytest.warns(UserWarning, match=r"line 1: .*0.png is a very large image"):
        datasets.load(root)[0]


def test_a_dark_16_bit_image_stays_dark_and_the_scaling_is_said(tmp_path):
    from cnkit.pixels import to_rgb

    dark = Image.fromarray(np.full((8, 8), 2570, np.uint16))  # 4% of 16-bit full scale
    rgb, note = to_rgb(dark)
    assert np.asarray(rgb).max() == 10 and "16-bit values scaled to 0..255 by their full range" in note
    assert "dark" in note
    bright = Image.fromarray(np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8))
    rgb, note = to_rgb(bright)
    assert np.asarray(rgb).min() == 0 and np.asarray(rgb).max() == 255 and "dark" not in note


def test_a_bom_and_windows_line_ends_are_read_and_a_folder_named_like_an_image_is_said(tmp_path):
    root = _fill50k(tmp_path, rows=3)
    text = (root / "prompt.json").read_text()
    (root / "prompt.json").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert datasets.load(root)[0].prompt.endswith("background 0")
    (root / "target" / "2.png").unlink()
    (root / "target" / "2.png").mkdir()
    with pytest.raises(DatasetError, match="line 3: target file .*2.png is a folder, not an image file; fix the path"):
        datasets.load(root)
