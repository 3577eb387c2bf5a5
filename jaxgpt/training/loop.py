"""`train_loop`: the impure part of training around the pure step of `training.step`: data,
evaluation, metrics, checkpoints, signals, and the agreement of several processes.

`run_steps` is the loop itself, the one `train_loop` runs: a train step over a stream of
batches, with a call back after each step. An experiment with its own model and data stream
drives it directly (`scripts/induction_search.py`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxgpt import sharding
from jaxgpt.config import GPTConfig
from jaxgpt.io.checkpoint import CheckpointError
from jaxgpt.training.config import TrainConfig
from jaxgpt.training.data import BatchLoader, SlidingWindows
from jaxgpt.training.evaluation import evaluate, make_eval_step, sample_text
from jaxgpt.training.progress import Progress, log, plot_losses, read_metrics
from jaxgpt.training.run_dir import (
    check_run_dir,
    lock_run,
    prepare_run,
    resume_newest,
    save_train_checkpoint,
)
from jaxgpt.training.step import dropout_key, init_train_state, sharded_train_step, tree_all_finite
from jaxgpt.training.tracking import Tracker, check_trackers, parse_trackers


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the parameters became NaN or infinite."""


class ResumeWarning(UserWarning):
    """A resumed run differs from the run it resumes (a setting changed, or a damaged checkpoint
    was passed over); issued by process 0 only."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a checkpoint of the current step was saved.

    `signum` is the signal, `step` the last completed step and `checkpoint` its directory.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}" if checkpoint else "no step completed, nothing saved"
        super().__init__(f"{name} at step {step}: {where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopOnSignal:
    """While active, the first SIGINT/SIGTERM only sets `signum` (the loop stops after the
    step in flight and saves); a second one exits the process at once, without saving.
    `command` names the program in the two messages (`jaxgpt train`, `jaxgpt sae train`).

    Handlers are installed only in the main thread (Python allows no other); elsewhere the
    signals keep their default behaviour.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, command: str = "jaxgpt train") -> None:
        self.command = command
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            os.write(2, f"\n{self.command}: second interrupt: exiting now, without saving\n"
                     .encode())
            os._exit(128 + signum)
        self.signum = signum
        os.write(
            2,
            f"\n{self.command}: {signal.Signals(signum).name} received: stopping after this "
            f"step and saving a checkpoint (Ctrl-C again to quit at once)\n".encode(),
        )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _agreed_signal(signum: int | None) -> int | None:
    """The stop signal as every process sees it: with several processes, a signal any of them
    received (a collective, so all of them stop after the same step and save together)."""
    if jax.process_count() == 1:
        return signum
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.array(signum or 0, np.int32))
    return int(np.max(got)) or None


def check_tokens(tokens: np.ndarray, cfg: GPTConfig, name: str) -> None:
    """Every id in `tokens` must be < vocab_size (a pass over the data, chunked for memmaps)."""
    hi = 0
    for start in range(0, len(tokens), 1 << 24):
        hi = max(hi, int(np.max(tokens[start : start + (1 << 24)])))
    if len(tokens) and hi >= cfg.vocab_size:
        raise ValueError(
            f"{name} holds token id {hi}, outside the model's vocabulary [0, {cfg.vocab_size})"
        )


# What `run_steps` calls after each step: (step, state, host metrics, seconds the step took,
# its batch included) -> whether to stop there.
AfterStep = Callable[[int, Any, dict, float], bool]


def run_steps(train_step: Callable, state: Any, batches: Iterator[Any], steps: Iterable[int],
              key: jax.Array, after_step: AfterStep | None = None) -> Any:
    """The training loop: for each step number of `steps`, `state, metrics =
    train_step(state, next(batches), key)`, then `after_step(step, state, metrics, seconds)`
    with the metrics on the host (evaluate, log, save there); a true return stops after that
    step. Returns the last state.

    `train_step` is `training.step.make_train_step`'s (for a variant, `model=`) or
    `sharded_train_step`'s; `batches` yields its `(inputs, targets)`, one batch drawn per step
    (a generator draws nothing past the last step).
    """
    for step in steps:
        t0 = time.perf_counter()
        state, metrics = train_step(state, next(batches), key)
        m = jax.device_get(metrics)
        if after_step is not None and after_step(step, state, m, time.perf_counter() - t0):
            break
    return state


