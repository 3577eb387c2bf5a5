"""Hugging Face GPT-2 (transformers `GPT2LMHeadModel`) weights and directories.

Its Conv1D weights are stored `[in, out]`, the layout of a Flax kernel, so nothing is
transposed except an untied `lm_head.weight` (`[V, D]`, an nn.Linear). `attn.c_attn` fuses
query|key|value along its last axis. A directory holds `config.json` (see
`jaxgpt.io.hf_config`) and safetensors or `pytorch_model.bin` weights, possibly sharded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.io.files import atomic_directory
from jaxgpt.io.formats import HF_WEIGHT_FILES
from jaxgpt.io.hf_config import gpt_config_to_hf, hf_config_to_gpt
from jaxgpt.io.params import flatten, shape_table, to_numpy, unflatten

HF_PREFIX = "transformer."
# Non-parameter buffers that older transformers versions wrote into checkpoints.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


def hf_name_map(cfg: GPTConfig) -> dict[str, tuple[tuple[tuple[str, ...] | None, ...], bool]]:
    """HF key -> (jaxgpt param paths, transpose?) for `GPT2LMHeadModel`.

    A key with several paths is their concatenation along the last axis (`c_attn`: q|k|v).
    A `None` path is a tensor jaxgpt does not have and that must be zero: the `c_attn` bias of a
    model with `qkv_bias=False`. `lm_head.weight` is listed only for untied models.
    """
    p = HF_PREFIX
    table: dict[str, tuple[tuple[tuple[str, ...] | None, ...], bool]] = {
        f"{p}wte.weight": ((("tok_emb", "embedding"),), False),
        f"{p}wpe.weight": ((("pos_emb", "embedding"),), False),
        f"{p}ln_f.weight": ((("final_norm", "scale"),), False),
        f"{p}ln_f.bias": ((("final_norm", "shift"),), False),
    }
    for i in range(cfg.n_layers):
        h, j = f"{p}h.{i}", f"trf_blocks_{i}"
        qkv = [(j, "att", name) for name in ("W_query", "W_key", "W_value")]
        table[f"{h}.ln_1.weight"] = (((j, "norm1", "scale"),), False)
        table[f"{h}.ln_1.bias"] = (((j, "norm1", "shift"),), False)
        table[f"{h}.attn.c_attn.weight"] = (tuple(q + ("kernel",) for q in qkv), False)
        bias = tuple(q + ("bias",) if cfg.qkv_bias else None for q in qkv)
        table[f"{h}.attn.c_attn.bias"] = (bias, False)
        for hf, jx in (("attn.c_proj", ("att", "out_proj")), ("mlp.c_fc", ("ff", "layers_0")),
                       ("mlp.c_proj", ("ff", "layers_2"))):
            table[f"{h}.{hf}.weight"] = (((j, *jx, "kernel"),), False)
            table[f"{h}.{hf}.bias"] = (((j, *jx, "bias"),), False)
        table[f"{h}.ln_2.weight"] = (((j, "norm2", "scale"),), False)
        table[f"{h}.ln_2.bias"] = (((j, "norm2", "shift"),), False)
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = ((("out_head", "kernel"),), True)
    return table


def hf_shape(paths: tuple[tuple[str, ...] | None, ...], transpose: bool,
             shapes: Mapping) -> tuple[int, ...]:
    """The HF shape of a tensor made of `paths` (a `None` path is shaped like its peers)."""
    known = [tuple(shapes[q].shape) for q in paths if q is not None]
    if not known:  # c_attn bias without qkv_bias: [3D]
        return (3 * shapes[("final_norm", "scale")].shape[0],)
    parts = [known[0] if q is None else tuple(shapes[q].shape) for q in paths]
    shape = (*parts[0][:-1], sum(s[-1] for s in parts))
    return tuple(reversed(shape)) if transpose else shape


def to_hf_state_dict(params: Mapping[str, Any], cfg: GPTConfig) -> dict[str, np.ndarray]:
    """The `GPT2LMHeadModel` state_dict (float32 numpy arrays) of jaxgpt params.

    Keys are transformers' (`transformer.h.0.attn.c_attn.weight`, ...), so
    `model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})` works (strict).
    `lm_head.weight` is always present: a copy of `wte` when the embeddings are tied, as in
    `model.state_dict()`. A model without `qkv_bias` gets zero `c_attn` biases (exact).
    """
    flat = dict(flatten(params))
    shapes = shape_table(cfg)
    table = hf_name_map(cfg)
    used = {q for paths, _ in table.values() for q in paths if q is not None}
    missing = sorted("/".join(q) for q in used - set(flat))
    if missing:
        raise ValueError(f"params are missing {len(missing)} entr(ies) {cfg} needs: {missing[:5]}")
    extra = sorted("/".join(q) for q in set(flat) - used)
    if extra:
        raise ValueError(f"params have entries {cfg} has no place for: {extra[:5]}")
    out: dict[str, np.ndarray] = {}
    for key, (paths, transpose) in table.items():
        parts = []
        for q in paths:
            if q is None:
                parts.append(np.zeros((cfg.emb_dim,), np.float32))
                continue
            array = np.array(jax.device_get(flat[q]), dtype=np.float32)  # a writable copy
            if array.shape != tuple(shapes[q].shape):
                raise ValueError(
                    f"params {'/'.join(q)} has shape {array.shape}, {cfg} needs "
                    f"{tuple(shapes[q].shape)}"
                )
            parts.append(array)
        array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        out[key] = np.ascontiguousarray(array.T if transpose else array)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out[f"{HF_PREFIX}wte.weight"].copy()
    return out


def from_hf_state_dict(state_dict: Mapping[str, Any], cfg: GPTConfig) -> dict:
    """Params for `GPTModel(cfg)` from a GPT-2 state_dict in Hugging Face's names.

    Keys may carry the `transformer.` prefix (`GPT2LMHeadModel`) or not (`GPT2Model`, OpenAI's
    original upload); values may be numpy arrays or torch tensors of any float dtype (they
    become float32). `attn.bias`/`attn.masked_bias` buffers are ignored, and so is
    `lm_head.weight` when `cfg.tie_embeddings` (transformers ties it to `wte` too). A missing or
    unexpected tensor, or one whose shape does not fit `cfg`, raises ValueError naming it.
    """
    return _from_hf(state_dict, cfg)


def _config_summary(cfg: GPTConfig) -> str:
    return (f"n_layer={cfg.n_layers}, n_embd={cfg.emb_dim}, n_head={cfg.n_heads}, "
            f"vocab_size={cfg.vocab_size}, n_positions={cfg.context_length}, "
            f"tie_word_embeddings={cfg.tie_embeddings}")


def _from_hf(
    state_dict: Mapping[str, Any],
    cfg: GPTConfig,
    files: Mapping[str, str] | None = None,
    config_name: str | None = None,
) -> dict:
    """`from_hf_state_dict`; `files` (key -> file) and `config_name` only sharpen the errors."""
    files = files or {}

    def where(key: str) -> str:
        return f"{files[key]}: " if key in files else ""

    wanted = f"{config_name or 'the config'} ({_config_summary(cfg)})"
    sd, source = _normalised_keys(state_dict, cfg, where)
    table = hf_name_map(cfg)
    _check_keys(sd, source, table, cfg, wanted, where, sorted(set(files.values())))
    shapes = shape_table(cfg)
    flat = {}
    for key, (paths, transpose) in table.items():
        array = to_numpy(sd[key])
        want = hf_shape(paths, transpose, shapes)
        if array.shape != want:
            raise ValueError(
                f"{where(source[key])}tensor {source[key]!r} has shape {array.shape}, but "
                f"{wanted} needs {want}"
            )
        if transpose:
            array = array.T
        parts = np.split(array, len(paths), axis=-1) if len(paths) > 1 else [array]
        for q, part in zip(paths, parts, strict=True):
            if q is None:
                if np.any(part != 0):
                    raise ValueError(
                        f"{where(source[key])}tensor {source[key]!r} is not zero, but the model "
                        f"has qkv_bias=False and would drop it"
                    )
                continue
            flat[q] = jax.numpy.asarray(np.ascontiguousarray(part))
    return unflatten(flat)


def _normalised_keys(state_dict: Mapping[str, Any], cfg: GPTConfig,
                     where: Callable[[str], str]) -> tuple[dict[str, Any], dict[str, str]]:
    """`(tensors by GPT2LMHeadModel key, key as given)`: buffers dropped, the `transformer.`
    prefix added where missing, a tied model's `lm_head.weight` dropped."""
    sd: dict[str, Any] = {}
    source: dict[str, str] = {}  # normalised key -> key as given
    for key, value in state_dict.items():
        if key.endswith(_HF_BUFFERS):
            continue
        name = key if key.startswith((HF_PREFIX, "lm_head.")) else HF_PREFIX + key
        if name in sd:
            raise ValueError(f"{where(key)}tensor {key!r} appears twice (as {source[name]!r} too)")
        sd[name], source[name] = value, key
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd, source


