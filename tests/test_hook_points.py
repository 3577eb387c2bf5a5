"""Every hook point on every path through the model.

Two hooks at every point of the table (`nn.hooks`) at once, a feature-wise scale then a shift,
given either way a hook's arrays can travel: bound (a plain function holding its arrays, a
constant of the program) or pytree (`jax.tree_util.Partial`: free, the arrays ride in the
params). Each path through the model must give what a float64 NumPy forward of the book's GPT
gives with the same hooks: the uncached forward (`run_with_hooks`, `run_with_cache` and its
cached values, `GPTModel(cfg, hooks=...)`), prefill and cached decoding (in the book's and the
Generator's weight layouts), generation (cached, recomputing, the book's loop, streaming), and
the train step's loss and gradients; the patching sweeps with a hooked model must give
`reference_sweep`'s values. Where a path disagrees, the points are tried a group at a time
(each point, in every layer at once) so that the message names what broke.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, sharpened
from jax import lax

from jaxgpt.inference import Generator, generate, generate_stream, generate_text_simple
from jaxgpt.interp import patching
from jaxgpt.interp.cache import run_with_cache, run_with_hooks
from jaxgpt.nn import GPTModel, apply_method
from jaxgpt.nn.attention import MASKED
from jaxgpt.nn.cache import init_cache
from jaxgpt.nn.hooks import free_hooks, hook_points, hook_table, with_hook_args
from jaxgpt.training.config import TrainConfig
from jaxgpt.training.step import init_train_state, make_train_step

Partial = jax.tree_util.Partial
KINDS = ("bound", "pytree")

# fp32 rounds each operation to within u = 2**-24 (6e-8) relative. A logit of the tiny model
# depends on 13 dot products in sequence (per block: Q/K/V, scores, weighted values, out_proj,
# the two feed-forward layers; then the head), each of at most 4D = 128 terms, and on about
# 100 elementwise steps (LayerNorms, softmax, GELU, 2 x 38 hooks, residual adds): in the worst
# case (13 * 128 + 100) * u ~ 1e-4 of the largest logit, of the values each dot adds up. The
# measured error is ~3e-7 (the roundings' signs are random); the weakest hook moves the logits
# by 1e-2 of the largest (`test_every_hook_moves_the_logits_far_more_than_the_bound`).
REL_BOUND = 1e-4

# Points where a hook only scales: adding a vector to every key, or a constant to a row of
# scores, leaves the softmax as it was; a shift of the pattern would fill the cache's empty
# slots, which a cached path holds and the uncached one does not; and the LayerNorm's divisor
# stays positive. (Their shift hooks add zeros: still a second hook at the point.)
SCALE_ONLY = ("hook_k", "hook_attn_scores", "hook_pattern", "hook_scale")
# Scales up to e**3 where the model's attention is least sensitive: queries, keys and scores
# barely move the logits of random weights otherwise; elsewhere up to e.
SPREAD = {"hook_q": 3.0, "hook_k": 3.0, "hook_attn_scores": 3.0}


def _scale(factor, x, name):
    return x * factor


def _shift(vector, x, name):
    return x + vector


@pytest.fixture(scope="module")
def model_weights(tiny):
    """The tiny model, sharpened (x8 matrices): attention that the logits feel."""
    cfg, params = tiny
    return cfg, sharpened(params)


@pytest.fixture(scope="module")
def arrays(tiny):
    """Every hook point's `(scale, shift)`, float32, shaped by the table's axes with the
    token and slot axes (B, T, S) dropped from the front: they broadcast against the
    activation wherever a path runs it (one token, a cache's slots, `[B, D]` in the head of
    one position)."""
    cfg, _ = tiny
    rng = np.random.default_rng(7)
    dims = {"D": cfg.emb_dim, "4D": 4 * cfg.emb_dim, "H": cfg.n_heads, "Dh": cfg.head_dim}
    out = {}
    for name, point in hook_points(cfg):
        shape = tuple(dims.get(a, 1) for a in point.shape.split())
        while len(shape) > 1 and shape[0] == 1:
            shape = shape[1:]
        local = name.rsplit(".", 1)[-1]
        spread = SPREAD.get(local, 1.0)
        scale = np.exp(rng.uniform(-spread, spread, shape)).astype(np.float32)
        shift = rng.normal(0.0, 0.5, shape).astype(np.float32)
        out[name] = (scale, np.zeros_like(shift) if local in SCALE_ONLY else shift)
    return out


def _hooks(kind, arrays):
    """Two hooks per point, the scale then the shift: bound (`functools.partial` is no pytree:
    its arrays stay in the function) or pytree (`Partial`: its arrays are leaves)."""
    wrap = functools.partial if kind == "bound" else Partial
    return [(name, wrap(fn, jnp.asarray(a))) for name, pair in arrays.items()
            for fn, a in zip((_scale, _shift), pair, strict=True)]


def _hooked(cfg, params, kind, arrays, model=None):
    """`(model, params)`: `model` (default `GPTModel(cfg)`) with the hooks in its table, and
    the params with the pytree hooks' arrays merged in (`free_hooks` + `with_hook_args`)."""
    model = GPTModel(cfg) if model is None else model
    if kind == "bound":
        return model.clone(hooks=hook_table(cfg, _hooks(kind, arrays))), params
    table, args = free_hooks(cfg, _hooks(kind, arrays))
    return model.clone(hooks=table), with_hook_args(params, args)


