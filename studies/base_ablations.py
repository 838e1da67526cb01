"""Short-budget ablations behind the second embedded base's recipe (the choices its card records, measured).

    python studies/base_ablations.py vae  --out reports/base-ablations/vae-anchor1 --anchor 1.0 --lr 3e-4 --steps 800
    python studies/base_ablations.py unet --out reports/base-ablations/unet-colour --warm-start DIR [--colour-init]
        [--text-layers 4] [--lr 1e-3] [--batch-size 64] [--minutes 25] ...
    python studies/base_ablations.py with-vae --vae RUN/checkpoints/vae/vae.safetensors --out DIR
    python studies/base_ablations.py round-trip [--root reports/base-ablations]
    python studies/base_ablations.py summarize --out RUN/ablations.json

``vae``: fine-tunes the shipped base's VAE on every world (``cnkit.training.pretrain.train_vae``) and reports, in
``vae.json``: the held-out PSNR per world, how far the old worlds' latents moved (MSE of the posterior means against
the old encoder's), and whether the old UNet still draws the kit's fill world through the new VAE (the test that
matters for warm-starting the UNet and for the ControlNets trained on the old base). It also writes the base with the
new VAE (old UNet and text encoder) to ``OUT/pipeline``, the warm start of the ``unet`` ablations.

``round-trip``: adds to each VAE ablation's ``vae.json`` how many of Fill50K's 140 colours its VAE gives back
(``cnkit.experiments.evaluations.vae_colour_round_trip``, the measure behind the X11 colour bars).

``unet``: the UNet and text-encoder stage from a warm start for a fixed CPU budget (``--minutes`` of process CPU
time divided by the threads, i.e. minutes of this machine), scored every ``--eval-every`` steps on held-out prompts
(``curve.csv``, as the card's curve). Runs are compared at equal CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from cnkit.data.splits import held_out_images
from cnkit.experiments.evaluations import evaluate_base, vae_colour_round_trip
from cnkit.experiments.pretraining import judge_for, read_curve
from cnkit.models.bases import load_pipeline
from cnkit.pixels import to_model_range
from cnkit.training import pretrain as P

ROUND_TRIP_KEYS = ("colours_within_10", "colours_median_delta_e", "fill_colour", "background_colour", "worst_colours")


def vae(args) -> None:
    out = Path(args.out)
    cfg = P.PretrainConfig(out_dir=str(out), warm_start=args.warm_start, vae_steps=args.steps,
                           vae_learning_rate=args.lr, vae_anchor=args.anchor, n_fill=args.n_per_world,
                           n_shapes=args.n_per_world, n_fill50k=args.n_per_world, n_fill_x11=args.n_per_world,
                           checkpoint_every=200)
    out.mkdir(parents=True, exist_ok=True)
    pipe, old_vae, _ = P.starting_pipeline(cfg)
    old = load_pipeline(args.warm_start)
    images, _ = P.training_set(cfg)
    start, cpu = time.perf_counter(), time.process_time()
    P.train_vae(cfg, pipe.vae, images, Accelerator(), print, anchor=old_vae)
    report = {"config": {"steps": args.steps, "lr": args.lr, "anchor": args.anchor, "warm_start": args.warm_start},
              "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
              "psnr_db": {w: P.vae_psnr(pipe.vae, held_out_images(64, 0, world=w)) for w in P.WORLD_COUNTS}}
    with torch.no_grad():  # how far the old worlds' latents moved
        x = to_model_range(np.concatenate([held_out_images(64, 0, world=w) for w in ("fill", "shapes")]))
        new, ref = pipe.vae.encode(x).latent_dist.mean, old_vae.encode(x).latent_dist.mean
        report["old_worlds_latent_mse"] = float((new - ref).pow(2).mean())
        report["old_worlds_latent_var"] = float(ref.var())
    old.vae = pipe.vae  # the old UNet through the new VAE: does it still draw the worlds it knew?
    r = evaluate_base(old, n=args.n_eval, worlds=("fill", "shapes"))
    report["old_unet_through_new_vae"] = {"fill": r["fill"], "shapes": r["shapes"]}
    trip = vae_colour_round_trip(pipe.vae, seed=0)
    report["colour_round_trip"] = {k: trip[k] for k in ROUND_TRIP_KEYS}
    old.save_pretrained(out / "pipeline")
    (out / "vae.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def unet(args) -> None:
    threads = torch.get_num_threads()
    cfg = P.PretrainConfig(
        out_dir=args.out, warm_start=args.warm_start, vae_steps=0, n_fill=args.n_fill, n_shapes=args.n_shapes,
        n_fill50k=args.n_fill50k, n_fill_x11=args.n_fill_x11, colour_init=args.colour_init,
        text_layers=args.text_layers, steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.lr,
        schedule="wsd", warmup_steps=args.warmup, decay_steps=0, checkpoint_every=args.eval_every,
        eval_every=args.eval_every, n_eval=args.n_eval)
    out = Path(args.out)
    if args.latents and not (out / "latents.safetensors").exists():  # share one encoded set between ablations
        out.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(args.latents).resolve(), out / "latents.safetensors")
    budget = args.minutes * 60 * threads

    class Budget(Exception):
        pass

    def stop_when_spent(step, _ema):
        state = json.loads((out / "checkpoints" / "unet" / "state.json").read_text())
        if state["cpu_s"] >= budget:
            raise Budget

    _, prompts = P.training_set(cfg)
    try:
        P.pretrain(cfg, on_checkpoint=stop_when_spent, judge=judge_for(cfg, set(prompts)))
    except Budget:
        pass
    print((out / "curve.csv").read_text())


def with_vae(args) -> None:
    """A base with another VAE's weights (e.g. the production run's VAE stage), so ``unet`` ablations start where
    the production UNet stage started and can share its latents (``--latents``)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    pipe = load_pipeline(args.base)
    pipe.vae.load_state_dict(load_file(args.vae))
    pipe.save_pretrained(args.out)
    print(f"{args.base} with the VAE of {args.vae} -> {args.out}")


