"""Activations of any hook point, streamed from the model in shuffled batches, for training SAEs.

    store = ActivationStore(params, cfg, tokens, ["blocks.6.hook_resid_pre"])
    batch = store.next_batch()            # {"blocks.6.hook_resid_pre": [4096, 768]}
    store.position                        # StorePosition(epoch, buffer, batch): resume here

The token stream is cut into context windows of `context_size` tokens (`tokens[w * T : (w + 1)
* T]`, the tail shorter than a window left out). Each epoch visits the windows in the order of
`np.random.default_rng([seed, epoch]).permutation(W)`, a buffer of them at a time: the model
runs once over a buffer's windows (`store_batch_size_prompts` at a time, to the last block a
hook needs: `stop_at_layer`; for `blocks.{n}.hook_resid_pre`, blocks 0..n-1), which leaves
every hook's activations on the device, one row per token, and a permutation of those rows
drawn on the device (key `fold_in(fold_in(key(seed), epoch), buffer)`) cuts them into batches
by one gather each. So every row of an epoch is served once (the rows of a buffer that do not
fill a last batch are left out: none when `n_batches_in_buffer * train_batch_size_tokens` is a
multiple of `context_size`), rows of different windows and places in the corpus are mixed, and
no copy of the buffer is made.

sae-lens fills a buffer on the host and mixes it with the last one (`mixing_buffer`: a
concatenation, a random permutation and a copy of half the buffer for every half served),
which the issue measured at over half its run time; here the only work per batch is its
gather. Hook points with a head axis (`attn.hook_z`, `hook_q`, ...) give rows of `H * Dh`
features, as sae-lens flattens `hook_z`; points that are not one vector per token (attention
scores and patterns) are refused.

Memory: the buffer (`rows * sum(d_in) * itemsize`) and the model's activations of one forward
chunk; `store_memory` states both (docs/performance.md has the peak for 124M at layer 6).

Shapes: W windows, T context_size, P store_batch_size_prompts, B train_batch_size_tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from jax import lax

from jaxgpt import sharding
from jaxgpt.config import GPTConfig
from jaxgpt.interp.cache import flatten_sown, hooked_model
from jaxgpt.nn.hooks import hook_points
from jaxgpt.nn.model import GPTModel
from jaxgpt.sae.splice import check_point, stop_layer
from jaxgpt.sae.train_config import SAETrainConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def hook_widths(cfg: GPTConfig, names: Sequence[str]) -> dict[str, int]:
    """Each hook's row width (d_in): its activation's size per token (H * Dh for `hook_z`);
    a ValueError in one line for a name that is not a point with one vector per token."""
    return {name: check_point(cfg, name) for name in names}


def _chunk_acts(params: Any, tokens: jax.Array, *, model: GPTModel, names: tuple[str, ...],
                stop: int | None) -> dict[str, jax.Array]:
    """The hooks' activations of windows `tokens [P, T]`, as rows `[P * T, d_in]`."""
    variables = {"params": params}
    if stop is None:
        out, state = model.apply(variables, tokens, mutable=["intermediates"])
    else:
        out, state = model.apply(variables, tokens, stop_at_layer=stop, method=GPTModel.hidden,
                                 mutable=["intermediates"])
    acts = dict(flatten_sown(state.get("intermediates", {})))
    if stop is not None:  # the model stopped before this block: its input is the output
        acts[f"blocks.{stop}.hook_resid_pre"] = out
    rows = tokens.shape[0] * tokens.shape[1]
    return {name: acts[name].reshape(rows, -1) for name in names}


@functools.partial(jax.jit, static_argnames=("model", "names", "stop"))
def buffer_forward(params: Any, windows: jax.Array, *, model: GPTModel, names: tuple[str, ...],
                   stop: int | None) -> dict[str, jax.Array]:
    """The hooks' activations of a buffer's windows `[C, P, T]`, chunk by chunk (`lax.map`:
    one chunk's model activations at a time): `{name: [C, P * T, d_in]}`."""
    return lax.map(functools.partial(_chunk_acts, params, model=model, names=names, stop=stop),
                   windows)


