"""Hooks that change an activation: add, scale, replace, ablate (for `run_with_hooks`,
`generate`, `generate_text_simple` and the train step).

    steer = [("blocks.6.hook_resid_post", add(vector))]          # vector [D]
    generate(params, cfg, prompt, 30, hooks=steer)
    run_with_hooks(params, cfg, tokens, [("blocks.0.attn.hook_z", ablate_head(3, 12))])

Each maker returns a `jax.tree_util.Partial`: its arrays are leaves, so they are arguments of
the compiled program (`jaxgpt.nn.hooks.free_hooks`), and a new vector or scale of the same
shape reuses it. The arrays broadcast against the activation (`[B, T, D]`, `[B, T, H, Dh]`,
`[B, H, T, S]`...), so a `[D]` vector is added at every position.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Partial = jax.tree_util.Partial


def _add(vector: jax.Array, x: jax.Array, name: str) -> jax.Array:
    return x + vector


def _scale(factor: jax.Array, x: jax.Array, name: str) -> jax.Array:
    return x * factor


def _replace(value: jax.Array, where: jax.Array, x: jax.Array, name: str) -> jax.Array:
    return jnp.where(where, value, x)


def add(vector: Any) -> Partial:
    """Add `vector` (broadcast against the activation): activation steering."""
    return Partial(_add, jnp.asarray(vector))


def scale(factor: Any) -> Partial:
    """Multiply by `factor` (a number or an array that broadcasts)."""
    return Partial(_scale, jnp.asarray(factor, jnp.float32))


def replace(value: Any, where: Any = True) -> Partial:
    """`value` where `where` is true (both broadcast against the activation), the activation
    elsewhere: e.g. a clean run's activation, patched in."""
    return Partial(_replace, jnp.asarray(value), jnp.asarray(where, bool))


def ablate() -> Partial:
    """Zero the whole activation."""
    return scale(0.0)


def ablate_head(head: int, n_heads: int) -> Partial:
    """Zero head `head` of a per-head activation `[B, T, H, Dh]` (`attn.hook_q/k/v/z`, H =
    `n_heads`): on `hook_z` the head writes nothing to the residual stream."""
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n_heads:
        raise ValueError(f"head must be an int in [0, {n_heads - 1}], got {head!r}")
    keep = jnp.ones((n_heads, 1), jnp.float32).at[head].set(0.0)  # [H, 1] on [..., H, Dh]
    return scale(keep)
