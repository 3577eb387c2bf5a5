"""Moving weights between jaxgpt and other formats.

Each foreign format has one name-mapping table; every tensor is checked against the shapes
that `jax.eval_shape(GPTModel(cfg).init, ...)` gives before anything is returned. torch is
imported only inside the functions that need it.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.model import param_shapes


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


# ---------------------------------------------------------------------------------------------
# The seeds' PyTorch GPTModel (llms_from_scratch.ch04): `nn.Linear.weight` is [out, in], a Flax
# kernel [in, out], so linear weights are transposed; everything else keeps its layout.
# ---------------------------------------------------------------------------------------------


def torch_name_map(cfg: GPTConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """state_dict key -> (jaxgpt param path, transpose?) for the seeds' GPTModel."""
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
        linears = ["att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.layers.0", "ff.layers.2"]
        for name in linears:
            path = (j, *name.replace("layers.", "layers_").split("."))
            table[f"{t}.{name}.weight"] = (path + ("kernel",), True)
            if name.startswith("ff.") or name == "att.out_proj" or cfg.qkv_bias:
                table[f"{t}.{name}.bias"] = (path + ("bias",), False)
        for norm in ("norm1", "norm2"):
            for p in ("scale", "shift"):
                table[f"{t}.{norm}.{p}"] = ((j, norm, p), False)
    return table


def _to_numpy(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "detach"):  # a torch tensor, without importing torch here
        return tensor.detach().to("cpu").float().numpy()
    return np.asarray(tensor, dtype=np.float32)


def from_torch_state_dict(state_dict: Mapping[str, Any], cfg: GPTConfig) -> dict:
    """Params for `GPTModel(cfg)` from the state_dict of the seeds' PyTorch `GPTModel`.

    Buffers the reference registers (attention `mask`) are ignored. A missing key, an
    unexpected parameter or a shape that does not fit `cfg` raises ValueError naming it.
    """
    table = torch_name_map(cfg)
    shapes = dict(_flatten(param_shapes(cfg)))
    missing = [k for k in table if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict is missing {len(missing)} key(s) for {cfg}: {missing[:5]}")
    extra = [k for k in state_dict if k not in table and not k.endswith(".att.mask")]
    if extra:
        raise ValueError(f"state_dict has key(s) that {cfg} has no place for: {extra[:5]}")
    flat = {}
    for key, (path, transpose) in table.items():
        array = _to_numpy(state_dict[key])
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
    return _unflatten(flat)


def to_torch_state_dict(params: Mapping[str, Any], cfg: GPTConfig) -> dict:
    """The seeds' PyTorch `GPTModel` state_dict (float32 CPU tensors) from jaxgpt params.

    The reference's per-block causal `mask` buffers are included, so the result loads with
    `model.load_state_dict(sd)` (strict).
    """
    import torch

    flat = dict(_flatten(params))
    shapes = dict(_flatten(param_shapes(cfg)))
    out = {}
    for key, (path, transpose) in torch_name_map(cfg).items():
        if path not in flat:
            raise ValueError(f"params are missing {'/'.join(path)} (needed for {key!r})")
        array = np.asarray(jax.device_get(flat[path]), dtype=np.float32)
        if array.shape != tuple(shapes[path].shape):
            raise ValueError(
                f"params {'/'.join(path)} has shape {array.shape}, {cfg} needs {shapes[path].shape}"
            )
        out[key] = torch.from_numpy(np.array(array.T if transpose else array, order="C"))
    extra = set(flat) - {path for path, _ in torch_name_map(cfg).values()}
    if extra:
        raise ValueError(f"params have entries {cfg} has no place for: {sorted(extra)[:5]}")
    mask = torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1)
    for i in range(cfg.n_layers):
        out[f"trf_blocks.{i}.att.mask"] = mask.clone()
    return out
