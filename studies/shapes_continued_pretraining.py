"""Is the embedded base's shapes world under-trained, or too small? A measured training curve.

    .venv/bin/python studies/shapes_continued_pretraining.py [--steps 4500] [--learning-rate 3e-4]
        [--eval-every 750] [--n-eval 64] [--out reports/shapes-study]

data/tiny-sd draws the prompted shapes, counts and colours in 3.5% of held-out shapes prompts (its
card; issue 3 asks for 75%). This study continues the shipped model's pretraining (UNet + text
encoder, the same data, batch, Min-SNR, EMA and empty-prompt share as its card's recipe, a fresh
warm-up and cosine cycle at ``--learning-rate``) and evaluates the EMA weights every
``--eval-every`` steps with ``cnkit.experiments.evaluations.evaluate_base`` on ``--n-eval`` held-out prompts per
world, writing one row per evaluation to ``curve.csv``. A rising curve says more pretraining
compute closes the gap; a flat one says the recipe or the model's size must change. Resumable:
rerun the same command after an interruption.

It reads the shipped weights and the latents of the shipped run (``reports/pretrain/run``, made by
``make pretrain``; encoded anew with the shipped VAE when absent, about ten minutes).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import shutil
import time
from pathlib import Path

import torch

from cnkit.card import card_data
from cnkit.experiments.evaluations import evaluate_base
from cnkit.training.pretrain import PretrainConfig, encode_latents, train_unet, training_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="data/tiny-sd")
    ap.add_argument("--shipped-run", default="reports/pretrain/run", help="the shipped run's folder (latents)")
    ap.add_argument("--steps", type=int, default=4500)
    ap.add_argument("--learning-rate", type=float, default=3e-4)
    ap.add_argument("--eval-every", type=int, default=750)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--out", default="reports/shapes-study")
    args = ap.parse_args()

    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = {k: v for k, v in card_data(args.base)["recipe"].items() if k in PretrainConfig.__dataclass_fields__}
    cfg = PretrainConfig(**(recipe | {"out_dir": str(out), "steps": args.steps, "learning_rate": args.learning_rate,
                                      "warmup_steps": min(100, args.steps // 10),
                                      "checkpoint_every": args.eval_every}))
    shipped_latents = Path(args.shipped_run) / "latents.safetensors"
    if shipped_latents.is_file() and not (out / "latents.safetensors").is_file():
        shutil.copy(shipped_latents, out / "latents.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(args.base, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images, prompts = training_set(cfg)
    latents = encode_latents(cfg, pipe.vae, images)
    del images
    train_prompts = frozenset(prompts)
    curve = out / "curve.csv"
    done = set()
    if curve.is_file():
        done = {int(row["step"]) for row in csv.DictReader(curve.open())}
    t0 = time.perf_counter()

    def evaluate(step: int, unet, text_encoder) -> None:
        if step in done:
            return
        judge = StableDiffusionPipeline(
            vae=pipe.vae, text_encoder=copy.deepcopy(text_encoder).eval(), tokenizer=pipe.tokenizer,
            unet=copy.deepcopy(unet).eval().to(memory_format=torch.contiguous_format), scheduler=pipe.scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        judge.set_progress_bar_config(disable=True)
        t = time.perf_counter()
        with torch.no_grad():
            res = evaluate_base(judge, n=args.n_eval, train_prompts=train_prompts)
        row = {"step": step, "shapes_correct": res["shapes"]["correct"],
               "shapes_colours_and_counts": res["shapes"]["colours_and_counts"],
               "fill_one_disc": res["fill"]["one_disc"], "fill_colour": res["fill"]["fill_colour"],
               "background_colour": res["fill"]["background_colour"], "n": args.n_eval,
               "wall_s_since_start": round(time.perf_counter() - t0), "eval_s": round(time.perf_counter() - t)}
        new = not curve.is_file()
        with curve.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        print(json.dumps(row), flush=True)

    evaluate(0, pipe.unet, pipe.text_encoder)
    train_unet(cfg, pipe, latents, prompts, Accelerator(), print,
               on_checkpoint=lambda step, ema: evaluate(step, ema["unet"], ema["text_encoder"]))


if __name__ == "__main__":
    main()