def _check_keys(sd: Mapping[str, Any], source: Mapping[str, str], table: Mapping,
                cfg: GPTConfig, wanted: str, where: Callable[[str], str],
                files: list[str]) -> None:
    """ValueError naming the first tensor `cfg` has no place for, or the first it lacks."""
    missing = [k for k in table if k not in sd]
    extra = [k for k in sd if k not in table]
    if extra:
        found = (re.match(r"transformer\.h\.(\d+)\.", k) for k in extra)
        layers = sorted({int(m.group(1)) for m in found if m})
        hint = f" (tensors of layer(s) {layers}, but n_layer={cfg.n_layers})" if layers else ""
        first = source[extra[0]]
        raise ValueError(
            f"{where(first)}tensor {first!r} has no place in a GPT-2 of {wanted}{hint}; "
            f"{len(extra)} such tensor(s): {[source[k] for k in extra[:5]]}"
        )
    if missing:
        if "lm_head.weight" in missing and not cfg.tie_embeddings:
            hint = " (tie_word_embeddings is false, so lm_head.weight must be stored)"
        else:
            hint = ""
        origin = f"{', '.join(files)}: " if files else ""
        raise ValueError(
            f"{origin}no tensor {missing[0]!r}, which {wanted} needs{hint}; "
            f"{len(missing)} missing: {missing[:5]}"
        )


