"""Ahead-of-time lowering of generation and the train step, for abstract inputs.

`lower_generate` lowers the jitted loop that `jaxgpt.generate` runs (prefill and decoding, one
program), `lower_decode_step` one cached decoding step alone, and `lower_train_step` the step
`jaxgpt.training.step.make_train_step` builds, with the shardings `jaxgpt.sharding` gives it.
All take abstract inputs (`jax.ShapeDtypeStruct`s placed on `devices`): no weights are
allocated, and the result can be compiled for a device this machine does not have
(`jaxgpt.aot.targets`), or exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt import sharding
from jaxgpt.config import GPTConfig
from jaxgpt.inference import decode
from jaxgpt.inference.sampling import sampling_config
from jaxgpt.nn.cache import init_cache
from jaxgpt.nn.layout import Layout, prepare
from jaxgpt.nn.model import GPTModel, apply_method, param_shapes
from jaxgpt.training.config import TrainConfig
from jaxgpt.training.step import init_train_state, make_train_step


def _abstract(tree: Any, shardings: Any) -> Any:
    """`tree`'s leaves as ShapeDtypeStructs placed with `shardings` (one, or a matching tree)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), tree
        )
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def _devices(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    devices = [jax.devices()[0]] if devices is None else list(devices)
    if not devices:
        raise ValueError("devices is empty: give at least one device (see target_devices)")
    return devices


def _check_size(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class _Program(NamedTuple):
    fn: Any  # a jitted function
    args: tuple  # abstract positional arguments (ShapeDtypeStructs, no shardings)
    static: dict  # static keyword arguments


class _Generation(NamedTuple):
    generate: _Program  # the whole loop, as jaxgpt.generate runs it
    decode_step: _Program  # one cached step (cache donated), greedy
    cache: Any  # the abstract KV cache the loop carries


def _generation_programs(cfg: GPTConfig, batch: int, prompt_len: int, max_new_tokens: int,
                         dtype: Any, platform: str = "cpu",
                         chunk_steps: int = decode.DECODE_CHUNK) -> _Generation:
    """The programs `generate` compiles for these sizes, with abstract inputs.

    `generate` pads prompts to a bucketed length (`decode.program_shape`), lays the weights out
    for the backend and the batch (`Layout.for_batch`, `prepare`, as `Generator.weights` does),
    then calls `decode.generate_tokens`, which applies `GPTModel`; one decoding step is
    `GPTModel.decode` on a `KVCache` of `[B * H, S, Dh]` per layer.
    """
    sds = jax.ShapeDtypeStruct
    dtype = jnp.dtype(dtype)
    shape = decode.program_shape(cfg, prompt_len, max_new_tokens)
    layout = Layout.for_batch(batch, platform)
    model = GPTModel(cfg, dtype=dtype, layout=layout)
    w = jax.eval_shape(lambda params: prepare(params, cfg, dtype, layout), param_shapes(cfg))
    abstract: Any = [sds(s, t) for s, t in (((2,), jnp.uint32), ((), jnp.float32),
                                             ((), jnp.float32), ((), jnp.int32))]
    knobs = decode.Knobs(*abstract)  # key, temperature, top_p, eos_id
    generate = _Program(
        decode.generate_tokens,
        (w, sds((batch, shape.prompt_slots), jnp.int32), sds((batch,), jnp.int32),
         sds((), jnp.int32), knobs),
        dict(model=model, new_slots=shape.new_slots, sampling=sampling_config(0.0, None, None),
             use_cache=True, chunk_steps=chunk_steps),
    )
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, shape.cache_slots, dtype))

    def step(w: Any, cache: Any, tokens: jax.Array, positions: jax.Array,
             slot: jax.Array) -> tuple[jax.Array, Any]:
        out = apply_method(model, {"params": w}, GPTModel.decode)(
            tokens[:, None], cache, slot, positions=positions[:, None])  # logits [B, 1, V]
        return jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32), out.cache

    vec = sds((batch,), jnp.int32)
    decode_step = _Program(jax.jit(step, donate_argnums=1),
                           (w, cache, vec, vec, sds((), jnp.int32)), {})
    return _Generation(generate, decode_step, cache)


def platform_of(devices: Sequence[jax.Device]) -> str:
    """The backend name `Layout.for_batch` takes: "cpu", "gpu" or "tpu"."""
    platform = devices[0].platform
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def _lower(program: _Program, devices: Sequence[jax.Device]) -> jax.stages.Lowered:
    # Generation is not sharded: on several devices every input is replicated.
    mesh = sharding.make_mesh(devices)
    args = _abstract(program.args, NamedSharding(mesh, P()))
    return program.fn.lower(*args, **program.static)


