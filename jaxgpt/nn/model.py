"""The book's GPT (chapter 4): transformer blocks and the model, in Flax linen.

Parameter names mirror `llms_from_scratch.ch04.GPTModel` so that a state_dict key such as
`trf_blocks.3.att.W_query.weight` maps to `params["trf_blocks_3"]["att"]["W_query"]["kernel"]`
(transposed: Flax kernels are `[in, out]`). The model returns logits; losses live in
`jaxgpt.training.loss`.

Shapes: B batch, T tokens, D emb_dim, H heads, Dh = D // H, V vocab_size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxgpt.config import GPTConfig
from jaxgpt.nn.attention import AttentionMask, MultiHeadAttention
from jaxgpt.nn.cache import KVCache
from jaxgpt.nn.hooks import HookTable, hook_point
from jaxgpt.nn.layers import INIT, Dtype, FeedForward, LayerNorm, Linear, make_norm
from jaxgpt.nn.layout import Layout

# What `GPTModel.remat` may be: recompute nothing, the attention core, or whole blocks.
REMAT_MODES = ("none", "attention", "block")
# How far `GPTModel(cfg, dtype=jnp.bfloat16)`'s logits may be from fp32's, as a fraction of
# the largest fp32 logit: bf16 keeps 8 significant bits (2^-9 ~ 0.2% per rounding), and
# through the blocks, norms and head the error stays within a few such steps (~0.5% measured
# on the tests' tiny model). The tests and `scripts/gpu_check.py` hold bf16 to it.
BF16_LOGITS_REL_ERROR = 0.02


def remat_mode(remat: bool | str) -> str:
    """`GPTModel.remat` as one of `REMAT_MODES` (False is "none", True is "block")."""
    if remat is False or remat is True:
        return "block" if remat else "none"
    if isinstance(remat, str) and remat in REMAT_MODES:
        return remat
    raise ValueError(f"remat must be one of {', '.join(map(repr, REMAT_MODES))} (or a bool: "
                     f"True = 'block', False = 'none'), got {remat!r}")


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x))).

    The parts are module classes (fields), so a variant of one plugs in without copying the
    block; they are built with the defaults' fields (see `GPTModel`), and a subclass of a
    default part also gets the hook table. With a `cache` returns `(x, cache)` (see
    MultiHeadAttention). Hook points `[B, T, D]`: `hook_resid_pre` (the input),
    `hook_attn_out`, `hook_resid_mid`, `hook_mlp_out`, `hook_resid_post` (the output); the
    parts' under `ln1`, `attn`, `ln2`, `mlp`.
    """

    cfg: GPTConfig
    dtype: Dtype = jnp.float32
    layout: Layout = Layout()
    attention_cls: type = MultiHeadAttention
    feed_forward_cls: type = FeedForward
    norm_cls: type = LayerNorm
    hooks: HookTable = HookTable()

    def part_hooks(self, cls: type, base: type, part: str) -> dict:
        """`{"hooks": ...}` for a part of class `cls` if it has the default's hook field."""
        return {"hooks": self.hooks.under(part)} if self.hooks and issubclass(cls, base) else {}

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
        point = functools.partial(hook_point, self, self.hooks)
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
            **self.part_hooks(self.attention_cls, MultiHeadAttention, "attn"),
        )
        x = shortcut = point("hook_resid_pre", x)
        x = make_norm(self.norm_cls, cfg.emb_dim, self.dtype, self.layout, "norm1",
                      self.hooks.under("ln1"))(x)
        x = att(x, deterministic, mask, cache, slot)
        if cache is not None:
            x, cache = x
        x = point("hook_attn_out", x)
        x = drop_resid(x, deterministic=deterministic) + shortcut

        x = shortcut = point("hook_resid_mid", x)
        x = make_norm(self.norm_cls, cfg.emb_dim, self.dtype, self.layout, "norm2",
                      self.hooks.under("ln2"))(x)
        x = self.feed_forward_cls(cfg, dtype=self.dtype, layout=self.layout, name="ff",
                                  **self.part_hooks(self.feed_forward_cls, FeedForward, "mlp"))(x)
        x = point("hook_mlp_out", x)
        x = drop_resid(x, deterministic=deterministic) + shortcut
        x = point("hook_resid_post", x)
        return x if cache is None else (x, cache)


