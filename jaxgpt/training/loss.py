"""The text-generation loss: cross-entropy over the vocabulary, plain or chunked.

The chunked form runs the output head and the loss together over chunks of tokens, with the
gradients computed in the same pass, so the `[N, V]` logits never exist at once.

Shapes: N tokens, L tokens of a chunk, K chunks, D emb_dim, V vocab_size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

IGNORE_INDEX = -100


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
    (reduction "mean", ignore_index -100), which the book's `calc_loss_batch` computes.

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


def _nll(logits: jax.Array, targets: jax.Array,
         ignore_index: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 logits `[L, V]` -> (their logsumexp `[L]`, one-hot targets `[L, V]`, the NLL
    `[L]`, 0 where ignored)."""
    lse = jax.nn.logsumexp(logits, axis=-1)  # [L]
    # Picked by comparison with an iota, not a gather (see cross_entropy_sum).
    onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[:, None]  # [L, V]
    nll = lse - jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    return lse, onehot, jnp.where(targets != ignore_index, nll, 0.0)


HeadFn = Callable[[Any, jax.Array], jax.Array]  # (head params, x [L, D]) -> logits [L, V]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_nll_sum(head_params: Any, x: jax.Array, targets: jax.Array, head: HeadFn,
                     chunks: int, ignore_index: int) -> jax.Array:
    def body(total: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        xc, tc = xs  # [L, D], [L]
        return total + jnp.sum(_nll(head(head_params, xc), tc, ignore_index)[2]), None

    xs = (_strided_chunks(x, chunks, 0), _strided_chunks(targets, chunks, ignore_index))
    total, _ = lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def _chunked_nll_sum_fwd(head_params: Any, x: jax.Array, targets: jax.Array, head: HeadFn,
                         chunks: int, ignore_index: int) -> tuple[jax.Array, tuple[Any, jax.Array]]:
    # The gradients are computed here, chunk by chunk, while each chunk's logits exist; the
    # backward pass only scales them by the incoming cotangent. Same FLOPs as autodiff of the
    # plain path (logits, dx and dW: three matmuls of the head's size), no recomputation.
    def body(carry: tuple[jax.Array, Any],
             xs: tuple[jax.Array, jax.Array]) -> tuple[tuple[jax.Array, Any], jax.Array]:
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


def _chunked_nll_sum_bwd(head: HeadFn, chunks: int, ignore_index: int,
                         residuals: tuple[Any, jax.Array],
                         g: jax.Array) -> tuple[Any, jax.Array, None]:
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
