"""Greedy generation as in the seeds, jit-compiled as one call.

`generate_text_simple` keeps the seeds' semantics (crop to the last `context_size` tokens,
argmax of the last position, append) but runs as a single `lax.fori_loop` over a fixed-size
token buffer `[B, T + max_new_tokens]`, so XLA compiles it once per shape.

(The module is `generation`, not `generate`, so that `jaxgpt.generate` can be a function
without shadowing a module of the same name.)
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgpt.config import GPTConfig
from jaxgpt.model import GPTModel

# How many times each jitted entry point has been traced (a test pins re-tracing down).
TRACE_COUNTS: collections.Counter = collections.Counter()


def check_token_ids(idx: Any, cfg: GPTConfig, name: str = "idx") -> np.ndarray:
    """Validate a `[B, T]` integer batch of ids in `[0, vocab_size)`; return it as int32.

    Raises ValueError naming the problem before anything is traced.
    """
    if isinstance(idx, jax.core.Tracer):
        raise ValueError(f"{name} must be a concrete array, not a traced value")
    arr = np.asarray(idx)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, tokens], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}): give at least one prompt token")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {cfg.vocab_size})")
    return arr.astype(np.int32)


def check_count(value: Any, name: str, minimum: int = 0) -> int:
    """An int >= `minimum` (bools and floats are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def resolve_context_size(cfg: GPTConfig, context_size: Any) -> int:
    if context_size is None:
        return cfg.context_length
    size = check_count(context_size, "context_size", minimum=1)
    if size > cfg.context_length:
        raise ValueError(
            f"context_size {size} exceeds the model's context_length {cfg.context_length}"
        )
    return size


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "context_size"))
def _generate_simple(params, idx, cfg: GPTConfig, max_new_tokens: int, context_size: int):
    TRACE_COUNTS["generate_text_simple"] += 1
    b, t = idx.shape
    total = t + max_new_tokens
    window = min(total, context_size)  # tokens the model sees at each step
    model = GPTModel(cfg)
    variables = {"params": params}
    buf = jnp.zeros((b, total), jnp.int32).at[:, :t].set(idx)  # [B, T + N]

    def step(i, buf):
        length = t + i  # tokens known so far
        # The seeds' crop `idx[:, -context_size:]`. Before the buffer fills, the window starts
        # at 0 and its tail holds not-yet-written slots, which the causal mask keeps out of
        # every position we read; positions are renumbered 0..window-1 as in the reference.
        start = jnp.maximum(length - window, 0)
        ctx = lax.dynamic_slice(buf, (0, start), (b, window))  # [B, W]
        hidden = model.apply(variables, ctx, method=GPTModel.hidden)  # [B, W, D]
        last = lax.dynamic_index_in_dim(hidden, length - start - 1, axis=1, keepdims=False)
        logits = model.apply(variables, last, method=GPTModel.head)  # [B, V]
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
        return lax.dynamic_update_slice(buf, nxt[:, None], (0, length))

    return lax.fori_loop(0, max_new_tokens, step, buf)


def generate_text_simple(
    params: Any,
    cfg: GPTConfig,
    idx: Any,
    max_new_tokens: int,
    context_size: int | None = None,
) -> jax.Array:
    """Greedy decoding with the seeds' semantics, as one jit-compiled call.

    Args:
      params: jaxgpt params for `GPTModel(cfg)`.
      cfg: the model's config (static: a new config compiles anew).
      idx: int token ids `[B, T]`, equal-length prompts.
      max_new_tokens: how many tokens to append (>= 0).
      context_size: how many trailing tokens the model sees; default `cfg.context_length`.

    Returns:
      int32 `[B, T + max_new_tokens]`: the prompt followed by the generated ids.
    """
    idx = check_token_ids(idx, cfg)
    max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
    context_size = resolve_context_size(cfg, context_size)
    return _generate_simple(params, jnp.asarray(idx), cfg, max_new_tokens, context_size)
