"""The KV cache that `GPTModel` reads and writes during cached decoding.

Per layer, keys and values are `[B * H, S, Dh]`, plus each slot's position `[B, S]`. A new
token's keys and values are written in place, and attention reads the cache as it is, as a
batched matrix-vector product over the B * H (row, head) pairs. Batch and heads are merged
because XLA:CPU otherwise reshapes the updated cache for the dot, which copies every layer's
cache twice per step.

Shapes: B batch, S cache slots, H heads, Dh = D // H.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig


class KVCache(NamedTuple):
    """Per layer, keys and values `[B * H, S, Dh]`; `pos` `[B, S]` each slot's position
    (-1: nothing written there, or padding)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    pos: jax.Array


def init_cache(cfg: GPTConfig, batch: int, slots: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache of `slots` positions per row (every slot invalid)."""
    shape = (batch * cfg.n_heads, slots, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    return KVCache(zeros, zeros, jnp.full((batch, slots), -1, jnp.int32))

