"""`train_saes`: SAEs trained on a model's activations, several from one forward pass, with a
run directory as `jaxgpt train` keeps one.

    saes = train_saes(params, cfg, tokens, [SAEConfig("topk", 768, 6144, k=32,
                      hook_name="blocks.6.hook_resid_pre")], SAETrainConfig(), out="sae-run")

The loop around the pure step (`jaxgpt.sae.step`): an `ActivationStore` feeds every SAE from
one run of the model per buffer; `expected_average_only_in`'s scaling factor is estimated first
and folded into the SAE at the end, as sae-lens does; dead features are resampled where
`SAETrainConfig.resample_dead` says (`jaxgpt.sae.step.resample_dead`). With `out`, the run
writes

    out/metrics.jsonl     a record per SAE every `log_every` steps (see `train_saes`)
    out/metrics.png       MSE, L0, explained variance and dead fraction against tokens
    out/checkpoints/step_NNNNNNNN   orbax: the SAEs, Adam's moments, the dead-feature counters,
                          the scaling factors and the store's position (exact resume)
    out/saes/NAME/        each trained SAE as an sae-lens folder (`jaxgpt.sae.formats`)

and SIGINT/SIGTERM stop it after the step in flight with a checkpoint of that step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import sharding
from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.io import checkpoint, files
from jaxgpt.sae.formats import save_sae
from jaxgpt.sae.model import SAE, SAEConfig, fold_activation_norm_scaling_factor
from jaxgpt.sae.step import (
    SAETrainState,
    init_sae_state,
    make_sae_step,
    resample_dead,
)
from jaxgpt.sae.store import ActivationStore, StorePosition, hook_widths
from jaxgpt.sae.train_config import SAETrainConfig, resume_fields
from jaxgpt.training import run_dir
from jaxgpt.training.loop import (
    ResumeWarning,
    StopOnSignal,
    TrainingDiverged,
    TrainingInterrupted,
    check_tokens,
)
from jaxgpt.training.progress import Progress, log, read_metrics
from jaxgpt.training.run_dir import CKPT_PREFIX, list_checkpoints
from jaxgpt.training.step import tree_all_finite
from jaxgpt.training.tracking import (
    TENSORBOARD_DIR,
    WANDB_DIR,
    Tracker,
    check_trackers,
    parse_trackers,
)

RUN_LOCK = "jaxgpt-sae-train.lock"
COMMAND = "jaxgpt sae train"
_RUN_ENTRIES = ("metrics.jsonl", "metrics.png", "checkpoints", "saes", RUN_LOCK,
                TENSORBOARD_DIR, WANDB_DIR)
# The metrics a record holds for every architecture (the loss terms come on top).
RECORD_METRICS = ("loss", "mse_loss", "l0", "explained_variance", "dead_features",
                  "dead_fraction", "lr", "grad_norm", "coefficient")


def sae_names(sae_cfgs: Sequence[SAEConfig]) -> list[str]:
    """A name per SAE for its folder and records: its hook, or where two read one hook,
    `hook.architecture.d_sae` (and `.i` if still the same)."""
    hooks = [str(c.hook_name) for c in sae_cfgs]
    names = [h if hooks.count(h) == 1 else f"{h}.{c.architecture}.{c.d_sae}"
             for h, c in zip(hooks, sae_cfgs, strict=True)]
    return [n if names.count(n) == 1 else f"{n}.{i}" for i, n in enumerate(names)]


def check_sae_configs(cfg: GPTConfig, sae_cfgs: Sequence[SAEConfig]) -> dict[str, int]:
    """ValueError, naming the SAE, unless each reads a hook point of the model (`hook_name`)
    whose width is its `d_in`; the widths of the hooks read."""
    if not sae_cfgs:
        raise ValueError("give at least one SAEConfig to train")
    for i, c in enumerate(sae_cfgs):
        if not isinstance(c, SAEConfig):
            raise TypeError(f"SAE {i} must be an SAEConfig, got {type(c).__name__}")
        if c.hook_name is None:
            raise ValueError(f"SAE {i} ({c.architecture}, d_sae {c.d_sae}) has no hook_name: "
                             f"say which activations it reads")
    widths = hook_widths(cfg, [c.hook_name for c in sae_cfgs if c.hook_name])
    for c in sae_cfgs:
        if c.d_in != widths[str(c.hook_name)]:
            raise ValueError(f"SAEConfig.d_in {c.d_in} does not match {c.hook_name}, whose "
                             f"activations have {widths[str(c.hook_name)]} features per token")
    return widths


def resampled(sae_cfgs: Sequence[SAEConfig], tc: SAETrainConfig) -> list[bool]:
    """Which SAEs get their dead features resampled: all or none as `tc.resample_dead` says;
    by default the standard ones (topk and batchtopk revive theirs by the auxiliary loss)."""
    if tc.resample_dead is None:
        return [c.architecture == "standard" for c in sae_cfgs]
    return [tc.resample_dead] * len(sae_cfgs)


def resample_steps(tc: SAETrainConfig) -> list[int]:
    """The steps after which dead features are resampled: every `feature_sampling_window`,
    while at least `dead_feature_window` steps remain to train what was resampled."""
    w = tc.feature_sampling_window
    return list(range(w, tc.steps - tc.dead_feature_window + 1, w))


@jax.jit
def _norm_sums(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: jnp.linalg.norm(v.astype(jnp.float32), axis=-1).sum() for k, v in batch.items()}


def estimate_scaling_factors(store: ActivationStore, n_batches: int) -> dict[str, float]:
    """sae-lens's `expected_average_only_in` factor of each hook the store reads,
    `sqrt(d_in) / mean |x|` over `n_batches` batches drawn from `store` (which advances)."""
    totals: dict[str, jax.Array] | None = None
    for _ in range(n_batches):
        sums = _norm_sums(store.next_batch())
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    assert totals is not None
    rows = n_batches * store.tc.train_batch_size_tokens
    return {k: math.sqrt(store.widths[k]) / (float(v) / rows) for k, v in totals.items()}


# --- the run directory ---------------------------------------------------------------------

def check_run_dir(out: Path) -> None:
    """FileExistsError unless `out` is new, empty, or holds only what an SAE run writes."""
    run_dir.check_run_dir(out, _RUN_ENTRIES, COMMAND)


def _metadata(cfg: GPTConfig, sae_cfgs: Sequence[SAEConfig], tc: SAETrainConfig,
              names: list[str], step: int) -> dict:
    return {"step": step, "tokens_seen": step * tc.train_batch_size_tokens,
            "sae_train": tc.to_dict(), "names": names,
            "saes": [c.__dict__ for c in sae_cfgs]}


def resume_changes(path: Path, cfg: GPTConfig, sae_cfgs: Sequence[SAEConfig],
                   tc: SAETrainConfig) -> list[str]:
    """What this run changes from the run saved at `path`, a warning line each; ValueError
    if the model, the SAEs or a data setting differ (the saved state would not fit)."""
    if checkpoint.load_config(path) != cfg:
        raise ValueError(f"{path} was trained on another model config; resume with that model")
    meta = checkpoint.load_metadata(path)
    if meta.get("saes") != [c.__dict__ for c in sae_cfgs]:
        raise ValueError(f"{path} holds other SAEs ({len(meta.get('saes', []))}: "
                         f"{', '.join(meta.get('names', []))}); resume with the same SAE configs")
    saved = meta.get("sae_train", {})
    for name in resume_fields("data"):
        if saved.get(name) != getattr(tc, name):
            raise ConfigError("SAETrainConfig", name, f"must stay {saved.get(name)!r} to "
                              f"resume {path}: the activations' order follows it",
                              getattr(tc, name))
    if tc.steps <= int(meta["step"]):
        raise ConfigError("SAETrainConfig", "training_tokens", f"must give more than "
                          f"{meta['step']} steps to extend the run saved at {path}",
                          tc.training_tokens)
    why = {n: "the run is no longer an exact replay of an uninterrupted one"
           for n in resume_fields("optim")}
    return [f"SAETrainConfig.{n} changed from {saved[n]!r} to {getattr(tc, n)!r}: "
            f"{why.get(n, 'changes only when the loop logs or saves')}"
            for n in resume_fields("optim") + resume_fields("loop")
            if n in saved and saved[n] != getattr(tc, n)]


def _trees(state: SAETrainState, position: StorePosition) -> tuple[dict, dict]:
    """`(params, extra)` as a checkpoint holds them: by SAE index (`sae0`, ...)."""
    keys = [f"sae{i}" for i in range(len(state.saes))]
    params = {k: {"params": s.params, **({"state": s.state} if s.state else {})}
              for k, s in zip(keys, state.saes, strict=True)}
    extra = {"step": state.step, "position": position.to_array(),
             "opt": dict(zip(keys, state.opt_states, strict=True)),
             "since_fired": dict(zip(keys, state.since_fired, strict=True)),
             "scaling": dict(zip(keys, state.scaling, strict=True))}
    return params, extra


def _from_trees(like: SAETrainState, params: dict, extra: dict) -> tuple[SAETrainState,
                                                                          StorePosition]:
    saes = [s.replace(params=params[f"sae{i}"]["params"],
                      state=params[f"sae{i}"].get("state", {})) for i, s in enumerate(like.saes)]
    n = range(len(saes))
    state = SAETrainState(step=jnp.asarray(extra["step"], jnp.int32), saes=tuple(saes),
                          opt_states=tuple(extra["opt"][f"sae{i}"] for i in n),
                          since_fired=tuple(extra["since_fired"][f"sae{i}"] for i in n),
                          scaling=tuple(extra["scaling"][f"sae{i}"] for i in n))
    return state, StorePosition.from_array(extra["position"])


def save_checkpoint(out: Path, cfg: GPTConfig, sae_cfgs: Sequence[SAEConfig],
                    tc: SAETrainConfig, names: list[str], state: SAETrainState,
                    position: StorePosition) -> Path:
    """Write `out/checkpoints/step_NNNNNNNN` (atomic), then delete all but the newest
    `tc.keep` (only complete jaxgpt checkpoints holding nothing else)."""
    step = int(state.step)
    ckpt_dir = out / "checkpoints"
    path = ckpt_dir / f"{CKPT_PREFIX}{step:08d}"
    files.remove_stale_temporaries(ckpt_dir)
    params, extra = _trees(state, position)
    checkpoint.save(path, params, cfg, extra=extra,
                    metadata=_metadata(cfg, sae_cfgs, tc, names, step), overwrite=True)
    for old in list_checkpoints(ckpt_dir)[:-tc.keep]:
        if old != path and not files.foreign_entries(old):
            shutil.rmtree(old, ignore_errors=True)
    return path


def restore_checkpoint(path: Path, like: SAETrainState) -> tuple[SAETrainState, StorePosition]:
    """The state and store position saved at `path`, placed as `like`'s leaves are."""
    params, extra = _trees(like, StorePosition())
    shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        if isinstance(x, jax.Array) else x, (params, extra))
    got_params = checkpoint.restore_extra(path, shapes[0], part="params")
    got_extra = checkpoint.restore_extra(path, shapes[1])
    return _from_trees(like, got_params, got_extra)


