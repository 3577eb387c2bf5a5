"""Attribution patching: the first-order estimate of every patch of a kind at once.

An exact patch replaces an activation `a` of the corrupted run by the clean run's, and reruns
the model. To first order the metric then moves by `(a_clean - a_corrupted) . d metric / d a`
at the corrupted run, and one backward pass gives `d metric / d a` for every layer and
position at once. So a whole sweep costs the clean run (its cache), one corrupted run and one
backward pass, against one run per patch (or `jaxgpt.interp.patching`'s shortened ones). The
estimate is good where the metric is near-linear in the activation between the two runs; it
is poorer for large jumps (an attention pattern that flips), which is why the exact sweeps
exist: docs/research.md compares the two.

    attribution_patch(params, cfg, corrupted_tokens, clean_cache, metric, "resid_pre")  # [L, T]

The kinds, shapes and axes are `jaxgpt.interp.patching.KINDS`', and the values estimate
`exact - metric(corrupted)` for each entry of the exact sweep.

Shapes: L layers, B batch, T tokens, H heads, D emb_dim, Dh head_dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.interp.cache import check_tokens, run_with_cache
from jaxgpt.interp.patching import KINDS
from jaxgpt.interp.reads import check_metric
from jaxgpt.nn.model import GPTModel


def _add(delta: jax.Array, x: jax.Array, name: str) -> jax.Array:
    return x + delta


def metric_and_gradients(params: Any, cfg: GPTConfig, tokens: Any, metric: Callable,
                         names: list[str], *, model: GPTModel | None = None,
                         ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """`(metric, activations, gradients)` of one run on `tokens`: the activations at `names`
    and the metric's gradient with respect to each (through a zero added at each point).

    `metric` takes the logits `[T, V]` of `[T]` tokens, `[B, T, V]` of `[B, T]`.
    """
    lead = np.ndim(tokens) == 2
    tokens = check_tokens(tokens, cfg)
    check_metric(metric, tokens.shape + (cfg.vocab_size,) if lead else
                 (tokens.shape[1], cfg.vocab_size))
    _, shapes = run_with_cache(params, cfg, tokens, names=names, model=model)
    zeros = {n: jnp.zeros_like(shapes[n]) for n in names}

    def run(deltas: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        hooks = [(n, jax.tree_util.Partial(_add, deltas[n])) for n in names]
        logits, cache = run_with_cache(params, cfg, tokens, names=names, model=model,
                                       hooks=hooks)
        return metric(logits if lead else logits[0]), dict(cache.acts)

    (value, acts), grads = jax.value_and_grad(run, has_aux=True)(zeros)
    return value, acts, grads


def _reduce(kind: str, diff_times_grad: jax.Array) -> jax.Array:
    """One layer's `(clean - corrupted) * gradient` summed to the kind's axes (the batch and
    the features a patch replaces at once)."""
    axes = KINDS[kind].axes
    x = diff_times_grad.sum(axis=0)  # the batch: a patch replaces every prompt's activation
    if KINDS[kind].per_key:  # [H, T(dest), T(src)]
        if axes == ("head",):
            return x.sum(axis=(1, 2))
        return x if "src" in axes else x.sum(axis=2)
    x = x.sum(axis=-1)  # the features: [T] or [T, H]
    return x.sum(axis=0) if axes == ("head",) else x


def attribution_patch(params: Any, cfg: GPTConfig, corrupted_tokens: Any, clean_cache: Any,
                      metric: Callable, kind: str, *,
                      model: GPTModel | None = None) -> jax.Array:
    """The first-order estimate of each patch of `kind` (a key of `patching.KINDS`):
    `[L, *axes]`, each entry `(clean - corrupted) . d metric / d activation` summed over what
    that patch replaces, estimating `patched metric - metric(corrupted)`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    names = [f"blocks.{i}.{KINDS[kind].hook}" for i in range(cfg.n_layers)]
    missing = [n for n in names if n not in clean_cache]
    if missing:
        raise ValueError(f"clean_cache has no {missing[0]!r}: run_with_cache the clean prompt "
                         f"keeping it (names=None keeps every activation)")
    _, acts, grads = metric_and_gradients(params, cfg, corrupted_tokens, metric, names,
                                          model=model)
    out = []
    for name in names:
        clean = jnp.asarray(clean_cache[name])
        if clean.shape != acts[name].shape:
            raise ValueError(f"the clean run's {name} has shape {clean.shape}, the corrupted "
                             f"run's {acts[name].shape}: patching needs prompts of the same "
                             f"length")
        out.append(_reduce(kind, (clean - acts[name]) * grads[name]))
    return jnp.stack(out)
