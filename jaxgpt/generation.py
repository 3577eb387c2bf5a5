"""Generation, each call one jit-compiled loop over a fixed-size token buffer.

- `generate_text_simple` keeps the seeds' semantics (crop to the last `context_size` tokens,
  argmax of the last position, append), recomputing the window at every step, as a single
  `lax.fori_loop` over a token buffer `[B, T + max_new_tokens]`.
- `generate` is the fast path: KV cache (prefill once, then one token per step), greedy or
  sampled (`jaxgpt.sampling`), per-row EOS, ragged prompts, and prompt lengths / token counts
  rounded up to powers of two so that few shapes are ever compiled. Its greedy tokens are the
  seeds' exactly, also past `context_length`. `generate_stream` runs the same loop in chunks.
- `Generator` holds one set of params with their decode-ready form (`kv_cache.prepare`), so
  repeated calls do not rebuild it; `generate` and `generate_stream` are thin wrappers.

Every path applies `GPTModel` (or the variant passed as `model=`): the loops here hold token
buffers, masks and positions, never a forward pass of their own.

(The module is `generation`, not `generate`, so that `jaxgpt.generate` can be a function
without shadowing a module of the same name.)
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from jaxgpt import kv_cache, sharding
from jaxgpt.config import GPTConfig
from jaxgpt.model import FeedForward, GPTModel, MultiHeadAttention, model_for
from jaxgpt.sampling import SamplingConfig, check_sampling_args, choose_next, sampling_config

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


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "context_size"))
def _generate_simple(params, idx, model: GPTModel, max_new_tokens: int, context_size: int):
    TRACE_COUNTS["generate_text_simple"] += 1
    b, t = idx.shape
    total = t + max_new_tokens
    window = min(total, context_size)  # tokens the model sees at each step
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
    *,
    model: GPTModel | None = None,
) -> jax.Array:
    """Greedy decoding with the seeds' semantics, as one jit-compiled call.

    Args:
      params: jaxgpt params for `GPTModel(cfg)`.
      cfg: the model's config (static: a new config compiles anew).
      idx: int token ids `[B, T]`, equal-length prompts.
      max_new_tokens: how many tokens to append (>= 0).
      context_size: how many trailing tokens the model sees; default `cfg.context_length`.
      model: the module to apply, for a variant (`GPTModel(cfg, attention_cls=...)`);
        default `GPTModel(cfg)`.

    Returns:
      int32 `[B, T + max_new_tokens]`: the prompt followed by the generated ids.
    """
    model = model_for(cfg, model)
    idx = check_token_ids(idx, cfg)
    max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
    context_size = resolve_context_size(cfg, context_size)
    return _generate_simple(params, jnp.asarray(idx), model, max_new_tokens, context_size)


# ---------------------------------------------------------------------------------------------
# `generate`: KV cache, sampling, EOS, ragged batches, bounded compiles, streaming.
#
# Prompts are left-padded into a token buffer `[B, P + N]` (P, N: bucketed prompt length and
# new-token count). Every row has its own first slot `start[b] = P - len[b]`, its own positions
# `slot - start[b]`, and a mask that hides the padding, so each row sees what it would see alone
# while all rows write their next token into the same slot. The prompt is prefilled once; then
# one token per step through the cache. Once a row's sequence would pass `context_length`, the
# seeds crop to the last C tokens and renumber positions 0..C-1, which invalidates every cached
# key, so from that step on each token is computed from its window again (exact, and only past
# the context). Prompts longer than C are cropped to their last C tokens up front: the seeds'
# window only moves forward, so earlier tokens are never seen again.
# ---------------------------------------------------------------------------------------------

_MIN_PROMPT_BUCKET = 8
_MIN_NEW_BUCKET = 16


class Knobs(NamedTuple):
    """The traced sampling arguments (changing them does not recompile)."""

    key: jax.Array  # PRNG key; step j samples with fold_in(key, j)
    temperature: jax.Array  # [] float32 (1 when greedy: unused)
    top_p: jax.Array  # [] float32
    eos_id: jax.Array  # [] int32, -1 for none


class DecodeState(NamedTuple):
    """The loop carry of `generate`."""

    tokens: jax.Array  # [B, P + N] int32: left-padded prompts, then the new tokens
    start: jax.Array  # [B] int32: each row's first slot (P - prompt length)
    cache: kv_cache.KVCache | tuple  # per layer [B * H, S, Dh]; () on the recomputing path
    step: jax.Array  # [] int32: index of the next new token (0-based)
    done: jax.Array  # [B] bool: the row has emitted eos_id


def bucket_length(n: int, minimum: int, cap: int | None = None) -> int:
    """The power of two >= max(n, minimum), at most `cap` (never below n)."""
    size = max(minimum, 1 << max(n - 1, 0).bit_length())
    return max(n, min(size, cap)) if cap is not None else size


def _write_next(
    state: DecodeState, logits: jax.Array, knobs: Knobs, sampling: SamplingConfig, prompt_slots: int
) -> DecodeState:
    """Choose token `state.step` for every row from logits `[B, V]`, apply EOS, store it."""
    j = state.step
    nxt = choose_next(logits, jax.random.fold_in(knobs.key, j), knobs.temperature, knobs.top_p,
                      sampling)  # [B]
    nxt = jnp.where(state.done, knobs.eos_id, nxt)
    tokens = lax.dynamic_update_slice(state.tokens, nxt[:, None], (0, prompt_slots + j))
    return state._replace(tokens=tokens, step=j + 1, done=state.done | (nxt == knobs.eos_id))


def _split_rows(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of `tree` split along its first axis over the mesh (rows, or rows * heads
    for the cache: both row-major, so each device holds whole rows)."""
    if mesh is None:
        return tree
    return jax.tree_util.tree_map(
        lambda x: lax.with_sharding_constraint(x, sharding.batch_sharding(mesh)), tree)


