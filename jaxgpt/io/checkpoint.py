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

Whatever fails inside orbax (a damaged or missing file, a full disk, a permission) is raised as
one `CheckpointError` naming the checkpoint and the cause; the tracebacks orbax's threads and
asyncio would print about the same failure are kept off stderr.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.io.files import check_destination, commit, remove_stale_temporaries
from jaxgpt.io.formats import FORMAT, MARKER, VERSION, is_checkpoint
from jaxgpt.io.params import flatten
from jaxgpt.nn.model import param_shapes

_T = TypeVar("_T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (damaged, incomplete, arrays that do not fit its config)
    or written (disk full, no permission): the message names it and the cause in one line."""


# tensorstore's messages name the array or the file and, for the OS's errors, the errno.
_TS_ARRAY = re.compile(r'Error (reading|writing) "([^"/]+)[^"]*" in \w+ database at [^:]*: (.*)')
_TS_FILE = re.compile(r'Error (reading|writing) local file "(?:[^"]*/)?([^"/]+)"')
_TS_ERRNO = re.compile(r"\[os_error_code='?(\d+)'?\]")


def failure_cause(e: BaseException) -> str:
    """The innermost cause of `e`, in one line (tensorstore's long messages shortened)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} (errno {e.errno})" + (f": {e.filename}" if e.filename else "")
    code = _TS_ERRNO.search(text)
    errno = f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})" if code else None
    m = _TS_ARRAY.search(text)
    if m is not None:
        verb, array, rest = m.groups()
        return f"{verb} array {array}: {errno or rest}"
    f = _TS_FILE.search(text)
    if errno is None:
        return text
    return f"{f.group(1)} file {f.group(2)}: {errno}" if f else errno


def _is_orbax_leftover(unraisable: Any) -> bool:
    """Whether an unraisable exception is one a failed orbax call leaves behind: its coroutines
    finalized after their event loop closed."""
    code = getattr(unraisable.object, "cr_code", None)
    where = code.co_filename if code is not None else ""
    closed = (isinstance(unraisable.exc_value, RuntimeError)
              and str(unraisable.exc_value) == "Event loop is closed")
    return f"{os.sep}orbax{os.sep}" in where or closed