# --- the float64 reference -------------------------------------------------------------------


def numpy_forward(cfg, params, tokens, arrays):
    """The book's GPT in float64 NumPy, the hooks' own functions applied at every point with
    `arrays` (as float64): `(logits [B, T, V], {point: activation after its hooks})`."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    acts = {}

    def hook(name, x):
        if name in arrays:
            scale, shift = (np.asarray(a, np.float64) for a in arrays[name])
            x = _shift(shift, _scale(scale, x, name), name)
        acts[name] = x
        return x

    def norm(prefix, x, q):
        centred = x - x.mean(-1, keepdims=True)
        std = hook(f"{prefix}.hook_scale", np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5))
        return q["scale"] * hook(f"{prefix}.hook_normalized", centred / std) + q["shift"]

    def linear(q, x):
        return x @ q["kernel"] + q.get("bias", 0.0)

    b, t = tokens.shape
    h, dh = cfg.n_heads, cfg.head_dim
    x = hook("hook_embed", p["tok_emb"]["embedding"][tokens]) + hook(
        "hook_pos_embed", np.broadcast_to(p["pos_emb"]["embedding"][:t], (b, t, cfg.emb_dim)))
    causal = np.tril(np.ones((t, t), bool))
    for i in range(cfg.n_layers):
        q, at = p[f"trf_blocks_{i}"], f"blocks.{i}"
        x = hook(f"{at}.hook_resid_pre", x)
        y = norm(f"{at}.ln1", x, q["norm1"])
        qs, ks, vs = (hook(f"{at}.attn.hook_{n}", linear(q["att"][w], y).reshape(b, t, h, dh))
                      for n, w in (("q", "W_query"), ("k", "W_key"), ("v", "W_value")))
        scores = np.einsum("bqhd,bkhd->bhqk", qs, ks) / np.sqrt(dh)
        scores = hook(f"{at}.attn.hook_attn_scores", np.where(causal, scores, float(MASKED)))
        e = np.exp(scores - scores.max(-1, keepdims=True))
        pattern = hook(f"{at}.attn.hook_pattern", e / e.sum(-1, keepdims=True))
        z = hook(f"{at}.attn.hook_z", np.einsum("bhqk,bkhd->bqhd", pattern, vs))
        out = hook(f"{at}.hook_attn_out", linear(q["att"]["out_proj"], z.reshape(b, t, -1)))
        x = hook(f"{at}.hook_resid_mid", x + out)
        y = norm(f"{at}.ln2", x, q["norm2"])
        pre = hook(f"{at}.mlp.hook_pre", linear(q["ff"]["layers_0"], y))
        gelu = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))
        out = hook(f"{at}.hook_mlp_out", linear(q["ff"]["layers_2"], hook(f"{at}.mlp.hook_post",
                                                                           gelu)))
        x = hook(f"{at}.hook_resid_post", x + out)
    return norm("ln_final", x, p["final_norm"]) @ p["out_head"]["kernel"], acts


# --- checking a path, and naming the points it breaks ----------------------------------------


def _groups(names):
    """The points by name within a block, every layer's together (`blocks.*.attn.hook_q`)."""
    out = {}
    for name in names:
        out.setdefault(re.sub(r"^blocks\.\d+\.", "blocks.*.", name), []).append(name)
    return out


