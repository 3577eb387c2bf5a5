"""sae-lens's SAE folder, both ways: `cfg.json` + `sae_weights.safetensors`.

sae-lens 6.54.12 writes two kinds of folder for the architectures jaxgpt knows:

- the training save (`TrainingSAE.save_model`): the training config's fields at the top of
  `cfg.json` (`architecture` standard|topk|batchtopk|jumprelu) and the weights as trained:
  `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`, JumpReLU's
  `threshold [d_sae]` (float32), BatchTopK's scalar `topk_threshold` (float64);
- the inference save (`TrainingSAE.save_inference_model`): only the fields of the inference
  config at the top, the training ones under `metadata.training_architecture_details`; topk's
  decoder norms folded in when trained with `rescale_acts_by_decoder_norm`; batchtopk saved
  as a jumprelu SAE whose threshold is the learned `topk_threshold` for every feature.

`load_sae` reads both; `save_sae` writes both, and what it writes `SAE.load_from_disk` (or
`TrainingSAE.load_from_disk` for a batchtopk training save) of sae-lens loads to the same
forward. sae-lens keeps where the SAE reads (`hook_name`), the model and the context size in
`cfg.json`'s `metadata`; `read_cfg` gives the whole file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt.io.files import atomic_directory
from jaxgpt.sae.model import ARCHITECTURES, SAE, SAEConfig, from_params, to_inference

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
# The sae-lens version whose format jaxgpt writes. sae-lens reads a cfg.json without a
# version >= 6 as a pre-6 config, so the folder must carry one.
SAELENS_FORMAT_VERSION = "6.54.12"

# The fields of sae-lens's inference configs beyond the common ones, by architecture.
_INFERENCE_FIELDS: dict[str, tuple[str, ...]] = {
    "standard": (), "topk": ("k", "rescale_acts_by_decoder_norm"), "jumprelu": ()}
# The fields of its training configs beyond the common ones, in its dataclasses' order.
_TRAINING_FIELDS: dict[str, tuple[str, ...]] = {
    "standard": ("decoder_init_norm", "l1_coefficient", "lp_norm", "l1_warm_up_steps"),
    "topk": ("decoder_init_norm", "k", "use_sparse_activations", "aux_loss_coefficient",
             "rescale_acts_by_decoder_norm"),
    "batchtopk": ("decoder_init_norm", "k", "use_sparse_activations", "aux_loss_coefficient",
                  "rescale_acts_by_decoder_norm", "topk_threshold_lr"),
    "jumprelu": ("decoder_init_norm", "jumprelu_init_threshold", "jumprelu_bandwidth",
                 "jumprelu_sparsity_loss_mode", "l0_coefficient", "l0_warm_up_steps",
                 "pre_act_loss_coefficient", "jumprelu_tanh_scale", "jumprelu_ste_to_input",
                 "target_l0"),
}
# What each saves for inference as (batchtopk: a jumprelu SAE).
_INFERENCE_ARCHITECTURE = {"standard": "standard", "topk": "topk", "batchtopk": "jumprelu",
                           "jumprelu": "jumprelu"}
_DTYPES = ("float32", "float64", "float16", "bfloat16")
# The cfg.json fields SAEConfig holds (sae-lens's others, e.g. device, change nothing computed).
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(SAEConfig)} - {"architecture", "hook_name"}


# --- reading -------------------------------------------------------------------------------

def read_cfg(path: str | os.PathLike) -> dict[str, Any]:
    """The `cfg.json` of the sae-lens SAE folder `path`, as a dict (its `metadata` holds
    `hook_name`, `model_name`, `context_size`, `prepend_bos`, ... where sae-lens knew them).

    Raises ValueError, naming the folder, if `path` is not an SAE folder or its cfg.json is
    not a JSON object.
    """
    folder = Path(path)
    _check_folder(folder)
    try:
        cfg = json.loads((folder / CFG_FILENAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{folder}: {CFG_FILENAME} is not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{folder}: {CFG_FILENAME} holds a {type(cfg).__name__}, not the "
                         f"JSON object of an SAE config")
    return cfg


def load_sae(path: str | os.PathLike) -> SAE:
    """The SAE in the sae-lens folder `path` (a training or an inference save of any of
    sae-lens's standard, topk, batchtopk and jumprelu SAEs).

    The hook it reads is taken from `metadata.hook_name` into `SAEConfig.hook_name`. Weights
    are cast to the config's dtype as sae-lens casts them (JumpReLU's threshold is then kept
    in float32, BatchTopK's `topk_threshold` in float32).

    Raises ValueError in one line naming the folder and what is wrong: not an SAE folder, a
    file missing, an architecture or option jaxgpt does not compute, weights missing,
    unexpected or not of the shapes d_in and d_sae give.
    """
    folder = Path(path)
    raw = read_cfg(folder)
    try:
        cfg = config_from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None
    tensors = _read_weights(folder)
    try:
        params, state = _params_from_tensors(tensors, cfg)
        return from_params(cfg, params, state)
    except ValueError as e:
        raise ValueError(f"{folder}/{WEIGHTS_FILENAME}: {e}") from None


def config_from_dict(raw: Mapping[str, Any]) -> SAEConfig:
    """The `SAEConfig` of a parsed sae-lens `cfg.json` (training or inference save).

    Training fields an inference save keeps in `metadata.training_architecture_details` are
    read from there when that names the same architecture. Raises ValueError (one line) for
    a config jaxgpt cannot compute the same as sae-lens.
    """
    raw = _upgrade_pre_6(dict(raw))
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"cfg.json's metadata is a {type(metadata).__name__}, not an object")
    architecture = raw.get("architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not one jaxgpt reads "
                         f"({', '.join(ARCHITECTURES)})")
    for name in ("d_in", "d_sae"):
        if name not in raw:
            raise ValueError(f"cfg.json has no {name}")
    reshape = raw.get("reshape_activations", "none")
    if reshape not in ("none", "hook_z"):
        raise ValueError(f"reshape_activations={reshape!r} is not one jaxgpt reads ('none', "
                         f"'hook_z')")
    fields: dict[str, Any] = {}
    details = metadata.get("training_architecture_details")
    if metadata.get("training_architecture") == architecture and isinstance(details, dict):
        fields.update(details)
    fields.update(raw)
    known = {k: v for k, v in fields.items() if k in _CONFIG_FIELDS}
    if "dtype" in known:
        known["dtype"] = _dtype_name(known["dtype"])
    hook_name = metadata.get("hook_name") or raw.get("hook_name")
    try:
        return SAEConfig(architecture=architecture, hook_name=hook_name, **known)
    except TypeError as e:
        raise ValueError(f"cfg.json does not describe an SAE jaxgpt reads ({e})") from None


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a directory"
        raise ValueError(f"{folder} {what}: an sae-lens SAE is a folder holding {CFG_FILENAME} "
                         f"and {WEIGHTS_FILENAME}")
    have = [name for name in (CFG_FILENAME, WEIGHTS_FILENAME) if (folder / name).is_file()]
    if len(have) == 2:
        return
    if not have:
        hint = " (it holds a config.json: a model directory?)" if (
            folder / "config.json").is_file() else ""
        raise ValueError(f"{folder} is not an sae-lens SAE folder: it has neither "
                         f"{CFG_FILENAME} nor {WEIGHTS_FILENAME}{hint}")
    missing = WEIGHTS_FILENAME if have == [CFG_FILENAME] else CFG_FILENAME
    raise ValueError(f"{folder}: {missing} is missing (an sae-lens SAE folder holds "
                     f"{CFG_FILENAME} and {WEIGHTS_FILENAME})")


def _upgrade_pre_6(raw: dict[str, Any]) -> dict[str, Any]:
    """A cfg.json from sae-lens before 6.0 in 6's terms, as sae-lens itself reads it."""
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    if version and str(version).split(".")[0].isdigit() and int(str(version).split(".")[0]) >= 6:
        return raw
    out = {{"hook_point": "hook_name"}.get(k, k): v for k, v in raw.items()}
    out.setdefault("architecture", "standard")
    kwargs = out.get("activation_fn_kwargs") or {}
    if out.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        out["architecture"], out["k"] = "topk", kwargs["k"]
    if isinstance(out.get("normalize_activations"), bool) or out.get(
            "normalize_activations") is None:
        out["normalize_activations"] = ("expected_average_only_in"
                                        if out.get("normalize_activations") else "none")
    out.setdefault("apply_b_dec_to_input", True)
    return out


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one jaxgpt reads ({', '.join(_DTYPES)})")
    return name


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    file = folder / WEIGHTS_FILENAME
    try:
        with safe_open(file, framework="np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def _params_from_tensors(tensors: dict[str, np.ndarray], cfg: SAEConfig
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`(params, state)` of the tensors of a folder, cast as sae-lens casts them on load (every
    tensor to the config's dtype)."""
    tensors = dict(tensors)
    if "log_threshold" in tensors and cfg.architecture == "jumprelu":  # before sae-lens 6
        tensors["threshold"] = np.exp(tensors.pop("log_threshold"))
    if "scaling_factor" in tensors:  # some pre-6 folders: all ones means none
        if not np.allclose(tensors["scaling_factor"], 1.0):
            raise ValueError("it holds a scaling_factor other than 1 (a fine-tuning scaling "
                             "factor), which jaxgpt does not apply")
        del tensors["scaling_factor"]
    state_names = ("topk_threshold",) if cfg.architecture == "batchtopk" else ()
    want = {"W_enc", "b_enc", "W_dec", "b_dec"} | (
        {"threshold"} if cfg.architecture == "jumprelu" else set()) | set(state_names)
    missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or extra:
        parts = ([f"{', '.join(missing)} missing"] if missing else []) + (
            [f"{', '.join(extra)} unexpected"] if extra else [])
        raise ValueError(f"a {cfg.architecture} SAE's weights: {'; '.join(parts)}")
    dtype = np.dtype(_numpy_dtype(cfg.dtype))
    # sae-lens casts every tensor to the config's dtype on load; jaxgpt then keeps the
    # thresholds in float32, as sae-lens's training SAEs keep JumpReLU's.
    cast = {k: np.asarray(v).astype(dtype) for k, v in tensors.items()}
    state = {k: cast.pop(k).astype(np.float32) for k in state_names}
    if "threshold" in cast:
        cast["threshold"] = cast["threshold"].astype(np.float32)
    return cast, state


def _numpy_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return name


# --- writing -------------------------------------------------------------------------------

def save_sae(sae: SAE, path: str | os.PathLike, *, inference: bool = True,
             metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write `sae` as an sae-lens folder at `path`; the folder's absolute path.

    Args:
      inference: True: what sae-lens's `save_inference_model` writes (`model.to_inference`:
        topk's decoder norms folded in when `rescale_acts_by_decoder_norm`, batchtopk as a
        jumprelu SAE); False: the training save (`save_model`), batchtopk keeping its
        `topk_threshold`.
      metadata: what cfg.json's `metadata` holds beyond the format's version and the
        training architecture (sae-lens's `model_name`, `context_size`, `prepend_bos`, ...);
        `hook_name` defaults to the config's.
      overwrite: replace an SAE folder already at `path`.

    The folder is written under a temporary name and renamed when complete. Raises
    FileExistsError if `path` exists (and `overwrite` is False, or it is not an SAE folder
    jaxgpt could have written), ValueError if `metadata` names another hook than the config.
    """
    from safetensors.numpy import save_file

    cfg_dict = sae_cfg_dict(sae.cfg, inference=inference, metadata=metadata)
    out = to_inference(sae) if inference else sae
    tensors = {k: _to_numpy(v) for k, v in out.params.items()}
    if not inference and sae.cfg.architecture == "batchtopk":
        # sae-lens keeps this buffer in double precision.
        tensors["topk_threshold"] = np.asarray(out.state["topk_threshold"], np.float64)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CFG_FILENAME).write_text(json.dumps(cfg_dict, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILENAME))
    return Path(path).absolute()


def sae_cfg_dict(cfg: SAEConfig, *, inference: bool = True,
                 metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The cfg.json sae-lens writes for an SAE of `cfg`: its inference save's (`inference`) or
    its training save's, with `metadata` (see `save_sae`)."""
    meta = dict(metadata or {})
    if cfg.hook_name is not None and meta.get("hook_name", cfg.hook_name) != cfg.hook_name:
        raise ValueError(f"metadata hook_name {meta['hook_name']!r} is not the SAE's "
                         f"hook_name {cfg.hook_name!r}")
    arch = cfg.architecture
    values = _field_values(cfg)
    training = _TRAINING_FIELDS[arch]
    inference_arch = _INFERENCE_ARCHITECTURE[arch]
    inference_fields = _INFERENCE_FIELDS[inference_arch]
    out_meta: dict[str, Any] = {"sae_lens_version": SAELENS_FORMAT_VERSION,
                                "sae_lens_training_version": SAELENS_FORMAT_VERSION}
    if cfg.hook_name is not None:
        out_meta["hook_name"] = cfg.hook_name
    out_meta.update(meta)
    if "training_architecture" not in meta:
        out_meta["training_architecture"] = arch
        out_meta["training_architecture_details"] = {
            name: values[name] for name in training if name not in inference_fields}
    common = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
              "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
              "normalize_activations": cfg.normalize_activations,
              "reshape_activations": cfg.reshape_activations, "metadata": out_meta}
    if inference:
        return {**common, **{name: values[name] for name in inference_fields},
                "architecture": inference_arch}
    return {**common, **{name: values[name] for name in training}, "architecture": arch}


def _field_values(cfg: SAEConfig) -> dict[str, Any]:
    """`cfg`'s fields as sae-lens's configs type them (topk's k an int, batchtopk's a float)."""
    values: dict[str, Any] = {name: getattr(cfg, name) for name in _CONFIG_FIELDS}
    values["k"] = int(cfg.k) if cfg.architecture == "topk" else float(cfg.k)
    values["use_sparse_activations"] = False
    return values


def _to_numpy(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x))
