"""`interp.reads`: the rows and columns a metric reads, and its evaluation on those alone, for
metrics built from every primitive the analysis knows, applied to logits and to computed
values; the fallback to reading every logit where the analysis cannot follow the metric."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import sharpened

from jaxgpt.interp import patching, reads
from jaxgpt.interp.cache import run_with_cache
from jaxgpt.interp.reads import metric_reads

T, V, B = 6, 50, 2
ALL_ROWS = list(range(T))
rng = np.random.default_rng(0)
LOGITS = {shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
          for shape in [(T, V), (1, T, V), (B, T, V)]}


def with_jvp(f: Callable) -> Callable:
    """`f` as a `jax.custom_jvp` function (its own derivative as the rule)."""
    g = jax.custom_jvp(f)
    g.defjvp(lambda primals, tangents: jax.jvp(f, primals, tangents))
    return g


def with_vjp(f: Callable) -> Callable:
    """`f` as a `jax.custom_vjp` function (its own derivative as the rule)."""
    g = jax.custom_vjp(f)
    g.defvjp(lambda *args: (f(*args), args), lambda args, ct: jax.vjp(f, *args)[1](ct))
    return g


def closed_call(f: Callable, *args: jax.Array) -> jax.Array:
    """`f(*args)` as one `closed_call` equation, as JAX's own transformations write one."""
    call = jex.primitives.closed_call_p
    return call.bind(*args, **call.get_bind_params({"call_jaxpr": jax.make_jaxpr(f)(*args)}))[0]


def two(x):  # [T, V] -> [2, 4]: computed from rows 4, 5 and columns 2..5
    return 2 * x[-2:, 2:6]


def lsm(x):  # [T, V] -> [2, V]: computed from rows 4, 5 and every column
    return jax.nn.log_softmax(x[-2:])


def diff(y):
    return y[-1, 3] - y[-1, 4]


def next_token_loss(x):  # [B, T, V]: the loss of the next tokens (here arbitrary ones)
    targets = jnp.arange(B * (T - 1)).reshape(B, T - 1) % V
    log_p = jax.nn.log_softmax(x[:, :-1])
    return -log_p[jnp.arange(B)[:, None], jnp.arange(T - 1)[None], targets].mean()


class Case(NamedTuple):
    name: str
    on: str  # "logits": its primitives take the logits; "computed": values computed from them
    metric: Callable[[jax.Array], jax.Array]
    rows: list[int]
    columns: list[int] | None  # None: every column
    shape: tuple[int, ...] = (T, V)


LSM_JIT = jax.jit(jax.nn.log_softmax)
LAST_LOGIT = with_jvp(lambda y: y[-1, 3])  # returns a logit itself from inside custom_jvp
DIFF_VJP = with_vjp(lambda y: jnp.tanh(y[-1, 3]) - y[-1, 4])
SUM_JVP, SUM_VJP = with_jvp(lambda y: (y * y).sum()), with_vjp(lambda y: y[1, 2] - y[0, 3])
W = jnp.zeros(V).at[3].set(1.0).at[4].set(-1.0)  # a logit difference as a dot product