# --- the loop ------------------------------------------------------------------------------

@dataclass
class _Run:
    """A run in progress: settings, data, compiled step, state, and where it writes."""

    cfg: GPTConfig
    sae_cfgs: list[SAEConfig]
    tc: SAETrainConfig
    names: list[str]
    out: Path | None
    mesh: jax.sharding.Mesh
    store: ActivationStore
    step: Callable
    state: SAETrainState
    resample: list[bool]
    last_good: Path | None = None

    def save(self) -> None:
        if self.out is None:
            return
        if not bool(tree_all_finite([s.params for s in self.state.saes])):
            raise TrainingDiverged(f"jaxgpt sae train: non-finite SAE weights at step "
                                   f"{int(self.state.step)}; not saved. Last good checkpoint: "
                                   f"{self.last_good}")
        self.last_good = save_checkpoint(self.out, self.cfg, self.sae_cfgs, self.tc, self.names,
                                         self.state, self.store.position)


def train_saes(params: Any, cfg: GPTConfig, tokens: np.ndarray,
               sae_cfgs: Sequence[SAEConfig], tc: SAETrainConfig,
               out: str | os.PathLike | None = None, *, resume: bool = False,
               saes: Sequence[SAE] | None = None, devices: Sequence[jax.Device] | None = None,
               progress: bool = True,
               on_log: Callable[[list[dict]], None] | None = None) -> list[SAE]:
    """Train an SAE of each config of `sae_cfgs` on the model's activations at its
    `hook_name` over `tokens`, all from one forward pass per buffer; the trained SAEs.

    Args:
      params, cfg: the model.
      tokens: ids `[N]` (a memory map is fine).
      sae_cfgs: the SAEs (`d_in` must be the hook's width; several may read one hook).
      tc: the run's settings (`tc.steps` updates of `tc.train_batch_size_tokens` rows).
      out: the run directory (new, empty, or an earlier run's with `resume`); None writes
        nothing.
      resume: continue from the newest checkpoint in `out`, bit for bit as the uninterrupted
        run (a changed optimisation setting is a ResumeWarning; changed SAEs, model or data
        settings a ValueError).
      saes: start from these SAEs instead of new ones (as `init_sae_state`).
      devices: split every batch's rows over these devices (a `data` mesh; default all).
      on_log: called with each logged step's records.

    Returns:
      The SAEs after `tc.steps` updates, in training form, with an `expected_average_only_in`
      factor folded in (`jaxgpt.sae.model.to_inference` gives what `out/saes/` holds).

    Each record of `metrics.jsonl` holds `step`, `sae` (its name), `tokens_seen`,
    `tokens_per_s`, and of that step's batch `loss`, its terms (`mse_loss`, `l1_loss`,
    `auxiliary_reconstruction_loss`, `l0_loss`, `pre_act_loss`), `l0`, `explained_variance`,
    `dead_features`, `dead_fraction`, `lr`, `grad_norm`, `coefficient`, and `resampled` at a
    step that resampled. Raises TrainingInterrupted (after saving) on SIGINT/SIGTERM,
    TrainingDiverged on a non-finite loss, and ValueError, ConfigError or FileExistsError for
    settings or a directory that cannot work, before anything is computed.
    """
    with contextlib.ExitStack() as lock:
        run = _open(params, cfg, tokens, list(sae_cfgs), tc, out, resume, saes, devices, lock)
        _loop(run, progress, on_log)
        return _finish(run)


