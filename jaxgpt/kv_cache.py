"""The GPT forward pass as pure functions over the params pytree, in the shapes decoding wants.

`GPTModel` (model.py) is the reference; these functions compute the same thing (a test pins the
logits to 1e-5) but are laid out for generation:

- `prepare` fuses `W_query`/`W_key`/`W_value` into one `[3D, D]` matrix, stores every matrix as
  `[out, in]` (one decoding step is a handful of rows times each matrix; on CPU XLA runs that
  faster from this layout, measured at B=8 about 1.3x-1.5x, and the same at B=1) and casts to the
  compute dtype, once per call, outside the decoding loop.
- Every row carries its own positions and its own first valid slot, so left-padded prompts of
  different lengths each see exactly what they would see alone.
- The KV cache keeps, per layer, keys and values as `[B, H, S, Dh]`: a new token's k/v (one
  position) is transposed into that layout, the cache itself never is, and attention reads
  it as a batched matrix-vector product.

Shapes: B batch, T tokens in a window, S cache slots, D emb_dim, H heads, Dh = D // H,
V vocab_size, C context_length.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxgpt.config import GPTConfig
from jaxgpt.model import gelu, layer_norm

_MASKED = jnp.finfo(jnp.float32).min  # as GPTModel: a finite floor, no NaN for empty rows


class LayerWeights(NamedTuple):
    """One transformer block's weights, prepared for decoding (matrices `[out, in]`)."""

    norm1: tuple[jax.Array, jax.Array]  # scale, shift [D] (float32)
    w_qkv: jax.Array  # [3D, D]: W_query | W_key | W_value
    b_qkv: jax.Array | None  # [3D], None without qkv_bias
    w_out: jax.Array  # [D, D]
    b_out: jax.Array  # [D]
    norm2: tuple[jax.Array, jax.Array]
    w_fc: jax.Array  # [4D, D]
    b_fc: jax.Array  # [4D]
    w_proj: jax.Array  # [D, 4D]
    b_proj: jax.Array  # [D]


class Weights(NamedTuple):
    """All weights, prepared for decoding by `prepare`."""

    tok_emb: jax.Array  # [V, D]
    pos_emb: jax.Array  # [C, D]
    layers: tuple[LayerWeights, ...]
    final_norm: tuple[jax.Array, jax.Array]
    head: jax.Array  # [V, D]: out_head's kernel transposed, or tok_emb when tied


class KVCache(NamedTuple):
    """Per layer, keys and values `[B, H, S, Dh]` of every slot written so far."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]


def prepare(params: Any, cfg: GPTConfig, dtype: Any = jnp.float32) -> Weights:
    """`Weights` from jaxgpt params: Q/K/V fused, matrices cast to `dtype` (norms stay fp32)."""

    def cast(x: jax.Array) -> jax.Array:
        return jnp.asarray(x).astype(dtype)

    def rows(kernel: jax.Array) -> jax.Array:  # a Flax kernel [in, out] -> [out, in]
        return cast(kernel).T

    def norm(p: Any) -> tuple[jax.Array, jax.Array]:
        return jnp.asarray(p["scale"], jnp.float32), jnp.asarray(p["shift"], jnp.float32)

    layers = []
    for i in range(cfg.n_layers):
        p = params[f"trf_blocks_{i}"]
        att, ff = p["att"], p["ff"]
        qkv = [att[name] for name in ("W_query", "W_key", "W_value")]
        layers.append(
            LayerWeights(
                norm1=norm(p["norm1"]),
                w_qkv=rows(jnp.concatenate([m["kernel"] for m in qkv], axis=1)),  # [3D, D]
                b_qkv=cast(jnp.concatenate([m["bias"] for m in qkv])) if cfg.qkv_bias else None,
                w_out=rows(att["out_proj"]["kernel"]),
                b_out=cast(att["out_proj"]["bias"]),
                norm2=norm(p["norm2"]),
                w_fc=rows(ff["layers_0"]["kernel"]),
                b_fc=cast(ff["layers_0"]["bias"]),
                w_proj=rows(ff["layers_2"]["kernel"]),
                b_proj=cast(ff["layers_2"]["bias"]),
            )
        )
    tok_emb = cast(params["tok_emb"]["embedding"])
    head = tok_emb if cfg.tie_embeddings else rows(params["out_head"]["kernel"])
    return Weights(
        tok_emb=tok_emb,
        pos_emb=cast(params["pos_emb"]["embedding"]),
        layers=tuple(layers),
        final_norm=norm(params["final_norm"]),
        head=head,
    )


def empty_cache(cfg: GPTConfig, batch: int, slots: int, dtype: Any = jnp.float32) -> KVCache:
    """A zero cache with `slots` positions per row."""
    shape = (batch, cfg.n_heads, slots, cfg.head_dim)

    def zeros() -> tuple[jax.Array, ...]:  # distinct buffers, so each can be donated
        return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))

    return KVCache(keys=zeros(), values=zeros())


# --- pieces shared by the window and the single-token paths -----------------------------------


def _layer_norm(x: jax.Array, norm: tuple[jax.Array, jax.Array], dtype: Any) -> jax.Array:
    scale, shift = norm
    return layer_norm(x, scale, shift, dtype=dtype)


def _linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w.T` for x `[..., in]` and w `[out, in]`."""
    return jnp.einsum("...i,oi->...o", x, w)


def _feed_forward(lw: LayerWeights, x: jax.Array) -> jax.Array:
    dtype = lw.w_fc.dtype
    h = _layer_norm(x, lw.norm2, dtype)
    h = gelu(_linear(h, lw.w_fc) + lw.b_fc)  # [..., 4D]
    return x + (_linear(h, lw.w_proj) + lw.b_proj)  # [..., D]


