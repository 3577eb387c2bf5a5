"""Orbax checkpoints of jaxgpt models: parameters with their config beside them.

A checkpoint is a directory:

    config.json   GPTConfig fields
    jaxgpt.json   {"format": "jaxgpt-orbax", "version": 1, ...user metadata}
    params/       the params pytree (orbax StandardCheckpointer)
    extra/        optional: any other pytree saved with it (optimizer state, rng, data position)

Saving writes into a temporary sibling directory and renames it into place, so an
interrupted save never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax

from jaxgpt.config import GPTConfig

FORMAT = "jaxgpt-orbax"
VERSION = 1


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` is a directory written by `save`."""
    marker = Path(path) / "jaxgpt.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def save(
    path: str | os.PathLike,
    params: Any,
    cfg: GPTConfig,
    *,
    extra: Any = None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Save `params` (and optionally the pytree `extra`) with `cfg` to the directory `path`.

    Raises FileExistsError if `path` exists and `overwrite` is False.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", jax.device_get(params))
        if extra is not None:
            ckptr.save(tmp / "extra", jax.device_get(extra))
        ckptr.wait_until_finished()
        ckptr.close()
        # The marker is written last: a directory without it is never taken for a checkpoint.
        marker = {"format": FORMAT, "version": VERSION, **(metadata or {})}
        (tmp / "jaxgpt.json").write_text(json.dumps(marker, indent=2) + "\n")
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if not is_checkpoint(path):
        raise ValueError(f"{path} is not a jaxgpt checkpoint (no valid jaxgpt.json)")


def load_config(path: str | os.PathLike) -> GPTConfig:
    path = Path(path)
    _check(path)
    return GPTConfig.from_dict(json.loads((path / "config.json").read_text()))


def load_metadata(path: str | os.PathLike) -> dict:
    path = Path(path)
    _check(path)
    return json.loads((path / "jaxgpt.json").read_text())


def restore(path: str | os.PathLike) -> tuple[GPTConfig, Any]:
    """`(cfg, params)` from a checkpoint written by `save`, bit for bit."""
    import orbax.checkpoint as ocp

    from jaxgpt.model import param_shapes

    path = Path(path).absolute()
    cfg = load_config(path)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params", param_shapes(cfg))
    return cfg, params


def restore_extra(path: str | os.PathLike, target: Any) -> Any:
    """The `extra` pytree of a checkpoint, restored into the structure of `target`.

    `target` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    _check(path)
    if not (path / "extra").exists():
        raise ValueError(f"{path} was saved without extra state")
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, target
    )
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path / "extra", abstract)
