"""The layout lab: timing the decoding matrices' layouts on this machine, for the scripts.

The package decodes with a fixed rule per backend (`jaxgpt.nn.layout.Layout.for_batch`); the
figures it rests on (docs/performance.md, "CPU matrix layouts") come from here:

- `matmul_timer` and `measure`: each matrix of a model (fused Q/K/V, the attention's output
  projection, the two feed-forward matrices, the head), as many copies as the model has,
  multiplied by a few rows as `[in, out]` and as rows `[out, in]`, alternately, the best of a
  few rounds each; `choose` holds a matrix as rows where that is faster by more than `MARGIN`.
- `step_timer`: a cached step of the real decoding program with a layout; `candidates` and
  `confirm`: the per-matrix choice, every matrix as rows and none, each timed in it.
- `parse_layout`: a layout named on a script's command line ("rule", "none", "all",
  "qkv,proj"), to pass as `Generator(layout=...)`.

Scripts run as `python scripts/NAME.py` from the repository root have `scripts/` on their path
and `import layout_lab`; the tests import it the same way (`tests/test_layouts.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgpt.config import GPTConfig
from jaxgpt.inference import decode
from jaxgpt.inference.sampling import SamplingConfig
from jaxgpt.nn.layout import Layout, prepare
from jaxgpt.nn.model import GPTModel, init_params

MATRICES = ("qkv", "out", "fc", "proj", "head")  # the `Layout` fields of the matrices
ALL_ROWS = Layout(True, True, True, True, True, True)
NO_ROWS = Layout(fused_qkv=True)
# Rows must beat [in, out] by this fraction: closer than that is within a quiet machine's
# noise from round to round, and [in, out] needs no transposing.
MARGIN = 0.03
ROUNDS = 5  # timed rounds per form, alternating; the best of each is kept
CONFIRM_ROUNDS = 3  # timed rounds per candidate in the decoding program

# The decoding program `step_timer` times: a prompt, and two counts of new tokens.
STEP_PROMPT, STEP_NEW, STEP_SHORT = 16, 24, 8
STEP_LAYERS = 6  # blocks of the model `step_timer` compiles (its weights outgrow the caches)
# A timer: seconds for one pass over every copy of matrix `name`, held as rows or not.
Timer = Callable[[str, bool], float]
# A step timer: seconds per decoding step with a layout.
StepTimer = Callable[[Layout], float]


def parse_layout(text: str) -> Layout | None:
    """The layout a script's `--layout text` names: None for "rule" (`Layout.for_batch`, what
    `Generator` picks), "none", "all", or the matrices to hold as rows ("qkv,proj")."""
    words = [w.strip() for w in text.lower().split(",") if w.strip()]
    if words in ([], ["rule"]):
        return None
    names = set(MATRICES) if words == ["all"] else set() if words == ["none"] else set(words)
    unknown = names - set(MATRICES)
    if unknown:
        raise ValueError(f"layout {text!r} names {', '.join(sorted(unknown))}; give 'rule', "
                         f"'none', 'all' or some of {', '.join(MATRICES)}")
    return Layout(fused_qkv=True, **{name: True for name in names})


def rows_of(layout: Layout) -> list[str]:
    """The matrices `layout` holds as rows, in `MATRICES` order."""
    return [name for name in MATRICES if getattr(layout, name)]


def matrix_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int, int]]:
    """`{name: (in, out, copies)}` of the matrices a decoding step multiplies (the head only
    when it is not the token embedding, which is rows already)."""
    d, n = cfg.emb_dim, cfg.n_layers
    shapes = {"qkv": (d, 3 * d, n), "out": (d, d, n), "fc": (d, 4 * d, n), "proj": (4 * d, d, n)}
    if not cfg.tie_embeddings:
        shapes["head"] = (d, cfg.vocab_size, 1)
    return shapes


def choose(seconds: dict[str, tuple[float, float]]) -> Layout:
    """The layout of `{name: ([in, out] seconds, rows seconds)}`: rows where faster by more
    than `MARGIN`; Q/K/V fused."""
    rows = {name: r < (1 - MARGIN) * c for name, (c, r) in seconds.items()}
    return Layout(fused_qkv=True, **rows)


def matmul_timer(cfg: GPTConfig, dtype: Any, rows: int) -> Timer:
    """Seconds XLA takes here to multiply `rows` rows by every copy of a matrix (the model's
    count of them, so that they stream from memory as in a decoding step, not from cache).
    Both forms of one matrix are kept between calls; asking for another frees them."""
    shapes = matrix_shapes(cfg)
    dtype = jnp.dtype(dtype)
    built: dict[tuple[str, bool], Callable[[], Any]] = {}

    def build(name: str, as_rows: bool) -> Callable[[], Any]:
        d_in, d_out, copies = shapes[name]
        shape = (d_out, d_in) if as_rows else (d_in, d_out)
        mats = [jnp.full(shape, 0.01 * (i + 1), dtype) for i in range(copies)]
        x = jnp.ones((rows, d_in), dtype)
        contract = (((1,), (1 if as_rows else 0,)), ((), ()))
        fn = jax.jit(lambda mats, x: [lax.dot_general(x, m, contract) for m in mats])
        jax.block_until_ready(fn(mats, x))  # compile
        return lambda: jax.block_until_ready(fn(mats, x))

    def timer(name: str, as_rows: bool) -> float:
        if (name, as_rows) not in built:
            for other in [k for k in built if k[0] != name]:
                del built[other]
            built[name, as_rows] = build(name, as_rows)
        t0 = time.perf_counter()
        built[name, as_rows]()
        return time.perf_counter() - t0

    return timer


def measure(cfg: GPTConfig, timer: Timer, rounds: int = ROUNDS) -> dict[str, tuple[float, float]]:
    """`{name: (best [in, out] seconds, best rows seconds)}`, the two forms timed alternately."""
    out = {}
    for name in matrix_shapes(cfg):
        cols, rows = [], []
        for _ in range(rounds):
            cols.append(timer(name, False))
            rows.append(timer(name, True))
        out[name] = (min(cols), min(rows))
    return out


def step_timer(cfg: GPTConfig, dtype: Any, rows: int) -> StepTimer:
    """Seconds per cached decoding step of the real decoding program here, with a layout:
    `rows` rows of `init_params` of `cfg` cut to its first `STEP_LAYERS` blocks (the compile
    and the timing stay short for big models) after a `STEP_PROMPT`-token prompt, greedy, as
    (t(`STEP_NEW`) - t(`STEP_SHORT`)) / (`STEP_NEW` - `STEP_SHORT`) new tokens with one
    compiled program (the prefill and the call's overhead cancel). One layout's prepared
    weights are held at a time."""
    cfg = cfg.replace(n_layers=min(cfg.n_layers, STEP_LAYERS))
    params = init_params(cfg, 0)
    shape = decode.program_shape(cfg, STEP_PROMPT, STEP_NEW)
    prompt = jnp.asarray(np.random.default_rng(0).integers(
        0, cfg.vocab_size, (rows, shape.prompt_slots)), jnp.int32)
    start = jnp.zeros((rows,), jnp.int32)
    knobs = decode.make_knobs(None, 0.0, None, None, True)
    held: dict[Layout, Any] = {}

    def run(layout: Layout, n_new: int) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(decode.generate_tokens(
            held[layout], prompt, start, jnp.int32(n_new), knobs,
            model=GPTModel(cfg, dtype=jnp.dtype(dtype), layout=layout),
            new_slots=shape.new_slots, sampling=SamplingConfig(), use_cache=True))
        return time.perf_counter() - t0

    def timer(layout: Layout) -> float:
        if layout not in held:
            held.clear()
            held[layout] = prepare(params, cfg, dtype, layout)
            run(layout, STEP_NEW)  # compile, warm up
        return max(run(layout, STEP_NEW) - run(layout, STEP_SHORT), 0.0) / (
            STEP_NEW - STEP_SHORT)

    return timer


def candidates(choice: Layout) -> dict[str, Layout]:
    """What `confirm` times, by label: "chosen" (the per-matrix choice), "all" (every matrix
    as rows) and "none", each layout once (a choice equal to another keeps "chosen")."""
    unique: dict[str, Layout] = {}
    for label, lay in (("chosen", choice), ("all", ALL_ROWS), ("none", NO_ROWS)):
        if lay not in unique.values():
            unique[label] = lay
    return unique


def confirm(choice: Layout, timer: StepTimer,
            rounds: int = CONFIRM_ROUNDS) -> tuple[Layout, dict[str, float]]:
    """The layout decoding steps run fastest with, of `candidates(choice)`, timed alternately,
    best of `rounds` each; another replaces `choice` only where faster by more than `MARGIN`.
    Returns it and `{label: seconds}`."""
    unique = candidates(choice)
    best = {label: float("inf") for label in unique}
    for _ in range(rounds):
        for label, lay in unique.items():
            best[label] = min(best[label], timer(lay))
    winner = min(best, key=best.__getitem__)
    if best[winner] < (1 - MARGIN) * best["chosen"]:
        return unique[winner], best
    return choice, best
