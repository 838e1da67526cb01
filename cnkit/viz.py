"""Matplotlib figures of the kit. Functions take data (arrays, rows read from files) and return a Figure; saving
is the caller's, so notebooks and the report draw the same picture.

A figure must read without the code, at the size the README shows it: axes say what is measured, in words and
with units; legends name things as the text does; no text is smaller than 9 px where the README shows the figure
(``README_WIDTH`` px wide at most, saved at ``DPI``), which ``smallest_text_px`` measures and the tests check;
runs that never converged are drawn as such, never as a bar at the budget.
"""

from __future__ import annotations

import functools
import math
import textwrap

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter, NullFormatter

DPI = 120  # what the notebooks save figures at
README_WIDTH = 800  # px: the widest a README column shows an image (wider ones are scaled down to it)
MIN_TEXT_PX = 9  # the smallest text allowed at that size
STYLE = {"font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "xtick.labelsize": 8.5,
         "ytick.labelsize": 8.5, "legend.fontsize": 8.5, "legend.title_fontsize": 8.5, "figure.titlesize": 10}

# Telemetry columns as a reader says them.
FIELD_LABELS = {
    "weight_mean_abs": "mean |weight| of its 1x1 convolution",
    "weight_norm": "weight norm of its 1x1 convolution",
    "bias_norm": "bias norm of its 1x1 convolution",
    "grad_norm": "gradient norm",
    "residual_rms": "RMS of what it adds to the UNet\n(fixed probe batch, latent units)",
}
ENCODER_LABEL = "condition encoder's last conv\n(into the copy, not the UNet)"


def styled(fn):
    """Draw ``fn``'s figure with the kit's font sizes (text made inside keeps them)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def smallest_text_px(fig, dpi: int = DPI, shown_width: int = README_WIDTH) -> float:
    """The height in pixels of the smallest visible text of ``fig`` (saved at ``dpi`` with a tight bounding box)
    where it is shown at most ``shown_width`` px wide: what a reader of the README sees."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width_px = (fig.get_tightbbox(renderer).width + 0.2) * dpi  # savefig's tight box pads 0.1 in on each side
    scale = min(1.0, shown_width / width_px)
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes) * dpi / 72 * scale if sizes else math.inf


def rounded(value, digits: int = 3):
    """``value`` (numbers, or dicts and lists of them) with floats to ``digits`` significant digits, for display:
    a measurement printed with 17 digits claims a precision it does not have."""
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(rounded(v, digits) for v in value)
    if isinstance(value, float | np.floating) and math.isfinite(value) and value != 0:
        return float(f"{float(value):.{digits}g}")
    return value


def _legend_below(fig, axes, handles, labels, ncol: int = 3) -> None:
    """One legend for the figure, under its panels (it hides no curve)."""
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.08 + 0.055 * math.ceil(len(labels) / ncol), 1, 1))


