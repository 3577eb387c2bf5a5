"""What a training run shows and records: messages, the progress line, `metrics.jsonl` and the
loss plot."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax


def log(msg: str) -> None:
    """A message on stderr, from process 0 only."""
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """`m:ss` or `h:mm:ss`."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A one-line progress bar on stderr (a plain line every ~5% when stderr is not a terminal):
    step, loss, tokens/s, elapsed time and the estimated time left.

    The estimate is the wall time per step since the first update (which includes compiling),
    evaluations and saves included, times the steps left; `update` may be called every step
    or every few (`jaxgpt sae train` calls it where it logs).
    """

    def __init__(self, total: int, start: int) -> None:
        self.total, self.start = total, start
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 20)
        self.rate: float | None = None
        self.calls = 0
        self.t_start = time.perf_counter()
        self.t_first = self.t_start  # when the first (compiling) update came
        self.step_first = start

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self.calls += 1
        now = time.perf_counter()
        if self.calls > 1:  # the first step includes compilation
            self.rate = tokens_per_s if self.rate is None else 0.9 * self.rate + 0.1 * tokens_per_s
        else:
            self.t_first, self.step_first = now, step
        eta = ""
        if self.calls > 1 and step > self.step_first:
            per_step = (now - self.t_first) / (step - self.step_first)
            eta = f" ETA {clock(per_step * (self.total - step))}"
        width = 24
        filled = int(width * step / self.total)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} "
            f"loss {loss:.4f} " + (f"{self.rate:,.0f} tok/s" if self.rate else "compiling")
            + f" elapsed {clock(now - self.t_start)}{eta}"
        )
        if self.tty:
            print("\r" + line + "\x1b[K", end="", file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total:
            log(line)

    def message(self, msg: str) -> None:
        if self.tty:
            print(file=sys.stderr)
        log(msg)


# What every record of `metrics.jsonl` holds (see `train_loop`).
RECORD_KEYS = ("step", "loss", "tokens_seen")


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not all(k in record for k in RECORD_KEYS):
        return None
    return record if isinstance(record["step"], int) else None


def foreign_metrics_line(path: Path) -> int | None:
    """The first line of the file `path` that is not a record `train_loop` writes (1-based),
    or None when every line is one: a file jaxgpt did not write is never overwritten.

    A last line cut short without its newline is one of ours (a run killed while writing it).
    """
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if line.strip() and _record(line) is None:
            if i == len(lines) and not text.endswith("\n") and line.lstrip().startswith("{"):
                continue
            return i
    return None


def read_metrics(path: Path) -> list[dict]:
    """The records of `metrics.jsonl` (a last line cut short by a killed run is left out)."""
    if not path.exists():
        return []
    records = (_record(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if r is not None]


def plot_losses(records: Sequence[dict], path: str | os.PathLike) -> Path | None:
    """Training and validation loss against tokens seen (the book's chapter-5 plot) as a PNG.

    Returns the path, or None (with a message) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log(
            "jaxgpt train: matplotlib is not installed; skipping the loss plot "
            "(pip install matplotlib)"
        )
        return None
    tokens = [r["tokens_seen"] for r in records]
    evals = [r for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    # Few points: mark each one, or a run of one step draws an empty line.
    marker = "o" if len(records) <= 50 else None
    ax.plot(tokens, [r["loss"] for r in records], marker=marker, markersize=3,
            label="Training loss", alpha=0.8)
    if evals:
        ax.plot(
            [r["tokens_seen"] for r in evals],
            [r["val_loss"] for r in evals],
            linestyle="-.",
            marker="o",
            markersize=3,
            label="Validation loss",
        )
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Loss")
    top = ax.twiny()  # steps along the top, as the book shows epochs beside tokens seen
    top.plot([r["step"] for r in records], [r["loss"] for r in records], alpha=0)
    top.set_xlabel("Step")
    top.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    # The legend goes below the axes, outside them: inside, it can cover the only points.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
