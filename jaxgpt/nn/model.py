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
from collections.abc import Callable, Mapping
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxgpt.config import GPTConfig
from jaxgpt.nn.attention import AttentionMask, LayerOutput, MultiHeadAttention
from jaxgpt.nn.cache import KVCache
from jaxgpt.nn.hooks import HookTable, hook_point
from jaxgpt.nn.layers import INIT, Dtype, FeedForward, LayerNorm, make_linear, make_norm
from jaxgpt.nn.layout import Layout
from jaxgpt.nn.quant import QuantEmbed, quantize_params

M = TypeVar("M", bound=nn.Module)
P = ParamSpec("P")
R = TypeVar("R")

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
    default part also gets the hook table. Called the book's way, `block(x)` returns
    `[B, T, D]`; `run` (the compact method, which cached decoding calls) returns a
    `LayerOutput` with the attention's keys and values too. Hook points `[B, T, D]`:
    `hook_resid_pre` (the input), `hook_attn_out`, `hook_resid_mid`, `hook_mlp_out`,
    `hook_resid_post` (the output); the parts' under `ln1`, `attn`, `ln2`, `mlp`.
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

    def __call__(self, x: jax.Array, deterministic: bool = True,
                 mask: AttentionMask | None = None) -> jax.Array:
        """The book's forward: `[B, T, D]` -> `[B, T, D]` over `mask` (default: causal)."""
        return self.run(x, deterministic, mask).out

    @nn.compact
    def run(
        self,
        x: jax.Array,
        deterministic: bool = True,
        mask: AttentionMask | None = None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        slot: jax.Array | int | None = None,
    ) -> LayerOutput:
        """The block on `x` `[B, T, D]`, the attention given `mask`, `cache` and `slot` (see
        `MultiHeadAttention.attend`): its output and the attention's keys and values."""
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
        x, kv = att.attend(x, deterministic, mask, cache, slot)
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
        return LayerOutput(x, kv)


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


class Output(NamedTuple):
    """What `GPTModel.decode` returns, whatever its arguments."""

    logits: jax.Array  # float32 [B, T, V]; [B, V], the last token's, with last_only
    cache: KVCache  # with the new tokens' keys, values and positions written


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
        `nn.layout.prepare`. With `layout.quant`, the matrices and `tok_emb` are int8 with
        float scales (`nn.quant.quantize_params`); every activation stays float.
      attention_cls, feed_forward_cls, norm_cls: the block's parts (default
        `MultiHeadAttention`, `FeedForward`, `LayerNorm`). A variant subclasses one, e.g.
        overrides `MultiHeadAttention.score_bias`, and every path uses it. The block calls
        the attention part's `attend`, which returns a `LayerOutput`.
      hooks: the hook table (`nn.hooks.HookTable`): hooks to run and activations to keep, by
        TransformerLens's names (`hook_embed`, `hook_pos_embed`, `blocks.{i}.*`,
        `ln_final.*`). Empty by default, which traces the same program as no hooks at all.

    Called the book's way, `apply(variables, in_idx)` with int `[B, T]` (T <= context_length)
    returns float32 logits `[B, T, V]`; dropout is off unless `deterministic=False` and a
    `dropout` rng is given. Generation also passes, by keyword, `positions`: int `[B, T]`,
    each token's `pos_emb` row (default 0..T-1), and `valid`: bool `[B, T]`, False for
    padding (no token attends to it). Cached decoding is `decode`, which always returns an
    `Output` (logits and the cache). `hidden` and `head` are the two halves of the forward, so
    a caller that needs one position's logits skips the V-wide head for the others;
    `run_block` applies one block alone. `apply_method` calls any of them with its own type.
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

        layout = self.layout
        self.tok_emb: nn.Embed | QuantEmbed = embed(cfg.vocab_size) if layout.quant is None else (
            QuantEmbed(cfg.vocab_size, cfg.emb_dim, layout.quant, layout.pad_one_row,
                       dtype=self.dtype))
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
            self.out_head = make_linear(cfg.vocab_size, False, layout.head, self.dtype, layout)

    def __call__(
        self,
        in_idx: jax.Array,
        deterministic: bool = True,
        *,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
    ) -> jax.Array:
        """Token ids `[B, T]` -> float32 logits `[B, T, V]`, as the book's `GPTModel.forward`."""
        return self.head(self.hidden(in_idx, deterministic, positions=positions, valid=valid))

    def hidden(
        self,
        in_idx: jax.Array,
        deterministic: bool = True,
        *,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
        stop_at_layer: int | None = None,
    ) -> jax.Array:
        """Token ids `[B, T]` -> output of the last block `[B, T, D]` (before final_norm).
        Arguments as in `__call__`; `stop_at_layer` n returns the input of block n instead
        (0: the embeddings) and runs no block from n on."""
        t = in_idx.shape[1]
        x, positions, own = self.inputs(in_idx, deterministic, positions, valid)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # [T, T]
        mask = AttentionMask(causal[None] & (own >= 0)[:, None, :], positions, own)
        for block in self.trf_blocks[:stop_at_layer]:
            x = block(x, deterministic, mask)
        return x

    def decode(
        self,
        in_idx: jax.Array,
        cache: KVCache,
        slot: jax.Array | int,
        *,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
        last_only: bool = False,
    ) -> Output:
        """Cached decoding, dropout off: token ids `[B, T]` written to the `cache` (S slots)
        at slots `slot .. slot + T - 1`, each attending to every valid slot up to its own.
        `positions` and `valid` as in `__call__`. Returns `Output(logits, cache)`: float32
        logits `[B, T, V]`, or with `last_only` the last token's `[B, V]` (the head runs on
        it alone), and the cache with the T tokens' keys, values and positions written."""
        b, t = in_idx.shape
        x, positions, own = self.inputs(in_idx, True, positions, valid)
        own = jnp.broadcast_to(own, (b, t)).astype(jnp.int32)
        k_pos = lax.dynamic_update_slice(cache.pos, own, (0, slot))  # [B, S]
        s = k_pos.shape[1]
        q_slot = slot + jnp.arange(t)  # [T]: each new token's own slot
        allowed = (k_pos >= 0)[:, None, :] & (jnp.arange(s)[None, None, :] <= q_slot[None, :, None])
        mask = AttentionMask(allowed, positions, k_pos)  # allowed [B, T, S]
        keys, values = [], []
        for block, kc, vc in zip(self.trf_blocks, cache.keys, cache.values, strict=True):
            x, (kc, vc) = block.run(x, True, mask, (kc, vc), slot)
            keys.append(kc)
            values.append(vc)
        cache = KVCache(tuple(keys), tuple(values), k_pos)
        return Output(self.head(x[:, -1] if last_only else x), cache)

    def inputs(self, in_idx: jax.Array, deterministic: bool, positions: jax.Array | None,
               valid: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """What the first block reads: the embeddings `[B, T, D]` after dropout, the tokens'
        positions `[B | 1, T]` (default 0..T-1) and their positions as keys (-1 where `valid`
        is False: padding)."""
        if positions is None:
            positions = jnp.arange(in_idx.shape[1])[None, :]  # [1, T]
        x = self.embed(in_idx, positions)  # [B, T, D]
        x = self.drop_emb(x, deterministic=deterministic)
        own = positions if valid is None else jnp.where(valid, positions, -1)  # [B | 1, T]
        return x, positions, own

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
                  slot: jax.Array | int | None = None) -> LayerOutput:
        """Block `i` (static) alone on the residual stream `x` `[B, T, D]`, dropout off, with
        an explicit mask and, optionally, that layer's cache (see `TransformerBlock.run`)."""
        return self.trf_blocks[i].run(x, True, mask, cache, slot)

    def head(self, x: jax.Array, columns: jax.Array | None = None) -> jax.Array:
        """final_norm + output head: `[..., D]` -> float32 logits `[..., V]`; with `columns`
        (int `[C]`), the logits of those tokens only, `[..., C]`."""
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            if isinstance(self.tok_emb, QuantEmbed):
                return self.tok_emb.attend(x, columns).astype(jnp.float32)
            if columns is not None:
                return (x @ self.tok_emb.embedding[columns].T.astype(self.dtype)).astype(
                    jnp.float32)
            return self.tok_emb.attend(x).astype(jnp.float32)
        return self.out_head(x, columns).astype(jnp.float32)


