"""Looking inside the model: attention weights and block outputs, and heatmaps of them.

`GPTModel` sows each layer's attention weights (`intermediates/trf_blocks_{i}/att/attn_weights`,
`[B, H, T, T]`) and each block's output (`intermediates/trf_blocks_{i}/out`, `[B, T, D]`); they
are kept only when the model is applied with `mutable=["intermediates"]`, and cost nothing
otherwise. matplotlib is imported only by `plot_attention`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.model import GPTModel


def intermediates(params: Any, cfg: GPTConfig, ids: Any, *,
                  model: GPTModel | None = None) -> tuple[jax.Array, dict]:
    """`(logits, intermediates)` of token ids `[B, T]`: the sown values, per block.

    `intermediates["trf_blocks_3"]["att"]["attn_weights"]` is layer 3's `[B, H, T, T]`
    attention weights (rows: queries, columns: keys); `["trf_blocks_3"]["out"]` its output.
    """
    model = GPTModel(cfg) if model is None else model
    logits, state = model.apply({"params": params}, ids, mutable=["intermediates"])
    return logits, state["intermediates"]


def attention_weights(params: Any, cfg: GPTConfig, ids: Any, *,
                      model: GPTModel | None = None) -> list[np.ndarray]:
    """Every layer's attention weights, `[B, H, T, T]` each, as NumPy arrays."""
    _, inter = intermediates(params, cfg, ids, model=model)
    return [np.asarray(inter[f"trf_blocks_{i}"]["att"]["attn_weights"])
            for i in range(cfg.n_layers)]


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
    for ax, h in zip(axes.flat, heads):
        image = ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=10)
        ax.set_xticks(range(t), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(t), labels, fontsize=8)
    fig.suptitle(f"Attention weights, layer {layer}")
    fig.supxlabel("key (the token attended to)", fontsize=9)
    fig.supylabel("query", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _label(token: str) -> str:
    """A token as an axis label: visible even when it is whitespace."""
    shown = token.replace("\n", "\\n").replace("\t", "\\t")
    return shown if shown.strip() else repr(token)
