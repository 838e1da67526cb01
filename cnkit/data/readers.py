"""Readers for ControlNet training data: one indexable interface over the formats people have.

``load(path_or_name)`` returns a dataset whose items are ``Example(image, condition, prompt)``
(PIL RGB images and a string), from any of:

- a Fill50K-format folder: ``prompt.json`` in JSON lines ``{"source", "target", "prompt"}`` (the
  official ControlNet tutorial's layout; source is the condition, target the image);
- an imagefolder with ``metadata.jsonl`` rows ``{"image", "conditioning_image", "text"}`` (the
  columns diffusers' ``train_controlnet.py`` reads; other names through ``columns=``); a list of
  conditioning images per row makes a multi-condition dataset (an item's condition is then a tuple
  of maps, what the ``union`` architecture trains on);
- a Hugging Face ``datasets`` dataset: a folder written by ``save_to_disk`` or a hub name (the
  hub needs a network or a warm cache), with the same columns;
- a folder of parquet shards (a hub dataset's files as downloaded), read a row group at a time,
  never loaded whole;
- a toy world: ``"toy:fill"`` or ``"toy:shapes/segmentation"`` (options ``n``, ``seed``, ``size``).

Bad input fails with a message that names the file or row and the fix. Paths and JSON are checked
when the dataset is opened; image bytes are decoded when an item is read, or all at once by
``validate()``.

Condition conversion (documented because it changes pixels; ``cnkit.pixels.to_rgb``, which generation uses
too): conditions are returned as RGB. Grayscale (``L``, ``I``, ``1``...) and palette images are converted with
PIL, which replicates the grey level into the three channels; images with alpha (``RGBA``, ``LA``) are composited
over black, because ControlNet conditions draw on black and a transparent pixel means "no condition". Target
images with alpha are composited over white, as an image viewer shows them. Compositing is warned about once.
"""

from __future__ import annotations

import bisect
import io
import json
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..pixels import BLACK, WHITE, to_rgb
from .toyworld import Example, ToyWorld, to_pil

__all__ = ["DatasetError", "Example", "HFDataset", "PairFolder", "condition_count", "is_toy", "load", "open_image",
           "to_pil"]


class DatasetError(ValueError):
    """Bad training data; the message names the file or row and what to do about it."""


DEFAULT_COLUMNS = {"image": "image", "condition": "conditioning_image", "prompt": "text"}


def _converted(img: Image.Image, background) -> Image.Image:
    """``pixels.to_rgb``; what it changes is said once per process (the same words for every file)."""
    rgb, note = to_rgb(img, background)
    if note:
        what = "conditions" if tuple(background) == BLACK else "images"
        warnings.warn(f"training data: some {what} had {note.replace('composited', 'which were composited')}",
                      stacklevel=3)
    return rgb


def open_image(path: Path, where: str, background=BLACK) -> Image.Image:
    """Decode an image fully, turning any failure into a DatasetError naming ``where``."""
    if not path.is_file():
        raise DatasetError(f"{where}: image file {path} does not exist; fix the path or remove the row")
    try:
        with Image.open(path) as img:
            img.load()
            return _converted(img, background)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"{where}: {path} is not a readable image ({e}); "
                           "replace the file or remove the row") from e


def _read_jsonl(path: Path, required: list[str]) -> list[dict]:
    rows = []
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        lineno = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DatasetError(f"{path}, line {lineno}: not UTF-8 text ({e.reason} at byte {e.start}); save the file "
                           "as UTF-8 (JSON lines must be)") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}, line {lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                               "each line must be one JSON object") from e
        if not isinstance(row, dict):
            raise DatasetError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise DatasetError(f"{path}, line {lineno}: missing key(s) {', '.join(missing)}; "
                               f"each row needs {', '.join(required)}")
        rows.append(row | {"_line": lineno})
    if not rows:
        raise DatasetError(f"{path} holds no rows")
    return rows


