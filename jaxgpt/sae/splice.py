"""An SAE spliced into the model: its reconstruction in place of an activation, on every path.

    hook = splice(sae)                                    # a hook fn(x, name) -> x
    run_with_hooks(params, cfg, tokens, [(sae.cfg.hook_name, hook)])
    generate(params, cfg, prompt, 20, hooks=[(sae.cfg.hook_name, hook)])
    logits, cache = run_with_cache_with_saes(params, cfg, tokens, [sae])
    cache["blocks.1.hook_resid_pre.hook_sae_acts_post"]  # [B, T, d_sae]

`splice` returns a hook (`jaxgpt.nn.hooks`) that is a pytree: the SAE's weights are its
leaves, so `run_with_hooks`, `generate` and `generate_text_simple` take them as arguments of
the compiled program, and another SAE of the same shape reuses it. As a bound hook it runs in
the training step (`make_train_step(..., hooks=...)`) and in the patching sweeps (a model
`GPTModel(cfg, hooks=hook_table(cfg, [(name, hook)]))` given as `model=`).

Inside, the hook points of sae-lens's SAEs, in order: `hook_sae_input` (the activation as the
SAE reads it: its dtype, heads flattened), `hook_sae_acts_pre`, `hook_sae_acts_post` (the
feature activations), `hook_sae_recons` (`acts @ W_dec + b_dec`, before a run-time
normalisation is undone), `hook_sae_error` (with `use_error_term`: the activation less the
SAE's own reconstruction, computed without the inner hooks and without a gradient, as
sae-lens's HookedSAETransformer does) and `hook_sae_output` (what the model goes on with).
Inner hooks change them (`splice(sae, hooks=[("hook_sae_acts_post", fn)])`), and the cache
keeps them as `<point>.<inner point>`, the names of sae-lens's `HookedSAETransformer`. With the
error term the output is the model's own activation plus what the inner hooks changed, so
features can be steered or ablated with everything else left as it was.

An SAE reads the last axis of an activation, or its last two (heads x head size, for the
`hook_z` SAEs of sae-lens, whose d_in is `n_heads * head_dim`); its error and output keep the
activation's shape.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgpt.config import GPTConfig
from jaxgpt.interp.cache import ActivationCache, Names, run_with_cache, run_with_hooks
from jaxgpt.nn.hooks import hook_names, hook_points
from jaxgpt.nn.model import GPTModel
from jaxgpt.sae.model import (
    SAE,
    activation,
    decode_linear,
    decoder_norms,
    denormalize,
    forward,
    hidden_pre,
)

Hook = Callable[[jax.Array, str], jax.Array]
# sae-lens's hook points inside an SAE, in the order a forward pass reaches them.
SAE_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
              "hook_sae_error", "hook_sae_output")


class Splice(struct.PyTreeNode):
    """An SAE in place of an activation: a hook `fn(x, name) -> x` whose arrays (the SAE's
    weights, its inner hooks' arrays, the `exclude` mask) are pytree leaves. Made by
    `splice`."""

    sae: SAE
    fns: tuple[Hook, ...]  # the inner hooks, at `points`
    exclude: jax.Array | None  # bool [B, T]: positions where the activation passes unchanged
    points: tuple[str, ...] = struct.field(pytree_node=False)
    use_error_term: bool = struct.field(pytree_node=False)

    @property
    def value_names(self) -> tuple[str, ...]:
        """The inner points a cache may keep (`jaxgpt.nn.hooks`): all but `hook_sae_error`
        without the error term."""
        return tuple(p for p in SAE_POINTS if self.use_error_term or p != "hook_sae_error")

    def __call__(self, x: jax.Array, name: str) -> jax.Array:
        return self.with_values(x, name)[0]

    def with_values(self, x: jax.Array, name: str) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The activation the model goes on with, and the value at each inner point."""
        sae, values = self.sae, {}

        def point(sub: str, v: jax.Array) -> jax.Array:
            for at, fn in zip(self.points, self.fns, strict=True):
                if at == sub:
                    v = _checked(fn(v, f"{name}.{sub}"), v, f"{name}.{sub}")
            values[sub] = v
            return v

        rows = as_rows(x, sae.cfg.d_in, name)
        sae_in = point("hook_sae_input", rows.astype(sae.cfg.dtype))
        acts = point("hook_sae_acts_post", activation(sae, _acts_pre(sae, sae_in, point)))
        recons = point("hook_sae_recons", decode_linear(sae, acts))
        out = denormalize(sae, recons, sae_in).reshape(x.shape)
        keep = None if self.exclude is None else _mask(self.exclude, x, name)
        if self.use_error_term:
            # The SAE's own reconstruction, without the inner hooks: what they changed
            # reaches the output, the rest of the activation passes through.
            clean = out if not self.fns else forward(sae, rows).reshape(x.shape)
            error = jax.lax.stop_gradient(x - clean)
            if keep is not None:
                error = jnp.where(keep, 0.0, error)
            out = out + point("hook_sae_error", error)
        if keep is not None:
            out = jnp.where(keep, x, out)
        return point("hook_sae_output", out.astype(x.dtype)), values


def _acts_pre(sae: SAE, sae_in: jax.Array, point: Callable[[str, jax.Array], jax.Array]
              ) -> jax.Array:
    """The pre-activations, through `hook_sae_acts_pre` where sae-lens's inference SAEs have
    it: before topk's rescaling by the decoder norms."""
    rescale = sae.cfg.architecture in ("topk", "batchtopk") and \
        sae.cfg.rescale_acts_by_decoder_norm
    plain = sae.replace(cfg=sae.cfg.replace(rescale_acts_by_decoder_norm=False))
    h = point("hook_sae_acts_pre", hidden_pre(plain, sae_in))
    return h * decoder_norms(sae) if rescale else h


def _checked(y: Any, x: jax.Array, name: str) -> jax.Array:
    if getattr(y, "shape", None) != x.shape:
        raise ValueError(f"the hook at {name} returned shape {getattr(y, 'shape', type(y))} "
                         f"for a value of shape {x.shape}")
    return jnp.asarray(y).astype(x.dtype)


def _mask(exclude: jax.Array, x: jax.Array, name: str) -> jax.Array:
    """`exclude` `[B, T]` broadcast against the activation `x` `[B, T, ...]`."""
    if exclude.shape != x.shape[:exclude.ndim]:
        raise ValueError(f"exclude has shape {exclude.shape}, but the activation at {name} "
                         f"has shape {x.shape}: it must be [batch, tokens] of the tokens run")
    return exclude.reshape(exclude.shape + (1,) * (x.ndim - exclude.ndim))


def as_rows(x: jax.Array, d_in: int, name: str = "the hook point") -> jax.Array:
    """`x` `[..., d_in]` as an SAE reads it: as it is, or with its last two axes (heads x head
    size) flattened when they hold d_in values."""
    if x.shape[-1] == d_in:
        return x
    if x.ndim >= 2 and x.shape[-2] * x.shape[-1] == d_in:
        return x.reshape(*x.shape[:-2], d_in)
    raise ValueError(f"an SAE of d_in={d_in} cannot read {name}, whose activation has shape "
                     f"{x.shape}: its last axis (or last two, heads x head size) must hold d_in")


def splice(sae: SAE, *, use_error_term: bool = False,
           hooks: Iterable[tuple[str, Hook]] = (), exclude: Any = None) -> Splice:
    """A hook that puts `sae`'s reconstruction in place of the activation at its point.

    Args:
      sae: the SAE (batchtopk: splice `to_inference(sae)`, which does not depend on the batch).
      use_error_term: add the SAE's error, so the output is the activation itself plus what
        the inner hooks change (sae-lens's `use_error_term`).
      hooks: `(inner point, fn)` pairs, fn(value, "<point>.<inner point>") -> value, with inner
        points from `SAE_POINTS` (`hook_sae_error` only with `use_error_term`).
      exclude: bool `[B, T]`, positions where the activation passes unchanged (sae-lens's
        excluded special tokens); None: none.
    """
    if not isinstance(sae, SAE):
        raise ValueError(f"splice takes a jaxgpt.sae.SAE, got {type(sae).__name__}")
    if sae.cfg.architecture == "batchtopk":
        raise ValueError("a batchtopk SAE picks its features over the whole batch: splice "
                         "jaxgpt.sae.model.to_inference(sae), the jumprelu SAE it stands for")
    pairs = list(hooks)
    for item in pairs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[1])):
            raise ValueError(f"an inner hook is an (inner point, fn) pair, got {item!r}")
        allowed = SAE_POINTS if use_error_term else tuple(
            p for p in SAE_POINTS if p != "hook_sae_error")
        if item[0] not in allowed:
            why = " (it exists with use_error_term=True)" if item[0] == "hook_sae_error" else ""
            raise ValueError(f"{item[0]!r} is not an SAE's inner hook point{why}: "
                             f"{', '.join(allowed)}")
    mask = None if exclude is None else jnp.asarray(exclude, bool)
    return Splice(sae, tuple(fn for _, fn in pairs), mask, tuple(p for p, _ in pairs),
                  bool(use_error_term))