def _open(params: Any, cfg: GPTConfig, tokens: np.ndarray, sae_cfgs: list[SAEConfig],
          tc: SAETrainConfig, out: str | os.PathLike | None, resume: bool,
          saes: Sequence[SAE] | None, devices: Sequence[jax.Device] | None,
          lock: contextlib.ExitStack) -> _Run:
    """Everything checked, the directory locked, the store and state made or restored."""
    if jax.process_count() > 1:
        raise ValueError("train_saes runs in one process (over all of its devices)")
    check_sae_configs(cfg, sae_cfgs)
    names = sae_names(sae_cfgs)
    mesh = sharding.make_mesh(devices)
    n_dev = mesh.shape[sharding.DATA]
    if tc.train_batch_size_tokens % n_dev:
        raise ConfigError("SAETrainConfig", "train_batch_size_tokens", f"must be divisible by "
                          f"the {n_dev} devices", tc.train_batch_size_tokens)
    check_tokens(np.asarray(tokens) if isinstance(tokens, list) else tokens, cfg, "the tokens")
    out_dir = Path(out) if out is not None else None
    candidates = _prepare(out_dir, cfg, sae_cfgs, tc, resume)
    params = jax.device_put(params, sharding.replicated(mesh))
    hooks = list(dict.fromkeys(str(c.hook_name) for c in sae_cfgs))
    store = ActivationStore(params, cfg, tokens, hooks, tc, mesh=mesh)  # checks, computes nothing
    if out_dir is not None:  # nothing is written before this
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.enter_context(files.exclusive_lock(out_dir / RUN_LOCK))
        except files.LockHeld as e:
            raise FileExistsError(f"{out_dir} is in use by another jaxgpt sae train (process "
                                  f"{e.pid})") from None
    rep = sharding.replicated(mesh)
    if candidates:
        like = jax.device_put(init_sae_state(sae_cfgs, tc, saes), rep)
        path, state, store.position = _restore_newest(candidates, like)
        candidates = [path]
        log(f"jaxgpt sae train: resumed from {path} (step {int(state.step)})")
    else:
        scaling = _scaling(params, cfg, tokens, hooks, sae_cfgs, tc, mesh)
        state = jax.device_put(init_sae_state(sae_cfgs, tc, saes, scaling), rep)
    run = _Run(cfg, sae_cfgs, tc, names, out_dir, mesh, store, make_sae_step(tc, mesh), state,
               resampled(sae_cfgs, tc), candidates[0] if candidates else None)
    if out_dir is not None:
        start = int(state.step)
        kept = [r for r in read_metrics(out_dir / "metrics.jsonl") if r["step"] <= start]
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    log(f"jaxgpt sae train: {len(sae_cfgs)} SAE(s) on {', '.join(hooks)}; "
        f"{sharding.describe(mesh, False)}; {store.num_windows:,} windows of "
        f"{tc.context_size} tokens, {tc.steps:,} steps of {tc.train_batch_size_tokens:,} "
        f"tokens")
    return run