def train_loop(
    cfg: GPTConfig,
    tc: TrainConfig,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    params: Any | None = None,
    devices: Sequence[jax.Device] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train `cfg` on `train_tokens` for `tc.steps` updates; write everything under `out_dir`.

    Writes `out_dir/metrics.jsonl` (one object per step: `step`, `loss`, `tokens_seen`, `lr`,
    `grad_norm`, `tokens_per_s`; plus `val_loss`, `val_perplexity` and `sample` where
    evaluated), `out_dir/checkpoints/step_NNNNNNNN` every `tc.save_every` steps and at the end
    (the newest `tc.keep` kept), and `out_dir/loss.png`. `out_dir` must be new, empty or a run
    directory (`check_run_dir`) that no other run is using (`lock_run`). With `resume`,
    continues from the newest checkpoint that restores (a damaged one is passed over with a
    ResumeWarning) with exactly the batches, dropout keys and optimizer state the uninterrupted
    run would have had; optimisation settings may differ from the saved run's (each change is a
    ResumeWarning, `warnings.warn`), the model and data settings may not. `on_step(step,
    record)` is called after each step.

    SIGINT/SIGTERM (in the main thread) stop the run after the step in flight: a checkpoint of
    that step is saved, `metrics.jsonl` and `loss.png` are written, and TrainingInterrupted is
    raised. A second signal exits the process at once.

    Raises TrainingDiverged (nothing saved for that step; its message says where the last good
    checkpoint is) on a NaN or infinite loss, gradient or parameter; ValueError,
    FileExistsError, FileNotFoundError or PermissionError for settings or a directory that
    cannot work, before anything is compiled or written; CheckpointError when no checkpoint
    restores, or one cannot be written (the older ones are kept).

    Returns:
      The records of this run's steps (those of `metrics.jsonl` written by this call).
    """
    with contextlib.ExitStack() as lock:  # held from `_open_run`'s checks on
        return _train(_open_run(cfg, tc, train_tokens, val_tokens, Path(out_dir), resume, params,
                                devices, lock), on_step, progress)


def _train(run: _Run, on_step: Callable[[int, dict], None] | None,
           progress: bool) -> list[dict]:
    """The steps of `train_loop` on an opened run (`run_steps`); its records."""
    cfg, tc = run.cfg, run.tc
    start = int(run.state.step)
    main = jax.process_index() == 0  # the one writer of metrics, plot and messages
    bar = Progress(tc.steps, start) if progress and main else None
    records: list[dict] = []
    saved_step, signum = start, None
    with (
        StopOnSignal() as stop,
        open(run.metrics_path, "a") if main else contextlib.nullcontext() as log_file,
        _open_tracker(run, start) as tracker,
    ):
        def after_step(step: int, state: Any, m: dict, seconds: float) -> bool:
            nonlocal saved_step, signum
            run.state = state
            saving = step % tc.save_every == 0 or step == tc.steps
            record = run.record(step, m, seconds, saving, bar)
            signum = _agreed_signal(stop.signum)  # every process stops after the same step
            if (step % tc.eval_every == 0 or step == tc.steps) and signum is None:
                _evaluate_into(record, run.state.params, cfg, tc, run.eval_step,
                               run.val_batches, bar)
            if log_file is not None:  # process 0
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            tracker.log(step, record)
            if saving or signum is not None:
                run.save(step, saving)
                saved_step = step
                tracker.flush()
            records.append(record)
            if bar:
                bar.update(step, record["loss"], record["tokens_per_s"])
            if on_step is not None:
                on_step(step, record)
            return signum is not None

        run.state = run_steps(run.train_step, run.state, run.batches(),
                              range(start + 1, tc.steps + 1), run.key, after_step)
        if bar and bar.tty:
            print(file=sys.stderr)
        png = plot_losses(read_metrics(run.metrics_path), run.out / "loss.png") if main else None
        if png:
            log(f"jaxgpt train: loss plot in {png}")
        if signum is not None and saved_step < tc.steps:
            raise TrainingInterrupted(signum, saved_step, run.last_good)
    return records


def _open_tracker(run: _Run, start: int) -> Tracker:
    """The run's trackers (`tc.log`; process 0 only), continuing from step `start`."""
    from jaxgpt.nn.model import count_params

    return Tracker.open(parse_trackers(run.tc.log), run.out, start=start,
                        config={"model": run.cfg.to_dict(), "train": run.tc.to_dict()},
                        parameters=count_params(run.state.params),
                        project=run.tc.wandb_project, run_name=run.tc.run_name)