def _start(model, params, prompt, start, new_slots, knobs, sampling, use_cache,
           mesh=None) -> DecodeState:
    """The buffer, and with the cache: the prefilled prompt and the first new token."""
    b, p = prompt.shape
    cfg = model.cfg
    fill = jnp.maximum(knobs.eos_id, 0)  # an all-done early exit leaves eos_id behind
    tokens = jnp.concatenate([prompt, jnp.full((b, new_slots), fill, jnp.int32)], axis=1)
    state = DecodeState(tokens, start, (), jnp.int32(0), jnp.zeros((b,), bool))
    state = state._replace(**_split_rows(dict(tokens=tokens, start=start, done=state.done), mesh))
    if not use_cache:
        return state
    slots = p + min(new_slots, cfg.context_length)  # never more than cached steps can fill
    at = jnp.arange(p)[None, :]  # [1, P]
    positions = jnp.maximum(at - start[:, None], 0)  # [B, P]
    variables = {"params": params}
    cache = _split_rows(kv_cache.init_cache(cfg, b, slots, model.dtype), mesh)
    hidden, cache = model.apply(
        variables, prompt, positions=positions, valid=at >= start[:, None], cache=cache,
        slot=0, method=GPTModel.hidden,
    )  # [B, P, D]
    logits = model.apply(variables, hidden[:, -1], method=GPTModel.head)  # [B, V]
    return _write_next(state._replace(cache=cache), logits, knobs, sampling, p)


