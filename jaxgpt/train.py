"""Training: the text-generation loss, AdamW with warmup + cosine decay, a pure jitted train step.

The loop around it lives beside this module, one concern each: `jaxgpt.loop` (`train_loop`),
`jaxgpt.run_checkpoints` (a run's checkpoints, rotation, resume), `jaxgpt.progress` (progress
line, metrics file, loss plot) and `jaxgpt.samples` (the sample text at each evaluation). Their
public names stay importable from here (`from jaxgpt.train import train_loop`).

The pure part:

    tc = TrainConfig(steps=1000, batch_size=8, seq_len=256)
    state = init_train_state(cfg, tc, params)            # TrainState(step, params, opt_state)
    train_step = make_train_step(cfg, tc)                # jitted, state donated
    state, metrics = train_step(state, (inputs, targets), key)   # int32 [B, T] each

Weight decay applies to weight matrices only (every parameter with ndim >= 2: Dense kernels
and the embedding tables), never to biases or LayerNorm scale/shift, as GPT-2 practice and
nanoGPT do; the PyTorch equivalent is two AdamW param groups split on `p.dim() >= 2`.
Dropout keys are `fold_in(fold_in(key, step), micro_batch)`, so a resumed run draws the same
masks. `train_loop` (in `jaxgpt.loop`) is the only impure part.

Shapes: B batch, T sequence length, V vocab_size, A gradient-accumulation micro-batches.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxgpt import sharding
from jaxgpt.config import GPTConfig
from jaxgpt.model import REMAT_MODES, GPTModel, init_params, model_for, remat_mode

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


def _strided_chunks(a: jax.Array, chunks: int, fill: Any) -> jax.Array:
    """`[N, ...]` -> `[K, L, ...]`, chunk k holding rows k, k + K, k + 2K, ... (padded with
    `fill` to K * L rows). Strided rather than contiguous: with the batch split over devices,
    every chunk then holds rows of every device, so each scan step keeps them all busy."""
    n = a.shape[0]
    rows = -(-n // chunks)  # L
    a = jnp.pad(a, [(0, chunks * rows - n)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
    return a.reshape(rows, chunks, *a.shape[1:]).swapaxes(0, 1)


def _unchunk(a: jax.Array, n: int) -> jax.Array:
    """The inverse of `_strided_chunks`: `[K, L, ...]` -> the first `n` rows `[n, ...]`."""
    a = a.swapaxes(0, 1)  # [L, K, ...]
    return a.reshape(-1, *a.shape[2:])[:n]


def _nll(logits: jax.Array, targets: jax.Array, ignore_index: int):
    """float32 logits `[L, V]` -> (their logsumexp `[L]`, one-hot targets `[L, V]`, the NLL
    `[L]`, 0 where ignored)."""
    lse = jax.nn.logsumexp(logits, axis=-1)  # [L]
    # Picked by comparison with an iota, not a gather (see cross_entropy_sum).
    onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[:, None]  # [L, V]
    nll = lse - jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    return lse, onehot, jnp.where(targets != ignore_index, nll, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_nll_sum(head_params, x, targets, head, chunks, ignore_index):
    def body(total, xs):
        xc, tc = xs  # [L, D], [L]
        return total + jnp.sum(_nll(head(head_params, xc), tc, ignore_index)[2]), None

    xs = (_strided_chunks(x, chunks, 0), _strided_chunks(targets, chunks, ignore_index))
    total, _ = lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def _chunked_nll_sum_fwd(head_params, x, targets, head, chunks, ignore_index):
    # The gradients are computed here, chunk by chunk, while each chunk's logits exist; the
    # backward pass only scales them by the incoming cotangent. Same FLOPs as autodiff of the
    # plain path (logits, dx and dW: three matmuls of the head's size), no recomputation.
    def body(carry, xs):
        total, grads = carry  # [], head_params' float32 gradient so far
        xc, tc = xs  # [L, D], [L]
        logits, pull = jax.vjp(head, head_params, xc)  # [L, V] float32
        lse, onehot, nll = _nll(logits, tc, ignore_index)
        probs = jnp.exp(logits - lse[:, None])  # softmax, [L, V]
        valid = (tc != ignore_index)[:, None]
        dp, dx = pull(jnp.where(valid, probs - onehot.astype(jnp.float32), 0.0))
        grads = jax.tree_util.tree_map(lambda g, d: g + d.astype(jnp.float32), grads, dp)
        return (total + jnp.sum(nll), grads), dx

    xs = (_strided_chunks(x, chunks, 0), _strided_chunks(targets, chunks, ignore_index))
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), head_params)
    (total, grads), dx = lax.scan(body, (jnp.zeros((), jnp.float32), zeros), xs)  # dx [K, L, D]
    dx = _unchunk(dx, x.shape[0]).astype(x.dtype)  # [N, D]
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, head_params)
    return total, (grads, dx)


def _chunked_nll_sum_bwd(head, chunks, ignore_index, residuals, g):
    grads, dx = residuals
    scale = lambda a: a * g.astype(a.dtype)  # noqa: E731
    return jax.tree_util.tree_map(scale, grads), scale(dx), None


_chunked_nll_sum.defvjp(_chunked_nll_sum_fwd, _chunked_nll_sum_bwd)


def chunked_cross_entropy_sum(
    head: Callable[[Any, jax.Array], jax.Array],
    head_params: Any,
    x: jax.Array,
    targets: jax.Array,
    chunk_tokens: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy_sum(head(head_params, x), targets)` without ever holding all the logits.

    The output head and the loss run together over chunks of at most `chunk_tokens` tokens in
    a `lax.scan`, and a custom VJP computes the gradients inside the same scan, so neither the
    `[N, V]` logits nor their gradient exists at once (the idea of Liger's fused linear
    cross-entropy): the largest temporaries are a few `[chunk_tokens, V]` arrays. The loss and
    gradients are those of the plain path up to float32 summation order.

    Args:
      head: `(head_params, x [L, D]) -> float32 logits [L, V]`, row-wise (training passes
        `GPTModel.head`: final_norm and the output head); hashable.
      head_params: the parameters `head` reads (differentiated).
      x: `[N, D]` hidden states (the last block's output).
      targets: int `[N]`; entries equal to `ignore_index` are left out.
      chunk_tokens: the most tokens whose logits exist at once (>= 1).

    Returns:
      `(sum, count)` as `cross_entropy_sum`: float32 scalar, int32 scalar.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    chunks = -(-x.shape[0] // chunk_tokens)  # K
    total = _chunked_nll_sum(head_params, x, targets, head, chunks, ignore_index)
    return total, jnp.sum(targets != ignore_index, dtype=jnp.int32)


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
    parameters and optimizer state stay float32. `loss_chunk` runs the output head and the loss
    over chunks of that many tokens (`chunked_cross_entropy_sum`), so the `[B * T, V]` logits
    never exist at once; 0 computes them all (the plain path; same loss and gradients); None
    (default) is `AUTO_LOSS_CHUNK` on GPUs and TPUs and 0 on the CPU, where the chunks cost
    about 10% of a step's time and memory is not what limits a run. `remat` is what the
    backward pass recomputes instead of keeping (`GPTModel.remat`): "none", "attention" (the
    attention core's `[B, H, T, T]` scores, softmax and dropout; the matmul outputs are kept)
    or "block" (whole blocks); True and False, as older configs hold, mean "block" and
    "none"; None (default) is `AUTO_REMAT`: "attention" on GPUs and TPUs, "none" on the CPU.
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
    remat: bool | str | None = None  # "none", "attention", "block"; None: auto
    fsdp: bool = False
    loss_chunk: int | None = None  # tokens whose logits exist at once; 0: all; None: auto
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
        if self.loss_chunk is not None:
            positive_int("loss_chunk", 0)
        if self.remat is not None:
            try:
                mode = remat_mode(self.remat)
            except ValueError:
                raise ValueError(
                    f"TrainConfig.remat must be one of {', '.join(map(repr, REMAT_MODES))}, "
                    f"None (auto) or a bool (True = 'block', False = 'none'), got {self.remat!r}"
                ) from None
            object.__setattr__(self, "remat", mode)  # frozen; old configs' bools as modes
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


AUTO_LOSS_CHUNK = 1024


def resolve_loss_chunk(tc: TrainConfig, platform: str) -> int:
    """`tc.loss_chunk`, with None resolved for devices of `platform` ("cpu", "gpu", "tpu")."""
    if tc.loss_chunk is not None:
        return tc.loss_chunk
    return 0 if platform == "cpu" else AUTO_LOSS_CHUNK


# `TrainConfig.remat=None` by platform. On an accelerator memory limits the batch: keeping the
# attention core's [B, H, T, T] arrays out of the saved activations takes about three quarters
# off the 124M step's temporaries at T=1024 (H100 bf16 10.0 -> 2.3 GB, fp32 16.8 -> 4.4 GB,
# TPU v5e bf16 10.3 -> 2.7 GB; largest H100 batch 117 -> 314) for 0.5 TFLOP more per step
# (scripts/aot_report.py). The CPU keeps them: memory is not what limits a run there, and its
# step stays the program it was (at the CPU bench's size, T=128, the recomputation's cost is
# within the noise: 1.90 s per step either way).
AUTO_REMAT = "attention"


def resolve_remat(remat: bool | str | None, platform: str) -> str:
    """`TrainConfig.remat` (or a saved config's value) as one of `REMAT_MODES`, with None
    resolved for devices of `platform`: "none" on "cpu", `AUTO_REMAT` on any accelerator."""
    if remat is None:
        return "none" if platform == "cpu" else AUTO_REMAT
    return remat_mode(remat)


def _loss_sum(
    model: GPTModel, params: Any, inputs: jax.Array, targets: jax.Array, chunk: int, **kwargs
) -> tuple[jax.Array, jax.Array]:
    """Summed NLL and target count of `inputs`/`targets` `[B, T]`: with `chunk` > 0 the head
    runs inside the chunked loss (`chunked_cross_entropy_sum`), else on all tokens at once."""
    if not chunk or inputs.size <= chunk:  # one chunk: the plain path is the same, and faster
        logits = _flat_logits(model, params, inputs, **kwargs)  # [B * T, V]
        return cross_entropy_sum(logits, targets.reshape(-1))
    variables = {"params": params}
    hidden = model.apply(variables, inputs, method=GPTModel.hidden, **kwargs)  # [B, T, D]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [B * T, D]
    head_params = {name: params[name] for name in _head_param_names(model.cfg)}
    return chunked_cross_entropy_sum(functools.partial(_apply_head, model), head_params, hidden,
                                     targets.reshape(-1), chunk)


def _head_param_names(cfg: GPTConfig) -> tuple[str, ...]:
    """The parameters `GPTModel.head` reads: final_norm and the output head (tok_emb if tied)."""
    return ("final_norm", "tok_emb" if cfg.tie_embeddings else "out_head")


def _apply_head(model: GPTModel, head_params: Any, x: jax.Array) -> jax.Array:
    return model.apply({"params": head_params}, x, method=GPTModel.head)  # [L, V] float32


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
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    model = model_for(cfg, model).clone(dtype=DTYPES[tc.dtype],
                                        remat=resolve_remat(tc.remat, platform))
    tx = make_optimizer(tc)
    schedule = make_schedule(tc)
    accum = tc.grad_accum
    train_dropout = cfg.drop_rate > 0
    loss_chunk = resolve_loss_chunk(tc, platform)

    def loss_part(params, inputs, targets, key, denom):
        total, _ = _loss_sum(
            model,
            params,
            inputs,
            targets,
            loss_chunk,
            deterministic=not train_dropout,
            rngs={"dropout": key} if train_dropout else None,
        )
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


# --- the loop and its helpers, moved to their own modules ---------------------------------------

_MOVED = {
    "jaxgpt.loop": ("TrainingDiverged", "TrainingInterrupted", "train_loop", "check_tokens",
                    "_StopOnSignal", "_agreed_signal", "_evaluate_into"),
    "jaxgpt.run_checkpoints": ("CKPT_PREFIX", "list_checkpoints", "save_train_checkpoint",
                               "restore_train_checkpoint", "resume_changes", "check_run_dir",
                               "_extra", "_prepare_run", "_RESUME_DATA_FIELDS",
                               "_RESUME_OPTIM_FIELDS", "_RESUME_LOOP_FIELDS", "_RUN_ENTRIES"),
    "jaxgpt.progress": ("plot_losses", "_Progress", "_read_metrics", "_log", "_clock"),
    "jaxgpt.samples": ("_sample",),
}
_MOVED_FROM = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name: str) -> Any:
    # Loaded on first use: those modules import this one.
    if name in _MOVED_FROM:
        return getattr(importlib.import_module(_MOVED_FROM[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