# --- where an SAE goes ---------------------------------------------------------------------

def point_width(cfg: GPTConfig, name: str) -> int | None:
    """The width an SAE reads at hook point `name` of `GPTModel(cfg)`: the last axis of its
    activation (heads x head size for per-head points); None for the attention's scores and
    pattern, whose last axis is the keys."""
    shapes = dict((n, p.shape) for n, p in hook_points(cfg))
    last = shapes[name].split()[-1]
    widths = {"D": cfg.emb_dim, "4D": 4 * cfg.emb_dim, "Dh": cfg.emb_dim, "1": 1}
    return widths.get(last)


def check_point(cfg: GPTConfig, name: Any) -> int:
    """The width an SAE reads at `name`, a hook point of `GPTModel(cfg)` with one vector per
    token; a ValueError in one line otherwise (naming the closest hook point)."""
    names = hook_names(cfg)
    if not isinstance(name, str) or not name:
        raise ValueError(f"the SAE says no hook point to read (cfg.hook_name is {name!r}): "
                         f"give one, e.g. 'blocks.0.hook_resid_pre'")
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.0)
        raise ValueError(f"{name!r} is not a hook point of this model ({cfg.n_layers} layers); "
                         f"the closest is {close[0]!r}")
    width = point_width(cfg, name)
    if width is None:
        raise ValueError(f"{name} holds attention weights over the keys, not one vector per "
                         f"token: an SAE reads a point whose last axis is features "
                         f"(hook_resid_pre, hook_z...)")
    return width


