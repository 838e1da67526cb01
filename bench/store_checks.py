"""What the encoded store's checks cost, beside the training step they protect.

    .venv/bin/python bench/store_checks.py [--items 2048] [--folder-items 512] [--repeats 5] [--batch 32]

Every open of a store (``cnkit.data.trainset.cached_store``: once per run and sitting) compares its format, the
base's encoders' fingerprint and the dataset's fingerprint, and checks each shard's entry (size on disk, readable
header); the first read of each shard in a process hashes it whole (SHA-256) against store.json
(``cnkit.data.encoded``). Timed here, medians of ``--repeats``, on the embedded base (``data/tiny-sd``, else a fresh
one of its shape) and two training sets: a toy world (``--items`` items) and a Fill50K folder written for the
occasion (``--folder-items`` files of each kind):

- open, checked: ``cached_store`` on a finished store, whole; and its parts: the dataset opened, the encoders'
  fingerprint, the dataset's fingerprint, the shard entries' checks, the store opened (headers, the empty prompt's
  hash). Beside it, opening without checks (``EncodedStore`` alone, what the kit did before issue 31).
- first read: ``ShardReader.verify`` of one shard (its bytes and MB/s), and one shard at SD 1.5's 512 px (~130 MB)
  at that rate, an estimate.
- a training step at ``--batch`` (loss, backward, AdamW on a cached micro-batch, as bench/train_step_variants.py
  times it; the first step is warm-up).

Two cores shared with other work: medians and ratios are what to read, not single numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import _base  # noqa: E402


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _open_costs(cfg, trainer, repeats: int) -> dict:
    from cnkit.data import encoded
    from cnkit.data.readers import fingerprint
    from cnkit.data.splits import training_items
    from cnkit.data.trainset import cached_store, store_key

    pipe, r = trainer.pipe, trainer.resolution
    store = cached_store(cfg, pipe, r, trainer.cache_dir)  # encode once
    folder = trainer.cache_dir / f"encoded-{store_key(cfg, r)}"
    meta, _ = encoded.read_meta(folder)
    dataset = training_items(cfg.dataset, r, cfg.n_train, cfg.data_seed, cfg.validation_size)
    size = meta["shard_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "open, checked (cached_store)": _median(lambda: cached_store(cfg, pipe, r, trainer.cache_dir), repeats),
            "  the dataset opened": _median(
                lambda: training_items(cfg.dataset, r, cfg.n_train, cfg.data_seed, cfg.validation_size), repeats),
            "  the encoders' fingerprint": _median(lambda: encoded.encoders_fingerprint(pipe), repeats),
            "  the dataset's fingerprint": _median(lambda: fingerprint(dataset), repeats),
            "  the shard entries (size, header)": _median(
                lambda: [encoded._entry_problem(folder, e, s, min(size, len(dataset) - s * size))
                         for s, e in enumerate(meta["shards"])], repeats),
            "  the store opened (EncodedStore)": _median(lambda: encoded.EncodedStore(folder), repeats),
        }
    shard = folder / meta["shards"][0]["name"]

    def first_read():
        reader = encoded.ShardReader(shard, meta["shards"][0]["sha256"])
        reader.verify()
        reader.close()

    out["first read of a shard (SHA-256)"] = _median(first_read, repeats)
    return out | {"_shard_bytes": shard.stat().st_size, "_shards": len(meta["shards"]), "_items": len(store)}


def _step_s(trainer, steps: int) -> float:
    import torch

    trainer.adapter.train()
    opt = torch.optim.AdamW(trainer.adapter.trainable_parameters(), lr=trainer.cfg.learning_rate)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = trainer.loss(trainer._micro_batch(trainer.data, 0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainer.step += 1
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=2048, help="toy-world training items (1024 per shard)")
    ap.add_argument("--folder-items", type=int, default=512, help="items of the Fill50K folder")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed training steps (after one warm-up)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--base", default="data/tiny-sd")
    args = ap.parse_args()

    from cnkit.data import toyworld
    from cnkit.data.trainset import cached_store
    from cnkit.training.train import TrainConfig, Trainer

    base = _base(args.base)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = toyworld.export_fill50k(Path(tmp) / "fill50k", n=args.folder_items, size=64)
        for name, dataset, n in (("toy:fill", "toy:fill", args.items), ("Fill50K folder", str(folder), 0)):
            cfg = TrainConfig(base=base, dataset=dataset, n_train=n or 10000, steps=10**6, batch_size=args.batch,
                              validate_every=0, checkpoint_every=10**9, out_dir=str(Path(tmp) / name[:4]))
            trainer = Trainer(cfg, cache_dir=Path(tmp) / "cache")
            rows[name] = _open_costs(cfg, trainer, args.repeats)
            if name == "toy:fill":
                trainer.data = cached_store(cfg, trainer.pipe, trainer.resolution, trainer.cache_dir)
                step = _step_s(trainer, args.steps)
    import hashlib
    import os

    buf = os.urandom(64 * 2**20)
    sha_rate = 64 / _median(lambda: hashlib.sha256(buf).digest(), args.repeats)  # MB/s
    print(f"base {args.base if Path(args.base).is_dir() else 'fresh tiny SD'}; one training step at batch "
          f"{args.batch}: {step:.3f} s (median of {args.steps})")
    print(f"{'check':<40}" + "".join(f"{name:>26}" for name in rows))
    for key in next(iter(rows.values())):
        if key.startswith("_"):
            continue
        cells = "".join(f"{rows[n][key] * 1000:>12.1f} ms {rows[n][key] / step:>8.1%} step" for n in rows)
        print(f"{key:<40}{cells}")
    for name, r in rows.items():
        print(f"{name}: {r['_items']} items in {r['_shards']} shard(s); a shard of {r['_shard_bytes'] / 2**20:.1f} MiB "
              f"hashed at {r['_shard_bytes'] / 2**20 / r['first read of a shard (SHA-256)']:.0f} MiB/s on first read")
    print(f"SHA-256 here: {sha_rate:.0f} MB/s; a 130 MB shard at SD 1.5's 512 px: about {130 / sha_rate:.2f} s once "
          "per shard and process, beside a step of 0.5-1 s on a GPU that reads 1024 items from it over 32-128 steps")


if __name__ == "__main__":
    main()
