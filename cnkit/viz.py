"""Matplotlib figures of the kit. Functions take data (arrays, rows read from files) and return a
Figure; saving is the caller's, so notebooks and the report draw the same picture."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np


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