def _difference(got, want, bounds):
    """What differs between an output and the reference's (dicts of arrays; the reference may
    hold more), each key within its absolute bound (0: equal); None if nothing does."""
    for key, bound in ((key, bounds[key]) for key in got):
        a, b = np.asarray(got[key]), np.asarray(want[key])
        if a.shape != b.shape:
            return f"{key}: shape {a.shape}, not {b.shape}"
        if bound == 0 and (a != b).any():
            return f"{key}: {(a != b).sum()} of {a.size} differ"
        err = np.abs(a.astype(np.float64) - b).max()
        if not err <= bound:
            return f"{key}: off by {err:.3g} (bound {bound:.3g})"
    return None


def _run(run, arrays):
    """`(output, None)`, or `(None, what it raised)`."""
    try:
        return run(arrays), None
    except Exception as e:  # a hook that breaks a path may break it any way
        return None, f"raises {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def check_path(path, run, reference, arrays, bounds):
    """Fail unless `run(arrays)` (a path, hooked at the points `arrays` holds) gives
    `reference(arrays)` within `bounds(reference(arrays))`; the message names the points that
    break it, tried a group at a time, and says which of them the path loses (gives the output
    without hooks)."""
    want = reference(arrays)
    bounds = bounds(want)
    got, raised = _run(run, arrays)
    problem = raised or _difference(got, want, bounds)
    if problem is None:
        return
    found = []
    unhooked = functools.cache(lambda: reference({}))
    for group, names in _groups(arrays).items():
        alone = {name: arrays[name] for name in names}
        got, raised = _run(run, alone)
        what = raised or _difference(got, reference(alone), bounds)
        if what is None:
            continue
        if raised is None and _difference(got, unhooked(), bounds) is None:
            what = f"its hooks are lost, the output is the one without hooks ({what})"
        found.append(f"{group}: {what}")
    pytest.fail(f"{path}: with hooks at every point, {problem}. One point at a time (in every "
                f"layer): " + ("; ".join(found) if found else "each agrees alone"), pytrace=False)


def _relative(want):
    """REL_BOUND of the largest value of each output of the reference, `want`."""
    return {key: REL_BOUND * float(np.abs(value).max()) for key, value in want.items()}


def _exact(want):
    """Tokens: all equal."""
    return {key: 0 for key in want}


TOKENS = np.random.default_rng(3).integers(0, TINY["vocab_size"], (2, 7)).astype(np.int32)


def _allowed(name, x, t):
    """`x` with the masked scores (MASKED, or -inf once scaled) set to 0: they are no number
    to compare, only where the softmax gives 0."""
    if not name.endswith("hook_attn_scores"):
        return np.asarray(x)
    return np.where(np.tril(np.ones((t, t), bool)), x, 0.0)


@pytest.fixture(scope="module")
def forward_jit():
    return jax.jit(lambda model, params, tokens: model.apply({"params": params}, tokens),
                   static_argnums=0)


def test_every_hook_moves_the_logits_far_more_than_the_bound(model_weights, arrays):
    # The paths are held to REL_BOUND: a hook a path loses must move the logits by far more,
    # or losing it would pass. Each point's hooks, taken out alone, in the float64 forward.
    cfg, params = model_weights
    full, _ = numpy_forward(cfg, params, TOKENS, arrays)
    bound = REL_BOUND * np.abs(full).max()
    moved = {name: np.abs(numpy_forward(cfg, params, TOKENS, {
        n: a for n, a in arrays.items() if n != name})[0] - full).max() for name in arrays}
    weakest = min(moved, key=moved.get)
    assert moved[weakest] > 50 * bound, (weakest, moved[weakest], bound)


@pytest.mark.parametrize("kind", KINDS)
def test_the_uncached_forward_runs_every_hook_as_a_float64_forward_does(model_weights, arrays,
                                                                        forward_jit, kind):
    cfg, params = model_weights
    t = TOKENS.shape[1]

    def reference(a):
        logits, acts = numpy_forward(cfg, params, TOKENS, a)
        return {"logits": logits, **{n: _allowed(n, x, t) for n, x in acts.items()}}

    def with_hooks(a):
        return {"logits": run_with_hooks(params, cfg, TOKENS, _hooks(kind, a))}

    def hooked_model(a):
        model, p = _hooked(cfg, params, kind, a)
        return {"logits": forward_jit(model, p, TOKENS)}

    def with_cache(a):  # the cached values are those after the points' hooks
        logits, cache = run_with_cache(params, cfg, TOKENS, hooks=_hooks(kind, a))
        return {"logits": logits, **{n: _allowed(n, x, t) for n, x in cache.items()}}

    check_path(f"run_with_hooks ({kind} hooks)", with_hooks, reference, arrays, _relative)
    check_path(f"GPTModel(cfg, hooks=...) ({kind} hooks)", hooked_model, reference, arrays,
               _relative)
    # Each cached value is held to the bound of its own size (the same chain of roundings).
    check_path(f"run_with_cache ({kind} hooks)", with_cache, reference, arrays, _relative)


