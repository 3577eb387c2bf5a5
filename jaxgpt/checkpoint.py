"""Orbax checkpoints of jaxgpt models: parameters with their config beside them.

A checkpoint is a directory:

    config.json   GPTConfig fields
    jaxgpt.json   {"format": "jaxgpt-orbax", "version": 1, ...user metadata}
    params/       the params pytree (orbax StandardCheckpointer)
    extra/        optional: any other pytree saved with it (optimizer state, rng, data position)

Saving writes into a temporary sibling directory and renames it into place, so an
interrupted save never leaves a half-written checkpoint under the final name.

With several processes (`jax.distributed.initialize`), `save` and the restores are collective:
every process calls them with the same path on a shared filesystem. The arrays are handed to
orbax as the global `jax.Array`s they are (each process writes the shards it holds; nothing is
gathered to one host), all processes write into one temporary directory named by process 0,
and process 0 writes the marker and renames the directory only after a barrier that every
process reaches once its shards are on disk. Restores place every array straight into the
shardings asked for, so a checkpoint written by N processes or devices loads on M.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from jaxgpt.config import GPTConfig

FORMAT = "jaxgpt-orbax"
VERSION = 1


# What `save` writes at the top of a checkpoint, and what a Hugging Face GPT-2 directory holds
# (as `weights.save_pretrained` or transformers' `save_pretrained` write it). A directory holding
# anything else is never replaced or deleted.
ORBAX_ENTRIES = ("config.json", "jaxgpt.json", "params", "extra")
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
# Temporary siblings: `.NAME.tmp-PID-HEX` while writing, `.NAME.old-PID-HEX` while replacing
# (`.NAME.tmp-HEX` from versions before the PID was part of the name).
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")
# What orbax leaves inside a temporary when killed while writing `params` or `extra`.
_ORBAX_TEMP_RE = re.compile(r"^(?:params|extra)\.orbax-checkpoint-tmp(?:-\d+)?$")


def _multi_process() -> bool:
    return jax.process_count() > 1


def _barrier(name: str) -> None:
    """Wait until every process reaches `name` (nothing with one process)."""
    if _multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _shared_tag() -> str:
    """`PID-HEX` for a temporary name: process 0's pid and random bits, the same in every
    process (so all processes write into one directory, which only process 0 may clean up)."""
    pid, rnd = os.getpid(), uuid.uuid4().int & 0x7FFFFFFF
    if _multi_process():
        from jax.experimental import multihost_utils

        pid, rnd = (int(v) for v in multihost_utils.broadcast_one_to_all(
            np.array([pid, rnd], np.int32)))
    return f"{pid}-{rnd:08x}"


def _is_hf_entry(entry: Path) -> bool:
    return entry.is_file() and any(fnmatch.fnmatchcase(entry.name, p) for p in HF_ENTRY_PATTERNS)


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """Names in the directory `path` that neither `save` nor a GPT-2 `save_pretrained` writes.

    Empty for an empty directory, a jaxgpt orbax checkpoint, or a Hugging Face GPT-2 directory
    holding only model files; ["<no checkpoint marker>"] for a directory of known names that is
    neither (e.g. a lone config.json).
    """
    path = Path(path)
    entries = sorted(path.iterdir())
    if not entries:
        return []
    if is_checkpoint(path):
        return [e.name for e in entries if e.name not in ORBAX_ENTRIES]
    foreign = [e.name + ("/" if e.is_dir() else "") for e in entries if not _is_hf_entry(e)]
    has_weights = any(e.name != "config.json" and _is_hf_entry(e) for e in entries)
    if not foreign and not ((path / "config.json").is_file() and has_weights):
        return ["<no checkpoint marker>"]
    return foreign


def describe_names(names: list[str], shown: int = 5) -> str:
    """`a, b, c and 4 more`: the first `shown` of `names` for a message."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise FileExistsError unless the existing `path` may be replaced by a new checkpoint.

    Only an empty directory, a jaxgpt orbax checkpoint or a Hugging Face GPT-2 directory
    holding nothing but model files may be: nothing is deleted that jaxgpt could not have
    written. Symbolic links and files are refused too.
    """
    path = Path(path)
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link; jaxgpt does not replace links")
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; jaxgpt does not replace it")
    foreign = foreign_entries(path)
    if foreign:
        raise FileExistsError(
            f"{path} is not a jaxgpt or Hugging Face checkpoint directory (it holds "
            f"{describe_names(foreign)}); "
            f"jaxgpt replaces only checkpoint directories: remove it yourself or choose another "
            f"destination"
        )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists under another user
        return True
    return True


def remove_stale_temporaries(parent: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary directories a killed save left in `parent`; return them.

    Only hidden `.NAME.tmp-*` / `.NAME.old-*` directories (of `name` only, if given) whose
    writing process is gone and which hold nothing but checkpoint files are removed.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for entry in parent.iterdir():
        m = _TEMP_RE.match(entry.name)
        if not m or (name is not None and m["name"] != name):
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        if m["pid"] is not None and _pid_alive(int(m["pid"])):
            continue  # another save may be writing it right now
        if not all(
            e.name in ORBAX_ENTRIES or _is_hf_entry(e) or _ORBAX_TEMP_RE.match(e.name)
            for e in entry.iterdir()
        ):
            continue  # not (only) what a save writes: not ours to delete
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return mask


def _set_default_modes(root: Path) -> None:
    """Give everything under `root` the modes a plain `open`/`mkdir` would (umask applied).

    Some writers (safetensors) create their files 0600; a checkpoint should be as readable as
    the config.json beside it.
    """
    mask = _umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def _check_destination(path: Path, overwrite: bool) -> None:
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        check_replaceable(path)


def _commit(tmp: Path, path: Path, tag: str) -> None:
    """Rename the finished temporary `tmp` to `path` (replacing a checkpoint there)."""
    _set_default_modes(tmp)
    if path.exists():
        old = path.parent / f".{path.name}.old-{tag}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `path`; on success rename it to `path`.

    If the body raises, nothing appears at `path`, an existing directory there is left as it
    was, and the temporary directory is removed; a killed process leaves at most a hidden
    `.NAME.tmp-PID-*` sibling, never a partial `path`, and the next save of `path` removes it.
    Raises FileExistsError before anything is written if `path` exists and `overwrite` is
    False, or if it is not a directory `check_replaceable` allows replacing.

    One process only: `save` coordinates several.
    """
    path = Path(path).absolute()
    _check_destination(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    try:
        tmp.mkdir()
        yield tmp
        _commit(tmp, path, tag)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` is a complete directory written by `save`.

    Complete: the marker `jaxgpt.json` (written only after every process's arrays are on disk)
    names the format, and `params/` is there.
    """
    marker = Path(path) / "jaxgpt.json"
    if not marker.is_file() or not (Path(path) / "params").is_dir():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _write_arrays(tmp: Path, params: Any, extra: Any) -> None:
    """Every process writes its shards of `params` (and `extra`) under `tmp`."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:  # closed (threads joined) on error too
        ckptr.save(tmp / "params", params)
        if extra is not None:
            ckptr.save(tmp / "extra", extra)
        ckptr.wait_until_finished()


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

    The arrays may be sharded over any devices, of this process or of all processes: each
    process writes the shards it holds. With several processes every one must call `save`
    with the same arguments (`path` on a filesystem they share); it returns once the
    checkpoint is complete and in place.

    Raises FileExistsError if `path` exists and `overwrite` is False.
    """
    path = Path(path).absolute()
    main = jax.process_index() == 0
    _check_destination(path, overwrite)  # every process, before anything is written
    tag = _shared_tag()
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    committed = False
    try:
        if main:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent, path.name)
            tmp.mkdir()
            (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        _barrier(f"jaxgpt-save-start-{tag}")
        _write_arrays(tmp, params, extra)
        # Every process's shards are on disk past this point.
        _barrier(f"jaxgpt-save-written-{tag}")
        if main:
            # The marker is written last: a directory without it is never taken for a
            # checkpoint.
            marker = {
                "format": FORMAT,
                "version": VERSION,
                "processes": jax.process_count(),
                **(metadata or {}),
            }
            (tmp / "jaxgpt.json").write_text(json.dumps(marker, indent=2) + "\n")
            _commit(tmp, path, tag)
        committed = True
        _barrier(f"jaxgpt-save-done-{tag}")
    finally:
        if main and not committed and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


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


def _abstract(tree: Any, shardings: Any = None) -> Any:
    """`ShapeDtypeStruct`s of `tree`'s arrays, with `shardings` (a matching tree) if given,
    else with the leaves' own shardings where they have one."""

    def one(x, sh=None):
        if not hasattr(x, "shape"):
            return x
        sh = sh if sh is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    if shardings is None:
        return jax.tree_util.tree_map(one, tree)
    return jax.tree_util.tree_map(one, tree, shardings)


def restore(path: str | os.PathLike, shardings: Any = None) -> tuple[GPTConfig, Any]:
    """`(cfg, params)` from a checkpoint written by `save`, bit for bit.

    The params have the structure `param_shapes(cfg)` gives; each array is placed with the
    matching sharding of `shardings` (a tree of `jax.sharding.Sharding`s, e.g. over the current
    mesh; every process then reads only its own shards), by default on this process's first
    device. A checkpoint whose arrays do not fit its config.json raises ValueError.
    """
    import orbax.checkpoint as ocp

    from jaxgpt.model import param_shapes

    path = Path(path).absolute()
    cfg = load_config(path)
    if not (path / "params").is_dir():
        raise FileNotFoundError(f"{path / 'params'} is missing: the checkpoint is incomplete")
    shapes = param_shapes(cfg)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, shapes)
    try:
        target = _abstract(shapes, shardings)
    except ValueError as e:  # tree_map: structures differ
        raise ValueError(f"the shardings do not match the params of {cfg}: {e}") from e
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

    `target` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`); leaves
    with a sharding are restored into it, NumPy leaves as NumPy arrays.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    _check(path)
    if not (path / "extra").exists():
        raise ValueError(f"{path} was saved without extra state")

    def one(x):
        if isinstance(x, (np.ndarray, np.generic)):
            return np.zeros(x.shape, x.dtype)  # restored as NumPy, identical on every process
        if not hasattr(x, "shape"):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path / "extra", jax.tree_util.tree_map(one, target))
