"""The seeds' GPT (chapter 4) in Flax linen, one module per class of the PyTorch reference.

Parameter names mirror `llms_from_scratch.ch04.GPTModel` so that a state_dict key such as
`trf_blocks.3.att.W_query.weight` maps to `params["trf_blocks_3"]["att"]["W_query"]["kernel"]`
(transposed: Flax kernels are `[in, out]`). The model returns logits; losses live in `train`.

Shapes: B batch, T tokens, D emb_dim, H heads, Dh = D // H, V vocab_size.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig

Dtype = Any
# GPT-2's initialisation (normal, std 0.02; zero biases). The seeds keep PyTorch's defaults;
# parity tests copy weights across, so the choice only matters when training from scratch.
_init = nn.initializers.normal(stddev=0.02)


def layer_norm(x: jax.Array, scale: jax.Array, shift: jax.Array, eps: float = 1e-5,
               dtype: Dtype = jnp.float32) -> jax.Array:
    """The seeds' LayerNorm as a function: stats in fp32, biased variance, result in `dtype`."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
    norm_x = (x32 - mean) / jnp.sqrt(var + eps)
    return (scale * norm_x + shift).astype(dtype)


def gelu(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation, written out as in the seeds."""
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + jnp.tanh(c * (x + 0.044715 * x**3)))


class LayerNorm(nn.Module):
    """`scale * (x - mean) / sqrt(var + eps) + shift` with the biased variance; stats in fp32."""

    emb_dim: int
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (self.emb_dim,), jnp.float32)
        shift = self.param("shift", nn.initializers.zeros, (self.emb_dim,), jnp.float32)
        return layer_norm(x, scale, shift, self.eps, self.dtype)


class GELU(nn.Module):
    """GELU, tanh approximation, written out as in the seeds."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(x)


def _dense(features: int, name: str | None, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=_init,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class FeedForward(nn.Module):
    """Linear(D, 4D) -> GELU -> Linear(4D, D); names `layers_0`/`layers_2` as in nn.Sequential."""

    cfg: GPTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.cfg.emb_dim
        lead = x.shape[:-1]
        # Matmuls on [B*T, D] rather than [B, T, D]: XLA:CPU then needs no transposing copies
        # in the backward pass.
        x = _dense(4 * d, "layers_0", self.dtype)(x.reshape(-1, d))  # [B*T, 4D]
        x = GELU()(x)
        return _dense(d, "layers_2", self.dtype)(x).reshape(*lead, d)  # [B, T, D]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with dropout on the attention weights."""

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    num_heads: int
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        b, t, _ = x.shape
        h, dh = self.num_heads, self.d_out // self.num_heads

        x2 = x.reshape(b * t, -1)  # [B*T, D_in]: 2-D matmuls (see FeedForward)

        def heads(name: str) -> jax.Array:
            y = _dense(self.d_out, name, self.dtype, self.qkv_bias)(x2)  # [B*T, D]
            return y.reshape(b, t, h, dh).transpose(0, 2, 1, 3)  # [B, H, T, Dh]

        queries, keys, values = heads("W_query"), heads("W_key"), heads("W_value")
        scores = (queries @ keys.transpose(0, 1, 3, 2)).astype(jnp.float32)  # [B, H, T, T]
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        # A finite floor instead of -inf: the same softmax, and no NaN for an all-masked row.
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores / math.sqrt(dh), axis=-1).astype(self.dtype)
        weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        context = (weights @ values).transpose(0, 2, 1, 3).reshape(b * t, self.d_out)  # [B*T, D]
        return _dense(self.d_out, "out_proj", self.dtype)(context).reshape(b, t, self.d_out)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    cfg: GPTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        drop_resid = nn.Dropout(cfg.drop_rate)
        att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            dropout=cfg.drop_rate,
            num_heads=cfg.n_heads,
            qkv_bias=cfg.qkv_bias,
            dtype=self.dtype,
            name="att",
        )
        shortcut = x
        x = LayerNorm(cfg.emb_dim, dtype=self.dtype, name="norm1")(x)
        x = att(x, deterministic)
        x = drop_resid(x, deterministic=deterministic) + shortcut

        shortcut = x
        x = LayerNorm(cfg.emb_dim, dtype=self.dtype, name="norm2")(x)
        x = FeedForward(cfg, dtype=self.dtype, name="ff")(x)
        return drop_resid(x, deterministic=deterministic) + shortcut


