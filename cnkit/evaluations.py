"""The evaluations behind the paper's figures on the embedded default (notebooks 06-09).

Each one generates, through ``cnkit.generate.generate_many`` (diffusers' pipeline, batched), from
held-out toy conditions with fixed seeds, and measures with ``cnkit.metrics``; every function
returns numbers and the images they were measured on, so a notebook's table and grid agree.

- ``evaluate_prompt_settings`` (Fig. 8): the four prompt settings on the fill task; condition
  fidelity (disc IoU) and prompt adherence (the prompted colours, where a prompt names any).
- ``evaluate_cfg_forms`` (Fig. 5): no prompt; no guidance / guidance with the condition in both
  branches / in the conditional branch only, unweighted and with the three resolution weightings;
  fidelity and over-saturation.
- ``segmentation_references`` (Table 2): the ceiling and floor of re-detected segmentation.
"""

from __future__ import annotations

import numpy as np

from . import metrics, toyworld
from .telemetry import held_out_toy as held_out

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


def _base_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


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
    from .generate import generate_many, load_controlnet

    controlnet = load_controlnet(controlnet)
    items = held_out("toy:fill", n, _base_size(pipe), data_seed)
    conditions = [[np.asarray(it.condition)] for it in items]
    seeds = [3000 + k for k in range(n)]
    out = {}
    for setting in settings:
        asked = [fill_prompt(setting, it.sample.truth, k) for k, it in enumerate(items)]
        images = generate_many(pipe, [p for p, _ in asked], conditions, [controlnet], seeds, steps=steps,
                               guidance=guidance)
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
    from .generate import generate_many, load_controlnet

    controlnet = load_controlnet(controlnet)
    items = held_out("toy:fill", n, _base_size(pipe), data_seed)
    conditions = [[np.asarray(it.condition)] for it in items]
    seeds = [4000 + k for k in range(n)]
    true_saturation = float(np.mean([metrics.saturation(np.asarray(it.image)) for it in items]))
    out = {"true_saturation": true_saturation}
    for form in forms:
        guided, weighting = CFG_FORMS[form]
        images = generate_many(pipe, [""] * n, conditions, [controlnet], seeds, steps=steps,
                               guidance=guidance if guided else 1.0, cfg_weighting=weighting)
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
    import torch

    items = held_out("toy:shapes/segmentation", n, _base_size(pipe), data_seed)
    truth = [np.asarray(it.image) for it in items]
    with torch.no_grad():
        x = torch.from_numpy(np.stack(truth)).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.mode()
        back = pipe.vae.decode(latents).sample.clamp(-1, 1)
    roundtrip = ((back.permute(0, 2, 3, 1).float().numpy() + 1) * 127.5).round().astype(np.uint8)
    prompt_only = metrics.generate(pipe, [it.prompt for it in items], [5000 + k for k in range(n)], steps=steps,
                                   guidance=guidance)
    score = lambda images: [metrics.segmentation_miou(img, it.sample) for img, it in zip(images, items)]
    rows = {"ground truth": score(truth), "ground truth through the VAE": score(roundtrip),
            "base alone, prompt only": score(prompt_only)}
    return {name: {"miou": float(np.mean(v)), "per_item": v} for name, v in rows.items()} | {
        "images": {"ground truth": truth, "ground truth through the VAE": roundtrip,
                   "base alone, prompt only": prompt_only}}
