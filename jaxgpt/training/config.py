"""`TrainConfig`: a training run's settings, each field saying how a resumed run treats it.

Every field is declared with `setting(default, resume, help, none)`: `resume` is "data" (what the
run reads, in which order: a resumed run must keep it), "optim" (changes the losses from the
resume on: allowed, with a warning that the run is no longer an exact replay) or "loop" (only
when the loop evaluates, samples or saves: allowed, with a warning); `none` says what None
means where a field may be None. The resume checks, the compiled step's cache key and the
command line's flags, defaults and help all read these. `TrainConfig` checks every field when
it is made and raises `ConfigError` naming the field (`TrainConfig.lr`); `jaxgpt train` says
the same of the flag that set it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.nn.model import REMAT_MODES, remat_mode
from jaxgpt.training.tracking import checked_tracking

# `jaxgpt train` with neither --preset nor --config: a small GPT-2-vocabulary model that
# learns visibly on a CPU in minutes (~14M parameters, most of them the embedding and head).
DEMO_CONFIG = GPTConfig(
    vocab_size=50257,
    context_length=128,
    emb_dim=128,
    n_heads=4,
    n_layers=4,
    drop_rate=0.1,
    qkv_bias=False,
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# How a resumed run treats a setting (see the module docstring).
RESUME_KINDS = ("data", "optim", "loop")
# `TrainConfig.loss_chunk=None` on GPUs and TPUs: tokens whose logits exist at once.
AUTO_LOSS_CHUNK = 1024
# `TrainConfig.remat=None` on GPUs and TPUs, where memory limits the batch: recompute the
# attention core rather than keep its [B, H, T, T] arrays (docs/performance.md has the figures).
# The CPU keeps them: memory is seldom the limit there, and its step stays the plain program.
AUTO_REMAT = "attention"


def setting(default: Any, resume: str, help: str, none: str | None = None) -> Any:
    """A `TrainConfig` field: its default, how resume treats it, its one-line help, and what
    None means if it may be None."""
    if resume not in RESUME_KINDS:
        raise ValueError(f"resume must be one of {RESUME_KINDS}, got {resume!r}")
    return dataclasses.field(default=default,
                             metadata={"resume": resume, "help": help, "none": none})


# The experiment trackers' settings, which `TrainConfig` and `SAETrainConfig` share:
# name -> `setting`'s arguments (see `jaxgpt.training.tracking.checked_tracking`).
_TRACKING: dict[str, tuple[Any, str, str, str | None]] = {
    "log": ("", "loop", "also log to these experiment trackers: tensorboard, wandb "
            "(comma-separated)", None),
    "wandb_project": (None, "loop", "the W&B project", "$WANDB_PROJECT, else jaxgpt"),
    "run_name": (None, "loop", "the run's name in W&B and TensorBoard's hyper-parameters",
                 "the output directory's name"),
}


def tracking_setting(name: str) -> Any:
    """A new field for the tracking setting `name` (`_TRACKING`), for each config that has it."""
    default, resume, help, none = _TRACKING[name]
    return setting(default, resume, help, none)


def _fail(name: str, rule: str, *value: Any) -> ConfigError:
    return ConfigError("TrainConfig", name, rule, *value)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run (defaults: the book's AdamW(lr=4e-4, wd=0.1)).

    `lr` is the peak learning rate: linear warmup over `warmup_steps` from `lr / warmup_steps`,
    then cosine decay to `min_lr` at `steps` (`min_lr=None` means `lr / 10`; `min_lr=lr` gives
    the book's constant rate). `batch_size` is the global batch, split into `grad_accum`
    micro-batches. Parameters and optimizer state stay float32 whatever `dtype` computes.
    `loss_chunk` runs the output head and the loss over chunks of that many tokens
    (`training.loss.chunked_cross_entropy_sum`), so the `[B * T, V]` logits never exist at once;
    0 computes them all (the same loss and gradients); None is `AUTO_LOSS_CHUNK` on GPUs and
    TPUs and 0 on the CPU, where the chunks cost time and memory is not what limits a run.
    `remat` is what the backward pass recomputes instead of keeping (`GPTModel.remat`); True
    and False, as older configs hold, mean "block" and "none"; None is `AUTO_REMAT` on GPUs
    and TPUs and "none" on the CPU.
    """

    steps: int = setting(500, "optim", "optimizer updates")
    batch_size: int = setting(8, "data", "sequences per update")
    seq_len: int = setting(256, "data", "tokens per sequence")
    stride: int | None = setting(None, "data", "distance between window starts",
                                 none="seq_len, no overlap")
    lr: float = setting(4e-4, "optim", "peak learning rate")
    min_lr: float | None = setting(
        None, "optim", "learning rate at the end of the cosine decay", none="lr/10")
    warmup_steps: int = setting(0, "optim", "steps of linear warmup")
    weight_decay: float = setting(0.1, "optim", "AdamW decay of weight matrices")
    b1: float = setting(0.9, "optim", "AdamW's first-moment decay")
    b2: float = setting(0.999, "optim", "AdamW's second-moment decay")
    eps: float = setting(1e-8, "optim", "AdamW's epsilon")
    grad_clip: float | None = setting(1.0, "optim", "global-norm gradient clip", none="off")
    grad_accum: int = setting(1, "optim", "micro-batches per update; must divide the batch")
    train_ratio: float = setting(0.9, "data", "fraction of the tokens trained on (the rest: "
                                 "validation)")
    seed: int = setting(123, "data", "seed of the weights, the data order and dropout")
    dtype: str = setting("float32", "optim", "compute dtype; weights and AdamW state stay "
                         "float32")
    remat: bool | str | None = setting(
        None, "optim", "what the backward pass recomputes to save memory: none, attention (the "
        "[B, H, T, T] attention scores, softmax and dropout), block (whole blocks)",
        none="attention on GPU/TPU, none on CPU")
    fsdp: bool = setting(False, "optim", "also shard weights and AdamW moments over the devices")
    loss_chunk: int | None = setting(
        None, "optim", "run the output head and loss over this many tokens at a time, so the "
        "logits of the whole batch never exist at once; 0: all at once",
        none=f"{AUTO_LOSS_CHUNK} on GPU/TPU, 0 on CPU")
    eval_every: int = setting(100, "loop", "validation loss and a sample every N steps")
    eval_iters: int = setting(5, "loop", "validation batches")
    save_every: int = setting(250, "loop", "checkpoint every N steps, and at the end")
    keep: int = setting(3, "loop", "checkpoints kept")
    sample_prompt: str = setting("Every effort moves you", "loop",
                                 "start of the sample generated at each evaluation")
    sample_tokens: int = setting(30, "loop", "tokens of each sample; 0 turns the samples off")
    # Samples are drawn as the book's chapter 5 does (temperature, then top-k), with the key
    # PRNGKey(seed) at every evaluation: the samples differ only as the model does.
    sample_top_k: int = setting(25, "loop", "top-k of the samples")
    sample_temperature: float = setting(1.0, "loop", "temperature of the samples (0: greedy)")
    # Experiment trackers (`jaxgpt.training.tracking`): metrics.jsonl and loss.png are always
    # written; these log the same records beside them.
    log: str = tracking_setting("log")
    wandb_project: str | None = tracking_setting("wandb_project")
    run_name: str | None = tracking_setting("run_name")

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_optimizer()
        if self.remat is not None:
            try:
                mode = remat_mode(self.remat)
            except ValueError:
                raise _fail("remat", f"must be one of {', '.join(map(repr, REMAT_MODES))}, None "
                            f"(auto) or a bool (True = 'block', False = 'none')",
                            self.remat) from None
            object.__setattr__(self, "remat", mode)  # frozen; old configs' bools as modes
        if not _number(self.train_ratio) or not 0 < self.train_ratio < 1:
            raise _fail("train_ratio", "must be in (0, 1)", self.train_ratio)
        if self.dtype not in DTYPES:
            raise _fail("dtype", f"must be one of {sorted(DTYPES)}", self.dtype)
        # frozen: the trackers as one canonical string
        object.__setattr__(self, "log", checked_tracking("TrainConfig", self.log,
                                                          self.wandb_project, self.run_name))
        if not (_number(self.sample_temperature) and self.sample_temperature >= 0
                and math.isfinite(self.sample_temperature)):
            raise _fail("sample_temperature", "must be a finite number >= 0 (0 = greedy)",
                        self.sample_temperature)

    def _check_counts(self) -> None:
        """The int settings: counts >= 1, or >= 0 where 0 means none."""

        def at_least(name: str, minimum: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise _fail(name, f"must be an int >= {minimum}", v)
            if v < minimum:
                raise _fail(name, f"must be >= {minimum}", v)

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_iters",
                     "save_every", "keep"):
            at_least(name, 1)
        for name in ("warmup_steps", "seed", "sample_tokens", "sample_top_k"):
            at_least(name, 0)
        if self.loss_chunk is not None:
            at_least("loss_chunk", 0)
        if self.stride is not None:
            at_least("stride", 1)
        if self.batch_size % self.grad_accum:
            raise _fail("batch_size", f"must be divisible by TrainConfig.grad_accum "
                        f"({self.grad_accum})", self.batch_size)

    def _check_optimizer(self) -> None:
        """The learning-rate schedule and AdamW's settings."""
        if not (_number(self.lr) and 0 < self.lr < math.inf):
            raise _fail("lr", "must be a positive number", self.lr)
        if self.min_lr is not None and not (_number(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise _fail("min_lr", f"must be in [0, TrainConfig.lr = {self.lr}]", self.min_lr)
        if self.warmup_steps > self.steps:
            raise _fail("warmup_steps", f"must be at most TrainConfig.steps ({self.steps})",
                        self.warmup_steps)
        for name in ("weight_decay", "b1", "b2"):
            value = getattr(self, name)
            if not _number(value) or not 0 <= value < 1:
                raise _fail(name, "must be in [0, 1)", value)
        if not (_number(self.eps) and self.eps > 0):
            raise _fail("eps", "must be > 0", self.eps)
        if self.grad_clip is not None and not (_number(self.grad_clip) and self.grad_clip > 0):
            raise _fail("grad_clip", "must be > 0 (None: no clipping)", self.grad_clip)

    def check_model(self, cfg: GPTConfig) -> TrainConfig:
        """This config, if its windows fit the model `cfg`; ConfigError if not."""
        if self.seq_len > cfg.context_length:
            raise _fail("seq_len", f"must be at most the model's context_length "
                        f"{cfg.context_length}", self.seq_len)
        return self

    @property
    def window_stride(self) -> int:
        """The distance between window starts (`stride`, or `seq_len` when None)."""
        return self.stride or self.seq_len

    @property
    def final_lr(self) -> float:
        """The learning rate at the end of the cosine decay."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resume_fields(kind: str) -> tuple[str, ...]:
    """The names of the `TrainConfig` fields a resumed run treats as `kind` (`RESUME_KINDS`)."""
    if kind not in RESUME_KINDS:
        raise ValueError(f"kind must be one of {RESUME_KINDS}, got {kind!r}")
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"] == kind)


def default(name: str) -> Any:
    """The default of the `TrainConfig` field `name`."""
    value: Any = TrainConfig.__dataclass_fields__[name].default
    return value


def resolve_loss_chunk(tc: TrainConfig, platform: str) -> int:
    """`tc.loss_chunk`, with None resolved for devices of `platform` ("cpu", "gpu", "tpu")."""
    if tc.loss_chunk is not None:
        return tc.loss_chunk
    return 0 if platform == "cpu" else AUTO_LOSS_CHUNK


def resolve_remat(remat: bool | str | None, platform: str) -> str:
    """`TrainConfig.remat` (or a saved config's value) as one of `REMAT_MODES`, with None
    resolved for devices of `platform`: "none" on "cpu", `AUTO_REMAT` on any accelerator."""
    if remat is None:
        return "none" if platform == "cpu" else AUTO_REMAT
    return remat_mode(remat)
