"""The pure, jitted train step: `train_step(state, (inputs, targets), key) -> (state, metrics)`.

    tc = TrainConfig(steps=1000, batch_size=8, seq_len=256)
    state = init_train_state(cfg, tc, params)            # TrainState(step, params, opt_state)
    train_step = make_train_step(cfg, tc)                # jitted, state donated
    state, metrics = train_step(state, (inputs, targets), key)   # int32 [B, T] each

Dropout keys are `fold_in(fold_in(key, step), micro_batch)`, so a resumed run draws the same
masks. `jaxgpt.training.loop.train_loop` is the only impure part of training.

Shapes: B batch, T sequence length, D emb_dim, V vocab_size, A gradient-accumulation
micro-batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxgpt import sharding
from jaxgpt.config import GPTConfig
from jaxgpt.nn.hooks import hook_table
from jaxgpt.nn.model import (
    GPTModel,
    apply_method,
    head_param_names,
    init_params,
    model_for,
)
from jaxgpt.training.config import (
    DTYPES,
    TrainConfig,
    default,
    resolve_loss_chunk,
    resolve_remat,
    resume_fields,
)
from jaxgpt.training.loss import IGNORE_INDEX, chunked_cross_entropy_sum, cross_entropy_sum
from jaxgpt.training.optim import make_optimizer, make_schedule


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training: the step count, params, optimizer state."""

    step: jax.Array  # int32 scalar: updates done so far
    params: Any
    opt_state: Any


def init_train_state(cfg: GPTConfig, tc: TrainConfig, params: Any | None = None) -> TrainState:
    """Step 0 with `params` (default: `init_params(cfg, tc.seed)`) and fresh AdamW moments.

    `params` are copied: the train step donates the state, and the caller keeps its arrays.
    """
    if params is None:
        params = init_params(cfg, tc.seed)
    else:
        params = jax.tree_util.tree_map(jnp.array, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(tc).init(params)
    )


def dropout_key(tc: TrainConfig) -> jax.Array:
    """The run's base dropout key (the params use `PRNGKey(seed)` itself)."""
    return jax.random.fold_in(jax.random.PRNGKey(tc.seed), 1)


@jax.jit
def tree_all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def flat_logits(model: GPTModel, params: Any, inputs: jax.Array, deterministic: bool = True,
                rngs: Any = None) -> jax.Array:
    """Logits `[B * T, V]` of `inputs` `[B, T]`: the blocks, then the head on 2-D activations.

    Applying the head to `[B * T, D]` rather than `[B, T, D]` keeps the gradient of the
    `[D, V]` output kernel a plain matrix product; with the 3-D layout XLA's CPU backend
    transposes the whole `[B * T, V]` logit gradient first (twice as slow a step at V = 50257).
    """
    variables = {"params": params}
    hidden = apply_method(model, variables, GPTModel.hidden, rngs=rngs)(
        inputs, deterministic)  # [B, T, D]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [B * T, D]
    return apply_method(model, variables, GPTModel.head)(hidden)  # [B * T, V]


