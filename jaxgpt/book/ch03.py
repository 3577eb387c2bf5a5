"""The book's chapter-3 attention building blocks in Flax linen, named as in
`llms_from_scratch.ch03`.

`SelfAttention_v1` (plain weight matrices, no `nn.Linear`), `SelfAttention_v2` (the same with
Dense layers; no mask in either), `CausalAttention` (one head, causal mask, dropout on the
attention weights) and `MultiHeadAttentionWrapper` (a stack of `CausalAttention` heads whose
outputs are concatenated). The GPT model uses the fused `jaxgpt.nn.MultiHeadAttention`;
these are here to compare against. `params_from_torch` loads the weights of the PyTorch
versions (`W_query.weight` -> `W_query/kernel`, transposed; `heads.0.` -> `heads_0/`; v1's
`W_query` `[D_in, D_out]` -> `W_query` as it is).

Shapes: B batch, T tokens, D_in input width, D_out output width per head, H heads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _linear(features: int, use_bias: bool, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, name=name)


def _attend(queries: jax.Array, keys: jax.Array, values: jax.Array,
            mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """softmax(Q K^T / sqrt(d_k)) V, with masked scores set to -inf as in the book."""
    scores = queries @ jnp.swapaxes(keys, -1, -2)  # [..., T, T]
    if mask is not None:
        scores = jnp.where(mask, -jnp.inf, scores)
    weights = jax.nn.softmax(scores / math.sqrt(keys.shape[-1]), axis=-1)
    return weights, values


class SelfAttention_v1(nn.Module):
    """Scaled dot-product self-attention with trainable matrices `W_query`/`W_key`/`W_value`.

    The matrices are `[D_in, D_out]` parameters applied as `x @ W`, initialised uniformly in
    [0, 1) as the book's `torch.rand`; `SelfAttention_v2` replaces them with Dense layers
    (bias-free by default), whose kernels can be loaded here to give the same output.

    Call with `x` `[T, D_in]` (as the book) or `[B, T, D_in]`; returns `[..., T, D_out]`.
    """

    d_in: int
    d_out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.d_in, self.d_out)
        init = nn.initializers.uniform(scale=1.0)  # U[0, 1), as torch.rand
        w_query = self.param("W_query", init, shape)
        w_key = self.param("W_key", init, shape)
        w_value = self.param("W_value", init, shape)
        keys = x @ w_key  # [..., T, D_out]
        queries = x @ w_query
        values = x @ w_value
        weights, values = _attend(queries, keys, values)  # [..., T, T]
        return weights @ values


class SelfAttention_v2(nn.Module):
    """Scaled dot-product self-attention over all tokens (no mask, no dropout).

    Call with `x` `[T, D_in]` (as the book) or `[B, T, D_in]`; returns `[..., T, D_out]`.
    """

    d_in: int
    d_out: int
    qkv_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        keys = _linear(self.d_out, self.qkv_bias, "W_key")(x)  # [..., T, D_out]
        queries = _linear(self.d_out, self.qkv_bias, "W_query")(x)
        values = _linear(self.d_out, self.qkv_bias, "W_value")(x)
        weights, values = _attend(queries, keys, values)  # [..., T, T]
        return weights @ values


SelfAttention = SelfAttention_v2


class CausalAttention(nn.Module):
    """One causal attention head with dropout on the attention weights.

    Call with `x` `[B, T, D_in]` (T <= context_length); returns `[B, T, D_out]`. Dropout is
    active when `deterministic=False` and a `dropout` rng is given.
    """

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    qkv_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        t = x.shape[-2]
        if t > self.context_length:
            raise ValueError(f"{t} tokens exceed context_length {self.context_length}")
        keys = _linear(self.d_out, self.qkv_bias, "W_key")(x)  # [B, T, D_out]
        queries = _linear(self.d_out, self.qkv_bias, "W_query")(x)
        values = _linear(self.d_out, self.qkv_bias, "W_value")(x)
        future = jnp.triu(jnp.ones((t, t), dtype=bool), k=1)  # True above the diagonal
        weights, values = _attend(queries, keys, values, future)  # [B, T, T]
        weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        return weights @ values


class MultiHeadAttentionWrapper(nn.Module):
    """`num_heads` independent `CausalAttention` heads, outputs concatenated on the last axis.

    Call with `x` `[B, T, D_in]`; returns `[B, T, H * D_out]`.
    """

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    num_heads: int
    qkv_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        heads = [
            CausalAttention(
                self.d_in,
                self.d_out,
                self.context_length,
                self.dropout,
                self.qkv_bias,
                name=f"heads_{i}",
            )
            for i in range(self.num_heads)
        ]
        return jnp.concatenate([head(x, deterministic) for head in heads], axis=-1)


_V1_MATRICES = ("W_query", "W_key", "W_value")


def params_from_torch(state_dict: Mapping[str, Any]) -> dict:
    """Flax params from the state_dict of a book's ch03 module (any of the four above).

    `nn.Linear` weights `[out, in]` become kernels `[in, out]`; the `mask` buffers are dropped;
    `SelfAttention_v1`'s `nn.Parameter` matrices are already `[in, out]` and are kept as they are.
    """
    params: dict = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[-1] == "mask":
            continue
        array = tensor.detach().cpu().float().numpy() if hasattr(tensor, "detach") else tensor
        array = np.asarray(array, dtype=np.float32)
        if key in _V1_MATRICES:
            params[key] = jnp.asarray(array)
            continue
        if parts[-1] not in ("weight", "bias"):
            raise ValueError(
                f"unexpected state_dict key {key!r}: expected *.weight, *.bias, *.mask or one "
                f"of {', '.join(_V1_MATRICES)}"
            )
        path, i = [], 0
        while i < len(parts) - 1:  # "heads.0.W_query" -> ["heads_0", "W_query"]
            if i + 1 < len(parts) - 1 and parts[i + 1].isdigit():
                path.append(f"{parts[i]}_{parts[i + 1]}")
                i += 2
            else:
                path.append(parts[i])
                i += 1
        leaf = "kernel" if parts[-1] == "weight" else "bias"
        node = params
        for name in path:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(array.T if leaf == "kernel" else array)
    return params