class GPTModel(nn.Module):
    """Token + position embeddings, dropout, `n_layers` blocks, final LayerNorm, output head.

    Args (module fields):
      cfg: the architecture.
      dtype: compute dtype (parameters stay float32; use bfloat16 for mixed precision).
      remat: rematerialise each block in the backward pass (less memory, more compute).

    Call with `in_idx` int `[B, T]` (T <= context_length); returns float32 logits `[B, T, V]`.
    Dropout is off unless `deterministic=False` and a `dropout` rng is given. The two halves
    are methods of their own (`hidden`, then `head`), so a caller that needs the logits of one
    position only can skip the V-wide head elsewhere.
    """

    cfg: GPTConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self) -> None:
        cfg = self.cfg

        def embed(num: int) -> nn.Embed:
            return nn.Embed(num, cfg.emb_dim, embedding_init=_init, dtype=self.dtype,
                            param_dtype=jnp.float32)

        self.tok_emb = embed(cfg.vocab_size)
        self.pos_emb = embed(cfg.context_length)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        block = nn.remat(TransformerBlock, static_argnums=(2,)) if self.remat else TransformerBlock
        self.trf_blocks = [block(cfg, dtype=self.dtype) for _ in range(cfg.n_layers)]
        self.final_norm = LayerNorm(cfg.emb_dim, dtype=self.dtype)
        if not cfg.tie_embeddings:
            self.out_head = _dense(cfg.vocab_size, None, self.dtype, use_bias=False)

    def __call__(self, in_idx: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.head(self.hidden(in_idx, deterministic))

    def hidden(self, in_idx: jax.Array, deterministic: bool = True) -> jax.Array:
        """Token ids `[B, T]` -> output of the last block `[B, T, D]` (before final_norm)."""
        _, seq_len = in_idx.shape
        x = self.tok_emb(in_idx) + self.pos_emb(jnp.arange(seq_len))  # [B, T, D]
        x = self.drop_emb(x, deterministic=deterministic)
        for block in self.trf_blocks:
            x = block(x, deterministic)
        return x

    def head(self, x: jax.Array) -> jax.Array:
        """final_norm + output head: `[..., D]` -> float32 logits `[..., V]`."""
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            return self.tok_emb.attend(x).astype(jnp.float32)
        return self.out_head(x).astype(jnp.float32)


@functools.lru_cache(maxsize=8)
def _jitted_init(cfg: GPTConfig):
    return jax.jit(GPTModel(cfg).init)


def init_params(cfg: GPTConfig, seed: int | jax.Array = 0) -> dict:
    """Random parameters for `cfg` (GPT-2 init), from an int seed or a PRNG key."""
    key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    dummy = jnp.zeros((1, 1), dtype=jnp.int32)
    return _jitted_init(cfg)(key, dummy)["params"]


def param_shapes(cfg: GPTConfig) -> dict:
    """The params pytree of `cfg` as `jax.ShapeDtypeStruct`s, with no memory allocated."""
    dummy = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(GPTModel(cfg).init, jax.random.PRNGKey(0), dummy)["params"]


def count_params(params: Any) -> int:
    """Total number of parameters (works on arrays or `ShapeDtypeStruct`s)."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def size_mb(params: Any, bytes_per_param: int = 4) -> float:
    """Size in MB as the seeds compute it: parameters * bytes / 1024**2 (fp32: 4 bytes)."""
    return count_params(params) * bytes_per_param / (1024 * 1024)