@dataclasses.dataclass
class _Run:
    """A run in progress: its settings, data, compiled step and state, and where it writes."""

    cfg: GPTConfig
    tc: TrainConfig
    out: Path
    mesh: jax.sharding.Mesh
    loader: BatchLoader
    val_batches: list
    train_step: Callable
    eval_step: Callable
    state: Any
    tokens_seen: int
    last_good: Path | None  # the newest checkpoint of this run's parameters
    key: jax.Array  # the run's base dropout key

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def batches(self) -> Iterator[Any]:
        """The run's batches from the loader's next on, one per `next` (each process builds
        only the rows its devices hold)."""
        while True:
            yield self._global_batch(self.loader.next_indices())

    def _global_batch(self, idx: np.ndarray) -> Any:
        """The batch of window indices `idx` (`[B]`), placed on the mesh."""
        return sharding.global_rows(lambda rows: self.loader.windows.get(idx[rows]),
                                    self.tc.batch_size, sharding.batch_sharding(self.mesh))

    def record(self, step: int, m: dict, seconds: float, saving: bool,
               bar: Progress | None) -> dict:
        """The metrics record of update `step` from its host metrics `m` (TrainingDiverged if
        the values are not finite)."""
        tc = self.tc
        _check_finite(m, self.state, step, saving, self.last_good, bar)
        batch_tokens = tc.batch_size * tc.seq_len
        self.tokens_seen += batch_tokens
        return {
            "step": step,
            "loss": float(m["loss"]),
            "tokens_seen": self.tokens_seen,
            "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]),
            "tokens_per_s": batch_tokens / seconds,
        }

    def save(self, step: int, scheduled: bool) -> None:
        """Save a checkpoint of `step` (scheduled, or because a signal stops the run)."""
        if not scheduled and not bool(tree_all_finite(self.state.params)):
            raise TrainingDiverged(
                f"jaxgpt train: interrupted at step {step} with non-finite parameters; "
                f"not saved. Last good checkpoint: {self.last_good}"
            )
        try:
            self.last_good = save_train_checkpoint(self.out / "checkpoints", self.cfg, self.tc,
                                                   self.state, self.loader, self.tokens_seen)
        except CheckpointError as e:
            kept = f"the newest checkpoint is {self.last_good}" if self.last_good else (
                "no checkpoint was saved")
            raise CheckpointError(f"{e}; training stopped after step {step}, {kept}") from e


def _open_run(cfg: GPTConfig, tc: TrainConfig, train_tokens: np.ndarray,
              val_tokens: np.ndarray, out: Path, resume: bool, params: Any | None,
              devices: Sequence[jax.Device] | None, lock: contextlib.ExitStack) -> _Run:
    """Everything checked, the directory locked (held by `lock`), the state fresh or restored,
    `metrics.jsonl` cut back to the checkpoint resumed from, and the run's first messages
    logged."""
    tc.check_model(cfg)
    if jax.process_index() == 0:
        check_trackers(parse_trackers(tc.log), out)
    locked = out.is_dir()
    if locked:  # a run directory another run may be using: that is said before anything else
        check_run_dir(out)
        lock.enter_context(lock_run(out))
    candidates = prepare_run(out, cfg, tc, resume)  # before anything is written
    mesh = sharding.make_mesh(devices)
    _check_split(tc, mesh)
    loader, val_batches = _data(cfg, tc, train_tokens, val_tokens, mesh)
    if not locked:  # `out` is made now, and checked again under the lock
        lock.enter_context(lock_run(out))
        candidates = prepare_run(out, cfg, tc, resume)
    train_step, state, tokens_seen, latest, changes = _initial_state(
        cfg, tc, mesh, params, candidates, loader)
    run = _Run(cfg, tc, out, mesh, loader, val_batches, train_step,
               make_eval_step(cfg, tc.dtype), state, tokens_seen, latest, dropout_key(tc))
    start = int(state.step)
    if jax.process_index() == 0:
        # An interrupted run may have logged steps past its last checkpoint: they are redone.
        kept = [r for r in read_metrics(run.metrics_path) if r["step"] <= start] if latest else []
        run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    if jax.process_index() == 0:
        for change in changes:
            warnings.warn(change, ResumeWarning, stacklevel=3)  # at the caller of train_loop
    if latest is not None:
        log(f"jaxgpt train: resumed from {latest} (step {start}, {tokens_seen:,} tokens seen)")
    log(
        f"jaxgpt train: {sharding.describe(mesh, tc.fsdp)}; {len(loader.windows):,} training "
        f"windows of {tc.seq_len} tokens, {loader.batches_per_epoch} batches per epoch"
    )
    return run


