"""Training: configuration, loss, optimizer, the pure step and the loop around it.

- `config`: `TrainConfig`, each field saying how a resumed run treats it.
- `loss`: cross-entropy, plain and chunked; `optim`: AdamW with warmup and cosine decay.
- `step`: `TrainState`, `init_train_state`, `make_train_step` (pure, jitted).
- `evaluation`: validation loss and the sample text of each evaluation.
- `data`: the book's sliding windows over token ids, resumable and seeded.
- `loop`: `train_loop`, the only impure part, and `run_steps`, its loop of steps, which an
  experiment with its own model and data drives; `run_dir`: a run's checkpoints and resume
  rules; `progress`: the progress line, `metrics.jsonl` and the loss plot.
"""

from jaxgpt.training.config import DEMO_CONFIG, TrainConfig
from jaxgpt.training.loop import (
    ResumeWarning,
    TrainingDiverged,
    TrainingInterrupted,
    run_steps,
    train_loop,
)
from jaxgpt.training.loss import cross_entropy_loss, perplexity
from jaxgpt.training.step import TrainState, init_train_state, make_train_step

__all__ = [
    "DEMO_CONFIG",
    "ResumeWarning",
    "TrainConfig",
    "TrainState",
    "TrainingDiverged",
    "TrainingInterrupted",
    "cross_entropy_loss",
    "init_train_state",
    "make_train_step",
    "perplexity",
    "run_steps",
    "train_loop",
]
