"""Which logits a metric reads, found by tracing it, and the metric evaluated on those alone.

A patching metric maps logits `[..., T, V]` to a scalar, and usually reads a few of them: the
last position's logit of two tokens (a logit difference), or one row's log-softmax. A sweep
that knows this computes the output head only at those positions, and for a logit difference
only those columns. `metric_reads` traces the metric to a jaxpr and follows the logits through
it: a value that only moves logits around (a slice, a gather with fixed indices, a reshape, a
concatenation with constants...) is kept as a map of which logit each of its elements is
(its *view*); the first equation that computes with such a value marks those logits as read.
Anything else is assumed to read all of its input, so the answer is never too small. The
metric is then evaluated by the same equations, each view gathered from the compact logits
`[..., R, C]` of the rows and columns read: the same numbers as the metric of the full logits.

The analysis is checked before it is used: the compact evaluation of random logits must give
the metric of those logits. Where it does not, or the analysis itself failed (a construct it
cannot follow), the metric reads every logit: `MetricReads.fallback` says why, and `evaluate`
is the metric itself. A wrong analysis then costs a slower sweep, never a wrong one.

Shapes: T positions, V vocabulary, R rows read, C columns read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

# Primitives that only move elements: (index of the first data operand, of the last + 1); the
# other operands (indices, predicates, starts) must be known for the result to stay a view.
_MOVES = {"slice": (0, 1), "squeeze": (0, 1), "reshape": (0, 1), "transpose": (0, 1),
          "rev": (0, 1), "broadcast_in_dim": (0, 1), "copy": (0, 1), "copy_p": (0, 1),
          "convert_element_type": (0, 1), "gather": (0, 1), "dynamic_slice": (0, 1),
          "concatenate": (0, None), "pad": (0, 2), "dynamic_update_slice": (0, 2),
          "select_n": (1, None)}
# Primitives whose sub-jaxpr is their whole computation: followed inside. `pjit` is `jit`'s name
# before JAX 0.7, `checkpoint` and `remat` `jax.checkpoint`'s in older JAX (now `remat2`).
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "checkpoint": "jaxpr", "remat": "jaxpr", "remat2": "jaxpr"}
# How far the check's two evaluations may differ (see `_agrees`).
_TOLERANCE = 2.0 ** -24 * 1024


class _View(NamedTuple):
    """A value each element of which is logit `flat[idx]` (idx >= 0) or `fill` (idx < 0)."""

    idx: np.ndarray  # int32, the value's shape
    fill: np.ndarray  # the value where idx < 0


class _Dep(NamedTuple):
    """A value computed from logits (materialised when the metric is evaluated)."""


_DEP = _Dep()


class MetricReads(NamedTuple):
    """What `metric_reads` found: the positions and columns read, and the metric of them.

    `evaluate(compact)` takes `[..., R, C]`: the logits at `rows` and `columns` (all V
    columns when `columns` is None), and returns exactly `metric(logits)`.
    """

    rows: np.ndarray  # int, sorted: positions (axis -2) the metric reads
    columns: np.ndarray | None  # int, sorted: vocabulary columns read; None for all
    evaluate: Callable[[jax.Array], jax.Array]
    fallback: str | None  # why every logit is read (the analysis failed); None: it was followed


def _sub(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """`(jaxpr, consts)` of a call-like equation's body, or None."""
    key = _CALLS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    body = eqn.params[key]
    if isinstance(body, jex.ClosedJaxpr):
        return body.jaxpr, body.consts
    return body, ()


def _bind(eqn: Any, values: Sequence[Any]) -> list[Any]:
    out = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _as_view(value: Any) -> _View:
    if isinstance(value, _View):
        return value
    arr = np.asarray(value)
    return _View(np.full(arr.shape, -1, np.int32), arr)


def _move(eqn: Any, ins: list[Any]) -> _View | None:
    """The view an element-moving equation makes of its (view or known) operands, or None
    when it is not such an equation, or an index operand is not known."""
    span = _MOVES.get(eqn.primitive.name)
    if span is None or len(eqn.outvars) != 1:
        return None
    if eqn.primitive.name == "convert_element_type" and \
            eqn.params["new_dtype"] != eqn.invars[0].aval.dtype:
        return None  # another dtype's values are not the logits' (only a weak type's change is)
    lo, hi = span
    hi = len(ins) if hi is None else hi
    if any(isinstance(v, (_View, _Dep)) for i, v in enumerate(ins) if not lo <= i < hi):
        return None
    if any(isinstance(v, _Dep) for v in ins[lo:hi]):
        return None
    views = [_as_view(v) if lo <= i < hi else v for i, v in enumerate(ins)]
    fill_args = [v.fill if isinstance(v, _View) else v for v in views]
    idx_args = [v.idx if isinstance(v, _View) else v for v in views]
    with jax.ensure_compile_time_eval():
        fill = np.asarray(_bind(eqn, fill_args)[0])
        if eqn.primitive.name == "convert_element_type":
            idx = idx_args[0]
        else:
            # An out-of-bounds gather fills with -1: not a logit (its fill array holds the value).
            params = {**eqn.params, "fill_value": -1} if "fill_value" in eqn.params \
                else eqn.params
            idx_eqn = eqn.replace(params=params)
            idx = np.asarray(_bind(idx_eqn, idx_args)[0])
    return _View(idx.astype(np.int32), fill)


