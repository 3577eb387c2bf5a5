"""The pure, jitted SAE training step: `step(state, acts) -> (state, metrics)`, for one SAE or
several trained side by side on the same activations (one forward pass of the model).

    state = init_sae_state([SAEConfig("topk", 768, 6144, k=32, hook_name=hook)], tc)
    sae_step = make_sae_step(tc)                         # jitted, state donated
    state, metrics = sae_step(state, {hook: acts})       # acts [N, d_in]

Each update is sae-lens 6.54.12's `SAETrainer._train_step` for each SAE: the training forward
pass (`jaxgpt.sae.model.training_forward`) with the features dead for more than
`dead_feature_window` steps and the sparsity coefficient of this step, the gradient clipped to
global norm `grad_clip`, an Adam update at `lr_at(step)`, BatchTopK's threshold moved, JumpReLU's
threshold kept >= 0 (clamped before the forward pass, as sae-lens does), and the counters of
steps since each feature fired. `resample_dead_features` is Anthropic's resampling.

Shapes: N rows (tokens), F d_sae features, d d_in.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxgpt import sharding
from jaxgpt.sae.model import (
    SAE,
    SAEConfig,
    forward,
    init_sae,
    process_sae_in,
    training_forward,
    update_topk_threshold,
)
from jaxgpt.sae.sparse import SparseTrainOutput, topk_training_forward
from jaxgpt.sae.train_config import (
    SAETrainConfig,
    coefficient_at,
    default,
    lr_at,
    resume_fields,
)

# torch's Adam epsilon, which sae-lens leaves at its default.
ADAM_EPS = 1e-8
Acts = jax.Array | Mapping[str, jax.Array]


class SAETrainState(struct.PyTreeNode):
    """Everything an SAE training run changes, for each of its SAEs (a tuple, in order)."""

    step: jax.Array  # int32 scalar: updates done so far
    saes: tuple[SAE, ...]
    opt_states: tuple[Any, ...]  # Adam's moments of each SAE's params
    since_fired: tuple[jax.Array, ...]  # int32 [F]: sae-lens's n_forward_passes_since_fired
    scaling: tuple[jax.Array, ...]  # float32: each SAE's input factor (1 but for
    #                                  expected_average_only_in)


def optimizer(tc: SAETrainConfig) -> optax.GradientTransformation:
    """Adam's moments (the learning rate is applied by the step, from `lr_at`)."""
    return optax.scale_by_adam(b1=tc.adam_beta1, b2=tc.adam_beta2, eps=ADAM_EPS)


def init_key(cfg: SAEConfig, tc: SAETrainConfig) -> jax.Array:
    """The key an SAE of `cfg` is initialised with: `tc.seed` and the config itself, so an SAE
    starts the same whichever others train beside it."""
    return jax.random.fold_in(jax.random.key(tc.seed), zlib.crc32(repr(cfg).encode()) >> 1)


def init_sae_state(sae_cfgs: Sequence[SAEConfig], tc: SAETrainConfig,
                   saes: Sequence[SAE] | None = None,
                   scaling: Sequence[float] | None = None) -> SAETrainState:
    """Step 0: each SAE initialised as sae-lens does with `init_key(cfg, tc)` (or `saes`,
    copied: the step donates the state), fresh Adam moments, no feature dead."""
    if saes is None:
        saes = [init_sae(cfg, init_key(cfg, tc)) for cfg in sae_cfgs]
    else:
        saes = [jax.tree_util.tree_map(jnp.array, s) for s in saes]
    if len(saes) != len(sae_cfgs):
        raise ValueError(f"{len(saes)} SAEs given for {len(sae_cfgs)} configs")
    scaling = [1.0] * len(saes) if scaling is None else list(scaling)
    tx = optimizer(tc)
    return SAETrainState(
        step=jnp.zeros((), jnp.int32), saes=tuple(saes),
        opt_states=tuple(tx.init(s.params) for s in saes),
        since_fired=tuple(jnp.zeros(s.cfg.d_sae, jnp.int32) for s in saes),
        scaling=tuple(jnp.asarray(f, jnp.float32) for f in scaling))


