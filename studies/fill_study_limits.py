"""Issue 15, item 3: what limits disc IoU on the independent Fill50K-like data, measured per held-out item.

    .venv/bin/python studies/fill_study_limits.py [--study reports/fill-study] [--seeds 0 1 2]

Reads the nets ``recipe_on_independent_fill.py`` trained (each trainer's final net per seed: diffusers'
``seed-N/diffusers``, the kit's ``seed-N/kit/kept/step-<last>``), generates the 32 held-out items exactly as that
study measures them (each item's own prompt; the empty prompt with ``cfg_weighting="flat"``; DDIM 20, guidance 3,
seeds 1000 + i) and splits each item's IoU against the true disc by what could limit it:

- ``palette``: the embedded base was pretrained on 8 colours (``cnkit.data.toyworld.PALETTE``). Fill50K's 140 names
  map onto them: where the target's fill and background fall on the same palette colour (nearest in RGB) the base
  has no colour pair of its own to draw the disc against its background.
- ``frame``: circles that leave the frame (open outlines).
- ``contrast``: the target's fill-background RGB distance (low against high, split at the median).
- ``drawn in the palette``: the share of generated pixels within 40 RGB of a palette colour, against the share in
  the true targets: how much of what the net makes is the base's own 8 colours rather than Fill50K's.
- ``known words``: items whose two colour names are both whole palette words (the base's text encoder learnt only
  those) against the rest.

Writes ``STUDY/limits.json`` and prints a table; nothing here trains.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fill50k_like  # noqa: E402
import recipe_on_independent_fill as study  # noqa: E402

NEAR = 40.0  # RGB distance that counts as "this palette colour"


def nearest_palette(rgb) -> str:
    from cnkit.data.toyworld import PALETTE

    return min(PALETTE, key=lambda k: np.linalg.norm(np.subtract(PALETTE[k], rgb)))


def palette_share(image: np.ndarray) -> float:
    from cnkit.data.toyworld import PALETTE

    colours = np.array(list(PALETTE.values()), float)
    d = np.linalg.norm(image.reshape(-1, 1, 3).astype(float) - colours[None], axis=-1).min(1)
    return float((d <= NEAR).mean())


def per_item(pipe, folder: Path, items, truths) -> dict:
    """Per item: IoU against the true disc with its own prompt and with none (the study's own ``measure``), and the
    palette share of the images."""
    m = study.measure(pipe, folder, items, truths, per_item=True)
    return {key: m[key] for name in ("prompt", "empty") for key in (f"iou_{name}",)} | {
        f"palette_share_{name}": [palette_share(im) for im in m[f"images_{name}"]] for name in ("prompt", "empty")}


def split(values: list[float], mask: list[bool]) -> dict:
    v, m = np.asarray(values), np.asarray(mask, bool)
    return {"yes": {"n": int(m.sum()), "mean": float(v[m].mean()) if m.any() else None},
            "no": {"n": int((~m).sum()), "mean": float(v[~m].mean()) if (~m).any() else None}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, default=ROOT / "reports" / "fill-study")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-val", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)

    from cnkit.data.splits import held_out_items
    from cnkit.data.toyworld import PALETTE  # the 8 colours the base was pretrained on

    data = args.study / "data" / "fill50k-like"
    items = held_out_items(str(data), args.n_val, args.size, 0, args.n_val)
    truths = fill50k_like.read_truth(data)[-args.n_val:]
    collide = [nearest_palette(t["fill_rgb"]) == nearest_palette(t["background_rgb"]) for t in truths]
    leaves = [not t["inside"] for t in truths]
    contrast = [float(np.linalg.norm(np.subtract(t["fill_rgb"], t["background_rgb"]))) for t in truths]
    low = list(np.asarray(contrast) < np.median(contrast))
    known = [t["fill"] in PALETTE and t["background"] in PALETTE for t in truths]
    truth_share = float(np.mean([palette_share(np.asarray(it.image)) for it in items]))
    pipe = study.evaluation_pipeline(str(ROOT / "data" / "tiny-sd"))  # the study's own evaluation set-up
    result = {"items": args.n_val, "palette_collisions": int(sum(collide)), "leaving_frame": int(sum(leaves)),
              "known_word_pairs": int(sum(known)), "median_contrast": float(np.median(contrast)),
              "truth_palette_share": truth_share, "nets": {}}
    for seed in args.seeds:
        nets = {"diffusers": args.study / f"seed-{seed}" / "diffusers"}
        kept = sorted((args.study / f"seed-{seed}" / "kit" / "kept").glob("step-*"))
        if kept:
            nets["kit"] = kept[-1]
        for trainer, folder in nets.items():
            if not (folder / "diffusion_pytorch_model.safetensors").is_file():
                continue
            m = per_item(pipe, folder, items, truths)
            row = {"folder": str(folder)}
            for name in ("prompt", "empty"):
                v = m[f"iou_{name}"]
                row[name] = {"mean": float(np.mean(v)), "palette_collision": split(v, collide),
                             "leaves_frame": split(v, leaves), "low_contrast": split(v, low),
                             "palette_share": float(np.mean(m[f"palette_share_{name}"]))}
            row["per_item"] = m
            result["nets"][f"{trainer}-seed{seed}"] = row
            p = row["prompt"]
            print(f"{trainer} seed {seed}: IoU prompt {p['mean']:.3f} (palette collision "
                  f"{p['palette_collision']['yes']['mean']:.3f} n={p['palette_collision']['yes']['n']}, other "
                  f"{p['palette_collision']['no']['mean']:.3f}; leaves frame {p['leaves_frame']['yes']['mean']:.3f}, "
                  f"inside {p['leaves_frame']['no']['mean']:.3f}; low contrast {p['low_contrast']['yes']['mean']:.3f}, "
                  f"high {p['low_contrast']['no']['mean']:.3f}); palette share {p['palette_share']:.2f} "
                  f"(targets {truth_share:.2f}); empty prompt {row['empty']['mean']:.3f}", flush=True)
    (args.study / "limits.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
