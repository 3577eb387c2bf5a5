"""`generate`, `generate_stream` and `Generator`: checked calls of the compiled decoding
programs, with the decode-ready weights built once per params.

`generate` is the fast path: KV cache (prefill once, then one token per step), greedy or
sampled (`jaxgpt.inference.sampling`), per-row EOS, ragged prompts, and prompt lengths / token
counts rounded up to powers of two so that few shapes are ever compiled. Its greedy tokens are
the book's exactly, also past `context_length`. `generate_stream` runs the same loop in
chunks. `Generator` holds one set of params with their decode-ready form
(`jaxgpt.nn.layout.prepare`), so repeated calls do not rebuild it; `generate` and
`generate_stream` are thin wrappers. All four take the sampling and stopping settings as one
`GenerationConfig` (`config=`), or its fields as keywords.

Shapes: B batch, P prompt slots, V vocab_size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgpt import sharding
from jaxgpt.config import GPTConfig
from jaxgpt.inference import decode
from jaxgpt.inference.checks import (
    check_count,
    check_generation_memory,
    check_new_tokens,
    check_token_ids,
)
from jaxgpt.inference.decode import Knobs, ProgramShape, make_knobs, program_shape
from jaxgpt.inference.sampling import GenerationConfig, SamplingConfig, generation_config
from jaxgpt.nn.attention import MultiHeadAttention
from jaxgpt.nn.hooks import HookTable, free_hooks, with_hook_args
from jaxgpt.nn.layers import FeedForward
from jaxgpt.nn.layout import Layout, prepare
from jaxgpt.nn.model import GPTModel, model_for
from jaxgpt.nn.quant import check_mode, is_quantized, quantize_params


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


def _batch(rows: list[np.ndarray], cfg: GPTConfig, prompt_slots: int) -> _Batch:
    """The rows left-padded into `[B, P]`, each cropped to its last `context_length` tokens."""
    ctx = cfg.context_length
    lengths = [min(len(r), ctx) for r in rows]
    prompt = np.zeros((len(rows), prompt_slots), np.int32)
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        prompt[i, prompt_slots - n:] = row[len(row) - n:]
    return _Batch(rows, prompt, np.asarray([prompt_slots - n for n in lengths], np.int32))


class _Call(NamedTuple):
    """One checked call: the batch, and everything the jitted loop takes."""

    rows: list[np.ndarray]
    is_list: bool
    n: int  # new tokens per row
    config: GenerationConfig
    batch: _Batch | None  # None when n == 0
    shape: ProgramShape | None  # the compiled program's slots; None when n == 0
    sampling: SamplingConfig
    knobs: Knobs
    hooks: HookTable  # the free hooks' table; their arrays are in `hook_args`
    hook_args: dict


def _check_key(key: Any, config: GenerationConfig) -> None:
    """ValueError unless `key` is a PRNG key, or None where the config is greedy."""
    if config.temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=jax.random.key(0)")
    if key is not None and not (isinstance(key, jax.Array) and (
            jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape == (2,))):
        raise ValueError(f"key must be a PRNG key (jax.random.key or PRNGKey), got {key!r}")


def _check_call(cfg: GPTConfig, prompts: Any, max_new_tokens: Any, config: GenerationConfig,
                key: Any, hooks: Any = (), dtype: Any = jnp.float32,
                devices: Sequence[jax.Device] | None = None) -> _Call:
    """Every argument checked, before anything is traced; the batch laid out for the loop.
    `dtype` and `devices` are the generator's, which the memory the rows take depends on."""
    table, hook_args = free_hooks(cfg, hooks)
    rows, is_list = _check_prompts(prompts, cfg)
    n = check_count(max_new_tokens, "max_new_tokens")
    config.check_vocab(cfg.vocab_size)
    _check_key(key, config)
    sampling = config.sampling
    knobs = make_knobs(key, config.temperature, config.top_p, config.eos_id, sampling.greedy)
    if n == 0:
        return _Call(rows, is_list, n, config, None, None, sampling, knobs, table, hook_args)
    shape = program_shape(cfg, max(len(r) for r in rows), n)
    check_new_tokens(n, len(rows), shape.prompt_slots, shape.new_slots)  # before any tracing
    check_generation_memory(cfg, len(rows), shape, dtype=dtype, sampling=sampling,
                            use_cache=config.use_cache, devices=devices)
    batch = _batch(rows, cfg, shape.prompt_slots)
    return _Call(rows, is_list, n, config, batch, shape, sampling, knobs, table, hook_args)


