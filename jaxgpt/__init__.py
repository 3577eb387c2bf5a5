"""jaxgpt: the GPT of "Build a Large Language Model From Scratch" (chapter 4) in JAX/Flax.

The public face: the config, the model and its parts, generation and the tokenizer. The rest
lives by concern in `jaxgpt.nn`, `jaxgpt.inference`, `jaxgpt.training`, `jaxgpt.io`,
`jaxgpt.interp`, `jaxgpt.aot`, `jaxgpt.book` and `jaxgpt.cli`.
"""

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# The public face is imported on first use (PEP 562), so that `import jaxgpt` loads no jax and
# leaves the process alone, its file descriptors included: what jax's plugins print as they
# load is the caller's to keep or quiet (the `jaxgpt` command quiets it, `jaxgpt.native_logs`).


_FACE = ("config", "inference", "nn", "tokenizer")  # the modules the public names come from
_loading: list[bool] = []  # non-empty while `_load` runs


def _load() -> None:
    """Import the public face, as `import jaxgpt` once did at once."""
    _loading.append(True)
    try:
        import jaxgpt.config
        import jaxgpt.inference
        import jaxgpt.nn
        import jaxgpt.tokenizer  # noqa: F401

        for module in (sys.modules[f"jaxgpt.{name}"] for name in _FACE):
            globals().update({name: getattr(module, name) for name in __all__
                              if hasattr(module, name)})
    finally:
        _loading.pop()


def __getattr__(name: str) -> Any:
    """A public name, or a module of the public face (`jaxgpt.nn`), imported on first use."""
    if (name in __all__ or name in _FACE) and not _loading:
        _load()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
