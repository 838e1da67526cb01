"""What a control architecture costs, measured on equal terms: trainable parameters, file size, seconds per
training step and seconds per generated image (notebook 10).

Training runs are trained two at a time by ``make figures`` (``cnkit.experiments.configs``), so their own wall clocks
depend on what ran beside them. The step and image times here are therefore measured again, one architecture
after the other in this one process, with the same threads, batch, data and base, and quoted as medians:

    step_seconds(cfg, cache_dir)           # the trainer's own optimizer step (no telemetry, no validation)
    image_seconds(base, checkpoint, items)  # cnkit.generate_many with the trained net, DDIM 20, guidance 3
    measure(run, runs_dir)                  # all four for a trained run's architecture
    measure_all(runs, runs_dir)             # the same for several, timed in interleaved rounds
    comparison_row(name, measured, runs)    # notebook 10's row: the costs beside each task's convergence per seed
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.splits import held_out_items, seeds
from ..generation.generate import generate_many, image_size
from ..models import architectures
from ..models.bases import load_pipeline
from ..training.train import TrainConfig, Trainer
from .runs import Run


def file_bytes(checkpoint) -> int:
    """Bytes of a saved net's weights (its safetensors files: what one downloads or hands to a UI; not the
    optimizer state a training checkpoint keeps beside them)."""
    return sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))


def step_seconds(cfg: TrainConfig, cache_dir, steps: int = 8, warmup: int = 2) -> dict:
    """The median wall seconds of the trainer's optimizer step for ``cfg`` (its architecture, batch, data and base),
    after ``warmup`` steps; trained into a scratch folder, with the encoded set shared through ``cache_dir``. Also
    the parameters that trainer's optimizer trains (counted on the adapter it built, not on a second one)."""
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cnkit-step-") as scratch:
        run = TrainConfig(**{**asdict(cfg), "steps": warmup + steps, "validate_every": 0,
                             "checkpoint_every": 10**9, "out_dir": scratch})
        trainer = Trainer(run, cache_dir=cache_dir)
        last = [0.0]

        def clock(tr) -> None:
            now = time.perf_counter()
            if tr.step > warmup:
                times.append(now - last[0])
            last[0] = now

        trainer.add_callback("on_train_start", clock)
        trainer.add_callback("on_step_end", clock)
        trainer.run()
        trainable = sum(p.numel() for p in trainer.accelerator.unwrap_model(trainer.adapter).trainable_parameters())
    return {"seconds_per_step": float(np.median(times)), "step_times": times, "batch_size": cfg.batch_size,
            "threads": torch.get_num_threads(), "trainable_params": trainable}


def image_seconds(base, checkpoint, conditions: list, prompts: list[str], repeats: int = 3, steps: int = 20,
                  guidance: float = 3.0) -> dict:
    """The median wall seconds per image of ``cnkit.generate_many`` with the net in ``checkpoint`` on these
    conditions (one batch, fixed seeds), after one warm-up call that also loads the net."""
    nets = [architectures.load(checkpoint, load_pipeline(base).unet)]
    call = dict(prompts=prompts, conditions=[[c] for c in conditions], controlnets=nets,
                seeds=seeds("validation", len(prompts)), steps=steps, guidance=guidance, batch=len(prompts))
    generate_many(base, **{**call, "prompts": prompts[:1], "conditions": call["conditions"][:1],
                           "seeds": call["seeds"][:1]})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate_many(base, **call)
        times.append((time.perf_counter() - start) / len(prompts))
    return {"seconds_per_image": float(np.median(times)), "images": len(prompts), "denoising_steps": steps,
            "threads": torch.get_num_threads()}


def measure(run: Run, runs_dir, timing_steps: int = 8, n_images: int = 8, repeats: int = 3) -> dict:
    """The costs of ``run``'s architecture on its base, data and batch: trainable parameters, weights file bytes
    (its checkpoint), seconds per training step and per image (generating ``n_images`` of its held-out conditions
    with the trained net), timed in ``repeats`` rounds (``measure_all``)."""
    return measure_all({"run": run}, runs_dir, timing_steps, n_images, rounds=repeats)["run"]


