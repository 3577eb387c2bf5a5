"""Weights of the book's PyTorch `GPTModel` (`llms_from_scratch.ch04`) to and from jaxgpt.

`nn.Linear.weight` is `[out, in]`, a Flax kernel `[in, out]`, so linear weights are
transposed; everything else keeps its layout. torch is imported only inside the functions
that need it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.io.params import Path, flatten, shape_table, to_numpy, unflatten


def torch_key(path: Path) -> tuple[str, bool]:
    """The book's state_dict key of the jaxgpt param `path`, and whether it is transposed.

    The book's modules and jaxgpt's have the same names; Flax writes a list index as a suffix
    (`trf_blocks_3`, `layers_0`) where PyTorch writes a path step (`trf_blocks.3`,
    `layers.0`), and calls `weight` a `kernel` (transposed) or an `embedding`.
    """
    steps = [re.sub(r"_(\d+)$", r".\1", step) for step in path[:-1]]
    leaf = path[-1]
    return ".".join([*steps, {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)]), (
        leaf == "kernel")


def torch_name_map(cfg: GPTConfig) -> dict[str, tuple[Path, bool]]:
    """state_dict key -> (jaxgpt param path, transpose?) for the book's GPTModel, read off the
    model's own parameters (`GPTModel(cfg)`'s tree), so the two cannot drift apart."""
    table = {}
    for path in sorted(shape_table(cfg), key=_book_order):
        key, transpose = torch_key(path)
        table[key] = (path, transpose)
    return table


# The order the book's `GPTModel` registers its modules in (its state_dict's order).
_BOOK_ORDER = ("tok_emb", "pos_emb", "trf_blocks", "final_norm", "out_head")


def _book_order(path: Path) -> tuple:
    top, _, block = path[0].rpartition("_") if path[0].startswith("trf_blocks_") else (
        path[0], "", "0")
    return _BOOK_ORDER.index(top), int(block), path[1:]


def from_torch_state_dict(state_dict: Mapping[str, Any], cfg: GPTConfig) -> dict:
    """Params for `GPTModel(cfg)` from the state_dict of the book's PyTorch `GPTModel`.

    Buffers the reference registers (attention `mask`) are ignored. A missing key, an
    unexpected parameter or a shape that does not fit `cfg` raises ValueError naming it.
    """
    table = torch_name_map(cfg)
    shapes = shape_table(cfg)
    missing = [k for k in table if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict is missing {len(missing)} key(s) for {cfg}: {missing[:5]}")
    extra = [k for k in state_dict if k not in table and not k.endswith(".att.mask")]
    if extra:
        raise ValueError(f"state_dict has key(s) that {cfg} has no place for: {extra[:5]}")
    flat = {}
    for key, (path, transpose) in table.items():
        array = to_numpy(state_dict[key])
        if transpose:
            array = array.T
        want = tuple(shapes[path].shape)
        if array.shape != want:
            got = array.T.shape if transpose else array.shape
            raise ValueError(
                f"state_dict[{key!r}] has shape {tuple(got)}, but {cfg} needs "
                f"{tuple(reversed(want)) if transpose else want}"
            )
        flat[path] = jax.numpy.asarray(np.ascontiguousarray(array))
    return unflatten(flat)


def to_torch_state_dict(params: Mapping[str, Any], cfg: GPTConfig) -> dict:
    """The book's PyTorch `GPTModel` state_dict (float32 CPU tensors) from jaxgpt params.

    The reference's per-block causal `mask` buffers are included, so the result loads with
    `model.load_state_dict(sd)` (strict).
    """
    import torch

    flat = dict(flatten(params))
    shapes = shape_table(cfg)
    table = torch_name_map(cfg)
    out = {}
    for key, (path, transpose) in table.items():
        if path not in flat:
            raise ValueError(f"params are missing {'/'.join(path)} (needed for {key!r})")
        array = np.asarray(jax.device_get(flat[path]), dtype=np.float32)
        if array.shape != tuple(shapes[path].shape):
            raise ValueError(
                f"params {'/'.join(path)} has shape {array.shape}, {cfg} needs {shapes[path].shape}"
            )
        out[key] = torch.from_numpy(np.array(array.T if transpose else array, order="C"))
    extra = set(flat) - {path for path, _ in table.values()}
    if extra:
        raise ValueError(f"params have entries {cfg} has no place for: {sorted(extra)[:5]}")
    mask = torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1)
    for i in range(cfg.n_layers):
        out[f"trf_blocks.{i}.att.mask"] = mask.clone()
    return out