def cut_after_eos(new: list[int], eos_id: int | None) -> list[int]:
    """A row's new tokens up to and including its first `eos_id` (all of them without one)."""
    return new[: new.index(eos_id) + 1] if eos_id is not None and eos_id in new else new


def _finish(call: _Call, new_tokens: np.ndarray | jax.Array) -> jax.Array | list[list[int]]:
    """The user-facing result: prompt + new tokens, as an array or as cut lists."""
    if not call.is_list:
        prompt = jnp.asarray(np.stack(call.rows))
        return jnp.concatenate([prompt, jnp.asarray(new_tokens, jnp.int32)], axis=1)
    return [[int(t) for t in row] + cut_after_eos(new, call.config.eos_id)
            for row, new in zip(call.rows, np.asarray(new_tokens).tolist(), strict=True)]


def _keeps_layout(cls: type, base: type) -> bool:
    """Whether `cls` reads its matrices as `base` does: it replaces neither `__call__` nor
    the compact method that reads them (`MultiHeadAttention.attend`)."""
    return issubclass(cls, base) and all(
        name not in vars(c) for c in cls.__mro__ if c is not base and issubclass(c, base)
        for name in ("__call__", "attend"))


class Generator:
    """Generation for one set of params: the decode-ready weights are built once and reused.

    `prepare`-ing the weights (Q/K/V fused, cast to `dtype`, and the layout the backend
    multiplies fastest at the batch size, `Layout.for_batch`) costs a pass over all of them;
    a `Generator` pays it once and keeps the result, where `jaxgpt.generate` pays
    it on every call.
    Methods take the arguments of `generate` and `generate_stream` after `cfg`.

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
      chunk_steps: cached steps run between two checks for EOS (`decode.DECODE_CHUNK`; 0:
        one step per check). The tokens are the same for every value.
      layout: the `Layout` to decode with at every batch size, instead of the one chosen for
        the backend and batch (`Layout.for_batch`); its `quant` is set from `quantize`.
      quantize: None (float weights), "int8" (int8 weights, products in `dtype`) or "w8a8"
        (int8 weights and per-token int8 activations, int32 accumulation); see `nn.quant`.
        The params are quantized here, once, and the generator keeps no reference to the
        float ones; params that are quantized already (int8 matrices) are kept as they are.
        Hooks still see float activations.

    `generate` and `stream` take `hooks=[(name, fn), ...]` too (`jaxgpt.nn.hooks`): they run
    in the prefill and in every step, cached or not. A cached step computes one new token, so
    its hooks see `[B, 1, ...]` activations (and attention over the cache's slots): a hook
    that acts on each token alike (add a steering vector, ablate a head) gives the tokens of
    `use_cache=False`. Arrays in pytree hooks (`jax.tree_util.Partial`) are arguments of the
    compiled loop: a new vector of the same shape does not compile anew.
    """

    def __init__(self, params: Any, cfg: GPTConfig, *, dtype: Any = jnp.float32,
                 model: GPTModel | None = None, devices: Sequence[jax.Device] | None = None,
                 chunk_steps: int = decode.DECODE_CHUNK, layout: Layout | None = None,
                 quantize: str | None = None):
        model = model_for(cfg, model)
        self.quantize = check_mode(quantize)
        self.chunk_steps = check_count(chunk_steps, "chunk_steps")
        if layout is not None and not isinstance(layout, Layout):
            raise ValueError(f"layout must be a jaxgpt.nn.layout.Layout or None, got {layout!r}")
        self.layout = layout
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.devices = list(jax.local_devices() if devices is None else devices)
        if not self.devices:
            raise ValueError("devices is empty: give at least one device")
        self.model = model.clone(dtype=self.dtype, remat=False, layout=Layout())
        # The decode layouts read the book's parameter names; a part that replaces __call__
        # (or attend) may not, so it gets its params as they are (cast to dtype).
        self._layouts = all(_keeps_layout(cls, base) for cls, base in (
            (model.attention_cls, MultiHeadAttention), (model.feed_forward_cls, FeedForward)))
        _check_quantize(self.quantize, model, self._layouts, params)
        if self.quantize is not None and not is_quantized(params):
            params = quantize_params(params, cfg)
        # The params in the book's form until `weights` first prepares them; then None, since a
        # generator decodes with one matrix form at every batch size (`_form`), and keeping them
        # would hold a second copy of every matrix.
        self._book: Any = params
        self._form = self._layout(1).matrix_form()
        self._prepared: dict[Mesh | None, Any] = {}
        self._matrices: Any = None

    def mesh(self, batch: int) -> Mesh | None:
        """The mesh a batch of `batch` rows is split over (None: one device)."""
        n = min(len(self.devices), batch)
        return sharding.make_mesh(self.devices[:n]) if n > 1 else None

    def weights(self, batch: int) -> tuple[GPTModel, Any]:
        """`(model, params)` laid out for `batch` rows (per device) on this backend, built on
        first use and kept; on several devices, replicated over `mesh(batch)`."""
        mesh = self.mesh(batch)
        rows = -(-batch // mesh.size) if mesh is not None else batch  # per device
        layout = self._layout(rows)
        if layout.matrix_form() != self._form:
            raise RuntimeError(f"the decoding layout for {rows} rows, {layout}, holds its "
                               f"matrices unlike the one for 1 row, {self._form}: "
                               f"Layout.for_batch must keep one matrix form per backend")
        if self._matrices is None:
            # Eagerly, not under jit: arrays it leaves alone are passed on as they are (a jit
            # would copy them), and XLA:CPU runs the transposes slower inside the generation
            # jit than on their own.
            self._matrices = prepare(self._book, self.cfg, self.dtype, self._form)
            self._book = None
        if mesh not in self._prepared:
            self._prepared[mesh] = (self._matrices if mesh is None else
                                    jax.device_put(self._matrices, sharding.replicated(mesh)))
        return self.model.clone(layout=layout), self._prepared[mesh]

    def _layout(self, rows: int) -> Layout:
        """The layout to decode `rows` rows (per device) with."""
        if not self._layouts:
            return Layout()
        if self.layout is not None:
            return self.layout.with_quant(self.quantize)
        # A fixed rule per backend, nothing measured (docs/performance.md).
        return Layout.for_batch(rows, quant=self.quantize)

    def _hooked(self, call: _Call) -> tuple[GPTModel, Any]:
        """`weights` for the call's batch, with the call's hooks added (their arrays in the
        params, replicated like them)."""
        model, params = self.weights(len(call.rows))
        if not call.hooks:
            return model, params
        args = call.hook_args
        mesh = self.mesh(len(call.rows))
        if mesh is not None and args:
            args = jax.device_put(args, sharding.replicated(mesh))
        return model.clone(hooks=model.hooks.plus(call.hooks)), with_hook_args(params, args)

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

    def generate(self, prompts: Any, max_new_tokens: int,
                 config: GenerationConfig | None = None, *, key: jax.Array | None = None,
                 hooks: Any = (), **settings: Any) -> jax.Array | list[list[int]]:
        """`jaxgpt.generate` with these params (see there)."""
        config = generation_config(config, settings)
        call = _check_call(self.cfg, prompts, max_new_tokens, config, key, hooks, self.dtype,
                           self.devices)
        if call.batch is None or call.shape is None:  # no new tokens
            return _finish(call, np.zeros((len(call.rows), 0), np.int32))
        model, params = self._hooked(call)
        prompt, start, mesh = self._place(call.batch)
        tokens, nonfinite_at = decode.generate_tokens(
            params, prompt, start, jnp.int32(call.n), call.knobs, model=model,
            new_slots=call.shape.new_slots, sampling=call.sampling,
            use_cache=config.use_cache, mesh=mesh, chunk_steps=self.chunk_steps,
        )
        wait_until_ready(nonfinite_at)  # the one read of the flags, at the end
        check_finite(np.asarray(nonfinite_at)[:len(call.rows)], call.n)
        p = prompt.shape[1]
        return _finish(call, tokens[:len(call.rows), p:p + call.n])

    def stream(self, prompts: Any, max_new_tokens: int,
               config: GenerationConfig | None = None, *, chunk_size: int = 8,
               key: jax.Array | None = None, hooks: Any = (),
               **settings: Any) -> Iterator[np.ndarray]:
        """`jaxgpt.generate_stream` with these params (see there)."""
        config = generation_config(config, settings)
        call = _check_call(self.cfg, prompts, max_new_tokens, config, key, hooks, self.dtype,
                           self.devices)
        chunk_size = check_count(chunk_size, "chunk_size", minimum=1)
        return self._chunks(call, chunk_size)

    def _chunks(self, call: _Call, chunk_size: int) -> Iterator[np.ndarray]:
        n = call.n
        if call.batch is None or call.shape is None:  # no new tokens
            return
        model, params = self._hooked(call)
        prompt, start, mesh = self._place(call.batch)
        p, b = prompt.shape[1], len(call.rows)
        state = decode.start_decoding(params, prompt, start, call.knobs, model=model,
                                      new_slots=call.shape.new_slots, sampling=call.sampling,
                                      use_cache=call.config.use_cache, mesh=mesh)
        shown = 0
        steps = min(self.chunk_steps, chunk_size)  # fewer inactive steps per yielded chunk
        while shown < n:
            stop = min(shown + chunk_size, n)
            state = decode.continue_decoding(params, state, jnp.int32(stop), call.knobs,
                                             model=model, sampling=call.sampling,
                                             prompt_slots=p, chunk_steps=steps)
            wait_until_ready(state.step)
            made, done, nonfinite_at = jax.device_get((state.step, state.done,
                                                       state.nonfinite_at))
            made, bad = int(made), nonfinite_at[:b]
            if done[:b].all():  # the rest is eos_id: show it all at once
                made = n
            if (bad >= 0).any():  # the tokens before the first bad step, then the error
                made = int(bad[bad >= 0].min())
            if made > shown:
                yield np.asarray(state.tokens[:b, p + shown:p + made])
            check_finite(bad, n)
            shown = made


def check_finite(nonfinite_at: np.ndarray, n: int) -> None:
    """FloatingPointError naming the first step and its rows if any row's logits stopped being
    finite (`nonfinite_at` `[B]`: each row's first such step, -1 for none; `n` new tokens).

    FloatingPointError, as numpy and `jax_debug_nans` raise for a NaN a computation made:
    the arguments were valid, the numbers were not, and a caller's `except ValueError` for a
    bad argument should not take it for one."""
    seen = nonfinite_at >= 0
    if not seen.any():
        return
    step = int(nonfinite_at[seen].min())
    rows = np.flatnonzero(nonfinite_at == step).tolist()
    names = ", ".join(map(str, rows[:8])) + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
    raise FloatingPointError(
        f"the logits stopped being finite (NaN or inf) at new token {step + 1} of {n}, in row"
        f"{'s' if len(rows) > 1 else ''} {names} of {len(nonfinite_at)}: a hook or the weights "
        f"made them so, and a token chosen from them would mean nothing")


def _check_quantize(quantize: str | None, model: GPTModel, layouts: bool, params: Any) -> None:
    """ValueError, in one line, where `quantize` cannot apply to `model` or `params`."""
    if quantize is not None and not layouts:
        parts = [cls.__name__ for cls in (model.attention_cls, model.feed_forward_cls)
                 if cls not in (MultiHeadAttention, FeedForward)]
        raise ValueError(f"quantize={quantize!r} needs the book's Linear layers, and "
                         f"{' and '.join(parts)} replaces __call__ or attend (its matrices would "
                         f"be read unscaled); use quantize=None with this model")
    if quantize is None and is_quantized(params):
        raise ValueError("params hold int8 matrices (quantized): pass quantize='int8' or "
                         "'w8a8'")


def wait_until_ready(x: jax.Array) -> None:
    """Block until `x` is computed, in short sleeps rather than one blocking wait, so that
    Ctrl-C (KeyboardInterrupt) is raised within milliseconds instead of after the chunk."""
    pause = 0.0005
    while not cast(Any, x).is_ready():  # a jax.Array method the type stubs do not list
        time.sleep(pause)
        pause = min(2 * pause, 0.02)


def generate(
    params: Any,
    cfg: GPTConfig,
    prompts: Any,
    max_new_tokens: int,
    config: GenerationConfig | None = None,
    *,
    key: jax.Array | None = None,
    dtype: Any = jnp.float32,
    model: GPTModel | None = None,
    hooks: Any = (),
    quantize: str | None = None,
    **settings: Any,
) -> jax.Array | list[list[int]]:
    """Generate up to `max_new_tokens` tokens per prompt, as one jit-compiled call.

    Greedy by default, with exactly the tokens of the book's `generate_text_simple` (including
    past `context_length`, where the book crops to the last C tokens). With `temperature > 0`:
    temperature -> top-k -> top-p -> sample (see `jaxgpt.inference.sampling`), step j drawing with
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
      config: how to choose and when to stop (`GenerationConfig`: temperature, top_k, top_p,
        eos_id, use_cache); None: greedy with the KV cache, or a config of `settings`.
      key: PRNG key, required when sampling.
      dtype: compute dtype (e.g. jnp.bfloat16 on accelerators); logits stay float32.
      model: a variant of `GPTModel(cfg)` to apply (see `Generator`).
      hooks: `(name, fn)` pairs run at the model's hook points in every step, e.g.
        activation steering, `[("blocks.6.hook_resid_post", interp.interventions.add(v))]`
        (see `Generator` and `jaxgpt.nn.hooks`).
      quantize: None, "int8" or "w8a8": decode with int8 weights (see `Generator`).
      **settings: `GenerationConfig`'s fields as keywords instead of `config`, e.g.
        `temperature=0.8, top_k=50` (not both; an unknown keyword is a TypeError).

    Returns:
      For an array: int32 `[B, T + max_new_tokens]`, rows padded with eos_id after their EOS.
      For a list: a list of B lists, prompt + new tokens, each cut after its first eos_id.

    Raises ValueError before anything is traced for a bad argument, or for more rows than
    half the device's memory holds (`checks.generation_memory`), and FloatingPointError once
    the logits of a row still running stop being finite (`check_finite`).
    """
    config = generation_config(config, settings)  # checked before the weights are prepared
    gen = Generator(params, cfg, dtype=dtype, model=model, quantize=quantize)
    return gen.generate(prompts, max_new_tokens, config, key=key, hooks=hooks)


def generate_stream(
    params: Any,
    cfg: GPTConfig,
    prompts: Any,
    max_new_tokens: int,
    config: GenerationConfig | None = None,
    *,
    chunk_size: int = 8,
    key: jax.Array | None = None,
    dtype: Any = jnp.float32,
    model: GPTModel | None = None,
    hooks: Any = (),
    quantize: str | None = None,
    **settings: Any,
) -> Iterator[np.ndarray]:
    """`generate`, yielding the new tokens as they are made: int32 `[B, k]` chunks, k <= chunk_size.

    The same loop as `generate` (same tokens for the same arguments), run `chunk_size` tokens
    per call with the state donated between calls. It stops early once every row is done (rows
    past their EOS yield eos_id). Concatenating the chunks gives `generate`'s new tokens.
    Arguments are checked when this is called, before the first chunk is asked for. Ctrl-C
    while a chunk computes raises KeyboardInterrupt at once (that chunk is lost; the ones
    yielded before are the tokens so far).
    """
    config = generation_config(config, settings)
    gen = Generator(params, cfg, dtype=dtype, model=model, quantize=quantize)
    return gen.stream(prompts, max_new_tokens, config, chunk_size=chunk_size, key=key,
                      hooks=hooks)