def check_hook(cfg: GPTConfig, name: Any, d_in: int) -> str:
    """`name`, a hook point of `GPTModel(cfg)` whose activation an SAE of `d_in` reads; a
    ValueError in one line otherwise (naming the closest hook point, or the width there)."""
    width = check_point(cfg, name)
    if width != d_in:
        raise ValueError(f"the SAE's d_in is {d_in}, but {name} has {width} values per token")
    return name


def stop_layer(names: Sequence[str]) -> int | None:
    """The `stop_at_layer` that reaches every hook point of `names`: one past the last block
    any of them is in, except that `blocks.{n}.hook_resid_pre` needs only the blocks before n
    (it is their output, `GPTModel.hidden(stop_at_layer=n)`'s); 0 for the embeddings; None
    (the whole model) for `ln_final`."""
    stop = 0
    for name in names:
        m = re.match(r"blocks\.(\d+)\.(.*)", name)
        if m:
            stop = max(stop, int(m.group(1)) + (m.group(2) != "hook_resid_pre"))
        elif name.startswith("ln_final."):
            return None
    return stop


def _saes(saes: SAE | Sequence[SAE], cfg: GPTConfig) -> dict[str, SAE]:
    """`{hook point: SAE}`, each SAE at its `cfg.hook_name`, checked against the model."""
    listed = [saes] if isinstance(saes, SAE) else list(saes)
    out: dict[str, SAE] = {}
    for sae in listed:
        if not isinstance(sae, SAE):
            raise ValueError(f"saes must be jaxgpt.sae.SAEs, got {type(sae).__name__}")
        name = check_hook(cfg, sae.cfg.hook_name, sae.cfg.d_in)
        if name in out:
            raise ValueError(f"two SAEs read {name}: splice one SAE per hook point")
        out[name] = sae
    return out


