"""The compiled decoding programs of `generate`: prefill, then one token per step.

Prompts are left-padded into a token buffer `[B, P + N]` (P, N: bucketed prompt length and
new-token count). Every row has its own first slot `start[b] = P - len[b]`, its own positions
`slot - start[b]`, and a mask that hides the padding, so each row sees what it would see alone
while all rows write their next token into the same slot. The prompt is prefilled once; then
one token per step through the cache. Once a row's sequence would pass `context_length`, the
book crops to the last C tokens and renumbers positions 0..C-1, which invalidates every cached
key, so from that step on each token is computed from its window again (exact, and only past
the context). Prompts longer than C are cropped to their last C tokens up front: the book's
window only moves forward, so earlier tokens are never seen again.

Every path applies `GPTModel` (or a variant): the loops hold token buffers, masks and
positions, never a forward pass of their own.

Shapes: B batch, P prompt slots, N new-token slots, S cache slots, D emb_dim, V vocab_size.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from jaxgpt import sharding
from jaxgpt.config import GPTConfig
from jaxgpt.inference.sampling import SamplingConfig, choose_next
from jaxgpt.nn.cache import KVCache, init_cache
from jaxgpt.nn.model import GPTModel, apply_method

# How many times each jitted entry point has been traced (a test pins re-tracing down).
TRACE_COUNTS: collections.Counter = collections.Counter()

# Prompt lengths and new-token counts are rounded up to powers of two, at least these, so
# that few shapes are ever compiled.
MIN_PROMPT_BUCKET = 8
MIN_NEW_BUCKET = 16
# Cached steps per check for EOS: a loop of known trip count, which XLA:GPU runs without
# reading its condition back to the host after every step. A chunk ends with up to
# chunk_steps - 1 inactive steps (computed, then dropped).
DECODE_CHUNK = 8


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
    cache: KVCache | tuple  # per layer [B * H, S, Dh]; () on the recomputing path
    step: jax.Array  # [] int32: index of the next new token (0-based)
    done: jax.Array  # [B] bool: the row has emitted eos_id
    # [B] int32: the first step whose logits held a NaN or inf for the row (-1: none yet).
    # Read on the host once per call or chunk (`Generator`), never per token.
    nonfinite_at: jax.Array


def bucket_length(n: int, minimum: int, cap: int | None = None) -> int:
    """The power of two >= max(n, minimum), at most `cap` (never below n)."""
    size = max(minimum, 1 << max(n - 1, 0).bit_length())
    return max(n, min(size, cap)) if cap is not None else size


class ProgramShape(NamedTuple):
    """The slots of the compiled decoding program for one call (see `program_shape`)."""

    prompt_slots: int  # P: the bucketed prompt length (prompts longer than C are cropped)
    new_slots: int  # N: the bucketed new-token count
    cache_slots: int  # S: P + min(N, C); cached steps never fill more


def program_shape(cfg: GPTConfig, prompt_len: int, max_new_tokens: int) -> ProgramShape:
    """The shapes `generate` compiles for a longest prompt of `prompt_len` tokens and
    `max_new_tokens` new ones: the one place that buckets lengths (generation and `aot`)."""
    ctx = cfg.context_length
    p = bucket_length(min(prompt_len, ctx), MIN_PROMPT_BUCKET, cap=ctx)
    n = bucket_length(max_new_tokens, MIN_NEW_BUCKET)
    return ProgramShape(p, n, cache_slots(cfg, p, n))


def cache_slots(cfg: GPTConfig, prompt_slots: int, new_slots: int) -> int:
    """Cache slots of a program: the prompt's, and the new tokens' up to `context_length`
    (from there on each token recomputes its window)."""
    return prompt_slots + min(new_slots, cfg.context_length)


def make_knobs(key: jax.Array | None, temperature: float, top_p: float | None,
               eos_id: int | None, greedy: bool) -> Knobs:
    """The traced sampling arguments of checked values (a dummy key when greedy)."""
    return Knobs(
        key=key if key is not None else jax.random.PRNGKey(0),
        temperature=jnp.float32(1.0 if greedy else temperature),
        top_p=jnp.float32(1.0 if top_p is None else top_p),
        eos_id=jnp.int32(-1 if eos_id is None else eos_id),
    )


def _write_next(
    state: DecodeState, logits: jax.Array, knobs: Knobs, sampling: SamplingConfig,
    prompt_slots: int, active: jax.Array | bool = True,
) -> DecodeState:
    """Choose token `state.step` for every row from logits `[B, V]`, apply EOS, store it, and
    note the step for a row still running whose logits are not finite (argmax of NaN is no
    token); an inactive step (`active` False) leaves the state as it was."""
    j = state.step
    bad = ~jnp.isfinite(logits).all(axis=-1) & ~state.done & active  # [B]
    nonfinite_at = jnp.where(bad & (state.nonfinite_at < 0), j, state.nonfinite_at)
    nxt = choose_next(logits, jax.random.fold_in(knobs.key, j), knobs.temperature, knobs.top_p,
                      sampling)  # [B]
    nxt = jnp.where(state.done, knobs.eos_id, nxt)
    at = prompt_slots + j
    if active is not True:
        # The slot's own value back (an index past the buffer clamps alike in both calls).
        nxt = jnp.where(active, nxt, lax.dynamic_slice_in_dim(state.tokens, at, 1, axis=1)[:, 0])
    tokens = lax.dynamic_update_slice(state.tokens, nxt[:, None], (0, at))
    return state._replace(tokens=tokens, step=j + jnp.asarray(active, jnp.int32),
                          done=state.done | (active & (nxt == knobs.eos_id)),
                          nonfinite_at=nonfinite_at)


def _split_rows(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of `tree` split along its first axis over the mesh (rows, or rows * heads
    for the cache: both row-major, so each device holds whole rows)."""
    if mesh is None:
        return tree
    return jax.tree_util.tree_map(
        lambda x: lax.with_sharding_constraint(x, sharding.batch_sharding(mesh)), tree)