def block_class(remat: bool | str) -> type:
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
      layout: how the matrices are held (`nn.layout.Layout`); the default is the book's names
        and Flax's `[in, out]`. Generation sets it on a clone, with params from
        `nn.layout.prepare`.
      attention_cls, feed_forward_cls, norm_cls: the block's parts (default
        `MultiHeadAttention`, `FeedForward`, `LayerNorm`). A variant subclasses one, e.g.
        overrides `MultiHeadAttention.score_bias`, and every path uses it.
      hooks: the hook table (`nn.hooks.HookTable`): hooks to run and activations to keep, by
        TransformerLens's names (`hook_embed`, `hook_pos_embed`, `blocks.{i}.*`,
        `ln_final.*`). Empty by default, which traces the same program as no hooks at all.

    Called the book's way, `apply(variables, in_idx)` with int `[B, T]` (T <= context_length)
    returns float32 logits `[B, T, V]`; dropout is off unless `deterministic=False` and a
    `dropout` rng is given. For generation it also takes, by keyword:
      positions: int `[B, T]`, each token's `pos_emb` row (default 0..T-1);
      valid: bool `[B, T]`, False for padding (no token attends to it);
      cache: a `nn.cache.KVCache` of S slots, and slot: where the T tokens are written (their
        keys attend to every valid slot up to their own); then returns `(logits, cache)`.
    `hidden` and `head` are the two halves, so a caller that needs one position's logits
    skips the V-wide head for the others; `run_block` applies one block alone.
    """

    cfg: GPTConfig
    dtype: Dtype = jnp.float32
    remat: bool | str = False
    layout: Layout = Layout()
    attention_cls: type = MultiHeadAttention
    feed_forward_cls: type = FeedForward
    norm_cls: type = LayerNorm
    hooks: HookTable = HookTable()

    def setup(self) -> None:
        cfg = self.cfg

        def embed(num: int) -> nn.Embed:
            return nn.Embed(num, cfg.emb_dim, embedding_init=INIT, dtype=self.dtype,
                            param_dtype=jnp.float32)

        self.tok_emb = embed(cfg.vocab_size)
        self.pos_emb = embed(cfg.context_length)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        block = block_class(self.remat)
        self.trf_blocks = [
            block(cfg, self.dtype, self.layout, attention_cls=self.attention_cls,
                  feed_forward_cls=self.feed_forward_cls, norm_cls=self.norm_cls,
                  hooks=self.hooks.under(f"blocks.{i}"))
            for i in range(cfg.n_layers)
        ]
        self.final_norm = make_norm(self.norm_cls, cfg.emb_dim, self.dtype, self.layout,
                                    hooks=self.hooks.under("ln_final"))
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
        if not isinstance(out, tuple):
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
        stop_at_layer: int | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Token ids `[B, T]` -> output of the last block `[B, T, D]` (before final_norm);
        with a cache, `(hidden, cache)`. Arguments as in `__call__`; without a cache,
        `stop_at_layer` n returns the input of block n instead (0: the embeddings) and runs
        no block from n on."""
        b, t = in_idx.shape
        if positions is None:
            positions = jnp.arange(t)[None, :]  # [1, T]
        x = self.embed(in_idx, positions)  # [B, T, D]
        x = self.drop_emb(x, deterministic=deterministic)
        # The new tokens as keys: their positions, -1 where they are padding.
        own = positions if valid is None else jnp.where(valid, positions, -1)  # [B|1, T]
        if cache is None:
            causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # [T, T]
            mask = AttentionMask(causal[None] & (own >= 0)[:, None, :], positions, own)
            for block in self.trf_blocks[:stop_at_layer]:
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

    def embed(self, in_idx: jax.Array, positions: jax.Array) -> jax.Array:
        """`tok_emb(in_idx) + pos_emb(positions)` `[B, T, D]`, through `hook_embed` and
        `hook_pos_embed` (which sees the position embeddings broadcast to `[B, T, D]`)."""
        tok, pos = self.tok_emb(in_idx), self.pos_emb(positions)
        if self.hooks:
            tok = hook_point(self, self.hooks, "hook_embed", tok)
            pos = hook_point(self, self.hooks, "hook_pos_embed", jnp.broadcast_to(pos, tok.shape))
        return tok + pos

    def run_block(self, i: int, x: jax.Array, mask: AttentionMask,
                  cache: tuple[jax.Array, jax.Array] | None = None,
                  slot: jax.Array | int | None = None,
                  ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Block `i` (static) alone on the residual stream `x` `[B, T, D]`, dropout off, with
        an explicit mask and, optionally, that layer's cache (see `TransformerBlock`)."""
        return self.trf_blocks[i](x, True, mask, cache, slot)

    def head(self, x: jax.Array, columns: jax.Array | None = None) -> jax.Array:
        """final_norm + output head: `[..., D]` -> float32 logits `[..., V]`; with `columns`
        (int `[C]`), the logits of those tokens only, `[..., C]`."""
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            if columns is not None:
                return (x @ self.tok_emb.embedding[columns].T.astype(self.dtype)).astype(
                    jnp.float32)
            return self.tok_emb.attend(x).astype(jnp.float32)
        return self.out_head(x, columns).astype(jnp.float32)


def head_param_names(cfg: GPTConfig) -> tuple[str, ...]:
    """The parameters `GPTModel.head` reads: final_norm and the output head (tok_emb if tied)."""
    return ("final_norm", "tok_emb" if cfg.tie_embeddings else "out_head")


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
def _jitted_init(model: GPTModel) -> Callable[..., Any]:
    return jax.jit(model.init)


def init_params(cfg: GPTConfig, seed: int | jax.Array = 0, *,
                model: GPTModel | None = None) -> dict:
    """Random parameters for `cfg` (GPT-2 init), from an int seed or a PRNG key; for `model`, a
    `GPTModel(cfg, ...)` with parts of its own, those of that variant (its parts' own params
    included). The compiled init is kept per model's parameter structure: its dtype, remat
    and hooks do not change the params, so they do not compile another."""
    model = model_for(cfg, model).clone(dtype=jnp.float32, remat=False, hooks=HookTable())
    key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    dummy = jnp.zeros((1, 1), dtype=jnp.int32)
    return _jitted_init(model)(key, dummy)["params"]


def param_shapes(cfg: GPTConfig) -> dict:
    """The params pytree of `cfg` as `jax.ShapeDtypeStruct`s, with no memory allocated."""
    dummy = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(GPTModel(cfg).init, jax.random.PRNGKey(0), dummy)["params"]


def count_params(params: Any) -> int:
    """Total number of parameters (works on arrays or `ShapeDtypeStruct`s)."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def size_mb(params: Any, bytes_per_param: int = 4) -> float:
    """Size in MB as the book computes it: parameters * bytes / 1024**2 (fp32: 4 bytes)."""
    return count_params(params) * bytes_per_param / (1024 * 1024)
