"""The model: the book's GPT in Flax linen, the only forward pass of jaxgpt.

- `layers`: `LayerNorm`, `GELU`, `Linear`, `FeedForward`.
- `attention`: `MultiHeadAttention`, the `AttentionMask` it reads and the `LayerOutput` it
  returns.
- `model`: `TransformerBlock`, `GPTModel` and the `Output` of its cached decoding,
  `apply_method` (a method applied, typed as the method), parameter initialisation and counts.
- `cache`: the `KVCache` that cached decoding passes through the model.
- `layout`: decode-time weight layouts (`Layout`, `prepare`), a parameter transform.
- `quant`: int8 matrices with float scales (`quantize_params`), and the products that read
  them (`matmul`, `QuantEmbed`): quantized decoding, a parameter transform too.

Never imports torch, training, inference or the command line.
"""

from jaxgpt.nn.attention import AttentionMask, LayerOutput, MultiHeadAttention
from jaxgpt.nn.cache import KVCache, init_cache
from jaxgpt.nn.layers import GELU, FeedForward, LayerNorm, Linear, gelu, layer_norm
from jaxgpt.nn.layout import Layout, prepare
from jaxgpt.nn.model import (
    REMAT_MODES,
    GPTModel,
    Output,
    TransformerBlock,
    apply_method,
    count_params,
    init_params,
    model_for,
    nbytes,
    param_shapes,
    quantized_shapes,
    size_mb,
)
from jaxgpt.nn.quant import quantize_params

__all__ = [
    "GELU",
    "REMAT_MODES",
    "AttentionMask",
    "FeedForward",
    "GPTModel",
    "KVCache",
    "LayerNorm",
    "LayerOutput",
    "Layout",
    "Linear",
    "MultiHeadAttention",
    "Output",
    "TransformerBlock",
    "apply_method",
    "count_params",
    "gelu",
    "init_cache",
    "init_params",
    "layer_norm",
    "model_for",
    "nbytes",
    "param_shapes",
    "prepare",
    "quantize_params",
    "quantized_shapes",
    "size_mb",
]
