"""Pictures of what the model computes: attention heatmaps. matplotlib is imported only when
a picture is drawn."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