def _check_split(tc: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    """Raise ValueError unless the batch splits over the processes and each micro-batch over
    the devices."""
    sharding.check_batch_split(tc.batch_size)
    n_dev = mesh.shape[sharding.DATA]
    micro = tc.batch_size // tc.grad_accum
    if micro % n_dev:
        raise ValueError(
            f"the micro-batch (batch_size {tc.batch_size} / grad_accum "
            f"{tc.grad_accum} = {micro}) must be divisible by the {n_dev} devices"
        )


def _data(
    cfg: GPTConfig,
    tc: TrainConfig,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    mesh: jax.sharding.Mesh,
) -> tuple[BatchLoader, list]:
    """The training batches' loader and the validation batches, placed on `mesh` (split over
    the devices when their rows divide evenly, else replicated)."""
    check_tokens(train_tokens, cfg, "the training data")
    check_tokens(val_tokens, cfg, "the validation data")
    loader = BatchLoader(
        SlidingWindows(train_tokens, tc.seq_len, tc.window_stride), tc.batch_size, seed=tc.seed
    )
    val_windows = SlidingWindows(val_tokens, tc.seq_len, tc.seq_len)
    if not len(val_windows):
        log(
            f"jaxgpt train: the validation split ({len(val_tokens)} tokens) is shorter than one "
            f"window of {tc.seq_len + 1}; no validation loss"
        )
        return loader, []
    val_bs = min(tc.batch_size, len(val_windows))
    split = val_bs % mesh.shape[sharding.DATA] == 0
    val_sh = sharding.batch_sharding(mesh) if split else sharding.replicated(mesh)
    val_batches = [
        sharding.put_batch(b, val_sh)
        for b in BatchLoader(val_windows, val_bs, shuffle=False).first(tc.eval_iters)
    ]
    return loader, val_batches


def _initial_state(cfg: GPTConfig, tc: TrainConfig, mesh: jax.sharding.Mesh, params: Any | None,
                   candidates: list[Path], loader: BatchLoader
                   ) -> tuple[Callable, Any, int, Path | None, list[str]]:
    """`(train_step, state, tokens_seen, checkpoint, changes)`: the step for `mesh` and the
    state placed with its shardings, fresh (from `params` if given) or restored from the newest
    of `candidates` that restores."""
    train_step, shardings = sharded_train_step(cfg, tc, mesh)
    if not candidates:
        return (train_step, jax.device_put(init_train_state(cfg, tc, params), shardings), 0,
                None, [])
    # Straight into this mesh's shardings: each process reads only its own shards.
    abstract = jax.eval_shape(lambda: init_train_state(cfg, tc))
    abstract = jax.tree_util.tree_map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings
    )
    path, state, tokens_seen, changes = resume_newest(candidates, cfg, tc, abstract, loader)
    return train_step, state, tokens_seen, path, changes


def _check_finite(m: dict, state: Any, step: int, saving: bool, last_good: Path | None,
                  bar: Progress | None) -> None:
    """Raise TrainingDiverged if the step's loss or gradients (or, before a save, the
    parameters) are not finite; the same decision in every process (replicated values)."""
    # Parameters are checked only before they are saved: a full pass over them each step
    # costs more than the check is worth (a bad update shows in the next loss).
    if bool(m["finite"]) and not (saving and not bool(tree_all_finite(state.params))):
        return
    where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint saved"
    msg = (
        f"jaxgpt train: non-finite values at step {step} (loss {float(m['loss'])}, grad norm "
        f"{float(m['grad_norm'])}); stopped. {where}. Try a lower TrainConfig.lr or "
        f"TrainConfig.grad_clip, then resume=True"
    )
    if bar and bar.tty:
        print(file=sys.stderr)  # end the progress line: the caller says what happened
    raise TrainingDiverged(msg)


def _evaluate_into(record: dict, params: Any, cfg: GPTConfig, tc: TrainConfig,
                   eval_step: Callable, val_batches: list, bar: Progress | None) -> None:
    """Add `val_loss`, `val_perplexity` and `sample` to `record`; print them with `bar`."""
    if val_batches:
        val = evaluate(eval_step, params, val_batches)
        record["val_loss"] = val
        record["val_perplexity"] = math.exp(min(val, 700.0))
    sample = sample_text(params, cfg, tc)
    if sample is not None:
        record["sample"] = sample
    if bar:
        val_txt = f"val loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        bar.message(f"step {record['step']}: train loss {record['loss']:.4f} {val_txt}".rstrip())
        if sample is not None:
            bar.message("  sample: " + sample.replace("\n", " "))
