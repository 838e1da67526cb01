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
``validate()``. A folder's rows name files inside it: an absolute path or one through ``..`` is refused. A
symbolic link inside the folder that leads out of it is followed, and said once (a warning naming the first link
and its target): links are how datasets share files without copying them, and the dataset's ``fingerprint()``
follows them to their targets, so a changed target is noticed like a changed file.

``fingerprint()``: what the encoded training set was made from (``cnkit.data.encoded`` compares it on every
open): a folder's index file by content, every file it names by size and modification time; parquet shards by
size and time; a ``datasets`` dataset by its own fingerprint; a toy world by its options and two drawn items.

Condition conversion (documented because it changes pixels; ``cnkit.pixels.to_rgb``, which generation uses
too): conditions are returned as RGB. Grayscale (``L``, ``I``, ``1``...) and palette images are converted with
PIL, which replicates the grey level into the three channels; images with alpha (``RGBA``, ``LA``) are composited
over black, because ControlNet conditions draw on black and a transparent pixel means "no condition". Target
images with alpha are composited over white, as an image viewer shows them. Compositing is warned about once.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import stat
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..pixels import BLACK, WHITE, to_rgb
from .toyworld import Example, ToyWorld, to_pil

__all__ = ["DatasetError", "Example", "HFDataset", "NOTE", "PairFolder", "condition_count", "fingerprint", "is_toy",
           "load", "open_image", "to_pil"]

NOTE = "cnkit.note"  # key of a decoded image's ``info``: what ``pixels.to_rgb`` changed in it (counted by the trainer)


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
        rgb.info[NOTE] = note  # the trainer counts it into the run's notes.json
    return rgb


def _bomb(where: str, path, e: Exception) -> DatasetError:
    return DatasetError(f"{where}: {path} is too large for PIL to decode safely ({e}); training fits every image to "
                        "its resolution anyway, so save a smaller copy of it; or, if you trust the file, raise PIL's "
                        "limit before training (PIL.Image.MAX_IMAGE_PIXELS = None)")