class PairFolder:
    """Image/condition pairs listed in a JSON-lines file (Fill50K ``prompt.json`` or ``metadata.jsonl``)."""

    def __init__(self, root: Path, index_file: str, image_key: str, condition_key: str, prompt_key: str):
        self.root = Path(root)
        self.index_file = self.root / index_file
        self.keys = (image_key, condition_key, prompt_key)
        self.rows = _read_jsonl(self.index_file, list(self.keys))
        for row in self.rows:
            for key in self.keys[:2]:
                names = row[key] if isinstance(row[key], list) and key == condition_key else [row[key]]
                for name in names:
                    if not isinstance(name, str) or not (self.root / name).is_file():
                        raise DatasetError(f"{self._where(row)}: {key} file {self.root / str(name)} does not "
                                           "exist; fix the path or remove the row")
        counts = {len(r[condition_key]) if isinstance(r[condition_key], list) else 1 for r in self.rows}
        if len(counts) > 1:
            raise DatasetError(f"{self.index_file}: rows list {sorted(counts)} conditioning images; every row of a "
                               "multi-condition dataset lists the same maps in the same order")

    def _where(self, row: dict) -> str:
        return f"{self.index_file}, line {row['_line']}"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Example:
        row = self.rows[i]
        where = self._where(row)
        image_key, condition_key, prompt_key = self.keys
        image = open_image(self.root / row[image_key], where, background=WHITE)
        names = row[condition_key] if isinstance(row[condition_key], list) else [row[condition_key]]
        maps = tuple(open_image(self.root / name, where) for name in names)
        for name, condition in zip(names, maps):
            if condition.size != image.size:
                raise DatasetError(f"{where}: condition {name} is {condition.size[0]}x"
                                   f"{condition.size[1]} but image {row[image_key]} is {image.size[0]}x"
                                   f"{image.size[1]}; resize one so they match")
        condition = maps if isinstance(row[condition_key], list) else maps[0]
        prompt = row[prompt_key]
        if not isinstance(prompt, str):
            raise DatasetError(f"{where}: {prompt_key} must be a string, got {prompt!r}")
        return Example(image, condition, prompt)

    def validate(self) -> int:
        """Decode every item (sizes, formats); returns the count or raises on the first bad row."""
        for i in range(len(self)):
            self[i]
        return len(self)


class HFDataset:
    """A Hugging Face ``datasets.Dataset`` with image, condition and prompt columns."""

    def __init__(self, ds, columns: dict[str, str], name: str):
        missing = [c for c in columns.values() if c not in ds.column_names]
        if missing:
            raise DatasetError(f"dataset {name} has no column(s) {', '.join(missing)} (it has "
                               f"{', '.join(ds.column_names)}); pass columns={{'image': ..., "
                               "'condition': ..., 'prompt': ...}}")
        self.ds, self.columns, self.name = ds, columns, name

    def __len__(self) -> int:
        return len(self.ds)

    def _image(self, value, where, background):
        if isinstance(value, Image.Image):
            return _converted(value, background)
        if isinstance(value, str):
            return open_image(Path(value), where, background)
        raise DatasetError(f"{where}: expected an image, got {type(value).__name__}")

    def __getitem__(self, i: int) -> Example:
        row, c, where = self.ds[int(i)], self.columns, f"{self.name}, row {i}"
        image = self._image(row[c["image"]], where, WHITE)
        condition = self._image(row[c["condition"]], where, BLACK)
        if condition.size != image.size:
            raise DatasetError(f"{where}: condition is {condition.size} but image is {image.size}; "
                               "resize one so they match")
        return Example(image, condition, str(row[c["prompt"]]))

    validate = PairFolder.validate


def condition_count(spec) -> int:
    """How many condition maps each item of dataset ``spec`` has (1 but for multi-condition data: a toy world's
    ``"toy:shapes/segmentation+depth"``, an imagefolder listing several conditioning images per row)."""
    if is_toy(spec):
        return len(str(spec).partition("/")[2].split("+"))
    ds = load(spec)
    first = ds[0].condition if len(ds) else None
    return len(first) if isinstance(first, tuple) else 1


def is_toy(spec) -> bool:
    """Is ``spec`` a toy world (``"toy:fill"``, ``"toy:shapes/segmentation"``) rather than files?"""
    return str(spec).startswith("toy:")