def _restore_newest(candidates: list[Path], like: SAETrainState
                    ) -> tuple[Path, SAETrainState, StorePosition]:
    """The newest of `candidates` that restores; a damaged one is passed over with a
    ResumeWarning naming it, CheckpointError if none restores."""
    path, (state, position), skipped = checkpoint.restore_newest(
        candidates, lambda p: restore_checkpoint(p, like))
    for _, error in skipped:
        warnings.warn(f"{error}; trying the checkpoint before it", ResumeWarning, stacklevel=5)
    return path, state, position


def _prepare(out: Path | None, cfg: GPTConfig, sae_cfgs: list[SAEConfig], tc: SAETrainConfig,
             resume: bool) -> list[Path]:
    """The checkpoints to resume from, newest first (none for a new run); the directory and
    the resume request checked, nothing written. Warnings for the changed settings."""
    check_trackers(parse_trackers(tc.log), out)
    if out is None:
        if resume:
            raise ValueError("resume needs the run directory (out)")
        return []
    check_run_dir(out)
    existing = list_checkpoints(out / "checkpoints")
    if existing and not resume:
        raise FileExistsError(f"{out} already holds checkpoints (newest {existing[-1].name}); "
                              f"pass resume=True or choose another output directory")
    if resume and not existing:
        raise FileNotFoundError(f"nothing to resume: {out / 'checkpoints'} holds no complete "
                                f"checkpoint")
    if existing:
        for change in resume_changes(existing[-1], cfg, sae_cfgs, tc):
            warnings.warn(change, ResumeWarning, stacklevel=4)
    return existing[::-1]


