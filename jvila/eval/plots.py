"""PNG charts for evaluation results: Arena ratings with their intervals, and heatmaps (SORRY-Bench fulfillment,
win rates). Headless: matplotlib's Agg backend, nothing opens a window."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_leaderboard(rows, path: str | Path, title: str = "Arena ratings (95% interval)") -> None:
    """Ratings as points with asymmetric interval bars, best first, each labelled with its rounded rating."""
    if not rows:
        raise ValueError("no leaderboard rows to plot")
    plt = _pyplot()
    x = np.arange(len(rows))
    ratings = np.array([row.rating for row in rows])
    below = np.array([row.rating - row.lower for row in rows])
    above = np.array([row.upper - row.rating for row in rows])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(rows) + 2.0), 4.5), dpi=100)
    try:
        ax.errorbar(x, ratings, yerr=[below, above], fmt="o", color="#1f77b4", ecolor="#7f7f7f", capsize=4)
        for xi, rating, top in zip(x, ratings, ratings + above):
            ax.annotate(f"{rating:.0f}", (xi, top), textcoords="offset points", xytext=(0, 4), ha="center",
                        fontsize=8)
        ax.set_xticks(x, [row.model for row in rows], rotation=30, ha="right")
        ax.set_ylabel("rating")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def plot_heatmap(matrix: np.ndarray, row_labels: list[str], col_labels: list[str], path: str | Path, *,
                 title: str = "", fmt: str = "{:.2f}", cmap: str = "RdBu_r", vmin: float = 0.0,
                 vmax: float = 1.0) -> None:
    """A labelled heatmap with each cell's value written in it; NaN cells are left blank."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix shape {matrix.shape} does not match {len(row_labels)} rows × "
                         f"{len(col_labels)} columns")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(col_labels) + 3.0), max(3.0, 0.3 * len(row_labels) + 1.5)),
                           dpi=100)
    try:
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(np.arange(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(np.arange(len(row_labels)), row_labels, fontsize=7)
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                # White on the darkest cells, black elsewhere, so every number stays readable.
                dark = (value - vmin) / (vmax - vmin) > 0.6
                ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
        fig.colorbar(image, ax=ax, fraction=0.04)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
