"""Induction heads: repeated random tokens, and how much each head attends as one does.

On `A B ... A` an induction head at the second `A` attends to the `B` after the first `A`, and
copies it (Olsson et al., 2022). On a random run of `half` tokens followed by itself, token
`half + i` can be predicted only by attending to position `i + 1`: the pattern's stripe
`half - 1` below the diagonal. A head's induction score is its mean attention on that stripe,
over the second half's positions (TransformerLens's demos compute the same).

Shapes: B batch, T = 2 * half tokens, L layers, H heads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.interp.cache import run_with_cache
from jaxgpt.nn.model import GPTModel


def repeated_tokens(batch: int, half: int, vocab: int, seed: int = 0) -> np.ndarray:
    """`[B, 2 * half]` int32: `half` random ids in `[0, vocab)`, then the same again."""
    if half < 2 or vocab < 2 or batch < 1:
        raise ValueError(f"need batch >= 1, half >= 2 and vocab >= 2, got batch {batch}, "
                         f"half {half}, vocab {vocab}")
    first = np.random.default_rng(seed).integers(0, vocab, (batch, half), dtype=np.int32)
    return np.concatenate([first, first], axis=1)


def repeated_runs(runs: int, min_half: int, max_half: int, vocab: int, seed: int = 0, *,
                  copies: int = 2, max_gap: int = 0) -> np.ndarray:
    """A stream `[N]` int32 of `runs` random runs, each followed by `copies - 1` copies of
    itself, of lengths drawn from `[min_half, max_half]`: the repeat's offset varies, so a
    model can predict a repeated token only by finding its earlier copy (by content), not by
    position. `max_gap > 0` puts 0 to `max_gap` random ids before each copy, so that no fixed
    distance finds the copy even within one run length."""
    if not 1 <= min_half <= max_half or vocab < 2 or runs < 1 or copies < 2 or max_gap < 0:
        raise ValueError(f"need runs >= 1, 1 <= min_half <= max_half, vocab >= 2, copies >= 2 "
                         f"and max_gap >= 0, got runs {runs}, min_half {min_half}, max_half "
                         f"{max_half}, vocab {vocab}, copies {copies}, max_gap {max_gap}")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_half, max_half + 1, runs)
    parts = [rng.integers(0, vocab, n, dtype=np.int32) for n in lengths]
    units = []
    for p in parts:
        unit = [p]
        for _ in range(copies - 1):
            if max_gap:  # drawn only when asked for: without gaps the stream is as it was
                unit.append(rng.integers(0, vocab, int(rng.integers(0, max_gap + 1)),
                                         dtype=np.int32))
            unit.append(p)
        units.append(np.concatenate(unit))
    return np.concatenate(units)


def induction_stripe(pattern: jax.Array, half: int) -> jax.Array:
    """The attention of each second-half query `q` on the token after its earlier copy,
    `q - half + 1`: `pattern` `[..., T, T]` -> `[..., half]`."""
    queries = jnp.arange(half, 2 * half)
    return pattern[..., queries, queries - half + 1]


def induction_scores(params: Any, cfg: GPTConfig, tokens: Any, *,
                     model: GPTModel | None = None) -> jax.Array:
    """Each head's mean attention on the induction stripe over repeated `tokens`
    `[B, 2 * half]` (see `repeated_tokens`): `[L, H]`, in [0, 1]."""
    half = np.shape(tokens)[-1] // 2
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(cfg.n_layers)]
    _, cache = run_with_cache(params, cfg, tokens, names=names, model=model)
    return jnp.stack([induction_stripe(cache[n], half).mean(axis=(0, 2)) for n in names])