# Each primitive of `reads._MOVES` and `reads._CALLS` applied to logits and to computed values
# (the completeness test below holds the table to that), then what computes with logits.
CASES = [
    # --- moves, on logits
    Case("slice_squeeze", "logits", diff, [5], [3, 4]),
    Case("slice_strided", "logits", lambda x: x[1:6:2, 3:8:2].sum(), [1, 3, 5], [3, 5, 7]),
    Case("reshape", "logits", lambda x: x.reshape(3, 100)[2, 53] * x.reshape(-1)[4],
         [0, 5], [3, 4]),
    Case("transpose", "logits", lambda x: x.T[3, -1] - x.T[4, 0], [0, 5], [3, 4]),
    Case("rev", "logits", lambda x: jnp.flip(x)[0, 46] - jnp.flip(x, 1)[1, 45], [1, 5], [3, 4]),
    Case("broadcast_in_dim", "logits",
         lambda x: (jnp.broadcast_to(x[-1, 3:5], (3, 2)) * jnp.arange(6.0).reshape(3, 2)).sum()
         - x[:, None, :][0, 0, 7], [0, 5], [3, 4, 7]),
    Case("copy", "logits", lambda x: jnp.copy(x)[-1, 3] - x[-1, 4], [5], [3, 4]),
    Case("convert_to_float16", "logits",
         lambda x: x[-1, 3].astype(jnp.float16).astype(jnp.float32) - x[-1, 4], [5], [3, 4]),
    Case("convert_to_int", "logits", lambda x: (10 * x[-1, 3:5]).astype(jnp.int32).sum(),
         [5], [3, 4]),
    # Another dtype's values are computed from the logits: converting all of them reads all.
    Case("convert_every_logit", "logits", lambda x: x.astype(jnp.float16)[-1, 3], ALL_ROWS,
         None),
    Case("gather", "logits", lambda x: x[-1, jnp.array([3, 4])] @ jnp.array([1.0, -1.0]),
         [5], [3, 4]),
    Case("gather_2d", "logits", lambda x: x[jnp.array([5, 2]), jnp.array([3, 4])].sum(),
         [2, 5], [3, 4]),
    Case("gather_out_of_bounds_fill", "logits",
         lambda x: x.at[-1, jnp.array([3, 60])].get(mode="fill", fill_value=2.5).sum(),
         [5], [3]),
    Case("dynamic_slice", "logits", lambda x: jax.lax.dynamic_slice(x, (5, 3), (1, 2)).sum(),
         [5], [3, 4]),
    Case("concatenate", "logits", lambda x: jnp.concatenate([x[-1, :4], jnp.ones(2)]).sum(),
         [5], [0, 1, 2, 3]),
    Case("pad", "logits", lambda x: jnp.pad(x[-1, 3:5], 1, constant_values=1.5)
         @ jnp.arange(4.0), [5], [3, 4]),
    Case("pad_with_a_logit", "logits", lambda x: jnp.pad(x[-1, 3:5], 1, constant_values=x[0, 6])
         @ jnp.arange(4.0), [0, 5], [3, 4, 6]),
    Case("dynamic_update_slice", "logits",
         lambda x: jax.lax.dynamic_update_slice(jnp.ones(5), x[-1, 3:5], (1,)) @ jnp.arange(5.0),
         [5], [3, 4]),
    Case("dynamic_update_slice_overwrites", "logits",
         lambda x: jax.lax.dynamic_update_slice(x[-1, 3:6], jnp.zeros(1), (1,)).sum(),
         [5], [3, 5]),
    Case("select_n_known_predicate", "logits",
         lambda x: jnp.where(jnp.arange(2) > 0, x[-1, 3:5], x[-2, 3:5]) @ jnp.array([1.0, 2.0]),
         [4, 5], [3, 4]),
    # --- moves, on computed values
    Case("slice_of_log_softmax", "computed", lambda x: lsm(x)[1, 3] - lsm(x)[1, 4], [4, 5], None),
    Case("reshape_computed", "computed", lambda x: two(x).reshape(-1)[5], [4, 5], [2, 3, 4, 5]),
    Case("transpose_computed", "computed", lambda x: two(x).T[1, 0] - lsm(x).T[3, 1], [4, 5],
         None),
    Case("rev_computed", "computed", lambda x: jnp.flip(two(x))[0, 0], [4, 5], [2, 3, 4, 5]),
    Case("broadcast_in_dim_computed", "computed",
         lambda x: (jnp.broadcast_to(two(x), (3, 2, 4)) * jnp.arange(3.0)[:, None, None]).sum(),
         [4, 5], [2, 3, 4, 5]),
    Case("copy_computed", "computed", lambda x: jnp.copy(two(x))[1, 1], [4, 5], [2, 3, 4, 5]),
    Case("convert_computed", "computed",
         lambda x: two(x).astype(jnp.float16).astype(jnp.float32).sum(), [4, 5], [2, 3, 4, 5]),
    Case("gather_computed", "computed",
         lambda x: lsm(x)[jnp.array([0, 1]), jnp.array([3, 4])].sum(), [4, 5], None),
    Case("gather_fill_computed", "computed",
         lambda x: two(x).at[1, jnp.array([1, 9])].get(mode="fill", fill_value=0.5).sum(),
         [4, 5], [2, 3, 4, 5]),
    Case("dynamic_slice_computed", "computed",
         lambda x: jax.lax.dynamic_slice(two(x), (1, 1), (1, 2)).sum(), [4, 5], [2, 3, 4, 5]),
    Case("concatenate_computed", "computed",
         lambda x: jnp.concatenate([two(x)[0], lsm(x)[1]]) @ jnp.arange(54.0), [4, 5], None),
    Case("pad_computed", "computed",
         lambda x: (jnp.pad(two(x), 1, constant_values=two(x)[0, 0]) * jnp.arange(24.0)
                    .reshape(4, 6)).sum(), [4, 5], [2, 3, 4, 5]),
    Case("dynamic_update_slice_computed", "computed",
         lambda x: jax.lax.dynamic_update_slice(two(x), lsm(x)[:, :2], (0, 1)).sum(), [4, 5],
         None),
    Case("select_n_computed", "computed",
         lambda x: jnp.where(jnp.arange(4) > 1, two(x)[0], two(x)[1]).sum(), [4, 5],
         [2, 3, 4, 5]),
    # --- calls (the metric returning from inside them too), on logits
    Case("jit", "logits", jax.jit(diff), [5], [3, 4]),
    Case("nested_jit_returns_a_logit", "logits",
         lambda x: jax.jit(lambda y: jax.jit(lambda z: z[-1, 3])(y))(x), [5], [3]),
    Case("one_jit_twice", "logits", lambda x: LSM_JIT(x[-1])[3] - LSM_JIT(x[2])[7], [2, 5], None),
    Case("closed_call", "logits", lambda x: closed_call(diff, x), [5], [3, 4]),
    Case("custom_jvp_relu", "logits", lambda x: jax.nn.relu(diff(x)), [5], [3, 4]),
    Case("custom_jvp_returns_a_logit", "logits", LAST_LOGIT, [5], [3]),
    Case("custom_vjp", "logits", DIFF_VJP, [5], [3, 4]),
    Case("checkpoint", "logits", jax.checkpoint(diff), [5], [3, 4]),
    Case("checkpoint_log_softmax", "logits",
         jax.checkpoint(lambda y: jax.nn.log_softmax(y[-1])[3]), [5], None),
    Case("gelu", "logits", lambda x: jax.nn.gelu(x[-1, 3:5]).sum(), [5], [3, 4]),
    Case("gelu_exact", "logits", lambda x: jax.nn.gelu(x[-1, 3], approximate=False), [5], [3]),
    Case("softmax", "logits", lambda x: jax.nn.softmax(x[-1])[3], [5], None),
    # --- calls, on computed values
    Case("jit_computed", "computed", lambda x: jax.jit(lambda y: y[1, 2])(two(x)), [4, 5],
         [2, 3, 4, 5]),
    Case("closed_call_computed", "computed", lambda x: closed_call(lambda y: y[1, 2], lsm(x)),
         [4, 5], None),
    Case("custom_jvp_computed", "computed", lambda x: SUM_JVP(two(x)), [4, 5], [2, 3, 4, 5]),
    Case("relu_computed", "computed", lambda x: jax.nn.relu(two(x)).sum(), [4, 5], [2, 3, 4, 5]),
    Case("custom_vjp_computed", "computed", lambda x: SUM_VJP(lsm(x)), [4, 5], None),
    Case("checkpoint_computed", "computed", lambda x: jax.checkpoint(jnp.sum)(two(x)), [4, 5],
         [2, 3, 4, 5]),
    # --- elementwise and other computations, on logits
    Case("neg_returned", "logits", lambda x: -x[-1, 3], [5], [3]),
    Case("abs", "logits", lambda x: jnp.abs(x[-1, 3]) - x[-2, 4], [4, 5], [3, 4]),
    Case("exp", "logits", lambda x: jnp.exp(x[-1, 3:5]).sum(), [5], [3, 4]),
    Case("mul", "logits", lambda x: x[-1, 3] * x[-2, 4], [4, 5], [3, 4]),
    Case("max_min", "logits", lambda x: jnp.maximum(x[-1, 3], x[-1, 4]) - jnp.minimum(
         x[0, 3], x[0, 4]), [0, 5], [3, 4]),
    Case("integer_pow_tanh_logistic", "logits",
         lambda x: x[-1, 3] ** 3 + jnp.tanh(x[-1, 4]) + jax.nn.sigmoid(x[-1, 5]), [5], [3, 4, 5]),
    Case("clip", "logits", lambda x: jnp.clip(x[-1, 3], -0.5, 0.5), [5], [3]),
    Case("where_on_a_logit", "logits", lambda x: jnp.where(x[-1, 2] > 0, x[-2, 3], x[-3, 4]),
         [3, 4, 5], [2, 3, 4]),
    Case("compare", "logits", lambda x: x[-1, 3] > x[-1, 4], [5], [3, 4]),
    Case("argmax", "logits", lambda x: jnp.argmax(x[-1, 3:6]), [5], [3, 4, 5]),
    Case("index_computed_from_logits", "logits", lambda x: x[-1][jnp.argmax(x[0])], [0, 5],
         None),
    Case("index_into_every_logit", "logits", lambda x: x[-1, jnp.argmax(x[0])], ALL_ROWS, None),
    Case("stop_gradient", "logits", lambda x: jax.lax.stop_gradient(x[-1, 3]) - x[-1, 4], [5],
         [3, 4]),
    Case("reductions", "logits", lambda x: x[-1, 3:6].max() + x[:, 7].sum(), ALL_ROWS,
         [3, 4, 5, 7]),
    Case("dot", "logits", lambda x: x[-1] @ W, [5], None),
    Case("sort_cumsum", "logits", lambda x: jnp.sort(x[-1, 3:6])[0] + jnp.cumsum(x[0, 3:6])[-1],
         [0, 5], [3, 4, 5]),
    Case("log_softmax", "logits", lambda x: jax.nn.log_softmax(x[-1])[3], [5], None),
    Case("logsumexp", "logits", lambda x: jax.nn.logsumexp(x[-1]), [5], None),
    Case("top_k", "logits", lambda x: jax.lax.top_k(x[-1], 2)[0].sum(), [5], None),
    Case("mean", "logits", lambda x: x.mean(), ALL_ROWS, None),
    # What the analysis does not follow (scatter, cond, while) reads all of its input.
    Case("scatter", "logits", lambda x: x.at[-1, 3].set(0.0)[-1, 3:5].sum(), ALL_ROWS, None),
    Case("cond", "logits", lambda x: jax.lax.cond(x[-1, 3] > 0, lambda: x[-1, 4],
                                                  lambda: x[-2, 4]), ALL_ROWS, None),
    Case("fori_loop", "logits", lambda x: jax.lax.fori_loop(0, 3, lambda i, c: c + x[-1, i], 0.0),
         ALL_ROWS, None),
    Case("constant", "logits", lambda x: jnp.float32(1.0), [], []),  # reads no logit
    # --- batched logits [B, T, V]
    Case("batched_one_prompt", "logits", lambda x: x[0, -1, 3] - x[0, -1, 4], [5], [3, 4],
         (1, T, V)),
    Case("batched_other_prompt", "logits", lambda x: x[1, -1, 3] - x[0, -1, 4], [5], [3, 4],
         (B, T, V)),
    Case("batched_every_prompt", "logits", lambda x: x[:, -1, 3].sum(), [5], [3], (B, T, V)),
    Case("batched_vmap", "logits", lambda x: jax.vmap(diff)(x).sum(), [5], [3, 4], (B, T, V)),
    Case("batched_log_softmax", "logits", lambda x: -jax.nn.log_softmax(x[:, -2:]).mean(),
         [4, 5], None, (B, T, V)),
    Case("batched_next_token_loss", "logits", next_token_loss, [0, 1, 2, 3, 4], None,
         (B, T, V)),
]


