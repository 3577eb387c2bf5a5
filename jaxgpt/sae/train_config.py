"""`SAETrainConfig`: the settings of an SAE training run, with sae-lens 6.54.12's names and
defaults (its `LanguageModelSAERunnerConfig`), each field saying how a resumed run treats it.

Fields are declared with `jaxgpt.training.config.setting` as `TrainConfig`'s are: `resume` is
"data" (what the run reads and in which order: a resumed run must keep it), "optim" (changes
the updates from the resume on: allowed, with a ResumeWarning) or "loop" (when the loop logs or
saves). `jaxgpt sae train` takes its flags, defaults and help from these fields.

The schedules are sae-lens's, as functions of the 0-based step:

- the learning rate (`lr_at`): linear warm-up `lr * (step + 1) / lr_warm_up_steps`, then the
  main schedule (constant; cosine annealing to `lr_end`; or cosine annealing restarted
  `n_restart_cycles` times), then a linear decay over the last `lr_decay_steps` steps from
  `lr_end` (the constant schedule: from `lr`) to 0;
- a sparsity coefficient (`coefficient_at`): `value * min(step / warm_up_steps, 1)`, 0 at the
  first step of a warm-up.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxgpt.config import ConfigError
from jaxgpt.training.config import RESUME_KINDS, setting, tracking_setting
from jaxgpt.training.tracking import checked_tracking

LR_SCHEDULERS = ("constant", "cosineannealing", "cosineannealingwarmrestarts")
DTYPES = ("float32", "bfloat16")


def _fail(name: str, rule: str, *value: Any) -> ConfigError:
    return ConfigError("SAETrainConfig", name, rule, *value)


@dataclass(frozen=True)
class SAETrainConfig:
    """How SAEs are trained on a model's activations (sae-lens's defaults). Frozen, hashable.

    The run is `steps = training_tokens // train_batch_size_tokens` Adam updates of every SAE,
    each on the activations of `train_batch_size_tokens` tokens drawn from a buffer of
    `n_batches_in_buffer` batches (`jaxgpt.sae.store.ActivationStore`).
    """

    training_tokens: int = setting(2_000_000, "optim", "tokens trained on (steps = "
                                   "training_tokens // train_batch_size_tokens)")
    train_batch_size_tokens: int = setting(4096, "data", "activations (tokens) per update")
    context_size: int = setting(128, "data", "tokens per context window the model reads")
    n_batches_in_buffer: int = setting(20, "data", "batches of activations shuffled together "
                                       "on the device")
    store_batch_size_prompts: int = setting(32, "data", "context windows per forward pass of "
                                            "the model")
    seed: int = setting(42, "data", "seed of the data order, the SAEs' init and resampling")
    n_batches_for_norm_estimate: int = setting(
        1000, "data", "batches whose mean activation norm sets expected_average_only_in's "
        "scaling factor")
    dtype: str = setting("float32", "optim", "the model's compute dtype while reading "
                         "activations")
    lr: float = setting(3e-4, "optim", "Adam's learning rate")
    lr_scheduler_name: str = setting("constant", "optim", "the learning-rate schedule between "
                                     "warm-up and decay: " + ", ".join(LR_SCHEDULERS))
    lr_warm_up_steps: int = setting(0, "optim", "steps of linear learning-rate warm-up")
    lr_decay_steps: int = setting(0, "optim", "last steps, where the rate decays linearly to 0")
    lr_end: float | None = setting(None, "optim", "the rate the cosine schedules end at, and "
                                   "where their decay starts", none="lr / 10")
    n_restart_cycles: int = setting(1, "optim", "cycles of cosineannealingwarmrestarts")
    adam_beta1: float = setting(0.9, "optim", "Adam's first-moment decay")
    adam_beta2: float = setting(0.999, "optim", "Adam's second-moment decay")
    # sae-lens clips each SAE's gradient to global norm 1 (torch's clip_grad_norm_).
    grad_clip: float | None = setting(1.0, "optim", "each SAE's global-norm gradient clip",
                                      none="off")
    dead_feature_window: int = setting(1000, "optim", "a feature that has not fired for more "
                                       "than this many steps is dead")
    feature_sampling_window: int = setting(2000, "optim", "steps between resamplings of the "
                                           "dead features")
    resample_dead: bool | None = setting(
        None, "optim", "resample dead features (Anthropic 2023) every feature_sampling_window "
        "steps", none="on for standard SAEs, off for topk/batchtopk (their auxiliary loss "
        "revives them) and jumprelu")
    log_every: int = setting(10, "loop", "a metrics record every N steps")
    save_every: int = setting(1000, "loop", "a checkpoint every N steps, and at the end")
    keep: int = setting(3, "loop", "checkpoints kept")
    # Experiment trackers, as `TrainConfig`'s (`jaxgpt.training.tracking`).
    log: str = tracking_setting("log")
    wandb_project: str | None = tracking_setting("wandb_project")
    run_name: str | None = tracking_setting("run_name")

    def __post_init__(self) -> None:
        for name in ("training_tokens", "train_batch_size_tokens", "context_size",
                     "n_batches_in_buffer", "store_batch_size_prompts",
                     "n_batches_for_norm_estimate", "n_restart_cycles", "dead_feature_window",
                     "feature_sampling_window", "log_every", "save_every", "keep"):
            _at_least(self, name, 1)
        for name in ("seed", "lr_warm_up_steps", "lr_decay_steps"):
            _at_least(self, name, 0)
        if self.training_tokens < self.train_batch_size_tokens:
            raise _fail("training_tokens", f"must be at least one batch (SAETrainConfig."
                        f"train_batch_size_tokens = {self.train_batch_size_tokens})",
                        self.training_tokens)
        if self.dtype not in DTYPES:
            raise _fail("dtype", f"must be one of {', '.join(DTYPES)}", self.dtype)
        # frozen: the trackers as one canonical string
        object.__setattr__(self, "log", checked_tracking("SAETrainConfig", self.log,
                                                          self.wandb_project, self.run_name))
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        if not (_number(self.lr) and 0 < self.lr < math.inf):
            raise _fail("lr", "must be a positive number", self.lr)
        if self.lr_scheduler_name not in LR_SCHEDULERS:
            raise _fail("lr_scheduler_name", f"must be one of {', '.join(LR_SCHEDULERS)}",
                        self.lr_scheduler_name)
        if self.lr_end is not None and not (_number(self.lr_end) and 0 <= self.lr_end
                                            <= self.lr):
            raise _fail("lr_end", f"must be in [0, SAETrainConfig.lr = {self.lr}]", self.lr_end)
        if self.lr_warm_up_steps + self.lr_decay_steps > self.steps:
            raise _fail("lr_warm_up_steps", f"plus SAETrainConfig.lr_decay_steps "
                        f"({self.lr_decay_steps}) must be at most the run's {self.steps} steps",
                        self.lr_warm_up_steps)
        if self.lr_decay_steps and self.final_lr == 0:
            raise _fail("lr_decay_steps", "needs SAETrainConfig.lr_end > 0 (a decay from 0 to "
                        "0 does nothing)", self.lr_decay_steps)
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not _number(value) or not 0 <= value < 1:
                raise _fail(name, "must be in [0, 1)", value)
        if self.grad_clip is not None and not (_number(self.grad_clip) and self.grad_clip > 0):
            raise _fail("grad_clip", "must be > 0 (None: no clipping)", self.grad_clip)
        if self.resample_dead is not None and not isinstance(self.resample_dead, bool):
            raise _fail("resample_dead", "must be True, False or None (auto)",
                        self.resample_dead)

    @property
    def steps(self) -> int:
        """The run's updates: `training_tokens // train_batch_size_tokens`."""
        return self.training_tokens // self.train_batch_size_tokens

    @property
    def final_lr(self) -> float:
        """`lr_end`, or sae-lens's default `lr / 10`."""
        return self.lr / 10 if self.lr_end is None else self.lr_end

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SAETrainConfig:
        return dataclasses.replace(self, **changes)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _at_least(tc: SAETrainConfig, name: str, minimum: int) -> None:
    value = getattr(tc, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, f"must be an int >= {minimum}", value)
    if value < minimum:
        raise _fail(name, f"must be >= {minimum}", value)


