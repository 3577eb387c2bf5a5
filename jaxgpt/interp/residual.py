"""Reading the residual stream: the logit lens, its decomposition into components, and the
direct logit attribution of each, as TransformerLens's `ActivationCache` defines them.

The residual stream before the final LayerNorm is the sum of its components: `hook_embed`,
`hook_pos_embed`, and each layer's `hook_attn_out` and `hook_mlp_out` (an `attn_out` is its
heads' results, `z @ W_O[h]` each, plus `out_proj`'s bias). These functions take an
`ActivationCache` (`jaxgpt.interp.cache.run_with_cache`); stacks put the components on a new
first axis, `[C, B, T, D]`.

Shapes: C components, B batch, T tokens, D emb_dim, H heads, Dh head_dim, V vocab_size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.nn.model import GPTModel, apply_method

PosSlice = int | slice | Sequence[int] | None


class Cached(Protocol):
    """What these readers need of an `ActivationCache`."""

    params: Any
    cfg: GPTConfig
    model: GPTModel

    def __getitem__(self, key: Any) -> jax.Array: ...


def take_positions(x: jax.Array, pos_slice: PosSlice, axis: int = -2) -> jax.Array:
    """TransformerLens's `Slice` on the position axis: None keeps all, an int takes one (and
    drops the axis), a slice or a list of ints takes those."""
    if pos_slice is None:
        return x
    if isinstance(pos_slice, (int, np.integer)):
        return jnp.take(x, int(pos_slice), axis=axis)
    if isinstance(pos_slice, slice):
        index: list[Any] = [slice(None)] * x.ndim
        index[axis] = pos_slice
        return x[tuple(index)]
    return jnp.take(x, jnp.asarray(pos_slice), axis=axis)


def _final(cfg: GPTConfig, layer: int | None) -> int:
    return cfg.n_layers if layer is None or layer == -1 else layer


def _final_norm(model: GPTModel, x: jax.Array) -> jax.Array:
    return model.final_norm(x)


def apply_ln_to_stack(cache: Cached, residual_stack: jax.Array, layer: int | None = None,
                      mlp_input: bool = False, pos_slice: PosSlice = None,
                      recompute_ln: bool = False) -> jax.Array:
    """Each component as the LayerNorm at the input of `layer` sees it: centred and divided
    by that LayerNorm's cached `hook_scale` (no scale or shift: the same for every
    component). `layer` n_layers (or None, -1) means `ln_final`; `mlp_input` means `ln2`.

    With `recompute_ln` at the final layer, each component goes through the real
    `final_norm` with statistics of its own (the logit lens)."""
    cfg = cache.cfg
    layer = _final(cfg, layer)
    if recompute_ln and layer == cfg.n_layers:
        return apply_method(cache.model, {"params": cache.params}, _final_norm)(residual_stack)
    if layer == cfg.n_layers:
        key = "ln_final.hook_scale"
    else:
        key = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
    scale = take_positions(cache[key], pos_slice)
    centred = residual_stack - residual_stack.mean(axis=-1, keepdims=True)
    return centred / scale


def accumulated_resid(cache: Cached, layer: int | None = None, incl_mid: bool = False,
                      apply_ln: bool = False, pos_slice: PosSlice = None,
                      mlp_input: bool = False, return_labels: bool = False) -> Any:
    """The residual stream at the input of each layer up to `layer` (default: all, and the
    final one): `[l_pre...]` (+ `l_mid` with `incl_mid`, or for `layer` with `mlp_input`),
    then `final_post`. With `apply_ln`, each through the final LayerNorm recomputed (at the
    final layer: the logit lens) or the cached scale of `layer`'s LayerNorm."""
    cfg = cache.cfg
    layer = _final(cfg, layer)
    parts, labels = [], []
    for i in range(layer + 1):
        if i == cfg.n_layers:
            parts.append(cache["resid_post", cfg.n_layers - 1])
            labels.append("final_post")
            continue
        parts.append(cache["resid_pre", i])
        labels.append(f"{i}_pre")
        if (incl_mid and i < layer) or (mlp_input and i == layer):
            parts.append(cache["resid_mid", i])
            labels.append(f"{i}_mid")
    stack = jnp.stack([take_positions(p, pos_slice) for p in parts])
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer, mlp_input, pos_slice,
                                  recompute_ln=layer == cfg.n_layers)
    return (stack, labels) if return_labels else stack


def decompose_resid(cache: Cached, layer: int | None = None, mlp_input: bool = False,
                    mode: str = "all", apply_ln: bool = False, pos_slice: PosSlice = None,
                    incl_embeds: bool = True, return_labels: bool = False) -> Any:
    """The residual stream at the input of `layer` as the stack of what wrote it: `embed`,
    `pos_embed`, then each layer's `l_attn_out` and `l_mlp_out` (`mode` "attn" or "mlp"
    keeps one kind); `mlp_input` adds `layer`'s attention. They sum to `resid_pre` of
    `layer` (to `final_post` for n_layers). `apply_ln` divides by the cached scale."""
    if mode not in ("all", "attn", "mlp"):
        raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
    layer = _final(cache.cfg, layer)
    parts, labels = [], []
    if incl_embeds:
        parts += [cache["hook_embed"], cache["hook_pos_embed"]]
        labels += ["embed", "pos_embed"]
    for i in range(layer):
        if mode != "mlp":
            parts.append(cache["attn_out", i])
            labels.append(f"{i}_attn_out")
        if mode != "attn":
            parts.append(cache["mlp_out", i])
            labels.append(f"{i}_mlp_out")
    if mlp_input and mode != "mlp":
        parts.append(cache["attn_out", layer])
        labels.append(f"{layer}_attn_out")
    stack = jnp.stack([take_positions(p, pos_slice) for p in parts])
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer, mlp_input, pos_slice)
    return (stack, labels) if return_labels else stack


