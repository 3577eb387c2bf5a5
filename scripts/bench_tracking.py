"""What logging to TensorBoard and W&B costs a training run: the same short `jaxgpt train` run
with each `--log` setting, alternated, in one process.

    python scripts/bench_tracking.py [--steps 60] [--rounds 3]

Each run is `train_loop` on the demo corpus with the demo config (the run `jaxgpt train` makes
with no flags, ~14M parameters; batch 8 of 128 tokens), into a new directory, W&B offline
(`WANDB_MODE=offline`: no network). The settings alternate within each round (the first one
swaps each round); the step is compiled once, before the timed runs (it is the same program
whatever `log` says). Per run:

- per step: the median time between two steps' ends (`on_step`), evaluation steps left out:
  the training step and everything the loop does after it (metrics.jsonl, the trackers);
- start and end: the call's wall time less the steps' (opening the run directory and the
  trackers, W&B's service included; the last checkpoint; closing the trackers).

Prints a table: median over the rounds (and the range) of each, and the difference from no
tracker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTINGS = ("", "tensorboard", "wandb", "tensorboard,wandb")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    import jax

    from jaxgpt.training import data
    from jaxgpt.training.config import DEMO_CONFIG, TrainConfig
    from jaxgpt.training.loop import train_loop
    from jaxgpt.training.tracking import Tracker

    tokens = data.tokenize_text(data.demo_corpus())
    train, val = data.train_val_split(tokens, 0.9)
    eval_every = 20
    tc = TrainConfig(steps=args.steps, batch_size=8, seq_len=128, eval_every=eval_every,
                     save_every=args.steps, eval_iters=2)
    results: dict[str, list[tuple[float, float, float]]] = {s: [] for s in SETTINGS}

    # The time spent inside the trackers' per-step calls, measured directly: the A/B of the
    # step times cannot resolve a cost far below the step's own spread.
    inside = [0.0]

    def timed(method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Tracker, *a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return method(self, *a, **kw)
            finally:
                inside[0] += time.perf_counter() - t
        return wrapper

    Tracker.log = timed(Tracker.log)  # type: ignore[method-assign]
    Tracker.flush = timed(Tracker.flush)  # type: ignore[method-assign]

    def run(log: str, root: Path) -> tuple[float, float, float]:
        ends: list[tuple[int, float]] = []
        inside[0] = 0.0
        t0 = time.perf_counter()
        train_loop(DEMO_CONFIG, tc.replace(log=log), train, val, root / (log or "none"),
                   progress=False, on_step=lambda step, _: ends.append((step,
                                                                        time.perf_counter())))
        total = time.perf_counter() - t0
        gaps = [b - a for (_, a), (s, b) in zip(ends, ends[1:], strict=False)
                if s % eval_every and (s - 1) % eval_every]  # not next to an evaluation
        steps_time = ends[-1][1] - ends[0][1]
        return statistics.median(gaps), total - steps_time, inside[0] / len(ends)

    with tempfile.TemporaryDirectory() as tmp:
        run("", Path(tmp) / "warm-up")  # compiles the step (and the evaluation's)
        order = list(SETTINGS)
        for r in range(args.rounds):
            for log in order:
                results[log].append(run(log, Path(tmp) / f"round{r}"))
                step_s, fixed, own = results[log][-1]
                print(f"round {r + 1}, --log {log or 'none'}: {step_s * 1e3:.1f} ms a step "
                      f"({own * 1e3:.3f} in the trackers), {fixed:.2f} s start and end",
                      flush=True)
            order.reverse()

    base = statistics.median(x[0] for x in results[""])
    base_fixed = statistics.median(x[1] for x in results[""])
    print(f"\n{jax.devices()[0].device_kind}, {os.cpu_count()} cores; {args.steps} steps of "
          f"{tc.batch_size} x {tc.seq_len} tokens, evaluating every {eval_every}; "
          f"{args.rounds} rounds, median (range)\n")
    print("| --log | ms a step | difference | in the trackers, ms a step | start and end, s | "
          "difference, s |")
    print("|---|---:|---:|---:|---:|---:|")
    for log in SETTINGS:
        steps = [x[0] * 1e3 for x in results[log]]
        fixed = [x[1] for x in results[log]]
        own = [x[2] * 1e3 for x in results[log]]
        s_med, f_med = statistics.median(steps), statistics.median(fixed)
        print(f"| {log or 'none'} | {s_med:.1f} ({min(steps):.1f}-{max(steps):.1f}) | "
              f"{s_med - base * 1e3:+.1f} | {statistics.median(own):.3f} "
              f"({min(own):.3f}-{max(own):.3f}) | {f_med:.2f} ({min(fixed):.2f}-{max(fixed):.2f})"
              f" | {f_med - base_fixed:+.2f} |")


if __name__ == "__main__":
    main()
