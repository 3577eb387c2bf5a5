"""Experiment trackers: TensorBoard event files and Weights & Biases, beside `metrics.jsonl`.

Every training loop of the package (`train_loop`, `jaxgpt.sae.training.train_saes`) writes
through one `Tracker`: each record of `metrics.jsonl` at its step (its numbers as scalars, a
text such as the evaluation sample as text), the run's configuration as hyper-parameters, and
the model's size. Only process 0 opens one. Which trackers a run uses is a setting of its
config (`TrainConfig.log`, `SAETrainConfig.log`: "tensorboard", "wandb" or both,
comma-separated); each is an optional extra (`pip install "jaxgpt[tensorboard]"`,
`"jaxgpt[wandb]"`), refused in one line before training starts when it is not installed or
its directory cannot be written (`check_trackers`).

Where they write, inside the run directory:

    tensorboard/           event files (`tensorboard --logdir RUN/tensorboard`, or a folder
                           of runs, each shown as RUN/tensorboard)
    wandb/                 W&B's own files (offline runs until `wandb sync`), and
    wandb/jaxgpt-run.json  the run's W&B id, so a resumed run continues the same W&B run

A resumed run continues the same curves: `metrics.jsonl` is cut back to the step of the
checkpoint it resumes from, and so are the TensorBoard event files (rewritten without the
later events, which the resumed run logs again). W&B cannot remove what it holds: the steps a
killed run logged after its last checkpoint are not logged again (an exact replay gives the
same values; a resume that changes an optimisation setting says so in a ResumeWarning).

A tracker that fails during the run (a full disk, W&B's network) warns once (`TrackerWarning`)
and is dropped; training goes on, and `metrics.jsonl` and the checkpoints are as without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import socket
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb")
# A tracker's module, and the extra that installs it.
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "jaxgpt-run.json"


class TrackerWarning(UserWarning):
    """A tracker failed during a run and was dropped; training went on without it."""


def parse_trackers(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """The tracker names of `value` ("tensorboard,wandb", a sequence of names, "" or None for
    none), deduplicated in `TRACKERS`' order; ValueError naming an unknown one."""
    if value is None:
        return ()
    names = value.split(",") if isinstance(value, str) else list(value)
    chosen = set()
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"a tracker is a name, one of {', '.join(TRACKERS)}; got {name!r}")
        name = name.strip().lower()
        if not name or name in ("none", "jsonl"):  # metrics.jsonl is always written
            continue
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}: choose from {', '.join(TRACKERS)}")
        chosen.add(name)
    return tuple(n for n in TRACKERS if n in chosen)


def checked_tracking(owner: str, log: Any, wandb_project: Any, run_name: Any) -> str:
    """A config's tracking settings checked (`owner` is its class's name): `log` as one
    canonical string ("tensorboard,wandb"); ConfigError naming the field otherwise."""
    from jaxgpt.config import ConfigError

    try:
        names = parse_trackers(log)
    except ValueError as e:
        raise ConfigError(owner, "log", f"must name trackers from {', '.join(TRACKERS)}, "
                          f"comma-separated ({e})", log) from None
    if wandb_project is not None and (not isinstance(wandb_project, str)
                                      or not wandb_project.strip()):
        raise ConfigError(owner, "wandb_project", "must be a non-empty string or None",
                          wandb_project)
    if run_name is not None and not isinstance(run_name, str):
        raise ConfigError(owner, "run_name", "must be a string or None", run_name)
    return ",".join(names)


