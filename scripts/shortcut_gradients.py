"""The book's shortcut-connection experiment (chapter 4): mean absolute gradient per layer.

`jaxgpt.book.ch04.ExampleDeepNeuralNetwork` (five Linear + GELU layers of sizes
[3, 3, 3, 3, 3, 1]) and `print_gradients` on the book's input [[1., 0., -1.]] with target
[[0.]] and MSE loss, without and with shortcut connections: without them the gradient shrinks
towards the first layer (vanishing gradients).

    python scripts/shortcut_gradients.py                 # Flax initialisation, --seed 123
    python scripts/shortcut_gradients.py --torch-seed 123  # PyTorch's nn.Linear init, as the book
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxgpt.book.ch04 import (
    LAYER_SIZES,
    SAMPLE_INPUT,
    ExampleDeepNeuralNetwork,
    print_gradients,
    shortcut_params_from_torch,
)


def torch_init_params(layer_sizes: Sequence[int], seed: int) -> dict:
    """The weights PyTorch draws for the book's model after `torch.manual_seed(seed)`."""
    import torch

    torch.manual_seed(seed)
    state_dict = {}
    for i, (d_in, d_out) in enumerate(itertools.pairwise(layer_sizes)):
        layer = torch.nn.Linear(d_in, d_out)  # drawn in the order the book's model draws them
        state_dict[f"layers.{i}.0.weight"] = layer.weight
        state_dict[f"layers.{i}.0.bias"] = layer.bias
    return shortcut_params_from_torch(state_dict)


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
    x = jnp.array(SAMPLE_INPUT)  # [1, 3]
    if args.torch_seed is not None:
        params = torch_init_params(LAYER_SIZES, args.torch_seed)
        source = f"PyTorch nn.Linear init, torch.manual_seed({args.torch_seed})"
    else:
        model = ExampleDeepNeuralNetwork(LAYER_SIZES, False)
        params = model.init(jax.random.PRNGKey(args.seed), x)["params"]
        source = f"Flax init, seed {args.seed}"
    print(f"# layer sizes {list(LAYER_SIZES)}; {source}")
    for use_shortcut in (False, True):
        print(f"use_shortcut={use_shortcut}")
        print_gradients(ExampleDeepNeuralNetwork(LAYER_SIZES, use_shortcut), x, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