def sae_input(acts: Acts, cfg: SAEConfig) -> jax.Array:
    """The rows SAE `cfg` trains on: `acts[cfg.hook_name]`, or `acts` itself if an array."""
    if not isinstance(acts, Mapping):
        return acts
    if cfg.hook_name is None or cfg.hook_name not in acts:
        raise ValueError(f"no activations for the SAE on {cfg.hook_name!r}: the batch holds "
                         f"{', '.join(map(str, acts))}")
    return acts[cfg.hook_name]


def clip_by_global_norm(grads: Any, max_norm: float | None) -> tuple[Any, jax.Array]:
    """`(grads scaled to norm <= max_norm, their norm before)`, as torch's `clip_grad_norm_`
    (the factor `max_norm / (norm + 1e-6)`, capped at 1)."""
    norm = optax.tree.norm(grads)
    if max_norm is None:
        return grads, norm
    factor = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
    return jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), grads), norm


def sparsity_coefficient(cfg: SAEConfig, step: jax.Array) -> jax.Array:
    """The sparsity coefficient of SAE `cfg` at `step` (standard: l1, jumprelu: l0; warmed
    up over their warm-up steps; topk/batchtopk have none)."""
    if cfg.architecture == "standard":
        return coefficient_at(cfg.l1_coefficient, cfg.l1_warm_up_steps, step)
    if cfg.architecture == "jumprelu":
        return coefficient_at(cfg.l0_coefficient, cfg.l0_warm_up_steps, step)
    return jnp.ones((), jnp.float32)


def sparse_path(cfg: SAEConfig) -> bool:
    """Whether SAE `cfg` trains through `jaxgpt.sae.sparse` (topk, without run-time
    normalisation) rather than `model.training_forward`."""
    return cfg.architecture == "topk" and cfg.normalize_activations not in (
        "constant_norm_rescale", "layer_norm")


def _loss(params: dict, sae: SAE, x: jax.Array, dead: jax.Array,
          coefficient: jax.Array) -> tuple[jax.Array, Any]:
    sae = sae.replace(params=params)
    if sparse_path(sae.cfg):
        out: Any = topk_training_forward(sae, x, dead)
    else:
        out = training_forward(sae, x, dead, coefficient)
    return out.loss, out


def _fired_and_l0(out: Any, d_sae: int) -> tuple[jax.Array, jax.Array]:
    """`(which features fired [F], mean active features per row)` of a training output."""
    if isinstance(out, SparseTrainOutput):
        active = out.acts != 0
        counts = jnp.zeros(d_sae, jnp.int32).at[out.idx.reshape(-1)].add(
            active.reshape(-1).astype(jnp.int32))
        return counts > 0, active.sum(-1).mean(dtype=jnp.float32)
    active = out.feature_acts != 0
    return active.any(0), active.sum(-1).mean(dtype=jnp.float32)


def _metrics(x: jax.Array, out: Any, l0: jax.Array, dead_after: jax.Array) -> dict[str, jax.Array]:
    """sae-lens's logged metrics of a step: its losses, L0, explained variance, dead count."""
    x = x.astype(jnp.float32)
    per_row = jnp.square(out.sae_out.astype(jnp.float32) - x).sum(-1)
    total_variance = jnp.square(x - x.mean(0)).sum(-1)
    return {
        "loss": out.loss, **out.losses, "l0": l0,
        "explained_variance": 1 - per_row.mean() / total_variance.mean(),
        "dead_features": dead_after.sum(dtype=jnp.int32),
        "dead_fraction": dead_after.mean(dtype=jnp.float32),
    }


