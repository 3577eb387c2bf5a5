"""Checks of the arguments every generation entry point takes, before anything is traced."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.inference.decode import ProgramShape
from jaxgpt.inference.sampling import SamplingConfig


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



def param_count(cfg: GPTConfig) -> int:
    """The parameters of `GPTModel(cfg)`, from the config alone (nothing traced)."""
    d, v = cfg.emb_dim, cfg.vocab_size
    block = (3 * d * d + (3 * d if cfg.qkv_bias else 0)  # W_query, W_key, W_value
             + d * d + d  # out_proj
             + 4 * d * d + 4 * d + 4 * d * d + d  # ff: layers_0, layers_2
             + 2 * 2 * d)  # norm1, norm2
    head = 0 if cfg.tie_embeddings else v * d
    return (v + cfg.context_length) * d + cfg.n_layers * block + 2 * d + head


def _forward_bytes(cfg: GPTConfig, tokens: int, slots: int, itemsize: int) -> int:
    """One row's activations at the peak of a forward of `tokens` tokens over `slots` key
    slots: the residual stream and its shortcut, Q/K/V and then the larger of attention's
    `[H, T, S]` (float32 scores, their softmax's float32 exponentials, the weights in the
    compute dtype, the bool mask) and the feed-forward's two `[T, 4D]` (before and after GELU).
    One layer's at a time: XLA frees each layer's before the next."""
    d = cfg.emb_dim
    attention = cfg.n_heads * tokens * slots * (4 + 4 + itemsize + 1) + 2 * tokens * d * itemsize
    feed_forward = 2 * tokens * 4 * d * itemsize
    return (2 + 3) * tokens * d * itemsize + max(attention, feed_forward)


def _logits_bytes(cfg: GPTConfig, itemsize: int, sampling: SamplingConfig) -> int:
    """One row's `[V]` arrays at a step: the float32 logits (and the head's output before the
    cast, in a narrower compute dtype), the int32 indices argmax reduces over (greedy, and
    `jax.random.categorical`, an argmax too), and what sampling makes of the logits
    (`sampling.filter_logits`, `jax.random.categorical`)."""
    arrays = 2 + (itemsize < 4) * itemsize / 4
    if not sampling.greedy:
        arrays += 1 + 2  # the tempered logits; categorical's random bits and Gumbel noise
        if sampling.top_k is not None:
            arrays += 1  # the logits with what top-k drops set to -inf
        if sampling.use_top_p:
            arrays += 4  # the sorted logits, their softmax, its cumsum, the mass before
    return math.ceil(arrays * cfg.vocab_size * 4)


def generation_memory(cfg: GPTConfig, rows: int, shape: ProgramShape, dtype: Any = jnp.float32,
                      sampling: SamplingConfig | None = None, use_cache: bool = True) -> int:
    """Bytes a `generate` of `rows` rows holds at its peak on one device (an estimate).

    It counts, from the config, the compute `dtype` and the program's slots (`program_shape`):
    - the weights: the float32 params and their decode-ready copy in `dtype`
      (`nn.layout.prepare`; at most one copy, as arrays it leaves alone are shared);
    - per row, the token buffer `[P + N]` int32 twice (the loop's and its update);
    - per row, the KV cache (with `use_cache`): keys and values `[H, S, Dh]` in `dtype` per
      layer, and the slots' int32 positions;
    - per row, the larger of two peaks that never overlap (XLA reuses a dead buffer): the
      activations of the largest forward the program holds, the prefill (P tokens over S
      slots) or the window recomputed past the context or without the cache (W = min(P + N,
      C) tokens over W; compiled into the program either way), and the logits `[V]` with the
      temporaries choosing a token makes of them (`sampling`: default greedy).
    Not counted: the runtime itself, hooks' arrays and what a hook keeps. Every term but the
    weights grows with `rows`, so the most rows that fit follow from two calls.
    """
    sampling = SamplingConfig() if sampling is None else sampling
    itemsize = jnp.dtype(dtype).itemsize
    p, n, s = shape
    window = min(p + n, cfg.context_length)
    forward = _forward_bytes(cfg, window, window, itemsize)
    row = 2 * (p + n) * TOKEN_BYTES + 3 * 4  # the buffer; start, done, non-finite step
    if use_cache:
        row += 2 * cfg.n_layers * s * cfg.emb_dim * itemsize + s * 4
        forward = max(forward, _forward_bytes(cfg, p, s, itemsize))
    row += max(forward, _logits_bytes(cfg, itemsize, sampling))
    return param_count(cfg) * (4 + itemsize) + rows * row


def _gib(n: float) -> str:
    """`n` bytes in GiB, MiB or KiB, whichever has a digit before the point."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def check_generation_memory(cfg: GPTConfig, rows: int, shape: ProgramShape, *,
                            dtype: Any = jnp.float32, sampling: SamplingConfig | None = None,
                            use_cache: bool = True, devices: Sequence[jax.Device] | None = None,
                            what: str | None = None, unit: str = "rows (samples x prompts)"
                            ) -> None:
    """ValueError naming the most rows that fit if `generation_memory` of `rows` rows, split
    over `devices` (default: this process's) as `Generator` splits them, is past half of the
    memory a device may use (`device_memory`). `what` names the request (default: the rows)."""
    devices = list(jax.local_devices() if devices is None else devices)
    memory = device_memory(devices[0])
    if memory is None:
        return
    ndev = min(len(devices), rows)
    per_device = -(-rows // ndev)
    args = (shape, dtype, sampling, use_cache)
    need = generation_memory(cfg, per_device, *args)
    if need <= memory // 2:
        return
    weights = generation_memory(cfg, 0, *args)
    row = generation_memory(cfg, 1, *args) - weights
    most = max(memory // 2 - weights, 0) // row * len(devices)
    what = f"{rows:,} rows" if what is None else what
    where = f"half of the {_gib(memory)} {devices[0].platform} memory this process may use"
    if ndev > 1:
        where += " on each of its devices"
    fit = (f"at most {most:,} {unit} fit with these settings" if most else
           f"not even one row fits: the weights alone take {_gib(weights)}")
    raise ValueError(
        f"{what} would take about {_gib(need)} to generate (the weights {_gib(weights)}, then "
        f"{_gib(row)} a row for the KV cache, logits, activations and tokens), more than "
        f"{where}: {fit} ({shape.prompt_slots} prompt slots, {shape.new_slots} new-token "
        f"slots, {jnp.dtype(dtype).name})")