def _quiet_unraisable(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        if not _is_orbax_leftover(unraisable):
            previous(unraisable)

    hook.jaxgpt_quiet = True  # type: ignore[attr-defined]
    return hook


def _is_loop_closed(exc_type: type, exc: BaseException, tb: Any) -> bool:
    """A callback from a foreign thread (tensorstore's) into an event loop orbax has closed:
    `call_soon_threadsafe` is the outermost frame (a program's own errors start elsewhere)."""
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
            and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


def _quiet_excepthook(previous: Any) -> Any:
    def hook(exc_type: type, exc: BaseException, tb: Any) -> None:
        if not _is_loop_closed(exc_type, exc, tb):
            previous(exc_type, exc, tb)

    hook.jaxgpt_quiet = True  # type: ignore[attr-defined]
    return hook


# What asyncio logs when a task or future of a closed event loop is finalized unfinished or
# with its exception unread.
_ASYNCIO_LEFTOVERS = ("Task was destroyed but it is pending!", "exception was never retrieved")


# How many orbax calls `_reported` is running (in any thread).
_in_orbax = 0


class _QuietOrbaxLeftovers(logging.Filter):
    """Drops asyncio's records about leftovers while orbax runs, and about orbax's tasks (their
    coroutine's file is in orbax) whenever they are finalized."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (any(s in text for s in _ASYNCIO_LEFTOVERS)
                    and (_in_orbax > 0 or f"{os.sep}orbax{os.sep}" in text))


@contextlib.contextmanager
def _leftovers_quiet() -> Iterator[None]:
    """While orbax runs, a coroutine dropped unstarted is one of its writes left by a failure
    (its event loop closed with them pending): no "was never awaited" warning for it."""
    global _in_orbax
    _in_orbax += 1
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                                    category=RuntimeWarning)
            yield
    finally:
        _in_orbax -= 1


def _quiet_hooks() -> None:
    """Keep off stderr what a failed orbax call leaves behind: its pending coroutines and
    tensorstore's callbacks fail later (at garbage collection, in tensorstore's threads, at
    exit) with asyncio errors about the failure already reported; nothing else is filtered."""
    if not getattr(sys.unraisablehook, "jaxgpt_quiet", False):
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    if not getattr(sys.excepthook, "jaxgpt_quiet", False):
        sys.excepthook = _quiet_excepthook(sys.excepthook)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _QuietOrbaxLeftovers) for f in asyncio_log.filters):
        asyncio_log.addFilter(_QuietOrbaxLeftovers())


def _settle_leftovers() -> None:
    """Settle the futures of the event loops a failed orbax call closed: they can never run.

    Orbax runs its writes in an event loop it closes when one fails, with other writes'
    tasks still pending, some never started. Left alone, each is finalized whenever the
    garbage collector reaches it (often much later: the exception being handled refers to
    them) and says so: "coroutine ... was never awaited" (a RuntimeWarning), "Future exception
    was never retrieved" (asyncio's log). Here the unstarted coroutines are closed and the
    exceptions read; nothing of a loop still open is touched.
    """
    import asyncio
    import inspect

    for obj in gc.get_objects():
        # type(), not isinstance: some objects warn when their __class__ is read
        if not issubclass(type(obj), asyncio.Future) or not obj.get_loop().is_closed():
            continue
        if obj.done():
            if not obj.cancelled():
                obj.exception()  # read: asyncio logs no "exception was never retrieved"
        elif isinstance(obj, asyncio.Task):
            coro = obj.get_coro()
            if inspect.iscoroutine(coro) and (inspect.getcoroutinestate(coro)
                                              == inspect.CORO_CREATED):
                coro.close()  # closed, not "never awaited"


@contextlib.contextmanager
def _reported(action: str, path: Path) -> Iterator[None]:
    """Run orbax: a failure becomes one CheckpointError `cannot {action} {path}: {cause}`; orbax's
    own log records of it (tracebacks from its threads) are not printed."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    _quiet_hooks()
    try:
        with _leftovers_quiet():
            try:
                yield
            except CheckpointError:
                raise
            except Exception as e:
                _settle_leftovers()
                gc.collect()  # what the failure left pending fails now, quietly, not at exit
                raise CheckpointError(f"cannot {action} {path}: {failure_cause(e)}") from e
    finally:
        absl.setLevel(level)


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

    Raises FileExistsError if `path` exists and `overwrite` is False, CheckpointError if
    something cannot be written (nothing is left under `path` then, a checkpoint there before
    is kept).
    """
    path = Path(path).absolute()
    main = jax.process_index() == 0
    check_destination(path, overwrite)  # every process, before anything is written
    tag = _shared_tag()
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    committed = False
    try:
        if main:
            with _reported("write the checkpoint", path):
                path.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temporaries(path.parent, path.name)
                tmp.mkdir()
                (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        _barrier(f"jaxgpt-save-start-{tag}")
        with _reported("write the checkpoint", path):
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
            with _reported("write the checkpoint", path):
                (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
                commit(tmp, path, tag)
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
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete") from None
    except (ValueError, TypeError) as e:  # bad JSON, unknown or invalid fields
        raise CheckpointError(f"{file}: not a valid jaxgpt config ({e})") from e


def load_metadata(path: str | os.PathLike) -> dict:
    path = Path(path)
    _check(path)
    return json.loads((path / MARKER).read_text())


def _abstract(tree: Any, shardings: Any = None) -> Any:
    """`ShapeDtypeStruct`s of `tree`'s arrays, with `shardings` (a matching tree) if given,
    else with the leaves' own shardings where they have one."""

    def one(x: Any, sh: Any = None) -> Any:
        if not hasattr(x, "shape"):
            return x
        sh = sh if sh is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    if shardings is None:
        return jax.tree_util.tree_map(one, tree)
    return jax.tree_util.tree_map(one, tree, shardings)