def round_trip(args) -> None:
    for d in sorted(Path(args.root).glob("vae-*")):
        report_path = d / "vae.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        if report is None or "colour_round_trip" in report:
            continue
        trip = vae_colour_round_trip(load_pipeline(str(d / "pipeline")).vae, seed=0)
        report["colour_round_trip"] = {k: trip[k] for k in ROUND_TRIP_KEYS}
        report_path.write_text(json.dumps(report, indent=1))
        print(f"{d.name}: {trip['colours_within_10']:.1%} of the colours within CIEDE2000 10, held-out discs' fill "
              f"{trip['fill_colour']:.1%}, background {trip['background_colour']:.1%}")


def _curve_at(path: Path, cpu_s: float | None = None) -> dict | None:
    """The curve's row at step 0 (``cpu_s`` None) or its last row within ``cpu_s`` of UNet CPU time."""
    if not path.is_file():
        return None
    rows = read_curve(path)
    if cpu_s is None:
        return rows[0]
    start = rows[0]["cpu_s"]
    within = [r for r in rows if r["cpu_s"] - start <= cpu_s]
    return within[-1] if within else None


def summarize(args) -> None:
    """The card's "recipe choices, measured" table from the ablations' results under ``--root``, as
    ``ablations.json`` (each row: choice, compared, measured, decision); absent results are left out."""
    root, rows = Path(args.root), []
    vae_runs = {d.name: json.loads((d / "vae.json").read_text()) for d in sorted(root.glob("vae-*"))
                if (d / "vae.json").is_file()}

    def vae_line(r):
        old = r["old_unet_through_new_vae"]
        return (f"old-world latents moved by MSE {r['old_worlds_latent_mse']:.4f} (their variance "
                f"{r['old_worlds_latent_var']:.2f}); the old UNet through it: shapes {old['shapes']['correct']:.0%} "
                f"right, fill colour {old['fill']['fill_colour']:.0%}; PSNR Fill50K-format "
                f"{r['psnr_db']['fill50k']:.1f} dB, X11 {r['psnr_db']['fill-x11']:.1f} dB, kit's fill "
                f"{r['psnr_db']['fill']:.1f} dB" + trip_line(r))

    def anchor_cost(a, b):  # measured later (`round-trip`): what the anchor costs in colours given back
        if "colour_round_trip" not in a or "colour_round_trip" not in b:
            return ""
        ta, tb = a["colour_round_trip"], b["colour_round_trip"]
        colours, fills = ta["colours_within_10"] - tb["colours_within_10"], ta["fill_colour"] - tb["fill_colour"]
        return (f" and {100 * colours:.0f} points of the colours given back ({100 * fills:.0f} of the held-out discs' "
                "fill colours), and the first base's nets fell below their bars on v2 even so "
                "(docs/nets_on_new_base.json): a third edition should not anchor")

    def trip_line(r):  # measured by `round-trip` where it was run
        trip = r.get("colour_round_trip")
        return f"; {trip['colours_within_10']:.0%} of the 140 colours back within CIEDE2000 10" if trip else ""

    # (choice, the two runs, their labels, what was compared, the decision from the pair): one row per pair that was run
    pairs = [("VAE: hold the old worlds' latents in place (vae_anchor)", "vae-anchor0.0", "vae-anchor1.0",
              ("anchor 0", "anchor 1.0"), lambda a, b: f"anchor 0 vs 1.0, {a['config']['steps']} steps at lr "
                                                       f"{a['config']['lr']:g}",
              lambda a, b: "anchor 1.0: the old UNet, and every net trained on the old base, keep reading the latents "
                           f"they knew; it gives up {a['psnr_db']['fill-x11'] - b['psnr_db']['fill-x11']:.1f} dB on "
                           "the new colours at this budget" + anchor_cost(a, b)),
             ("VAE learning rate (anchored)", "vae-anchor1-lr1e-3", "vae-anchor1-lr2e-3", ("1e-3", "2e-3"),
              lambda a, b: f"1e-3 vs 2e-3, {a['config']['steps']} steps",
              lambda a, b: "1e-3, the smaller move of the old latents (2e-3 moves them "
                           f"{b['old_worlds_latent_mse'] / a['old_worlds_latent_mse']:.2f}x as far for "
                           f"{b['psnr_db']['fill-x11'] - a['psnr_db']['fill-x11']:.1f} dB more on X11 colours); the "
                           "two were not compared at the production length")]
    for choice, first, second, (label_a, label_b), compared, decide in pairs:
        if first in vae_runs and second in vae_runs:
            a, b = vae_runs[first], vae_runs[second]
            rows.append({"choice": choice, "compared": compared(a, b),
                         "measured": f"{label_a}: {vae_line(a)}. {label_b.capitalize()}: {vae_line(b)}",
                         "decision": decide(a, b)})
    init, random = root / "unet-colour" / "curve.csv", root / "unet-random" / "curve.csv"
    a, b = _curve_at(init), _curve_at(random)
    if a and b:
        line = lambda r: (f"X11 one disc {r['fill_x11_one_disc']:.0%}, fill colour {r['fill_x11_fill_colour']:.0%}, "
                          f"background {r['fill_x11_background_colour']:.0%}")
        measured = f"before training: from colours {line(a)}; random {line(b)}"
        later_a, later_b = _curve_at(init, args.cpu_s), _curve_at(random, args.cpu_s)
        judged_a, judged_b = a, b
        if later_a and later_b and later_a["step"] > 0 and later_b["step"] > 0:
            judged_a, judged_b = later_a, later_b
            measured += (f". After {args.cpu_s / 60:.0f} CPU-minutes of the UNet stage (steps "
                         f"{int(later_a['step'])} / {int(later_b['step'])}): from colours {line(later_a)}; random "
                         f"{line(later_b)}")
        rows.append({"choice": "new colour words' embeddings placed by their colours (colour_init)",
                     "compared": "colour_init on vs off, the same warm start, VAE and latents",
                     "measured": measured,
                     # decided where both arms trained for the budget when they did, else where they started
                     "decision": "on" if judged_a["fill_x11_fill_colour"] >= judged_b["fill_x11_fill_colour"]
                     else "off"})
    out = Path(args.out)
    out.write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    v = sub.add_parser("vae")
    v.add_argument("--out", required=True)
    v.add_argument("--steps", type=int, default=800)
    v.add_argument("--lr", type=float, default=3e-4)
    v.add_argument("--anchor", type=float, default=1.0)
    v.add_argument("--warm-start", default="data/tiny-sd", help="the base whose VAE is fine-tuned")
    v.add_argument("--n-per-world", type=int, default=8000)
    v.add_argument("--n-eval", type=int, default=64)
    u = sub.add_parser("unet")
    u.add_argument("--out", required=True)
    u.add_argument("--warm-start", required=True)
    u.add_argument("--latents", default="", help="a latents.safetensors to share (same images and VAE)")
    u.add_argument("--colour-init", action="store_true")
    u.add_argument("--text-layers", type=int, default=0)
    u.add_argument("--lr", type=float, default=1e-3)
    u.add_argument("--batch-size", type=int, default=64)
    u.add_argument("--warmup", type=int, default=100)
    u.add_argument("--minutes", type=float, default=25.0, help="CPU budget in minutes of the machine's threads")
    u.add_argument("--max-steps", type=int, default=100000)
    u.add_argument("--eval-every", type=int, default=250)
    u.add_argument("--n-eval", type=int, default=64)
    for name, default in (("n-fill", 10000), ("n-shapes", 60000), ("n-fill50k", 30000), ("n-fill-x11", 30000)):
        u.add_argument(f"--{name}", type=int, default=default)
    w = sub.add_parser("with-vae")
    w.add_argument("--base", default="data/tiny-sd-v1")
    w.add_argument("--vae", required=True, help="a vae.safetensors (e.g. RUN/checkpoints/vae/vae.safetensors)")
    w.add_argument("--out", required=True)
    r = sub.add_parser("round-trip")
    r.add_argument("--root", default="reports/base-ablations")
    m = sub.add_parser("summarize")
    m.add_argument("--root", default="reports/base-ablations")
    m.add_argument("--cpu-s", type=float, default=1800.0, help="compare the UNet ablations at this much CPU time")
    m.add_argument("--out", required=True, help="ablations.json to write (the card reads RUN/ablations.json)")
    args = ap.parse_args(argv)
    {"vae": vae, "unet": unet, "with-vae": with_vae, "round-trip": round_trip,
     "summarize": summarize}[args.what](args)


if __name__ == "__main__":
    main()