def _scaling(params: Any, cfg: GPTConfig, tokens: np.ndarray, hooks: list[str],
             sae_cfgs: list[SAEConfig], tc: SAETrainConfig,
             mesh: jax.sharding.Mesh) -> list[float]:
    """Each SAE's input factor: estimated over a pass of its own (from the data's start) for
    `expected_average_only_in`, 1 otherwise."""
    need = [str(c.hook_name) for c in sae_cfgs
            if c.normalize_activations == "expected_average_only_in"]
    if not need:
        return [1.0] * len(sae_cfgs)
    log(f"jaxgpt sae train: estimating the activations' mean norm over "
        f"{tc.n_batches_for_norm_estimate} batches")
    store = ActivationStore(params, cfg, tokens, sorted(set(need)), tc, mesh=mesh)
    factors = estimate_scaling_factors(store, tc.n_batches_for_norm_estimate)
    return [factors[str(c.hook_name)] if c.normalize_activations == "expected_average_only_in"
            else 1.0 for c in sae_cfgs]


def _loop(run: _Run, progress: bool, on_log: Callable[[list[dict]], None] | None) -> None:
    """The steps from the state's on: log, resample, save; stop on a signal."""
    tc = run.tc
    start = int(run.state.step)
    bar = Progress(tc.steps, start) if progress else None
    when = set(resample_steps(tc)) if any(run.resample) else set()
    metrics_file = (open(run.out / "metrics.jsonl", "a") if run.out is not None
                    else contextlib.nullcontext())
    t_last, step_last = time.perf_counter(), start
    with (
        StopOnSignal(COMMAND) as stop,
        metrics_file as log_file,
        _open_tracker(run, start) as tracker,
    ):
        for done in range(start + 1, tc.steps + 1):
            run.state, m = run.step(run.state, run.store.next_batch())
            counts = _resample(run, done) if done in when else None
            signum = stop.signum
            saving = done % tc.save_every == 0 or done == tc.steps or signum is not None
            if done % tc.log_every == 0 or saving or counts is not None:
                now = time.perf_counter()
                speed = (done - step_last) * tc.train_batch_size_tokens / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                records = _records(run, done, jax.device_get(m), speed, counts)
                if log_file is not None:
                    log_file.write("".join(json.dumps(r) + "\n" for r in records))
                    log_file.flush()
                tracker.log(done, {f"{r['sae']}/{k}": v for r in records for k, v in r.items()
                                   if k not in ("step", "sae")})
                if bar:
                    bar.update(done, float(np.mean([r["loss"] for r in records])), speed)
                if on_log is not None:
                    on_log(records)
            if saving:
                run.save()
                tracker.flush()
            if signum is not None:
                raise TrainingInterrupted(signum, done, run.last_good)
    if bar and bar.tty:
        print(file=sys.stderr)


