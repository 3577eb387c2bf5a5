"""Choosing the next token from logits: greedy, or temperature -> top-k -> top-p -> sample;
and `GenerationConfig`, the settings every generation entry point takes.

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

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ConfigError

_NEG = -jnp.inf  # filtered logits; the kept set is never empty, so softmax has no NaN


class SamplingConfig(NamedTuple):
    """The static switches of the compiled loop's sampling, derived from a `GenerationConfig`
    (`GenerationConfig.sampling`), not a setting of its own: a new value compiles anew.

    `greedy` is `temperature == 0`; `top_k` is None or an int >= 1; `use_top_p` is whether
    `top_p < 1` (the value itself is a traced argument, so changing it does not recompile).
    """

    greedy: bool = True
    top_k: int | None = None
    use_top_p: bool = False


def _is_number(value: Any) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(
        value, (int, float, np.integer, np.floating))


def _is_int(value: Any) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


@dataclass(frozen=True)
class GenerationConfig:
    """How `generate`, `generate_stream` and `Generator` choose and stop: one value for all.

    Every generation entry point takes one (`config=`), or these fields as keywords, which
    build one. The fields are checked here, when it is made; the ones bounded by the
    vocabulary (`top_k`, `eos_id`) again when a call knows the model (`check_vocab`).

    Args:
      temperature: 0 for greedy, else > 0 (sampling, which needs the call's `key`).
      top_k: keep the k most likely tokens (1 <= k <= vocab_size), or None.
      top_p: keep the smallest most-likely set with probability >= top_p (0 < p <= 1), or None.
      eos_id: a row that emits it is done: it stops changing (further slots hold eos_id).
      use_cache: False recomputes every window (same greedy tokens; slow, for checking).

    With `temperature == 0` top_k and top_p change nothing (see the module docstring).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> ConfigError:
            return ConfigError("GenerationConfig", name, rule, getattr(self, name))

        if not _is_number(self.temperature):
            raise fail("temperature", "must be a number >= 0")
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise fail("temperature", "must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and not _is_int(self.top_k):
            raise fail("top_k", "must be None or an int >= 1")
        if self.top_k is not None and self.top_k < 1:
            raise fail("top_k", "must be >= 1")
        if self.top_p is not None and not _is_number(self.top_p):
            raise fail("top_p", "must be None or a number in (0, 1]")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise fail("top_p", "must be in (0, 1]")
        if self.eos_id is not None and not (_is_int(self.eos_id) and self.eos_id >= 0):
            raise fail("eos_id", "must be None or an int >= 0")
        if not isinstance(self.use_cache, (bool, np.bool_)):
            raise fail("use_cache", "must be a bool")
        # As Python numbers (numpy scalars are accepted); frozen, hence object.__setattr__.
        object.__setattr__(self, "temperature", float(self.temperature))
        for name, kind in (("top_k", int), ("top_p", float), ("eos_id", int)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "use_cache", bool(self.use_cache))

    def check_vocab(self, vocab_size: int) -> GenerationConfig:
        """This config, if its token ids fit a vocabulary of `vocab_size`; ConfigError if not."""
        if self.top_k is not None and self.top_k > vocab_size:
            raise ConfigError("GenerationConfig", "top_k",
                              f"must be in [1, {vocab_size}] (the vocabulary)", self.top_k)
        if self.eos_id is not None and self.eos_id >= vocab_size:
            raise ConfigError("GenerationConfig", "eos_id",
                              f"must be in the vocabulary [0, {vocab_size})", self.eos_id)
        return self

    @property
    def sampling(self) -> SamplingConfig:
        """The static switches of the compiled loop (a new value compiles anew)."""
        return sampling_config(self.temperature, self.top_k, self.top_p)

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)


GENERATION_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig))


def generation_config(config: GenerationConfig | None,
                      settings: dict[str, Any]) -> GenerationConfig:
    """The config of a call: `config`, or one built from the `settings` keywords.

    TypeError for a keyword that is no `GenerationConfig` field or a `config` of another type;
    ValueError for `config` and keywords together (which would win is not obvious).
    """
    unknown = sorted(set(settings) - set(GENERATION_FIELDS))
    if unknown:
        raise TypeError(f"unknown generation keyword {unknown[0]!r}: the settings are "
                        f"{', '.join(GENERATION_FIELDS)} (or config=GenerationConfig(...))")
    if config is None:
        return GenerationConfig(**settings)
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a jaxgpt.GenerationConfig or None, got {config!r}")
    if settings:
        raise ValueError(f"give config= or the keywords {', '.join(settings)}, not both: "
                         f"config.replace({', '.join(f'{k}=...' for k in settings)}) changes "
                         f"a config")
    return config


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
