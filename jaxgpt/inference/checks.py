"""Checks of the arguments every generation entry point takes, before anything is traced."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxgpt.config import GPTConfig


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
        raise ValueError(
            f"{name} holds token id {bad}, outside the vocabulary [0, {cfg.vocab_size})")
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