def _qkv(lw: LayerWeights, h: jax.Array) -> jax.Array:
    qkv = _linear(h, lw.w_qkv)  # [..., 3D]
    return qkv if lw.b_qkv is None else qkv + lw.b_qkv


def _attend(q: jax.Array, keys: jax.Array, values: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax attention as GPTModel computes it (fp32 scores, finite mask floor).

    q `[B, H, Tq, Dh]`, keys/values `[B, H, Tk, Dh]`, allowed bool broadcastable to
    `[B, H, Tq, Tk]`; returns `[B, H, Tq, Dh]`.
    """
    dh = q.shape[-1]
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, keys).astype(jnp.float32)
    scores = jnp.where(allowed, scores, _MASKED)
    weights = jax.nn.softmax(scores / math.sqrt(dh), axis=-1).astype(values.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, values)


def _embed(w: Weights, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    return jnp.take(w.tok_emb, tokens, axis=0) + jnp.take(w.pos_emb, positions, axis=0)


def logits_of(w: Weights, cfg: GPTConfig, x: jax.Array) -> jax.Array:
    """final_norm + output head: hidden `[..., D]` -> float32 logits `[..., V]`."""
    x = _layer_norm(x, w.final_norm, w.head.dtype)
    return _linear(x, w.head).astype(jnp.float32)


# --- a whole window at once (prefill, and the recomputing path) -------------------------------


def forward_window(
    w: Weights, cfg: GPTConfig, tokens: jax.Array, positions: jax.Array, valid: jax.Array
) -> tuple[jax.Array, KVCache]:
    """Run a window of tokens through the blocks, causally.

    Args:
      tokens: int `[B, T]`; positions: int `[B, T]` (pos_emb rows); valid: bool `[B, T]`,
        False for padding, which no position attends to.

    Returns:
      hidden `[B, T, D]` (before final_norm) and every layer's keys/values `[B, H, T, Dh]`.
    """
    b, t = tokens.shape
    h, dh = cfg.n_heads, cfg.head_dim
    x = _embed(w, tokens, positions)  # [B, T, D]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # [T, T]
    allowed = (causal[None, :, :] & valid[:, None, :])[:, None]  # [B, 1, T, T]
    keys, values = [], []
    for lw in w.layers:
        qkv = _qkv(lw, _layer_norm(x, lw.norm1, lw.w_qkv.dtype))  # [B, T, 3D]
        q, k, v = (
            a.reshape(b, t, h, dh).transpose(0, 2, 1, 3) for a in jnp.split(qkv, 3, axis=-1)
        )  # each [B, H, T, Dh]
        ctx = _attend(q, k, v, allowed).transpose(0, 2, 1, 3).reshape(b, t, h * dh)  # [B, T, D]
        x = x + (_linear(ctx, lw.w_out) + lw.b_out)
        x = _feed_forward(lw, x)
        keys.append(k)
        values.append(v)
    return x, KVCache(tuple(keys), tuple(values))


# --- one token per row, with the cache --------------------------------------------------------


def decode_step(
    w: Weights,
    cfg: GPTConfig,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    slot: jax.Array,
    first_slot: jax.Array,
    span: int | None = None,
) -> tuple[jax.Array, KVCache]:
    """Feed one token per row, write its keys/values at cache `slot`, attend to the row's past.

    Args:
      cache: `KVCache` with S slots; slots `[first_slot[b], slot)` of row b hold its past.
      tokens: int `[B]`; positions: int `[B]` (each row's own position).
      slot: int scalar, the slot this token is written to (the same for every row).
      first_slot: int `[B]`, each row's first valid slot (left padding before it).
      span: attend only to slots `[0, span)` (static; must exceed `slot`), default all S.

    Returns:
      float32 logits `[B, V]` and the updated cache (in place under jit).
    """
    b = tokens.shape[0]
    h, dh = cfg.n_heads, cfg.head_dim
    slots = cache.keys[0].shape[2]
    span = slots if span is None else span
    x = _embed(w, tokens, positions)  # [B, D]
    at = jnp.arange(span)  # [span]
    allowed = (at[None, :] >= first_slot[:, None]) & (at[None, :] <= slot)  # [B, span]
    allowed = allowed[:, None, None, :]  # [B, 1, 1, span]
    new_keys, new_values = [], []
    for lw, kc, vc in zip(w.layers, cache.keys, cache.values):
        qkv = _qkv(lw, _layer_norm(x, lw.norm1, lw.w_qkv.dtype))  # [B, 3D]
        q, k, v = (a.reshape(b, h, 1, dh) for a in jnp.split(qkv, 3, axis=-1))  # [B, H, 1, Dh]
        kc = lax.dynamic_update_slice(kc, k.astype(kc.dtype), (0, 0, slot, 0))  # [B, H, S, Dh]
        vc = lax.dynamic_update_slice(vc, v.astype(vc.dtype), (0, 0, slot, 0))
        if span == slots:
            k_seen, v_seen = kc, vc
        else:
            k_seen, v_seen = kc[:, :, :span], vc[:, :, :span]  # [B, H, span, Dh]
        ctx = _attend(q, k_seen, v_seen, allowed).reshape(b, h * dh)  # [B, D]
        x = x + (_linear(ctx, lw.w_out) + lw.b_out)
        x = _feed_forward(lw, x)
        new_keys.append(kc)
        new_values.append(vc)
    return logits_of(w, cfg, x), KVCache(tuple(new_keys), tuple(new_values))