def head_param_names(cfg: GPTConfig) -> tuple[str, ...]:
    """The parameters `GPTModel.head` reads: final_norm and the output head (tok_emb if tied)."""
    return ("final_norm", "tok_emb" if cfg.tie_embeddings else "out_head")


def apply_method(module: M, variables: Mapping[str, Any],
                 method: Callable[Concatenate[M, P], R], *, rngs: Any = None) -> Callable[P, R]:
    """`method` of `module` applied to `variables`, as a function typed as the method is:
    `apply_method(model, {"params": p}, GPTModel.head)(x)` is
    `model.apply({"params": p}, x, method=GPTModel.head)`, which a type checker sees as a
    `jax.Array`. `rngs` as `apply` takes them (`{"dropout": key}`)."""

    # Flax types `apply` as returning the output or `(output, state)`, by its `mutable`
    # argument; called without `mutable`, it returns the method's own output.
    apply: Callable[..., Any] = module.apply

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        return cast(R, apply(variables, *args, rngs=rngs, method=method, **kwargs))

    return call


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


def quantized_shapes(cfg: GPTConfig) -> dict:
    """`nn.quant.quantize_params`'s output for `cfg` as `jax.ShapeDtypeStruct`s (int8
    matrices, float32 scales), with no memory allocated."""
    return jax.eval_shape(functools.partial(quantize_params, cfg=cfg), param_shapes(cfg))


def count_params(params: Any) -> int:
    """Total number of parameters (works on arrays or `ShapeDtypeStruct`s)."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def nbytes(params: Any) -> int:
    """Bytes the params take, each leaf at its own width (arrays or `ShapeDtypeStruct`s)."""
    return int(sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree_util.tree_leaves(params)))


def size_mb(params: Any, bytes_per_param: int = 4) -> float:
    """Size in MB as the book computes it: parameters * bytes / 1024**2 (fp32: 4 bytes)."""
    return count_params(params) * bytes_per_param / (1024 * 1024)