def compact(logits: jax.Array, found: reads.MetricReads) -> jax.Array:
    """The logits at the rows and columns `found` reads: `[..., R, C]`."""
    rows = logits[..., found.rows, :]
    return rows if found.columns is None else rows[..., found.columns]


def assert_reads(name: str, metric: Callable, shape: tuple[int, ...], rows: list[int],
                 columns: list[int] | None) -> None:
    """`metric_reads` follows `metric` (no fallback), finds `rows` and `columns`, and its
    compact evaluation (jitted, as a sweep runs it) is the metric of the full logits."""
    found = metric_reads(metric, shape)
    assert found.fallback is None, f"{name}: the analysis fell back ({found.fallback})"
    assert found.rows.tolist() == rows, f"{name}: rows read {found.rows.tolist()}, not {rows}"
    got_columns = None if found.columns is None else found.columns.tolist()
    assert got_columns == columns, f"{name}: columns read {got_columns}, not {columns}"
    # Both in one program (one compile): the same primitives on the same values, which XLA
    # may fuse or order differently (a reduction of at most V = 50 terms): a few roundings of
    # 2^-24 relative to values of order 1, well inside 1e-6 (16 roundings).
    want, got = jax.jit(lambda x: (metric(x), found.evaluate(compact(x, found))))(LOGITS[shape])
    assert got.dtype == want.dtype, f"{name}: the value is {got.dtype}, the metric's {want.dtype}"
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6,
                               err_msg=f"{name}: the value of the logits read differs")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_metric_reads_what_it_uses_and_is_evaluated_exactly_on_it(case):
    assert_reads(case.name, case.metric, case.shape, case.rows, case.columns)


