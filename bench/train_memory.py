"""Peak memory of a short ControlNet training run against the size of its dataset.

    .venv/bin/python bench/train_memory.py [--n 250] [--size 256] [--steps 3] [--kit PATH]

Writes Fill50K-format folders of N and 8N pairs (the toy fill world, ``size`` px), then trains a few steps on each
in a fresh process (``cnkit.training.train.Trainer`` on ``data/tiny-sd`` at ``size`` px: encoding the training set, then
training), and prints each run's peak resident memory (VmHWM) and anonymous memory, the growth per pair, the
encoded store's bytes per pair on disk, and what that means for the paper's Fill50K (50,000 pairs at 512 px) on SD
1.5. ``--kit PATH`` runs the children against another checkout of the kit (e.g. an older commit, to compare).
Target (issue 14): the 8N run's peak within 150 MB of the N run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(data: str, out: str, size: int, steps: int, batch: int) -> dict:
    """One training run in this process; returns its peak memory and where its encoded set went."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cnkit.training.train import TrainConfig, Trainer

    peak_anon = [0]
    t0 = time.perf_counter()
    trainer = Trainer(TrainConfig(base=str(ROOT / "data" / "tiny-sd"), dataset=data, steps=steps, batch_size=batch,
                                  resolution=size, validate_every=0, checkpoint_every=10**6, validation_size=8,
                                  out_dir=out))
    trainer.add_callback("on_step_end", lambda t: peak_anon.__setitem__(0, max(peak_anon[0], _status("RssAnon"))))
    trainer.run()
    cache = Path(out) / "cache"
    store = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    return {"peak_rss": _status("VmHWM"), "rss_anon_in_training": peak_anon[0], "store_bytes": store,
            "wall_s": time.perf_counter() - t0}


def _run_child(kit: Path, data: Path, out: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(kit), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", str(data), str(out), "--size", str(args.size),
                           "--steps", str(args.steps), "--batch", str(args.batch)], env=env, capture_output=True,
                          text=True, cwd=kit)
    if done.returncode:
        raise SystemExit(f"the training child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=250, help="pairs in the small set; the large one has 8x")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--kit", default=str(ROOT), help="the checkout whose trainer the children run")
    ap.add_argument("--child", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.size, args.steps, args.batch)))
        return 0
    sys.path.insert(0, str(ROOT))
    from cnkit.data.toyworld import export_fill50k

    kit = Path(args.kit).resolve()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.n, 8 * args.n):
            data = export_fill50k(Path(tmp) / f"fill-{n}", n=n, size=args.size)
            results[n] = _run_child(kit, data, Path(tmp) / f"run-{n}", args)
    small, large = results[args.n], results[8 * args.n]
    mb = 2**20
    growth = (large["peak_rss"] - small["peak_rss"]) / (7 * args.n)
    store_per_pair = large["store_bytes"] / (8 * args.n - 8)
    print(f"kit: {kit}; tiny base at {args.size} px, {args.steps} steps of batch {args.batch}")
    print("| pairs | peak RSS | anonymous RSS in training | encoded store on disk | wall |")
    print("|---|---|---|---|---|")
    for n, r in results.items():
        print(f"| {n} | {r['peak_rss'] / mb:.0f} MB | {r['rss_anon_in_training'] / mb:.0f} MB | "
              f"{r['store_bytes'] / mb:.1f} MB | {r['wall_s']:.0f} s |")
    print(f"peak RSS, {8 * args.n} pairs minus {args.n}: {(large['peak_rss'] - small['peak_rss']) / mb:+.0f} MB "
          f"({growth / 1024:+.1f} KB per pair; target: within 150 MB)")
    # SD 1.5 at 512 px: latents 4x64x64 (mean and std, float32), a 77x768 float32 prompt embedding per pair at
    # worst, and the condition as PNG (an outline compresses like this toy one, scaled by the pixel count).
    cond_png = max(store_per_pair - 2 * 4 * (args.size // 4) ** 2 * 4 - 77 * 64 * 4, 0) * (512 / args.size) ** 2
    sd_pair = 2 * 4 * 64 * 64 * 4 + 77 * 768 * 4 + cond_png
    print(f"encoded store: {store_per_pair / 1024:.1f} KB per pair here; Fill50K at 512 px on SD 1.5: about "
          f"{sd_pair / 1024:.0f} KB per pair, {50_000 * sd_pair / 2**30:.1f} GiB on disk, and peak RSS "
          f"{growth * 50_000 / mb:+.0f} MB over a small set's at the growth measured here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