def _check_fits(saved: Any, shapes: Any, path: Path, cfg: GPTConfig) -> None:
    """CheckpointError naming the first array whose saved shape is not what `cfg` needs."""
    have = {leaf.name: tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(saved)
            if hasattr(leaf, "shape")}
    if not have:  # orbax reads a damaged index as an empty tree
        raise CheckpointError(f"cannot read the checkpoint {path}: {path / 'params'} lists no "
                              f"arrays (its _METADATA or manifest.ocdbt is damaged or missing)")
    need = {".".join(p): tuple(leaf.shape) for p, leaf in flatten(shapes)}
    wrong = [f"{k} is {have[k] if k in have else 'missing'}, config.json needs {need[k]}"
             for k in need if have.get(k) != need[k]]
    wrong += [f"{k} {have[k]} has no place in it" for k in have if k not in need]
    if wrong:
        raise CheckpointError(f"{path / 'params'}: the saved arrays do not fit "
                              f"{path / 'config.json'} ({cfg}): {wrong[0]} ({len(wrong)} "
                              f"such)")


def restore(path: str | os.PathLike, shardings: Any = None) -> tuple[GPTConfig, Any]:
    """`(cfg, params)` from a checkpoint written by `save`, bit for bit.

    The params have the structure `param_shapes(cfg)` gives; each array is placed with the
    matching sharding of `shardings` (a tree of `jax.sharding.Sharding`s, e.g. over the current
    mesh; every process then reads only its own shards), by default on this process's first
    device. A checkpoint whose files are damaged or missing, or whose arrays do not fit its
    config.json, raises CheckpointError (a ValueError) naming it and the cause.
    """
    import orbax.checkpoint as ocp

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
    with _reported("read the checkpoint", path), ocp.StandardCheckpointer() as ckptr:
        _check_fits(ckptr.metadata(path / "params").item_metadata, shapes, path, cfg)
        params = ckptr.restore(path / "params", target)
    return cfg, params


def restore_extra(path: str | os.PathLike, target: Any, part: str = "extra") -> Any:
    """The `extra` pytree of a checkpoint (or, with `part="params"`, its params as any pytree
    rather than a model's), restored into the structure of `target`.

    `target` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`); leaves
    with a sharding are restored into it, NumPy leaves as NumPy arrays.
    """
    import orbax.checkpoint as ocp

    if part not in ("extra", "params"):
        raise ValueError(f"part must be 'extra' or 'params', got {part!r}")
    path = Path(path).absolute()
    _check(path)
    if not (path / part).exists():
        raise ValueError(f"{path} was saved without {part} state")

    def one(x: Any) -> Any:
        if isinstance(x, (np.ndarray, np.generic)):
            return np.zeros(x.shape, x.dtype)  # restored as NumPy, identical on every process
        if not hasattr(x, "shape"):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    with _reported("read the checkpoint", path), ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path / part, jax.tree_util.tree_map(one, target))


def _agreed(ok: bool) -> bool:
    """True when every process says `ok` (a collective with several processes)."""
    if not _multi_process():
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.array(ok, np.int32))))


def restore_newest(candidates: Sequence[Path], restore_one: Callable[[Path], _T]
                   ) -> tuple[Path, _T, list[tuple[Path, str]]]:
    """`(path, restore_one(path), skipped)` for the first of `candidates` (newest first: a
    training run's checkpoints) that restores; `skipped` holds each newer one passed over, with
    the CheckpointError that `restore_one` raised for it (a damaged or missing file).

    CheckpointError if none restores; any other error of `restore_one` is raised as it is.
    With several processes it is collective: a checkpoint is used only if every process
    restored it.
    """
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            value, error = restore_one(path), None
        except CheckpointError as e:
            error = str(e)
        if _agreed(error is None):
            return path, value, skipped
        skipped.append((path, error or f"{path}: another process could not read it"))
    raise CheckpointError(f"no checkpoint in {candidates[0].parent} restores "
                          f"({len(candidates)} tried); the newest: {skipped[0][1]}")
