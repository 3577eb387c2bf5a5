"""Every activation by name: `run_with_cache`, `run_with_hooks` and the `ActivationCache`.

    logits, cache = run_with_cache(params, cfg, tokens)                 # every hook point
    cache["blocks.3.attn.hook_pattern"]                                  # [B, H, T, T]
    cache["pattern", 3], cache["scale", 2, "ln1"]                        # short names
    logits = run_with_hooks(params, cfg, tokens, hooks=[("blocks.6.hook_resid_post", add(v))])

The names are TransformerLens's for GPT-2 (`jaxgpt.nn.hooks.hook_names`); the values are the
ones `GPTModel` computes, read through its hook points (`jaxgpt.nn.hooks`), so a variant part
is seen as it computes. Both functions are jit-compiled: the hooks' structure is static, their
arrays (in `jax.tree_util.Partial` hooks, or the makers of `interp.interventions`) are
arguments, so new arrays reuse the compiled program; `run_with_hooks` is differentiable.

Shapes: B batch, T tokens, D emb_dim, H heads, Dh head_dim, V vocab_size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.inference.checks import check_token_ids
from jaxgpt.interp import residual
from jaxgpt.nn.hooks import (
    BLOCK,
    block_points,
    free_hooks,
    hook_names,
    outer_points,
    with_hook_args,
)
from jaxgpt.nn.model import GPTModel, model_for

Names = Sequence[str] | Callable[[str], bool] | None
Hooks = Iterable[tuple[str, Callable[[jax.Array, str], jax.Array]]]

# TransformerLens's other spellings of two short names (`utils.get_act_name`).
_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores"}


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1].removeprefix("hook_")


def _block_short_names() -> dict[str, dict[str, str]]:
    """In a block: short name -> {part: name in the block}, in forward order (`scale` ->
    `{"ln1": "ln1.hook_scale", "ln2": "ln2.hook_scale"}`)."""
    out: dict[str, dict[str, str]] = {}
    for name, _ in block_points():
        out.setdefault(_short(name), {})[name.rpartition(".")[0]] = name
    return out


# TransformerLens's short names, from the table of hook points (`nn.hooks`): outside the
# blocks (`scale` -> `ln_final.hook_scale`), and in a block, where the first part holding a
# name is the default (`scale` -> ln1's; ln2's given "ln2").
_OUTER = {_short(name): name for name, _ in outer_points()}
_IN_BLOCK = _block_short_names()


def act_name(name: str, layer: int | None = None, sub: str | None = None) -> str:
    """A full hook name from TransformerLens's short form: `act_name("resid_pre", 3)` is
    `blocks.3.hook_resid_pre`, `act_name("scale", 2, "ln1")` `blocks.2.ln1.hook_scale`,
    `act_name("scale")` `ln_final.hook_scale`, `act_name("embed")` `hook_embed`. A full
    name is returned as it is."""
    if "hook_" in name:
        return name
    short = _ALIASES.get(name, name)
    parts = _IN_BLOCK.get(short, {}) if layer is not None else {}
    if parts and (len(parts) == 1 or sub is None or sub in parts):
        part = sub if sub in parts else next(iter(parts))
        return f"{BLOCK.prefix}.{layer}.{parts[part]}"
    if short in _OUTER and not parts:
        return _OUTER[short]
    where = f"part {sub!r} of " if parts else ""
    raise ValueError(f"unknown activation {name!r} ({where}layer {layer}): give a full name "
                     f"such as 'blocks.0.hook_resid_pre', or a short one "
                     f"({', '.join(sorted({*_IN_BLOCK, *_ALIASES, *_OUTER}))}) with its layer")


class ActivationCache(Mapping):
    """The activations of one run by name, with the params and model that computed them.

    A mapping of full names to arrays (`cache[name]`, `cache["resid_pre", 3]`, `in`, `keys()`),
    with TransformerLens's residual-stream readers as methods (`jaxgpt.interp.residual`).
    """

    def __init__(self, acts: dict[str, jax.Array], *, params: Any, cfg: GPTConfig,
                 model: GPTModel):
        self.acts, self.params, self.cfg, self.model = acts, params, cfg, model

    def __getitem__(self, key: Any) -> jax.Array:
        name = act_name(*key) if isinstance(key, tuple) else act_name(key)
        if name not in self.acts:
            raise KeyError(f"{name!r} is not in this cache (run_with_cache names=...); it holds "
                           f"{len(self.acts)} activations")
        return self.acts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.acts)

    def __len__(self) -> int:
        return len(self.acts)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self.acts)} activations: {', '.join(list(self.acts)[:4])}...)"

    def stack_activation(self, name: str, layer: int | None = None) -> jax.Array:
        """`name` (short, e.g. "resid_pre") of every layer below `layer` (default all),
        stacked on a new first axis."""
        stop = self.cfg.n_layers if layer is None or layer == -1 else layer
        return jnp.stack([self[name, i] for i in range(stop)])

    accumulated_resid = residual.accumulated_resid
    decompose_resid = residual.decompose_resid
    stack_head_results = residual.stack_head_results
    apply_ln_to_stack = residual.apply_ln_to_stack
    logit_attrs = residual.logit_attrs


def resolve_names(cfg: GPTConfig, names: Names) -> list[str]:
    """The full names `names` asks for, in the model's order: all (None), a list (short
    names allowed, as `(name, layer[, sub])` tuples too), or a predicate on full names."""
    every = hook_names(cfg)
    if names is None:
        return list(every)
    if callable(names):
        return [n for n in every if names(n)]
    if isinstance(names, str):
        raise ValueError(f"names must be a list of names or a predicate, got the string "
                         f"{names!r} (write [{names!r}])")
    wanted = {act_name(*n) if isinstance(n, tuple) else act_name(n) for n in names}
    return [n for n in every if n in wanted] + sorted(wanted - set(every))


def check_tokens(tokens: Any, cfg: GPTConfig, name: str = "tokens") -> np.ndarray:
    """Token ids `[B, T]` (or `[T]`, one row) as int32 `[B, T]`, T <= context_length."""
    arr = np.asarray(tokens) if not isinstance(tokens, jax.core.Tracer) else tokens
    if arr.size == 0:  # `[]` is float64 to NumPy: say it is empty, not that it is not ints
        raise ValueError(f"{name} is empty (shape {arr.shape}): give at least one token")
    arr = check_token_ids(arr[None] if arr.ndim == 1 else arr, cfg, name)
    if arr.shape[1] > cfg.context_length:
        raise ValueError(f"{name} has {arr.shape[1]} tokens, more than the model's "
                         f"context_length {cfg.context_length}")
    return arr


def hooked_model(cfg: GPTConfig, model: GPTModel | None, hooks: Hooks = (),
                 cache: Iterable[str] = ()) -> tuple[GPTModel, dict]:
    """`(model, args)`: `model` (default `GPTModel(cfg)`) with the free hooks and cached names
    added to its own table (remat off), and the hooks' arrays to merge into the params."""
    model = model_for(cfg, model)
    table, args = free_hooks(cfg, hooks, cache)
    return model.clone(hooks=model.hooks.plus(table), remat=False), args