class _Plan:
    """The analysis of one jaxpr call: what each variable is (a known array, a `_View` or
    `_DEP`), a plan of its own for each call inside it, and the logits materialised."""

    def __init__(self, read: list[np.ndarray]):
        self.env: dict[Any, Any] = {}
        self.calls: dict[int, _Plan] = {}  # by equation index
        self.read = read

    def get(self, var: Any) -> Any:
        return var.val if isinstance(var, jex.Literal) else self.env[var]

    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        self.env.update(zip(jaxpr.constvars, consts, strict=True))
        self.env.update(zip(jaxpr.invars, args, strict=True))
        for i, eqn in enumerate(jaxpr.eqns):
            ins = [self.get(v) for v in eqn.invars]
            self.env.update(zip(eqn.outvars, self.step(i, eqn, ins), strict=True))
        return [self.get(v) for v in jaxpr.outvars]

    def mark(self, value: Any) -> None:
        if isinstance(value, _View):
            self.read.append(np.unique(value.idx[value.idx >= 0]))

    def step(self, i: int, eqn: Any, ins: list[Any]) -> list[Any]:
        if not any(isinstance(v, (_View, _Dep)) for v in ins):
            with jax.ensure_compile_time_eval():
                return [np.asarray(v) if isinstance(v, jax.Array) else v
                        for v in _bind(eqn, ins)]
        sub = _sub(eqn)
        if sub is not None:
            self.calls[i] = _Plan(self.read)
            return self.calls[i].run(sub[0], sub[1], ins)
        view = _move(eqn, ins)
        if view is not None:
            return [view]
        for value in ins:
            self.mark(value)
        return [_DEP] * len(eqn.outvars)

    def evaluate(self, jaxpr: Any, args: Sequence[Any],
                 gather: Callable[[_View], jax.Array]) -> list[Any]:
        """The jaxpr's outputs: each equation planned as computing with logits bound on real
        values (views gathered from the compact logits), the rest taken from the plan."""
        env: dict[Any, Any] = dict(zip(jaxpr.invars, args, strict=True))

        def value(var: Any) -> Any:
            if isinstance(var, jex.Literal):
                return var.val
            return env[var] if var in env else self.env[var]

        for i, eqn in enumerate(jaxpr.eqns):
            if not any(isinstance(self.env[v], _Dep) for v in eqn.outvars):
                continue  # known, or a view: read from the plan when used
            ins = [value(v) for v in eqn.invars]
            sub = _sub(eqn)
            if sub is not None:
                outs = self.calls[i].evaluate(sub[0], ins, gather)
            else:
                outs = _bind(eqn, [gather(v) if isinstance(v, _View) else v for v in ins])
            env.update(zip(eqn.outvars, outs, strict=True))
        outs = [value(v) for v in jaxpr.outvars]
        return [gather(v) if isinstance(v, _View) else v for v in outs]


