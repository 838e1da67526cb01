"""The embedded base, pretrained and judged: what ``cnkit pretrain`` and ``make pretrain`` run.

``cnkit.training.pretrain`` trains (resumable, from nothing or continuing a base); this module measures what it
trained, the way the card reports it: the quality curve while it trains (``evaluate_base`` on ``n_eval`` held-out
prompts per world every ``eval_every`` steps, against the CPU minutes spent), the final evaluation on ``n_final``
prompts per world, the stock pipeline's speed (8 images at 25 steps), the card, and publishing to a folder
(``data/tiny-sd``). Notebook 01 is a thin driver of the same functions.

    cnkit pretrain --out_dir reports/pretrain/run --warm_start data/tiny-sd ... [--publish_to data/tiny-sd]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from ..training.pretrain import PretrainConfig, pretrain, training_set
from .evaluations import evaluate_base
from .shipped import write_base_card


def judge_for(cfg: PretrainConfig, train_prompts) -> callable:
    """The quality curve's scorer: ``evaluate_base`` on ``cfg.n_eval`` held-out prompts per world (shapes prompts
    seen in training excluded, as on the card)."""
    return lambda pipe: evaluate_base(pipe, n=cfg.n_eval, seed=cfg.seed, train_prompts=train_prompts)


def speed(folder, repeats: int = 3, prompt: str = "red circle with blue background") -> dict:
    """The stock ``StableDiffusionPipeline`` loading ``folder``: 8 images at 25 steps, median of ``repeats``."""
    stock = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        stock([prompt] * 8, num_inference_steps=25, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
              output_type="np")
        times.append(time.perf_counter() - start)
    return {"images": 8, "steps": 25, "median_s": float(np.median(times)), "threads": torch.get_num_threads()}


def build_base(cfg: PretrainConfig, n_final: int = 256, publish_to: str = "", profile: str = "full",
               speed_repeats: int = 3, log=print) -> dict:
    """Pretrain (or resume) with the quality curve, evaluate on ``n_final`` held-out prompts per world, time the
    stock pipeline, write the card into ``out_dir/pipeline`` and copy it to ``publish_to`` when given. Returns
    {"pipe", "stats", "evaluation" (images included), "speed", "card"}."""
    _, prompts = training_set(cfg)
    train_prompts = set(prompts)
    pipe, stats = pretrain(cfg, log=log, judge=judge_for(cfg, train_prompts))
    evaluation = evaluate_base(pipe, n=n_final, seed=cfg.seed, train_prompts=train_prompts)
    out = Path(cfg.out_dir)
    timing = speed(out / "pipeline", speed_repeats)
    curve = out / "curve.csv"
    card = write_base_card(out / "pipeline", cfg, stats, {k: v for k, v in evaluation.items() if k != "images"},
                           timing, profile, curve=curve if curve.is_file() else None)
    if publish_to:
        dest = Path(publish_to)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out / "pipeline", tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        log(f"published to {dest}")
    return {"pipe": pipe, "stats": stats, "evaluation": evaluation, "speed": timing, "card": card}


def main(argv=None) -> dict:
    """``cnkit pretrain --out_dir DIR [--warm_start data/tiny-sd] [--steps N ...] [--publish_to data/tiny-sd]``:
    every PretrainConfig field is a flag; an interrupted run continues from ``out_dir``."""
    ap = argparse.ArgumentParser(prog="cnkit pretrain", description=main.__doc__)
    for f in fields(PretrainConfig):
        ap.add_argument(f"--{f.name}", default=None, help=f"default: {f.default!r}")
    ap.add_argument("--n_final", type=int, default=256, help="held-out prompts per world in the final evaluation")
    ap.add_argument("--publish_to", default="", help="copy the finished base with its card to this folder")
    args = vars(ap.parse_args(argv))
    n_final, publish_to = args.pop("n_final"), args.pop("publish_to")
    cfg = PretrainConfig(**{k: v for k, v in args.items() if v is not None})
    result = build_base(cfg, n_final=n_final, publish_to=publish_to)
    summary = {k: result["evaluation"][k] for k in ("fill", "fill_x11", "shapes")}
    print(json.dumps({"evaluation": summary, "speed": result["speed"], "card": str(result["card"])}))
    return summary


if __name__ == "__main__":
    main()
