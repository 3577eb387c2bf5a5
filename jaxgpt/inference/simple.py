"""The book's `generate_text_simple` as one jit-compiled loop over a fixed-size token buffer.

It keeps the book's semantics (crop to the last `context_size` tokens, argmax of the last
position, append), recomputing the window at every step, as a single `lax.fori_loop` over a
token buffer `[B, T + max_new_tokens]`.

Shapes: B batch, T prompt tokens, N new tokens, W window, D emb_dim, V vocab_size.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxgpt.config import GPTConfig
from jaxgpt.inference.checks import check_count, check_token_ids, resolve_context_size
from jaxgpt.inference.decode import TRACE_COUNTS
from jaxgpt.nn.hooks import free_hooks, with_hook_args
from jaxgpt.nn.model import GPTModel, apply_method, model_for


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "context_size"))
def _generate_simple(params: Any, idx: jax.Array, model: GPTModel, max_new_tokens: int,
                     context_size: int) -> jax.Array:
    TRACE_COUNTS["generate_text_simple"] += 1
    b, t = idx.shape
    total = t + max_new_tokens
    window = min(total, context_size)  # tokens the model sees at each step
    variables = {"params": params}
    buf = jnp.zeros((b, total), jnp.int32).at[:, :t].set(idx)  # [B, T + N]

    def step(i: jax.Array, buf: jax.Array) -> jax.Array:
        length = t + i  # tokens known so far
        # The book's crop `idx[:, -context_size:]`. Before the buffer fills, the window starts
        # at 0 and its tail holds not-yet-written slots, which the causal mask keeps out of
        # every position we read; positions are renumbered 0..window-1 as in the reference.
        start = jnp.maximum(length - window, 0)
        ctx = lax.dynamic_slice(buf, (0, start), (b, window))  # [B, W]
        hidden = apply_method(model, variables, GPTModel.hidden)(ctx)  # [B, W, D]
        last = lax.dynamic_index_in_dim(hidden, length - start - 1, axis=1, keepdims=False)
        logits = apply_method(model, variables, GPTModel.head)(last)  # [B, V]
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
        return lax.dynamic_update_slice(buf, nxt[:, None], (0, length))

    return lax.fori_loop(0, max_new_tokens, step, buf)


def generate_text_simple(
    params: Any,
    cfg: GPTConfig,
    idx: Any,
    max_new_tokens: int,
    context_size: int | None = None,
    *,
    model: GPTModel | None = None,
    hooks: Any = (),
) -> jax.Array:
    """Greedy decoding with the book's semantics, as one jit-compiled call.

    Args:
      params: jaxgpt params for `GPTModel(cfg)`.
      cfg: the model's config (static: a new config compiles anew).
      idx: int token ids `[B, T]`, equal-length prompts.
      max_new_tokens: how many tokens to append (>= 0).
      context_size: how many trailing tokens the model sees; default `cfg.context_length`.
      model: the module to apply, for a variant (`GPTModel(cfg, attention_cls=...)`);
        default `GPTModel(cfg)`.
      hooks: `(name, fn)` pairs run at the model's hook points at every step (see
        `jaxgpt.nn.hooks`); arrays in pytree hooks are arguments of the compiled loop.

    Returns:
      int32 `[B, T + max_new_tokens]`: the prompt followed by the generated ids.
    """
    model = model_for(cfg, model)
    table, args = free_hooks(cfg, hooks)
    idx = check_token_ids(idx, cfg)
    max_new_tokens = check_count(max_new_tokens, "max_new_tokens")
    context_size = resolve_context_size(cfg, context_size)
    if table:
        model, params = model.clone(hooks=model.hooks.plus(table)), with_hook_args(params, args)
    return _generate_simple(params, jnp.asarray(idx), model, max_new_tokens, context_size)

