"""The GPT forward pass as pure functions over the params pytree, in the shapes decoding wants.

`GPTModel` (model.py) is the reference; these functions compute the same thing (a test pins the
logits to 1e-5) but are laid out for generation:

- `prepare` fuses `W_query`/`W_key`/`W_value` into one matrix, casts to the compute dtype and
  lays each matrix out as `[in, out]` (Flax's) or `[out, in]`, whichever XLA:CPU multiplies
  faster at the batch size (`Layout`), once per call, outside the decoding loop.
- Every row carries its own positions and its own first valid slot, so left-padded prompts of
  different lengths each see exactly what they would see alone.
- The KV cache keeps, per layer, keys and values as `[B * H, S, Dh]`: a new token's k/v (one
  position) is written in place, and attention reads the cache as it is, as a batched
  matrix-vector product over the B * H (row, head) pairs. The batch and head axes are merged
  because XLA:CPU otherwise reshapes the updated cache for the dot, which made it copy every
  layer's cache twice per step (measured: 14 of 42 ms per step at B=1 with 264 slots).

Shapes: B batch, T tokens in a window, S cache slots, D emb_dim, H heads, Dh = D // H,
V vocab_size, C context_length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxgpt.config import GPTConfig
from jaxgpt.model import gelu, layer_norm

_MASKED = jnp.finfo(jnp.float32).min  # as GPTModel: a finite floor, no NaN for empty rows


class Layout(NamedTuple):
    """Which matrices `prepare` stores as rows, `[out, in]` (True), instead of `[in, out]`.

    Decoding multiplies one or a few rows by each matrix, and on CPU XLA runs that at different
    speeds from the two layouts. Measured on a 2-core CPU (XLA:CPU, 124M, fp32, in a decoding
    loop): at one row only the `[4D, D]` projection is faster as rows (about 0.45 against
    0.7 ms) and the head is faster as `[D, V]` (6.3 against 7.7 ms); at 8 rows every matrix is
    as fast or faster as rows, the head most (12 against 23 ms). Transposing costs one pass over
    the weights per call (about 0.25 s for all of 124M here), outside the loop.
    """

    qkv: bool = False
    out: bool = False
    fc: bool = False
    proj: bool = False
    head: bool = False  # with tied embeddings the head is tok_emb, rows already: ignored

    @classmethod
    def for_batch(cls, batch: int) -> Layout:
        """The faster layout on CPU for `batch` rows (see the class docstring)."""
        return cls(proj=True) if batch == 1 else cls(True, True, True, True, True)


class LayerWeights(NamedTuple):
    """One transformer block's weights, prepared for decoding (matrices as `Weights.layout`)."""

    norm1: tuple[jax.Array, jax.Array]  # scale, shift [D] (float32)
    w_qkv: jax.Array  # [D, 3D]: W_query | W_key | W_value; [3D, D] as rows
    b_qkv: jax.Array | None  # [3D], None without qkv_bias
    w_out: jax.Array  # [D, D]
    b_out: jax.Array  # [D]
    norm2: tuple[jax.Array, jax.Array]
    w_fc: jax.Array  # [D, 4D]; [4D, D] as rows
    b_fc: jax.Array  # [4D]
    w_proj: jax.Array  # [4D, D]; [D, 4D] as rows
    b_proj: jax.Array  # [D]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tok_emb", "pos_emb", "layers",
                   "final_norm", "head"], meta_fields=["layout"])
@dataclasses.dataclass(frozen=True)
class Weights:
    """All weights, prepared for decoding by `prepare`; `layout` is static under jit."""

    tok_emb: jax.Array  # [V, D]
    pos_emb: jax.Array  # [C, D]
    layers: tuple[LayerWeights, ...]
    final_norm: tuple[jax.Array, jax.Array]
    head: jax.Array  # [D, V] (out_head's kernel); [V, D] as rows, and tok_emb when tied
    layout: Layout