def spliced_hooks(cfg: GPTConfig, saes: SAE | Sequence[SAE], tokens: Any = None, *,
                  use_error_term: bool = False, hooks: Iterable[tuple[str, Hook]] = (),
                  exclude_special_tokens: Iterable[int] = ()) -> list[tuple[str, Any]]:
    """The hooks that splice `saes` in, each at its `cfg.hook_name`, then `hooks`: those named
    `<point>.<inner point>` (`blocks.1.hook_resid_pre.hook_sae_acts_post`) go to the SAE at
    that point, the others run after it, at their model hook points. With
    `exclude_special_tokens` (token ids), the SAEs pass `tokens` `[B, T]` equal to them by."""
    at = _saes(saes, cfg)
    inner: dict[str, list[tuple[str, Hook]]] = {name: [] for name in at}
    outer = []
    for item in hooks:
        name = item[0] if isinstance(item, (tuple, list)) and item else None
        point, _, sub = name.rpartition(".") if isinstance(name, str) else ("", "", "")
        if sub in SAE_POINTS:
            if point not in at:
                raise ValueError(f"hook {name!r}: no SAE is spliced at {point!r} (SAEs at: "
                                 f"{', '.join(at)})")
            inner[point].append((sub, item[1]))
        else:
            outer.append(item)
    exclude = None
    ids = [int(i) for i in exclude_special_tokens]
    if ids:
        if tokens is None:
            raise ValueError("exclude_special_tokens needs the tokens")
        exclude = np.isin(np.asarray(tokens), ids)
    return [(name, splice(sae, use_error_term=use_error_term, hooks=inner[name],
                          exclude=exclude)) for name, sae in at.items()] + outer


def _tokens_2d(tokens: Any) -> Any:
    return tokens[None] if np.ndim(tokens) == 1 else tokens


def run_with_saes(params: Any, cfg: GPTConfig, tokens: Any, saes: SAE | Sequence[SAE], *,
                  use_error_term: bool = False, hooks: Iterable[tuple[str, Hook]] = (),
                  exclude_special_tokens: Iterable[int] = (), model: GPTModel | None = None,
                  stop_at_layer: int | None = None) -> jax.Array:
    """The logits `[B, T, V]` of `tokens` with `saes` spliced in, each at its `cfg.hook_name`
    (sae-lens's `HookedSAETransformer.run_with_saes`).

    `hooks` may name the SAEs' inner points (`blocks.1.hook_resid_pre.hook_sae_acts_post`)
    as well as the model's; `exclude_special_tokens` (token ids) leaves the activations at
    those tokens as they are. `model` and `stop_at_layer` as in `run_with_hooks`.
    """
    pairs = spliced_hooks(cfg, saes, _tokens_2d(tokens), use_error_term=use_error_term,
                          hooks=hooks, exclude_special_tokens=exclude_special_tokens)
    return run_with_hooks(params, cfg, tokens, pairs, model=model, stop_at_layer=stop_at_layer)


def run_with_cache_with_saes(
    params: Any, cfg: GPTConfig, tokens: Any, saes: SAE | Sequence[SAE], *,
    names: Names = None, use_error_term: bool = False, hooks: Iterable[tuple[str, Hook]] = (),
    exclude_special_tokens: Iterable[int] = (), model: GPTModel | None = None,
    stop_at_layer: int | None = None,
) -> tuple[jax.Array, ActivationCache]:
    """`run_with_saes`, keeping the activations `names` asks for: the model's and the SAEs'
    inner points (`<point>.hook_sae_acts_post`...). `names`: None (all of them), a list, or a
    predicate on full names (`run_with_cache`). A point an SAE replaces holds the SAE's output
    (with the model's later hooks there applied)."""
    pairs = spliced_hooks(cfg, saes, _tokens_2d(tokens), use_error_term=use_error_term,
                          hooks=hooks, exclude_special_tokens=exclude_special_tokens)
    inner = [f"{name}.{v}" for name, fn in pairs if isinstance(fn, Splice)
             for v in fn.value_names]
    every = [*hook_names(cfg), *inner]
    if names is None:
        wanted: list[Any] = every
    elif callable(names):
        wanted = [n for n in every if names(n)]
    else:
        wanted = list(names)
        for n in wanted:
            if isinstance(n, str) and n.rpartition(".")[2] in SAE_POINTS and n not in inner:
                raise ValueError(f"{n!r} is not an inner point of the SAEs spliced in: "
                                 f"{', '.join(inner)}")
    return run_with_cache(params, cfg, tokens, names=wanted, hooks=pairs, model=model,
                          stop_at_layer=stop_at_layer)
