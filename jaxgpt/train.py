"""Training: the text-generation loss, AdamW with warmup + cosine decay, a pure jitted train step,
and the loop around it (evaluation, samples, metrics, plots, rotating checkpoints, exact resume).

The pure part:

    tc = TrainConfig(steps=1000, batch_size=8, seq_len=256)
    state = init_train_state(cfg, tc, params)            # TrainState(step, params, opt_state)
    train_step = make_train_step(cfg, tc)                # jitted, state donated
    state, metrics = train_step(state, (inputs, targets), key)   # int32 [B, T] each

Weight decay applies to weight matrices only (every parameter with ndim >= 2: Dense kernels
and the embedding tables), never to biases or LayerNorm scale/shift, as GPT-2 practice and
nanoGPT do; the PyTorch equivalent is two AdamW param groups split on `p.dim() >= 2`.
Dropout keys are `fold_in(fold_in(key, step), micro_batch)`, so a resumed run draws the same
masks. `train_loop` is the only impure part.

Shapes: B batch, T sequence length, V vocab_size, A gradient-accumulation micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxgpt import checkpoint, sharding
from jaxgpt.config import GPTConfig
from jaxgpt.data import BatchLoader, LoaderState, SlidingWindows
from jaxgpt.model import GPTModel, init_params

IGNORE_INDEX = -100
# `jaxgpt train` with neither --preset nor --config: a small GPT-2-vocabulary model that
# learns visibly on a CPU in minutes (~14M parameters, most of them the embedding and head).
DEMO_CONFIG = GPTConfig(
    vocab_size=50257,
    context_length=128,
    emb_dim=128,
    n_heads=4,
    n_layers=4,
    drop_rate=0.1,
    qkv_bias=False,
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# --- loss ---------------------------------------------------------------------------------------


def cross_entropy_sum(
    logits: jax.Array, targets: jax.Array, ignore_index: int = IGNORE_INDEX
) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood and the number of counted targets.

    Args:
      logits: `[..., V]` (computed in float32).
      targets: int `[...]`; entries equal to `ignore_index` are left out.

    Returns:
      `(sum, count)`: float32 scalar, int32 scalar.
    """
    logits = logits.astype(jnp.float32)
    valid = targets != ignore_index  # [...]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [...]
    # The target logit by comparison with an iota rather than a gather: the gradient is then an
    # elementwise select that XLA fuses into softmax - onehot, where a gather's is a scatter.
    vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    picked = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)  # [...]
    nll = lse - picked
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def cross_entropy_loss(
    logits: jax.Array, targets: jax.Array, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """Mean cross-entropy over the targets not equal to `ignore_index`.

    The same as `torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())`
    (reduction "mean", ignore_index -100), which the seeds' `calc_loss_batch` computes.

    Args:
      logits: `[..., V]`, e.g. `[B, T, V]`.
      targets: int `[...]`, e.g. `[B, T]`.

    Returns:
      float32 scalar (NaN if every target is ignored, as in PyTorch).
    """
    total, count = cross_entropy_sum(logits, targets, ignore_index)
    return total / count


def perplexity(loss: float | jax.Array) -> float | jax.Array:
    """exp(loss): the effective number of equally likely next tokens."""
    if isinstance(loss, jax.Array):
        return jnp.exp(loss)
    return math.exp(loss)


# --- configuration, schedule, optimizer ---------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run (defaults: the seeds' AdamW(lr=4e-4, wd=0.1)).

    `lr` is the peak learning rate: linear warmup over `warmup_steps` from `lr / warmup_steps`,
    then cosine decay to `min_lr` at `steps` (`min_lr=None` means `lr / 10`; `min_lr=lr` gives
    the seeds' constant rate). `grad_clip` is the global-norm clip (None: off). `batch_size` is
    the global batch, split into `grad_accum` micro-batches. `dtype` is the compute dtype;
    parameters and optimizer state stay float32.
    """

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    stride: int | None = None  # None: seq_len (no overlap, as the seeds' chapter 5)
    lr: float = 4e-4
    min_lr: float | None = None
    warmup_steps: int = 0
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    train_ratio: float = 0.9
    seed: int = 123
    dtype: str = "float32"
    remat: bool = False
    fsdp: bool = False
    eval_every: int = 100
    eval_iters: int = 5
    save_every: int = 500
    keep: int = 3
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 30
    # Samples are drawn as the book's chapter 5 does (temperature, then top-k), with the key
    # PRNGKey(seed) at every evaluation: the samples differ only as the model does.
    sample_top_k: int = 25
    sample_temperature: float = 1.0

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"TrainConfig.{name} must be an int >= {minimum}, got {v!r}")

        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "eval_every",
            "eval_iters",
            "save_every",
            "keep",
        ):
            positive_int(name)
        for name in ("warmup_steps", "seed", "sample_tokens", "sample_top_k"):
            positive_int(name, 0)
        if not (isinstance(self.sample_temperature, (int, float)) and self.sample_temperature >= 0
                and math.isfinite(self.sample_temperature)):
            raise ValueError(
                f"TrainConfig.sample_temperature must be a finite number >= 0 (0 = greedy), "
                f"got {self.sample_temperature!r}"
            )
        if self.stride is not None:
            positive_int("stride")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(
                f"TrainConfig.min_lr must be in [0, TrainConfig.lr = {self.lr}], got {self.min_lr!r}"
            )
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"TrainConfig.warmup_steps ({self.warmup_steps}) exceeds TrainConfig.steps ({self.steps})"
            )
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"TrainConfig.weight_decay must be in [0, 1), got {self.weight_decay}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"TrainConfig.eps must be > 0, got {self.eps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"TrainConfig.batch_size ({self.batch_size}) must be divisible by "
                f"TrainConfig.grad_accum ({self.grad_accum})"
            )
        if not 0 < self.train_ratio < 1:
            raise ValueError(f"TrainConfig.train_ratio must be in (0, 1), got {self.train_ratio}")
        if self.dtype not in DTYPES:
            raise ValueError(
                f"TrainConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )

    @property
    def window_stride(self) -> int:
        return self.stride or self.seq_len

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# What a resumed run must share with the checkpoint's: the data it reads, in the same order.
_RESUME_DATA_FIELDS = ("batch_size", "seq_len", "stride", "train_ratio", "seed")
# Settings a resumed run may change (a diverged run retried with a lower --lr, a run extended
# with more --steps): the first group changes the losses from there on, the second only when
# the loop evaluates, samples or saves.
_RESUME_OPTIM_FIELDS = (
    "steps",
    "lr",
    "min_lr",
    "warmup_steps",
    "weight_decay",
    "b1",
    "b2",
    "eps",
    "grad_clip",
    "grad_accum",
    "dtype",
    "remat",
    "fsdp",
)
_RESUME_LOOP_FIELDS = (
    "eval_every",
    "eval_iters",
    "save_every",
    "keep",
    "sample_prompt",
    "sample_tokens",
    "sample_top_k",
    "sample_temperature",
)


def make_schedule(tc: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """Learning rate of update `step` (0-based): linear warmup, then cosine decay to `min_lr`.

    `lr * (step + 1) / warmup_steps` for `step < warmup_steps`; then
    `min_lr + (lr - min_lr) * (1 + cos(pi * (step - warmup) / (steps - warmup))) / 2`.
    """
    peak, final = float(tc.lr), float(tc.final_lr)
    warmup, decay_steps = tc.warmup_steps, max(tc.steps - tc.warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1.0) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """True for the parameters AdamW decays: the weight matrices (ndim >= 2)."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled decay on weight matrices only)."""
    adamw = optax.adamw(
        make_schedule(tc),
        b1=tc.b1,
        b2=tc.b2,
        eps=tc.eps,
        weight_decay=tc.weight_decay,
        mask=decay_mask,
    )
    # The chain has the same state tree with clipping on or off, so a run resumed with another
    # --grad-clip restores its AdamW moments.
    clip = optax.identity() if tc.grad_clip is None else optax.clip_by_global_norm(tc.grad_clip)
    return optax.chain(clip, adamw)


# --- the pure train step ------------------------------------------------------------------------


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
def _tree_all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def _flat_logits(model: GPTModel, params: Any, inputs: jax.Array, **kwargs) -> jax.Array:
    """Logits `[B * T, V]` of `inputs` `[B, T]`: the blocks, then the head on 2-D activations.

    Applying the head to `[B * T, D]` rather than `[B, T, D]` keeps the gradient of the
    `[D, V]` output kernel a plain matrix product; with the 3-D layout XLA's CPU backend
    transposes the whole `[B * T, V]` logit gradient first (twice as slow a step at V = 50257).
    """
    variables = {"params": params}
    hidden = model.apply(variables, inputs, method=GPTModel.hidden, **kwargs)  # [B, T, D]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [B * T, D]
    return model.apply(variables, hidden, method=GPTModel.head)  # [B * T, V]


def make_train_step(
    cfg: GPTConfig,
    tc: TrainConfig,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: Any = None,
    model: GPTModel | None = None,
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
    from `tc`.
    """
    if model is not None and model.cfg != cfg:
        raise ValueError(f"model.cfg {model.cfg} differs from cfg {cfg}")
    model = (GPTModel(cfg) if model is None else model).clone(dtype=DTYPES[tc.dtype],
                                                               remat=tc.remat)
    tx = make_optimizer(tc)
    schedule = make_schedule(tc)
    accum = tc.grad_accum
    train_dropout = cfg.drop_rate > 0

    def loss_part(params, inputs, targets, key, denom):
        logits = _flat_logits(
            model,
            params,
            inputs,
            deterministic=not train_dropout,
            rngs={"dropout": key} if train_dropout else None,
        )  # [b * T, V]
        total, _ = cross_entropy_sum(logits, targets.reshape(-1))
        return total / denom

    grad_fn = jax.value_and_grad(loss_part)

    def step_fn(state: TrainState, batch, key):
        inputs, targets = batch  # [B, T] each
        count = jnp.sum(targets != IGNORE_INDEX, dtype=jnp.int32)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        step_key = jax.random.fold_in(key, state.step)
        if accum == 1:
            loss, grads = grad_fn(state.params, inputs, targets, step_key, denom)
        else:
            b, t = inputs.shape

            # Row r goes to micro-batch r % A: each device's block of rows stays on it.
            def micro(x):
                return x.reshape(b // accum, accum, t).swapaxes(0, 1)  # [A, B/A, T]

            def body(carry, xs):
                i, inp, tgt = xs
                loss_i, g_i = grad_fn(
                    state.params, inp, tgt, jax.random.fold_in(step_key, i), denom
                )
                loss_sum, g_sum = carry
                return (loss_sum + loss_i, jax.tree_util.tree_map(jnp.add, g_sum, g_i)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            (loss, grads), _ = lax.scan(
                body,
                (jnp.zeros((), jnp.float32), zeros),
                (jnp.arange(accum), micro(inputs), micro(targets)),
            )
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


# Settings that only the loop reads: runs that differ in these share one compiled step.
_LOOP_ONLY = {
    "eval_every": 1,
    "eval_iters": 1,
    "save_every": 1,
    "keep": 1,
    "sample_prompt": "",
    "sample_tokens": 0,
    "sample_top_k": 0,
    "sample_temperature": 0.0,
}


@functools.lru_cache(maxsize=8)
def _sharded_train_step(cfg: GPTConfig, tc: TrainConfig, mesh: jax.sharding.Mesh):
    abstract = jax.eval_shape(lambda: init_train_state(cfg, tc))
    shardings = sharding.tree_shardings(abstract, mesh, tc.fsdp)
    return make_train_step(cfg, tc, mesh, shardings), shardings


def sharded_train_step(
    cfg: GPTConfig, tc: TrainConfig, mesh: jax.sharding.Mesh
) -> tuple[Callable, Any]:
    """`(train_step, state_shardings)` for `mesh`; cached, so repeated runs compile once."""
    return _sharded_train_step(cfg, tc.replace(**_LOOP_ONLY), mesh)


@functools.lru_cache(maxsize=8)
def make_eval_step(cfg: GPTConfig, dtype: str = "float32") -> Callable:
    """Jitted `eval_step(params, inputs, targets) -> (nll_sum, count)` with dropout off."""
    model = GPTModel(cfg, dtype=DTYPES[dtype])

    @jax.jit
    def eval_step(params, inputs, targets):
        return cross_entropy_sum(_flat_logits(model, params, inputs), targets.reshape(-1))

    return eval_step


def evaluate(
    eval_step: Callable, params: Any, batches: Sequence[tuple[np.ndarray, np.ndarray]]
) -> float:
    """Mean loss over all targets of `batches` (NaN if there are none)."""
    total, count = 0.0, 0
    for inputs, targets in batches:
        s, n = jax.device_get(eval_step(params, inputs, targets))
        total, count = total + float(s), count + int(n)
    return total / count if count else float("nan")


# --- checkpoints --------------------------------------------------------------------------------

CKPT_PREFIX = "step_"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints `ckpt_dir/step_NNNNNNNN`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [
        p
        for p in ckpt_dir.iterdir()
        if p.name.startswith(CKPT_PREFIX)
        and p.name[len(CKPT_PREFIX) :].isdigit()
        and checkpoint.is_checkpoint(p)
    ]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX) :]))


def _extra(state: TrainState, loader: BatchLoader, tokens_seen: int) -> dict:
    # The dropout key is not saved: it derives from the seed, which a resume must match.
    return {
        "step": state.step,
        "opt_state": state.opt_state,
        "loader": loader.state.to_array(),
        "tokens_seen": np.array(tokens_seen, np.int64),
    }


def save_train_checkpoint(
    ckpt_dir: Path,
    cfg: GPTConfig,
    tc: TrainConfig,
    state: TrainState,
    loader: BatchLoader,
    tokens_seen: int,
) -> Path:
    """Write `ckpt_dir/step_NNNNNNNN` (atomic), then delete all but the newest `tc.keep`.

    Collective with several processes (each writes its own shards; process 0 rotates). Only
    complete jaxgpt checkpoints holding nothing else are rotated out, and temporaries of
    saves killed earlier are removed (see `checkpoint.remove_stale_temporaries`).
    """
    step = int(state.step)
    path = ckpt_dir / f"{CKPT_PREFIX}{step:08d}"
    main = jax.process_index() == 0
    if main:
        checkpoint.remove_stale_temporaries(ckpt_dir)
    checkpoint.save(
        path,
        state.params,
        cfg,
        extra=_extra(state, loader, tokens_seen),
        metadata={"step": step, "tokens_seen": tokens_seen, "train": tc.to_dict()},
        overwrite=True,
    )
    # One process rotates (the others return once the save is committed); a directory holding
    # anything but what `save` wrote is kept.
    for old in list_checkpoints(ckpt_dir)[: -tc.keep] if main else []:
        if old != path and not checkpoint.foreign_entries(old):
            shutil.rmtree(old, ignore_errors=True)
    return path


def resume_changes(path: Path, cfg: GPTConfig, tc: TrainConfig) -> list[str]:
    """What this run changes from the run saved at `path`, one warning line each.

    Raises ValueError naming the field if the model config or a data setting
    (`_RESUME_DATA_FIELDS`) differs: the checkpoint's weights or data position would not fit.
    Optimisation and loop settings may change; the warnings say so.
    """
    saved_cfg = checkpoint.load_config(path)
    if saved_cfg != cfg:
        diff = [
            f"{k}: {saved_cfg.to_dict().get(k)!r} -> {v!r}"
            for k, v in cfg.to_dict().items()
            if saved_cfg.to_dict().get(k) != v
        ]
        raise ValueError(
            f"{path} was trained with another model config ({'; '.join(diff)}); "
            f"resume with the same --preset/--config/--init-from"
        )
    saved = checkpoint.load_metadata(path).get("train", {})
    for name in _RESUME_DATA_FIELDS:
        if saved.get(name) != getattr(tc, name):
            raise ValueError(
                f"{path} was trained with {name}={saved.get(name)!r}, this run has "
                f"{name}={getattr(tc, name)!r}: the data (order, windows, split) must stay the "
                f"same to resume; use --{name.replace('_', '-')} {saved.get(name)!r} or a new --out"
            )
    changes = []
    for name in _RESUME_OPTIM_FIELDS + _RESUME_LOOP_FIELDS:
        old, new = saved.get(name), getattr(tc, name)
        if name not in saved or old == new:
            continue
        if name in _RESUME_OPTIM_FIELDS:
            why = "the run is no longer an exact replay of an uninterrupted one"
        else:
            why = "changes only when the loop evaluates, samples or saves"
        changes.append(f"--{name.replace('_', '-')} changed from {old!r} to {new!r}: {why}")
    return changes


_RUN_ENTRIES = ("metrics.jsonl", "loss.png", "checkpoints")


def check_run_dir(out: Path) -> None:
    """Raise FileExistsError unless `out` is new, empty, or holds only what a run writes.

    A run rewrites `metrics.jsonl` and `loss.png` and rotates `checkpoints/`, so a directory
    holding anything else (a project, someone's notes) is refused rather than mixed into.
    """
    if out.is_symlink() and not out.exists():
        raise FileExistsError(f"{out} is a dangling symbolic link")
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    foreign = sorted(e.name for e in out.iterdir() if e.name not in _RUN_ENTRIES)
    if foreign:
        raise FileExistsError(
            f"{out} holds files that jaxgpt train did not write "
            f"({checkpoint.describe_names(foreign)}); a run directory holds "
            f"only {', '.join(_RUN_ENTRIES)}: choose a new or empty output directory"
        )


def restore_train_checkpoint(
    path: Path, state: TrainState, loader: BatchLoader
) -> tuple[TrainState, int]:
    """`(state, tokens_seen)` from `path`, with `loader.state` set to where the run stood.

    `state` gives the structure and the placement: its leaves (arrays or
    `jax.ShapeDtypeStruct`s) carry the shardings the restored arrays get, on any mesh, whatever
    the devices or processes that saved them.
    """
    shardings = jax.tree_util.tree_map(lambda x: getattr(x, "sharding", None), state.params)
    _, params = checkpoint.restore(path, shardings)
    extra = checkpoint.restore_extra(path, _extra(state, loader, 0))
    loader.state = LoaderState.from_array(extra["loader"])
    restored = TrainState(
        step=jnp.asarray(extra["step"], jnp.int32), params=params, opt_state=extra["opt_state"]
    )
    return restored, int(extra["tokens_seen"])


# --- the loop -----------------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the parameters became NaN or infinite."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a checkpoint of the current step was saved.

    `signum` is the signal, `step` the last completed step and `checkpoint` its directory.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}" if checkpoint else "no step completed, nothing saved"
        super().__init__(f"{name} at step {step}: {where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class _StopOnSignal:
    """While active, the first SIGINT/SIGTERM only sets `signum` (the loop stops after the
    step in flight and saves); a second one exits the process at once, without saving.

    Handlers are installed only in the main thread (Python allows no other); elsewhere the
    signals keep their default behaviour.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            os.write(2, b"\njaxgpt train: second interrupt: exiting now, without saving\n")
            os._exit(128 + signum)
        self.signum = signum
        os.write(
            2,
            f"\njaxgpt train: {signal.Signals(signum).name} received: stopping after this step "
            f"and saving a checkpoint (Ctrl-C again to quit at once)\n".encode(),
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _log(msg: str) -> None:
    """A message on stderr, from process 0 only."""
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def _agreed_signal(signum: int | None) -> int | None:
    """The stop signal as every process sees it: with several processes, a signal any of them
    received (a collective, so all of them stop after the same step and save together)."""
    if jax.process_count() == 1:
        return signum
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.array(signum or 0, np.int32))
    return int(np.max(got)) or None


def _clock(seconds: float) -> str:
    """`m:ss` or `h:mm:ss`."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Progress:
    """A one-line progress bar on stderr (a plain line every ~5% when stderr is not a terminal):
    step, loss, tokens/s, elapsed time and the estimated time left.

    The estimate is the wall time per step since the first step (which includes compiling),
    evaluations and saves included, times the steps left.
    """

    def __init__(self, total: int, start: int):
        self.total, self.start = total, start
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 20)
        self.rate = None
        self.calls = 0
        self.t_start = time.perf_counter()
        self.t_first = None  # when the first (compiling) step ended

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self.calls += 1
        now = time.perf_counter()
        if self.calls > 1:  # the first step includes compilation
            self.rate = tokens_per_s if self.rate is None else 0.9 * self.rate + 0.1 * tokens_per_s
        else:
            self.t_first = now
        eta = ""
        if self.calls > 1:
            per_step = (now - self.t_first) / (self.calls - 1)
            eta = f" ETA {_clock(per_step * (self.total - step))}"
        width = 24
        filled = int(width * step / self.total)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} "
            f"loss {loss:.4f} " + (f"{self.rate:,.0f} tok/s" if self.rate else "compiling")
            + f" elapsed {_clock(now - self.t_start)}{eta}"
        )
        if self.tty:
            print("\r" + line + "\x1b[K", end="", file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total:
            _log(line)

    def message(self, msg: str) -> None:
        if self.tty:
            print(file=sys.stderr)
        _log(msg)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(records: Sequence[dict], path: str | os.PathLike) -> Path | None:
    """Training and validation loss against tokens seen (the seeds' chapter-5 plot) as a PNG.

    Returns the path, or None (with a message) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        _log(
            "jaxgpt train: matplotlib is not installed; skipping the loss plot "
            "(pip install matplotlib)"
        )
        return None
    tokens = [r["tokens_seen"] for r in records]
    evals = [r for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    # Few points: mark each one, or a run of one step draws an empty line.
    marker = "o" if len(records) <= 50 else None
    ax.plot(tokens, [r["loss"] for r in records], marker=marker, markersize=3,
            label="Training loss", alpha=0.8)
    if evals:
        ax.plot(
            [r["tokens_seen"] for r in evals],
            [r["val_loss"] for r in evals],
            linestyle="-.",
            marker="o",
            markersize=3,
            label="Validation loss",
        )
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Loss")
    top = ax.twiny()  # steps along the top, as the seeds show epochs beside tokens seen
    top.plot([r["step"] for r in records], [r["loss"] for r in records], alpha=0)
    top.set_xlabel("Step")
    top.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    # The legend goes below the axes, outside them: inside, it can cover the only points.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _sample(params, cfg: GPTConfig, tc: TrainConfig) -> str | None:
    """`tc.sample_prompt` continued by `tc.sample_tokens` tokens drawn with temperature and top-k
    and the key PRNGKey(tc.seed) (None without a GPT-2 vocabulary)."""
    from jaxgpt.generation import generate
    from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

    if tc.sample_tokens == 0 or not tc.sample_prompt:
        return None
    tokenizer = get_tokenizer()
    idx = text_to_token_ids(tc.sample_prompt, tokenizer)
    if cfg.vocab_size < tokenizer.n_vocab or idx.shape[1] > cfg.context_length:
        return None  # a custom vocabulary: GPT-2 text has no meaning here
    if jax.process_count() > 1:
        # generate runs on this process's devices: every process gets all the weights (the
        # same in each, so they all draw the same sample).
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    sampled = tc.sample_temperature > 0
    out = generate(
        params,
        cfg,
        [[int(t) for t in jax.device_get(idx)[0]]],
        tc.sample_tokens,
        temperature=tc.sample_temperature,
        top_k=min(tc.sample_top_k, cfg.vocab_size) if sampled and tc.sample_top_k else None,
        key=jax.random.PRNGKey(tc.seed) if sampled else None,
    )
    return token_ids_to_text(out[0], tokenizer)


def check_tokens(tokens: np.ndarray, cfg: GPTConfig, name: str) -> None:
    """Every id in `tokens` must be < vocab_size (a pass over the data, chunked for memmaps)."""
    hi = 0
    for start in range(0, len(tokens), 1 << 24):
        hi = max(hi, int(np.max(tokens[start : start + (1 << 24)])))
    if len(tokens) and hi >= cfg.vocab_size:
        raise ValueError(
            f"{name} holds token id {hi}, outside the model's vocabulary [0, {cfg.vocab_size})"
        )


def _prepare_run(
    out: Path, cfg: GPTConfig, tc: TrainConfig, resume: bool
) -> tuple[Path | None, list[str]]:
    """Check `out` and the resume request: `(checkpoint to resume from or None, warnings)`."""
    check_run_dir(out)
    ckpt_dir = out / "checkpoints"
    existing = list_checkpoints(ckpt_dir)
    if existing and not resume:
        raise FileExistsError(
            f"{out} already holds checkpoints (newest {existing[-1].name}); "
            f"pass resume=True (--resume) or choose another output directory"
        )
    if resume and not existing:
        raise FileNotFoundError(
            f"nothing to resume: {ckpt_dir} holds no complete checkpoint; "
            f"run without --resume to start, or point --out at the run to continue"
        )
    if not existing:
        return None, []
    latest = existing[-1]
    changes = resume_changes(latest, cfg, tc)
    step = int(checkpoint.load_metadata(latest).get("step", 0))
    if tc.steps <= step:
        raise ValueError(
            f"{latest} is at step {step}; --steps {tc.steps} leaves nothing to do "
            f"(pass --steps > {step} to extend the run)"
        )
    return latest, changes


def train_loop(
    cfg: GPTConfig,
    tc: TrainConfig,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    params: Any | None = None,
    devices: Sequence[jax.Device] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train `cfg` on `train_tokens` for `tc.steps` updates; write everything under `out_dir`.

    Writes `out_dir/metrics.jsonl` (one object per step: `step`, `loss`, `tokens_seen`, `lr`,
    `grad_norm`, `tokens_per_s`; plus `val_loss`, `val_perplexity` and `sample` where
    evaluated), `out_dir/checkpoints/step_NNNNNNNN` every `tc.save_every` steps and at the end
    (the newest `tc.keep` kept), and `out_dir/loss.png`. `out_dir` must be new, empty or a run
    directory (`check_run_dir`). With `resume`, continues from the newest checkpoint with
    exactly the batches, dropout keys and optimizer state the uninterrupted run would have had;
    optimisation settings may differ from the saved run's (each change is logged as a warning),
    the model and data settings may not. `on_step(step, record)` is called after each step.

    SIGINT/SIGTERM (in the main thread) stop the run after the step in flight: a checkpoint of
    that step is saved, `metrics.jsonl` and `loss.png` are written, and TrainingInterrupted is
    raised. A second signal exits the process at once.

    Raises TrainingDiverged (nothing saved for that step) on a NaN or infinite loss, gradient or
    parameter; ValueError, FileExistsError or FileNotFoundError for settings that cannot work,
    before anything is compiled or written.

    Returns:
      The records of this run's steps (those of `metrics.jsonl` written by this call).
    """
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    if tc.seq_len > cfg.context_length:
        raise ValueError(
            f"seq_len {tc.seq_len} exceeds the model's context_length {cfg.context_length}"
        )
    latest, changes = _prepare_run(out, cfg, tc, resume)
    mesh = sharding.make_mesh(devices)
    n_dev = mesh.shape[sharding.DATA]
    sharding.check_batch_split(tc.batch_size)
    micro = tc.batch_size // tc.grad_accum
    if micro % n_dev:
        raise ValueError(
            f"the micro-batch (batch_size {tc.batch_size} / grad_accum "
            f"{tc.grad_accum} = {micro}) must be divisible by the {n_dev} devices"
        )
    check_tokens(train_tokens, cfg, "the training data")
    check_tokens(val_tokens, cfg, "the validation data")
    loader = BatchLoader(
        SlidingWindows(train_tokens, tc.seq_len, tc.window_stride), tc.batch_size, seed=tc.seed
    )
    val_windows = SlidingWindows(val_tokens, tc.seq_len, tc.seq_len)
    val_batches = []
    if len(val_windows):
        val_bs = min(tc.batch_size, len(val_windows))
        # Split over the devices when the rows divide evenly, else replicated.
        val_sh = sharding.batch_sharding(mesh) if val_bs % n_dev == 0 else sharding.replicated(mesh)
        val_batches = [
            sharding.put_batch(b, val_sh)
            for b in BatchLoader(val_windows, val_bs, shuffle=False).first(tc.eval_iters)
        ]
    else:
        _log(
            f"jaxgpt train: the validation split ({len(val_tokens)} tokens) is shorter than one "
            f"window of {tc.seq_len + 1}; no validation loss"
        )

    key = dropout_key(tc)
    train_step, shardings = sharded_train_step(cfg, tc, mesh)
    tokens_seen = 0
    if latest is not None:
        # Straight into this mesh's shardings: each process reads only its own shards.
        abstract = jax.eval_shape(lambda: init_train_state(cfg, tc))
        abstract = jax.tree_util.tree_map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings
        )
        state, tokens_seen = restore_train_checkpoint(latest, abstract, loader)
    else:
        state = jax.device_put(init_train_state(cfg, tc, params), shardings)
    eval_step = make_eval_step(cfg, tc.dtype)
    batch_sh = sharding.batch_sharding(mesh)
    batch_tokens = tc.batch_size * tc.seq_len

    start = int(state.step)
    metrics_path = out / "metrics.jsonl"
    main = jax.process_index() == 0  # the one writer of metrics, plot and messages
    out.mkdir(parents=True, exist_ok=True)
    if main:
        # An interrupted run may have logged steps past its last checkpoint: they are redone.
        kept = [r for r in _read_metrics(metrics_path) if r["step"] <= start] if latest else []
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    if latest is not None:
        _log(f"jaxgpt train: resumed from {latest} (step {start}, {tokens_seen:,} tokens seen)")
    for change in changes:
        _log(f"jaxgpt train: warning: {change}")
    _log(
        f"jaxgpt train: {sharding.describe(mesh, tc.fsdp)}; {len(loader.windows):,} training "
        f"windows of {tc.seq_len} tokens, {loader.batches_per_epoch} batches per epoch"
    )

    bar = _Progress(tc.steps, start) if progress and main else None
    records: list[dict] = []
    last_good, saved_step = latest, start
    with (
        _StopOnSignal() as stop,
        open(metrics_path, "a") if main else contextlib.nullcontext() as log_file,
    ):
        for step in range(start + 1, tc.steps + 1):
            t0 = time.perf_counter()
            # Each process builds only the rows its devices hold.
            idx = loader.next_indices()  # [B] window indices of the global batch
            batch = sharding.global_rows(
                lambda rows, idx=idx: loader.windows.get(idx[rows]), tc.batch_size, batch_sh
            )
            state, metrics = train_step(state, batch, key)
            m = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            loss = float(m["loss"])
            saving = step % tc.save_every == 0 or step == tc.steps
            # Parameters are checked only before they are saved: a full pass over them each
            # step costs more than the check is worth (a bad update shows in the next loss).
            if not bool(m["finite"]) or (saving and not bool(_tree_all_finite(state.params))):
                where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint saved"
                msg = (
                    f"jaxgpt train: non-finite values at step {step} (loss {loss}, grad norm "
                    f"{float(m['grad_norm'])}); stopped. {where}. Try a lower --lr or "
                    f"--grad-clip, then --resume"
                )
                if bar:
                    bar.message(msg)
                raise TrainingDiverged(msg)
            tokens_seen += batch_tokens
            record = {
                "step": step,
                "loss": loss,
                "tokens_seen": tokens_seen,
                "lr": float(m["lr"]),
                "grad_norm": float(m["grad_norm"]),
                "tokens_per_s": batch_tokens / dt,
            }
            signum = _agreed_signal(stop.signum)  # every process stops after the same step
            if (step % tc.eval_every == 0 or step == tc.steps) and signum is None:
                _evaluate_into(record, state.params, cfg, tc, eval_step, val_batches, bar)
            if main:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if saving or signum is not None:
                if not saving and not bool(_tree_all_finite(state.params)):
                    raise TrainingDiverged(
                        f"jaxgpt train: interrupted at step {step} with non-finite parameters; "
                        f"not saved. Last good checkpoint: {last_good}"
                    )
                last_good = save_train_checkpoint(ckpt_dir, cfg, tc, state, loader, tokens_seen)
                saved_step = step
            records.append(record)
            if bar:
                bar.update(step, loss, record["tokens_per_s"])
            if on_step is not None:
                on_step(step, record)
            if signum is not None:
                break
        if bar and bar.tty:
            print(file=sys.stderr)
        png = plot_losses(_read_metrics(metrics_path), out / "loss.png") if main else None
        if png:
            _log(f"jaxgpt train: loss plot in {png}")
        if signum is not None and saved_step < tc.steps:
            raise TrainingInterrupted(signum, saved_step, last_good)
    return records


def _evaluate_into(record, params, cfg, tc, eval_step, val_batches, bar) -> None:
    """Add `val_loss`, `val_perplexity` and `sample` to `record`; print them with `bar`."""
    if val_batches:
        val = evaluate(eval_step, params, val_batches)
        record["val_loss"] = val
        record["val_perplexity"] = math.exp(min(val, 700.0))
    sample = _sample(params, cfg, tc)
    if sample is not None:
        record["sample"] = sample
    if bar:
        val_txt = f"val loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        bar.message(f"step {record['step']}: train loss {record['loss']:.4f} {val_txt}".rstrip())
        if sample is not None:
            bar.message("  sample: " + sample.replace("\n", " "))
