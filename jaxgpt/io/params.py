"""Parameter pytrees as flat tables of paths, the common ground of every weight format."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.nn.model import param_shapes

Path = tuple[str, ...]  # a parameter's path, e.g. ("trf_blocks_0", "att", "W_query", "kernel")


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """`(path, leaf)` for every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def unflatten(flat: Mapping[Path, Any]) -> dict:
    """The nested dict of `(path, leaf)` pairs (the inverse of `flatten`)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


@functools.lru_cache(maxsize=8)
def shape_table(cfg: GPTConfig) -> dict[Path, jax.ShapeDtypeStruct]:
    """param path -> ShapeDtypeStruct via `jax.eval_shape`, traced once per config."""
    return dict(flatten(param_shapes(cfg)))


def to_numpy(tensor: Any) -> np.ndarray:
    """A float32 NumPy array of a torch tensor (any device or float dtype) or an array."""
    if hasattr(tensor, "detach"):  # a torch tensor, without importing torch here
        return tensor.detach().to("cpu").float().numpy()
    return np.asarray(tensor, dtype=np.float32)