class KVCache(NamedTuple):
    """Per layer, keys and values `[B * H, S, Dh]` of every slot written so far."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]


def prepare(
    params: Any, cfg: GPTConfig, dtype: Any = jnp.float32, layout: Layout | None = None
) -> Weights:
    """`Weights` from jaxgpt params: Q/K/V fused, matrices cast to `dtype` and laid out as
    `layout` says (norms stay fp32). Once per call, outside the loop; generation runs it
    eagerly (see `generation._prepare`), and it also works under jit. `layout` defaults to
    every matrix `[in, out]`."""
    layout = Layout() if layout is None else layout
    if cfg.tie_embeddings:
        layout = layout._replace(head=True)

    def cast(x: jax.Array) -> jax.Array:
        return jnp.asarray(x).astype(dtype)

    def matrix(kernel: jax.Array, rows: bool) -> jax.Array:  # a Flax kernel is [in, out]
        return cast(kernel).T if rows else cast(kernel)

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
                w_qkv=matrix(jnp.concatenate([m["kernel"] for m in qkv], axis=1), layout.qkv),
                b_qkv=cast(jnp.concatenate([m["bias"] for m in qkv])) if cfg.qkv_bias else None,
                w_out=matrix(att["out_proj"]["kernel"], layout.out),
                b_out=cast(att["out_proj"]["bias"]),
                norm2=norm(p["norm2"]),
                w_fc=matrix(ff["layers_0"]["kernel"], layout.fc),
                b_fc=cast(ff["layers_0"]["bias"]),
                w_proj=matrix(ff["layers_2"]["kernel"], layout.proj),
                b_proj=cast(ff["layers_2"]["bias"]),
            )
        )
    tok_emb = cast(params["tok_emb"]["embedding"])
    return Weights(
        tok_emb=tok_emb,
        pos_emb=cast(params["pos_emb"]["embedding"]),
        layers=tuple(layers),
        final_norm=norm(params["final_norm"]),
        head=tok_emb if cfg.tie_embeddings else matrix(params["out_head"]["kernel"], layout.head),
        layout=layout,
    )


def start_cache(window: KVCache, slots: int, dtype: Any = jnp.float32) -> KVCache:
    """A cache of `slots` positions per row, its first T filled from `forward_window`'s T."""

    def pad(kv: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        t = kv[0].shape[1]
        if slots < t:
            raise ValueError(f"a cache of {slots} slots cannot hold a {t}-token window")
        return tuple(jnp.pad(a.astype(dtype), ((0, 0), (0, slots - t), (0, 0))) for a in kv)

    return KVCache(keys=pad(window.keys), values=pad(window.values))


# --- pieces shared by the window and the single-token paths -----------------------------------


def _layer_norm(x: jax.Array, norm: tuple[jax.Array, jax.Array], dtype: Any) -> jax.Array:
    scale, shift = norm
    return layer_norm(x, scale, shift, dtype=dtype)


def _linear(x: jax.Array, w: jax.Array, rows: bool) -> jax.Array:
    """x `[..., in]` times w, which is `[in, out]`, or `[out, in]` when `rows`."""
    return jnp.einsum("...i,oi->...o" if rows else "...i,io->...o", x, w)


def _feed_forward(lw: LayerWeights, layout: Layout, x: jax.Array) -> jax.Array:
    dtype = lw.w_fc.dtype
    h = _layer_norm(x, lw.norm2, dtype)
    h = gelu(_linear(h, lw.w_fc, layout.fc) + lw.b_fc)  # [..., 4D]
    return x + (_linear(h, lw.w_proj, layout.proj) + lw.b_proj)  # [..., D]


def _qkv(lw: LayerWeights, layout: Layout, h: jax.Array) -> jax.Array:
    qkv = _linear(h, lw.w_qkv, layout.qkv)  # [..., 3D]
    return qkv if lw.b_qkv is None else qkv + lw.b_qkv


def _attend(q: jax.Array, keys: jax.Array, values: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax attention as GPTModel computes it (fp32 scores, finite mask floor).

    q `[..., Tq, Dh]`, keys/values `[..., Tk, Dh]` (leading axes `[B, H]`, or `[B * H]` for the
    cache), allowed bool broadcastable to `[..., Tq, Tk]`; returns `[..., Tq, Dh]`.
    """
    dh = q.shape[-1]
    scores = jnp.einsum("...qd,...kd->...qk", q, keys).astype(jnp.float32)
    scores = jnp.where(allowed, scores, _MASKED)
    weights = jax.nn.softmax(scores / math.sqrt(dh), axis=-1).astype(values.dtype)
    return jnp.einsum("...qk,...kd->...qd", weights, values)


def _embed(w: Weights, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    return jnp.take(w.tok_emb, tokens, axis=0) + jnp.take(w.pos_emb, positions, axis=0)


def logits_of(w: Weights, cfg: GPTConfig, x: jax.Array) -> jax.Array:
    """final_norm + output head: hidden `[..., D]` -> float32 logits `[..., V]`."""
    x = _layer_norm(x, w.final_norm, w.head.dtype)
    return _linear(x, w.head, w.layout.head).astype(jnp.float32)


# --- a whole window at once (prefill, and the recomputing path) -------------------------------


def forward_window(
    w: Weights, cfg: GPTConfig, tokens: jax.Array, positions: jax.Array, valid: jax.Array
) -> tuple[jax.Array, KVCache]:
    """Run a window of tokens through the blocks, causally.

    Args:
      tokens: int `[B, T]`; positions: int `[B, T]` (pos_emb rows); valid: bool `[B, T]`,
        False for padding, which no position attends to.

    Returns:
      hidden `[B, T, D]` (before final_norm) and every layer's keys/values `[B * H, T, Dh]`.
    """
    b, t = tokens.shape
    h, dh = cfg.n_heads, cfg.head_dim
    x = _embed(w, tokens, positions)  # [B, T, D]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # [T, T]
    allowed = (causal[None, :, :] & valid[:, None, :])[:, None]  # [B, 1, T, T]
    keys, values = [], []
    for lw in w.layers:
        qkv = _qkv(lw, w.layout, _layer_norm(x, lw.norm1, lw.w_qkv.dtype))  # [B, T, 3D]
        q, k, v = (
            a.reshape(b, t, h, dh).transpose(0, 2, 1, 3) for a in jnp.split(qkv, 3, axis=-1)
        )  # each [B, H, T, Dh]
        ctx = _attend(q, k, v, allowed).transpose(0, 2, 1, 3).reshape(b, t, h * dh)  # [B, T, D]
        x = x + (_linear(ctx, lw.w_out, w.layout.out) + lw.b_out)
        x = _feed_forward(lw, w.layout, x)
        keys.append(k.reshape(b * h, t, dh))
        values.append(v.reshape(b * h, t, dh))
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
) -> tuple[jax.Array, KVCache]:
    """Feed one token per row, write its keys/values at cache `slot`, attend to the row's past.

    Args:
      cache: `KVCache` with S slots; slots `[first_slot[b], slot)` of row b hold its past.
      tokens: int `[B]`; positions: int `[B]` (each row's own position).
      slot: int scalar, the slot this token is written to (the same for every row).
      first_slot: int `[B]`, each row's first valid slot (left padding before it).

    Returns:
      float32 logits `[B, V]` and the updated cache (in place under jit).
    """
    b = tokens.shape[0]
    h, dh = cfg.n_heads, cfg.head_dim
    slots = cache.keys[0].shape[1]
    x = _embed(w, tokens, positions)  # [B, D]
    at = jnp.arange(slots)  # [S]
    allowed = (at[None, :] >= first_slot[:, None]) & (at[None, :] <= slot)  # [B, S]
    allowed = jnp.repeat(allowed, h, axis=0)[:, None, :]  # [B * H, 1, S]
    new_keys, new_values = [], []
    for lw, kc, vc in zip(w.layers, cache.keys, cache.values):
        qkv = _qkv(lw, w.layout, _layer_norm(x, lw.norm1, lw.w_qkv.dtype))  # [B, 3D]
        q, k, v = (a.reshape(b * h, 1, dh) for a in jnp.split(qkv, 3, axis=-1))  # [B*H, 1, Dh]
        kc = lax.dynamic_update_slice(kc, k.astype(kc.dtype), (0, slot, 0))  # [B * H, S, Dh]
        vc = lax.dynamic_update_slice(vc, v.astype(vc.dtype), (0, slot, 0))
        ctx = _attend(q, kc, vc, allowed).reshape(b, h * dh)  # [B, D]
        x = x + (_linear(ctx, lw.w_out, w.layout.out) + lw.b_out)
        x = _feed_forward(lw, w.layout, x)
        new_keys.append(kc)
        new_values.append(vc)
    return logits_of(w, cfg, x), KVCache(tuple(new_keys), tuple(new_values))