def _decode(model, params, state, stop, knobs, sampling, prompt_slots) -> DecodeState:
    """Generate tokens `state.step .. stop-1` (fewer if every row is done)."""
    b, total = state.tokens.shape
    ctx = model.cfg.context_length
    p = prompt_slots
    variables = {"params": params}

    def running(s: DecodeState, limit) -> jax.Array:
        return (s.step < limit) & ~jnp.all(s.done)

    if isinstance(state.cache, kv_cache.KVCache):
        # Token j reads position len[b] + j - 1: exact with the cache while that is < C for all.
        longest = p - jnp.min(state.start)
        cached_stop = jnp.minimum(stop, ctx - longest + 1)

        def cached_step(s: DecodeState) -> DecodeState:
            slot = p + s.step - 1  # the slot of the last known token
            last = lax.dynamic_slice_in_dim(s.tokens, slot, 1, axis=1)  # [B, 1]
            hidden, cache = model.apply(variables, last, positions=(slot - s.start)[:, None],
                                        cache=s.cache, slot=slot, method=GPTModel.hidden)
            logits = model.apply(variables, hidden[:, 0], method=GPTModel.head)  # [B, V]
            return _write_next(s._replace(cache=cache), logits, knobs, sampling, p)

        state = lax.while_loop(lambda s: running(s, cached_stop), cached_step, state)

    window = min(total, ctx)

    def window_step(s: DecodeState) -> DecodeState:
        known = p + s.step  # slots [0, known) hold tokens
        first = jnp.maximum(known - window, 0)
        row_first = jnp.maximum(s.start, known - ctx)  # [B]: the seeds' crop, per row
        at = first + jnp.arange(window)[None, :]  # [1, W]
        positions = jnp.clip(at - row_first[:, None], 0, ctx - 1)  # [B, W]
        toks = lax.dynamic_slice(s.tokens, (0, first), (b, window))  # [B, W]
        hidden = model.apply(variables, toks, positions=positions, valid=at >= row_first[:, None],
                             method=GPTModel.hidden)  # [B, W, D]
        last = lax.dynamic_index_in_dim(hidden, known - 1 - first, axis=1, keepdims=False)
        logits = model.apply(variables, last, method=GPTModel.head)  # [B, V]
        return _write_next(s, logits, knobs, sampling, p)

    return lax.while_loop(lambda s: running(s, stop), window_step, state)


_STATIC = ("model", "new_slots", "sampling", "use_cache", "mesh")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_jit(params, prompt, start, n_new, knobs, *, model, new_slots, sampling, use_cache,
                  mesh=None):
    TRACE_COUNTS["generate"] += 1
    state = _start(model, params, prompt, start, new_slots, knobs, sampling, use_cache, mesh)
    state = _decode(model, params, state, n_new, knobs, sampling, prompt.shape[1])
    return state.tokens


@functools.partial(jax.jit, static_argnames=_STATIC)
def _start_jit(params, prompt, start, knobs, *, model, new_slots, sampling, use_cache,
               mesh=None):
    TRACE_COUNTS["generate_stream"] += 1
    return _start(model, params, prompt, start, new_slots, knobs, sampling, use_cache, mesh)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "prompt_slots"),
                   donate_argnums=(1,))
def _decode_jit(params, state, stop, knobs, *, model, sampling, prompt_slots):
    TRACE_COUNTS["generate_stream"] += 1
    return _decode(model, params, state, stop, knobs, sampling, prompt_slots)


class _Batch(NamedTuple):
    rows: list[np.ndarray]  # each prompt, uncropped
    prompt: np.ndarray  # [B, P] int32, left-padded, each row cropped to its last C tokens
    start: np.ndarray  # [B] int32


def _check_prompts(prompts: Any, cfg: GPTConfig) -> tuple[list[np.ndarray], bool]:
    """`(rows, is_list)`: the prompts as int32 rows, and whether the list API was used."""
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts is an empty list: give at least one prompt")
        rows = []
        for i, row in enumerate(prompts):
            if isinstance(row, (int, np.integer)):
                raise ValueError(
                    f"prompts[{i}] is a single int ({row!r}); give a list of token-id lists, "
                    f"or an int array [batch, tokens]"
                )
            arr = np.asarray(row)
            if arr.size == 0:
                raise ValueError(f"prompts[{i}] is empty: give at least one prompt token")
            if arr.ndim != 1:
                raise ValueError(f"prompts[{i}] must be a flat list of token ids, got shape "
                                 f"{arr.shape}")
            rows.append(check_token_ids(arr[None, :], cfg, name=f"prompts[{i}]")[0])
        return rows, True
    return list(check_token_ids(prompts, cfg, name="prompts")), False


def _batch(rows: list[np.ndarray], cfg: GPTConfig) -> _Batch:
    ctx = cfg.context_length
    lengths = [min(len(r), ctx) for r in rows]
    p = bucket_length(max(lengths), _MIN_PROMPT_BUCKET, cap=ctx)
    prompt = np.zeros((len(rows), p), np.int32)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        prompt[i, p - n:] = row[len(row) - n:]
    return _Batch(rows, prompt, np.asarray([p - n for n in lengths], np.int32))