@styled
def image_grid(rows: list[list[np.ndarray]], col_titles: list[str] | None = None,
               row_titles: list[str] | None = None, cell: float = 1.6, cell_titles: list[list[str]] | None = None):
    """A grid of HxWx3 images; ``rows[i][j]`` is drawn at row i, column j; ``cell_titles[i][j]`` above it."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    extra = 0.3 * (max(t.count("\n") for r in cell_titles for t in r) + 1) if cell_titles else 0
    # room on the left for the row titles (about 0.07 in a character at 8.5 pt)
    left = 0.07 * max((max(len(line) for line in t.split("\n")) for t in row_titles), default=0) if row_titles else 0
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols + left, (cell + extra) * n_rows + 0.4),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j], interpolation="nearest")
            else:
                ax.axis("off")
            if i == 0 and col_titles and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=9)
            if cell_titles and j < len(cell_titles[i]):
                ax.set_title(cell_titles[i][j], fontsize=8)
        if row_titles:
            axes[i][0].set_ylabel(row_titles[i], fontsize=8.5, rotation=0, ha="right", va="center")
    if row_titles:  # the titles sit left of the first column, in the room made for them
        fig.subplots_adjust(left=left / fig.get_figwidth() + 0.01, right=0.99, wspace=0.05,
                            hspace=0.35 if col_titles or cell_titles else 0.05)
    else:
        fig.tight_layout()
    return fig


@styled
def stacked_images(paths: list, titles: list[str], width: float = 7.5, height: float = 2.0):
    """Image files (sample grids) one above the other, each with its title."""
    fig, axes = plt.subplots(len(paths), 1, figsize=(width, height * len(paths)), squeeze=False)
    for ax, path, title in zip(axes[:, 0], paths, titles):
        ax.imshow(plt.imread(path))
        ax.set_title(title, fontsize=9.5)
        ax.axis("off")
    fig.tight_layout()
    return fig


@styled
def connections_figure(rows: list[dict]):
    """The ControlNet's connections into the UNet: channels per connection, coloured by latent size."""
    sizes = sorted({r["latent_size"] for r in rows}, reverse=True)
    colours = dict(zip(sizes, plt.cm.viridis(np.linspace(0.1, 0.9, len(sizes)))))
    fig, ax = plt.subplots(figsize=(6.6, 2.9))
    for r in rows:
        ax.bar(r["connection"], r["channels"], color=colours[r["latent_size"]],
               hatch="//" if r["kind"] == "middle" else None, edgecolor="k")
    ax.set_xticks([r["connection"] for r in rows])
    ax.set_xticklabels([str(r["connection"]) for r in rows])
    ax.set_xlabel("connection into the UNet (hatched: the middle block)")
    ax.set_ylabel("channels")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[s]) for s in sizes]
    labels = [f"{s}x{s} (SD 1.5: {rows[[r['latent_size'] for r in rows].index(s)]['sd_latent_size']}x"
              f"{rows[[r['latent_size'] for r in rows].index(s)]['sd_latent_size']})" for s in sizes]
    ax.legend(handles, labels, title="latent size", loc="upper left")
    fig.tight_layout()
    return fig


def _latent_colours(sizes):
    sizes = sorted(set(sizes), reverse=True)
    return dict(zip(sizes, plt.cm.viridis(np.linspace(0.1, 0.9, len(sizes)))))


def _is_encoder(name: str) -> bool:
    return "cond_embedding" in name or "conditioning" in name


def _by_connection(telemetry: dict, field: str) -> dict[int, tuple[np.ndarray, np.ndarray, int, str]]:
    """{connection: (steps, values, latent size, name)} from a telemetry table's columns."""
    conn = np.asarray(telemetry["connection"], int)
    steps, values = np.asarray(telemetry["step"]), np.asarray(telemetry[field], float)
    out = {}
    for c in sorted(set(conn)):
        m = conn == c
        first = int(np.argmax(m))
        out[c] = (steps[m], values[m], int(telemetry["latent_size"][first]), telemetry["name"][first])
    return out


@styled
def growth_curves(telemetry: dict, fields=("weight_mean_abs", "residual_rms")):
    """Per-connection curves against optimizer step, one panel per field, coloured by latent size; the condition
    encoder's last convolution is dashed."""
    fig, axes = plt.subplots(1, len(fields), figsize=(4.3 * len(fields), 3.6), squeeze=False)
    series = _by_connection(telemetry, fields[0])
    colours = _latent_colours(s[2] for s in series.values() if not _is_encoder(s[3]))
    for ax, field in zip(axes[0], fields):
        for _c, (steps, values, size, name) in _by_connection(telemetry, field).items():
            encoder = _is_encoder(name)
            ax.plot(steps, values, color="k" if encoder else colours.get(size), lw=1, ls="--" if encoder else "-")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(FIELD_LABELS.get(field, field))
        ax.set_yscale("symlog", linthresh=1e-6)
    handles = [plt.Line2D([], [], color=colours[s]) for s in colours] + [plt.Line2D([], [], color="k", ls="--")]
    labels = [f"connection at {s}x{s} latents" for s in colours] + [ENCODER_LABEL.replace("\n", " ")]
    _legend_below(fig, axes[0], handles, labels, ncol=3)
    return fig


