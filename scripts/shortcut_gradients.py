"""The seeds' shortcut-connection experiment (chapter 4, `ExampleDeepNeuralNetwork`) in Flax.

Five Linear + GELU layers of sizes [3, 3, 3, 3, 3, 1]; with shortcuts, each layer's input is
added to its output where the shapes match. One input [[1., 0., -1.]], target [[0.]], MSE
loss; the script prints the mean absolute gradient of each layer's weight, without and with
shortcuts: without them the gradient shrinks towards the first layer (vanishing gradients).

    python scripts/shortcut_gradients.py                 # Flax initialisation, --seed 123
    python scripts/shortcut_gradients.py --torch-seed 123  # PyTorch's nn.Linear init, as the book
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.model import GELU

LAYER_SIZES = (3, 3, 3, 3, 3, 1)


class ExampleDeepNeuralNetwork(nn.Module):
    """Linear + GELU layers `layers_0..n`; `use_shortcut` adds x back where shapes match."""

    layer_sizes: Sequence[int]
    use_shortcut: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.layer_sizes[1:]):
            out = GELU()(nn.Dense(width, name=f"layers_{i}")(x))  # [B, width]
            x = x + out if self.use_shortcut and x.shape == out.shape else out
        return x


def torch_init_params(layer_sizes: Sequence[int], seed: int) -> dict:
    """The weights PyTorch draws for the book's model after `torch.manual_seed(seed)`."""
    import torch

    torch.manual_seed(seed)
    params = {}
    for i, (d_in, d_out) in enumerate(itertools.pairwise(layer_sizes)):
        layer = torch.nn.Linear(d_in, d_out)
        params[f"layers_{i}"] = {
            "kernel": jnp.asarray(layer.weight.detach().numpy().T),
            "bias": jnp.asarray(layer.bias.detach().numpy()),
        }
    return params


def weight_grad_means(params: dict, use_shortcut: bool, layer_sizes=LAYER_SIZES) -> list[float]:
    """Mean |d loss / d weight| of each layer, for the book's input and target."""
    model = ExampleDeepNeuralNetwork(tuple(layer_sizes), use_shortcut)
    x = jnp.array([[1.0, 0.0, -1.0]])  # [1, 3]
    target = jnp.array([[0.0]])  # [1, 1]

    def loss_fn(p):
        return jnp.mean((model.apply({"params": p}, x) - target) ** 2)

    grads = jax.grad(loss_fn)(params)
    return [
        float(jnp.mean(jnp.abs(grads[f"layers_{i}"]["kernel"])))
        for i in range(len(layer_sizes) - 1)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    init = parser.add_mutually_exclusive_group()
    init.add_argument("--seed", type=int, default=123, help="seed of Flax's initialisation")
    init.add_argument(
        "--torch-seed",
        type=int,
        default=None,
        help="use PyTorch's nn.Linear initialisation with this seed (needs torch)",
    )
    args = parser.parse_args(argv)
    if args.torch_seed is not None:
        params = torch_init_params(LAYER_SIZES, args.torch_seed)
        source = f"PyTorch nn.Linear init, torch.manual_seed({args.torch_seed})"
    else:
        dummy = jnp.zeros((1, LAYER_SIZES[0]))
        model = ExampleDeepNeuralNetwork(LAYER_SIZES, False)
        params = model.init(jax.random.PRNGKey(args.seed), dummy)["params"]
        source = f"Flax init, seed {args.seed}"
    print(f"# layer sizes {list(LAYER_SIZES)}; {source}")
    for use_shortcut in (False, True):
        print(f"use_shortcut={use_shortcut}")
        for i, g in enumerate(weight_grad_means(params, use_shortcut)):
            print(f"layers.{i}.0.weight has gradient mean of {np.float32(g)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