def w_o(params: Any, cfg: GPTConfig, layer: int) -> jax.Array:
    """Layer `layer`'s output matrix per head, `[H, Dh, D]` (out_proj's kernel by rows)."""
    kernel = params[f"trf_blocks_{layer}"]["att"]["out_proj"]["kernel"]  # [D, D], [in, out]
    return kernel.reshape(cfg.n_heads, cfg.head_dim, cfg.emb_dim)


def head_results(cache: Cached, layer: int) -> jax.Array:
    """Each head's write to the residual stream, `z @ W_O[h]`: `[B, T, H, D]` (their sum
    plus out_proj's bias is `hook_attn_out`)."""
    z = cache["z", layer]  # [B, T, H, Dh]
    return jnp.einsum("bthd,hdm->bthm", z, w_o(cache.params, cache.cfg, layer))


def stack_head_results(cache: Cached, layer: int = -1, return_labels: bool = False,
                       incl_remainder: bool = False, pos_slice: PosSlice = None,
                       apply_ln: bool = False) -> Any:
    """Every head's result below `layer` (default: all), `[layer * H, B, T, D]`, labelled
    `L{l}H{h}`; `incl_remainder` adds the rest of `resid_post` of layer - 1 (embeddings,
    MLPs, biases). `apply_ln` divides by the cached scale of `layer`'s LayerNorm."""
    cfg = cache.cfg
    layer = _final(cfg, layer)
    parts = [take_positions(head_results(cache, i), pos_slice, axis=-3) for i in range(layer)]
    labels = [f"L{i}H{h}" for i in range(layer) for h in range(cfg.n_heads)]
    if parts:
        stack = jnp.moveaxis(jnp.concatenate(parts, axis=-2), -2, 0)  # [layer * H, ..., D]
    else:
        stack = jnp.zeros((0, *take_positions(cache["hook_embed"], pos_slice).shape))
    if incl_remainder:
        total = take_positions(cache["resid_post", layer - 1], pos_slice) if layer else \
            take_positions(cache["hook_embed"] + cache["hook_pos_embed"], pos_slice)
        stack = jnp.concatenate([stack, (total - stack.sum(axis=0))[None]])
        labels.append("remainder")
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer, pos_slice=pos_slice)
    return (stack, labels) if return_labels else stack


def unembed_directions(params: Any, cfg: GPTConfig, tokens: Any) -> jax.Array:
    """The output head's columns for `tokens` (int or int array): `[*tokens.shape, D]`,
    each scaled by `final_norm`'s scale, so that a residual direction times it is the token's
    logit (less the shift's part) after the final LayerNorm's centring and division."""
    tokens = jnp.asarray(tokens)
    if cfg.tie_embeddings:
        columns = params["tok_emb"]["embedding"][tokens]  # [..., D]
    else:
        columns = params["out_head"]["kernel"].T[tokens]  # [..., D]
    return columns * params["final_norm"]["scale"]


def logit_attrs(cache: Cached, residual_stack: jax.Array, tokens: Any,
                incorrect_tokens: Any = None, pos_slice: PosSlice = None) -> jax.Array:
    """Direct logit attribution: each component's contribution to the logit of `tokens`
    (or to `logit(tokens) - logit(incorrect_tokens)`), `[C, ...]`.

    Each component is centred and divided by the cached `ln_final.hook_scale`, then dotted
    with `final_norm.scale * W_U[:, token]`. The final LayerNorm's scale is folded into the
    direction, as TransformerLens's folded models do (its unfolded bridge leaves it out, and
    says so), so the attributions of a full decomposition sum to the logit (difference) less
    `final_norm.shift`'s part, `shift @ W_U[:, token]`. `tokens` is an int, a `[B]` array
    (one per prompt, every position) or `[B, T]`."""
    cfg = cache.cfg
    directions = unembed_directions(cache.params, cfg, tokens)
    if incorrect_tokens is not None:
        if jnp.shape(tokens) != jnp.shape(incorrect_tokens):
            raise ValueError(f"tokens {jnp.shape(tokens)} and incorrect_tokens "
                             f"{jnp.shape(incorrect_tokens)} must have the same shape")
        directions = directions - unembed_directions(cache.params, cfg, incorrect_tokens)
    scaled = apply_ln_to_stack(cache, residual_stack, -1, pos_slice=pos_slice)  # [C, ..., D]
    if directions.ndim == 2 and scaled.ndim == 4 and directions.shape[0] == scaled.shape[1]:
        directions = directions[:, None]  # [B, 1, D]: one token per prompt, every position
    return (scaled * directions).sum(axis=-1)


def logit_lens(cache: Cached, pos_slice: PosSlice = None) -> tuple[jax.Array, list[str]]:
    """`(logits, labels)`: the residual stream at the input of every layer and after the
    last, each through `final_norm` (its own statistics) and the output head,
    `[n_layers + 1, B, T, V]`; the last is the model's logits."""
    stack, labels = accumulated_resid(cache, pos_slice=pos_slice, return_labels=True)
    logits = apply_method(cache.model, {"params": cache.params}, GPTModel.head)(stack)
    return logits, labels
