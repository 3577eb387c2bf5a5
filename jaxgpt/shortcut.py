"""The seeds' shortcut-connection experiment (chapter 4): `ExampleDeepNeuralNetwork` and
`print_gradients`.

Five Linear + GELU layers of sizes [3, 3, 3, 3, 3, 1]; with shortcuts, each layer's input is
added to its output where the shapes match. `print_gradients` takes one MSE step towards the
target 0 and prints the mean absolute gradient of each weight: without shortcuts it shrinks
towards the first layer (vanishing gradients), with them it does not.
`scripts/shortcut_gradients.py` runs the experiment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxgpt.model import GELU

LAYER_SIZES = (3, 3, 3, 3, 3, 1)
# The book's input: one example of three features.
SAMPLE_INPUT = ((1.0, 0.0, -1.0),)
# Flax's names for what PyTorch calls `weight` in nn.Linear and nn.Embedding; the seeds'
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

    As the seeds' `print_gradients(model, x)`: a forward pass on `x`, the MSE loss against
    the target 0 (the seeds' `torch.tensor([[0.]])`, broadcast to the output), one backward
    pass, then a line `"{name} has gradient mean of {value}"` for each weight (Dense kernels and
    embeddings; not biases or LayerNorm parameters), in the order the model created them.

    Args:
      model: a bound module (`module.bind({"params": params})`, the closest JAX has to the
        seeds' model object), or an unbound one with `params` given.
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

    def loss_fn(p):
        output = model.apply({"params": p}, x)
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


def from_torch_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """Params for `ExampleDeepNeuralNetwork` from the state_dict of the seeds' version.

    The seeds' `layers.{i}.0.weight` `[out, in]` / `layers.{i}.0.bias` (an `nn.Linear` inside
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
    # The seeds' order, layer by layer (a state_dict lists them so; this keeps it for any input).
    return dict(sorted(params.items(), key=lambda kv: int(kv[0].split("_")[1])))
