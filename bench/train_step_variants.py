"""Where a ControlNet training step's time goes on this machine, and what the obvious speed-ups do.

    .venv/bin/python bench/train_step_variants.py [--steps 14] [--batch 32] [--compile] [--profile]

One cnkit training step (cnkit.training.train.Trainer.loss on a cached micro-batch, backward, AdamW) timed
under variants that keep the recipe's maths, each in its own process on the same base, data, batch
and seed; the first steps are warm-up, the median of the rest is reported with its ratio to the
default. ``--profile`` adds the default step's top operators (torch.profiler), ``--compile`` a
``torch.compile`` variant (its compile time is printed apart). Last, two one-thread processes train
side by side, as ``cnkit.experiments.configs --workers 2`` trains the figures' runs: their combined rate.

The variants are the ones a reader of bench/train_throughput.py would try first: diffusers' classic
attention processor and SDPA's math backend instead of the flash kernel, bf16 autocast (Accelerate's
``mixed_precision="bf16"``; this CPU has AMX), AdamW's fused kernel, and one thread instead of two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import WARMUP, _base  # noqa: E402

VARIANTS = {
    "default": "cnkit's trainer as it runs (fp32, channels-last, SDPA flash attention)",
    "fused-adamw": "AdamW(fused=True)",
    "bf16": "Accelerate mixed_precision='bf16' (autocast)",
    "classic-attention": "diffusers AttnProcessor (baddbmm + softmax) in UNet and ControlNet",
    "sdpa-math": "SDPA restricted to its math backend",
    "one-thread": "torch.set_num_threads(1)",
    "compile": "torch.compile on the ControlNet and the UNet",
}


def run_variant(variant: str, base: str, steps: int, batch: int, profile: bool) -> dict:
    import torch

    from cnkit.data.trainset import cached_store
    from cnkit.training.train import TrainConfig, Trainer

    if variant == "one-thread":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(base=base, dataset="toy:fill", steps=10**6, batch_size=batch, n_train=512,
                          validate_every=0, checkpoint_every=10**9, out_dir=out, learning_rate=1e-3,
                          timestep_sampling="cubic", mixed_precision="bf16" if variant == "bf16" else "no")
        trainer = Trainer(cfg, cache_dir=Path(out) / "cache")
        trainer.data = cached_store(cfg, trainer.pipe, trainer.resolution, trainer.cache_dir)
        if variant == "classic-attention":
            from diffusers.models.attention_processor import AttnProcessor

            for module in (trainer.pipe.unet, trainer.controlnet):
                module.set_attn_processor(AttnProcessor())
        trainer.adapter.train()
        opt = torch.optim.AdamW(trainer.adapter.trainable_parameters(), lr=cfg.learning_rate,
                                fused=variant == "fused-adamw")
        trainer.adapter, opt = trainer.accelerator.prepare(trainer.adapter, opt)
        if variant == "compile":
            trainer.adapter = torch.compile(trainer.adapter)
            trainer.pipe.unet = torch.compile(trainer.pipe.unet)
        ctx = contextlib.nullcontext()
        if variant == "sdpa-math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel(SDPBackend.MATH)

        def step():
            loss = trainer.loss(trainer._micro_batch(trainer.data, 0))
            trainer.accelerator.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            trainer.step += 1

        times = []
        with ctx:
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            top = ""
            if profile:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as torch_profile

                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(5):
                        step()
                top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return {"step_s": times[WARMUP:], "first_step_s": times[0], "threads": torch.get_num_threads(), "top": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--base", default="data/tiny-sd")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (about 2 minutes of compiling)")
    ap.add_argument("--profile", action="store_true", help="print the default step's top operators")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, args.base, args.steps, args.batch, args.profile)))
        return
    base = _base(args.base)
    names = [v for v in VARIANTS if v != "compile" or args.compile]
    rows = {}
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--base", base, "--steps", str(args.steps),
               "--batch", str(args.batch)] + (["--profile"] if args.profile and name == "default" else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[name] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    # Two one-thread runs at once (cnkit.experiments.configs --workers 2): each step's median, and the two together.
    cmd = [sys.executable, __file__, "--child", "one-thread", "--base", base, "--steps", str(args.steps),
           "--batch", str(args.batch)]
    pair = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    side = [statistics.median(json.loads(next(line for line in p.communicate()[0].splitlines()
                                              if line.startswith("RESULT "))[7:])["step_s"]) for p in pair]
    print(f"base {args.base if Path(args.base).is_dir() else 'fresh tiny SD'}, batch {args.batch}, "
          f"{args.steps - WARMUP} timed steps after {WARMUP} warm-up; one process per variant")
    print(f"{'variant':<20}{'s/step (median)':>16}{'vs default':>12}{'first step s':>14}  what")
    default = statistics.median(rows["default"]["step_s"])
    for name in names:
        med = statistics.median(rows[name]["step_s"])
        print(f"{name:<20}{med:>16.3f}{default / med:>11.2f}x{rows[name]['first_step_s']:>14.1f}  {VARIANTS[name]}")
    both = 1 / sum(1 / t for t in side)  # seconds per step of the two runs together
    print(f"{'two runs side by side':<20}{both:>16.3f}{default / both:>11.2f}x{'':>14}  two one-thread processes "
          f"at once (each {side[0]:.3f} and {side[1]:.3f} s/step): their combined steps per second")
    if args.profile:
        print("\nthe default step's top operators (5 steps):\n" + rows["default"]["top"])


if __name__ == "__main__":
    main()