def primitives_of(jaxpr: jex.Jaxpr) -> set[str]:
    """The names of the primitives in `jaxpr` and every jaxpr inside it."""
    names = {eqn.primitive.name for eqn in jaxpr.eqns}
    for sub in jex.subjaxprs(jaxpr):
        names |= primitives_of(sub)
    return names


# Names in `_MOVES` and `_CALLS` that the installed JAX never writes in a jaxpr: other versions'
# names (`pjit` is `jit` since JAX 0.7, `jax.checkpoint` wrote `checkpoint` and `remat` before
# `remat2`) and the Python name `copy_p` of the primitive `copy`.
NEVER_WRITTEN = {"pjit", "checkpoint", "remat", "copy_p"}


def test_the_table_exercises_every_primitive_the_analysis_knows():
    known = set(reads._MOVES) | set(reads._CALLS)
    primitives = {p.name for p in vars(jex.primitives).values() if isinstance(p, jex.Primitive)}
    assert not NEVER_WRITTEN & primitives, f"JAX has {NEVER_WRITTEN & primitives}: add cases"
    assert known - NEVER_WRITTEN <= primitives, f"not JAX's: {known - NEVER_WRITTEN - primitives}"
    for on in ("logits", "computed"):
        seen: set[str] = set()
        for case in CASES:
            if case.on == on:
                seen |= primitives_of(jax.make_jaxpr(case.metric)(
                    jax.ShapeDtypeStruct(case.shape, jnp.float32)).jaxpr)
        missing = sorted(known - NEVER_WRITTEN - seen)
        assert not missing, f"no case applies {missing} to {on}: add one to CASES"


