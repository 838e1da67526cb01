"""Matplotlib figures of the kit. Functions take data (arrays, rows read from files) and return a
Figure; saving is the caller's, so notebooks and the report draw the same picture."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm


def image_grid(rows: list[list[np.ndarray]], col_titles: list[str] | None = None,
               row_titles: list[str] | None = None, cell: float = 1.6):
    """A grid of HxWx3 images; ``rows[i][j]`` is drawn at row i, column j."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows + 0.4), squeeze=False)
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
        if row_titles:
            axes[i][0].set_ylabel(row_titles[i], fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


def stacked_images(paths: list, titles: list[str], width: float = 9.0, height: float = 2.3):
    """Image files (sample grids) one above the other, each with its title."""
    fig, axes = plt.subplots(len(paths), 1, figsize=(width, height * len(paths)), squeeze=False)
    for ax, path, title in zip(axes[:, 0], paths, titles):
        ax.imshow(plt.imread(path))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


def connections_figure(rows: list[dict]):
    """The ControlNet's connections into the UNet: channels per connection, coloured by latent size."""
    sizes = sorted({r["latent_size"] for r in rows}, reverse=True)
    colours = dict(zip(sizes, plt.cm.viridis(np.linspace(0.1, 0.9, len(sizes)))))
    fig, ax = plt.subplots(figsize=(7, 2.8))
    for r in rows:
        ax.bar(r["connection"], r["channels"], color=colours[r["latent_size"]],
               hatch="//" if r["kind"] == "middle" else None, edgecolor="k")
    ax.set_xticks([r["connection"] for r in rows])
    ax.set_xticklabels([f"{r['connection']}\n{r['latent_size']}px" for r in rows], fontsize=7)
    ax.set_xlabel("connection (latent size); hatched: middle block")
    ax.set_ylabel("channels")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[s]) for s in sizes]
    labels = [f"{s}x{s} (SD: {rows[[r['latent_size'] for r in rows].index(s)]['sd_latent_size']})" for s in sizes]
    ax.legend(handles, labels, fontsize=7, title="latent size", title_fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def _latent_colours(sizes):
    sizes = sorted(set(sizes), reverse=True)
    return dict(zip(sizes, plt.cm.viridis(np.linspace(0.1, 0.9, len(sizes)))))


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


def growth_curves(telemetry: dict, fields=("weight_mean_abs", "residual_rms")):
    """Per-connection curves against optimizer step, one panel per field, coloured by latent size;
    the condition encoder's last convolution is dashed."""
    fig, axes = plt.subplots(1, len(fields), figsize=(5.2 * len(fields), 3.4), squeeze=False)
    series = _by_connection(telemetry, fields[0])
    colours = _latent_colours(s[2] for s in series.values())
    for ax, field in zip(axes[0], fields):
        for _c, (steps, values, size, name) in _by_connection(telemetry, field).items():
            encoder = "cond_embedding" in name or "conditioning" in name
            ax.plot(steps, values, color="k" if encoder else colours.get(size), lw=1, ls="--" if encoder else "-",
                    label=None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(field)
        ax.set_yscale("symlog", linthresh=1e-6)
    handles = [plt.Line2D([], [], color=colours[s]) for s in colours] + [plt.Line2D([], [], color="k", ls="--")]
    axes[0][-1].legend(handles, [f"{s}x{s} latent" for s in colours] + ["condition encoder out"], fontsize=7)
    fig.tight_layout()
    return fig


def growth_heatmap(telemetry: dict, field: str = "residual_rms"):
    """Connection-by-step heatmap of ``field`` (log colour scale; zeros drawn at the floor)."""
    series = _by_connection(telemetry, field)
    steps = series[min(series)][0]
    grid = np.array([v for _, v, _, _ in series.values()])
    positive = grid[grid > 0]
    floor = positive.min() if positive.size else 1e-12
    fig, ax = plt.subplots(figsize=(8, 3.6))
    im = ax.imshow(np.maximum(grid, floor), aspect="auto", interpolation="nearest", cmap="magma",
                   norm=LogNorm(vmin=floor, vmax=max(grid.max(), floor * 10)),
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, len(series) - 0.5, -0.5))
    ax.set_yticks(range(len(series)))
    ax.set_yticklabels([f"{c} ({s[2]}px)" for c, s in series.items()], fontsize=7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("connection (latent size)")
    fig.colorbar(im, ax=ax, label=field)
    fig.tight_layout()
    return fig


def growth_by_latent_size(telemetry: dict, field: str = "residual_rms", step: int | None = None):
    """``field`` of each connection at ``step`` (default: the last) against its latent size."""
    series = _by_connection(telemetry, field)
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    colours = _latent_colours(s[2] for s in series.values())
    for c, (steps, values, size, name) in series.items():
        i = -1 if step is None else int(np.searchsorted(steps, step))
        encoder = "cond_embedding" in name or "conditioning" in name
        ax.scatter(size, values[i], color="k" if encoder else colours[size], marker="x" if encoder else "o")
        ax.annotate(str(c), (size, values[i]), fontsize=6, xytext=(3, 0), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("latent size of the connection (px)")
    ax.set_ylabel(f"{field} at step {int(steps[-1]) if step is None else step}")
    fig.tight_layout()
    return fig


def convergence_figure(runs: list[dict], threshold: float, metric: str):
    """Fidelity against optimizer step per run (raw validation points, detected step marked by a
    vertical line) and the raw per-step training loss beside it. ``runs``: dicts with label,
    steps, fidelity, converged_at_step, loss_steps, loss, and optionally colour."""
    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(11, 3.6))
    for k, r in enumerate(runs):
        colour = r.get("colour", plt.cm.tab10(k))
        ax.plot(r["steps"], r["fidelity"], "o-", ms=3, color=colour, label=r["label"])
        if r.get("converged_at_step") is not None:
            ax.axvline(r["converged_at_step"], color=colour, ls=":", lw=1.2)
        ax_loss.plot(r["loss_steps"], r["loss"], color=colour, lw=0.5, alpha=0.8, label=r["label"])
    ax.axhline(threshold, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"condition fidelity ({metric})")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, title="dotted: converged at", title_fontsize=7)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss (raw, per step)")
    fig.tight_layout()
    return fig


def _spread_on(ax, groups: dict[str, list[tuple[list, list]]]) -> None:
    """On ``ax``: per group, the mean over its runs against step, the min-max band and every run's points."""
    for k, (label, series) in enumerate(groups.items()):
        colour = plt.cm.tab10(k)
        steps = np.asarray(series[0][0], float)
        ys = np.array([np.asarray(f, float)[: len(steps)] for _, f in series])
        ax.fill_between(steps, ys.min(0), ys.max(0), color=colour, alpha=0.15, lw=0)
        ax.plot(steps, ys.mean(0), "-", color=colour, label=f"{label} (mean of {len(series)}, band: min-max)")
        for y in ys:
            ax.plot(steps, y, ".", color=colour, ms=2.5, alpha=0.6)


def spread_curves(groups: dict[str, list[tuple[list, list]]], threshold: float | None, metric: str,
                  xlabel: str = "optimizer step"):
    """One line per group: the mean over its runs (seeds) of fidelity against step, with the band from
    the lowest to the highest run and every run's raw points. ``groups``: label -> [(steps, fidelity)]."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    _spread_on(ax, groups)
    if threshold is not None:
        ax.axhline(threshold, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"condition fidelity ({metric})")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def spread_panels(panels: dict[str, dict[str, list[tuple[list, list]]]], ylabel: str,
                  thresholds: dict[str, float] | None = None, ylim=None, yscale: str = "linear"):
    """``spread_curves`` side by side, one panel per title: ``panels``: title -> label -> [(steps, values)]."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
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
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def grouped_bars(values: dict[str, dict[str, list[float]]], ylabel: str, title: str = "", ylim=(0, 1)):
    """Bars of the mean per (category, group), every seed's value as a dot on its bar.
    ``values``: group (e.g. variant) -> category (e.g. prompt setting) -> one value per seed."""
    groups = list(values)
    categories = list(next(iter(values.values())))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(categories), 3.4))
    for g, group in enumerate(groups):
        x = np.arange(len(categories)) + (g - (len(groups) - 1) / 2) * width
        means = [np.mean(values[group][c]) if values[group][c] else np.nan for c in categories]
        ax.bar(x, means, width * 0.9, color=plt.cm.tab10(g), label=group, alpha=0.8)
        for xi, c in zip(x, categories):
            ax.plot([xi] * len(values[group][c]), values[group][c], "k.", ms=3)
    ax.set_xticks(np.arange(len(categories)), categories, fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def bar_panels(panels: dict[str, dict[str, list[float]]], log_panels=()):
    """One small bar chart per quantity, side by side: ``panels``: title -> label -> values (one per seed; the bar
    is their mean, each value a dot; None values, e.g. never converged, are left out and counted in the label)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels.items()):
        labels = list(values)
        for k, label in enumerate(labels):
            got = [v for v in values[label] if v is not None]
            if got:
                ax.bar(k, np.mean(got), 0.7, color=plt.cm.tab10(k), alpha=0.8)
                ax.plot([k] * len(got), got, "k.", ms=3)
            missing = len(values[label]) - len(got)
            if missing:
                ax.text(k, 0, f"{missing}x\nnever", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
        if title in log_panels:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=8)
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
