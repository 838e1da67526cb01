"""ControlNet's successors' published claims, and the verdict the kit's measurements give each (notebook 10).

Each claim is stated as its paper states it, with the number the paper gives, and tested by a rule on the
notebook's measurements (``rows``: architecture -> the measured row, below). A rule compares the successor with
ControlNet measured on the same base, data, budget and seeds; where the paper's number is a ratio at SD scale,
the rule asks for that ratio here. ``verdicts(rows)`` returns one dict per claim: the claim, its source, what the
kit measured (text) and ``held`` (True / False; None when an architecture it needs was not measured).

A measured row: ``trainable_params``, ``seconds_per_step``, ``seconds_per_image``, ``file_bytes``, and per task
``converged_at_step`` (one per seed; None where fidelity never stayed above the threshold) and ``fidelity_final``
(one per seed); a multi-condition net's row also ``fidelity_by_map`` (``"all"`` and each map alone, one per seed).
"""

from __future__ import annotations

import math

import numpy as np


def _median_step(steps: list) -> float:
    """The median detected convergence step over seeds, a run that never converged counting as never (inf)."""
    return float(np.median([math.inf if s is None else s for s in steps]))


def _ratio(rows, name, key, inverse=False) -> float:
    a, b = rows[name][key], rows["controlnet"][key]
    return b / a if inverse else a / b


def _at_most(name: str, key: str, at_most: float, stated: str, text: str, number):
    """Held if the successor's ``key`` is at most ``at_most`` of ControlNet's; ``text`` names both values ({a}, {b})
    as ``number`` writes them."""
    def rule(rows):
        r = _ratio(rows, name, key)
        values = text.format(a=number(rows[name][key]), b=number(rows["controlnet"][key]))
        return r <= at_most, f"{values}: {r:.1%} (claim: {stated})"
    return rule


def _params(name: str, at_most: float, stated: str):
    return _at_most(name, "trainable_params", at_most, stated, "{a} trainable parameters against ControlNet's {b}",
                    lambda v: f"{v:,}")


def _smaller_file(name: str, at_most: float, stated: str):
    return _at_most(name, "file_bytes", at_most, stated, "weights file {a} KB against ControlNet's {b} KB",
                    lambda v: f"{v / 1024:,.0f}")


def _faster(name: str, key: str, at_least: float, what: str):
    def rule(rows):
        r = _ratio(rows, name, key, inverse=True)
        return r >= at_least, (f"{what}: {rows[name][key]:.3f} s against ControlNet's {rows['controlnet'][key]:.3f} s, "
                               f"{r:.2f}x (held if at least {at_least}x)")
    return rule


def _fidelity_at_least(name: str):
    def rule(rows):
        tasks = [t for t in rows["controlnet"]["fidelity_final"] if t in rows[name]["fidelity_final"]]
        means = {t: (float(np.mean(rows[name]["fidelity_final"][t])),
                     float(np.mean(rows["controlnet"]["fidelity_final"][t]))) for t in tasks}
        text = "; ".join(f"{t}: {a:.2f} against ControlNet's {b:.2f}" for t, (a, b) in means.items())
        return all(a >= b for a, b in means.values()), f"final fidelity, mean of seeds - {text}"
    return rule


def _converges_sooner(name: str, task: str = "fill"):
    def rule(rows):
        if task not in rows[name]["converged_at_step"] or task not in rows["controlnet"]["converged_at_step"]:
            return None, f"not measured: the {task} task was not run"
        own, cn = rows[name]["converged_at_step"][task], rows["controlnet"]["converged_at_step"][task]
        ok = all(s is not None for s in own) and _median_step(own) <= _median_step(cn)
        return ok, (f"{task}: converged at steps {own} (seeds) against ControlNet's {cn}; held if every seed "
                    "converges within the budget and the median step is no later than ControlNet's")
    return rule


