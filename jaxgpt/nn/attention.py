"""Causal multi-head self-attention, and the mask that says which keys each query may see.

Shapes: B batch, T new tokens (queries), S key slots, D emb_dim, H heads, Dh = D // H.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxgpt.nn.hooks import HookTable, hook_point
from jaxgpt.nn.layers import Dtype, Linear, make_linear
from jaxgpt.nn.layout import Layout

# A finite floor for masked scores instead of -inf: the same softmax, and no NaN for a row
# whose every key is masked.
MASKED = jnp.finfo(jnp.float32).min


class AttentionMask(NamedTuple):
    """Which keys each query may attend to, and where both stand in the sequence.

    Leading axes may be 1 (broadcast). `q_pos`/`k_pos` are the positions `pos_emb` sees; a
    variant of attention (ALiBi, relative positions) reads them.
    """

    allowed: jax.Array  # bool [B, T, S]
    q_pos: jax.Array  # int [B, T]
    k_pos: jax.Array  # int [B, S]; -1 for a slot that holds no token (empty, or padding)

    @classmethod
    def causal(cls, t: int) -> AttentionMask:
        """The book's mask for a window of `t` tokens at positions 0..t-1."""
        pos = jnp.arange(t)[None, :]  # [1, T]
        return cls(jnp.tril(jnp.ones((t, t), dtype=bool))[None], pos, pos)


