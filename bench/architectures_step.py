"""Trainable parameters and seconds per training step of every architecture in cnkit.models.architectures, on one base.

    .venv/bin/python bench/architectures_step.py [--batch 8] [--steps 5] [--warmup 2] [--threads 1]

A step is what a trainer does per optimizer step: ``predict_noise`` through the locked base, MSE on the noise,
backward, AdamW. Same base (the tiny one, freshly built: speed does not depend on the weights' values), same fixed
batch (latents 16x16, conditions 64x64, 77 text tokens), one process, ``torch.set_num_threads(threads)``; the median
of ``steps`` timed steps after ``warmup`` untimed ones. The base UNet's own forward pass (no gradient) is timed the
same way for scale. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cnkit.models import architectures as A
from cnkit.models.tiny import build_tiny_sd


def _timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = build_tiny_sd(seed=0)
    unet, factor, latent = pipe.unet, 4, 16
    g = torch.Generator().manual_seed(0)
    b = args.batch
    sample = torch.randn(b, 4, latent, latent, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    text = torch.randn(b, 77, unet.config.cross_attention_dim, generator=g)
    cond = torch.rand(b, 3, latent * factor, latent * factor, generator=g)
    noise = torch.randn(sample.shape, generator=g)

    def base_forward():
        with torch.no_grad():
            unet(sample, t, text)

    rows = []
    unet.requires_grad_(False).eval()
    rows.append({"architecture": "(base UNet forward, no grad)", "trainable": 0,
                 "seconds": _timed(base_forward, args.steps, args.warmup)})
    cases = [(name, {}) for name in A.ARCHITECTURES]
    cases.insert(cases.index(("t2i-adapter", {})) + 1, ("t2i-adapter", {"adapter_type": "light_adapter"}))
    for name, options in cases:
        adapter = A.build(name, unet, vae_scale_factor=factor, seed=0, **options).train()
        params = adapter.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        c = torch.cat([cond, cond], 1) if name == "union" else cond

        def step(adapter=adapter, optimizer=optimizer, c=c):
            optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(adapter.predict_noise(unet, sample, t, text, c), noise)
            loss.backward()
            optimizer.step()

        label = name + (" (light)" if options else "")
        rows.append({"architecture": label, "trainable": sum(p.numel() for p in params),
                     "seconds": _timed(step, args.steps, args.warmup)})
    print(f"tiny base, batch {b}, latents {latent}x{latent}, {args.threads} thread(s), median of {args.steps} steps "
          f"after {args.warmup} warm-up\n")
    print("| architecture | trainable parameters | s / step (fwd + bwd + AdamW) |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['architecture']} | {r['trainable']:,} | {r['seconds']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
