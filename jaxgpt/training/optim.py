"""The optimizer: global-norm clipping, then AdamW with linear warmup and cosine decay.

Weight decay applies to weight matrices only (every parameter with ndim >= 2: Dense kernels
and the embedding tables), never to biases or LayerNorm scale/shift, as GPT-2 practice and
nanoGPT do; the PyTorch equivalent is two AdamW param groups split on `p.dim() >= 2`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxgpt.training.config import TrainConfig


def make_schedule(tc: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """Learning rate of update `step` (0-based): linear warmup, then cosine decay to `min_lr`.

    `lr * (step + 1) / warmup_steps` for `step < warmup_steps`; then
    `min_lr + (lr - min_lr) * (1 + cos(pi * (step - warmup) / (steps - warmup))) / 2`.
    """
    peak, final = float(tc.lr), float(tc.final_lr)
    warmup, decay_steps = tc.warmup_steps, max(tc.steps - tc.warmup_steps, 1)

    def schedule(step: jax.Array | int) -> jax.Array:
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

