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
from jax import lax

from jaxgpt.config import GPTConfig
from jaxgpt.kv_cache import AttentionMask, KVCache, Layout

Dtype = Any
# GPT-2's initialisation (normal, std 0.02; zero biases). The seeds keep PyTorch's defaults;
# parity tests copy weights across, so the choice only matters when training from scratch.
_init = nn.initializers.normal(stddev=0.02)
_MASKED = jnp.finfo(jnp.float32).min
# What `GPTModel.remat` may be: recompute nothing, the attention core, or whole blocks.
REMAT_MODES = ("none", "attention", "block")


def remat_mode(remat: bool | str) -> str:
    """`GPTModel.remat` as one of `REMAT_MODES` (False is "none", True is "block")."""
    if remat is False or remat is True:
        return "block" if remat else "none"
    if isinstance(remat, str) and remat in REMAT_MODES:
        return remat
    raise ValueError(f"remat must be one of {', '.join(map(repr, REMAT_MODES))} (or a bool: "
                     f"True = 'block', False = 'none'), got {remat!r}")


def layer_norm(x: jax.Array, scale: jax.Array, shift: jax.Array, eps: float = 1e-5,
               dtype: Dtype = jnp.float32, one_pass: bool = False) -> jax.Array:
    """The seeds' LayerNorm as a function: stats in fp32, biased variance, result in `dtype`.

    The seeds take the mean, then the variance of `x - mean`: two reductions, one after the
    other. `one_pass` takes both from the same pass over `x` instead, as `mean(y)` and
    `mean(y**2) - mean(y)**2` of `y = x - x[..., :1]`, so a compiler can compute them in one
    kernel. Shifting by a value of the row keeps the subtraction from cancelling when the
    mean is large against the spread; the variance then differs from the seeds' by a few
    fp32 roundings (relative ~1e-7 times 1 + (x0 - mean)**2 / var).
    """
    x32 = x.astype(jnp.float32)
    if one_pass:
        y = x32 - lax.stop_gradient(x32[..., :1])
        mean_y = y.mean(axis=-1, keepdims=True)
        var = jnp.maximum(jnp.square(y).mean(axis=-1, keepdims=True) - jnp.square(mean_y), 0.0)
        centred = y - mean_y
    else:
        centred = x32 - x32.mean(axis=-1, keepdims=True)
        var = jnp.square(centred).mean(axis=-1, keepdims=True)
    norm_x = centred / jnp.sqrt(var + eps)
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
    # Statistics of a single row in one pass (`layer_norm`'s `one_pass`; GPU decoding at B=1).
    one_pass: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (self.emb_dim,), jnp.float32)
        shift = self.param("shift", nn.initializers.zeros, (self.emb_dim,), jnp.float32)
        one_pass = self.one_pass and math.prod(x.shape[:-1]) == 1
        return layer_norm(x, scale, shift, self.eps, self.dtype, one_pass)


def make_norm(norm_cls: type, emb_dim: int, dtype: Dtype, layout: Layout,
              name: str | None = None) -> nn.Module:
    """`norm_cls(emb_dim, dtype=dtype)`; a `LayerNorm` also gets `layout.one_pass_norm`
    (a variant's norm is built with the defaults' fields only)."""
    extra = {"one_pass": True} if layout.one_pass_norm and issubclass(norm_cls, LayerNorm) else {}
    return norm_cls(emb_dim, dtype=dtype, name=name, **extra)


