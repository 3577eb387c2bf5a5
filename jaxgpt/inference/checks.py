"""Checks of the arguments every generation entry point takes, before anything is traced."""

from __future__ import annotations

import os
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


# Slots, positions and steps are int32 in the decoding programs.
INT32_MAX = 2**31 - 1
TOKEN_BYTES = 4  # an int32 token id


def device_memory(device: jax.Device) -> int | None:
    """Bytes the device can hold: an accelerator's allocator limit; for a CPU the least of the
    host's RAM, the process's address-space limit (`ulimit -v`) and its cgroup's memory limit
    (None when none is known)."""
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform != "cpu":
        return None
    known = [b for b in (physical_memory(), address_space_limit(), cgroup_memory_limit()) if b]
    return min(known) if known else None


def physical_memory() -> int | None:
    """The host's RAM in bytes, if the OS says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def address_space_limit() -> int | None:
    """The process's soft RLIMIT_AS in bytes (None if unlimited or unknown): a buffer past it
    makes XLA's allocation fail inside the compiled loop, where it cannot be reported."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, AttributeError, ValueError, OSError):
        return None
    return None if soft == resource.RLIM_INFINITY or soft <= 0 else int(soft)


def cgroup_memory_limit(path: str = "/sys/fs/cgroup/memory.max") -> int | None:
    """The cgroup v2 memory limit in bytes (None for "max" or where there is none)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def max_new_slots(rows: int, prompt_slots: int, memory: int | None) -> int:
    """The most new-token slots (a power of two) a token buffer of `rows` rows can have: its
    slots must be int32 indices, and the loop's buffer and its update (2 copies of `rows` x
    slots int32) must fit in half of `memory`."""
    limit = 1 << 62
    while limit > 1 and (prompt_slots + limit > INT32_MAX or (
            memory is not None and 2 * rows * (prompt_slots + limit) * TOKEN_BYTES > memory // 2)):
        limit >>= 1
    return limit


def check_new_tokens(max_new_tokens: int, rows: int, prompt_slots: int, new_slots: int,
                     device: jax.Device | None = None, name: str = "max_new_tokens") -> None:
    """ValueError naming the limit if the token buffer of `rows` rows of `prompt_slots +
    new_slots` slots (`new_slots`: `max_new_tokens` rounded up) cannot be held: beyond int32
    indices, or past half of `device`'s memory (default: the first local device)."""
    device = device if device is not None else jax.local_devices()[0]
    memory = device_memory(device)
    limit = max_new_slots(rows, prompt_slots, memory)
    if new_slots <= limit:
        return
    where = (f"half of the {memory / 2**30:.1f} GiB {device.platform} memory this process may use"
             if memory else "int32")
    raise ValueError(
        f"{name} {max_new_tokens:,} is more than the token buffer can hold: at most "
        f"{limit:,} for {rows} row(s) here (the buffer keeps every new token, rounded up to a "
        f"power of two, and must fit {where})"
    )

