"""Weights of the book's PyTorch `GPTModel` (`llms_from_scratch.ch04`) to and from jaxgpt.

`nn.Linear.weight` is `[out, in]`, a Flax kernel `[in, out]`, so linear weights are
transposed; everything else keeps its layout. torch is imported only inside the functions
that need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.io.params import flatten, shape_table, to_numpy, unflatten


def torch_name_map(cfg: GPTConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """state_dict key -> (jaxgpt param path, transpose?) for the book's GPTModel."""
    table: dict[str, tuple[tuple[str, ...], bool]] = {
        "tok_emb.weight": (("tok_emb", "embedding"), False),
        "pos_emb.weight": (("pos_emb", "embedding"), False),
        "final_norm.scale": (("final_norm", "scale"), False),
        "final_norm.shift": (("final_norm", "shift"), False),
    }
    if not cfg.tie_embeddings:
        table["out_head.weight"] = (("out_head", "kernel"), True)
    for i in range(cfg.n_layers):
        t, j = f"trf_blocks.{i}", f"trf_blocks_{i}"
        linears = ["att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.layers.0",
                   "ff.layers.2"]
        for name in linears:
            path = (j, *name.replace("layers.", "layers_").split("."))
            table[f"{t}.{name}.weight"] = (path + ("kernel",), True)
            if name.startswith("ff.") or name == "att.out_proj" or cfg.qkv_bias:
                table[f"{t}.{name}.bias"] = (path + ("bias",), False)
        for norm in ("norm1", "norm2"):
            for p in ("scale", "shift"):
                table[f"{t}.{norm}.{p}"] = ((j, norm, p), False)
    return table

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

