"""The decoding layout for this machine: on the CPU, measured once per machine, batch class,
dtype and model shape, and kept as JSON beside the compilation cache.

XLA:CPU multiplies a few rows by an `[in, out]` matrix and by its `[out, in]` form at speeds
that differ by matrix, row count, machine and XLA release, so the CPU layout is measured where
it runs: for each matrix of the model (fused Q/K/V, the attention's output projection, the two
feed-forward matrices, the head), as many copies as the model has, multiplied by `rows` rows in
both forms, alternately, the best of a few rounds each. A matrix is held as rows where that is
faster by more than `MARGIN`, else as the book's `[in, out]` (nothing to transpose).

Whether matrices timed one at a time rank layouts as the decoding program does is checked by
`confirm` (`scripts/bench_layouts.py` runs it): the per-matrix choice, every matrix as rows and
none as rows, each timed in the real decoding program (`step_timer`), alternately. On a 2-core
EPYC the per-matrix choice and every matrix as rows were within 1-4% of each other in the
program, at 1 and 8 rows (docs/performance.md): too little for `decode_layout` to pay for the
check at first use (three compiles, 20-35 s for 124M).

A measurement taken while the machine is busier than its cores (load average above the CPU
count) is used by this process but not kept, so that a later, quieter process measures again.
GPU and TPU layouts follow from the structure of their compiled programs (`Layout.for_batch`),
not from timings.

`JAXGPT_DECODE_LAYOUT` forces a layout: "measure" (the default), "fixed" (`Layout.for_batch`,
no measuring: what the test suite uses), or the matrices to hold as rows, comma-separated
(e.g. "qkv,proj"; "none" for none, "all" for every one).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
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

LAYOUT_ENV = "JAXGPT_DECODE_LAYOUT"
MATRICES = ("qkv", "out", "fc", "proj", "head")  # the `Layout` fields of the matrices
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
# Layouts measured by this process and not kept (the machine was busy), by `machine_key`.
_UNKEPT: dict[str, Layout] = {}


def matrix_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int, int]]:
    """`{name: (in, out, copies)}` of the matrices a decoding step multiplies (the head only
    when it is not the token embedding, which is rows already)."""
    d, n = cfg.emb_dim, cfg.n_layers
    shapes = {"qkv": (d, 3 * d, n), "out": (d, d, n), "fc": (d, 4 * d, n), "proj": (4 * d, d, n)}
    if not cfg.tie_embeddings:
        shapes["head"] = (d, cfg.vocab_size, 1)
    return shapes


def batch_class(rows: int) -> int:
    """The row count a layout is measured at for `rows` rows: the power of two >= rows."""
    return 1 << max(rows - 1, 0).bit_length()


def choose(seconds: dict[str, tuple[float, float]]) -> Layout:
    """The layout of `{name: ([in, out] seconds, rows seconds)}`: rows where faster by more
    than `MARGIN`; Q/K/V fused."""
    rows = {name: r < (1 - MARGIN) * c for name, (c, r) in seconds.items()}
    return Layout(fused_qkv=True, **rows)


def forced_layout(text: str) -> Layout | None:
    """The layout `JAXGPT_DECODE_LAYOUT=text` names; None for "measure" and "fixed"."""
    words = [w.strip() for w in text.lower().split(",") if w.strip()]
    if words in ([], ["measure"], ["fixed"]):
        return None
    names = set(MATRICES) if words == ["all"] else set() if words == ["none"] else set(words)
    unknown = names - set(MATRICES)
    if unknown:
        raise ValueError(f"{LAYOUT_ENV}={text!r} names {', '.join(sorted(unknown))}; give "
                         f"'measure', 'fixed', 'none', 'all' or some of {', '.join(MATRICES)}")
    return Layout(fused_qkv=True, **{name: True for name in names})


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
    for label, lay in (("chosen", choice), ("all", Layout(True, True, True, True, True, True)),
                       ("none", Layout(fused_qkv=True))):
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


def cache_path() -> Path:
    """`$XDG_CACHE_HOME/jaxgpt/decode_layouts.json` (beside the compile cache, `.../xla`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxgpt" / "decode_layouts.json"


def machine_key(cfg: GPTConfig, dtype: Any, rows: int) -> str:
    """What a measurement holds for: this CPU and XLA, the dtype, the matrices, the rows."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    shapes = ",".join(f"{n}{i}x{o}x{c}" for n, (i, o, c) in matrix_shapes(cfg).items())
    return (f"{model} x{os.cpu_count()} | jax {jax.__version__} | {jnp.dtype(dtype).name} | "
            f"{shapes} | rows {batch_class(rows)}")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}


def _write(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only cache: measure again next time
        pass


def decode_layout(cfg: GPTConfig, dtype: Any, rows: int, backend: str | None = None, *,
                  timer: Timer | None = None, path: Path | None = None) -> Layout:
    """The layout to decode `rows` rows (per device) with, on `backend` (default: JAX's).

    `JAXGPT_DECODE_LAYOUT` first (see the module docstring); then on the CPU the layout
    measured here for this batch class, from the cache at `path` (default `cache_path()`) or
    measured now with `timer` (default `matmul_timer`) and stored; elsewhere
    `Layout.for_batch`.
    """
    backend = jax.default_backend() if backend is None else backend
    setting = os.environ.get(LAYOUT_ENV, "measure")
    forced = forced_layout(setting)
    if forced is not None:
        return forced
    if backend != "cpu" or setting.strip().lower() == "fixed":
        return Layout.for_batch(rows, backend)
    path = cache_path() if path is None else path
    key = machine_key(cfg, dtype, rows)
    entry = _read(path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("rows"), list):
        return Layout(fused_qkv=True, **{n: n in entry["rows"] for n in matrix_shapes(cfg)})
    if key in _UNKEPT:
        return _UNKEPT[key]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    timer = matmul_timer(cfg, dtype, batch_class(rows)) if timer is None else timer
    seconds = measure(cfg, timer)
    layout = choose(seconds)
    if load > (os.cpu_count() or 1):  # other work skews the timings: do not keep them
        _UNKEPT[key] = layout
        return layout
    data = _read(path)  # again: another process may have added its own
    data[key] = {"rows": [n for n in seconds if getattr(layout, n)],
                 "seconds": {n: list(s) for n, s in seconds.items()},
                 "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": load}
    _write(path, data)
    return layout