def _knobs(key, temperature, top_p, eos_id, greedy: bool) -> Knobs:
    return Knobs(
        key=key if key is not None else jax.random.PRNGKey(0),
        temperature=jnp.float32(1.0 if greedy else temperature),
        top_p=jnp.float32(1.0 if top_p is None else top_p),
        eos_id=jnp.int32(-1 if eos_id is None else eos_id),
    )


class _Call(NamedTuple):
    """One checked call: the batch, and everything the jitted loop takes."""

    rows: list[np.ndarray]
    is_list: bool
    n: int  # new tokens per row
    eos_id: int | None
    batch: _Batch | None  # None when n == 0
    sampling: SamplingConfig
    knobs: Knobs


def _check_call(cfg, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, key) -> _Call:
    rows, is_list = _check_prompts(prompts, cfg)
    n = check_count(max_new_tokens, "max_new_tokens")
    temperature, top_k, top_p = check_sampling_args(temperature, top_k, top_p, cfg.vocab_size)
    if eos_id is not None:
        eos_id = check_count(eos_id, "eos_id")
        if eos_id >= cfg.vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=jax.random.key(0)")
    if key is not None and not (isinstance(key, jax.Array) and (
            jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape == (2,))):
        raise ValueError(f"key must be a PRNG key (jax.random.key or PRNGKey), got {key!r}")
    sampling = sampling_config(temperature, top_k, top_p)
    knobs = _knobs(key, temperature, top_p, eos_id, sampling.greedy)
    return _Call(rows, is_list, n, eos_id, _batch(rows, cfg) if n else None, sampling, knobs)


def cut_after_eos(new: list[int], eos_id: int | None) -> list[int]:
    """A row's new tokens up to and including its first `eos_id` (all of them without one)."""
    return new[: new.index(eos_id) + 1] if eos_id is not None and eos_id in new else new


def _finish(call: _Call, new_tokens: np.ndarray | jax.Array):
    """The user-facing result: prompt + new tokens, as an array or as cut lists."""
    if not call.is_list:
        prompt = jnp.asarray(np.stack(call.rows))
        return jnp.concatenate([prompt, jnp.asarray(new_tokens, jnp.int32)], axis=1)
    return [[int(t) for t in row] + cut_after_eos(new, call.eos_id)
            for row, new in zip(call.rows, np.asarray(new_tokens).tolist())]


def _keeps_layout(cls: type, base: type) -> bool:
    """Whether `cls` reads its matrices as `base` does (it does not replace `__call__`)."""
    return issubclass(cls, base) and all(
        "__call__" not in vars(c) for c in cls.__mro__ if c is not base and issubclass(c, base))