def sae_update(sae: SAE, opt_state: Any, since_fired: jax.Array, x: jax.Array,
               step: jax.Array, tc: SAETrainConfig) -> tuple[SAE, Any, jax.Array, dict]:
    """One SAE's update on its (scaled) input rows `x [N, d]`: `(sae, opt_state, since_fired,
    metrics)`."""
    cfg = sae.cfg
    if cfg.architecture == "jumprelu":  # sae-lens projects the threshold before the pass
        sae = sae.replace(params={**sae.params,
                                  "threshold": jnp.maximum(sae.params["threshold"], 0.0)})
    dead = since_fired > tc.dead_feature_window
    coefficient = sparsity_coefficient(cfg, step)
    (_, out), grads = jax.value_and_grad(_loss, has_aux=True)(sae.params, sae, x, dead,
                                                             coefficient)
    grads, grad_norm = clip_by_global_norm(grads, tc.grad_clip)
    updates, opt_state = optimizer(tc).update(grads, opt_state, sae.params)
    lr = lr_at(tc, step)
    params = jax.tree_util.tree_map(lambda p, u: p - (lr * u).astype(p.dtype), sae.params,
                                    updates)
    new = sae.replace(params=params)
    if cfg.architecture == "batchtopk":
        new = update_topk_threshold(new, out.feature_acts)
    fired, l0 = _fired_and_l0(out, cfg.d_sae)
    since_fired = jnp.where(fired, 0, since_fired + 1)
    metrics = _metrics(x, out, l0, since_fired > tc.dead_feature_window)
    metrics.update(lr=lr, grad_norm=grad_norm, coefficient=coefficient)
    return new, opt_state, since_fired, metrics


StepFn = Callable[[SAETrainState, Acts], tuple[SAETrainState, tuple[dict, ...]]]


def make_sae_step(tc: SAETrainConfig, mesh: jax.sharding.Mesh | None = None) -> StepFn:
    """The jitted `step(state, acts) -> (state, metrics)` of every SAE of `state`.

    `acts` is `{hook_name: [N, d_in]}` (each SAE reads its `cfg.hook_name`), or one array
    `[N, d_in]` that every SAE reads. `state` is donated. `metrics[i]` holds SAE i's `loss`
    and its terms by sae-lens's names (`mse_loss`, `l1_loss`, `auxiliary_reconstruction_loss`,
    `l0_loss`, `pre_act_loss`), `l0`, `explained_variance`, `dead_features`, `dead_fraction`,
    `lr`, `grad_norm` (before clipping) and `coefficient`, all of this step's batch, before the
    update. With a `mesh`, the rows are split over its `data` axis and the state replicated.
    Cached: runs whose settings differ only in what the loop reads (`log_every`, ...) share
    one function, and so its compiled programs.
    """
    loop_only = {name: default(name) for name in resume_fields("loop")}
    return _make_sae_step(tc.replace(**loop_only), mesh)


@functools.lru_cache(maxsize=8)
def _make_sae_step(tc: SAETrainConfig, mesh: jax.sharding.Mesh | None) -> StepFn:
    def step_fn(state: SAETrainState, acts: Acts) -> tuple[SAETrainState, tuple[dict, ...]]:
        saes, opts, since, metrics = [], [], [], []
        for i, sae in enumerate(state.saes):
            x = sae_input(acts, sae.cfg) * state.scaling[i]
            new, opt, fired, m = sae_update(sae, state.opt_states[i], state.since_fired[i], x,
                                            state.step, tc)
            saes.append(new)
            opts.append(opt)
            since.append(fired)
            metrics.append(m)
        new_state = state.replace(step=state.step + 1, saes=tuple(saes), opt_states=tuple(opts),
                                  since_fired=tuple(since))
        return new_state, tuple(metrics)

    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    rep = sharding.replicated(mesh)
    return jax.jit(step_fn, donate_argnums=0, in_shardings=(rep, sharding.batch_sharding(mesh)),
                   out_shardings=(rep, rep))


