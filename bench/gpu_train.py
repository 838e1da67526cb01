"""ControlNet training at SD 1.5's scale on a GPU: cnkit's trainer against the step diffusers'
``examples/controlnet/train_controlnet.py`` takes, same base, data, batch and precision.

    python bench/gpu_train.py                      # SD 1.5-shaped random base, 512 px, batch 8 and 32, bf16
    python bench/gpu_train.py --tiny --size 64 --batches 2 --steps 4      # the same code on a CPU, in seconds
    python bench/gpu_train.py --batches 8 --gradient-checkpointing --json out.json   # memory with checkpointing

The base is ``cnkit.models.sd15``'s (SD 1.5's exact architecture, random weights: speed and memory do not depend on the
weights' values), built once and saved to a temporary folder that every run loads. Each (loop, batch) runs in its
own process, so peak memory is its own. The reference loop does, each
step, what ``train_controlnet.py`` does with ``--mixed_precision bf16``: the VAE (in bf16), the text encoder and the
UNet frozen in bf16, the ControlNet's weights in fp32 under autocast, VAE-encode the batch's images, encode its
prompts, add noise, ControlNet + UNet, MSE, backward, gradient clipping at 1.0, AdamW. cnkit's trainer encodes the
training set once (timed apart: ``encode_s``) and then reads latents, conditions and text from its store.

Printed: seconds per step (median of the steps after warm-up), images per second, peak GPU memory (CUDA's
max_memory_allocated; on a CPU, peak RSS), and each batch's speed-up. The goal (issue 14): at least 1.5x the
reference's images per second at no more memory. Measured on one H200 for the reference loop alone (REFERENCE.md):
batch 8 56.7 img/s at 18.2 GiB, batch 32 89.1 img/s at 46.6 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _save_base(tiny: bool, folder: Path) -> Path:
    """The base, built once (SD 1.5's shape takes most of a minute to initialise) and saved for every run to load."""
    if tiny:
        from cnkit.models.tiny import build_tiny_sd

        build_tiny_sd(seed=0).save_pretrained(folder)
        return folder
    from cnkit.models.sd15 import save_sd15_shaped

    return save_sd15_shaped(folder, seed=0)


def _base(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_cnkit(args, batch: int) -> dict:
    from cnkit.training.train import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(TrainConfig(base=args.base_dir, dataset="toy:fill", steps=args.steps, batch_size=batch,
                                      n_train=max(4 * batch, 64), resolution=args.size, validate_every=0,
                                      checkpoint_every=10**9, out_dir=str(Path(tmp) / "run"),
                                      mixed_precision=args.mixed_precision, telemetry_every=10**9,
                                      gradient_checkpointing=args.gradient_checkpointing))
        device = trainer.accelerator.device
        times, last = [], [None]

        def tick(tr):
            _sync(device)
            now = time.perf_counter()
            if last[0] is not None:
                times.append(now - last[0])
            last[0] = now

        encode = {}
        trainer.add_callback("on_train_start", lambda tr: encode.setdefault("s", time.perf_counter() - t0))
        trainer.add_callback("on_train_start", tick)
        trainer.add_callback("on_step_end", tick)
        if device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.run()
    return {"step_s": times[args.warmup:], "peak_gib": _peak(device), "encode_s": encode.get("s")}


def run_reference(args, batch: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from cnkit.data.toyworld import ToyWorld
    from cnkit.models.bases import vae_scale_factor
    from cnkit.models.controlnets import make_controlnet

    acc = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
    device = acc.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    pipe = _base(args.base_dir)
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    for m in (vae, text_encoder, unet):
        m.requires_grad_(False).to(device, dtype=weight_dtype)
    controlnet = make_controlnet(unet, "zero", vae_scale_factor=vae_scale_factor(vae), seed=0).to(device).train()
    if args.gradient_checkpointing:  # train_controlnet.py's --gradient_checkpointing: the ControlNet's only
        controlnet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    controlnet, opt = acc.prepare(controlnet, opt)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    world = ToyWorld("fill", n=max(4 * batch, 64), size=args.size)
    pixels = torch.from_numpy(np.stack([np.asarray(world[i].image) for i in range(len(world))])).permute(0, 3, 1, 2)
    conds = torch.from_numpy(np.stack([np.asarray(world[i].condition) for i in range(len(world))])).permute(0, 3, 1, 2)
    ids = tokenizer([world[i].prompt for i in range(len(world))], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        idx = torch.randint(len(world), (batch,), generator=g)
        x = (pixels[idx].float() / 127.5 - 1).to(device, weight_dtype)
        latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device).long()
        noisy = scheduler.add_noise(latents, noise, t)
        text = text_encoder(ids[idx].to(device), return_dict=False)[0]
        cond = (conds[idx].float() / 255).to(device, weight_dtype)
        with acc.autocast():
            down, mid = controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
            pred = unet(noisy, t, encoder_hidden_states=text,
                        down_block_additional_residuals=[s.to(weight_dtype) for s in down],
                        mid_block_additional_residual=mid.to(weight_dtype), return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        acc.backward(loss)
        acc.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"step_s": times[args.warmup:], "peak_gib": _peak(device), "encode_s": None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    ap.add_argument("--tiny", action="store_true", help="the embedded tiny architecture (CPU smoke run)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="both loops recompute activations in the backward pass (cnkit: ControlNet and UNet; "
                         "the reference, as train_controlnet.py: the ControlNet)")
    ap.add_argument("--json", default="", help="also write the table's numbers and the versions to this file")
    ap.add_argument("--child", nargs=2, metavar=("LOOP", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--base-dir", default="", help="a saved base to load (e.g. from `cnkit sd15 --out DIR`) instead "
                                                  "of building one")
    args = ap.parse_args(argv)
    if args.warmup >= args.steps:
        ap.error("--steps must exceed --warmup")
    if args.child:
        loop, batch = args.child[0], int(args.child[1])
        print(json.dumps((run_cnkit if loop == "cnkit" else run_reference)(args, batch)))
        return 0
    import diffusers
    import torch

    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    versions = {"device": where, "torch": torch.__version__, "diffusers": diffusers.__version__}
    print(f"{'tiny' if args.tiny else 'SD 1.5-shaped'} base, {args.size} px, {args.mixed_precision}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}, {where} (torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}); median of {args.steps - args.warmup} steps after {args.warmup} warm-up")
    print("| batch | loop | s/step | images/s | peak memory (GiB) | one-off encode (s) |")
    print("|---|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    summary, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = Path(args.base_dir) if args.base_dir else _save_base(args.tiny, Path(tmp) / "base")
        if not args.base_dir:
            print(f"base built and saved in {time.perf_counter() - t0:.0f} s", flush=True)
        for batch in args.batches:
            for loop in ("reference", "cnkit"):
                cmd = [sys.executable, __file__, "--child", loop, str(batch), "--size", str(args.size), "--steps",
                       str(args.steps), "--warmup", str(args.warmup), "--mixed-precision", args.mixed_precision,
                       "--base-dir", str(base)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    print(f"| {batch} | {loop} | failed: {done.stderr.strip().splitlines()[-1][:200]} | | | |")
                    rows.append({"batch": batch, "loop": loop, "error": done.stderr[-4000:]})
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                s = statistics.median(r["step_s"])
                summary[(batch, loop)] = (batch / s, r["peak_gib"])
                rows.append({"batch": batch, "loop": loop, "s_per_step": s, "images_per_s": batch / s, **r})
                encode = f"{r['encode_s']:.1f}" if r["encode_s"] is not None else "-"
                print(f"| {batch} | {loop} | {s:.3f} | {batch / s:.1f} | {r['peak_gib']:.1f} | {encode} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({**versions, "size": args.size, "mixed_precision": args.mixed_precision,
                                               "gradient_checkpointing": args.gradient_checkpointing, "rows": rows},
                                              indent=1))
    for batch in args.batches:
        if (batch, "cnkit") in summary and (batch, "reference") in summary:
            (kit, kit_mem), (ref, ref_mem) = summary[(batch, "cnkit")], summary[(batch, "reference")]
            print(f"batch {batch}: cnkit / reference images per second {kit / ref:.2f}x at {kit_mem / ref_mem:.2f}x "
                  "the memory (goal: >= 1.5x at <= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