# Left-padded as `generate` lays prompts out: row 1's tokens start at slot 2. PREFILL slots go
# through the cache at once, then one token per step; the cache has a slot more than the tokens
# (an empty one that every query must ignore).
START = np.array([0, 2], np.int32)
PREFILL = 4


@functools.partial(jax.jit, static_argnames=("model", "prefill", "slots"))
def decoded_logits(params, tokens, start, *, model, prefill, slots):
    """Logits `[B, T, V]` of left-padded `tokens` (row b's from slot `start[b]`) by `model`'s
    cached decoding: the first `prefill` slots at once into an empty cache of `slots`, as
    `generate`'s prefill, then one token per step."""
    b, t = tokens.shape
    decode = apply_method(model, {"params": params}, GPTModel.decode)
    at = jnp.arange(prefill)[None, :]
    out = decode(tokens[:, :prefill], init_cache(model.cfg, b, slots, model.dtype), 0,
                 positions=jnp.maximum(at - start[:, None], 0), valid=at >= start[:, None])

    def step(cache, i):  # a loop, as generate's: one step compiled, its slot an argument
        token = lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
        step = decode(token, cache, i, positions=(i - start)[:, None])
        return step.cache, step.logits[:, 0]

    _, logits = lax.scan(step, out.cache, jnp.arange(prefill, t))  # [T - prefill, B, V]
    return jnp.concatenate([out.logits, logits.transpose(1, 0, 2)], axis=1)


def _rows(logits):
    """Each row's logits from its first token on, rows one after the other: `[tokens, V]`."""
    return np.concatenate([np.asarray(logits)[r, s:] for r, s in enumerate(START)])


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_cached_decoding_run_every_hook(model_weights, arrays, kind):
    # Each cached step sees its one new token against the cache's slots ([B, 1, ...], scores
    # [B, H, 1, S]), where the uncached forward sees every token at once.
    cfg, params = model_weights
    slots = TOKENS.shape[1] + 1

    def reference(a):
        return {"logits": np.concatenate([numpy_forward(cfg, params, TOKENS[r:r + 1, s:], a)[0][0]
                                          for r, s in enumerate(START)])}

    def decoding(base, base_params):
        def run(a):
            model, p = _hooked(cfg, base_params, kind, a, base)
            return {"logits": _rows(decoded_logits(p, TOKENS, START, model=model,
                                                   prefill=PREFILL, slots=slots))}
        return run

    check_path(f"prefill and cached decoding ({kind} hooks)", decoding(GPTModel(cfg), params),
               reference, arrays, _relative)
    # The Generator's decode-ready weights: Q/K/V fused, matrices as rows on the CPU.
    model, laid_out = Generator(params, cfg).weights(len(START))
    check_path(f"cached decoding in the Generator's layout {model.layout} ({kind} hooks)",
               decoding(model, laid_out), reference, arrays, _relative)


# --- generation, training and patching (slow: a program or two per path and kind) ------------

NEW = 8  # new tokens: 5 + 8 stays within the context (16), where the cache is used throughout