# --- resampling ----------------------------------------------------------------------------

# Anthropic's factor: a resampled encoder row is the input at 0.2 x the alive rows' mean norm.
RESAMPLE_ENCODER_SCALE = 0.2
_ERROR_CHUNK = 4096  # rows whose reconstruction is computed at once while resampling


def _row_errors(sae: SAE, x: jax.Array) -> jax.Array:
    """`|forward(x) - x|^2` of each row of `x [R, d]`, `_ERROR_CHUNK` rows at a time."""
    r = x.shape[0]
    chunk = min(_ERROR_CHUNK, r)
    pad = -r % chunk
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[-1])
    errs = jax.lax.map(lambda c: jnp.square(forward(sae, c) - c.astype(sae.cfg.dtype)).sum(-1),
                       xs)
    return errs.reshape(-1)[:r].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("tc",), donate_argnums=(0, 1, 2))
def resample_dead(sae: SAE, opt_state: Any, since_fired: jax.Array, x: jax.Array,
                  scaling: jax.Array, key: jax.Array, tc: SAETrainConfig
                  ) -> tuple[SAE, Any, jax.Array, jax.Array]:
    """Anthropic's resampling (Towards Monosemanticity, 2023) of the features dead for more
    than `dead_feature_window` steps: `(sae, opt_state, since_fired, how many)`.

    Each dead feature gets an input row drawn from `x [R, d]` (times `scaling`) with
    probability proportional to the square of the SAE's squared error on it; its decoder row
    becomes that input as the encoder sees it (`x - b_dec`), normalised to the alive
    features' mean decoder norm (Anthropic's decoder rows all have norm 1; sae-lens's are free
    and its L1 penalty is weighted by them), its encoder column the same direction at 0.2 times
    the alive features' mean encoder norm, its encoder bias 0, and Adam's moments of all three
    0. Their counters restart.
    """
    x = x * scaling
    dead = since_fired > tc.dead_feature_window
    err = _row_errors(sae, x)
    logits = jnp.where(err > 0, 2 * jnp.log(jnp.maximum(err, 1e-30)), -jnp.inf)
    logits = jnp.where(jnp.isfinite(logits).any(), logits, 0.0)  # all exact: uniform
    rows = jax.random.categorical(key, logits, shape=(sae.cfg.d_sae,))
    v = process_sae_in(sae, x[rows]).astype(jnp.float32)  # [F, d]
    u = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-8)
    alive = ~dead
    p = sae.params

    def alive_mean(norms: jax.Array) -> jax.Array:
        return jnp.where(alive.any(), (norms * alive).sum() / jnp.maximum(alive.sum(), 1),
                         norms.mean())

    dec = alive_mean(jnp.linalg.norm(p["W_dec"], axis=-1))
    enc = alive_mean(jnp.linalg.norm(p["W_enc"], axis=0)) * RESAMPLE_ENCODER_SCALE
    new = dict(p)
    new["W_dec"] = jnp.where(dead[:, None], (u * dec).astype(p["W_dec"].dtype), p["W_dec"])
    new["W_enc"] = jnp.where(dead[None, :], (u * enc).T.astype(p["W_enc"].dtype), p["W_enc"])
    new["b_enc"] = jnp.where(dead, 0, p["b_enc"])

    def reset(moments: dict) -> dict:
        out = dict(moments)
        out["W_dec"] = jnp.where(dead[:, None], 0, moments["W_dec"])
        out["W_enc"] = jnp.where(dead[None, :], 0, moments["W_enc"])
        out["b_enc"] = jnp.where(dead, 0, moments["b_enc"])
        return out

    opt_state = opt_state._replace(mu=reset(opt_state.mu), nu=reset(opt_state.nu))
    since_fired = jnp.where(dead, 0, since_fired)
    return sae.replace(params=new), opt_state, since_fired, dead.sum()
