"""The encoded training set on disk: what the frozen VAE and text encoder make of each training item, in shards
read a batch at a time, so a trainer's memory stays flat however large the dataset is.

A store is a folder (``<cache_dir>/encoded-<key>/``, shared by every run on the same data, base and size):

- ``store.json``: the format version, what was encoded (``spec``: the base's encoders' fingerprint, the
  dataset's name and the fingerprint of its contents, the resolution, how many items) and one entry per shard
  (its name, items, bytes, SHA-256 and what fitting changed in it). Shards are encoded one by one and listed
  when finished: an interrupted encode keeps its finished shards and encodes the rest.
- ``shard-00000.safetensors``, ...: per item the VAE posterior's mean and std (float32, as the VAE gave them),
  the condition as PNG bytes (a uint8 blob and its offsets: lossless, and a 512-px edge map is ~10 KB against
  768 KB raw), and an index into the shard's distinct prompt embeddings.
- ``empty.safetensors``: the empty prompt's embedding (for prompt dropout).

A store is reused only when it provably matches what is asked, checked on every open (``build_store``): its
format, the encoders' fingerprint (configs, the tokenizer, a sum of every weight tensor), the dataset's
fingerprint (``cnkit.data.readers.fingerprint``: its index file's bytes, every file's size and modification time)
and the rest of the spec; a mismatch encodes it again with a warning that says why. Each listed shard must be
there with its recorded size and a readable header, else that shard alone is encoded again (said). Its bytes are
checked against the recorded SHA-256 when a process first reads it (``ShardReader.verify``; about 1 GB/s): a shard
that changed on disk is set aside (``.corrupt``) and named, so that a rerun encodes it again, and nothing is
trained on it. ``bench/store_checks.py`` measures what these checks cost beside a training step.

Why safetensors read with ``os.pread``: the shards are standard files that load anywhere and unpickle nothing; a
shard's JSON header says where every row lies, so a batch reads just its rows. Plain reads go through the OS page
cache without mapping files into the process: with ``mmap`` every page a long run touched would count in its
resident memory, which would grow with the dataset again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..files import file_sha256
from .readers import fingerprint

FORMAT_VERSION = 2  # 2: per-shard entries with size and SHA-256, the dataset's fingerprint in the spec
SHARD_SIZE = 1024  # items per shard: ~130 MB at SD 1.5's 512 px, small enough to lose little to an interruption
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8, "I32": np.int32}
_CHUNK = 8 * 2**20  # bytes hashed at a time


class DiskSpaceError(OSError):
    """Not enough free disk for the encoded training set."""


class StoreError(OSError):
    """A store file that cannot be trusted (changed, cut short or unreadable); the message names it and the fix."""


def png_bytes(array: np.ndarray) -> bytes:
    """A condition as PNG. A set of maps (HxWx3n, a multi-condition item) is stored as one RGB picture of its maps
    side by side (HxnWx3: PNG has at most four channels); ``_unpack_maps`` reads it back."""
    if array.ndim == 3 and array.shape[-1] > 3:
        array = np.concatenate(np.split(array, array.shape[-1] // 3, axis=-1), axis=1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _unpack_maps(picture: np.ndarray) -> np.ndarray:
    """HxnWx3 (the maps of one item side by side, as ``png_bytes`` stores them; every map is square) -> HxWx3n."""
    h, w = picture.shape[:2]
    return picture if w == h else np.concatenate(np.split(picture, w // h, axis=1), axis=-1)


def encoders_fingerprint(pipe) -> str:
    """What decides the encodings: the VAE's and text encoder's configs, every weight tensor's name, shape and sum
    (float64: one pass over the weights, ~0.1 s for SD 1.5's) with three of them byte for byte, the tokenizer's
    vocabulary. Another base, or the same base retrained in place, gives another fingerprint."""
    h = hashlib.sha256()
    for module in (pipe.vae, pipe.text_encoder):
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        state = module.state_dict()
        with torch.no_grad():
            sums = [(name, list(t.shape), float(torch.sum(t, dtype=torch.float64)) if t.is_floating_point()
                     else int(t.sum())) for name, t in state.items()]
        h.update(json.dumps(sums).encode())
        params = list(state.values())
        for t in (params[0], params[len(params) // 2], params[-1]):
            h.update(t.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps(sorted(pipe.tokenizer.get_vocab().items())).encode())
    h.update(str(pipe.tokenizer.model_max_length).encode())
    return h.hexdigest()[:16]


def _fix(folder: Path) -> str:
    return (f"delete the store folder {folder} (or just that file) and rerun: the missing part is encoded again, and "
            "a training run resumes from its last checkpoint")


class ShardReader:
    """Rows of one shard's tensors, read with ``os.pread`` (see the module docstring). ``sha256``: what the store
    recorded; the first read checks the file against it (``verify``)."""

    def __init__(self, path: Path, sha256: str | None = None):
        self.path, self.sha256, self.verified = Path(path), sha256, sha256 is None
        self.start, self.tensors = read_header(self.path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.prompt_ids = self.whole("prompt_ids")  # K int64 each: small, kept
        self.cond_offsets = self.whole("cond_offsets")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def verify(self) -> None:
        """Hash the whole file once (the first time this process reads it) and compare with the store's record.
        A shard that changed is set aside as ``NAME.corrupt`` (a rerun encodes it again) and named."""
        if self.verified:
            return
        h, offset = hashlib.sha256(), 0
        while chunk := os.pread(self.fd, _CHUNK, offset):
            h.update(chunk)
            offset += len(chunk)
        if h.hexdigest() != self.sha256:
            aside = self.path.with_name(self.path.name + ".corrupt")
            try:
                os.replace(self.path, aside)
            except OSError:
                pass  # another process set it aside first
            raise StoreError(
                f"{self.path.name} of the encoded training set {self.path.parent} is corrupt: its SHA-256 differs "
                "from the one recorded when it was written (the file changed on disk since). Nothing was trained "
                f"on it; it was set aside as {aside.name}. Rerun: the store encodes that shard again (only it), "
                "and a training run resumes from its last checkpoint")
        self.verified = True

    def _read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, self.start + offset)
        if len(data) != size:
            raise StoreError(f"{self.path} is truncated (wanted {size} bytes at {offset}); {_fix(self.path.parent)}")
        return data

    def whole(self, name: str) -> np.ndarray:
        dtype, shape, offset = self.tensors[name]
        return np.frombuffer(self._read(offset, int(np.prod(shape)) * dtype.itemsize), dtype).reshape(shape)

    def rows(self, name: str, idx) -> np.ndarray:
        dtype, shape, offset = self.tensors[name]
        row = int(np.prod(shape[1:])) * dtype.itemsize
        return np.stack([np.frombuffer(self._read(offset + int(i) * row, row), dtype).reshape(shape[1:])
                         for i in idx])

    def conditions(self, idx) -> np.ndarray:
        _, _, offset = self.tensors["cond_png"]
        out = []
        for i in idx:
            a, b = int(self.cond_offsets[i]), int(self.cond_offsets[i + 1])
            try:
                picture = np.asarray(Image.open(io.BytesIO(self._read(offset + a, b - a))).convert("RGB"))
            except (OSError, ValueError, SyntaxError) as e:
                if isinstance(e, StoreError):
                    raise
                raise StoreError(f"{self.path}: the condition of row {int(i)} does not decode ({e}); "
                                 f"{_fix(self.path.parent)}") from None
            out.append(_unpack_maps(picture))
        return np.stack(out)

    def close(self) -> None:
        os.close(self.fd)


_SHARD_TENSORS = ("latent_mean", "latent_std", "prompt_ids", "prompt_embeds", "cond_offsets", "cond_png")


def read_header(path: Path) -> tuple[int, dict]:
    """(where the data starts, {tensor: (dtype, shape, offset)}) of a shard, or a StoreError saying what is wrong
    with it (missing, cut short, not a shard)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if not 2 <= n <= min(size - 8, 2**24):
                raise ValueError(f"its header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        tensors = {name: (np.dtype(_DTYPES[t["dtype"]]), tuple(t["shape"]), t["data_offsets"][0])
                   for name, t in header.items()}
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        if 8 + n + end != size:
            raise ValueError(f"its header describes {8 + n + end} bytes, the file has {size}")
        missing = [k for k in _SHARD_TENSORS if k not in tensors]
        if missing:
            raise ValueError(f"it has no {', '.join(missing)}")
    except FileNotFoundError:
        raise StoreError(f"{path} is missing; {_fix(path.parent)}") from None
    except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is not a readable shard ({type(e).__name__}: {e}); {_fix(path.parent)}") from None
    return 8 + n, tensors


def read_meta(folder: Path) -> tuple[dict | None, str | None]:
    """(store.json's content, None), or (None, why it cannot be used) for a store.json that is cut short, not JSON
    or not the kit's; (None, None) when there is none."""
    f = Path(folder) / "store.json"
    if not f.is_file():
        return None, None
    try:
        meta = json.loads(f.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
            raise ValueError("it lists no shards")
    except (OSError, ValueError) as e:
        return None, f"its store.json is unreadable ({type(e).__name__}: {str(e)[:120]})"
    return meta, None


class EncodedStore:
    """A finished store, read a batch at a time: ``gather(idx)`` gives what a training micro-batch needs. Each
    shard is checked against its recorded SHA-256 when first read (``ShardReader.verify``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta, why = read_meta(self.folder)
        if meta is None or meta.get("format") != FORMAT_VERSION or not meta.get("complete"):
            why = why or ("it is not complete" if meta else "it has no store.json")
            if meta is not None and meta.get("format") != FORMAT_VERSION:
                why = f"it was written by format {meta.get('format')} of the kit's store, this is {FORMAT_VERSION}"
            raise StoreError(f"{self.folder} cannot be read as an encoded training set: {why}; "
                             f"{_fix(self.folder)}")
        self.shard_size = meta["shard_size"]
        self.shards = [ShardReader(self.folder / e["name"], e["sha256"]) for e in meta["shards"]]
        self.n = sum(len(s) for s in self.shards)
        if self.n != meta["spec"]["items"]:
            raise StoreError(f"{self.folder} holds {self.n} items, its store.json says {meta['spec']['items']}; "
                             f"{_fix(self.folder)}")
        self.notes: list[str] = list(meta.get("notes", {}).values())  # what was changed on the way in
        empty = self.folder / meta["empty"]["name"]
        if file_sha256(empty) != meta["empty"]["sha256"]:
            raise StoreError(f"{empty} changed since it was written (its SHA-256 differs); {_fix(self.folder)}")
        self.empty_embed = load_file(empty)["empty_embed"]

    def __len__(self) -> int:
        return self.n

    def gather(self, idx) -> dict[str, torch.Tensor]:
        """Latent mean and std, the uint8 condition (N, 3, H, W; N, 3n, H, W for n maps per item) and the prompt
        embedding of items ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        parts: dict[str, list] = {"latent_mean": [], "latent_std": [], "conditions": [], "text": []}
        order = []
        for s in np.unique(idx // self.shard_size):
            where = np.flatnonzero(idx // self.shard_size == s)
            local = idx[where] - s * self.shard_size
            shard = self.shards[s]
            shard.verify()
            parts["latent_mean"].append(shard.rows("latent_mean", local))
            parts["latent_std"].append(shard.rows("latent_std", local))
            parts["conditions"].append(shard.conditions(local).transpose(0, 3, 1, 2))
            parts["text"].append(shard.rows("prompt_embeds", shard.prompt_ids[local]))
            order.append(where)
        back = np.argsort(np.concatenate(order))  # rows back in the order asked for
        return {k: torch.from_numpy(np.ascontiguousarray(np.concatenate(v)[back])) for k, v in parts.items()}


_CONTENTS = {"index": "its index file changed (rows added, removed or edited)",
             "files": "an image or condition file it lists changed (size or modification time)",
             "items": "its number of items changed", "head": "its training part changed size",
             "toy": "the toy world draws other items (another version of the kit)",
             "datasets": "the datasets table changed (its fingerprint differs)"}


def _meta_ok(meta: dict, spec: dict) -> str | None:
    """Why an existing store cannot be reused (None: it can)."""
    if meta.get("format") != FORMAT_VERSION:
        return f"it was written by format {meta.get('format')} of the kit's store, this is {FORMAT_VERSION}"
    old = meta.get("spec", {})
    if old.get("encoders") != spec["encoders"]:
        return ("the base's encoders differ from those that encoded it (another VAE, text encoder or tokenizer: "
                "another base, or this one retrained in place)")
    if old.get("contents") != spec["contents"]:
        before, now = old.get("contents") or {}, spec["contents"]
        changed = [_CONTENTS.get(k, k) for k in now if before.get(k) != now[k]]
        return "the dataset changed since it was encoded: " + "; ".join(changed or ["its fingerprint differs"])
    changed = [k for k in spec if old.get(k) != spec[k]]
    return (f"it encodes another {', '.join(f'{k} ({old.get(k)!r}, now {spec[k]!r})' for k in changed)}"
            if changed else None)


def _entry_problem(folder: Path, entry, s: int, items: int) -> str | None:
    """Why shard ``s``'s entry cannot be used as it is (None: it can; its bytes are checked when first read)."""
    name = f"shard-{s:05d}.safetensors"
    if not isinstance(entry, dict) or entry.get("name") != name or entry.get("items") != items:
        return f"store.json does not list {name} as it was written"
    path = folder / name
    if not path.is_file():
        return f"{name} is missing"
    if path.stat().st_size != entry.get("bytes"):
        return f"{name} has {path.stat().st_size} bytes, {entry.get('bytes')} were written"
    try:
        read_header(path)
    except StoreError as e:
        return str(e).split(";")[0]
    return None


def _estimate_bytes(dataset, n: int, latent_shape: tuple, text_shape: tuple, fit) -> int:
    """Bytes the store will take for ``n`` items: latents and a prompt embedding per item (the worst case: every
    prompt distinct), conditions as measured on a few items as PNG."""
    sample = [png_bytes(fit(dataset[i])[1]) for i in range(min(8, len(dataset)))]
    cond = int(np.mean([len(b) for b in sample]) * 1.5) if sample else 0
    per_item = 2 * int(np.prod(latent_shape)) * 4 + int(np.prod(text_shape)) * 4 + cond + 16
    return n * per_item


def build_store(folder: Path, pipe, dataset, resolution: int, spec: dict, fit, encode_prompts,
                shard_size: int = SHARD_SIZE, batch: int = 64, extra_notes=None) -> EncodedStore:
    """Open the store at ``folder`` for ``dataset`` when it provably matches (see the module docstring), encoding
    what is missing or stale first, then open it.

    ``fit(example) -> (image HxWx3 uint8, condition HxWx3 uint8)`` at ``resolution``, with ``state()``/``load()``/
    ``add()`` of its counts and ``notes(n)`` of what it changed (``cnkit.data.trainset.Fitter``); ``encode_prompts(pipe,
    prompts) -> tensor`` the text encoder's; ``spec`` what was encoded (checked with the format version, the base's
    encoders' fingerprint and the dataset's); ``extra_notes()`` -> {kind: note} more notes, asked once the store is
    complete (the split's overlap)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"{folder} is a file where the kit keeps an encoded training set: move it away (nothing was "
                         "written), or give the trainer another cache_dir")
    spec = {**spec, "encoders": encoders_fingerprint(pipe), "contents": fingerprint(dataset),
            "resolution": resolution, "items": len(dataset)}
    meta, why = read_meta(folder)
    if meta is not None:
        why = _meta_ok(meta, spec)
    if why:
        warnings.warn(f"the encoded training set in {folder} is not reused: {why}; encoding it again", stacklevel=2)
        shutil.rmtree(folder)
        meta = None
    folder.mkdir(parents=True, exist_ok=True)
    size = meta["shard_size"] if meta else shard_size
    n_shards = -(-len(dataset) // size)
    meta = meta or {"format": FORMAT_VERSION, "spec": spec, "shard_size": size, "shards": [], "empty": None,
                    "complete": False}
    entries = (meta["shards"] + [None] * n_shards)[:n_shards]
    for s, entry in enumerate(entries):
        if entry is None and not meta.get("complete"):
            continue  # not encoded yet
        problem = (f"store.json does not list shard-{s:05d}.safetensors though it says the store is complete"
                   if entry is None else _entry_problem(folder, entry, s, min(size, len(dataset) - s * size)))
        if problem:
            warnings.warn(f"the encoded training set in {folder}: {problem}; encoding that shard again",
                          stacklevel=2)
            entries[s] = None
    empty = meta.get("empty")
    if empty and (not (folder / empty["name"]).is_file() or file_sha256(folder / empty["name"]) != empty["sha256"]):
        warnings.warn(f"the encoded training set in {folder}: {empty['name']} is missing or changed; encoding it "
                      "again", stacklevel=2)
        empty = None
    meta.update(shards=entries, empty=empty)
    if None in entries or empty is None or not meta.get("complete"):
        _encode_shards(folder, meta, pipe, dataset, resolution, fit, encode_prompts, batch, extra_notes)
    return EncodedStore(folder)


def _write_meta(folder: Path, meta: dict) -> None:
    (folder / "store.json.tmp").write_text(json.dumps(meta, indent=1))
    (folder / "store.json.tmp").rename(folder / "store.json")  # what it lists counts once it is listed


def _save(tensors: dict, folder: Path, name: str, fitted=None) -> dict:
    """Write one store file whole (a temporary name, then a rename) and return its entry for store.json."""
    tmp = folder / (name + ".tmp")
    save_file(tensors, tmp)
    tmp.rename(folder / name)
    entry = {"name": name, "bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    return entry if fitted is None else entry | fitted


def _encode_shards(folder, meta, pipe, dataset, resolution, fit, encode_prompts, batch, extra_notes) -> None:
    size, entries = meta["shard_size"], meta["shards"]
    todo = [s for s, e in enumerate(entries) if e is None]
    latent = (pipe.vae.config.latent_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    text = (pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    left = sum(min(size, len(dataset) - s * size) for s in todo)
    need, free = _estimate_bytes(dataset, left, latent, text, fit), shutil.disk_usage(folder).free
    if need > free:
        raise DiskSpaceError(
            f"encoding {left} training items needs about {need / 2**30:.1f} GiB in {folder}, and {free / 2**30:.1f} "
            "GiB are free: free some space, give the trainer a cache_dir on a larger disk, or train with "
            "encode='on_the_fly' (no cache: the VAE and text encoder run on every batch)")
    if meta.get("empty") is None:
        meta["empty"] = _save({"empty_embed": encode_prompts(pipe, [""]).contiguous()}, folder, "empty.safetensors")
        _write_meta(folder, meta)
    device = pipe.vae.device
    bar = tqdm(total=len(dataset), initial=len(dataset) - left, desc="encode training set", unit="item",
               smoothing=0.1)
    for s in todo:
        fit.load({})  # each shard records what fitting changed in it
        means, stds, pngs, prompts = [], [], [], []
        for i in range(s * size, min((s + 1) * size, len(dataset)), batch):
            items = [fit(dataset[j]) + (dataset[j].prompt,) for j in range(i, min(i + batch, (s + 1) * size,
                                                                                 len(dataset)))]
            x = torch.from_numpy(np.stack([im for im, _, _ in items])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
            with torch.no_grad():
                post = pipe.vae.encode(x.to(device, pipe.vae.dtype)).latent_dist
            means.append(post.mean.float().cpu())
            stds.append(post.std.float().cpu())
            pngs += [png_bytes(c) for _, c, _ in items]
            prompts += [p for _, _, p in items]
            bar.update(len(items))
        distinct = sorted(set(prompts))
        index = {p: k for k, p in enumerate(distinct)}
        offsets = np.cumsum([0] + [len(b) for b in pngs])
        entries[s] = _save({"latent_mean": torch.cat(means).contiguous(), "latent_std": torch.cat(stds).contiguous(),
                            "prompt_ids": torch.tensor([index[p] for p in prompts], dtype=torch.int64),
                            "prompt_embeds": encode_prompts(pipe, distinct).contiguous(),
                            "cond_offsets": torch.from_numpy(offsets.astype(np.int64)),
                            "cond_png": torch.frombuffer(bytearray(b"".join(pngs)), dtype=torch.uint8)},
                           folder, f"shard-{s:05d}.safetensors", {"items": len(prompts), "fitted": fit.state()})
        if None in entries:
            _write_meta(folder, meta)
    bar.close()
    fit.load({})
    for e in entries:  # the whole set's notes, from every shard's counts
        fit.add(e["fitted"])
    meta.update(complete=True, notes=fit.notes(len(dataset)) | (extra_notes() if extra_notes else {}))
    _write_meta(folder, meta)