def _follow(closed: jex.ClosedJaxpr, shape: tuple[int, ...]) -> MetricReads:
    """The analysis of the traced metric `closed` (see the module's docstring)."""
    size = int(np.prod(shape))
    whole = _View(np.arange(size, dtype=np.int32).reshape(shape), np.zeros(shape, np.float32))
    read_list: list[np.ndarray] = []
    plan = _Plan(read_list)
    for out in plan.run(closed.jaxpr, [np.asarray(c) for c in closed.consts], [whole]):
        plan.mark(out)
    read = np.unique(np.concatenate(read_list)) if read_list else np.zeros(0, np.int64)
    t, v = shape[-2], shape[-1]
    rows = np.unique((read // v) % t)
    cols = np.unique(read % v)
    columns = None if len(cols) == v else cols
    width = v if columns is None else len(cols)
    row_at = np.full(t, -1, np.int64)
    row_at[rows] = np.arange(len(rows))
    col_at = np.arange(v) if columns is None else np.full(v, -1, np.int64)
    if columns is not None:
        col_at[columns] = np.arange(len(columns))

    def evaluate(compact: jax.Array) -> jax.Array:
        flat_compact = compact.reshape(-1)

        def gather(view: _View) -> jax.Array:
            """The view's elements, gathered from the compact logits."""
            flat = np.maximum(view.idx, 0)
            lead, pos, col = flat // (t * v), (flat // v) % t, flat % v
            where = (lead * len(rows) + row_at[pos]) * width + col_at[col]
            got = flat_compact[np.where(view.idx >= 0, where, 0)]
            return jnp.where(view.idx >= 0, got, view.fill) if (view.idx < 0).any() else got

        return plan.evaluate(closed.jaxpr, [whole], gather)[0]

    return MetricReads(rows, columns, evaluate, None)


def _said(error: Exception) -> str:
    """An exception in one line: its type and its message's first line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _shown(value: np.ndarray) -> str:
    """A value in a few characters: its numbers (a few of them) and its dtype."""
    return f"{np.array2string(value, threshold=6, precision=6)} ({value.dtype})"


def _agrees(got: np.ndarray, want: np.ndarray) -> bool:
    """Whether the compact evaluation `got` is the metric's value `want` (NaN agreeing with
    NaN). Both are the same operations on the same values, which XLA may group differently in
    the two programs (a reduction's order, a fusion): each grouping's rounding is 2^-24 of the
    values in float32, and `_TOLERANCE` allows 1024 of them at the scale of the normal draws
    (order 1), while one element missed or misplaced moves the metric by order 1 over the
    number of elements it averages."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if not jnp.issubdtype(want.dtype, jnp.floating):
        return bool(np.array_equal(got, want))
    return bool(np.allclose(got.astype(np.float64), want.astype(np.float64),
                            rtol=_TOLERANCE, atol=_TOLERANCE, equal_nan=True))


def _check(metric: Callable[[jax.Array], jax.Array], reads: MetricReads,
           shape: tuple[int, ...]) -> str | None:
    """Why the analysis `reads` is wrong (its evaluation of random logits is not the metric of
    them), or None."""

    @jax.jit
    def both(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        compact = logits[..., reads.rows, :]
        compact = compact if reads.columns is None else compact[..., reads.columns]
        return metric(logits), reads.evaluate(compact)

    # Normal draws, distinct and of order 1: an element missed or taken from elsewhere shows.
    # NumPy's: the same on every backend, and 5x faster than JAX's on a CPU.
    logits = np.random.default_rng(0).standard_normal(shape, np.float32)
    try:
        want, got = (np.asarray(value) for value in both(logits))
    except Exception as error:  # the metric alone traced: the analysis's evaluation failed
        return f"evaluating the logits read raised {_said(error)}"
    if not _agrees(got, want):
        return (f"on random logits the logits read give {_shown(got)}, the metric "
                f"{_shown(want)}")
    return None


def check_metric(metric: Callable[[jax.Array], jax.Array], shape: tuple[int, ...]) -> None:
    """A ValueError, before a sweep, unless `metric` gives one number for float32 logits of
    `shape` (`[T, V]` for `[T]` tokens, `[B, T, V]` for `[B, T]`): each entry of a sweep is one
    run's metric."""
    out = jax.eval_shape(metric, jax.ShapeDtypeStruct(shape, jnp.float32))
    got = getattr(out, "shape", None)
    if got != ():
        axes = "[T, V], of [T] tokens" if len(shape) == 2 else "[B, T, V], of [B, T] tokens"
        what = f"shape {got}" if got is not None else type(out).__name__
        raise ValueError(f"the metric must return one number (a scalar), got {what} from "
                         f"logits of shape {shape} ({axes})")


def metric_reads(metric: Callable[[jax.Array], jax.Array],
                 shape: tuple[int, ...]) -> MetricReads:
    """Trace `metric` on float32 logits of `shape` (`[..., T, V]`): the rows and columns it
    reads, and the metric as a function of those alone, checked on random logits; every row
    and column, and the metric itself, where the analysis fails (see the module's docstring)."""
    closed = jax.make_jaxpr(metric)(jax.ShapeDtypeStruct(shape, jnp.float32))
    try:
        reads = _follow(closed, shape)
    except Exception as error:  # a construct the analysis cannot follow: read everything
        why: str | None = f"the analysis raised {_said(error)}"
    else:
        why = _check(metric, reads, shape)
    if why is None:
        return reads
    return MetricReads(np.arange(shape[-2]), None, metric, why)