def measure_all(runs: dict[str, Run], runs_dir, timing_steps: int = 8, n_images: int = 8, rounds: int = 3) -> dict:
    """``measure`` for several runs (one per architecture), interleaved: each of ``rounds`` rounds times every
    run's step and image once, in turn, so that a slow spell of the machine falls on all of them rather than on
    whichever was measured then (one pass after the other moved single numbers by 15-30% here). A time is the
    median of its rounds' times; ``*_rounds`` keep each round's, to show the spread."""
    plans, found = {}, {}
    for name, run in runs.items():
        cfg = TrainConfig(**run.config)
        pipe = load_pipeline(cfg.base)
        size = cfg.resolution or image_size(pipe)
        items = held_out_items(cfg.dataset, n_images, size, cfg.data_seed, cfg.validation_size, cfg.resize_mode)
        plans[name] = (cfg, pipe, items)
        found[name] = {"file_bytes": file_bytes(run.checkpoint), "step_times": [],
                       "seconds_per_step_rounds": [], "seconds_per_image_rounds": []}
    bar = tqdm(total=rounds * len(plans), desc="timing each architecture's step and image", unit="timing")
    for r in range(rounds):
        for name, (cfg, pipe, items) in plans.items():
            bar.set_postfix_str(f"round {r + 1} of {rounds}: {name}")
            step = step_seconds(cfg, Path(runs_dir) / "cache", steps=timing_steps)
            image = image_seconds(pipe, runs[name].checkpoint, [it.condition for it in items],
                                  [it.prompt for it in items], repeats=1)
            f = found[name]
            f["step_times"] += step["step_times"]
            f["seconds_per_step_rounds"].append(step["seconds_per_step"])
            f["seconds_per_image_rounds"].append(image["seconds_per_image"])
            f.update({k: step[k] for k in ("batch_size", "threads", "trainable_params")},
                     **{k: image[k] for k in ("images", "denoising_steps")})
            bar.update(1)
    bar.close()
    for f in found.values():
        f["seconds_per_step"] = float(np.median(f["seconds_per_step_rounds"]))
        f["seconds_per_image"] = float(np.median(f["seconds_per_image_rounds"]))
    return found


def training_seconds_to(run: Run, step: int | None) -> float | None:
    """Wall seconds the run spent training (its validations taken out) until ``step``, as it was trained (two
    runs at a time under ``make figures``: noisier than ``step * seconds_per_step``)."""
    if step is None or run.convergence.get("resumed"):
        return None
    val = run.validation()
    k = val["step"].index(step)
    return float(val["elapsed_s"][k] - sum(val["seconds"][: k + 1]))


def comparison_row(architecture: str, measured: dict, runs_by_task: dict[str, list[Run]]) -> dict:
    """One architecture's row of notebook 10's ``summary.json``: its costs, and per task, one entry per seed: the
    detected convergence step, the training seconds to it (that step times the measured step time, and as the
    run was trained), and the final fidelity."""
    per_task = lambda key: {t: [r.convergence[key] for r in rs] for t, rs in runs_by_task.items()}
    at = per_task("converged_at_step")
    spt = measured["seconds_per_step"]
    return {"architecture": architecture,
            **{k: measured[k] for k in ("trainable_params", "file_bytes", "seconds_per_step", "seconds_per_image")},
            "converged_at_step": at,
            "converged_at_s": {t: [None if s is None else s * spt for s in steps] for t, steps in at.items()},
            "converged_at_s_as_trained": {t: [training_seconds_to(r, r.convergence["converged_at_step"]) for r in rs]
                                          for t, rs in runs_by_task.items()},
            "fidelity_final": per_task("fidelity_final"), "metric": per_task("metric"),
            "steps": {t: rs[0].config["steps"] for t, rs in runs_by_task.items()}}
