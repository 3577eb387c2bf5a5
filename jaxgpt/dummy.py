"""The seeds' placeholder GPT (chapter 4's opening), named as in the book's code.

`DummyGPTModel` has the final model's skeleton (token + position embeddings, dropout, a stack
of blocks, a final norm, an output head), but its `DummyTransformerBlock`s and
`DummyLayerNorm` return their input unchanged: the logits are the embeddings times the head.
It shows the data flow and the output shape `[B, T, vocab_size]` before chapter 4 fills the
blocks in; `jaxgpt.model.GPTModel` is the finished model, with the same parameter names.

Shapes: B batch, T tokens, D emb_dim, V vocab_size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig

# GPTModel's initialisation (normal, std 0.02), so that the two models' shared parameters
# start alike; the seeds' placeholder keeps PyTorch's defaults.
_init = nn.initializers.normal(stddev=0.02)


class DummyTransformerBlock(nn.Module):
    """Placeholder for `TransformerBlock`: returns `x` `[B, T, D]` unchanged."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        return x


class DummyLayerNorm(nn.Module):
    """Placeholder for `LayerNorm`: the same constructor arguments; returns `x` unchanged."""

    normalized_shape: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class DummyGPTModel(nn.Module):
    """The GPT skeleton with pass-through blocks and norm: logits = (tok_emb + pos_emb) @ head.

    Call with `in_idx` int `[B, T]` (T <= context_length); returns float32 logits `[B, T, V]`.
    Dropout on the embeddings is off unless `deterministic=False` and a `dropout` rng is given.
    Parameters: `tok_emb`, `pos_emb` and `out_head` (none when `cfg.tie_embeddings`), named
    and shaped as in `GPTModel`.
    """

    cfg: GPTConfig

    @nn.compact
    def __call__(self, in_idx: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        _, seq_len = in_idx.shape
        if seq_len > cfg.context_length:
            raise ValueError(
                f"{seq_len} tokens exceed context_length {cfg.context_length}: "
                f"pass at most {cfg.context_length}"
            )
        tok_emb = nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=_init, name="tok_emb")
        pos_emb = nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=_init, name="pos_emb")
        x = tok_emb(in_idx) + pos_emb(jnp.arange(seq_len))  # [B, T, D]
        x = nn.Dropout(cfg.drop_rate, name="drop_emb")(x, deterministic=deterministic)
        for i in range(cfg.n_layers):
            x = DummyTransformerBlock(cfg, name=f"trf_blocks_{i}")(x, deterministic)
        x = DummyLayerNorm(cfg.emb_dim, name="final_norm")(x)
        if cfg.tie_embeddings:
            return tok_emb.attend(x)  # [B, T, V]
        head = nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=_init, name="out_head")
        return head(x)  # [B, T, V]


def from_torch_state_dict(state_dict: Mapping[str, Any], cfg: GPTConfig) -> dict:
    """Params for `DummyGPTModel(cfg)` from the state_dict of the seeds' `DummyGPTModel`.

    `tok_emb.weight` and `pos_emb.weight` are kept as they are, `out_head.weight` `[V, D]` is
    transposed into a Flax kernel `[D, V]`. A missing or unexpected key, or a shape that does
    not fit `cfg`, raises ValueError naming it.
    """
    table = {
        "tok_emb.weight": ("tok_emb", "embedding", False),
        "pos_emb.weight": ("pos_emb", "embedding", False),
    }
    if not cfg.tie_embeddings:
        table["out_head.weight"] = ("out_head", "kernel", True)
    missing = sorted(set(table) - set(state_dict))
    extra = sorted(set(state_dict) - set(table))
    if missing or extra:
        raise ValueError(
            f"state_dict keys do not fit DummyGPTModel({cfg}): missing {missing}, "
            f"unexpected {extra}"
        )
    dummy = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(DummyGPTModel(cfg).init, jax.random.PRNGKey(0), dummy)["params"]
    params: dict = {}
    for key, (module, leaf, transpose) in table.items():
        tensor = state_dict[key]
        array = tensor.detach().cpu().float().numpy() if hasattr(tensor, "detach") else tensor
        array = np.asarray(array, dtype=np.float32)
        want = tuple(shapes[module][leaf].shape)
        if transpose:
            want = want[::-1]
        if array.shape != want:
            raise ValueError(f"state_dict[{key!r}] has shape {array.shape}, {cfg} needs {want}")
        params[module] = {leaf: jnp.asarray(np.ascontiguousarray(array.T if transpose else array))}
    return params