@pytest.mark.parametrize("name, metric, columns", [
    ("log", lambda x: jnp.log(x[-1]).sum(), None),
    ("infinite", lambda x: x[-1, 4] / (x[-1, 3] - x[-1, 3]), [3, 4]),
    ("nan", lambda x: jnp.sqrt(-jnp.abs(x[-1, 3])), [3])], ids=["log", "infinite", "nan"])
def test_a_metric_not_finite_on_random_logits_is_followed(name, metric, columns):
    # NaN or infinite on the check's random logits (and the test's): NaN agrees with NaN.
    assert not np.isfinite(metric(LOGITS[(T, V)]))
    assert_reads(name, metric, (T, V), [5], columns)


def neg_diff(x):  # applies a unary op to a logit
    return x[-1, 3] + (-x[-1, 4])


def test_a_unary_op_on_a_logit_reads_that_logit_alone():
    # The analysis of the metric the fallback tests below break: followed, not fallen back.
    assert_reads("neg_diff", neg_diff, (T, V), [5], [3, 4])


def assert_reads_everything(metric: Callable, why: str) -> None:
    found = metric_reads(metric, (T, V))
    assert found.fallback is not None and why in found.fallback, found.fallback
    assert found.rows.tolist() == ALL_ROWS and found.columns is None
    logits = LOGITS[(T, V)]
    np.testing.assert_array_equal(found.evaluate(compact(logits, found)), metric(logits))


def test_a_metric_the_analysis_gets_wrong_reads_every_logit(monkeypatch):
    # Taking neg for a move, the analysis negates the index of the logit it moves (no longer a
    # logit's): it would evaluate x[-1, 3] + 0.
    monkeypatch.setitem(reads._MOVES, "neg", (0, 1))
    assert_reads_everything(neg_diff, "on random logits the logits read give")


def test_a_metric_the_analysis_cannot_follow_reads_every_logit(monkeypatch):
    def lost(eqn, ins):
        raise RuntimeError("lost track")

    monkeypatch.setattr(reads, "_move", lost)
    assert_reads_everything(neg_diff, "the analysis raised RuntimeError: lost track")


def test_a_compact_evaluation_that_fails_reads_every_logit(monkeypatch):
    def failing(self, jaxpr, args, gather):
        raise RuntimeError("no such logit")

    monkeypatch.setattr(reads._Plan, "evaluate", failing)
    assert_reads_everything(neg_diff, "evaluating the logits read raised RuntimeError")


@pytest.mark.slow  # compiles a sweep: 3 to 6 s
def test_a_sweep_with_a_metric_that_falls_back_equals_patching_one_at_a_time(tiny, monkeypatch):
    cfg, params = tiny
    params = sharpened(params)
    clean, corrupt = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 5)).astype(np.int32)
    _, clean_cache = run_with_cache(params, cfg, clean)
    monkeypatch.setitem(reads._MOVES, "neg", (0, 1))

    def metric(logits):  # a new function: not in `patching`'s cache of analyses
        return neg_diff(logits)

    plan = patching.plan_sweep(params, cfg, corrupt, clean_cache, metric, "resid_pre")
    assert plan.reads.obj.fallback is not None
    got = patching.patch_sweep(params, cfg, corrupt, clean_cache, metric, "resid_pre")
    want = patching.reference_sweep(params, cfg, corrupt, clean_cache, metric, "resid_pre")
    # As tests/test_patching.py: the same fp32 activations in other groupings.
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.ptp(want) > 0.05, "the patches must move the metric for this test to mean much"