class ParquetShards:
    """A folder of parquet shards (how the hub stores datasets: ``data/train-00000-of-00042.parquet``, ...), read a
    row group at a time through pyarrow and never loaded whole: item ``i`` decodes the row group that holds it, and
    the last group read is kept, so a pass in order (encoding a training set) decodes each group once. Images are
    the ``datasets`` Image feature's ``{"bytes", "path"}`` structs, or paths."""

    def __init__(self, root: Path, columns: dict[str, str]):
        import pyarrow.parquet as pq  # with the 'datasets' extra

        files = sorted(root.rglob("*.parquet"))
        train = [f for f in files if "train" in f.name]
        self.root, self.columns, self.groups, first = root, columns, [], 0
        for f in train or files:
            meta = pq.ParquetFile(f)
            missing = [c for c in columns.values() if c not in meta.schema_arrow.names]
            if missing:
                raise DatasetError(f"{f} has no column(s) {', '.join(missing)} (it has "
                                   f"{', '.join(meta.schema_arrow.names)}); pass columns={{'image': ..., "
                                   "'condition': ..., 'prompt': ...}}")
            for g in range(meta.num_row_groups):
                self.groups.append((f, g, first))
                first += meta.metadata.row_group(g).num_rows
        self.n, self._cached = first, (None, [])

    def __len__(self) -> int:
        return self.n

    def _rows(self, k: int) -> list[dict]:
        import pyarrow.parquet as pq

        if self._cached[0] != k:
            f, g, _ = self.groups[k]
            table = pq.ParquetFile(f).read_row_group(g, columns=list(dict.fromkeys(self.columns.values())))
            self._cached = (k, table.to_pylist())
        return self._cached[1]

    def _image(self, value, where: str, background) -> Image.Image:
        if isinstance(value, dict) and value.get("bytes"):
            try:
                with Image.open(io.BytesIO(value["bytes"])) as img:
                    img.load()
                    return _converted(img, background)
            except (UnidentifiedImageError, OSError) as e:
                raise DatasetError(f"{where}: not a readable image ({e}); fix or drop the row") from e
        path = value.get("path") if isinstance(value, dict) else value
        if isinstance(path, str):
            return open_image(self.root / path if not Path(path).is_absolute() else Path(path), where, background)
        raise DatasetError(f"{where}: expected an image (bytes or a path), got {type(value).__name__}")

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < self.n:
            raise IndexError(i)
        k = bisect.bisect_right([g[2] for g in self.groups], i) - 1
        f, g, first = self.groups[k]
        row, c, where = self._rows(k)[i - first], self.columns, f"{f.name}, row {i - first} of row group {g}"
        image = self._image(row[c["image"]], where, WHITE)
        condition = self._image(row[c["condition"]], where, BLACK)
        if condition.size != image.size:
            raise DatasetError(f"{where}: condition is {condition.size} but image is {image.size}; "
                               "resize one so they match")
        return Example(image, condition, str(row[c["prompt"]]))

    validate = PairFolder.validate


def _toy(spec: str, n: int = 1000, seed: int = 0, size: int = 64, offset: int = 0):
    world, _, condition = spec.partition("/")
    return ToyWorld(world, n=n, seed=seed, size=size, condition=condition or None, offset=offset)


def load(path_or_name, columns: dict[str, str] | None = None, **toy_options):
    """Open a dataset of ``Example(image, condition, prompt)``; see the module docstring for formats."""
    columns = DEFAULT_COLUMNS | (columns or {})
    if isinstance(path_or_name, str) and is_toy(path_or_name):
        return _toy(path_or_name[4:], **toy_options)
    # Options of toy worlds mean nothing for a folder of files: a folder is read whole.
    path = Path(path_or_name)
    if path.is_dir():
        if (path / "prompt.json").is_file():
            return PairFolder(path, "prompt.json", "target", "source", "prompt")
        if (path / "metadata.jsonl").is_file():
            return PairFolder(path, "metadata.jsonl", columns["image"], columns["condition"], columns["prompt"])
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"]
            return HFDataset(ds, columns, str(path))
        if any(path.rglob("*.parquet")):
            return ParquetShards(path, columns)
        raise DatasetError(f"{path} is not a dataset folder: expected prompt.json (Fill50K), "
                           "metadata.jsonl (imagefolder), a datasets.save_to_disk folder or parquet shards")
    if path.exists():
        raise DatasetError(f"{path} is a file; pass the folder that holds prompt.json or metadata.jsonl")
    if isinstance(path_or_name, str) and "/" in path_or_name and not path_or_name.startswith((".", "/")):
        try:
            import datasets
        except ImportError as e:
            raise DatasetError(f"{path_or_name!r} looks like a hub dataset; install the 'datasets' package "
                               "(pip install 'cnkit[hf]')") from e
        try:
            ds = datasets.load_dataset(path_or_name, split="train")
        except Exception as e:  # offline, unknown name, no permission: all say the same to a user
            raise DatasetError(f"could not load hub dataset {path_or_name!r} ({type(e).__name__}: {e}); "
                               "offline, download it once with datasets.load_dataset(...).save_to_disk(folder) "
                               "and pass the folder") from e
        return HFDataset(ds, columns, path_or_name)
    raise DatasetError(f"no dataset at {path_or_name!r}: not a folder, a 'toy:fill' world or a hub name")