class LayerOutput(NamedTuple):
    """What `MultiHeadAttention.attend` and `TransformerBlock.run` return, whatever the
    arguments: the layer's output and its keys and values.

    `kv` is the cache after the T new keys and values were written at `slot`, each
    `[B * H, S, Dh]`; without a cache, the T tokens' own, each `[B * H, T, Dh]`.
    """

    out: jax.Array  # [B, T, D]
    kv: tuple[jax.Array, jax.Array]  # (keys, values)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with dropout on the attention weights.

    Called the book's way, `att(x)` with x `[B, T, D_in]` returns `[B, T, D_out]`. Cached
    decoding calls `attend(x, deterministic, mask, cache, slot)`: `mask` an `AttentionMask`
    over S key slots, `cache` this layer's keys and values (each `[B * H, S, Dh]`), `slot`
    where the T new keys are written; it returns a `LayerOutput` whose `kv` is the cache with
    them written in place. `attend` is where the matrices are read (the compact method):
    `__call__` is `attend(x, deterministic).out`.

    Hook points (`nn.hooks`; what a hook sees, whatever the layout): `hook_q`, `hook_k`,
    `hook_v` `[B, T, H, Dh]` (the new tokens' own, also with fused Q/K/V), `hook_attn_scores`
    `[B, H, T, S]` (scaled, biased, masked with `MASKED`), `hook_pattern` `[B, H, T, S]` (the
    softmax, before dropout) and `hook_z` `[B, T, H, Dh]` (the weighted values, before
    `out_proj`). A variant that only changes the scores (ALiBi, relative positions) overrides
    `score_bias` and keeps them all.
    """

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    num_heads: int
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32
    layout: Layout = Layout()
    hooks: HookTable = HookTable()

    def hook(self, name: str, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """`x` through the hook point `name`, which sees it as `shape`; back in `x`'s shape."""
        if not self.hooks:
            return x
        return hook_point(self, self.hooks, name, x.reshape(shape)).reshape(x.shape)

    def masked_scores(self, scores: jax.Array, mask: AttentionMask, b: int,
                      flat: bool) -> jax.Array:
        """Raw scores `[B*H, T, S]` scaled by `1/sqrt(Dh)`, biased (`score_bias`) and masked
        (`MASKED` where `mask` forbids): `[B*H, T, S]` when `flat` (decoding) and there is no
        bias, else `[B, H, T, S]`."""
        h = self.num_heads
        _, t, s = scores.shape
        dh = self.d_out // h
        # Decoding keeps the scores [B*H, T, S]: XLA:TPU copies on each reshape of tiled scores.
        # Training keeps [B, H, T, S]: flat, XLA:TPU keeps what attention remat recomputes.
        bias = self.score_bias(mask)  # broadcastable to [B, H, T, S]
        allowed = mask.allowed  # [B | 1, T, S]
        if flat and bias is None:
            scores = scores / math.sqrt(dh)
            if allowed.shape[0] != 1:
                allowed = jnp.repeat(allowed, h, axis=0)  # [B*H, T, S]: row b's for its heads
        else:
            scores = scores.reshape(b, h, t, s) / math.sqrt(dh)
            scores = scores if bias is None else scores + bias
            allowed = allowed[:, None]  # [B | 1, 1, T, S]
        return jnp.where(allowed, scores, MASKED)

    def score_bias(self, mask: AttentionMask) -> jax.Array | None:
        """An additive bias on the scaled scores, broadcastable to `[B, H, T, S]`, or None.

        `mask.q_pos` `[B, T]` and `mask.k_pos` `[B, S]` are the tokens' positions (the same
        numbers `pos_emb` sees; -1 for a slot that holds no token).
        """
        return None

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """The book's forward: `[B, T, D_in]` -> `[B, T, D_out]`, causal over the T tokens."""
        return self.attend(x, deterministic).out

    @nn.compact
    def attend(
        self,
        x: jax.Array,
        deterministic: bool = True,
        mask: AttentionMask | None = None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        slot: jax.Array | int | None = None,
    ) -> LayerOutput:
        """`x` `[B, T, D_in]` attending over `mask` (default: causal over the T tokens) and,
        with a `cache`, over its slots with the new keys written at `slot` (see the class)."""
        b, t, _ = x.shape
        h, dh = self.num_heads, self.d_out // self.num_heads
        x2 = x.reshape(b * t, -1)  # [B*T, D_in]: 2-D matmuls (see FeedForward)

        def linear(features: int, name: str, bias: bool, rows: bool) -> Linear:
            return make_linear(features, bias, rows, self.dtype, self.layout, name)

        if self.layout.fused_qkv:  # one [D_in, 3D] matmul, built by layout.prepare
            qkv = linear(3 * self.d_out, "W_qkv", self.qkv_bias, self.layout.qkv)(x2)
            q, k, v = jnp.split(qkv, 3, axis=-1)  # each [B*T, D]
        else:
            q, k, v = (linear(self.d_out, name, self.qkv_bias, self.layout.qkv)(x2)
                       for name in ("W_query", "W_key", "W_value"))
        q, k, v = (self.hook(name, y, (b, t, h, dh))
                   for name, y in (("hook_q", q), ("hook_k", k), ("hook_v", v)))

        def heads(y: jax.Array) -> jax.Array:  # [B*T, D] -> [B*H, T, Dh]
            return y.reshape(b, t, h, dh).transpose(0, 2, 1, 3).reshape(b * h, t, dh)

        q, keys, values = heads(q), heads(k), heads(v)
        if cache is not None:
            # Read as it is, [B*H, S, Dh]: XLA:CPU copies the cache on a reshape before the dot.
            k_cache, v_cache = cache
            at: tuple[Any, ...] = (0, slot, 0)  # [B*H, S, Dh]: the new keys go to `slot`
            keys = lax.dynamic_update_slice(k_cache, keys.astype(k_cache.dtype), at)
            values = lax.dynamic_update_slice(v_cache, values.astype(v_cache.dtype), at)
        if mask is None:
            mask = AttentionMask.causal(t)
        s = keys.shape[1]
        scores = jnp.einsum("xqd,xkd->xqk", q, keys).astype(jnp.float32)  # [B*H, T, S]
        scores = self.masked_scores(scores, mask, b, flat=cache is not None)
        scores = self.hook("hook_attn_scores", scores, (b, h, t, s))
        if self.hooks:
            # A hook that scales MASKED up makes it -inf: a row of padding (every key masked)
            # would softmax to NaN, which the next layer's 0-weighted values carry to every row.
            scores = jnp.maximum(scores, MASKED)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [B*H | B, H, T, S]
        weights = self.hook("hook_pattern", weights, (b, h, t, s))
        weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        weights = weights.reshape(b * h, t, s)
        context = jnp.einsum("xqk,xkd->xqd", weights, values)  # [B*H, T, Dh]
        z = context.reshape(b, h, t, dh).transpose(0, 2, 1, 3)  # [B, T, H, Dh]
        context = self.hook("hook_z", z, z.shape).reshape(b * t, self.d_out)
        out = linear(self.d_out, "out_proj", True, self.layout.out)(context)
        out = out.reshape(b, t, self.d_out)
        return LayerOutput(out, (keys, values))