@styled
def growth_heatmap(telemetry: dict, field: str = "residual_rms"):
    """Connection-by-step heatmap of ``field`` (log colour scale; zeros drawn at the floor)."""
    series = _by_connection(telemetry, field)
    steps = series[min(series)][0]
    grid = np.array([v for _, v, _, _ in series.values()])
    positive = grid[grid > 0]
    floor = positive.min() if positive.size else 1e-12
    fig, ax = plt.subplots(figsize=(7.2, 4.0))
    im = ax.imshow(np.maximum(grid, floor), aspect="auto", interpolation="nearest", cmap="magma",
                   norm=LogNorm(vmin=floor, vmax=max(grid.max(), floor * 10)),
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, len(series) - 0.5, -0.5))
    ax.set_yticks(range(len(series)))
    ax.set_yticklabels([f"{c}: condition encoder" if _is_encoder(s[3]) else f"{c}: {s[2]}x{s[2]}"
                        for c, s in series.items()])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("connection: latent size")
    ax.set_title("rows 0-12: into the UNet (12 skips, the middle block);\nrow 13: into the trainable copy. "
                 "Black: exactly zero.", loc="left")
    fig.colorbar(im, ax=ax, label=FIELD_LABELS.get(field, field).replace("\n", " ").replace(" (", "\n("))
    fig.tight_layout()
    return fig


@styled
def growth_by_latent_size(telemetry: dict, field: str = "residual_rms", step: int | None = None):
    """``field`` of each connection at ``step`` (default: the last) against its latent size; connections at one
    size are spread apart and numbered."""
    series = _by_connection(telemetry, field)
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    colours = _latent_colours(s[2] for s in series.values() if not _is_encoder(s[3]))
    at_size: dict[int, int] = {}
    last = None
    for c, (steps, values, size, name) in series.items():
        i = -1 if step is None else int(np.searchsorted(steps, step))
        last = int(steps[i])
        encoder = _is_encoder(name)
        k = at_size[size] = at_size.get(size, -1) + 1
        x = size * 2 ** (0.14 * (k - 1))  # the connections of one size side by side
        ax.scatter(x, values[i], color="k" if encoder else colours[size], marker="x" if encoder else "o", zorder=3)
        ax.annotate("enc." if encoder else str(c), (x, values[i]), xytext=(4, 3), textcoords="offset points",
                    fontsize=8.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(colours), [f"{s}x{s}" for s in sorted(colours)])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("latent size the connection feeds (numbers: connection; x: condition encoder)")
    ax.set_ylabel(FIELD_LABELS.get(field, field).split("\n")[0] + f"\nat step {last}")
    fig.tight_layout()
    return fig


def smoothed(values, window: int) -> np.ndarray:
    """The running mean of ``values`` over ``window`` points (shorter at the start)."""
    v = np.asarray(values, float)
    if len(v) == 0 or window <= 1:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    k = np.arange(1, len(v) + 1)
    lo = np.maximum(0, k - window)
    return (c[k] - c[lo]) / (k - lo)