def _matches_dedicated_net(name: str, task: str = "segmentation", condition: str = "segmentation"):
    """A multi-condition net given ``condition``'s map alone (its row's ``fidelity_by_map``, measured on the validation
    items, prompts and seeds) against ControlNet trained on that map alone with the same budget: held if its mean
    over seeds reaches ControlNet's lowest seed."""
    def rule(rows):
        by_map = rows[name].get("fidelity_by_map")
        if not by_map or task not in rows["controlnet"]["fidelity_final"]:
            return None, f"{name} was not evaluated map by map on the {task} task"
        own, cn = by_map[condition], rows["controlnet"]["fidelity_final"][task]
        others = "; ".join(f"{m} alone {np.mean(v):.2f}" for m, v in by_map.items() if m not in ("all", condition))
        seeds = ", ".join(f"{v:.2f}" for v in own)
        return float(np.mean(own)) >= min(cn), (
            f"{task}, the {condition} map alone: {np.mean(own):.2f} (seeds {seeds}) against ControlNet trained on it "
            f"alone, {min(cn):.2f}-{max(cn):.2f}; all maps given: {np.mean(by_map['all']):.2f}; {others}. Held if "
            "the mean reaches ControlNet's lowest seed")
    return rule


# (architecture, source, the claim as published, rule)
CLAIMS = [
    ("controlnet-xs", "Zavadski et al. 2023 (arXiv 2312.06573)",
     "a fraction of ControlNet's parameters (SD 1.5: 14M-55M against 361M, 4-15%)", _params("controlnet-xs", 0.15,
                                                                                           "at most 15%")),
    ("controlnet-xs", "Zavadski et al. 2023", "about twice as fast during training",
     _faster("controlnet-xs", "seconds_per_step", 1.5, "seconds per training step")),
    ("controlnet-xs", "Zavadski et al. 2023", "about twice as fast during inference",
     _faster("controlnet-xs", "seconds_per_image", 1.5, "seconds per generated image")),
    ("controlnet-xs", "Zavadski et al. 2023", "better image quality than ControlNet (FID) at a fraction of its size",
     _fidelity_at_least("controlnet-xs")),
    ("t2i-adapter", "Mou et al. 2023 (arXiv 2302.08453)",
     "a light adapter (~77M parameters; ControlNet SD 1.5: 361M, 21%)", _params("t2i-adapter", 0.25, "at most 25%")),
    ("t2i-adapter", "Mou et al. 2023", "runs once per generation, not at every denoising step: cheaper sampling",
     _faster("t2i-adapter", "seconds_per_image", 1.0, "seconds per generated image")),
    ("control-lora", "Stability AI 2023 (huggingface.co/stabilityai/control-lora)",
     "far smaller files: rank 128, ~377 MB against ~4.7 GB for the full ControlNet (8%)",
     _smaller_file("control-lora", 0.10, "at most 10%")),
    ("controlnext", "Peng et al. 2024 (arXiv 2408.06070)", "up to 90% fewer trainable parameters than ControlNet",
     _params("controlnext", 0.10, "at most 10%")),
    ("controlnext", "Peng et al. 2024",
     "converges fast: Fill50K in about a thousand steps, where ControlNet converges suddenly and later",
     _converges_sooner("controlnext")),
    ("union", "Zhao et al. 2023 (Uni-ControlNet, arXiv 2305.16322); xinsir 2024 (ControlNet-Union)",
     "one network for several condition types at once, each as good as a single-condition ControlNet",
     _matches_dedicated_net("union")),
]


def verdicts(rows: dict[str, dict]) -> list[dict]:
    """Every claim whose architecture (and ControlNet) was measured: the claim, the measurement, held or not."""
    out = []
    for name, source, claim, rule in CLAIMS:
        if name not in rows or "controlnet" not in rows:
            out.append({"architecture": name, "source": source, "claim": claim, "kit": "not measured", "held": None})
            continue
        held, text = rule(rows)
        out.append({"architecture": name, "source": source, "claim": claim, "kit": text,
                    "held": None if held is None else bool(held)})
    return out