def _lower_generation(which: str, cfg: GPTConfig, batch: int, prompt_len: int,
                      max_new_tokens: int, dtype: Any, devices: Sequence[jax.Device] | None,
                      chunk_steps: int = decode.DECODE_CHUNK) -> jax.stages.Lowered:
    """`lower_generate` and `lower_decode_step`: `which` program of `_Generation`, lowered for
    `devices` (the layouts follow their platform) after the sizes are checked."""
    batch = _check_size(batch, "batch")
    prompt_len = _check_size(prompt_len, "prompt_len")
    max_new_tokens = _check_size(max_new_tokens, "max_new_tokens")
    chunk_steps = _check_size(chunk_steps, "chunk_steps", minimum=0)
    targets = _devices(devices)
    programs = _generation_programs(cfg, batch, prompt_len, max_new_tokens, dtype,
                                    platform_of(targets), chunk_steps)
    return _lower(getattr(programs, which), targets)


def lower_generate(
    cfg: GPTConfig,
    *,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
    dtype: Any = jnp.float32,
    devices: Sequence[jax.Device] | None = None,
    chunk_steps: int = decode.DECODE_CHUNK,
) -> jax.stages.Lowered:
    """Lower the whole jitted generation (prefill, then the cached decoding loop) that
    `jaxgpt.generate(params, cfg, prompts, max_new_tokens, dtype=dtype)` runs, greedy, for
    `batch` prompts of `prompt_len` tokens, on `devices` (default: the first JAX device),
    the cached steps `chunk_steps` per check for EOS (as `Generator(chunk_steps=...)`).

    Lengths are bucketed as `generate` buckets them, so this is the program `generate` would
    compile. Nothing is allocated; `.compile()` the result for its devices, or export it.
    """
    return _lower_generation("generate", cfg, batch, prompt_len, max_new_tokens, dtype,
                             devices, chunk_steps)


def lower_decode_step(
    cfg: GPTConfig,
    *,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
    dtype: Any = jnp.float32,
    devices: Sequence[jax.Device] | None = None,
) -> jax.stages.Lowered:
    """Lower one cached decoding step (all blocks, head, greedy choice) with its KV cache
    donated, on the cache `lower_generate` with the same arguments allocates: what one token
    of the loop costs, as a program of its own."""
    return _lower_generation("decode_step", cfg, batch, prompt_len, max_new_tokens, dtype,
                             devices)


def cache_bytes(cfg: GPTConfig, *, batch: int, prompt_len: int, max_new_tokens: int,
                dtype: Any = jnp.float32) -> tuple[int, tuple[int, ...]]:
    """`(total bytes, shape of one layer's keys)` of the KV cache `lower_generate` allocates."""
    cache = _generation_programs(cfg, batch, prompt_len, max_new_tokens, dtype).cache
    leaves = jax.tree_util.tree_leaves(cache)
    return sum(a.size * a.dtype.itemsize for a in leaves), tuple(leaves[0].shape)


def weight_bytes(cfg: GPTConfig, dtype: Any = jnp.float32) -> tuple[int, int]:
    """`(all, read per decoding step)` bytes of the weights in compute `dtype` (LayerNorm
    parameters stay float32). A step reads every matrix, but of the two embedding tables only
    one row each, unless the head is the token embedding (tied)."""
    itemsize = jnp.dtype(dtype).itemsize
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes(cfg)):
        norm = any(getattr(k, "key", None) in ("scale", "shift") for k in path)
        total += leaf.size * (4 if norm else itemsize)
    tables = (cfg.vocab_size + cfg.context_length) * cfg.emb_dim * itemsize
    read = total - tables + 2 * cfg.emb_dim * itemsize
    if cfg.tie_embeddings:
        read += cfg.vocab_size * cfg.emb_dim * itemsize
    return total, read


def lower_train_step(
    cfg: GPTConfig,
    tc: TrainConfig,
    *,
    batch: int,
    seq_len: int,
    devices: Sequence[jax.Device] | None = None,
    fsdp: bool = False,
) -> jax.stages.Lowered:
    """Lower `training.step.make_train_step(cfg, tc')` for a global batch `[batch, seq_len]` on a
    data mesh over `devices`, the state placed as training places it (with `fsdp`,
    weights and AdamW moments split over the devices). `tc'` is `tc` with `batch_size`,
    `seq_len` and `fsdp` replaced. The state is donated, as in training."""
    batch, seq_len = _check_size(batch, "batch"), _check_size(seq_len, "seq_len")
    if seq_len > cfg.context_length:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context_length "
                         f"{cfg.context_length}")
    tc = tc.replace(batch_size=batch, seq_len=seq_len, fsdp=bool(fsdp))
    mesh = sharding.make_mesh(_devices(devices))
    n = mesh.shape[sharding.DATA]
    if (batch // tc.grad_accum) % n:
        raise ValueError(f"the micro-batch (batch {batch} / grad_accum {tc.grad_accum}) must "
                         f"be divisible by the {n} devices")
    state = jax.eval_shape(lambda: init_train_state(cfg, tc))
    state_sh = sharding.tree_shardings(state, mesh, tc.fsdp)
    step = make_train_step(cfg, tc, mesh, state_sh)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32,
                                  sharding=sharding.batch_sharding(mesh))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
    jitted: Any = step  # make_train_step returns a jitted function
    return jitted.lower(_abstract(state, state_sh), (tokens, tokens), key)