@functools.partial(jax.jit, static_argnames=("batch", "out_sharding"))
def _take(buffers: dict[str, jax.Array], perm: jax.Array, b: jax.Array, *, batch: int,
          out_sharding: Any = None) -> dict[str, jax.Array]:
    """Batch `b`: the rows `perm[b * batch : (b + 1) * batch]` of every buffer, `[batch, d]`."""
    idx = lax.dynamic_slice(perm, (b * batch,), (batch,))
    out = {}
    for name, buf in buffers.items():
        per_chunk = buf.shape[1]  # rows of one chunk; row r is [r // per_chunk, r % per_chunk]
        rows = buf[idx // per_chunk, idx % per_chunk]
        out[name] = rows if out_sharding is None else lax.with_sharding_constraint(
            rows, out_sharding)
    return out


@functools.partial(jax.jit, static_argnames=("rows",))
def _permutation(key: jax.Array, *, rows: int) -> jax.Array:
    return jax.random.permutation(key, rows).astype(jnp.int32)


@dataclass(frozen=True)
class StorePosition:
    """Where an `ActivationStore` stands: the next batch is batch `batch` of buffer `buffer` of
    epoch `epoch`."""

    epoch: int = 0
    buffer: int = 0
    batch: int = 0

    def to_array(self) -> np.ndarray:
        return np.array([self.epoch, self.buffer, self.batch], np.int64)

    @classmethod
    def from_array(cls, a: npt.ArrayLike) -> StorePosition:
        e, buf, b = (int(v) for v in np.asarray(a))
        return cls(e, buf, b)


class ActivationStore:
    """Shuffled batches `{hook_name: [B, d_in]}` of the model's activations over `tokens`.

    Args:
      params, cfg: the model's weights and config.
      tokens: ids `[N]` (any integer dtype; a memory map is read a buffer's windows at a time).
      hook_names: the hook points to read (full TransformerLens names).
      tc: the run's settings: `context_size`, `train_batch_size_tokens`, `n_batches_in_buffer`,
        `store_batch_size_prompts`, `seed`, `dtype` (of the model's computation).
      mesh: split the model's windows and the batches' rows over its `data` axis.
      position: where to start (a resumed run's `position`).
    """

    def __init__(self, params: Any, cfg: GPTConfig, tokens: np.ndarray,
                 hook_names: Sequence[str], tc: SAETrainConfig, *,
                 mesh: jax.sharding.Mesh | None = None, position: StorePosition | None = None):
        names = tuple(dict.fromkeys(hook_names))
        if not names:
            raise ValueError("give at least one hook name to read")
        self.widths = hook_widths(cfg, names)  # checks the names
        tokens = np.asarray(tokens) if not isinstance(tokens, np.memmap) else tokens
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D [N], got shape {tokens.shape}")
        t, b = tc.context_size, tc.train_batch_size_tokens
        if t > cfg.context_length:
            raise ValueError(f"context_size {t} is more than the model's context_length "
                             f"{cfg.context_length}")
        self.num_windows = len(tokens) // t
        if self.num_windows * t < b:
            raise ValueError(f"{len(tokens):,} tokens make {self.num_windows} window(s) of "
                             f"{t}: fewer rows than one batch of {b}; give more tokens or a "
                             f"smaller train_batch_size_tokens")
        self.params, self.cfg, self.tokens, self.names, self.tc = params, cfg, tokens, names, tc
        self.mesh = mesh
        self.buffer_windows = min(-(-tc.n_batches_in_buffer * b // t), self.num_windows)
        prompts = min(tc.store_batch_size_prompts, self.buffer_windows)
        if mesh is not None and prompts % mesh.shape[sharding.DATA]:
            raise ValueError(f"store_batch_size_prompts ({prompts}) must be divisible by the "
                             f"{mesh.shape[sharding.DATA]} devices")
        self.prompts = prompts
        self.chunks = -(-self.buffer_windows // prompts)
        model, _ = hooked_model(cfg, None, (), names)
        self.model = model.clone(dtype=_DTYPES[tc.dtype])
        self.stop = stop_layer(names)
        self.position = position or StorePosition()
        self._loaded: tuple[int, int] | None = None  # (epoch, buffer) held on the device
        self._buffers: dict[str, jax.Array] = {}
        self._perm: jax.Array | None = None
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def buffers_per_epoch(self) -> int:
        return -(-self.num_windows // self.buffer_windows)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The windows in the order epoch `epoch` visits them, `[W]`."""
        if self._order is None or self._order[0] != epoch:
            order = np.random.default_rng([self.tc.seed, epoch]).permutation(self.num_windows)
            self._order = (epoch, order)
        return self._order[1]

    def buffer_windows_of(self, epoch: int, buffer: int) -> np.ndarray:
        """The window indices of buffer `buffer` of epoch `epoch`."""
        bw = self.buffer_windows
        return self.epoch_order(epoch)[buffer * bw:(buffer + 1) * bw]

    def batches_in(self, epoch: int, buffer: int) -> int:
        """The batches buffer `buffer` of epoch `epoch` serves."""
        rows = len(self.buffer_windows_of(epoch, buffer)) * self.tc.context_size
        return rows // self.tc.train_batch_size_tokens

    def window_tokens(self, windows: np.ndarray) -> np.ndarray:
        """The token ids `[len(windows), T]` (int32) of the given windows."""
        t = self.tc.context_size
        rows = np.asarray(windows, np.int64)[:, None] * t + np.arange(t)
        return np.asarray(self.tokens[rows], np.int32)

    def _load(self, epoch: int, buffer: int) -> None:
        """Run the model over buffer `buffer` of epoch `epoch` and draw its permutation."""
        windows = self.buffer_windows_of(epoch, buffer)
        ids = np.zeros((self.chunks * self.prompts, self.tc.context_size), np.int32)
        ids[:len(windows)] = self.window_tokens(windows)  # the padding rows are never served
        chunked: Any = ids.reshape(self.chunks, self.prompts, -1)
        self._buffers = {}  # the old buffer goes before the new one is made
        if self.mesh is not None:
            spec = jax.sharding.PartitionSpec(None, sharding.DATA)
            chunked = jax.device_put(chunked, jax.sharding.NamedSharding(self.mesh, spec))
        self._buffers = buffer_forward(self.params, jnp.asarray(chunked), model=self.model,
                                       names=self.names, stop=self.stop)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.tc.seed), epoch), buffer)
        self._perm = _permutation(key, rows=len(windows) * self.tc.context_size)
        self._loaded = (epoch, buffer)

    def _advance(self, pos: StorePosition) -> StorePosition:
        """The position after `pos`, skipping buffers too small for a batch."""
        e, buf, b = pos.epoch, pos.buffer, pos.batch + 1
        while b >= self.batches_in(e, buf):
            e, buf, b = (e, buf + 1, 0) if buf + 1 < self.buffers_per_epoch else (e + 1, 0, 0)
        return StorePosition(e, buf, b)

    def next_batch(self) -> dict[str, jax.Array]:
        """The next batch, `{hook_name: [B, d_in]}`; advances `position`."""
        pos = self.position
        if pos.batch >= self.batches_in(pos.epoch, pos.buffer):  # e.g. a last, small buffer
            pos = self._advance(StorePosition(pos.epoch, pos.buffer, pos.batch - 1))
        if self._loaded != (pos.epoch, pos.buffer):
            self._load(pos.epoch, pos.buffer)
        out_sh = None if self.mesh is None else sharding.batch_sharding(self.mesh)
        assert self._perm is not None
        batch = _take(self._buffers, self._perm, jnp.int32(pos.batch),
                      batch=self.tc.train_batch_size_tokens, out_sharding=out_sh)
        self.position = self._advance(pos)
        return batch

    def __iter__(self) -> ActivationStore:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        return self.next_batch()

    def buffer_rows(self) -> dict[str, jax.Array]:
        """The current buffer's rows in their unshuffled order, `{name: [rows, d_in]}` (the
        buffer of `position` is loaded first): what resampling draws its inputs from."""
        pos = self.position
        if self._loaded != (pos.epoch, pos.buffer):
            self._load(pos.epoch, pos.buffer)
        assert self._perm is not None
        n = self._perm.shape[0]
        return {k: v.reshape(-1, v.shape[-1])[:n] for k, v in self._buffers.items()}

    def memory(self) -> dict[str, int]:
        """`store_memory` of this store."""
        return store_memory(self.params, self.cfg, self.names, self.tc)


def store_memory(params: Any, cfg: GPTConfig, hook_names: Sequence[str],
                 tc: SAETrainConfig) -> dict[str, int]:
    """Bytes an `ActivationStore` holds on the device, from the compiled forward program:

    - `buffer`: the activations of a buffer's windows (rows * sum of d_in * itemsize);
    - `forward_temp`: the model's activations while it runs one chunk of windows (XLA's
      temporaries of the buffer's program);
    - `batch`: one batch's rows;
    - `total`: their sum (the model's weights, `params`, come on top).
    """
    names = tuple(dict.fromkeys(hook_names))
    widths = hook_widths(cfg, names)
    t = tc.context_size
    buffer_windows = -(-tc.n_batches_in_buffer * tc.train_batch_size_tokens // t)
    prompts = min(tc.store_batch_size_prompts, buffer_windows)
    chunks = -(-buffer_windows // prompts)
    model, _ = hooked_model(cfg, None, (), names)
    model = model.clone(dtype=_DTYPES[tc.dtype])
    windows = jax.ShapeDtypeStruct((chunks, prompts, t), jnp.int32)
    compiled = buffer_forward.lower(params, windows, model=model, names=names,
                                    stop=stop_layer(names)).compile()
    analysis = compiled.memory_analysis()
    item = jnp.dtype(_DTYPES[tc.dtype]).itemsize
    buffer = chunks * prompts * t * sum(widths.values()) * item
    batch = tc.train_batch_size_tokens * sum(widths.values()) * item
    temp = int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis is not None else 0
    return {"buffer": buffer, "forward_temp": temp, "batch": batch,
            "total": buffer + temp + batch}


def all_hooks(cfg: GPTConfig) -> tuple[str, ...]:
    """Every hook point an SAE can read (one vector per token)."""
    return tuple(n for n, p in hook_points(cfg) if p.shape.split()[:2] == ["B", "T"])
