"""ControlNet training throughput: cnkit's trainer against the diffusers way, side by side.

    .venv/bin/python bench/train_throughput.py [--steps 12] [--batch 32] [--base data/tiny-sd]

The reference loop does, each step, what diffusers' examples/controlnet/train_controlnet.py does:
VAE-encode the batch's images (posterior sample), run the text encoder on its tokenized prompts,
add noise, run the ControlNet and the frozen UNet, MSE on the noise, AdamW step; fp32, no caching.
cnkit's trainer (cnkit.training.train.Trainer) caches the frozen encoders' outputs once per item.

Each loop runs in its own process (so peak memory is its own), on the same base, data, batch and
seed; the first steps are warm-up, and the median of the rest is reported, with the ratio.
Throughput does not depend on the weights' values, so a freshly built tiny model serves when
data/tiny-sd is absent.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 3


def _base(path: str) -> str:
    if Path(path).is_dir():
        return path
    from cnkit.models.tiny import build_tiny_sd

    out = Path(tempfile.mkdtemp()) / "tiny-sd"
    build_tiny_sd(seed=0).save_pretrained(out)
    return str(out)


def run_cnkit(base: str, steps: int, batch: int) -> dict:
    from cnkit.training.train import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(TrainConfig(base=base, dataset="toy:fill", steps=steps, batch_size=batch, n_train=512,
                                      validate_every=0, checkpoint_every=10**9, out_dir=out))
        times, last = [], [None]

        def tick(tr):
            now = time.perf_counter()
            if last[0] is not None:
                times.append(now - last[0])
            last[0] = now

        trainer.add_callback("on_train_start", tick)
        trainer.add_callback("on_step_end", tick)
        t0 = time.perf_counter()
        trainer.run()
        total = time.perf_counter() - t0
    return {"step_s": times[WARMUP:], "total_s": total}


def run_reference(base: str, steps: int, batch: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionPipeline

    from cnkit.data.toyworld import ToyWorld
    from cnkit.models.bases import vae_scale_factor
    from cnkit.models.controlnets import condition_encoder_channels

    pipe = StableDiffusionPipeline.from_pretrained(base)
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    for m in (vae, text_encoder, unet):
        m.requires_grad_(False)
    factor = vae_scale_factor(vae)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=condition_encoder_channels(factor))
    controlnet.train()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    data = ToyWorld("fill", n=512, seed=0, size=unet.config.sample_size * factor)
    items = [data[i] for i in range(len(data))]
    g = torch.Generator().manual_seed(0)
    times, encode_times = [], []
    t0 = time.perf_counter()
    for _step in range(steps):
        start = time.perf_counter()
        idx = torch.randint(len(items), (batch,), generator=g).tolist()
        pixels = torch.stack([torch.from_numpy(np.asarray(items[i].image)).permute(2, 0, 1) for i in idx]).float()
        pixels = pixels / 127.5 - 1
        cond = torch.stack([torch.from_numpy(np.asarray(items[i].condition)).permute(2, 0, 1) for i in idx]).float()
        cond = cond / 255
        prompts = [items[i].prompt if torch.rand(1, generator=g) > 0.5 else "" for i in idx]
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        text = text_encoder(ids)[0]
        encode_times.append(time.perf_counter() - start)  # the part of the step that caching removes
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
        noisy = noise_scheduler.add_noise(latents, noise, t)
        down, mid = controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        pred = unet(noisy, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"step_s": times[WARMUP:], "encode_s": encode_times[WARMUP:], "total_s": time.perf_counter() - t0}


def child(kind: str, base: str, steps: int, batch: int) -> None:
    result = (run_cnkit if kind == "cnkit" else run_reference)(base, steps, batch)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--base", default="data/tiny-sd")
    ap.add_argument("--child", choices=["cnkit", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.base, args.steps, args.batch)
    base = _base(args.base)
    rows = {}
    for kind in ("reference", "cnkit"):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--base", base, "--steps", str(args.steps),
                              "--batch", str(args.batch)], capture_output=True, text=True, check=True).stdout
        rows[kind] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    print(f"base {args.base if Path(args.base).is_dir() else 'fresh tiny SD'}, batch {args.batch}, "
          f"{args.steps - WARMUP} timed steps after {WARMUP} warm-up")
    print(f"{'loop':<28}{'s/step (median)':>16}{'samples/s':>12}{'peak RSS MiB':>14}{'total s':>10}")
    speed = {}
    for kind, label in (("reference", "diffusers-style reference"), ("cnkit", "cnkit Trainer")):
        r = rows[kind]
        med = statistics.median(r["step_s"])
        speed[kind] = args.batch / med
        print(f"{label:<28}{med:>16.3f}{speed[kind]:>12.1f}{r['peak_rss_mib']:>14.0f}{r['total_s']:>10.1f}")
    print(f"speed-up (samples/s, cnkit / reference): {speed['cnkit'] / speed['reference']:.2f}x")
    # What caching the frozen encoders can give at most: the reference's step without its data and
    # encoder part, every other operator run as fast as the reference runs it.
    ref, enc = statistics.median(rows["reference"]["step_s"]), statistics.median(rows["reference"]["encode_s"])
    print(f"the reference's data + VAE + text encoder part: {enc:.3f} s of its {ref:.3f} s step "
          f"({enc / ref:.0%}); caching it away gives at most {ref / (ref - enc):.2f}x")


if __name__ == "__main__":
    main()
