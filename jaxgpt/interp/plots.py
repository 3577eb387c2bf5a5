"""Pictures of what the model computes: attention heatmaps, patching sweeps, the logit lens.
matplotlib is imported only when a picture is drawn."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def plot_attention(weights: np.ndarray, tokens: Sequence[str], path: str | os.PathLike, *,
                   layer: int, head: int | None = None) -> Path:
    """A heatmap of one layer's attention weights with the tokens on both axes.

    Args:
      weights: `[H, T, T]` (one prompt's weights for the layer).
      tokens: the T token strings, in order.
      path: the PNG to write.
      layer: the layer's index (for the title).
      head: one head to draw; None draws every head in a grid.

    Returns:
      The path written.
    """
    plt = _pyplot()
    n_heads, t, _ = weights.shape
    heads = list(range(n_heads)) if head is None else [head]
    cols = math.ceil(math.sqrt(len(heads)))
    rows = math.ceil(len(heads) / cols)
    cell = max(2.5, 0.28 * t + 1.2)  # room for one label per token
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 1.2, cell * rows + 0.6),
                             squeeze=False, layout="constrained")
    labels = [_label(s) for s in tokens]
    image = None
    for ax in axes.flat[len(heads):]:
        ax.set_visible(False)
    for ax, h in zip(axes.flat, heads, strict=False):
        image = ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=10)
        ax.set_xticks(range(t), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(t), labels, fontsize=8)
    fig.suptitle(f"Attention weights, layer {layer}")
    fig.supxlabel("key (the token attended to)", fontsize=9)
    fig.supylabel("query", fontsize=9)
    assert image is not None  # at least one head is drawn
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _label(token: str) -> str:
    """A token as an axis label: visible even when it is whitespace."""
    shown = token.replace("\n", "\\n").replace("\t", "\\t")
    return shown if shown.strip() else repr(token)


def _pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_patching(values: np.ndarray, rows: Sequence[str], columns: Sequence[str],
                  path: str | os.PathLike, *, title: str, label: str,
                  column_title: str) -> Path:
    """A heatmap of a patching sweep: `values` `[len(rows), len(columns)]` (layers by
    positions, or by heads), a diverging colour map centred at 0, each cell's value written in
    it when the grid is small enough to read."""
    plt = _pyplot()
    n_rows, n_cols = values.shape
    title_width = 0.08 * max(len(line) for line in title.split("\n")) + 1.0  # 10pt text
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * n_cols + 2.2, title_width),
                                    max(3.0, 0.36 * n_rows + 1.6)), layout="constrained")
    bound = float(np.abs(values).max()) or 1.0
    image = ax.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(n_cols), [_label(c) for c in columns], rotation=90, fontsize=8)
    ax.set_yticks(range(n_rows), rows, fontsize=8)
    ax.set_xlabel(column_title, fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    if n_rows * n_cols <= 400:
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(v) > 0.6 * bound else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label=label)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_logit_lens(top_tokens: Sequence[Sequence[str]], probs: np.ndarray,
                    rows: Sequence[str], columns: Sequence[str], path: str | os.PathLike, *,
                    title: str) -> Path:
    """The logit lens as a grid: rows are the residual stream read at each layer, columns the
    prompt's positions; each cell the most likely next token and its probability (colour)."""
    plt = _pyplot()
    n_rows, n_cols = probs.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.95 * n_cols + 2.0), max(3.0, 0.34 * n_rows + 1.6)),
                           layout="constrained")
    image = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for (r, c), p in np.ndenumerate(probs):
        ax.text(c, r, f"{_label(top_tokens[r][c])}\n{p:.2f}", ha="center", va="center",
                fontsize=6, color="white" if p > 0.6 else "black")
    ax.set_xticks(range(n_cols), [_label(c) for c in columns], rotation=90, fontsize=8)
    ax.set_yticks(range(n_rows), rows, fontsize=8)
    ax.set_xlabel("position (the token read there)", fontsize=9)
    ax.set_ylabel("residual stream", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="probability of the top token")
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