def resume_fields(kind: str) -> tuple[str, ...]:
    """The `SAETrainConfig` fields a resumed run treats as `kind` (`RESUME_KINDS`)."""
    if kind not in RESUME_KINDS:
        raise ValueError(f"kind must be one of {RESUME_KINDS}, got {kind!r}")
    return tuple(f.name for f in dataclasses.fields(SAETrainConfig)
                 if f.metadata["resume"] == kind)


def default(name: str) -> Any:
    """The default of the `SAETrainConfig` field `name`."""
    value: Any = SAETrainConfig.__dataclass_fields__[name].default
    return value


def lr_at(tc: SAETrainConfig, step: jax.Array | int) -> jax.Array:
    """The learning rate of update `step` (0-based), as sae-lens's `get_lr_scheduler` gives it
    (torch's LinearLR warm-up, the main schedule, LinearLR decay, chained by SequentialLR)."""
    s = jnp.asarray(step, jnp.float32)
    lr, end = float(tc.lr), float(tc.final_lr)
    warm, decay = tc.lr_warm_up_steps, tc.lr_decay_steps
    main_steps = max(tc.steps - warm - decay, 1)
    i = s - warm
    if tc.lr_scheduler_name == "constant":
        main = jnp.full((), lr, jnp.float32)
        decay_from = lr  # sae-lens: the constant schedule decays from lr, not lr_end
    else:
        period = main_steps if tc.lr_scheduler_name == "cosineannealing" else max(
            main_steps // tc.n_restart_cycles, 1)
        phase = i if tc.lr_scheduler_name == "cosineannealing" else jnp.mod(i, period)
        main = end + (lr - end) * (1 + jnp.cos(jnp.pi * phase / period)) / 2
        decay_from = end
    out = main
    if decay:
        start = tc.steps - decay
        out = jnp.where(s >= start, decay_from * (1 - jnp.clip(s - start, 0, decay) / decay),
                        out)
    if warm:
        out = jnp.where(s < warm, lr * (s + 1) / warm, out)
    return out


def coefficient_at(value: float, warm_up_steps: int, step: jax.Array | int) -> jax.Array:
    """A sparsity coefficient at update `step` (0-based): sae-lens's `CoefficientScheduler`,
    `value * min(step / warm_up_steps, 1)` (the full value without a warm-up)."""
    if warm_up_steps <= 0:
        return jnp.full((), value, jnp.float32)
    s = jnp.asarray(step, jnp.float32)
    return value * jnp.minimum(s / warm_up_steps, 1.0)
