"""What each checkpoint format's directory holds, and telling the formats apart.

A jaxgpt orbax checkpoint (`jaxgpt.io.checkpoint`) holds `ORBAX_ENTRIES`; a Hugging Face
GPT-2 directory (as `jaxgpt.io.hf.save_pretrained` or transformers' `save_pretrained` write
it) holds files matching `HF_ENTRY_PATTERNS`; an sae-lens SAE folder (`jaxgpt.sae.formats`)
holds `SAE_ENTRIES`. A directory holding anything else is never replaced or deleted.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

FORMAT = "jaxgpt-orbax"
VERSION = 1
# What `checkpoint.save` writes at the top of a checkpoint; `jaxgpt.json` is the marker,
# written last.
ORBAX_ENTRIES = ("config.json", "jaxgpt.json", "params", "extra")
MARKER = "jaxgpt.json"
# Weight files of a Hugging Face directory, in the order transformers prefers them.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HF_ENTRY_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "pytorch_model-*-of-*.bin",
)
# An sae-lens SAE folder: its config, its weights, and the feature densities sae-lens's
# training checkpoints add.
SAE_ENTRIES = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")
# What the command line calls each format.
FORMAT_NAMES = {"hf": "Hugging Face GPT-2 directory", "orbax": "jaxgpt orbax checkpoint"}


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` is a complete directory written by `checkpoint.save`.

    Complete: the marker `jaxgpt.json` (written only after every process's arrays are on disk)
    names the format, and `params/` is there.
    """
    marker = Path(path) / MARKER
    if not marker.is_file() or not (Path(path) / "params").is_dir():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def is_hf_directory(path: str | os.PathLike) -> bool:
    """True if `path` is a directory with a `config.json` and one of `HF_WEIGHT_FILES`."""
    path = Path(path)
    return (path / "config.json").is_file() and any((path / f).is_file() for f in HF_WEIGHT_FILES)


def is_hf_entry(entry: Path) -> bool:
    """Whether `entry` is a file a Hugging Face GPT-2 directory holds (`HF_ENTRY_PATTERNS`)."""
    return entry.is_file() and any(fnmatch.fnmatchcase(entry.name, p) for p in HF_ENTRY_PATTERNS)


def is_sae_folder(path: str | os.PathLike) -> bool:
    """True if `path` is a directory with an SAE's `cfg.json` and `sae_weights.safetensors`."""
    path = Path(path)
    return all((path / name).is_file() for name in SAE_ENTRIES[:2])


def detect(path: str | os.PathLike) -> str | None:
    """"orbax" or "hf" for a checkpoint directory of either format, else None."""
    if is_checkpoint(path):
        return "orbax"
    if is_hf_directory(path):
        return "hf"
    return None
