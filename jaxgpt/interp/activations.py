"""Looking inside the model: the sown attention weights and block outputs.

`GPTModel` sows each layer's attention weights (`intermediates/trf_blocks_{i}/att/attn_weights`,
`[B, H, T, T]`) and each block's output (`intermediates/trf_blocks_{i}/out`, `[B, T, D]`); they
are kept only when the model is applied with `mutable=["intermediates"]`, and cost nothing
otherwise.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.nn.model import GPTModel


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