def flatten_sown(tree: Mapping) -> Iterator[tuple[str, Any]]:
    """`(hook name, array)` of the activations the model sowed (its `intermediates`, nested
    by module), the names being the innermost keys."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten_sown(value)
        else:
            yield key, value


@functools.partial(jax.jit, static_argnames=("model", "stop_at_layer", "keep"))
def _forward(params: Any, tokens: jax.Array, *, model: GPTModel, stop_at_layer: int | None,
             keep: bool) -> tuple[jax.Array, dict]:
    """Logits `[B, T, V]` (or the residual stream before block `stop_at_layer`) and, when
    `keep`, the sown activations by name."""
    variables = {"params": params}
    mutable = ["intermediates"] if keep else []  # with `mutable`, apply returns (out, state)
    if stop_at_layer is None:
        out, state = model.apply(variables, tokens, mutable=mutable)
    else:
        out, state = model.apply(variables, tokens, stop_at_layer=stop_at_layer,
                                 method=GPTModel.hidden, mutable=mutable)
    return out, dict(flatten_sown(state.get("intermediates", {})))


def _check_layer(cfg: GPTConfig, stop_at_layer: Any) -> int | None:
    if stop_at_layer is None:
        return None
    if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, (int, np.integer)) \
            or not 0 <= stop_at_layer <= cfg.n_layers:
        raise ValueError(f"stop_at_layer must be an int in [0, {cfg.n_layers}], got "
                         f"{stop_at_layer!r}")
    return int(stop_at_layer)


def run_with_cache(params: Any, cfg: GPTConfig, tokens: Any, *, names: Names = None,
                   model: GPTModel | None = None, hooks: Hooks = (),
                   stop_at_layer: int | None = None) -> tuple[jax.Array, ActivationCache]:
    """Run the model on `tokens` and keep the activations `names` asks for.

    Args:
      params, cfg: the model's weights and config.
      tokens: int `[B, T]` (or `[T]`, one row), T <= context_length.
      names: None (every hook point), a list of names (full, or TransformerLens's short
        `(name, layer)`), or a predicate on full names. Only these are kept.
      model: a variant of `GPTModel(cfg)` to run (its own hooks run too).
      hooks: `(name, fn)` pairs run as well (see `run_with_hooks`); the cache holds the
        values after them.
      stop_at_layer: n runs the embeddings and blocks 0..n-1 only, and returns the residual
        stream `[B, T, D]` in place of the logits (activations after it are absent).

    Returns:
      `(logits [B, T, V] float32, cache)`.
    """
    stop = _check_layer(cfg, stop_at_layer)
    tokens = check_tokens(tokens, cfg)
    wanted = resolve_names(cfg, names)
    run, args = hooked_model(cfg, model, hooks, wanted)
    out, acts = _forward(with_hook_args(params, args), jnp.asarray(tokens), model=run,
                         stop_at_layer=stop, keep=bool(wanted))
    missing = [n for n in wanted if n not in acts]
    if missing and stop is None:
        raise ValueError(f"the model never reached {missing[0]!r}: a part of this variant does "
                         f"not call that hook point ({len(missing)} names missing)")
    ordered = {n: acts[n] for n in wanted if n in acts}
    return out, ActivationCache(ordered, params=params, cfg=cfg, model=model_for(cfg, model))


def run_with_hooks(params: Any, cfg: GPTConfig, tokens: Any, hooks: Hooks, *,
                   model: GPTModel | None = None, stop_at_layer: int | None = None) -> jax.Array:
    """The logits `[B, T, V]` of `tokens` with `hooks` run at their points.

    Each hook is `(name, fn)` with `fn(activation, name) -> activation`, a pure JAX function
    (replace, add, ablate, scale: see `jaxgpt.interp.interventions`); several at one point run
    in order. Jit-compiled and differentiable (in the params and the hooks' arrays). A hook
    whose arrays are pytree leaves (`jax.tree_util.Partial(fn, array)`) reuses the compiled
    program when only its arrays change; a plain closure compiles anew for each new function.
    `stop_at_layer` as in `run_with_cache`.
    """
    stop = _check_layer(cfg, stop_at_layer)
    tokens = check_tokens(tokens, cfg)
    run, args = hooked_model(cfg, model, hooks)
    out, _ = _forward(with_hook_args(params, args), jnp.asarray(tokens), model=run,
                      stop_at_layer=stop, keep=False)
    return out


def attention_weights(params: Any, cfg: GPTConfig, ids: Any, *,
                      model: GPTModel | None = None) -> list[np.ndarray]:
    """Every layer's attention pattern (`blocks.{i}.attn.hook_pattern`), `[B, H, T, T]`
    each, as NumPy arrays (rows: queries, columns: keys)."""
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(cfg.n_layers)]
    _, cache = run_with_cache(params, cfg, ids, names=names, model=model)
    return [np.asarray(cache[n]) for n in names]
