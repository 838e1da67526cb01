"""The training set as the trainer reads it: each item fitted to the training resolution (and said so), encoded
once by the frozen VAE and text encoder into an on-disk store shared between runs (``cnkit.data.encoded``), or encoded
on the fly, batch by batch; either way read with ``gather(indices)``.

What changes pixels or text is reported where the user sees it, the same words as generation uses: a warning
when it happens, and the run's ``notes.json`` (``Trainer.notes``). Pairs of another size are fitted by one of
the WebUI's resize modes (``TrainConfig.resize_mode``; images bicubic, conditions as generation fits them);
prompts longer than the text encoder reads are cut by its tokenizer; images the reader converted (transparency
composited, 16-bit or float values scaled: ``cnkit.pixels.to_rgb``) are counted by kind; held-out validation
items that repeat training items are named (``cnkit.data.splits.split_overlap``). The counts are kept per shard
of the store, so every sitting of a resumed run writes the same notes.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image

import cnkit.params as _params

from ..pixels import fit, is_condition_set, stack_maps, to_model_range
from .encoded import EncodedStore, build_store
from .readers import NOTE, is_toy
from .splits import split_overlap, training_items


def encode_prompts(pipe, prompts: list[str], batch: int = 256) -> torch.Tensor:
    """The frozen text encoder's output for ``prompts`` (float32, on the CPU), padded and cut to its length."""
    tok = pipe.tokenizer
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            ids = tok(prompts[i:i + batch], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(pipe.text_encoder.device)
            out.append(pipe.text_encoder(ids)[0].float().cpu())
    return torch.cat(out)


def fit_condition_maps(condition, size: int, mode: str) -> np.ndarray:
    """An item's condition at ``size`` x ``size`` as generation fits it: HxWx3 uint8, or for a set of maps (a
    multi-condition dataset) HxWx(3n), the maps stacked on the channel axis in order (``cnkit.pixels.stack_maps``)."""
    if is_condition_set(condition):
        return stack_maps([fit(m, size, size, mode)[0] for m in condition])
    return np.asarray(fit(condition, size, size, mode)[0])


class Fitter:
    """Items at the training resolution: ``fitter(example) -> (image, condition)`` as uint8 HxWx3 arrays (a set of
    condition maps: HxWx3n, ``fit_condition_maps``). It counts
    what it changed (pairs resized, prompts too long for the text encoder) so that the run can say it; its counts
    survive an interrupted encode (``state``/``load``)."""

    def __init__(self, resolution: int, mode: str, tokenizer):
        self.resolution, self.mode, self.tokenizer = resolution, mode, tokenizer
        self.resized, self.long, self.converted = Counter(), 0, Counter()

    def __call__(self, ex) -> tuple[np.ndarray, np.ndarray]:
        r = self.resolution
        image, note = fit(ex.image, r, r, self.mode, Image.BICUBIC)
        condition = fit_condition_maps(ex.condition, r, self.mode)
        if note:
            self.resized[f"{ex.image.size[0]}x{ex.image.size[1]}"] += 1
        self.long += len(self.tokenizer(ex.prompt, truncation=False).input_ids) > self.tokenizer.model_max_length
        maps = ex.condition if is_condition_set(ex.condition) else (ex.condition,)
        for what, img in [("images", ex.image)] + [("conditions", m) for m in maps]:
            said = getattr(img, "info", {}).get(NOTE)  # what the reader changed (cnkit.data.readers)
            if said:
                self.converted[f"{what}: {said}"] += 1
        return np.asarray(image), condition

    def state(self) -> dict:
        return {"resized": dict(self.resized), "long": self.long, "converted": dict(self.converted)}

    def load(self, state: dict) -> None:
        self.resized, self.long = Counter(state.get("resized", {})), state.get("long", 0)
        self.converted = Counter(state.get("converted", {}))

    def add(self, state: dict) -> None:
        """Count in another ``state()`` (a shard's, a worker's batch's)."""
        self.resized.update(state.get("resized", {}))
        self.long += state.get("long", 0)
        self.converted.update(state.get("converted", {}))

    def notes(self, n_items: int) -> dict[str, str]:
        """What was changed, by kind (``resized``, ``long_prompts``, ``converted ...``), counted over ``n_items``
        items."""
        r, out = self.resolution, {}
        if self.resized:
            common = self.resized.most_common(3)
            sizes = common[0][0] if len(common) == 1 else ", ".join(f"{k} ({v})" for k, v in common)
            out["resized"] = (f"{sum(self.resized.values())} of {n_items} training pairs are {sizes}, not {r}x{r}: "
                              f"fitted by {self.mode} (resize_mode: crop_and_resize, just_resize or resize_and_fill)")
        if self.long:
            out["long_prompts"] = (f"{self.long} of {n_items} training prompts are longer than the "
                                   f"{self.tokenizer.model_max_length} tokens the text encoder reads: cut to that "
                                   "length")
        for kind, count in sorted(self.converted.items()):
            what, _, note = kind.partition(": ")
            out[f"converted {kind}"] = f"{count} of {n_items} training {what} had {note} (cnkit.pixels.to_rgb)"
        return out


def store_key(cfg, resolution: int) -> str:
    """What decides a training set's encoding (runs that share it share one store)."""
    held_out = 0 if is_toy(cfg.dataset) else cfg.validation_size  # a folder's training part depends on it
    return hashlib.sha256(json.dumps([str(_params.repo_path(cfg.base)), cfg.dataset, cfg.n_train, cfg.data_seed,
                                      resolution, held_out, cfg.resize_mode]).encode()).hexdigest()[:16]


def _warn(notes: list[str]) -> None:
    for note in notes:
        warnings.warn(note, stacklevel=3)


def cached_store(cfg, pipe, resolution: int, cache_dir: Path) -> EncodedStore:
    """The training set of ``cfg`` encoded into the store under ``cache_dir``: reused when it provably matches the
    dataset and the base as they are now (checked on every open, ``cnkit.data.encoded.build_store``), else encoded
    (or what is missing of it) first; its ``notes`` say what was changed on the way in, and are warned here."""
    folder = Path(cache_dir) / f"encoded-{store_key(cfg, resolution)}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Runs trained side by side (cnkit.experiments.configs --workers) may need the same set: one encodes it, the others
    # wait for it instead of encoding it again.
    with FileLock(str(folder) + ".lock"):
        dataset = training_items(cfg.dataset, resolution, cfg.n_train, cfg.data_seed, cfg.validation_size)
        batch = max(1, int(64 * (64 / resolution) ** 2))  # 64 at 64 px, 1 at SD's 512 (VAE memory)
        store = build_store(folder, pipe, dataset, resolution,
                            {"dataset": cfg.dataset, "n_train": cfg.n_train, "data_seed": cfg.data_seed},
                            Fitter(resolution, cfg.resize_mode, pipe.tokenizer), encode_prompts, batch=batch,
                            extra_notes=lambda: _split_notes(cfg))
    _warn(store.notes)
    return store


def _split_notes(cfg) -> dict[str, str]:
    note = None if is_toy(cfg.dataset) else split_overlap(cfg.dataset, cfg.validation_size)
    return {"overlap": note} if note else {}


def micro_batch_generator(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    """The random stream of one micro-batch: which items, then its noise, timesteps and dropped prompts. A pure
    function of (seed, step, micro-batch, process), so a resumed run draws exactly what the uninterrupted one did,
    and a reader can know ahead which items the trainer will ask for."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + micro) * 131 + process)


def draw_items(g: torch.Generator, n: int, batch: int) -> torch.Tensor:
    """A micro-batch's items, the first draw from its stream: one definition for the trainer and the readers that
    read ahead what it will ask for."""
    return torch.randint(n, (batch,), generator=g)


class _Planned(torch.utils.data.IterableDataset):
    """The items the trainer will ask for, micro-batch after micro-batch from ``step`` on (as it draws them), read
    and fitted in DataLoader workers ahead of the loop. Worker k reads every ``workers``-th micro-batch."""

    def __init__(self, dataset, fitter, seed: int, step: int, accumulation: int, process: int, batch: int):
        self.dataset, self.fitter, self.args = dataset, fitter, (seed, step, accumulation, process, batch)

    def __iter__(self):
        seed, step, accumulation, process, batch = self.args
        info = torch.utils.data.get_worker_info()
        k, workers = (info.id, info.num_workers) if info else (0, 1)
        count = 0
        while True:
            for micro in range(accumulation):
                if count % workers == k:
                    g = micro_batch_generator(seed, step, micro, process)
                    idx = draw_items(g, len(self.dataset), batch)
                    examples = [self.dataset[int(i)] for i in idx]
                    fitter = Fitter(self.fitter.resolution, self.fitter.mode, self.fitter.tokenizer)  # this batch's
                    yield idx, examples, [fitter(ex) for ex in examples], fitter.state()
                count += 1
            step += 1


class OnTheFly:
    """The training set encoded batch by batch (no cache: for data too big for the disk, or that a user wants
    augmented): ``gather`` fits the items, runs the frozen VAE and text encoder on them, and returns what a store
    would. With ``num_workers``, DataLoader workers read and fit the items the trainer will ask for ahead of it
    (``plan``); anything else (the telemetry's probe) is read on the spot."""

    def __init__(self, cfg, pipe, resolution: int):
        self.pipe, self.cfg = pipe, cfg
        self.dataset = training_items(cfg.dataset, resolution, cfg.n_train, cfg.data_seed, cfg.validation_size)
        self.fitter = Fitter(resolution, cfg.resize_mode, pipe.tokenizer)
        self.empty_embed = encode_prompts(pipe, [""])
        self.split = _split_notes(cfg)
        _warn(list(self.split.values()))
        self.notes: list[str] = list(self.split.values())
        self.seen, self._said, self._ahead, self._next = 0, set(), None, None

    def __len__(self) -> int:
        return len(self.dataset)

    def state(self) -> dict:
        """What it counted so far (items read, the telemetry's probe included, and what fitting changed): the trainer
        keeps it in its checkpoint, so that a resumed run's notes count every sitting."""
        return {"counts": self.fitter.state(), "seen": self.seen}

    def load_state(self, state: dict) -> None:
        if state:
            self.fitter.load(state.get("counts", {}))
            self.seen = state.get("seen", 0)

    def plan(self, step: int, process: int) -> None:
        """Start the workers reading ahead from optimizer step ``step`` (the trainer calls this before its loop)."""
        if self.cfg.num_workers:
            planned = _Planned(self.dataset, self.fitter, self.cfg.seed, step, self.cfg.gradient_accumulation,
                               process, self.cfg.batch_size)
            self._ahead = iter(torch.utils.data.DataLoader(planned, batch_size=None, num_workers=self.cfg.num_workers,
                                                           prefetch_factor=2))

    def _fitted(self, idx) -> tuple[list, list]:
        if self._ahead is not None:
            self._next = self._next or next(self._ahead)
            if torch.equal(self._next[0], torch.as_tensor(idx)):
                _, examples, fitted, counts = self._next
                self._next = None
                self.fitter.add(counts)  # what the worker changed in this batch
                return examples, fitted
        examples = [self.dataset[int(i)] for i in idx]
        return examples, [self.fitter(ex) for ex in examples]

    def gather(self, idx) -> dict[str, torch.Tensor]:
        examples, fitted = self._fitted(idx)
        self.seen += len(examples)
        notes = self.fitter.notes(self.seen)
        _warn([note for kind, note in notes.items() if kind not in self._said])  # each kind once, when first seen
        self._said |= set(notes)
        self.notes = list(notes.values()) + list(self.split.values())
        vae = self.pipe.vae
        with torch.no_grad():
            x = to_model_range(np.stack([im for im, _ in fitted])).to(vae.device, vae.dtype)
            post = vae.encode(x).latent_dist
        return {"latent_mean": post.mean.float().cpu(), "latent_std": post.std.float().cpu(),
                "conditions": torch.from_numpy(np.stack([c for _, c in fitted])).permute(0, 3, 1, 2).contiguous(),
                "text": encode_prompts(self.pipe, [ex.prompt for ex in examples])}