def loss_sum(
    model: GPTModel, params: Any, inputs: jax.Array, targets: jax.Array, chunk: int,
    deterministic: bool = True, rngs: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Summed NLL and target count of `inputs`/`targets` `[B, T]`: with `chunk` > 0 the head
    runs inside the chunked loss (`chunked_cross_entropy_sum`), else on all tokens at once."""
    if not chunk or inputs.size <= chunk:  # one chunk: the plain path is the same, and faster
        logits = flat_logits(model, params, inputs, deterministic, rngs)  # [B * T, V]
        return cross_entropy_sum(logits, targets.reshape(-1))
    variables = {"params": params}
    hidden = apply_method(model, variables, GPTModel.hidden, rngs=rngs)(
        inputs, deterministic)  # [B, T, D]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [B * T, D]
    head_params = {name: params[name] for name in head_param_names(model.cfg)}
    return chunked_cross_entropy_sum(functools.partial(_apply_head, model), head_params, hidden,
                                     targets.reshape(-1), chunk)


def _apply_head(model: GPTModel, head_params: Any, x: jax.Array) -> jax.Array:
    return apply_method(model, {"params": head_params}, GPTModel.head)(x)  # [L, V] float32


def make_train_step(
    cfg: GPTConfig,
    tc: TrainConfig,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: Any = None,
    model: GPTModel | None = None,
    hooks: Any = (),
) -> Callable[[TrainState, tuple[jax.Array, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """The jitted `train_step(state, (inputs, targets), key) -> (state, metrics)`.

    `state` is donated (its buffers are reused for the new state). The batch is int32
    `[B, T]` inputs and targets (targets may hold -100 to ignore a position). With
    `grad_accum = A > 1`, the batch is split into A micro-batches whose gradients are summed
    in a `lax.scan` and divided by the batch's target count, so the update equals the one of
    the whole batch at once. With a `mesh`, the batch is split over its `data` axis and the
    state keeps `state_shardings` (see `jaxgpt.sharding`).

    `metrics`: `loss` (mean over the batch, before the update), `grad_norm` (before
    clipping), `lr` (of this update), `tokens` (targets counted) and `finite` (loss and
    gradients are finite; the loop checks the parameters before it saves them).

    `model` trains a variant (`GPTModel(cfg, attention_cls=...)`); its dtype and remat are set
    from `tc`. `hooks` (`(name, fn)` pairs, `jaxgpt.nn.hooks`) run in every forward pass of
    the step (e.g. a head ablated while training); their arrays are constants of the step,
    and the gradients flow through them.
    """
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    model = model_for(cfg, model)
    model = model.clone(dtype=DTYPES[tc.dtype], remat=resolve_remat(tc.remat, platform),
                        hooks=model.hooks.plus(hook_table(cfg, hooks)))
    tx = make_optimizer(tc)
    schedule = make_schedule(tc)
    grad_fn = _loss_and_grad(model, resolve_loss_chunk(tc, platform), cfg.drop_rate > 0)

    def step_fn(state: TrainState, batch: tuple[jax.Array, jax.Array],
                key: jax.Array) -> tuple[TrainState, dict]:
        inputs, targets = batch  # [B, T] each
        count = jnp.sum(targets != IGNORE_INDEX, dtype=jnp.int32)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        step_key = jax.random.fold_in(key, state.step)
        loss, grads = _accumulate(grad_fn, state.params, inputs, targets, step_key, denom,
                                  tc.grad_accum)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "tokens": count,
            "finite": finite,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    batch_sh = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    return jax.jit(
        step_fn,
        donate_argnums=0,
        in_shardings=(state_shardings, (batch_sh, batch_sh), rep),
        out_shardings=(state_shardings, rep),
    )


GradFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def _loss_and_grad(model: GPTModel, loss_chunk: int, train_dropout: bool) -> GradFn:
    """`(params, inputs, targets, key, denom) -> (summed loss / denom, its gradient)`, with
    dropout drawn from `key` when the model has any."""

    def loss_part(params: Any, inputs: jax.Array, targets: jax.Array, key: jax.Array,
                  denom: jax.Array) -> jax.Array:
        total, _ = loss_sum(
            model,
            params,
            inputs,
            targets,
            loss_chunk,
            deterministic=not train_dropout,
            rngs={"dropout": key} if train_dropout else None,
        )
        return total / denom

    return jax.value_and_grad(loss_part)


def _accumulate(grad_fn: GradFn, params: Any, inputs: jax.Array, targets: jax.Array,
                key: jax.Array, denom: jax.Array, accum: int) -> tuple[jax.Array, Any]:
    """The loss and gradients of the batch `[B, T]`, over `accum` micro-batches summed in a
    `lax.scan` (micro-batch i draws dropout with `fold_in(key, i)`)."""
    if accum == 1:
        return grad_fn(params, inputs, targets, key, denom)
    b, t = inputs.shape

    # Row r goes to micro-batch r % A: each device's block of rows stays on it.
    def micro(x: jax.Array) -> jax.Array:
        return x.reshape(b // accum, accum, t).swapaxes(0, 1)  # [A, B/A, T]

    def body(carry: tuple[jax.Array, Any],
             xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[tuple[jax.Array, Any], None]:
        i, inp, tgt = xs
        loss_i, g_i = grad_fn(params, inp, tgt, jax.random.fold_in(key, i), denom)
        total, g_sum = carry
        return (total + loss_i, jax.tree_util.tree_map(jnp.add, g_sum, g_i)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (loss, grads), _ = lax.scan(
        body,
        (jnp.zeros((), jnp.float32), zeros),
        (jnp.arange(accum), micro(inputs), micro(targets)),
    )
    return loss, grads


@functools.lru_cache(maxsize=8)
def _sharded_train_step(cfg: GPTConfig, tc: TrainConfig,
                        mesh: jax.sharding.Mesh) -> tuple[Callable, Any]:
    abstract = jax.eval_shape(lambda: init_train_state(cfg, tc))
    shardings = sharding.tree_shardings(abstract, mesh, tc.fsdp)
    return make_train_step(cfg, tc, mesh, shardings), shardings


def sharded_train_step(
    cfg: GPTConfig, tc: TrainConfig, mesh: jax.sharding.Mesh
) -> tuple[Callable, Any]:
    """`(train_step, state_shardings)` for `mesh`; cached, so repeated runs compile once."""
    # Settings that only the loop reads do not change the step: runs differing in them share one.
    loop_only = {name: default(name) for name in resume_fields("loop")}
    return _sharded_train_step(cfg, tc.replace(**loop_only), mesh)


