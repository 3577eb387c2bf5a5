"""The book's chapter-4 teaching code: the placeholder GPT and the shortcut experiment.

`DummyGPTModel` has the final model's skeleton (token + position embeddings, dropout, a stack
of blocks, a final norm, an output head), but its `DummyTransformerBlock`s and
`DummyLayerNorm` return their input unchanged: the logits are the embeddings times the head.
It shows the data flow and the output shape `[B, T, vocab_size]` before chapter 4 fills the
blocks in; `jaxgpt.GPTModel` is the finished model, with the same parameter names.

`ExampleDeepNeuralNetwork` is five Linear + GELU layers of sizes [3, 3, 3, 3, 3, 1]; with
shortcuts, each layer's input is added to its output where the shapes match.
`print_gradients` takes one MSE step towards the target 0 and prints the mean absolute
gradient of each weight: without shortcuts it shrinks towards the first layer (vanishing
gradients), with them it does not. `scripts/shortcut_gradients.py` runs the experiment.

Names as in the book's code. Shapes: B batch, T tokens, D emb_dim, V vocab_size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxgpt.config import GPTConfig

# GPTModel's initialisation, so that the two models' shared parameters start alike (the
# book's placeholder keeps PyTorch's defaults).
from jaxgpt.nn.layers import GELU, INIT
from jaxgpt.nn.model import apply_method

# --- the placeholder GPT -------------------------------------------------------------------------

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
        tok_emb = nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=INIT, name="tok_emb")
        pos_emb = nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=INIT, name="pos_emb")
        x = tok_emb(in_idx) + pos_emb(jnp.arange(seq_len))  # [B, T, D]
        x = nn.Dropout(cfg.drop_rate, name="drop_emb")(x, deterministic=deterministic)
        for i in range(cfg.n_layers):
            x = DummyTransformerBlock(cfg, name=f"trf_blocks_{i}")(x, deterministic)
        x = DummyLayerNorm(cfg.emb_dim, name="final_norm")(x)
        if cfg.tie_embeddings:
            return tok_emb.attend(x)  # [B, T, V]
        head = nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=INIT, name="out_head")
        return head(x)  # [B, T, V]


def dummy_params_from_torch(state_dict: Mapping[str, Any], cfg: GPTConfig) -> dict:
    """Params for `DummyGPTModel(cfg)` from the state_dict of the book's `DummyGPTModel`.

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


# --- shortcut connections ------------------------------------------------------------------------

LAYER_SIZES = (3, 3, 3, 3, 3, 1)
# The book's input: one example of three features.
SAMPLE_INPUT = ((1.0, 0.0, -1.0),)
# Flax's names for what PyTorch calls `weight` in nn.Linear and nn.Embedding; the book's
# print_gradients keeps the parameters whose name contains "weight" (no biases, no
# LayerNorm scale/shift).
_WEIGHT_LEAVES = ("kernel", "embedding")


class ExampleDeepNeuralNetwork(nn.Module):
    """Linear + GELU layers `layers_0..n`; `use_shortcut` adds x back where shapes match.

    Call with `x` `[B, layer_sizes[0]]`; returns `[B, layer_sizes[-1]]`.
    """

    layer_sizes: Sequence[int]
    use_shortcut: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.layer_sizes[1:]):
            out = GELU()(nn.Dense(width, name=f"layers_{i}")(x))  # [B, width]
            x = x + out if self.use_shortcut and x.shape == out.shape else out
        return x


def print_gradients(model: nn.Module, x: Any, params: Any | None = None) -> dict[str, float]:
    """Print and return the mean absolute gradient of every weight for the target 0.

    As the book's `print_gradients(model, x)`: a forward pass on `x`, the MSE loss against
    the target 0 (the book's `torch.tensor([[0.]])`, broadcast to the output), one backward
    pass, then a line `"{name} has gradient mean of {value}"` for each weight (Dense kernels and
    embeddings; not biases or LayerNorm parameters), in the order the model created them.

    Args:
      model: a bound module (`module.bind({"params": params})`, the closest JAX has to the
        book's model object), or an unbound one with `params` given.
      x: the input, e.g. `[[1., 0., -1.]]` for `ExampleDeepNeuralNetwork`.
      params: the parameters, when `model` is not bound.

    Returns:
      `{name: mean |d loss / d weight|}`, names as printed: the parameter path joined by "/",
      e.g. `"layers_0/kernel"`.
    """
    if params is None:
        if model.scope is None:
            raise ValueError(
                "print_gradients needs parameters: pass a bound module "
                "(model.bind({'params': params})) or params=..."
            )
        model, variables = model.unbind()
        params = variables["params"]
    elif model.scope is not None:
        raise ValueError("pass either a bound module or params=..., not both")
    x = jnp.asarray(x)

    def loss_fn(p: Any) -> jax.Array:
        output = apply_method(model, {"params": p}, type(model).__call__)(x)  # model(x)
        return jnp.mean(jnp.square(output - 0.0))  # MSELoss against the target 0

    # One compiled pass: op by op, a GPT's backward pass would dispatch thousands of small ops.
    grads = jax.jit(jax.grad(loss_fn))(params)
    # flatten_dict keeps the creation order of `params` (jax.grad's output has its keys sorted,
    # which would put layers_10 before layers_2).
    flat_grads = traverse_util.flatten_dict(grads)
    means = {}
    for path in traverse_util.flatten_dict(params):
        if path[-1] in _WEIGHT_LEAVES:
            name = "/".join(path)
            means[name] = float(jnp.mean(jnp.abs(flat_grads[path])))
            print(f"{name} has gradient mean of {means[name]}")
    return means


def shortcut_params_from_torch(state_dict: Mapping[str, Any]) -> dict:
    """Params for `ExampleDeepNeuralNetwork` from the state_dict of the book's version.

    The book's `layers.{i}.0.weight` `[out, in]` / `layers.{i}.0.bias` (an `nn.Linear` inside
    `nn.Sequential(Linear, GELU)`) become `layers_{i}/kernel` `[in, out]` / `layers_{i}/bias`.
    """
    params: dict = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if len(parts) != 4 or parts[0] != "layers" or parts[2] != "0" or not parts[1].isdigit():
            raise ValueError(
                f"unexpected state_dict key {key!r}: expected layers.<i>.0.weight or "
                "layers.<i>.0.bias"
            )
        array = tensor.detach().cpu().float().numpy() if hasattr(tensor, "detach") else tensor
        array = np.asarray(array, dtype=np.float32)
        if parts[3] == "weight":
            leaf, array = "kernel", array.T
        elif parts[3] == "bias":
            leaf = "bias"
        else:
            raise ValueError(f"unexpected state_dict key {key!r}: expected .weight or .bias")
        params.setdefault(f"layers_{parts[1]}", {})[leaf] = jnp.asarray(np.ascontiguousarray(array))
    # The book's order, layer by layer (a state_dict lists them so; this keeps it for any input).
    return dict(sorted(params.items(), key=lambda kv: int(kv[0].split("_")[1])))
