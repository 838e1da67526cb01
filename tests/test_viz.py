"""Figures read without the code at the size the README shows them: every figure function of cnkit.viz, drawn
with data of the full profile's size, has no text under 9 px once scaled to the README's width; never-converged
runs are not drawn as bars; displayed numbers are rounded."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cnkit import viz  # noqa: E402

RNG = np.random.default_rng(0)
STEPS = list(range(0, 601, 25))
ARCHS = ["controlnet", "control-lora", "controlnet-xs", "t2i-adapter", "controlnext", "union"]


def _telemetry():
    sizes = [16] * 3 + [8] * 3 + [4] * 3 + [2] * 4 + [16]
    names = [f"controlnet_down_blocks.{i}" for i in range(12)] + ["controlnet_mid_block",
                                                                   "controlnet_cond_embedding.conv_out"]
    t = {k: [] for k in ("step", "connection", "latent_size", "name", "weight_mean_abs", "residual_rms")}
    for s in range(0, 601, 10):
        for c in range(14):
            for k, v in (("step", s), ("connection", c), ("latent_size", sizes[c]), ("name", names[c]),
                         ("weight_mean_abs", 1e-3 * s / 600 * (c + 1)), ("residual_rms", 0.1 * s / 600 * (c + 1))):
                t[k].append(v)
    return t


def _fidelity():
    return list(np.clip(np.linspace(0.3, 0.9, len(STEPS)) + RNG.normal(0, 0.03, len(STEPS)), 0, 1))


def _curve(label):
    return {"label": label, "steps": STEPS, "fidelity": _fidelity(), "converged_at_step": 300,
            "loss_steps": list(range(1, 601)), "loss": list(np.exp(RNG.normal(-4, 0.5, 600)))}


FIGURES = {
    "growth_curves": lambda: viz.growth_curves(_telemetry()),
    "growth_heatmap": lambda: viz.growth_heatmap(_telemetry()),
    "growth_by_latent_size": lambda: viz.growth_by_latent_size(_telemetry()),
    "connections": lambda: viz.connections_figure([
        {"connection": c, "channels": 32 * (1 + c // 3), "latent_size": [16, 8, 4, 2, 2][c // 3] if c < 12 else 2,
         "sd_latent_size": 64, "kind": "middle" if c == 12 else "down"} for c in range(13)]),
    "convergence": lambda: viz.convergence_figure(
        [_curve(f"seed {s}") for s in range(3)] + [_curve("seed 0, uniform timesteps (the paper's)")], 0.8,
        "disc_iou"),
    "spread_curves": lambda: viz.spread_curves({v: [(STEPS, _fidelity()) for _ in range(3)]
                                                for v in ("zero", "gaussian", "lite")}, 0.8, "disc_iou"),
    "spread_panels": lambda: viz.spread_panels(
        {f"{t} task": {a: [(STEPS, _fidelity()) for _ in range(3)] for a in ARCHS} for t in ("fill", "segmentation")},
        "condition fidelity", thresholds={"fill task": 0.8}, ylim=(0, 1)),
    "grouped_bars": lambda: viz.grouped_bars(
        {v: {s: list(RNG.uniform(0, 1, 3)) for s in ("none", "insufficient", "conflicting", "perfect")}
         for v in ("zero", "gaussian", "lite")}, "condition fidelity (disc IoU)", "3 seeds, 32 outlines; dots: seeds"),
    "hbar_panels": lambda: viz.hbar_panels(
        {"trainable parameters (millions)": {a: [RNG.uniform(0.05, 1.5)] for a in ARCHS},
         "fill: step it converged at, per seed": {a: [175, None, None] for a in ARCHS}},
        log_panels=("trainable parameters (millions)",), never_at={"fill: step it converged at, per seed": 600}),
    "cfg_forms": lambda: viz.cfg_forms_figure(
        {m: {f: list(RNG.uniform(0, 1, 3)) for f in ("a", "b", "c", "d", "e", "f")}
         for m in ("condition fidelity (disc IoU; higher: the disc is where the outline is)",
                   "saturation above the true images' (HSV, 0-1)", "distance from the palette (RGB, 0-441)")},
        {}, "no prompt; 3 nets"),
    "image_grid": lambda: viz.image_grid([[np.zeros((64, 64, 3), np.uint8)] * 6] * 13, ["a"] * 6,
                                         ["zero, insufficient"] * 13, cell=1.0),
    "loss": lambda: viz.loss_figure(list(range(45)), list(np.exp(RNG.normal(-3, 0.3, 45)))),
}


@pytest.mark.parametrize("name", FIGURES)
def test_no_text_under_9_px_where_the_readme_shows_the_figure(name):
    fig = FIGURES[name]()
    try:
        assert viz.smallest_text_px(fig) >= viz.MIN_TEXT_PX
    finally:
        plt.close(fig)


def test_a_run_that_never_converged_is_not_a_bar():
    fig = viz.hbar_panels({"step converged": {"a": [175, 200, 225], "b": [600, None, None]}},
                          never_at={"step converged": 600}, columns=1)
    ax = fig.axes[0]
    bars = [p for p in ax.patches if p.get_width() > 0]
    assert len(bars) == 1 and bars[0].get_width() == 200  # a's median; b (never on 2 of 3 seeds) has none
    assert any("never: 2 of 3" in t.get_text() for t in ax.texts)
    plt.close(fig)


def test_displayed_numbers_are_rounded():
    assert viz.rounded({"a": 0.012228894668320814, "b": [1234567.0, 3], "c": "x", "d": None}) == {
        "a": 0.0122, "b": [1230000.0, 3], "c": "x", "d": None}
    assert viz.smoothed([1, 3, 5, 7], 2).tolist() == [1, 2, 4, 6]
