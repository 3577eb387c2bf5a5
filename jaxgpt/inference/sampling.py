"""Choosing the next token from logits: greedy, or temperature -> top-k -> top-p -> sample.

The order, for `temperature > 0`:

1. temperature: `logits / temperature`;
2. top-k: keep the `top_k` largest logits (ties with the k-th value are kept too);
3. top-p (nucleus): of what is left, keep the smallest set of most likely tokens whose
   probabilities (softmax of the tempered, top-k-filtered logits) sum to at least `top_p`;
   the most likely token is always kept;
4. sample from the softmax of the kept logits.

`temperature == 0` is greedy (argmax; `top_k`/`top_p` cannot change the argmax). Temperature
scaling does not change which tokens top-k keeps, but it does change top-p's set, which is why
temperature comes first (as in Hugging Face's logits warpers). With `top_k=1` sampling returns
the argmax, so it equals greedy.

Shapes: B batch, V vocab_size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -jnp.inf  # filtered logits; the kept set is never empty, so softmax has no NaN


class SamplingConfig(NamedTuple):
    """The static half of the sampling arguments (a new value compiles anew).

    `greedy` is `temperature == 0`; `top_k` is None or an int >= 1; `use_top_p` is whether
    `top_p < 1` (the value itself is a traced argument, so changing it does not recompile).
    """

    greedy: bool = True
    top_k: int | None = None
    use_top_p: bool = False


def check_sampling_args(
    temperature: Any, top_k: Any, top_p: Any, vocab_size: int
) -> tuple[float, int | None, float | None]:
    """Validate the sampling arguments; return them as Python numbers.

    Raises ValueError naming the bad value and the allowed range, before anything is traced.
    """
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(
        temperature, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    temperature = float(temperature)
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}"
        )
    if top_k is not None:
        if isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, (int, np.integer)):
            raise ValueError(f"top_k must be None or an int in [1, {vocab_size}], got {top_k!r}")
        top_k = int(top_k)
        if not 1 <= top_k <= vocab_size:
            raise ValueError(f"top_k must be in [1, {vocab_size}] (the vocabulary), got {top_k}")
    if top_p is not None:
        if isinstance(top_p, (bool, np.bool_)) or not isinstance(
            top_p, (int, float, np.integer, np.floating)
        ):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
        top_p = float(top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return temperature, top_k, top_p


def sampling_config(temperature: float, top_k: int | None, top_p: float | None) -> SamplingConfig:
    """The static part of checked sampling arguments (greedy ignores top_k/top_p)."""
    if temperature == 0.0:
        return SamplingConfig(greedy=True)
    return SamplingConfig(greedy=False, top_k=top_k, use_top_p=top_p is not None and top_p < 1.0)


def filter_logits(
    logits: jax.Array, temperature: jax.Array, top_p: jax.Array, config: SamplingConfig
) -> jax.Array:
    """Tempered logits `[B, V]` with what top-k and top-p drop set to -inf (float32).

    `temperature` and `top_p` are float scalars (top_p is read only if `config.use_top_p`).
    """
    logits = logits.astype(jnp.float32) / temperature  # [B, V]
    sorted_logits = None  # the kept logits, descending, when top-k already sorted them
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        sorted_logits = jax.lax.top_k(logits, config.top_k)[0]  # [B, k]
        logits = jnp.where(logits < sorted_logits[:, -1:], _NEG, logits)
    if config.use_top_p:
        # A token is kept while the mass of the tokens before it (most likely first) is still
        # below top_p, so the most likely token is always kept. With top-k the k sorted values
        # suffice (no sort over the whole vocabulary).
        if sorted_logits is None:
            sorted_logits = -jnp.sort(-logits, axis=-1)  # [B, V]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
        keep_sorted = mass_before < top_p
        # Threshold = the smallest kept logit; ties with it are kept too (as with top-k).
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, _NEG, logits)
    return logits


def choose_next(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    config: SamplingConfig,
) -> jax.Array:
    """Next token ids `[B]` (int32) from logits `[B, V]`: argmax, or a sample drawn with `key`."""
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_p, config)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
