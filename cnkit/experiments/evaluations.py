"""Every driver that generates images to measure them: the base's quality, a ControlNet's fidelity, two nets
composed, and the paper's figures on the embedded default (notebooks 01, 06-09, the shipped cards).

Each one draws held-out items and seeds from ``cnkit.data.splits`` (named, never trained on), generates through
``cnkit.generation.generate.generate_many`` (diffusers' pipeline, batched, one seed per image) and measures with the
pure functions of ``cnkit.metrics``; every function returns numbers, and those that feed a figure also the
images they were measured on, so a notebook's table and grid agree.

- ``evaluate_base``: the pretrained base from held-out prompts (fill, with the kit's eight colours and with
  Fill50K's 140: one disc, the prompted colours; shapes: the prompted shapes, counts and colours).
- ``evaluate_controlnet``: condition fidelity on held-out conditions; ``evaluate_composition``: two nets in
  one call (Fig. 6), each condition measured where it speaks; ``evaluate_condition_subsets``: a
  multi-condition (union) net given all its maps and each alone.
- ``evaluate_prompt_settings`` (Fig. 8): the four prompt settings on the fill task; condition fidelity
  (disc IoU) and prompt adherence (the prompted colours, where a prompt names any).
- ``evaluate_cfg_forms`` (Fig. 5): no prompt; no guidance / guidance with the condition in both branches /
  in the conditional branch only, unweighted and with the three resolution weightings; fidelity and
  over-saturation.
- ``segmentation_references`` (Table 2): the ceiling and floor of re-detected segmentation.
- ``vae_colour_round_trip``: how much of Fill50K's palette the base's VAE gives back (what its UNet can learn to draw).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import cnkit.metrics as metrics

from ..data import splits, toyworld
from ..generation.generate import generate_many
from ..generation.nets import load_net
from ..models.bases import image_size
from ..pixels import from_model_range, to_model_range


def _name(net) -> str:
    """A net as a progress bar names it: its folder (a run's, for its checkpoint), else its class."""
    if isinstance(net, str | Path):
        p = Path(net)
        return p.parent.name if p.name == "checkpoint" else p.name
    return type(net).__name__


STEPS = 20  # DDIM steps of the evaluations of nets (the base's own: 25, as its card measures it)
PROMPT_SETTINGS = ("none", "insufficient", "conflicting", "perfect")
# The paper's insufficient prompt (Fig. 8); the tiny tokenizer has a token for each of its words.
INSUFFICIENT_PROMPT = "a high-quality, detailed, and professional image"
# Fig. 5's settings, each (guidance on?, cfg_weighting); all without a prompt.
CFG_FORMS = {
    "no guidance": (False, None),
    "guidance, condition in both branches": (True, None),
    "guidance, conditional branch only, unweighted": (True, "flat"),
    "resolution weighting (paper: 64/h)": (True, "paper"),
    "resolution weighting (0.825 form)": (True, "0.825"),
    "resolution weighting (logspace form)": (True, "logspace"),
}
# ... as a figure names them (the condition goes where guidance acts on it; weighted: connection i scaled by w_i)
CFG_FORM_LABELS = {
    "no guidance": "no guidance (scale 1)",
    "guidance, condition in both branches": "condition in both CFG branches",
    "guidance, conditional branch only, unweighted": "conditional branch only",
    "resolution weighting (paper: 64/h)": "cond. branch, weighted 64/h (paper)",
    "resolution weighting (0.825 form)": "cond. branch, weighted 0.825^(12-i)",
    "resolution weighting (logspace form)": "cond. branch, weighted logspace",
}


# --- the base -------------------------------------------------------------------------------


def evaluate_base(pipe, n: int = 256, seed: int = 0, steps: int = 25, guidance: float = 5.0,
                  held_out_fill_pairs=splits.HELD_OUT_FILL_PAIRS, train_prompts=frozenset(), batch: int = 32,
                  worlds=("fill", "fill_x11", "shapes")) -> dict:
    """Base-model quality on ``n`` generations per world from held-out prompts: ``fill`` (the kit's eight colours:
    one disc, the prompted colours by the nearest of the eight), ``fill_x11`` (Fill50K's 140 colours on held-out
    pairs: one disc found without trusting colours, each colour right within CIEDE2000 10, as
    ``metrics.analyse_fill_x11`` says) and ``shapes`` (the prompted shapes, counts and colours)."""
    fills, shapes = splits.held_out_prompts(n, seed, held_out_fill_pairs, train_prompts)
    x11 = splits.held_out_x11_prompts(n, seed)
    draw = lambda rows, world: generate_many(pipe, [r["prompt"] for r in rows], None, [], [r["seed"] for r in rows],
                                             steps=steps, guidance=guidance, batch=batch,
                                             progress=f"base on {len(rows)} held-out {world} prompts")
    rate = lambda rows, key: float(np.mean([r[key] for r in rows]))
    result = {"settings": {"n": n, "seed": seed, "steps": steps, "guidance": guidance, "scheduler": "DDIM",
                           "x11_colour_rule": "CIEDE2000 <= 10 from the prompted colour; pairs >= 20 apart"},
              "per_image": {}, "images": {}}
    if "fill" in worlds:
        images, per = draw(fills, "fill"), []
        for f, img in zip(fills, images):
            a = metrics.analyse_fill(img)
            per.append({"prompt": f["prompt"], "seed": f["seed"], "one_disc": a["one_disc"],
                        "fill_ok": a.get("fill") == f["fill"], "background_ok": a["background"] == f["background"]})
        result["fill"] = {"one_disc": rate(per, "one_disc"), "fill_colour": rate(per, "fill_ok"),
                          "background_colour": rate(per, "background_ok")}
        result["per_image"]["fill"], result["images"]["fill"] = per, images
    if "fill_x11" in worlds:
        images, per = draw(x11, "X11 fill"), []
        for f, img in zip(x11, images):
            a = metrics.analyse_fill_x11(img, f["fill_rgb"], f["background_rgb"])
            per.append({"prompt": f["prompt"], "seed": f["seed"], "one_disc": a["one_disc"], "fill_ok": a["fill_ok"],
                        "background_ok": a["background_ok"], "fill_delta_e": a["fill_delta_e"],
                        "background_delta_e": a["background_delta_e"], "fill_seen": a["fill"],
                        "background_seen": a["background"],
                        "fill_name_ok": a["fill"] == f["fill"],
                        "background_name_ok": a["background"] == f["background"]})
        result["fill_x11"] = {"one_disc": rate(per, "one_disc"), "fill_colour": rate(per, "fill_ok"),
                              "background_colour": rate(per, "background_ok"),
                              "fill_nearest_name": rate(per, "fill_name_ok"),
                              "background_nearest_name": rate(per, "background_name_ok"),
                              "fill_delta_e_median": float(np.median([r["fill_delta_e"] for r in per])),
                              "background_delta_e_median": float(np.median([r["background_delta_e"] for r in per]))}
        result["per_image"]["fill_x11"], result["images"]["fill_x11"] = per, images
    if "shapes" in worlds:
        images, per = draw(shapes, "shapes"), []
        for s, img in zip(shapes, images):
            a = metrics.analyse_shapes(img, s["truth"])
            per.append({"prompt": s["prompt"], "seed": s["seed"], "correct": a["correct"],
                        "colours_ok": a["colours_ok"]})
        result["shapes"] = {"correct": rate(per, "correct"), "colours_and_counts": rate(per, "colours_ok")}
        result["per_image"]["shapes"], result["images"]["shapes"] = per, images
    return result


@torch.no_grad()
def vae_colour_round_trip(vae, n: int = 256, seed: int = 0, size: int = 64, batch: int = 64) -> dict:
    """How well the VAE gives Fill50K's colours back: the held-out X11 prompts' own discs (radius size/4, in the
    middle, in the prompted colours) encoded and decoded (posterior mean), then judged by ``metrics.analyse_fill_x11``
    as ``evaluate_base`` judges a generation; and each of the 140 colours alone as a uniform image (the share within
    CIEDE2000 10 after the round trip, the median, the worst five). The UNet learns to produce the encoder's
    latents, so a colour the round trip loses is one the base draws wrong unless it finds a latent the encoder never
    makes: these rates are what a perfect UNet on this VAE would score, not a hard cap."""
    from ..colours import X11, delta_e  # noqa: PLC0415

    rows = splits.held_out_x11_prompts(n, seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= (size / 4) ** 2
    targets = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    for i, r in enumerate(rows):
        targets[i] = r["background_rgb"]
        targets[i][disc] = r["fill_rgb"]
    round_trip = lambda imgs: np.concatenate([from_model_range(vae.decode(vae.encode(
        to_model_range(imgs[i:i + batch])).latent_dist.mean).sample) for i in range(0, len(imgs), batch)])
    judged = [metrics.analyse_fill_x11(img, r["fill_rgb"], r["background_rgb"])
              for img, r in zip(round_trip(targets), rows)]
    names = list(X11)
    rgb = np.array([X11[k] for k in names], dtype=np.uint8)
    flat = round_trip(np.broadcast_to(rgb[:, None, None, :], (len(rgb), size, size, 3)).copy())
    seen = flat[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4].reshape(len(rgb), -1, 3).mean(1)
    de = delta_e(seen, rgb.astype(np.float64))
    worst = np.argsort(-de)[:5]
    return {"n": len(rows), "fill_colour": float(np.mean([j["fill_ok"] for j in judged])),
            "background_colour": float(np.mean([j["background_ok"] for j in judged])),
            "one_disc": float(np.mean([j["one_disc"] for j in judged])),
            "colours_within_10": float(np.mean(de <= 10)), "colours_median_delta_e": float(np.median(de)),
            "worst_colours": {names[i]: round(float(de[i]), 1) for i in worst},
            "delta_e_by_colour": {k: round(float(v), 2) for k, v in zip(names, de)}}


# --- one ControlNet, two composed -----------------------------------------------------------


def evaluate_controlnet(pipe, controlnet, dataset: str, n: int = 64, prompt: str | None = "", data_seed: int = 0,
                        steps: int = 20, guidance: float = 3.0, cfg_weighting: str | None = None) -> dict:
    """Condition fidelity of ``controlnet`` on ``n`` held-out toy conditions, with ``prompt`` ("" by default:
    the condition alone; None: each item's own prompt), the validation seeds (the same images a training run's
    validation makes of the same items), through ``generate_many`` (``cfg_weighting`` as there). Returns every
    metric's mean and per-item values."""
    items = splits.held_out_items(dataset, n, image_size(pipe), data_seed)
    fidelity = metrics.fidelity_metrics_for(dataset)
    prompts = [item.prompt if prompt is None else prompt for item in items]
    images = generate_many(pipe, prompts, [[np.asarray(item.condition)] for item in items],
                           [load_net(controlnet)], splits.seeds("validation", len(items)), steps=steps,
                           guidance=guidance, cfg_weighting=cfg_weighting,
                           progress=f"{_name(controlnet)} on {n} held-out {dataset} conditions")
    scores = {name: [float(fn(img, item)) for img, item in zip(images, items)] for name, fn in fidelity.items()}
    return {"dataset": dataset, "n": n, "prompt": prompt, "steps": steps, "guidance": guidance,
            "cfg_weighting": cfg_weighting,
            "data_seed": data_seed, **{name: float(np.mean(v)) for name, v in scores.items()},
            "per_item": scores}


def evaluate_condition_subsets(pipe, net, dataset: str, n: int = 32, data_seed: int = 0, steps: int = 20,
                               guidance: float = 3.0, batch: int = 32) -> dict:
    """A multi-condition (union) net trained on ``dataset`` (maps m1+m2+...) given all its maps, then each map alone
    (the others missing, black), on ``n`` held-out items with their own prompts and the validation seeds: the same
    images a training run's validation makes when every map is given. Returns ``{subset: {metric: mean}}``, subsets
    named "all" and by map."""
    items = splits.held_out_items(dataset, n, image_size(pipe), data_seed)
    maps = dataset.partition("/")[2].split("+")
    fidelity = metrics.fidelity_metrics_for(dataset)
    subsets = {"all": maps, **{m: [m] for m in maps}}
    out = {}
    for label, keep in subsets.items():
        conditions = [[tuple(c if m in keep else None for m, c in zip(maps, item.condition))] for item in items]
        images = generate_many(pipe, [item.prompt for item in items], conditions, [net],
                               splits.seeds("validation", len(items)), steps=steps, guidance=guidance, batch=batch,
                               progress=f"union net given {'all maps' if label == 'all' else label + ' alone'}")
        out[label] = {name: float(np.mean([fn(img, item) for img, item in zip(images, items)]))
                      for name, fn in fidelity.items()}
    return out


def composition_conditions(sample) -> tuple[np.ndarray, np.ndarray]:
    """The segmentation map of shape 0 alone and the outline of shape 1 alone."""
    other = [ndimage.binary_dilation(sample.masks[f"shape{k}"], iterations=3) for k in (0, 1)]
    seg = sample.conditions["segmentation"].copy()
    seg[other[1]] = toyworld.SEGMENTATION_COLOURS["background"]
    outline = sample.conditions["outline"].copy()
    outline[~other[1]] = 0
    return seg, outline


def evaluate_composition(pipe, segmentation_net, outline_net, n: int = 32, prompt: str | None = None,
                         data_seed: int = 0, steps: int = 20, guidance: float = 3.0, keep_images: bool = False) -> dict:
    """Two nets in one call: the segmentation net gets shape 0's segmentation map, the outline net shape 1's
    outline, on ``n`` held-out two-shape scenes; each condition's fidelity where it speaks
    (``metrics.composition_fidelity``). ``prompt`` None: each scene's own prompt. ``keep_images``: the result
    also holds the scenes and their generated images (for a figure, without generating twice)."""
    scenes = splits.composition_scenes(n, data_seed)
    prompts = [scene.prompt if prompt is None else prompt for scene in scenes]
    images = generate_many(pipe, prompts, [list(composition_conditions(scene)) for scene in scenes],
                           [load_net(segmentation_net), load_net(outline_net)],
                           splits.seeds("composition", n), steps=steps, guidance=guidance,
                           progress=f"two nets composed on {n} scenes")
    rows = [metrics.composition_fidelity(image, scene) for image, scene in zip(images, scenes)]
    return {"n": n, "prompt": prompt, "steps": steps, "guidance": guidance,
            **{key: float(np.mean([r[key] for r in rows])) for key in rows[0]},
            "per_item": rows, **({"scenes": scenes, "images": images} if keep_images else {})}


# --- Fig. 8: prompt settings ---------------------------------------------------------------


def fill_prompt(setting: str, truth: dict, k: int) -> tuple[str, tuple[str, str] | None]:
    """The prompt of ``setting`` for a fill item with ``truth``, and the (fill, background) colours it
    asks for (None when it names none). Conflicting: a square, in two other colours (chosen by ``k``)."""
    if setting == "none":
        return "", None
    if setting == "insufficient":
        return INSUFFICIENT_PROMPT, None
    if setting == "perfect":
        return f"{truth['fill']} circle with {truth['background']} background", (truth["fill"], truth["background"])
    if setting == "conflicting":
        others = [c for c in toyworld.COLOUR_NAMES if c not in (truth["fill"], truth["background"])]
        fill, background = others[k % len(others)], others[(k + 1) % len(others)]
        return f"{fill} square on {background} background", (fill, background)
    raise ValueError(f"unknown prompt setting {setting!r}; known: {', '.join(PROMPT_SETTINGS)}")


def evaluate_prompt_settings(pipe, controlnet, n: int = 32, settings=PROMPT_SETTINGS, data_seed: int = 0,
                             steps: int = 20, guidance: float = 3.0) -> dict:
    """Per setting: mean disc IoU (fidelity), prompt adherence (share of images whose fill and
    background are the prompted colours; None where the prompt names none), the share of clean
    single-disc images, per-item values and the images. Same conditions and seeds for every setting."""
    controlnet = load_net(controlnet)
    items = splits.held_out_items("toy:fill", n, image_size(pipe), data_seed)
    conditions = [[np.asarray(it.condition)] for it in items]
    seeds = splits.seeds("prompt_settings", n)
    out = {}
    for setting in settings:
        asked = [fill_prompt(setting, it.sample.truth, k) for k, it in enumerate(items)]
        images = generate_many(pipe, [p for p, _ in asked], conditions, [controlnet], seeds, steps=steps,
                               guidance=guidance, progress=f"prompt setting '{setting}' on {n} outlines")
        fidelity = [metrics.disc_iou(img, it.condition) for img, it in zip(images, items)]
        found = [metrics.analyse_fill(img) for img in images]
        adherence = None if asked[0][1] is None else [
            float(f.get("fill") == want[0] and f["background"] == want[1]) for f, (_, want) in zip(found, asked)]
        out[setting] = {"prompt_example": asked[0][0], "disc_iou": float(np.mean(fidelity)),
                        "disc_iou_per_item": fidelity,
                        "adherence": None if adherence is None else float(np.mean(adherence)),
                        "one_disc": float(np.mean([f["one_disc"] for f in found])), "images": images}
    out["conditions"] = [c[0] for c in conditions]
    return out


# --- Fig. 5: CFG resolution weighting ------------------------------------------------------


def evaluate_cfg_forms(pipe, controlnet, n: int = 32, forms=tuple(CFG_FORMS), guidance: float = 3.0,
                       data_seed: int = 0, steps: int = 20) -> dict:
    """Per form of ``CFG_FORMS``, without a prompt: mean disc IoU, saturation excess over the true
    images (mean HSV saturation, generated minus true), off-palette distance, per-item fidelity, images."""
    controlnet = load_net(controlnet)
    items = splits.held_out_items("toy:fill", n, image_size(pipe), data_seed)
    conditions = [[np.asarray(it.condition)] for it in items]
    seeds = splits.seeds("cfg_forms", n)
    true_saturation = float(np.mean([metrics.saturation(np.asarray(it.image)) for it in items]))
    out = {"true_saturation": true_saturation}
    for form in forms:
        guided, weighting = CFG_FORMS[form]
        images = generate_many(pipe, [""] * n, conditions, [controlnet], seeds, steps=steps,
                               guidance=guidance if guided else 1.0, cfg_weighting=weighting, progress=form)
        fidelity = [metrics.disc_iou(img, it.condition) for img, it in zip(images, items)]
        out[form] = {"guidance": guidance if guided else 1.0, "cfg_weighting": weighting,
                     "disc_iou": float(np.mean(fidelity)), "disc_iou_per_item": fidelity,
                     "saturation_excess": float(np.mean([metrics.saturation(i) for i in images]) - true_saturation),
                     "off_palette": float(np.mean([metrics.off_palette(i) for i in images])), "images": images}
    out["conditions"] = [c[0] for c in conditions]
    return out


# --- Table 2: segmentation re-detected ---------------------------------------------------------


def segmentation_references(pipe, n: int = 32, data_seed: int = 0, steps: int = 20, guidance: float = 3.0) -> dict:
    """mIoU of segmentation re-detected from: the true images (the detector's own ceiling), the true
    images through the base's VAE (the ceiling of anything the base can draw), and the base alone from
    each item's prompt (no ControlNet: the floor). Same held-out items and metric as the nets'."""
    items = splits.held_out_items("toy:shapes/segmentation", n, image_size(pipe), data_seed)
    truth = [np.asarray(it.image) for it in items]
    with torch.no_grad():
        latents = pipe.vae.encode(to_model_range(np.stack(truth)).to(pipe.vae.dtype)).latent_dist.mode()
        roundtrip = from_model_range(pipe.vae.decode(latents).sample)
    prompt_only = generate_many(pipe, [it.prompt for it in items], None, [], splits.seeds("references", n),
                                steps=steps, guidance=guidance, progress=f"base alone on {n} scene prompts")
    score = lambda images: [metrics.segmentation_miou(img, it.sample) for img, it in zip(images, items)]
    rows = {"ground truth": score(truth), "ground truth through the VAE": score(roundtrip),
            "base alone, prompt only": score(prompt_only)}
    return {name: {"miou": float(np.mean(v)), "per_item": v} for name, v in rows.items()} | {
        "images": {"ground truth": truth, "ground truth through the VAE": roundtrip,
                   "base alone, prompt only": prompt_only}}
