"""Quantized decoding: int8 matrices with float scales, a parameter transform.

`quantize_params` turns jaxgpt params into int8 matrices with one float32 scale per output
channel (symmetric absmax: `scale_j = max_i |w_ij| / 127`, `q = round(w / scale)`), and the
token embedding into int8 rows with one scale per row. LayerNorms, biases and `pos_emb` stay
float32. `GPTModel(cfg, layout=Layout(quant=mode))` reads such params: every `Linear` and the
tied head multiply through `matmul`, and the embedding lookup through `QuantEmbed`, so every
activation a hook sees is float.

Two modes (`MODES`):
- `int8`: int8 weights, the product in the compute dtype; `y = (x @ q) * scale`.
- `w8a8`: int8 weights and int8 activations, quantized per token on the fly (one absmax
  scale per row of `x`), multiplied with int32 accumulation; `y = (xq @ q) * a * scale`.

Shapes: N rows (tokens), I in features, O out features, V vocab_size, D emb_dim.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxgpt.config import GPTConfig

Dtype = Any
MODES = ("int8", "w8a8")
QMAX = 127  # symmetric: -128 is never used, so that -q is always an int8 too
# The book's matrices by block part, in the names of jaxgpt's params (`W_qkv`: already fused).
_MATRICES = {"att": ("W_query", "W_key", "W_value", "W_qkv", "out_proj"),
             "ff": ("layers_0", "layers_2")}


def check_mode(mode: Any) -> str | None:
    """`mode` if it is one of `MODES` or None; ValueError naming the allowed ones."""
    if mode is None or (isinstance(mode, str) and mode in MODES):
        return mode
    raise ValueError(f"quantize must be one of {', '.join(map(repr, MODES))} or None, "
                     f"got {mode!r}")


def quantize(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax int8 of `w`, one scale per slice along `axis` (the reduced axis).

    Returns `(q, scale)`: `q` int8 of `w`'s shape with `|w - q * scale| <= scale / 2`, and
    `scale` float32 of `w`'s shape without `axis` (1 where a slice is all zero, so that
    nothing divides by 0).
    """
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=axis)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / jnp.expand_dims(scale, axis)), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def _quantize_linear(p: dict) -> dict:
    """A Linear's params with its `[I, O]` kernel as int8 + per-column `kernel_scale` `[O]`."""
    q, scale = quantize(p["kernel"], axis=0)
    return {**p, "kernel": q, "kernel_scale": scale}


def is_quantized(params: Any) -> bool:
    """Whether `params` hold int8 matrices (from `quantize_params`)."""
    return any(getattr(leaf, "dtype", None) == jnp.int8
               for leaf in jax.tree_util.tree_leaves(params))


def quantize_params(params: Any, cfg: GPTConfig) -> dict:
    """The params of `GPTModel(cfg, layout=Layout(quant=...))` from float jaxgpt params.

    Every Linear's `kernel` `[I, O]` becomes int8 with `kernel_scale` float32 `[O]` (per
    output channel: the scale then factors out of each dot, so the product stays all int8);
    `tok_emb`'s `embedding` `[V, D]` becomes int8 with `embedding_scale` `[V]` (per row: a
    lookup reads whole rows, and with tied embeddings the rows are the head's output
    channels). Biases, LayerNorms and `pos_emb` are kept as they are. Run it eagerly, once;
    under `jax.eval_shape` it gives the shapes without allocating (`quantized_shapes`).
    """
    if is_quantized(params):
        raise ValueError("params are already quantized (int8 matrices); give float params")
    out = dict(params)
    for i in range(cfg.n_layers):
        block = dict(params[f"trf_blocks_{i}"])
        for part, names in _MATRICES.items():
            group = dict(block[part])
            for name in names:
                if name in group:
                    group[name] = _quantize_linear(group[name])
            block[part] = group
        out[f"trf_blocks_{i}"] = block
    if "out_head" in params:
        out["out_head"] = _quantize_linear(params["out_head"])
    q, scale = quantize(params["tok_emb"]["embedding"], axis=1)
    out["tok_emb"] = {"embedding": q, "embedding_scale": scale}
    return out