def greedy_tokens(cfg, params, prompts, n, arrays):
    """`(tokens [B, n], margin, largest)`: each row's greedy continuation by the float64
    forward, the smallest gap between the first and second logit of any step, and the largest
    logit of any step."""
    out, margin, largest = [], np.inf, 0.0
    for row in prompts:
        tokens = list(row)
        for _ in range(n):
            logits = numpy_forward(cfg, params, np.asarray([tokens]), arrays)[0][0, -1]
            first, second = np.sort(logits)[::-1][:2]
            margin, largest = min(margin, first - second), max(largest, np.abs(logits).max())
            tokens.append(int(np.argmax(logits)))
        out.append(tokens[len(row):])
    return np.asarray(out), margin, largest


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_generation_path_runs_every_hook(model_weights, arrays, kind):
    # Only tokens come out of these paths: the logits of the same hooks in the same decoding
    # programs are held to the bound in the fast tier (prefill and cached decoding).
    cfg, params = model_weights
    ragged = [TOKENS[0, :5].tolist(), TOKENS[1, :3].tolist()]  # generate left-pads row 1
    even = TOKENS[:, :5].tolist()  # the book's loop takes rows of one length
    for prompts in (ragged, even):
        # A path's logits are within the bound of the float64 ones, so its greedy tokens are
        # theirs unless the two largest logits of a step are within twice the bound.
        _, margin, largest = greedy_tokens(cfg, params, prompts, NEW, arrays)
        assert margin > 2 * REL_BOUND * largest, (margin, largest)

    def reference(prompts):
        return lambda a: {"tokens": greedy_tokens(cfg, params, prompts, NEW, a)[0]}

    def new_tokens(rows):
        return {"tokens": np.asarray([row[len(p):] for row, p in zip(rows, ragged, strict=True)])}

    paths = {
        "generate": lambda a: new_tokens(generate(params, cfg, ragged, NEW,
                                                  hooks=_hooks(kind, a))),
        "generate(use_cache=False)": lambda a: new_tokens(generate(
            params, cfg, ragged, NEW, hooks=_hooks(kind, a), use_cache=False)),
        "generate_stream": lambda a: {"tokens": np.concatenate(list(generate_stream(
            params, cfg, ragged, NEW, chunk_size=3, hooks=_hooks(kind, a))), axis=1)},
    }
    for path, run in paths.items():
        check_path(f"{path} ({kind} hooks)", run, reference(ragged), arrays, _exact)
    check_path(f"generate_text_simple ({kind} hooks)", lambda a: {"tokens": np.asarray(
        generate_text_simple(params, cfg, np.asarray(even), NEW, hooks=_hooks(kind, a)))[:, 5:]},
        reference(even), arrays, _exact)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_train_step_runs_every_hook_in_its_loss_and_gradients(model_weights, arrays, kind):
    # make_train_step binds every hook, a Partial too: its arrays are constants of the step.
    cfg, params = model_weights
    inputs, targets = jnp.asarray(TOKENS[:, :-1]), jnp.asarray(TOKENS[:, 1:])
    # AdamW's first update is -lr * g / (|g| + eps) (both moments bias-corrected to g and
    # g**2): with lr = eps = 1, u = old - new gives the gradient back, g = u / (1 - |u|).
    tc = TrainConfig(batch_size=2, seq_len=6, steps=1, lr=1.0, min_lr=1.0, eps=1.0,
                     weight_decay=0.0, grad_clip=None)

    def reference(a):
        def loss(p):
            logits = run_with_hooks(p, cfg, inputs, _hooks(kind, a))
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()

        value, grads = jax.value_and_grad(loss)(params)
        return {"loss": value, "gradients": _flat(grads)}

    def train_step(a):
        step = make_train_step(cfg, tc, hooks=_hooks(kind, a))
        new, metrics = step(init_train_state(cfg, tc, params), (inputs, targets),
                            jax.random.key(0))
        u = _flat(params) - _flat(new.params)
        return {"loss": metrics["loss"], "gradients": u / (1 - np.abs(u))}

    # Twice REL_BOUND: the backward pass runs the dots again, transposed (measured: 2e-6).
    check_path(f"the train step ({kind} hooks)", train_step, reference, arrays,
               lambda want: {key: 2 * bound for key, bound in _relative(want).items()})


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def _logit_difference(logits):  # [T, V] -> the last position's logit of 3 over that of 7
    return logits[-1, 3] - logits[-1, 7]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_patching_sweeps_run_a_hooked_models_hooks(model_weights, arrays, kind):
    # A model's pytree hooks go in as a free table with their arrays merged into the params
    # (`free_hooks` + `with_hook_args`); reference_sweep merges each patch's arrays beside them.
    cfg, params = model_weights
    clean, corrupted = TOKENS[0, :5], TOKENS[1, :5]
    held = {}  # one hooked model per set of arrays, for the sweep and its reference alike

    def hooked(a):
        if id(a) not in held:
            model, p = _hooked(cfg, params, kind, a)
            held[id(a)] = a, model, p, run_with_cache(p, cfg, clean, model=model)[1]
        return held[id(a)][1:]

    def sweep(fn, name):
        def run(a):
            model, p, cache = hooked(a)
            return {"metric": fn(p, cfg, corrupted, cache, _logit_difference, name, model=model)}
        return run

    for name in ("resid_pre", "z_by_pos", "pattern_by_pos"):  # each shape of activation
        check_path(f"patch_sweep {name!r} with a hooked model ({kind} hooks)",
                   sweep(patching.patch_sweep, name), sweep(patching.reference_sweep, name),
                   arrays, _relative)
