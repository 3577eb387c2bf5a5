"""jaxgpt: the GPT of "Build a Large Language Model From Scratch" (chapter 4) in JAX/Flax.

The public face: the config, the model and its parts, generation and the tokenizer. The rest
lives by concern in `jaxgpt.nn`, `jaxgpt.inference`, `jaxgpt.training`, `jaxgpt.io`,
`jaxgpt.interp`, `jaxgpt.aot`, `jaxgpt.book` and `jaxgpt.cli`.
"""

from jaxgpt.native_logs import quiet_native_logs

with quiet_native_logs():  # jax loads its CUDA plugin, which logs when it finds no GPU
    import jax  # noqa: F401

from jaxgpt.config import GPT_CONFIG_124M, PRESETS, GPTConfig
from jaxgpt.inference import (
    GenerationConfig,
    Generator,
    generate,
    generate_stream,
    generate_text_simple,
)
from jaxgpt.nn import (
    GELU,
    FeedForward,
    GPTModel,
    LayerNorm,
    Linear,
    MultiHeadAttention,
    TransformerBlock,
    count_params,
    init_params,
    param_shapes,
    size_mb,
)
from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

__version__ = "0.1.0"

__all__ = [
    "GELU",
    "GPT_CONFIG_124M",
    "PRESETS",
    "FeedForward",
    "GPTConfig",
    "GPTModel",
    "GenerationConfig",
    "Generator",
    "LayerNorm",
    "Linear",
    "MultiHeadAttention",
    "TransformerBlock",
    "count_params",
    "generate",
    "generate_stream",
    "generate_text_simple",
    "get_tokenizer",
    "init_params",
    "param_shapes",
    "size_mb",
    "text_to_token_ids",
    "token_ids_to_text",
]
