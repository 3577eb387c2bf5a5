"""What the commands share: messages, which weights to load, the compilation cache."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxgpt.config import PRESETS, GPTConfig
from jaxgpt.io.formats import FORMAT_NAMES


def log(msg: str) -> None:
    """A message on stderr; with several processes, from process 0 only."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized() and jax.process_index() != 0:
        return
    print(msg, file=sys.stderr, flush=True)



def field_flags(p: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> flag for every flag of `p` (argparse keeps no public list): where the dests
    are a config's field names, which flag sets each field."""
    return {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}


def flag_error(e: Exception, flags: dict[str, str], typed: dict[str, Any]) -> str:
    """A library error as the command line says it: each `Config.field` it names as the flag
    that sets the field (`flags`: field -> flag), and a `ConfigError`'s value as the one typed
    there (`typed`: field -> the flag's value, where the command changed it on the way)."""
    import re

    from jaxgpt.config import ConfigError

    def flag(match: re.Match) -> str:
        return flags.get(match.group(1), match.group(0))

    names = r"\b[A-Z]\w*Config\.(\w+)"
    if not isinstance(e, ConfigError) or e.field not in flags:
        return re.sub(names, flag, str(e))
    got = f", got {typed.get(e.field, e.value)}" if e.has_value else ""
    return f"{flags[e.field]} {re.sub(names, flag, e.rule)}{got}"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags that say which weights to use."""
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="weights to load: a Hugging Face GPT-2 directory (config.json + "
                        "model.safetensors / sharded / pytorch_model.bin) or a jaxgpt orbax "
                        "checkpoint; the format is detected")
    p.add_argument("--preset", choices=PRESETS, default="gpt2-small",
                   help="architecture of the random weights (ignored with a checkpoint)")
    p.add_argument("--seed", type=int, default=123,
                   help="seed of the random weights (ignored with a checkpoint)")




# The picture formats matplotlib writes with no extra package.
IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _writable_ancestor(path: Path) -> Path:
    """The nearest existing directory at or above `path`: where a write would begin."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: str, what: str, command: str) -> Path:
    """`path` as a directory the command may create or write into, checked before the work:
    SystemExit naming `what` (a flag or argument) if it is a file or cannot be written."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"jaxgpt {command}: {what} {path} is a file, not a directory")
    base = _writable_ancestor(out.absolute())
    if not os.access(base, os.W_OK | os.X_OK):
        where = "it" if base == out.absolute() else f"{base}, where it would be made,"
        raise SystemExit(f"jaxgpt {command}: cannot write {what} {path}: {where} is not "
                         f"writable")
    return out


def check_output_file(path: str, what: str, command: str,
                      suffixes: tuple[str, ...] | None = None) -> Path:
    """`path` as the file the command will write, checked before the work: not a directory,
    a suffix of `suffixes` (when given: it is the format written), in an existing, writable
    directory. SystemExit naming `what` (a flag or argument) otherwise."""
    out = Path(path)
    prefix = f"jaxgpt {command}: {what} {path}"
    if out.is_dir():
        raise SystemExit(f"{prefix} is a directory; give a file name, e.g. {out / 'out.png'}")
    if suffixes and out.suffix.lower() not in suffixes:
        got = f"'{out.suffix}'" if out.suffix else "no suffix"
        raise SystemExit(f"{prefix}: {got} is not a picture format; use one of "
                         f"{', '.join(suffixes)}")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise SystemExit(f"{prefix}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise SystemExit(f"{prefix}: cannot write there (permission denied)")
    return out


@contextlib.contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """The temporary file to write `out` to (`jaxgpt.io.files.atomic_file`): renamed to `out`
    once the body returns, removed if it raises or Ctrl-C ends the command meanwhile."""
    from jaxgpt.cli.interrupts import removed_if_interrupted
    from jaxgpt.io.files import atomic_file

    with atomic_file(out) as tmp, removed_if_interrupted(tmp):
        yield tmp


def run_checkpoints(path: str) -> list[Path]:
    """The complete checkpoints of a training run's directory (`jaxgpt train --out`), newest
    first; none for any other path (a checkpoint itself included)."""
    from jaxgpt.io.formats import detect
    from jaxgpt.training.run_dir import list_checkpoints

    if not Path(path).is_dir() or detect(path) is not None:
        return []
    return list_checkpoints(Path(path) / "checkpoints")[::-1]


def _read_run(run: str, candidates: list[Path]) -> tuple[GPTConfig, Any]:
    """`(cfg, params)` of the newest of a training run's checkpoints that restores, said on
    stderr: the one used, and in a warning the damaged ones passed over. SystemExit if none."""
    from jaxgpt.io import checkpoint

    try:
        used, (cfg, params), skipped = checkpoint.restore_newest(candidates, checkpoint.restore)
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"jaxgpt: {e}") from e
    if not skipped:
        log(f"jaxgpt: {run} is a training run; using its newest checkpoint {used}")
    else:
        names = ", ".join(path.name for path, _ in skipped)
        log(f"jaxgpt: warning: {run} is a training run; passed over its newest checkpoint"
            f"{'s' if len(skipped) > 1 else ''} {names} ({skipped[0][1]}); using {used}")
    return cfg, params


def checkpoint_format(path: str) -> str:
    """'hf' or 'orbax' for the directory `path`; SystemExit saying what is wrong otherwise."""
    from pathlib import Path

    from jaxgpt.io.formats import HF_WEIGHT_FILES, detect

    if not Path(path).is_dir():
        raise SystemExit(f"jaxgpt: no checkpoint directory at {path}")
    fmt = detect(path)
    if fmt is not None:
        return fmt
    in_run = (Path(path) / "checkpoints").is_dir()
    run = " nor a training run with a complete checkpoint" if in_run else ""
    raise SystemExit(
        f"jaxgpt: {path} is neither a jaxgpt orbax checkpoint (no jaxgpt.json) nor a Hugging "
        f"Face GPT-2 directory (config.json with one of {', '.join(HF_WEIGHT_FILES)}){run}"
    )


def read_checkpoint(path: str) -> tuple[GPTConfig, Any, str]:
    """`(cfg, params, format)` from a checkpoint directory of either format."""
    from jaxgpt.io import checkpoint, hf

    candidates = run_checkpoints(path)
    if candidates:
        return (*_read_run(path, candidates), "orbax")
    fmt = checkpoint_format(path)
    try:
        cfg, params = checkpoint.restore(path) if fmt == "orbax" else hf.load_pretrained(path)
    except checkpoint.CheckpointError as e:  # names the checkpoint itself
        raise SystemExit(f"jaxgpt: {e}") from e
    except (OSError, ValueError) as e:
        raise SystemExit(f"jaxgpt: cannot load the {FORMAT_NAMES[fmt]} {path}: {e}") from e
    return cfg, params, fmt


def load_model(args: argparse.Namespace) -> tuple[GPTConfig, Any, str]:
    """`(cfg, params, description)` for the weights the flags name."""
    from jaxgpt.nn.model import count_params, init_params

    if getattr(args, "checkpoint", None):
        cfg, params, fmt = read_checkpoint(args.checkpoint)
        desc = (f"{FORMAT_NAMES[fmt]} {args.checkpoint} ({count_params(params):,} parameters: "
                f"{cfg.n_layers} layers, emb_dim {cfg.emb_dim}, {cfg.n_heads} heads, vocab "
                f"{cfg.vocab_size}, context {cfg.context_length}, "
                f"{'tied' if cfg.tie_embeddings else 'separate'} output head)")
        return cfg, params, desc
    cfg = GPTConfig.from_preset(args.preset)
    params = init_params(cfg, args.seed)
    desc = (f"{args.preset} with RANDOM weights (seed {args.seed}): the text is noise until a "
            f"checkpoint is given")
    return cfg, params, desc



def peek_config(args: argparse.Namespace) -> GPTConfig:
    """The config of the weights the flags name, without reading the weights."""
    from jaxgpt.io import checkpoint, hf

    if not getattr(args, "checkpoint", None):
        return GPTConfig.from_preset(args.preset)
    candidates = run_checkpoints(args.checkpoint)
    if candidates:  # one run, one model: the newest config.json that reads
        try:
            return checkpoint.restore_newest(candidates, checkpoint.load_config)[1]
        except checkpoint.CheckpointError as e:
            raise SystemExit(f"jaxgpt: {e}") from e
    fmt = checkpoint_format(args.checkpoint)
    try:
        if fmt == "orbax":
            return checkpoint.load_config(args.checkpoint)
        return hf.load_hf_config(args.checkpoint)
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"jaxgpt: cannot load the {FORMAT_NAMES[fmt]} {args.checkpoint}: {e}"
        ) from e



def prompt_tokens(text: str, cfg: GPTConfig, flag: str, command: str) -> Any:
    """`text`'s GPT-2 token ids, int32 `[T]`, checked for the model `cfg` as the research
    functions check their tokens (`jaxgpt.interp.cache.check_tokens`: not empty, in the
    vocabulary, at most `context_length`), said of `flag`: SystemExit before the weights load.
    """
    from jaxgpt.interp.cache import check_tokens
    from jaxgpt.tokenizer import text_to_token_ids

    ids = text_to_token_ids(text)  # `<|endoftext|>` allowed, as `generate` takes it
    try:
        return check_tokens(ids, cfg, flag)[0]
    except ValueError as e:
        raise SystemExit(f"jaxgpt {command}: {e}") from e


def _default_cache_dir() -> str:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxgpt", "xla")


def _unwritable_dir(path: str) -> str | None:
    """Why the directory `path` cannot be made or written into (None if it can); a URL (JAX
    takes `gs://...`) is left to JAX."""
    if "://" in path:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return e.strerror or str(e)
    if not os.access(path, os.W_OK | os.X_OK):
        return "not writable"
    return None


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="JAX's persistent compilation cache: compiled programs are kept here, so "
                        "a later run with the same shapes skips compiling (default "
                        "$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/jaxgpt/xla, "
                        "i.e. ~/.cache/jaxgpt/xla)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile from scratch and write no cache")


def enable_compile_cache(args: argparse.Namespace) -> str | None:
    """Turn on JAX's persistent compilation cache (before anything compiles); its directory."""
    import jax

    if args.no_compile_cache:
        return None
    configured = jax.config.values.get("jax_compilation_cache_dir")
    path = args.compile_cache or configured or _default_cache_dir()
    why = _unwritable_dir(path)
    if why is not None:  # JAX would warn on every program, with its source path, and go on
        where = ("--compile-cache" if args.compile_cache else
                 "$JAX_COMPILATION_CACHE_DIR" if configured else "the compile cache")
        log(f"jaxgpt: warning: {where} {path} cannot be used ({why}); compiling without a "
            f"cache (--no-compile-cache: no warning)")
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program: the default keeps only those compiling for >= 1 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    _write_entries_whole(path)
    return path


def _write_entries_whole(path: str) -> None:
    """Make JAX's file cache at `path` write each entry to a temporary name and rename it.

    JAX writes an entry in place: a write cut off (a file-size limit, a full disk, a kill)
    leaves a truncated entry that every later run fails to read and warns about, and JAX
    never replaces it (an existing entry is kept). A renamed entry is whole or absent. JAX
    builds its cache object on the first compile through `compilation_cache.get_file_cache`;
    that one function is wrapped, and the entries' paths made `_WholeWrites`. A failed write
    is one jaxgpt line (not JAX's warning per program): the program is simply not cached.
    """
    from jax._src import compilation_cache

    if "://" in path:  # a remote store (gs://...): JAX's own writes, as they are
        return
    get_file_cache = compilation_cache.get_file_cache
    if getattr(get_file_cache, "jaxgpt_whole", False):
        return

    def whole(path: str) -> tuple[Any, str] | None:  # JAX's name and type for it
        found = get_file_cache(path)
        base = getattr(found[0], "_base_cache", found[0]) if found else None  # a checking cache
        if base is not None and hasattr(base, "path"):
            base.path = _WholeWrites(base.path)
        return found

    whole.jaxgpt_whole = True  # type: ignore[attr-defined]
    compilation_cache.get_file_cache = whole


class _WholeWrites:
    """The cache's directory (a `pathlib` or `etils.epath` path, as JAX chose), whose entries'
    `write_bytes` write a temporary sibling and rename it into place; a failed write removes
    the temporary and is said once, on stderr, instead of raising into JAX's warning."""

    said = False

    def __init__(self, path: Any, entry: bool = False) -> None:
        self._path, self._entry = path, entry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._path, name)

    def __fspath__(self) -> str:
        return os.fspath(self._path)

    def __truediv__(self, name: str) -> Any:
        return _WholeWrites(self._path / name, entry=True)

    def write_bytes(self, data: bytes) -> int:
        path = os.fspath(self._path)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-"
                                                   f"{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                written = f.write(data)
            os.replace(tmp, path)
            return written
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not _WholeWrites.said:
                _WholeWrites.said = True
                log(f"jaxgpt: warning: cannot write to the compile cache "
                    f"{os.path.dirname(path)} ({e.strerror or e}); the programs not written "
                    f"there compile again next time")
            return 0
        except BaseException:  # Ctrl-C: nothing half-written is left
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (or loading from the persistent
    cache), and how many programs came from that cache, through `jax.monitoring`."""

    _PHASES = ("/jax/core/compile/jaxpr_trace_duration",
               "/jax/core/compile/jaxpr_to_mlir_module_duration",
               "/jax/core/compile/backend_compile_duration")

    def __init__(self) -> None:
        self.seconds, self.programs, self.cache_hits = 0.0, 0, 0
        self.backend_seconds = 0.0  # XLA's compile, or the load from the cache, alone

    def _duration(self, event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event in self._PHASES:
            self.seconds += duration_secs
            if event == self._PHASES[-1]:
                self.programs += 1
                self.backend_seconds += duration_secs

    def _event(self, event: str, **kwargs: str | int) -> None:
        self.cache_hits += event == "/jax/compilation_cache/cache_hits"

    def __enter__(self) -> CompileClock:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc: object) -> None:
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._duration)
        jax.monitoring.unregister_event_listener(self._event)