def _decode(source, where: str, background, path) -> Image.Image:
    """Decode fully, a very large image said with its file and row (PIL's own warning names neither)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as img:
                img.load()
                return _converted(img, background)
        except Image.DecompressionBombWarning as w:
            big = w
        except Image.DecompressionBombError as e:
            raise _bomb(where, path, e) from None
    warnings.warn(f"{where}: {path} is a very large image ({big}); it is read, and fitted to the training "
                  "resolution", stacklevel=3)
    if hasattr(source, "seek"):
        source.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(source) as img:
            img.load()
            return _converted(img, background)


def open_image(path: Path, where: str, background=BLACK) -> Image.Image:
    """Decode an image fully, turning any failure into a DatasetError naming ``where``."""
    if not path.is_file():
        raise DatasetError(f"{where}: image file {path} does not exist; fix the path or remove the row")
    try:
        return _decode(path, where, background, path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{where}: {path} is not a readable image ({e}); "
                           "replace the file or remove the row") from e


def _read_jsonl(path: Path, required: list[str]) -> list[dict]:
    rows = []
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()  # a BOM (Windows editors) is not text
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
        self._stats, linked = [], []
        real_dirs, inside = {}, os.path.realpath(self.root).rstrip(os.sep) + os.sep
        for row in self.rows:
            for key in self.keys[:2]:
                names = row[key] if isinstance(row[key], list) and key == condition_key else [row[key]]
                for name in names:
                    path = self._inside(row, key, name)
                    try:
                        st = os.lstat(path)
                        link = stat.S_ISLNK(st.st_mode)
                        if link:
                            st = os.stat(path)  # a link's target: its size and time
                    except OSError:
                        st = None
                    if st is None or not stat.S_ISREG(st.st_mode):
                        what = "is a folder, not an image file" if Path(path).is_dir() else "does not exist"
                        raise DatasetError(f"{self._where(row)}: {key} file {self.root / str(name)} {what}; fix the "
                                           "path or remove the row")
                    self._stats.append((name, st.st_size, st.st_mtime_ns))
                    parent, base = os.path.split(path)
                    if parent not in real_dirs:  # a folder inside may be a link too
                        real_dirs[parent] = os.path.realpath(parent)
                    real = os.path.realpath(path) if link else os.path.join(real_dirs[parent], base)
                    if not real.startswith(inside):
                        linked.append((path, real))
        if linked:
            warnings.warn(f"{self.index_file}: {len(linked)} file(s) are symbolic links that lead outside "
                          f"{self.root} (first: {linked[0][0]} -> {linked[0][1]}); they are read, because links are "
                          "how datasets share files, and the encoded training set's fingerprint follows them to "
                          "their targets, so a change there is noticed. Copy the files into the folder to make it "
                          "self-contained", stacklevel=3)
        counts = {len(r[condition_key]) if isinstance(r[condition_key], list) else 1 for r in self.rows}
        if len(counts) > 1:
            raise DatasetError(f"{self.index_file}: rows list {sorted(counts)} conditioning images; every row of a "
                               "multi-condition dataset lists the same maps in the same order")

    def _where(self, row: dict) -> str:
        return f"{self.index_file}, line {row['_line']}"

    def _inside(self, row: dict, key: str, name) -> str:
        """The path of a file the row names, refused when the name leaves the folder (absolute, or ``..``)."""
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{self._where(row)}: {key} must be a file name (a path relative to {self.root}), "
                               f"got {name!r}; fix the row or remove it")
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or name.startswith("~"):
            how = ("an absolute path" if Path(name).is_absolute() else "a home-folder path" if name.startswith("~")
                   else "it climbs out with ..")
            raise DatasetError(f"{self._where(row)}: {key} path {name!r} leaves the dataset folder {self.root} "
                               f"({how}); "
                               "rows name files inside the folder by their relative path: copy (or link) the file "
                               "into the folder and name it from there")
        return os.path.join(self.root, name)

    def fingerprint(self) -> dict:
        """The index file's content and every listed file's size and modification time (see the module doc)."""
        files = hashlib.sha256(json.dumps(self._stats).encode()).hexdigest()[:16]
        return {"index": hashlib.sha256(self.index_file.read_bytes()).hexdigest()[:16], "files": files,
                "items": len(self)}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Example:
        row = self.rows[i]
        where = self._where(row)
        image_key, condition_key, prompt_key = self.keys
        image = open_image(Path(self.root, row[image_key]), where, background=WHITE)
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
            raise DatasetError(f"{where}: {prompt_key} must be a string, got {prompt!r}; write it as one string (\"\" "
                               "for none) or remove the row")
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

    def fingerprint(self) -> dict:
        """``datasets``' own fingerprint of the table (a dataset saved again gets another)."""
        return {"datasets": str(getattr(self.ds, "_fingerprint", None)), "items": len(self)}

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
        self._files = train or files

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> dict:
        """Each shard's name, size and modification time."""
        stats = [(str(f.relative_to(self.root)), f.stat().st_size, f.stat().st_mtime_ns) for f in self._files]
        return {"files": hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16], "items": self.n}

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
                return _decode(io.BytesIO(value["bytes"]), where, background, "the image in this row")
            except (UnidentifiedImageError, OSError, ValueError) as e:
                if isinstance(e, DatasetError):
                    raise
                raise DatasetError(f"{where}: not a readable image ({e}); fix or drop the row") from e
        path = value.get("path") if isinstance(value, dict) else value
        if isinstance(path, str):
            if Path(path).is_absolute() or ".." in Path(path).parts:
                raise DatasetError(f"{where}: the image path {path!r} leaves the dataset folder {self.root}; store "
                                   "the image's bytes in the row, or a path relative to the folder")
            return open_image(self.root / path, where, background)
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


def fingerprint(ds) -> dict:
    """What ``ds``'s items are made from (see the module doc): the encoded store compares it on every open."""
    if isinstance(ds, ToyWorld):
        h = hashlib.sha256(json.dumps([ds.world, ds.condition, ds.n, ds.seed, ds.size, ds.offset]).encode())
        for i in sorted({0, len(ds) - 1}):  # the world as this version of the kit draws it
            ex = ds[i]
            maps = ex.condition if isinstance(ex.condition, tuple) else (ex.condition,)
            for img in (ex.image, *maps):
                h.update(img.tobytes())
            h.update(ex.prompt.encode())
        return {"toy": h.hexdigest()[:16], "items": len(ds)}
    if hasattr(ds, "fingerprint"):
        return ds.fingerprint()
    return {"items": len(ds)}


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