def _start(model: GPTModel, params: Any, prompt: jax.Array, start: jax.Array, new_slots: int,
           knobs: Knobs, sampling: SamplingConfig, use_cache: bool,
           mesh: Mesh | None = None) -> DecodeState:
    """The buffer, and with the cache: the prefilled prompt and the first new token."""
    b, p = prompt.shape
    cfg = model.cfg
    fill = jnp.maximum(knobs.eos_id, 0)  # an all-done early exit leaves eos_id behind
    tokens = jnp.concatenate([prompt, jnp.full((b, new_slots), fill, jnp.int32)], axis=1)
    state = DecodeState(tokens, start, (), jnp.int32(0), jnp.zeros((b,), bool),
                        jnp.full((b,), -1, jnp.int32))
    state = state._replace(**_split_rows(dict(tokens=tokens, start=start, done=state.done,
                                              nonfinite_at=state.nonfinite_at), mesh))
    if not use_cache:
        return state
    slots = cache_slots(cfg, p, new_slots)
    at = jnp.arange(p)[None, :]  # [1, P]
    positions = jnp.maximum(at - start[:, None], 0)  # [B, P]
    variables = {"params": params}
    cache = _split_rows(init_cache(cfg, b, slots, model.dtype), mesh)
    # Left-padded: every row's last prompt token is in the last slot.
    out = apply_method(model, variables, GPTModel.decode)(
        prompt, cache, 0, positions=positions, valid=at >= start[:, None], last_only=True)
    return _write_next(state._replace(cache=out.cache), out.logits, knobs, sampling, p)