def check_trackers(names: Iterable[str], out: str | os.PathLike | None) -> None:
    """Raise ValueError in one line unless every tracker of `names` is installed and its
    directory under the run directory `out` can be written (None: the run writes nothing, so
    there is nowhere to log)."""
    names = tuple(names)
    if not names:
        return
    if out is None:
        raise ValueError(f"logging to {' and '.join(names)} needs a run directory "
                         f"to write in")
    for name in names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ValueError(f"logging to {name} needs the {name} package: "
                             f'pip install "jaxgpt[{name}]"')
    for name in names:
        where = Path(out) / (TENSORBOARD_DIR if name == "tensorboard" else WANDB_DIR)
        if name == "wandb" and os.environ.get("WANDB_DIR"):
            where = Path(os.environ["WANDB_DIR"])
        if where.exists() and not where.is_dir():
            raise ValueError(f"cannot log to {name}: {where} is a file, not a "
                             f"directory")
        base = where.absolute()
        while not base.exists():
            base = base.parent
        if not os.access(base, os.W_OK | os.X_OK):
            raise ValueError(f"cannot log to {name}: {base} is not writable")


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`config` with nested mappings flattened to `a.b` keys."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _TensorBoard:
    """Event files in `logdir`, written with TensorBoard's own writer (no TensorFlow)."""

    name = "tensorboard"

    def __init__(self, logdir: Path, start: int) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        logdir.mkdir(parents=True, exist_ok=True)
        cut_back_events(logdir, start)
        self._writer = EventFileWriter(str(logdir))

    def _summary(self, step: int, summary: Any) -> None:
        from tensorboard.compat.proto import event_pb2

        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                               summary=summary))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        self._summary(step, summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()]))

    def text(self, step: int, tag: str, text: str) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._summary(step, text_pb(tag, text))

    def config(self, config: Mapping[str, Any], name: str, fresh: bool) -> None:
        if not fresh:  # the resumed run's are there, at step 0
            return
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        hparams = {k: (v if isinstance(v, (bool, int, float, str)) else json.dumps(v))
                   for k, v in _flat(config).items()}
        self._summary(0, hparams_pb(hparams, trial_id=name))
        rows = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in _flat(config).items())
        self.text(0, "config", "| setting | value |\n|---|---|\n" + rows)

    def size(self, parameters: int, fresh: bool) -> None:
        if fresh:
            self.scalars(0, {"parameters": parameters})

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def cut_back_events(logdir: Path, step: int) -> None:
    """Rewrite the event files of `logdir` without the events after `step` (all of them at 0:
    a run starting afresh), each file written whole under a temporary name and renamed over
    the old one; a file left with no summary is removed."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(logdir.glob("events.out.tfevents.*")):
        if step == 0:
            path.unlink()
            continue
        raw = list(RawEventFileLoader(str(path)).Load())
        kept = [r for r in raw if event_pb2.Event.FromString(r).step <= step]
        if len(kept) == len(raw):
            continue
        if not any(event_pb2.Event.FromString(r).HasField("summary") for r in kept):
            path.unlink()
            continue
        # Not named like an event file: TensorBoard reads every "*tfevents*" file it sees.
        tmp = logdir / ".cut-back.partial"
        with open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for r in kept:
                writer.write(r)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class _WandB:
    """A W&B run: online, or offline under `WANDB_MODE=offline` (synced later with `wandb
    sync`); its id kept in `dir/jaxgpt-run.json` so a resumed run continues it."""

    name = "wandb"

    def __init__(self, out: Path, project: str | None, name: str, config: Mapping[str, Any],
                 start: int) -> None:
        import wandb

        # wandb writes its files in `dir`/wandb: the run directory's wandb/, or WANDB_DIR's.
        wdir = Path(os.environ.get("WANDB_DIR") or out)
        (out / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self._id_file = out / WANDB_DIR / WANDB_ID_FILE
        saved = self._read_id() if start > 0 else None
        run_id = saved["id"] if saved else "".join(
            secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
        # Steps up to this one are already in W&B (logged before the checkpoint resumed from,
        # or after it by a run killed before its next one): W&B keeps what it was given.
        self._logged = int(saved.get("step", 0)) if saved else 0
        try:
            self._run = wandb.init(
                project=project or os.environ.get("WANDB_PROJECT") or "jaxgpt", name=name,
                id=run_id,
                resume="allow", dir=str(wdir), config=dict(config),
                settings=wandb.Settings(console="off", silent=True),
                reinit="create_new")
        except Exception as e:  # not logged in, no network in online mode, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"W&B could not start a run ({first}); log in "
                             f"(wandb login), or set WANDB_MODE=offline and sync later") from e
        if saved:
            self._run.config.update(dict(config), allow_val_change=True)
        self._write_id()

    def _read_id(self) -> dict | None:
        try:
            saved = json.loads(self._id_file.read_text())
        except (OSError, ValueError):
            return None
        return saved if isinstance(saved, dict) and isinstance(saved.get("id"), str) else None

    def _write_id(self) -> None:
        tmp = self._id_file.with_name(self._id_file.name + ".partial")
        tmp.write_text(json.dumps({"id": self._run.id, "step": self._logged}) + "\n")
        os.replace(tmp, self._id_file)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        if step <= self._logged:  # already in W&B
            return
        self._run.log(dict(values), step=step)
        self._logged = max(self._logged, step)

    def config(self, config: Mapping[str, Any], name: str, fresh: bool) -> None:
        pass  # given to wandb.init

    def size(self, parameters: int, fresh: bool) -> None:
        self._run.summary["parameters"] = parameters  # also in the config

    def flush(self) -> None:
        self._write_id()

    def close(self) -> None:
        self._write_id()
        self._run.finish()


class Tracker:
    """The trackers of one run, written together; a tracker that raises is warned about once
    and dropped (`TrackerWarning`), so logging never stops a run.

    `Tracker.open(names, out, ...)` opens them (process 0 only; elsewhere it logs nothing);
    `log(step, values)` takes a record's numbers and texts; `close()` flushes and ends them.
    """

    def __init__(self, backends: list[Any], command: str) -> None:
        self._backends = backends
        self._command = command

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self._backends)

    @classmethod
    def open(cls, names: Iterable[str], out: str | os.PathLike | None, *, start: int,
             config: Mapping[str, Any], parameters: int | None = None,
             project: str | None = None, run_name: str | None = None,
             command: str = "jaxgpt train") -> Tracker:
        """The trackers `names` of the run directory `out`, continuing from step `start` (0: a
        new run). `config` is the run's configuration (nested mappings allowed), logged as
        hyper-parameters; `parameters` the model's size. ValueError if one cannot start."""
        import jax

        names = parse_trackers(names)
        if not names or jax.process_index() != 0:
            return cls([], command)
        check_trackers(names, out)
        out = Path(out)  # type: ignore[arg-type]
        name = run_name or out.absolute().name or socket.gethostname()
        config = {**config, **({"parameters": parameters} if parameters is not None else {})}
        backends: list[Any] = []
        for n in names:
            if n == "tensorboard":
                backends.append(_TensorBoard(out / TENSORBOARD_DIR, start))
            else:
                backends.append(_WandB(out, project, name, config, start))
        tracker = cls(backends, command)
        tracker._each("config", config, name, start == 0)
        if parameters is not None:
            tracker._each("size", parameters, start == 0)
        return tracker

    def _each(self, method: str, *args: Any) -> None:
        for backend in list(self._backends):
            try:
                getattr(backend, method)(*args)
            except Exception as e:  # a tracker never stops the run
                self._drop(backend, e)

    def _drop(self, backend: Any, e: Exception) -> None:
        self._backends.remove(backend)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        warnings.warn(f"{self._command}: logging to {backend.name} failed ({first}); training "
                      f"goes on without it (metrics.jsonl has every step)", TrackerWarning,
                      stacklevel=3)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """The numbers of `values` as scalars at `step`, its strings as texts (the step's
        evaluation sample); other values and non-finite numbers are left out."""
        if not self._backends:
            return
        numbers = {k: float(v) for k, v in values.items()
                   if k != "step" and _number(v) and math.isfinite(v)}
        texts = {k: v for k, v in values.items() if isinstance(v, str)}
        for backend in list(self._backends):
            try:
                if backend.name == "wandb":
                    backend.log(step, {**numbers, **texts})
                else:
                    backend.scalars(step, numbers)
                    for k, v in texts.items():
                        backend.text(step, k, v)
            except Exception as e:
                self._drop(backend, e)

    def flush(self) -> None:
        """Everything logged so far written out (at each checkpoint)."""
        self._each("flush")

    def close(self) -> None:
        for backend in list(self._backends):
            try:
                backend.close()
            except Exception as e:
                self._drop(backend, e)
        self._backends = []

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