class Generator:
    """Generation for one set of params: the decode-ready weights are built once and reused.

    `prepare`-ing the weights (Q/K/V fused, cast to `dtype`, and on CPU the layout XLA
    multiplies fastest at the batch size) costs a pass over all of them, about 0.1-0.3 s for
    124M on CPU; a `Generator` pays it once per batch-size class (1 row, or more) and keeps the
    result, where `jaxgpt.generate` pays it on every call. Methods take the arguments of
    `generate` and `generate_stream` after `cfg`.

    Args:
      params: jaxgpt params for `GPTModel(cfg)`.
      cfg: the model's config.
      dtype: compute dtype (e.g. jnp.bfloat16 on accelerators); logits stay float32.
      model: a variant to apply instead of `GPTModel(cfg)` (`GPTModel(cfg, attention_cls=...)`).
        Its dtype and layout are set by the generator.
      devices: the devices to split a batch over (default: this process's devices). With
        several, each decodes its share of the rows with a copy of the weights (a batch that
        does not divide is padded with copies of its last row, dropped from the result);
        the tokens are those of one device.
    """

    def __init__(self, params: Any, cfg: GPTConfig, *, dtype: Any = jnp.float32,
                 model: GPTModel | None = None, devices: Sequence[jax.Device] | None = None):
        model = model_for(cfg, model)
        self.params = params
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.devices = list(jax.local_devices() if devices is None else devices)
        if not self.devices:
            raise ValueError("devices is empty: give at least one device")
        self.model = model.clone(dtype=self.dtype, remat=False, layout=kv_cache.Layout())
        # The decode layouts read the seeds' parameter names; a part that replaces __call__
        # may not, so it gets its params as they are (cast to dtype).
        self._layouts = all(_keeps_layout(cls, base) for cls, base in (
            (model.attention_cls, MultiHeadAttention), (model.feed_forward_cls, FeedForward)))
        self._prepared: dict[tuple, Any] = {}

    def mesh(self, batch: int) -> Mesh | None:
        """The mesh a batch of `batch` rows is split over (None: one device)."""
        n = min(len(self.devices), batch)
        return sharding.make_mesh(self.devices[:n]) if n > 1 else None

    def weights(self, batch: int) -> tuple[GPTModel, Any]:
        """`(model, params)` laid out for `batch` rows (per device) on this backend, built on
        first use and kept; on several devices, replicated over `mesh(batch)`."""
        mesh = self.mesh(batch)
        rows = -(-batch // mesh.size) if mesh is not None else batch  # per device
        layout = kv_cache.Layout.for_batch(rows) if self._layouts else kv_cache.Layout()
        if (layout, mesh) not in self._prepared:
            # Eagerly, not under jit: arrays it leaves alone are passed on as they are (a jit
            # would copy them, about 0.12 s for 124M here), and XLA:CPU ran the transposes
            # about 4x slower inside the generation jit than on their own.
            params = kv_cache.prepare(self.params, self.cfg, self.dtype, layout)
            if mesh is not None:
                params = jax.device_put(params, sharding.replicated(mesh))
            self._prepared[layout, mesh] = params
        return self.model.clone(layout=layout), self._prepared[layout, mesh]

    def _place(self, batch: _Batch) -> tuple[jax.Array, jax.Array, Mesh | None]:
        """The prompt `[B', P]` and first slots `[B']`, on the devices (B' = B padded to a
        multiple of the device count with copies of the last row)."""
        mesh = self.mesh(len(batch.start))
        if mesh is None:
            return jnp.asarray(batch.prompt), jnp.asarray(batch.start), None
        pad = -len(batch.start) % mesh.size
        prompt = np.concatenate([batch.prompt, np.repeat(batch.prompt[-1:], pad, axis=0)])
        start = np.concatenate([batch.start, np.repeat(batch.start[-1:], pad)])
        rows = sharding.batch_sharding(mesh)
        return jax.device_put(prompt, rows), jax.device_put(start, rows), mesh

    def generate(
        self,
        prompts: Any,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        key: jax.Array | None = None,
        use_cache: bool = True,
    ) -> jax.Array | list[list[int]]:
        """`jaxgpt.generate` with these params (see there)."""
        call = _check_call(self.cfg, prompts, max_new_tokens, temperature, top_k, top_p, eos_id,
                           key)
        if call.n == 0:
            return _finish(call, np.zeros((len(call.rows), 0), np.int32))
        model, params = self.weights(len(call.rows))
        prompt, start, mesh = self._place(call.batch)
        tokens = _generate_jit(
            params, prompt, start, jnp.int32(call.n), call.knobs, model=model,
            new_slots=bucket_length(call.n, _MIN_NEW_BUCKET), sampling=call.sampling,
            use_cache=bool(use_cache), mesh=mesh,
        )
        p = prompt.shape[1]
        return _finish(call, tokens[:len(call.rows), p:p + call.n])

    def stream(
        self,
        prompts: Any,
        max_new_tokens: int,
        *,
        chunk_size: int = 8,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        key: jax.Array | None = None,
        use_cache: bool = True,
    ) -> Iterator[np.ndarray]:
        """`jaxgpt.generate_stream` with these params (see there)."""
        call = _check_call(self.cfg, prompts, max_new_tokens, temperature, top_k, top_p, eos_id,
                           key)
        chunk_size = check_count(chunk_size, "chunk_size", minimum=1)
        return self._chunks(call, chunk_size, bool(use_cache))

    def _chunks(self, call: _Call, chunk_size: int, use_cache: bool) -> Iterator[np.ndarray]:
        n = call.n
        if n == 0:
            return
        model, params = self.weights(len(call.rows))
        prompt, start, mesh = self._place(call.batch)
        p, b = prompt.shape[1], len(call.rows)
        state = _start_jit(params, prompt, start, call.knobs, model=model,
                           new_slots=bucket_length(n, _MIN_NEW_BUCKET), sampling=call.sampling,
                           use_cache=use_cache, mesh=mesh)
        shown = 0
        while shown < n:
            stop = min(shown + chunk_size, n)
            state = _decode_jit(params, state, jnp.int32(stop), call.knobs, model=model,
                                sampling=call.sampling, prompt_slots=p)
            made, done = jax.device_get((state.step, state.done))
            made = int(made)
            if done[:b].all():  # the rest is eos_id: show it all at once
                made = n
            yield np.asarray(state.tokens[:b, p + shown:p + made])
            shown = made


def generate(
    params: Any,
    cfg: GPTConfig,
    prompts: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    key: jax.Array | None = None,
    use_cache: bool = True,
    dtype: Any = jnp.float32,
    model: GPTModel | None = None,
) -> jax.Array | list[list[int]]:
    """Generate up to `max_new_tokens` tokens per prompt, as one jit-compiled call.

    Greedy by default, with exactly the tokens of the seeds' `generate_text_simple` (including
    past `context_length`, where the seeds crop to the last C tokens). With `temperature > 0`:
    temperature -> top-k -> top-p -> sample (see `jaxgpt.sampling`), step j drawing with
    `fold_in(key, j)`, so a key reproduces its tokens. Prompt lengths and `max_new_tokens` are
    rounded up to powers of two for compiling, so most new lengths reuse a compiled loop.
    Every step applies `GPTModel` (prefill, then one token at a time through its KV cache).
    Each call prepares the weights anew; `Generator(params, cfg)` keeps them across calls.

    Args:
      params: jaxgpt params for `GPTModel(cfg)`.
      cfg: the model's config.
      prompts: int token ids `[B, T]`, or a list of B token-id lists of any lengths (ragged;
        each row gets exactly what it would get alone).
      max_new_tokens: new tokens per row (>= 0).
      temperature: 0 for greedy, else > 0.
      top_k: keep the k most likely tokens (1 <= k <= vocab_size), or None.
      top_p: keep the smallest most-likely set with probability >= top_p (0 < p <= 1), or None.
      eos_id: a row that emits it is done: it stops changing (further slots hold eos_id).
      key: PRNG key, required when sampling.
      use_cache: False recomputes every window (same greedy tokens; slow, for checking).
      dtype: compute dtype (e.g. jnp.bfloat16 on accelerators); logits stay float32.
      model: a variant of `GPTModel(cfg)` to apply (see `Generator`).

    Returns:
      For an array: int32 `[B, T + max_new_tokens]`, rows padded with eos_id after their EOS.
      For a list: a list of B lists, prompt + new tokens, each cut after its first eos_id.
    """
    gen = Generator(params, cfg, dtype=dtype, model=model)
    return gen.generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_id=eos_id, key=key, use_cache=use_cache)


def generate_stream(
    params: Any,
    cfg: GPTConfig,
    prompts: Any,
    max_new_tokens: int,
    *,
    chunk_size: int = 8,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    key: jax.Array | None = None,
    use_cache: bool = True,
    dtype: Any = jnp.float32,
    model: GPTModel | None = None,
) -> Iterator[np.ndarray]:
    """`generate`, yielding the new tokens as they are made: int32 `[B, k]` chunks, k <= chunk_size.

    The same loop as `generate` (same tokens for the same arguments), run `chunk_size` tokens
    per call with the state donated between calls. It stops early once every row is done (rows
    past their EOS yield eos_id). Concatenating the chunks gives `generate`'s new tokens.
    Arguments are checked when this is called, before the first chunk is asked for.
    """
    gen = Generator(params, cfg, dtype=dtype, model=model)
    return gen.stream(prompts, max_new_tokens, chunk_size=chunk_size, temperature=temperature,
                      top_k=top_k, top_p=top_p, eos_id=eos_id, key=key, use_cache=use_cache)