def _open_tracker(run: _Run, start: int) -> Tracker:
    """The run's experiment trackers (`tc.log`), continuing from step `start`."""
    if run.out is None:
        return Tracker([], COMMAND)
    configs = {name: dict(c.__dict__) for name, c in zip(run.names, run.sae_cfgs, strict=True)}
    return Tracker.open(parse_trackers(run.tc.log), run.out, start=start,
                        config={"model": run.cfg.to_dict(), "sae_train": run.tc.to_dict(),
                                "saes": configs},
                        parameters=sum(int(np.size(v)) for sae in run.state.saes
                                       for v in sae.params.values()),
                        project=run.tc.wandb_project, run_name=run.tc.run_name,
                        command=COMMAND)


def _resample(run: _Run, done: int) -> list[int]:
    """Resample the dead features of the SAEs that resample, from the store's current
    buffer; how many each had."""
    rows = run.store.buffer_rows()
    state, counts = run.state, []
    saes, opts, since = list(state.saes), list(state.opt_states), list(state.since_fired)
    base = jax.random.fold_in(jax.random.key(run.tc.seed), 1 << 20)
    for i, sae in enumerate(state.saes):
        if not run.resample[i]:
            counts.append(0)
            continue
        key = jax.random.fold_in(jax.random.fold_in(base, done), i)
        x = rows[str(sae.cfg.hook_name)]
        saes[i], opts[i], since[i], n = resample_dead(
            sae, opts[i], since[i], x, state.scaling[i], key, run.tc)
        counts.append(int(n))
    run.state = state.replace(saes=tuple(saes), opt_states=tuple(opts), since_fired=tuple(since))
    return counts


def _records(run: _Run, done: int, m: Sequence[dict], speed: float,
             counts: list[int] | None) -> list[dict]:
    """The records of step `done` (one per SAE); TrainingDiverged if a loss is not finite."""
    records = []
    for i, name in enumerate(run.names):
        values = {k: float(v) if np.ndim(v) == 0 and not isinstance(v, (int, np.integer))
                  else v for k, v in m[i].items()}
        if not math.isfinite(values["loss"]):
            raise TrainingDiverged(f"jaxgpt sae train: the loss of {name} is {values['loss']} "
                                   f"at step {done}; stopped. Last good checkpoint: "
                                   f"{run.last_good}. Try a lower SAETrainConfig.lr")
        record = {"step": done, "sae": name,
                  "tokens_seen": done * run.tc.train_batch_size_tokens,
                  "tokens_per_s": speed,
                  **{k: (int(v) if k == "dead_features" else float(v)) for k, v in values.items()}}
        if counts is not None:
            record["resampled"] = counts[i]
        records.append(record)
    return records


def _finish(run: _Run) -> list[SAE]:
    """The trained SAEs (scaling folded in), saved under `out/saes/`, and the plot."""
    out = []
    for i, sae in enumerate(run.state.saes):
        factor = float(run.state.scaling[i])
        if sae.cfg.normalize_activations == "expected_average_only_in":
            sae = fold_activation_norm_scaling_factor(sae, factor)
        out.append(jax.device_get(sae))
    if run.out is not None:
        for name, sae in zip(run.names, out, strict=True):
            meta = {"context_size": run.tc.context_size, "prepend_bos": False}
            save_sae(sae, run.out / "saes" / name, metadata=meta, overwrite=True)
        png = plot_sae_metrics(read_metrics(run.out / "metrics.jsonl"), run.out / "metrics.png")
        log(f"jaxgpt sae train: SAEs in {run.out / 'saes'}" + (f", plot {png}" if png else ""))
    return out


def plot_sae_metrics(records: Sequence[dict], path: str | os.PathLike) -> Path | None:
    """MSE, L0, explained variance and dead fraction against tokens seen, a line per SAE, as
    a PNG; None (with a message) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("jaxgpt sae train: matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    panels = ("mse_loss", "l0", "explained_variance", "dead_fraction")
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    names = list(dict.fromkeys(r["sae"] for r in records))
    for ax, key in zip(axes.flat, panels, strict=True):
        for name in names:
            rs = [r for r in records if r["sae"] == name and key in r]
            marker = "o" if len(rs) <= 50 else None
            ax.plot([r["tokens_seen"] for r in rs], [r[key] for r in rs], marker=marker,
                    markersize=3, label=name)
        ax.set_title(key)
        ax.set_xlabel("Tokens seen")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