def _quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token (last-axis absmax) int8 of activations `[..., I]`: `(xq int8, a [..., 1])`."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    a = jnp.where(amax > 0, amax / QMAX, 1.0)
    return jnp.clip(jnp.round(x32 / a), -QMAX, QMAX).astype(jnp.int8), a


def matmul(x: jax.Array, q: jax.Array, scale: jax.Array, mode: str, *, rows: bool,
           pad_one_row: bool = False, dtype: Dtype = jnp.float32,
           columns: jax.Array | None = None) -> jax.Array:
    """`x @ (q * scale)` the way `mode` multiplies: `[..., I]` -> `[..., O]` in `dtype`.

    Args:
      x: float activations `[..., I]`.
      q: int8 weights, `[I, O]`, or `[O, I]` with `rows`.
      scale: float32 `[O]`, one per output channel.
      mode: "int8" (weights converted to `dtype`, scale after the dot: O multiplies per row,
        not I * O) or "w8a8" (x quantized per row, an int8 x int8 dot accumulated in int32).
      pad_one_row: w8a8 on a single row multiplies two (a zero row added, its result
        dropped): XLA:CPU converts the whole weight to int32 for a one-row int8 dot, and
        keeps it int8 from two rows on.
      columns: int `[C]`: only those output channels, `[..., C]`.
    """
    if columns is not None:
        q, scale = (q[columns] if rows else q[:, columns]), scale[columns]
    contract = (((x.ndim - 1,), (1 if rows else 0,)), ((), ()))
    if mode == "int8":
        y = lax.dot_general(x.astype(dtype), q.astype(dtype), contract)  # int8 -> dtype: exact
        return y * scale.astype(dtype)
    if mode != "w8a8":
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    xq, a = _quantize_rows(x)
    lead = x.shape[:-1]
    pad = pad_one_row and math.prod(lead) == 1
    if pad:
        xq = jnp.concatenate([xq.reshape(1, -1), jnp.zeros((1, xq.shape[-1]), jnp.int8)])
        contract = (((1,), (1 if rows else 0,)), ((), ()))
    acc = lax.dot_general(xq, q, contract, preferred_element_type=jnp.int32)
    if pad:
        acc = acc[:1].reshape(*lead, -1)
    return (acc.astype(jnp.float32) * a * scale).astype(dtype)


class QuantEmbed(nn.Module):
    """`nn.Embed` of int8 rows with a float32 scale per row: the quantized `tok_emb`.

    Params `embedding` int8 `[V, D]` and `embedding_scale` float32 `[V]` (`quantize_params`).
    `__call__(idx)` looks rows up as float (`q[idx] * scale[idx]`, in `dtype`); `attend(x)`
    is the tied output head through `matmul` (the rows are its output channels).
    """

    num_embeddings: int
    features: int
    quant: str = "int8"
    pad_one_row: bool = False
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        shape = (self.num_embeddings, self.features)
        self.embedding = self.param("embedding", nn.initializers.zeros, shape, jnp.int8)
        self.embedding_scale = self.param("embedding_scale", nn.initializers.ones,
                                          (self.num_embeddings,), jnp.float32)

    def __call__(self, idx: jax.Array) -> jax.Array:
        """int ids `[...]` -> float rows `[..., D]`."""
        rows = jnp.take(self.embedding, idx, axis=0).astype(jnp.float32)
        return (rows * jnp.take(self.embedding_scale, idx, axis=0)[..., None]).astype(self.dtype)

    def attend(self, x: jax.Array, columns: jax.Array | None = None) -> jax.Array:
        """`[..., D]` -> `[..., V]` (or `[..., C]` for `columns`): x times the table's rows."""
        return matmul(x, self.embedding, self.embedding_scale, self.quant, rows=True,
                      pad_one_row=self.pad_one_row, dtype=self.dtype, columns=columns)