def _decode(model: GPTModel, params: Any, state: DecodeState, stop: jax.Array | int,
            knobs: Knobs, sampling: SamplingConfig, prompt_slots: int,
            chunk_steps: int = DECODE_CHUNK) -> DecodeState:
    """Generate tokens `state.step .. stop-1` (fewer if every row is done); the cached steps
    `chunk_steps` at a time between checks (0: one step per check, nothing inactive)."""
    b, total = state.tokens.shape
    ctx = model.cfg.context_length
    p = prompt_slots
    variables = {"params": params}

    def running(s: DecodeState, limit: jax.Array | int) -> jax.Array:
        return (s.step < limit) & ~jnp.all(s.done)

    if isinstance(state.cache, KVCache):
        # Token j reads position len[b] + j - 1: exact with the cache while that is < C for all.
        longest = p - jnp.min(state.start)
        cached_stop = jnp.minimum(stop, ctx - longest + 1)
        decode_step = apply_method(model, variables, GPTModel.decode)

        def cached_step(s: DecodeState, active: jax.Array | bool) -> DecodeState:
            slot = p + s.step - 1  # the slot of the last known token
            last = lax.dynamic_slice_in_dim(s.tokens, slot, 1, axis=1)  # [B, 1]
            assert isinstance(s.cache, KVCache)  # the carry of this loop holds the cache
            out = decode_step(last, s.cache, slot, positions=(slot - s.start)[:, None],
                              last_only=True)  # logits [B, V]
            return _write_next(s._replace(cache=out.cache), out.logits, knobs, sampling, p,
                               active)

        def chunk(s: DecodeState) -> DecodeState:
            if not chunk_steps:
                return cached_step(s, True)
            return lax.fori_loop(0, chunk_steps,
                                 lambda _, s: cached_step(s, running(s, cached_stop)), s)

        state = lax.while_loop(lambda s: running(s, cached_stop), chunk, state)

    window = min(total, ctx)

    def window_step(s: DecodeState) -> DecodeState:
        known = p + s.step  # slots [0, known) hold tokens
        first = jnp.maximum(known - window, 0)
        row_first = jnp.maximum(s.start, known - ctx)  # [B]: the book's crop, per row
        at = first + jnp.arange(window)[None, :]  # [1, W]
        positions = jnp.clip(at - row_first[:, None], 0, ctx - 1)  # [B, W]
        toks = lax.dynamic_slice(s.tokens, (0, first), (b, window))  # [B, W]
        hidden = apply_method(model, variables, GPTModel.hidden)(
            toks, positions=positions, valid=at >= row_first[:, None])  # [B, W, D]
        last = lax.dynamic_index_in_dim(hidden, known - 1 - first, axis=1, keepdims=False)
        logits = apply_method(model, variables, GPTModel.head)(last)  # [B, V]
        return _write_next(s, logits, knobs, sampling, p)

    return lax.while_loop(lambda s: running(s, stop), window_step, state)


_STATIC = ("model", "new_slots", "sampling", "use_cache", "mesh")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "chunk_steps"))
def generate_tokens(params: Any, prompt: jax.Array, start: jax.Array, n_new: jax.Array,
                    knobs: Knobs, *, model: GPTModel, new_slots: int, sampling: SamplingConfig,
                    use_cache: bool, mesh: Mesh | None = None,
                    chunk_steps: int = DECODE_CHUNK) -> tuple[jax.Array, jax.Array]:
    """The whole generation as one program: `(tokens, nonfinite_at)`, the token buffer
    `[B, P + new_slots]` after prefilling `prompt` `[B, P]` (rows starting at `start` `[B]`)
    and `n_new` new tokens, and each row's first step with non-finite logits `[B]` (-1: none;
    see `DecodeState`); the cached steps `chunk_steps` at a time (0: one per check)."""
    TRACE_COUNTS["generate"] += 1
    state = _start(model, params, prompt, start, new_slots, knobs, sampling, use_cache, mesh)
    state = _decode(model, params, state, n_new, knobs, sampling, prompt.shape[1], chunk_steps)
    return state.tokens, state.nonfinite_at


@functools.partial(jax.jit, static_argnames=_STATIC)
def start_decoding(params: Any, prompt: jax.Array, start: jax.Array, knobs: Knobs, *,
                   model: GPTModel, new_slots: int, sampling: SamplingConfig, use_cache: bool,
                   mesh: Mesh | None = None) -> DecodeState:
    """The state after the prefill and the first new token (`generate_stream`'s first call)."""
    TRACE_COUNTS["generate_stream"] += 1
    return _start(model, params, prompt, start, new_slots, knobs, sampling, use_cache, mesh)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "prompt_slots", "chunk_steps"),
                   donate_argnums=(1,))
def continue_decoding(params: Any, state: DecodeState, stop: jax.Array, knobs: Knobs, *,
                      model: GPTModel, sampling: SamplingConfig, prompt_slots: int,
                      chunk_steps: int = DECODE_CHUNK) -> DecodeState:
    """`state` advanced to `stop` new tokens (fewer once every row is done); donated."""
    TRACE_COUNTS["generate_stream"] += 1
    return _decode(model, params, state, stop, knobs, sampling, prompt_slots, chunk_steps)
