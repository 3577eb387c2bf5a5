"""Look for a recipe that forms an induction head quickly: train a small model with jaxgpt's
training loop (`training.loop.run_steps`, the one `jaxgpt train` runs) on windows of
`interp.induction.repeated_runs` (fresh windows every step, no epochs) and print, every
`--every` steps, the loss and each layer's best induction score on repeated random tokens
(halves 5, 8 and 11; 3, 5 and 7 when the context is shorter than 22).

    python scripts/induction_search.py --seq 32 --min-half 4 --max-half 10 --max-gap 4
    python scripts/induction_search.py --copies 4 --emb 128 --heads 2 --steps 8000

An induction head shows as a layer >= 1 score far above the untrained model's (printed
first); a layer-0 head cannot be one (it sees no earlier token's neighbour), so a high layer-0
score is a head attending at a fixed distance. docs/research.md lists what was tried.
`--save FILE` pickles the final params; `--out PREFIX` prints `scripts/induction.py`'s report
(scores trained and untrained, losses, a patching sweep of each head) and draws its pictures.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.interp.induction import induction_scores, repeated_runs, repeated_tokens
from jaxgpt.nn.layers import FeedForward
from jaxgpt.nn.model import GPTModel, init_params
from jaxgpt.training.config import TrainConfig
from jaxgpt.training.loop import run_steps
from jaxgpt.training.step import dropout_key, init_train_state, make_train_step


class NoFeedForward(FeedForward):
    """The feed-forward part replaced by nothing: an attention-only model."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.zeros_like(x)


def layer_best(params: dict, cfg: GPTConfig, probes: list[np.ndarray],
               model: GPTModel | None) -> np.ndarray:
    """Each layer's best head score, averaged over the probes: `[L]`."""
    scores = np.mean([np.asarray(induction_scores(params, cfg, t, model=model))
                      for t in probes], axis=0)
    return scores.max(axis=1)


def batch_of_windows(rng: np.random.Generator, a: argparse.Namespace,
                     stream: np.ndarray) -> np.ndarray:
    """`[B, T + 1]` windows: at random places in `stream` (`--runs`), or back to back from a
    stream drawn for this step (no window is seen twice)."""
    if a.runs:
        starts = rng.integers(0, len(stream) - a.seq - 1, a.batch)
        return np.stack([stream[s:s + a.seq + 1] for s in starts])
    need = a.batch * (a.seq + 1)
    runs = need // (a.copies * a.min_half) + 2  # enough even if every run is the shortest
    fresh = repeated_runs(runs, a.min_half, a.max_half, a.vocab, seed=int(rng.integers(2**31)),
                          copies=a.copies, max_gap=a.max_gap)
    skip = int(rng.integers(0, a.copies * a.min_half))  # the first window starts mid-run
    return fresh[skip:skip + need].reshape(a.batch, a.seq + 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--vocab", type=int, default=64)
    add("--emb", type=int, default=64)
    add("--layers", type=int, default=2)
    add("--heads", type=int, default=4)
    add("--seq", type=int, default=32, help="context length and window")
    add("--batch", type=int, default=32)
    add("--lr", type=float, default=3e-3, help="constant after the warmup")
    add("--warmup", type=int, default=50)
    add("--steps", type=int, default=4000)
    add("--every", type=int, default=500)
    add("--min-half", type=int, default=4)
    add("--max-half", type=int, default=10)
    add("--copies", type=int, default=2)
    add("--max-gap", type=int, default=0)
    add("--runs", type=int, default=0,
        help="draw windows from one stream of this many runs (0: a fresh stream every step)")
    add("--attention-only", action="store_true",
        help="blocks without the feed-forward part (a part that adds nothing)")
    add("--seed", type=int, default=123)
    add("--save", help="pickle the final params here")
    add("--out", help="write scripts/induction.py's report and pictures to this prefix")
    a = p.parse_args()
    try:
        cfg = GPTConfig(vocab_size=a.vocab, context_length=a.seq, emb_dim=a.emb,
                        n_heads=a.heads, n_layers=a.layers, drop_rate=0.0)
        tc = TrainConfig(steps=a.steps, batch_size=a.batch, seq_len=a.seq, lr=a.lr,
                         min_lr=a.lr, warmup_steps=a.warmup, weight_decay=0.0, seed=a.seed)
        stream = repeated_runs(a.runs or 1, a.min_half, a.max_half, a.vocab, seed=a.seed,
                               copies=a.copies, max_gap=a.max_gap)
    except ValueError as e:
        p.error(str(e))
    halves = (5, 8, 11) if a.seq >= 22 else (3, 5, 7)
    probes = [repeated_tokens(32, h, a.vocab, 99 + h) for h in halves]
    model = GPTModel(cfg, feed_forward_cls=NoFeedForward) if a.attention_only else None
    state = init_train_state(cfg, tc, init_params(cfg, a.seed, model=model))
    print(f"untrained: per-layer best "
          f"{np.round(layer_best(state.params, cfg, probes, model), 3)}")
    rng, losses, t0 = np.random.default_rng(a.seed), [], time.time()

    def batches():
        while True:
            windows = batch_of_windows(rng, a, stream)  # [B, T + 1]
            yield jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])

    def report(step: int, state, metrics: dict, seconds: float) -> bool:
        losses.append(float(metrics["loss"]))
        if step % a.every == 0 or step == a.steps:
            best = layer_best(state.params, cfg, probes, model)
            print(f"step {step}: loss {np.mean(losses[-a.every:]):.3f}, per-layer best "
                  f"{np.round(best, 3)} ({time.time() - t0:.0f} s)", flush=True)
        return False

    state = run_steps(make_train_step(cfg, tc, model=model), state, batches(),
                      range(1, a.steps + 1), dropout_key(tc), report)
    if a.save:
        with open(a.save, "wb") as f:
            pickle.dump(jax.device_get(state.params), f)
    if a.out:
        import induction as induction_report  # scripts/induction.py, beside this file

        induction_report.report(state.params, cfg, init_params(cfg, a.seed + 1, model=model),
                                a.out, half=min(12, a.seq // 2), vocab=a.vocab, model=model)


if __name__ == "__main__":
    main()
