"""Atomic directory and file writes, and what jaxgpt may replace or delete.

Every save writes a hidden temporary sibling (`.NAME.tmp-PID-HEX`) and renames it into place,
so an interrupted save never leaves a half-written directory under the final name; the next
save beside it removes such temporaries once their process is gone. Nothing is replaced or
deleted that jaxgpt could not have written.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from jaxgpt.io.formats import ORBAX_ENTRIES, SAE_ENTRIES, is_checkpoint, is_hf_entry, is_sae_folder

# Temporary siblings: `.NAME.tmp-PID-HEX` while writing, `.NAME.old-PID-HEX` while replacing
# (`.NAME.tmp-HEX` from versions before the PID was part of the name).
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")
# What orbax leaves inside a temporary when killed while writing `params` or `extra`.
_ORBAX_TEMP_RE = re.compile(r"^(?:params|extra)\.orbax-checkpoint-tmp(?:-\d+)?$")


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """Names in the directory `path` that neither `save` nor a GPT-2 `save_pretrained` writes.

    Empty for an empty directory, a jaxgpt orbax checkpoint, a Hugging Face GPT-2 directory
    holding only model files, or an sae-lens SAE folder holding only its files;
    ["<no checkpoint marker>"] for a directory of known names that is none of them (e.g. a
    lone config.json).
    """
    path = Path(path)
    entries = sorted(path.iterdir())
    if not entries:
        return []
    if is_checkpoint(path):
        return [e.name for e in entries if e.name not in ORBAX_ENTRIES]
    if is_sae_folder(path):
        return [e.name + ("/" if e.is_dir() else "") for e in entries
                if not (e.is_file() and e.name in SAE_ENTRIES)]
    foreign = [e.name + ("/" if e.is_dir() else "") for e in entries if not is_hf_entry(e)]
    has_weights = any(e.name != "config.json" and is_hf_entry(e) for e in entries)
    if not foreign and not ((path / "config.json").is_file() and has_weights):
        return ["<no checkpoint marker>"]
    return foreign


def describe_names(names: list[str], shown: int = 5) -> str:
    """`a, b, c and 4 more`: the first `shown` of `names` for a message."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise FileExistsError unless the existing `path` may be replaced by a new checkpoint.

    Only an empty directory, a jaxgpt orbax checkpoint, a Hugging Face GPT-2 directory
    holding nothing but model files or an sae-lens SAE folder holding only its files may be:
    nothing is deleted that jaxgpt could not have written. Symbolic links and files are
    refused too.
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
            e.name in ORBAX_ENTRIES or e.name in SAE_ENTRIES or is_hf_entry(e)
            or _ORBAX_TEMP_RE.match(e.name)
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


def set_default_modes(root: Path) -> None:
    """Give everything under `root` the modes a plain `open`/`mkdir` would (umask applied).

    Some writers (safetensors) create their files 0600; a checkpoint should be as readable as
    the config.json beside it.
    """
    mask = _umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def check_destination(path: Path, overwrite: bool) -> None:
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        check_replaceable(path)


def commit(tmp: Path, path: Path, tag: str) -> None:
    """Rename the finished temporary `tmp` to `path` (replacing a checkpoint there)."""
    set_default_modes(tmp)
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

    One process only: `checkpoint.save` coordinates several.
    """
    path = Path(path).absolute()
    check_destination(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    try:
        tmp.mkdir()
        yield tmp
        commit(tmp, path, tag)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of the file `path` to write, with `path`'s suffix (what picks
    a picture's format); when the body returns, rename it to `path`.

    If the body raises, nothing appears at `path` (a file there is left as it was) and the
    temporary is removed, so no 0-byte or half-written `path` is ever seen; an OSError (a full
    disk) is raised again naming `path`, not the temporary. A killed process leaves at most a
    hidden `.STEM.tmp-PID-HEX.SUFFIX` sibling.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class LockHeld(Exception):
    """Another process holds the lock `exclusive_lock` asked for; `pid` is that process (None
    if it has not written its pid yet)."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is held by process {pid if pid is not None else '(unknown)'}")
        self.path, self.pid = path, pid


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an advisory `flock` on the file `path` (created if needed) while the body runs.

    The file holds the holder's pid. The OS releases the lock when the holder closes it or
    ends in any way (killed too), so a stale file is simply locked again. Raises LockHeld if
    another process holds it. Where `fcntl` is missing (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise LockHeld(path, int(text) if text.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock

