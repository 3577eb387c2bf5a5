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

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import jax

from jaxgpt.config import GPTConfig

FORMAT = "jaxgpt-orbax"
VERSION = 1


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `path`; on success rename it to `path`.

    If the body raises, nothing appears at `path`, an existing directory there is left as it
    was, and the temporary directory is removed; a killed process leaves at most a hidden
    `.NAME.tmp-*` sibling, never a partial `path`. Raises FileExistsError before anything is
    written if `path` exists and `overwrite` is False.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        yield tmp
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

    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        with ocp.StandardCheckpointer() as ckptr:  # closed (threads joined) on error too
            ckptr.save(tmp / "params", jax.device_get(params))
            if extra is not None:
                ckptr.save(tmp / "extra", jax.device_get(extra))
            ckptr.wait_until_finished()
        # The marker is written last: a directory without it is never taken for a checkpoint.
        marker = {"format": FORMAT, "version": VERSION, **(metadata or {})}
        (tmp / "jaxgpt.json").write_text(json.dumps(marker, indent=2) + "\n")
    return Path(path).absolute()


def _check(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if not is_checkpoint(path):
        raise ValueError(f"{path} is not a jaxgpt checkpoint (no valid jaxgpt.json)")


def load_config(path: str | os.PathLike) -> GPTConfig:
    """The `GPTConfig` saved in a checkpoint (nothing else is read)."""
    path = Path(path)
    _check(path)
    file = path / "config.json"
    try:
        return GPTConfig.from_dict(json.loads(file.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} is missing: the checkpoint is incomplete") from None
    except (ValueError, TypeError) as e:  # bad JSON, unknown or invalid fields
        raise ValueError(f"{file}: not a valid jaxgpt config ({e})") from e


def load_metadata(path: str | os.PathLike) -> dict:
    path = Path(path)
    _check(path)
    return json.loads((path / "jaxgpt.json").read_text())


def restore(path: str | os.PathLike) -> tuple[GPTConfig, Any]:
    """`(cfg, params)` from a checkpoint written by `save`, bit for bit.

    The params are jax arrays on the default device, in the structure `param_shapes(cfg)`
    gives; a checkpoint whose arrays do not fit its config.json raises ValueError.
    """
    import orbax.checkpoint as ocp

    from jaxgpt.model import param_shapes

    path = Path(path).absolute()
    cfg = load_config(path)
    if not (path / "params").is_dir():
        raise FileNotFoundError(f"{path / 'params'} is missing: the checkpoint is incomplete")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), param_shapes(cfg)
    )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path / "params", target)
    except (ValueError, KeyError, TypeError) as e:  # orbax: tree or shape mismatch
        raise ValueError(
            f"{path / 'params'}: the saved arrays do not fit {path / 'config.json'} ({cfg}): {e}"
        ) from e
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