class GELU(nn.Module):
    """GELU, tanh approximation, written out as in the seeds."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(x)


class Linear(nn.Module):
    """The seeds' `nn.Linear`: `x @ kernel + bias`, with nn.Dense's parameter names.

    `kernel` is `[in, out]` as in Flax; with `rows=True` it is held as `[out, in]`, a
    decode-time layout that XLA:CPU multiplies faster for a few rows (see `kv_cache.Layout`;
    `kv_cache.prepare` builds such params). Inputs and weights are cast to `dtype`.
    """

    features: int
    use_bias: bool = True
    rows: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_in = x.shape[-1]
        shape = (self.features, d_in) if self.rows else (d_in, self.features)
        kernel = self.param("kernel", _init, shape, jnp.float32)
        contract = ((x.ndim - 1,), (1 if self.rows else 0,))
        y = lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class FeedForward(nn.Module):
    """Linear(D, 4D) -> GELU -> Linear(4D, D); names `layers_0`/`layers_2` as in nn.Sequential.

    A variant (another activation, a gated unit) subclasses this and overrides `__call__`.
    """

    cfg: GPTConfig
    dtype: Dtype = jnp.float32
    layout: Layout = Layout()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.cfg.emb_dim
        lead = x.shape[:-1]
        # Matmuls on [B*T, D] rather than [B, T, D]: XLA:CPU then needs no transposing copies
        # in the backward pass.
        x = Linear(4 * d, rows=self.layout.fc, dtype=self.dtype, name="layers_0")(x.reshape(-1, d))
        x = GELU()(x)  # [B*T, 4D]
        x = Linear(d, rows=self.layout.proj, dtype=self.dtype, name="layers_2")(x)
        return x.reshape(*lead, d)  # [B, T, D]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with dropout on the attention weights.

    Called the seeds' way, `att(x)` with x `[B, T, D_in]` returns `[B, T, D_out]`. For cached
    decoding it also takes `mask` (an `AttentionMask` over S key slots), `cache` (this layer's
    keys and values, each `[B * H, S, Dh]`) and `slot` (where the T new keys are written), and
    returns `(out, cache)` with the new keys and values written in place.

    The attention weights `[B, H, T, S]` are sown as `intermediates/.../att/attn_weights`
    (kept only when applied with `mutable=["intermediates"]`). A variant that only changes
    the scores (ALiBi, relative positions) overrides `score_bias`.
    """

    d_in: int
    d_out: int
    context_length: int
    dropout: float
    num_heads: int
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32
    layout: Layout = Layout()

    def score_bias(self, mask: AttentionMask) -> jax.Array | None:
        """An additive bias on the scaled scores, broadcastable to `[B, H, T, S]`, or None.

        `mask.q_pos` `[B, T]` and `mask.k_pos` `[B, S]` are the tokens' positions (the same
        numbers `pos_emb` sees; -1 for a slot that holds no token).
        """
        return None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        deterministic: bool = True,
        mask: AttentionMask | None = None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        slot: jax.Array | int | None = None,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        b, t, _ = x.shape
        h, dh = self.num_heads, self.d_out // self.num_heads
        x2 = x.reshape(b * t, -1)  # [B*T, D_in]: 2-D matmuls (see FeedForward)

        def linear(features: int, name: str, bias: bool, rows: bool) -> Linear:
            return Linear(features, bias, rows, self.dtype, name=name)

        if self.layout.fused_qkv:  # one [D_in, 3D] matmul, built by kv_cache.prepare
            qkv = linear(3 * self.d_out, "W_qkv", self.qkv_bias, self.layout.qkv)(x2)
            q, k, v = jnp.split(qkv, 3, axis=-1)  # each [B*T, D]
        else:
            q, k, v = (linear(self.d_out, name, self.qkv_bias, self.layout.qkv)(x2)
                       for name in ("W_query", "W_key", "W_value"))

        def heads(y: jax.Array) -> jax.Array:  # [B*T, D] -> [B*H, T, Dh]
            return y.reshape(b, t, h, dh).transpose(0, 2, 1, 3).reshape(b * h, t, dh)

        q, keys, values = heads(q), heads(k), heads(v)
        if cache is not None:
            # The cache keeps batch and heads merged, [B*H, S, Dh], and is read as it is: with
            # a reshape between the update and the dot, XLA:CPU copied every layer's cache
            # twice per step.
            k_cache, v_cache = cache
            keys = lax.dynamic_update_slice(k_cache, keys.astype(k_cache.dtype), (0, slot, 0))
            values = lax.dynamic_update_slice(v_cache, values.astype(v_cache.dtype), (0, slot, 0))
        if mask is None:
            mask = AttentionMask.causal(t)
        s = keys.shape[1]
        # Decoding keeps the scores [B*H, T, S] up to the weighted sum: on TPU a reshape to
        # [B, H, T, S] and back is a copy each way (its tiled layouts), 61 more kernels per
        # step at B=32. Training keeps [B, H, T, S]: flat, XLA:TPU kept the attention arrays
        # that `remat="attention"` asks it to recompute (124M, B=8: 13.6 GB temp, not 2.7).
        flat = cache is not None
        scores = jnp.einsum("xqd,xkd->xqk", q, keys).astype(jnp.float32)  # [B*H, T, S]
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
        # A finite floor instead of -inf: the same softmax, and no NaN for an all-masked row.
        scores = jnp.where(allowed, scores, _MASKED)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [B*H | B, H, T, S]
        self.sow("intermediates", "attn_weights", weights.reshape(b, h, t, s),
                 init_fn=lambda: None, reduce_fn=lambda _, new: new)
        weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        weights = weights.reshape(b * h, t, s)
        context = jnp.einsum("xqk,xkd->xqd", weights, values)  # [B*H, T, Dh]
        context = context.reshape(b, h, t, dh).transpose(0, 2, 1, 3).reshape(b * t, self.d_out)
        out = linear(self.d_out, "out_proj", True, self.layout.out)(context)
        out = out.reshape(b, t, self.d_out)
        return out if cache is None else (out, (keys, values))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x))).

    The parts are module classes (fields), so a variant of one plugs in without copying the
    block; they are built with the defaults' fields (see `GPTModel`). The output is sown as
    `intermediates/.../out`. With a `cache` returns `(x, cache)` (see MultiHeadAttention).
    """

    cfg: GPTConfig
    dtype: Dtype = jnp.float32
    layout: Layout = Layout()
    attention_cls: type = MultiHeadAttention
    feed_forward_cls: type = FeedForward
    norm_cls: type = LayerNorm

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        deterministic: bool = True,
        mask: AttentionMask | None = None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        slot: jax.Array | int | None = None,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        cfg = self.cfg
        drop_resid = nn.Dropout(cfg.drop_rate)
        att = self.attention_cls(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            dropout=cfg.drop_rate,
            num_heads=cfg.n_heads,
            qkv_bias=cfg.qkv_bias,
            dtype=self.dtype,
            layout=self.layout,
            name="att",
        )
        shortcut = x
        x = make_norm(self.norm_cls, cfg.emb_dim, self.dtype, self.layout, "norm1")(x)
        x = att(x, deterministic, mask, cache, slot)
        if cache is not None:
            x, cache = x
        x = drop_resid(x, deterministic=deterministic) + shortcut

        shortcut = x
        x = make_norm(self.norm_cls, cfg.emb_dim, self.dtype, self.layout, "norm2")(x)
        x = self.feed_forward_cls(cfg, dtype=self.dtype, layout=self.layout, name="ff")(x)
        x = drop_resid(x, deterministic=deterministic) + shortcut
        self.sow("intermediates", "out", x, init_fn=lambda: None, reduce_fn=lambda _, new: new)
        return x if cache is None else (x, cache)


def _block_class(remat: bool | str) -> type:
    """TransformerBlock, rematerialised as `remat` asks (see `GPTModel`)."""
    mode = remat_mode(remat)
    if mode == "none":
        return TransformerBlock
    # The policy keeps the outputs of matmuls without batch dimensions, i.e. the 2-D
    # projections (Q/K/V, out_proj, both feed-forward layers: [B*T, D] and [B*T, 4D], cheap
    # to keep, a matmul each to redo); the batched attention matmuls, the [B, H, T, T] scores,
    # softmax and dropout mask, and the elementwise LayerNorm/GELU/residual work are recomputed
    # from them. Flax's lifted remat replays the same dropout rngs, so the masks are the same.
    policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if mode == "attention"
              else None)
    return nn.remat(TransformerBlock, static_argnums=(2,), policy=policy)


class GPTModel(nn.Module):
    """Token + position embeddings, dropout, `n_layers` blocks, final LayerNorm, output head.

    The one forward pass of jaxgpt: training, `generate_text_simple`, and `generate`'s prefill
    and cached decoding all apply this module.

    Args (module fields):
      cfg: the architecture.
      dtype: compute dtype (parameters stay float32; use bfloat16 for mixed precision).
      remat: what the backward pass recomputes instead of keeping (less memory, more
        compute): "none" (False), "attention" (keep the blocks' 2-D matmul outputs, recompute
        the attention core's `[B, H, T, T]` scores, softmax and dropout and the elementwise
        work), or "block" (True: keep only each block's input).
      layout: how the matrices are held (`kv_cache.Layout`); the default is the seeds' names
        and Flax's `[in, out]`. Generation sets it on a clone, with params from
        `kv_cache.prepare`.
      attention_cls, feed_forward_cls, norm_cls: the block's parts (default
        `MultiHeadAttention`, `FeedForward`, `LayerNorm`). A variant subclasses one, e.g.
        overrides `MultiHeadAttention.score_bias`, and every path uses it.

    Called the seeds' way, `apply(variables, in_idx)` with int `[B, T]` (T <= context_length)
    returns float32 logits `[B, T, V]`; dropout is off unless `deterministic=False` and a
    `dropout` rng is given. For generation it also takes, by keyword:
      positions: int `[B, T]`, each token's `pos_emb` row (default 0..T-1);
      valid: bool `[B, T]`, False for padding (no token attends to it);
      cache: a `kv_cache.KVCache` of S slots, and slot: where the T tokens are written (their
        keys attend to every valid slot up to their own); then returns `(logits, cache)`.
    `hidden` and `head` are the two halves, so a caller that needs one position's logits
    skips the V-wide head for the others.
    """

    cfg: GPTConfig
    dtype: Dtype = jnp.float32
    remat: bool | str = False
    layout: Layout = Layout()
    attention_cls: type = MultiHeadAttention
    feed_forward_cls: type = FeedForward
    norm_cls: type = LayerNorm

    def setup(self) -> None:
        cfg = self.cfg

        def embed(num: int) -> nn.Embed:
            return nn.Embed(num, cfg.emb_dim, embedding_init=_init, dtype=self.dtype,
                            param_dtype=jnp.float32)

        self.tok_emb = embed(cfg.vocab_size)
        self.pos_emb = embed(cfg.context_length)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        block = _block_class(self.remat)
        self.trf_blocks = [
            block(cfg, self.dtype, self.layout, attention_cls=self.attention_cls,
                  feed_forward_cls=self.feed_forward_cls, norm_cls=self.norm_cls)
            for _ in range(cfg.n_layers)
        ]
        self.final_norm = make_norm(self.norm_cls, cfg.emb_dim, self.dtype, self.layout)
        if not cfg.tie_embeddings:
            self.out_head = Linear(cfg.vocab_size, use_bias=False, rows=self.layout.head,
                                   dtype=self.dtype)

    def __call__(
        self,
        in_idx: jax.Array,
        deterministic: bool = True,
        *,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
        cache: KVCache | None = None,
        slot: jax.Array | int | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        out = self.hidden(in_idx, deterministic, positions=positions, valid=valid, cache=cache,
                          slot=slot)
        if cache is None:
            return self.head(out)
        hidden, cache = out
        return self.head(hidden), cache

    def hidden(
        self,
        in_idx: jax.Array,
        deterministic: bool = True,
        *,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
        cache: KVCache | None = None,
        slot: jax.Array | int | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Token ids `[B, T]` -> output of the last block `[B, T, D]` (before final_norm);
        with a cache, `(hidden, cache)`. Arguments as in `__call__`."""
        b, t = in_idx.shape
        if positions is None:
            positions = jnp.arange(t)[None, :]  # [1, T]
        x = self.tok_emb(in_idx) + self.pos_emb(positions)  # [B, T, D]
        x = self.drop_emb(x, deterministic=deterministic)
        # The new tokens as keys: their positions, -1 where they are padding.
        own = positions if valid is None else jnp.where(valid, positions, -1)  # [B|1, T]
        if cache is None:
            causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # [T, T]
            mask = AttentionMask(causal[None] & (own >= 0)[:, None, :], positions, own)
            for block in self.trf_blocks:
                x = block(x, deterministic, mask)
            return x
        if slot is None:
            raise ValueError("GPTModel: a cache needs the slot its tokens are written to")
        own = jnp.broadcast_to(own, (b, t)).astype(jnp.int32)
        k_pos = lax.dynamic_update_slice(cache.pos, own, (0, slot))  # [B, S]
        s = k_pos.shape[1]
        q_slot = slot + jnp.arange(t)  # [T]: each new token's own slot
        allowed = (k_pos >= 0)[:, None, :] & (jnp.arange(s)[None, None, :] <= q_slot[None, :, None])
        mask = AttentionMask(allowed, positions, k_pos)  # allowed [B, T, S]
        keys, values = [], []
        for block, kc, vc in zip(self.trf_blocks, cache.keys, cache.values, strict=True):
            x, (kc, vc) = block(x, deterministic, mask, (kc, vc), slot)
            keys.append(kc)
            values.append(vc)
        return x, KVCache(tuple(keys), tuple(values), k_pos)

    def head(self, x: jax.Array) -> jax.Array:
        """final_norm + output head: `[..., D]` -> float32 logits `[..., V]`."""
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            return self.tok_emb.attend(x).astype(jnp.float32)
        return self.out_head(x).astype(jnp.float32)


def model_for(cfg: GPTConfig, model: GPTModel | None) -> GPTModel:
    """The module to apply for `cfg`: `GPTModel(cfg)`, or the caller's variant, checked to be
    a `GPTModel` of that config (generation and training take one as `model=`)."""
    if model is None:
        return GPTModel(cfg)
    if not isinstance(model, GPTModel):
        raise ValueError(f"model must be a jaxgpt.GPTModel (or a subclass), got {type(model)}")
    if model.cfg != cfg:
        raise ValueError(f"model.cfg {model.cfg} differs from cfg {cfg}")
    return model


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