@styled
def convergence_figure(runs: list[dict], threshold: float, metric: str):
    """Fidelity against optimizer step per run (raw validation points, detected step marked by a vertical line) and
    the training loss beside it (every step, faint, and its running mean). ``runs``: dicts with label, steps,
    fidelity, converged_at_step, loss_steps, loss, and optionally colour."""
    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(8.6, 3.5))
    window = 1
    for k, r in enumerate(runs):
        colour = r.get("colour", plt.cm.tab10(k))
        ax.plot(r["steps"], r["fidelity"], "o-", ms=3, color=colour, label=r["label"])
        if r.get("converged_at_step") is not None:
            ax.axvline(r["converged_at_step"], color=colour, ls=":", lw=1.2)
        window = max(1, len(r["loss"]) // 25)
        ax_loss.plot(r["loss_steps"], r["loss"], color=colour, lw=0.5, alpha=0.25)
        ax_loss.plot(r["loss_steps"], smoothed(r["loss"], window), color=colour, lw=1.4, label=r["label"])
    ax.axhline(threshold, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"condition fidelity ({METRIC_LABELS.get(metric, metric)})")
    ax.set_ylim(0, 1)
    ax.set_title(f"dotted: converged at; dashed: threshold {threshold:g}", loc="left")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss (noise-prediction MSE)")
    ax_loss.set_title(f"faint: every step; line: mean of {window} steps" if window > 1 else "every step",
                      loc="left")
    _legend_below(fig, [ax, ax_loss], *ax.get_legend_handles_labels(), ncol=min(2, len(runs)))
    return fig


# Metric names as a reader says them.
METRIC_LABELS = {"disc_iou": "disc IoU", "miou": "segmentation mIoU", "edge_f1": "edge F1"}


def _spread_on(ax, groups: dict[str, list[tuple[list, list]]]) -> None:
    """On ``ax``: per group, the mean over its runs against step, the min-max band and every run's points."""
    for k, (label, series) in enumerate(groups.items()):
        colour = plt.cm.tab10(k)
        steps = np.asarray(series[0][0], float)
        ys = np.array([np.asarray(f, float)[: len(steps)] for _, f in series])
        ax.fill_between(steps, ys.min(0), ys.max(0), color=colour, alpha=0.15, lw=0)
        ax.plot(steps, ys.mean(0), "-", color=colour, label=f"{label} ({len(series)} seed{'s' * (len(series) > 1)})")
        for y in ys:
            ax.plot(steps, y, ".", color=colour, ms=2.5, alpha=0.6)


@styled
def spread_curves(groups: dict[str, list[tuple[list, list]]], threshold: float | None, metric: str,
                  xlabel: str = "optimizer step"):
    """One line per group: the mean over its runs (seeds) of fidelity against step, with the band from the lowest
    to the highest run and every run's raw points. ``groups``: label -> [(steps, fidelity)]."""
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    _spread_on(ax, groups)
    if threshold is not None:
        ax.axhline(threshold, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"condition fidelity ({METRIC_LABELS.get(metric, metric)})")
    ax.set_title("line: mean over seeds; band: lowest to highest seed; dots: each seed"
                 + (f"; dashed: {threshold:g}" if threshold is not None else ""), loc="left")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    return fig


@styled
def spread_panels(panels: dict[str, dict[str, list[tuple[list, list]]]], ylabel: str,
                  thresholds: dict[str, float] | None = None, ylim=None, yscale: str = "linear"):
    """``spread_curves`` side by side, one panel per title (``panels``: title -> label -> [(steps, values)]), one
    legend below them."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.6), squeeze=False)
    legend = {}
    for ax, (title, groups) in zip(axes[0], panels.items()):
        _spread_on(ax, groups)
        if thresholds and title in thresholds:
            ax.axhline(thresholds[title], color="grey", lw=0.8, ls="--")
        if yscale == "symlog":  # starts at exactly zero (zero convolutions), then spans decades
            ax.set_yscale("symlog", linthresh=1e-3)
        else:
            ax.set_yscale(yscale)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab.split(" (")[0], (h, lab))
    handles = [h for h, _ in legend.values()]
    labels = [lab for lab in legend]
    fig.suptitle("line: mean over seeds; band: lowest to highest seed; dots: each seed"
                 + ("; dashed: the convergence threshold" if thresholds else ""), x=0.01, ha="left", fontsize=9)
    _legend_below(fig, axes[0], handles, labels, ncol=min(3, len(labels)))
    return fig


@styled
def grouped_bars(values: dict[str, dict[str, list[float]]], ylabel: str, title: str = "", ylim=(0, 1)):
    """Bars of the mean per (category, group), every seed's value as a dot on its bar.
    ``values``: group (e.g. variant) -> category (e.g. prompt setting) -> one value per seed."""
    groups = list(values)
    categories = list(next(iter(values.values())))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(min(6.6, 1.8 + 1.3 * len(categories)), 3.5))
    for g, group in enumerate(groups):
        x = np.arange(len(categories)) + (g - (len(groups) - 1) / 2) * width
        means = [np.mean(values[group][c]) if values[group][c] else np.nan for c in categories]
        ax.bar(x, means, width * 0.9, color=plt.cm.tab10(g), label=group, alpha=0.8)
        for xi, c in zip(x, categories):
            ax.plot([xi] * len(values[group][c]), values[group][c], "k.", ms=3)
    ax.set_xticks(np.arange(len(categories)), categories)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    fits = int(fig.get_figwidth() // (0.075 * max(len(g) for g in groups) + 0.5))  # legend entries a row holds
    ax.legend(ncol=max(1, min(3, len(groups), fits)), loc="upper left", bbox_to_anchor=(0, -0.12), frameon=False)
    fig.tight_layout()
    return fig


@styled
def hbar_panels(panels: dict[str, dict[str, list[float | None]]], log_panels=(), never_at: dict | None = None,
                columns: int = 2, formats: dict | None = None):
    """One horizontal bar chart per quantity, the names down the side (they stay readable): ``panels``: title ->
    name -> values (one per seed; the bar is their median, each value a dot, the median written beside it).
    A None value (a run that never converged) is drawn as a red x right of the panel's budget line (``never_at``:
    title -> the budget, e.g. the last step), never as a bar; a name whose seeds mostly never converged has no bar.
    ``formats``: title -> how its numbers are written (default: 3 significant digits)."""
    n = len(panels)
    rows = math.ceil(n / columns)
    names = list(dict.fromkeys(k for values in panels.values() for k in values))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, (0.32 * len(names) + 1.2) * rows),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (title, values) in zip(axes.flat, panels.items()):
        budget = (never_at or {}).get(title)
        number = (formats or {}).get(title, lambda v: f"{v:.3g}")
        y = {name: len(names) - 1 - k for k, name in enumerate(names)}
        top = max([v for vs in values.values() for v in vs if v is not None] + [budget or 0, 1e-12])
        for k, name in enumerate(names):
            if name not in values:
                ax.text(0.03, y[name], "not measured", transform=ax.get_yaxis_transform(), va="center",
                        color="grey", fontsize=8.5)
                continue
            got = [v for v in values[name] if v is not None]
            never = len(values[name]) - len(got)
            if got and len(got) * 2 > len(values[name]):
                median = float(np.median([v if v is not None else math.inf for v in values[name]]))
                ax.barh(y[name], median, 0.65, color=plt.cm.tab10(k), alpha=0.75)
                ax.text(max(got) if title not in log_panels else max(got) * 1.08, y[name],
                        f"  {number(median)}", va="center", ha="left", fontsize=8.5)
            ax.plot(got, [y[name]] * len(got), "k.", ms=4)
            if never:
                where = (budget or top) * 1.08
                ax.plot([where], [y[name]], "x", color="#b00020", ms=7, mew=1.5)
                ax.text(where, y[name], f"  never: {never} of {len(values[name])}", ha="left", va="center",
                        fontsize=8.5, color="#b00020")
        ax.set_yticks([y[nm] for nm in names], names)
        if title in log_panels:
            ax.set_xscale("log")
            ax.set_xlim(right=top * 6)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_xlim(0, top * (1.6 if budget else 1.3))  # room for the numbers and the never marks
        if budget is not None:
            ax.axvline(budget, color="grey", ls="--", lw=0.8)
            title += f"\n(dashed: the last step, {budget:g}; x: never converged)"
        ax.set_title(title, loc="left")
    fig.tight_layout()
    return fig


@styled
def cfg_forms_figure(values: dict[str, dict[str, list[float]]], labels: dict[str, str], title: str):
    """Notebook 07: per measure (panel), one horizontal bar per guidance setting (the mean over nets, each net a
    dot). ``values``: measure -> setting -> one value per net; ``labels``: setting -> its name in plain words."""
    forms = list(next(iter(values.values())))
    fig, axes = plt.subplots(1, len(values), figsize=(8.6, 0.42 * len(forms) + 1.3), sharey=True, squeeze=False)
    y = np.arange(len(forms))[::-1]
    for ax, (measure, by_form) in zip(axes[0], values.items()):
        means = [np.mean(by_form[f]) for f in forms]
        ax.barh(y, means, 0.65, color=[plt.cm.tab10(i) for i in range(len(forms))], alpha=0.8)
        for yi, f in zip(y, forms):
            ax.plot(by_form[f], [yi] * len(by_form[f]), "k.", ms=4)
        ax.set_title(textwrap.fill(measure, 26), loc="left")
        ax.axvline(0, color="k", lw=0.6)
    axes[0][0].set_yticks(y, [labels.get(f, f) for f in forms])
    fig.suptitle(title, x=0.01, ha="left", fontsize=9)
    fig.tight_layout()
    return fig


@styled
def loss_figure(steps, loss, ylabel: str = "noise-prediction MSE"):
    """A training loss against optimizer step (log scale)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    ax.plot(steps, loss, marker="o", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    fig.tight_layout()
    return fig


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 3 decimals."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]) + "\n"


def spread(values) -> str:
    """'mean (min-max over n)' of per-seed values, for tables."""
    v = np.asarray(values, float)
    return f"{v.mean():.3f} ({v.min():.3f}-{v.max():.3f}, n={len(v)})" if len(v) > 1 else f"{v.mean():.3f} (n=1)"
