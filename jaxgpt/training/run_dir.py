"""A training run's checkpoints: `out/checkpoints/step_NNNNNNNN`, their rotation, the run
directory's rules and what a resumed run may change."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.io import checkpoint, files
from jaxgpt.training.config import TrainConfig, resolve_remat, resume_fields
from jaxgpt.training.data import BatchLoader, LoaderState
from jaxgpt.training.progress import foreign_metrics_line
from jaxgpt.training.step import TrainState
from jaxgpt.training.tracking import TENSORBOARD_DIR, WANDB_DIR

CKPT_PREFIX = "step_"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints `ckpt_dir/step_NNNNNNNN`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [
        p
        for p in ckpt_dir.iterdir()
        if p.name.startswith(CKPT_PREFIX)
        and p.name[len(CKPT_PREFIX) :].isdigit()
        and checkpoint.is_checkpoint(p)
    ]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX) :]))


def _extra_state(state: TrainState, loader: BatchLoader, tokens_seen: int) -> dict:
    # The dropout key is not saved: it derives from the seed, which a resume must match.
    return {
        "step": state.step,
        "opt_state": state.opt_state,
        "loader": loader.state.to_array(),
        "tokens_seen": np.array(tokens_seen, np.int64),
    }


def save_train_checkpoint(
    ckpt_dir: Path,
    cfg: GPTConfig,
    tc: TrainConfig,
    state: TrainState,
    loader: BatchLoader,
    tokens_seen: int,
) -> Path:
    """Write `ckpt_dir/step_NNNNNNNN` (atomic), then delete all but the newest `tc.keep`.

    Collective with several processes (each writes its own shards; process 0 rotates). Only
    complete jaxgpt checkpoints holding nothing else are rotated out, and temporaries of
    saves killed earlier are removed (see `jaxgpt.io.files.remove_stale_temporaries`).
    """
    step = int(state.step)
    path = ckpt_dir / f"{CKPT_PREFIX}{step:08d}"
    main = jax.process_index() == 0
    if main:
        files.remove_stale_temporaries(ckpt_dir)
    checkpoint.save(
        path,
        state.params,
        cfg,
        extra=_extra_state(state, loader, tokens_seen),
        metadata={"step": step, "tokens_seen": tokens_seen, "train": tc.to_dict()},
        overwrite=True,
    )
    # One process rotates (the others return once the save is committed); a directory holding
    # anything but what `save` wrote is kept.
    for old in list_checkpoints(ckpt_dir)[: -tc.keep] if main else []:
        if old != path and not files.foreign_entries(old):
            shutil.rmtree(old, ignore_errors=True)
    return path


def resume_changes(path: Path, cfg: GPTConfig, tc: TrainConfig) -> list[str]:
    """What this run changes from the run saved at `path`, one warning line each.

    Raises ValueError naming the field if the model config or a data setting
    (`resume_fields("data")`) differs: the checkpoint's weights or data position would not fit.
    Optimisation and loop settings may change; the warnings say so.
    """
    saved_cfg = checkpoint.load_config(path)
    if saved_cfg != cfg:
        diff = [
            f"{k}: {saved_cfg.to_dict().get(k)!r} -> {v!r}"
            for k, v in cfg.to_dict().items()
            if saved_cfg.to_dict().get(k) != v
        ]
        raise ValueError(
            f"{path} was trained with another model config ({'; '.join(diff)}); "
            f"resume with that model's config"
        )
    saved = checkpoint.load_metadata(path).get("train", {})
    for name in resume_fields("data"):
        if saved.get(name) != getattr(tc, name):
            raise ConfigError(
                "TrainConfig", name, f"must stay {saved.get(name)!r} to resume {path}: the "
                f"data's order, windows and split follow it (another output directory starts "
                f"afresh)", getattr(tc, name))
    changes = []
    for name in resume_fields("optim") + resume_fields("loop"):
        old, new = saved.get(name), getattr(tc, name)
        if name not in saved or old == new:
            continue
        if name == "remat":  # older runs saved a bool; None is auto, for this run's devices
            platform = jax.default_backend()
            if resolve_remat(old, platform) == resolve_remat(new, platform):
                continue
        if name in resume_fields("optim"):
            why = "the run is no longer an exact replay of an uninterrupted one"
        else:
            why = "changes only when the loop evaluates, samples or saves"
        changes.append(f"TrainConfig.{name} changed from {old!r} to {new!r}: {why}")
    return changes


# Held by the process running in the directory (see `lock_run`); it names that process.
RUN_LOCK = "jaxgpt-train.lock"
_RUN_ENTRIES = ("metrics.jsonl", "loss.png", "checkpoints", RUN_LOCK, TENSORBOARD_DIR, WANDB_DIR)


def check_run_dir(out: Path, entries: tuple[str, ...] = _RUN_ENTRIES,
                  command: str = "jaxgpt train") -> None:
    """Raise FileExistsError unless `out` is new, empty, or holds only what a run writes
    (`entries`: `jaxgpt train`'s by default; `jaxgpt sae train` passes its own).

    A run rewrites `metrics.jsonl` and `loss.png` and rotates `checkpoints/`, so a directory
    holding anything else (a project, someone's notes), or a `metrics.jsonl` whose lines are not
    a run's records, is refused rather than mixed into.
    """
    if out.is_symlink() and not out.exists():
        raise FileExistsError(f"{out} is a dangling symbolic link")
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    foreign = sorted(e.name for e in out.iterdir() if e.name not in entries)
    if foreign:
        raise FileExistsError(
            f"{out} holds files that {command} did not write "
            f"({files.describe_names(foreign)}); a run directory holds "
            f"only {', '.join(entries[:3])}: choose a new or empty output directory"
        )
    metrics = out / "metrics.jsonl"
    if metrics.is_symlink() or metrics.exists() and not metrics.is_file():
        raise FileExistsError(f"{metrics} is not a regular file; {command} does not replace it")
    line = foreign_metrics_line(metrics) if metrics.exists() else None
    if line is not None:
        raise FileExistsError(
            f"{metrics} was not written by {command} (line {line} is not a record of a "
            f"training step) and would be overwritten: move it or choose another output "
            f"directory"
        )
    for name in ("checkpoints", RUN_LOCK):
        entry = out / name
        if entry.is_symlink() or entry.exists() and entry.is_dir() != (name == "checkpoints"):
            raise FileExistsError(f"{entry} is not what {command} writes there")


def check_writable(out: Path) -> None:
    """Raise PermissionError unless a run can write into `out` (or create it)."""
    target = out
    while not target.exists():  # the nearest existing ancestor will hold the new directories
        target = target.parent
    if not os.access(target, os.W_OK | os.X_OK):
        what = "directory" if target == out else f"directory {target}, where {out} would go,"
        raise PermissionError(f"cannot write into {out}: the {what} is not writable")


@contextlib.contextmanager
def lock_run(out: Path) -> Iterator[None]:
    """Hold `out`'s lock while the body runs: one run per directory. Creates `out`.

    The lock is advisory (`flock`) on `out/jaxgpt-train.lock` and taken by process 0 only; the
    OS releases it when the process ends in any way, so a killed run leaves nothing stale.
    Raises FileExistsError naming the process that holds it.
    """
    if jax.process_index() != 0:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    try:
        with files.exclusive_lock(out / RUN_LOCK):
            yield
    except files.LockHeld as e:  # raised by the lock alone, never by the body
        holder = f"process {e.pid}" if e.pid is not None else "another process"
        raise FileExistsError(
            f"{out} is in use by another jaxgpt train ({holder}, which holds "
            f"{e.path}); wait for it to end, or choose another output directory"
        ) from None


def restore_train_checkpoint(
    path: Path, state: TrainState, loader: BatchLoader
) -> tuple[TrainState, int]:
    """`(state, tokens_seen)` from `path`, with `loader.state` set to where the run stood.

    `state` gives the structure and the placement: its leaves (arrays or
    `jax.ShapeDtypeStruct`s) carry the shardings the restored arrays get, on any mesh, whatever
    the devices or processes that saved them.
    """
    shardings = jax.tree_util.tree_map(lambda x: getattr(x, "sharding", None), state.params)
    _, params = checkpoint.restore(path, shardings)
    extra = checkpoint.restore_extra(path, _extra_state(state, loader, 0))
    loader.state = LoaderState.from_array(extra["loader"])
    restored = TrainState(
        step=jnp.asarray(extra["step"], jnp.int32), params=params, opt_state=extra["opt_state"]
    )
    return restored, int(extra["tokens_seen"])


def prepare_run(out: Path, cfg: GPTConfig, tc: TrainConfig, resume: bool) -> list[Path]:
    """Check `out` and the resume request: the checkpoints to resume from, newest first (none
    for a new run). Nothing is written; the newest is checked against this run's settings."""
    check_run_dir(out)
    check_writable(out)
    ckpt_dir = out / "checkpoints"
    existing = list_checkpoints(ckpt_dir)
    if existing and not resume:
        raise FileExistsError(
            f"{out} already holds checkpoints (newest {existing[-1].name}); "
            f"pass resume=True or choose another output directory"
        )
    if resume and not existing:
        raise FileNotFoundError(
            f"nothing to resume: {ckpt_dir} holds no complete checkpoint; "
            f"start without resume=True, or give the directory of the run to continue"
        )
    for path in existing[::-1]:  # the newest whose settings can be read (see resume_newest)
        try:
            _check_resumable(path, cfg, tc)
            break
        except checkpoint.CheckpointError:
            continue
    return existing[::-1]


def _check_resumable(path: Path, cfg: GPTConfig, tc: TrainConfig) -> list[str]:
    """`resume_changes` of `path`, and ValueError if it leaves no step to run."""
    changes = resume_changes(path, cfg, tc)
    step = int(checkpoint.load_metadata(path).get("step", 0))
    if tc.steps <= step:
        raise ConfigError("TrainConfig", "steps", f"must be more than {step} to extend the "
                          f"run: {path} is at step {step}", tc.steps)
    return changes


def resume_newest(
    candidates: list[Path], cfg: GPTConfig, tc: TrainConfig, state: TrainState,
    loader: BatchLoader,
) -> tuple[Path, TrainState, int, list[str]]:
    """`(path, state, tokens_seen, warnings)` of the newest of `candidates` that restores.

    A damaged checkpoint (a file truncated or missing) is passed over with a warning naming
    it; CheckpointError if none restores. A changed model or data setting is a ValueError, as
    in `resume_changes`: an older checkpoint of the same run would not fit either.
    """
    def one(path: Path) -> tuple[list[str], TrainState, int]:
        changes = _check_resumable(path, cfg, tc)
        return (changes, *restore_train_checkpoint(path, state, loader))

    path, (changes, restored, tokens_seen), skipped = checkpoint.restore_newest(candidates, one)
    warnings = [f"{error}; trying the checkpoint before it" for _, error in skipped]
    return path, restored, tokens_seen, warnings + changes
