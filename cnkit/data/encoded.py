"""The encoded training set on disk: what the frozen VAE and text encoder make of each training item, in shards
read a batch at a time, so a trainer's memory stays flat however large the dataset is.

A store is a folder (``<cache_dir>/encoded-<key>/``, shared by every run on the same data, base and size):

- ``store.json``: the format version, what was encoded (the base's encoders' fingerprint, the dataset, the
  resolution, how many items) and the shards finished so far. An interrupted encode keeps its finished shards
  and continues after the last one; a folder written by another version or for another base is not reused.
- ``shard-00000.safetensors``, ...: per item the VAE posterior's mean and std (float32, as the VAE gave them),
  the condition as PNG bytes (a uint8 blob and its offsets: lossless, and a 512-px edge map is ~10 KB against
  768 KB raw), and an index into the shard's distinct prompt embeddings.
- ``empty.safetensors``: the empty prompt's embedding (for prompt dropout).

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

FORMAT_VERSION = 1
SHARD_SIZE = 1024  # items per shard: ~130 MB at SD 1.5's 512 px, small enough to lose little to an interruption
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8, "I32": np.int32}


class DiskSpaceError(OSError):
    """Not enough free disk for the encoded training set."""


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
    """What decides the encodings: the VAE's and text encoder's configs, a sample of their weights, the
    tokenizer's vocabulary. Another base (or the same base retrained) gives another fingerprint."""
    h = hashlib.sha256()
    for module in (pipe.vae, pipe.text_encoder):
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        params = list(module.state_dict().values())
        for t in (params[0], params[len(params) // 2], params[-1]):
            h.update(t.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps(sorted(pipe.tokenizer.get_vocab().items())).encode())
    h.update(str(pipe.tokenizer.model_max_length).encode())
    return h.hexdigest()[:16]


class ShardReader:
    """Rows of one shard's tensors, read with ``os.pread`` (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.tensors = {name: (np.dtype(_DTYPES[t["dtype"]]), tuple(t["shape"]), t["data_offsets"][0])
                        for name, t in header.items()}
        self.fd = os.open(path, os.O_RDONLY)
        self.prompt_ids = self.whole("prompt_ids")  # K int64 each: small, kept
        self.cond_offsets = self.whole("cond_offsets")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def _read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, self.start + offset)
        if len(data) != size:
            raise OSError(f"{self.path} is truncated (wanted {size} bytes at {offset}); delete the store folder "
                          f"{self.path.parent} and rerun to encode it again")
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
            out.append(_unpack_maps(np.asarray(Image.open(io.BytesIO(self._read(offset + a, b - a))).convert("RGB"))))
        return np.stack(out)

    def close(self) -> None:
        os.close(self.fd)


class EncodedStore:
    """A finished store, read a batch at a time: ``gather(idx)`` gives what a training micro-batch needs."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "store.json").read_text())
        self.shard_size = meta["shard_size"]
        self.shards = [ShardReader(self.folder / name) for name in meta["shards"]]
        self.n = sum(len(s) for s in self.shards)
        self.notes: list[str] = list(meta.get("notes", {}).values())  # what was changed on the way in
        self.empty_embed = load_file(self.folder / "empty.safetensors")["empty_embed"]

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
            parts["latent_mean"].append(shard.rows("latent_mean", local))
            parts["latent_std"].append(shard.rows("latent_std", local))
            parts["conditions"].append(shard.conditions(local).transpose(0, 3, 1, 2))
            parts["text"].append(shard.rows("prompt_embeds", shard.prompt_ids[local]))
            order.append(where)
        back = np.argsort(np.concatenate(order))  # rows back in the order asked for
        return {k: torch.from_numpy(np.ascontiguousarray(np.concatenate(v)[back])) for k, v in parts.items()}


def _meta_ok(meta: dict, spec: dict) -> str | None:
    """Why an existing store cannot be reused (None: it can)."""
    if meta.get("format") != FORMAT_VERSION:
        return f"it was written by format {meta.get('format')} of the kit's store, this is {FORMAT_VERSION}"
    changed = [k for k in spec if meta.get("spec", {}).get(k) != spec[k]]
    return f"it encodes another {', '.join(changed)}" if changed else None


def _estimate_bytes(dataset, n: int, latent_shape: tuple, text_shape: tuple, fit) -> int:
    """Bytes the store will take for ``n`` items: latents and a prompt embedding per item (the worst case: every
    prompt distinct), conditions as measured on a few items as PNG."""
    sample = [png_bytes(fit(dataset[i])[1]) for i in range(min(8, len(dataset)))]
    cond = int(np.mean([len(b) for b in sample]) * 1.5) if sample else 0
    per_item = 2 * int(np.prod(latent_shape)) * 4 + int(np.prod(text_shape)) * 4 + cond + 16
    return n * per_item


def build_store(folder: Path, pipe, dataset, resolution: int, spec: dict, fit, encode_prompts,
                shard_size: int = SHARD_SIZE, batch: int = 64) -> EncodedStore:
    """Encode ``dataset`` into the store at ``folder`` (resuming a partial one), then open it.

    ``fit(example) -> (image HxWx3 uint8, condition HxWx3 uint8)`` at ``resolution``, with ``state()``/``load()`` of
    its counts and ``notes(n)`` of what it changed (``cnkit.data.trainset.Fitter``); ``encode_prompts(pipe, prompts) ->
    tensor`` the text encoder's; ``spec`` what was encoded (checked on reuse together with the format version and
    the base's encoders' fingerprint)."""
    folder = Path(folder)
    spec = {**spec, "encoders": encoders_fingerprint(pipe), "resolution": resolution, "items": len(dataset)}
    meta_file = folder / "store.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    if meta is not None and (why := _meta_ok(meta, spec)):
        warnings.warn(f"the encoded training set in {folder} is not reused: {why}; encoding it again", stacklevel=2)
        shutil.rmtree(folder)
        meta = None
    folder.mkdir(parents=True, exist_ok=True)
    meta = meta or {"format": FORMAT_VERSION, "spec": spec, "shard_size": shard_size, "shards": [],
                    "complete": False}
    n_shards = -(-len(dataset) // meta["shard_size"])
    if not meta["complete"]:
        _encode_shards(folder, meta, pipe, dataset, resolution, fit, encode_prompts, n_shards, batch)
    return EncodedStore(folder)


def _encode_shards(folder, meta, pipe, dataset, resolution, fit, encode_prompts, n_shards, batch) -> None:
    size, done = meta["shard_size"], len(meta["shards"])
    latent = (pipe.vae.config.latent_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    text = (pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    left = len(dataset) - done * size
    fit.load(meta.get("fitted", {}))
    need, free = _estimate_bytes(dataset, left, latent, text, fit), shutil.disk_usage(folder).free
    fit.load(meta.get("fitted", {}))  # the estimate's sample fitted items too: not counted
    if need > free:
        raise DiskSpaceError(
            f"encoding {left} training items needs about {need / 2**30:.1f} GiB in {folder}, and {free / 2**30:.1f} "
            "GiB are free: free some space, give the trainer a cache_dir on a larger disk, or train with "
            "encode='on_the_fly' (no cache: the VAE and text encoder run on every batch)")
    if not (folder / "empty.safetensors").is_file():
        save_file({"empty_embed": encode_prompts(pipe, [""]).contiguous()}, folder / "empty.safetensors")
    device = pipe.vae.device
    bar = tqdm(total=len(dataset), initial=done * size, desc="encode training set", unit="item", smoothing=0.1)
    for s in range(done, n_shards):
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
        name = f"shard-{s:05d}.safetensors"
        tmp = folder / (name + ".tmp")
        save_file({"latent_mean": torch.cat(means).contiguous(), "latent_std": torch.cat(stds).contiguous(),
                   "prompt_ids": torch.tensor([index[p] for p in prompts], dtype=torch.int64),
                   "prompt_embeds": encode_prompts(pipe, distinct).contiguous(),
                   "cond_offsets": torch.from_numpy(offsets.astype(np.int64)),
                   "cond_png": torch.frombuffer(bytearray(b"".join(pngs)), dtype=torch.uint8)}, tmp)
        tmp.rename(folder / name)
        meta["shards"].append(name)
        meta["complete"] = s + 1 == n_shards
        meta["fitted"] = fit.state()
        meta["notes"] = fit.notes(len(dataset)) if meta["complete"] else {}
        (folder / "store.json.tmp").write_text(json.dumps(meta, indent=1))
        (folder / "store.json.tmp").rename(folder / "store.json")  # the shard counts once it is listed
    bar.close()