def _safetensors_problem(file: Path) -> str:
    """Why a safetensors file does not open, naming the first tensor it cuts off if any."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"its header says {n} header bytes, but the file has {size} bytes in all"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"the header is not valid JSON ({e})"
    data = size - 8 - n
    for key, info in header.items():
        if key != "__metadata__" and isinstance(info, dict):
            end = (info.get("data_offsets") or [0, 0])[1]
            if end > data:
                return (f"tensor {key!r} ends at byte {end} of the data, but only {data} bytes "
                        f"are there: the file is truncated")
    return "the file is corrupt"


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="np") as f:
            names = list(f.keys())
    except Exception as e:  # SafetensorError, OSError: say which tensor is cut off
        raise ValueError(f"{file}: not a readable safetensors file: {_safetensors_problem(file)} "
                         f"({e})") from e
    out = {}
    with safe_open(file, framework="np") as f:
        for name in names:
            try:
                out[name] = f.get_tensor(name)
            except Exception as e:
                raise ValueError(f"{file}: tensor {name!r} cannot be read ({e})") from e
    return out


def _read_torch_bin(file: Path) -> dict[str, Any]:
    # weights_only=True: unpickling is restricted to tensors and plain containers, so loading
    # a file can never run code from it.
    import torch

    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: not a readable PyTorch state_dict (loaded with "
                         f"weights_only=True) ({e})") from e
    if not isinstance(sd, Mapping) or not all(hasattr(v, "detach") for v in sd.values()):
        raise ValueError(f"{file}: expected a dict of tensors, got {type(sd).__name__}")
    return dict(sd)


def _read_sharded(index: Path, read: Callable[[Path], Mapping[str, Any]]
                  ) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a valid shard index ({e!r})") from e
    tensors: dict[str, Any] = {}
    files: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        # Shards live beside the index: a name that leaves the directory is refused.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
            raise ValueError(f"{index}: shard name {shard!r} is not a file name in {index.parent}")
        file = index.parent / shard
        if not file.is_file():
            raise FileNotFoundError(f"{index} lists shard {shard!r}, but {file} does not exist")
        content = read(file)
        for key, where in weight_map.items():
            if where == shard:
                if key not in content:
                    raise ValueError(f"{file}: no tensor {key!r}, which {index.name} places there")
                tensors[key], files[key] = content[key], str(file)
    return tensors, files


def load_hf_state_dict(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """`(tensors, files)` of a Hugging Face directory: key -> array, key -> the file it came from.

    Reads the first of `HF_WEIGHT_FILES` that exists. A `.bin` is read with
    `torch.load(weights_only=True)`, so it never runs code.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no Hugging Face model directory at {path}")
    for name in HF_WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name == "model.safetensors":
            tensors = _read_safetensors(file)
        elif name == "pytorch_model.bin":
            tensors = _read_torch_bin(file)
        else:
            read = _read_safetensors if name.startswith("model.") else _read_torch_bin
            return _read_sharded(file, read)
        return tensors, {k: str(file) for k in tensors}
    raise FileNotFoundError(
        f"{path} holds no weights: expected one of {', '.join(HF_WEIGHT_FILES)}"
    )


def load_hf_config(path: str | os.PathLike) -> GPTConfig:
    """The `GPTConfig` of a Hugging Face GPT-2 directory, from its `config.json` alone."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no Hugging Face model directory at {path}")
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: a Hugging Face model directory needs one")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    return hf_config_to_gpt(config, source=str(file))


def load_pretrained(path: str | os.PathLike) -> tuple[GPTConfig, dict]:
    """`(cfg, params)` from a local Hugging Face GPT-2 directory (as `save_pretrained` writes).

    Reads `config.json` and then `model.safetensors`, sharded safetensors
    (`model.safetensors.index.json`), or `pytorch_model.bin` (also sharded), in that order of
    preference. Errors name the file and the tensor or config key at fault.
    """
    cfg = load_hf_config(path)
    tensors, files = load_hf_state_dict(path)
    return cfg, _from_hf(tensors, cfg, files, str(Path(path) / "config.json"))


def save_pretrained(
    params: Mapping[str, Any], cfg: GPTConfig, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a Hugging Face GPT-2 directory (`config.json` + `model.safetensors`, float32).

    `transformers.GPT2LMHeadModel.from_pretrained(path)` loads it and computes the same logits.
    A tied model stores no `lm_head.weight` (transformers ties it back to `wte`); an untied one
    stores it with `tie_word_embeddings: false`. The directory is written under a temporary name
    and renamed into place, so an interrupted save leaves nothing at `path`. Raises
    FileExistsError if `path` exists and `overwrite` is False.
    """
    from safetensors.numpy import save_file


    sd = to_hf_state_dict(params, cfg)  # validates before anything is written
    if cfg.tie_embeddings:
        del sd["lm_head.weight"]
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(gpt_config_to_hf(cfg), indent=2) + "\n")
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
    return Path(path).absolute()
