"""Hook points: every activation by name, hooks that change them, and nothing when unused."""

import difflib

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

from jaxgpt.config import GPTConfig
from jaxgpt.interp import cache as cache_module
from jaxgpt.interp.cache import act_name, run_with_cache, run_with_hooks
from jaxgpt.nn import FeedForward, GPTModel, MultiHeadAttention, init_params
from jaxgpt.nn import attention as nn_attention
from jaxgpt.nn import layers as nn_layers
from jaxgpt.nn import model as nn_model
from jaxgpt.nn.cache import init_cache
from jaxgpt.nn.hooks import (
    HookTable,
    free_hooks,
    hook_names,
    hook_point,
    hook_points,
    hook_table,
    module_path,
    with_hook_args,
)
from jaxgpt.nn.layout import Layout, prepare
from jaxgpt.training.step import flat_logits

Partial = jax.tree_util.Partial


@pytest.fixture(scope="module")
def tiny():
    cfg = GPTConfig(**TINY)
    return cfg, init_params(cfg, 1)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 7)).astype(np.int32)


def _add(vector, x, name):
    return x + vector


def _scale(factor, x, name):
    return x * factor


# --- names ---------------------------------------------------------------------------------------


def test_the_cache_holds_every_hook_point_in_forward_order(tiny, ids):
    cfg, params = tiny
    _, cache = run_with_cache(params, cfg, ids)
    assert list(cache) == list(hook_names(cfg))
    assert len(cache) == 2 + 17 * cfg.n_layers + 2
    b, t, d, h, dh = 2, 7, cfg.emb_dim, cfg.n_heads, cfg.head_dim
    shapes = {"hook_pos_embed": (b, t, d), "blocks.1.ln2.hook_scale": (b, t, 1),
              "blocks.1.attn.hook_q": (b, t, h, dh), "blocks.1.attn.hook_z": (b, t, h, dh),
              "blocks.1.attn.hook_attn_scores": (b, h, t, t), "blocks.1.mlp.hook_post":
              (b, t, 4 * d), "ln_final.hook_normalized": (b, t, d)}
    for name, shape in shapes.items():
        assert cache[name].shape == shape, name
    # The residual stream adds up: embeddings, then each block's two writes.
    total = cache["hook_embed"] + cache["hook_pos_embed"]
    np.testing.assert_allclose(total, cache["resid_pre", 0], atol=1e-6)
    for i in range(cfg.n_layers):
        total = total + cache["attn_out", i] + cache["mlp_out", i]
        np.testing.assert_allclose(total, cache["resid_post", i], atol=1e-5)


def _shapes(cfg, b, t, s):
    """Every hook point's name and shape, as the table in `nn.hooks` gives them."""
    dims = {"B": b, "T": t, "S": s, "D": cfg.emb_dim, "4D": 4 * cfg.emb_dim, "H": cfg.n_heads,
            "Dh": cfg.head_dim, "1": 1}
    return [(name, tuple(dims[a] for a in point.shape.split())) for name, point in
            hook_points(cfg)]


def test_the_model_reaches_the_hook_points_of_the_table_in_order(tiny, ids):
    # The table in nn.hooks is the only list of hook points: a hook at each of its names must
    # see exactly those names, in forward order, with the table's shapes, on the full path and
    # a cached step (S: the cache's slots).
    cfg, params = tiny
    reached = []

    def record(x, name):
        reached.append((name, x.shape))
        return x

    model = GPTModel(cfg, hooks=hook_table(cfg, [(n, record) for n in hook_names(cfg)]))
    b, t = ids.shape
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.asarray(ids)), params)
    assert reached == _shapes(cfg, b, t, t)
    reached.clear()
    jax.eval_shape(lambda p, c: model.apply({"params": p}, jnp.asarray(ids), c, 0,
                                            method=GPTModel.decode),
                   params, init_cache(cfg, b, 16))
    assert reached == _shapes(cfg, b, t, 16)
    # A free hook at each point finds its arrays where `module_path` puts them.
    zeros = [(n, Partial(_add, jnp.zeros(()))) for n in hook_names(cfg)]
    np.testing.assert_allclose(run_with_hooks(params, cfg, ids, zeros),
                               run_with_hooks(params, cfg, ids, []), atol=1e-6)


class GatedFeedForward(FeedForward):
    """A variant that calls a hook point the table does not hold."""

    @nn.compact
    def __call__(self, x):
        return self.hook("hook_gate", x.reshape(-1, x.shape[-1]), x.shape[:-1]).reshape(x.shape)


def test_a_hook_point_the_table_does_not_hold_is_refused(tiny, ids):
    cfg, params = tiny
    model = GPTModel(cfg, feed_forward_cls=GatedFeedForward)
    with pytest.raises(ValueError, match="hook_point 'blocks.0.mlp.hook_gate' is not in"):
        run_with_cache(params, cfg, ids, names=[("resid_post", 0)], model=model)


def test_short_names_are_transformer_lens_s(tiny):
    assert act_name("resid_pre", 3) == "blocks.3.hook_resid_pre"
    assert act_name("pattern", 0) == act_name("attn", 0) == "blocks.0.attn.hook_pattern"
    assert act_name("scale", 2, "ln2") == "blocks.2.ln2.hook_scale"
    assert act_name("scale", 2) == "blocks.2.ln1.hook_scale"
    assert act_name("scale") == "ln_final.hook_scale"
    assert act_name("embed") == "hook_embed"
    assert act_name("blocks.1.mlp.hook_pre") == "blocks.1.mlp.hook_pre"
    with pytest.raises(ValueError, match="unknown activation 'resid'"):
        act_name("resid", 1)
    assert module_path("blocks.3.attn.hook_q") == (("trf_blocks_3", "att"), "hook_q")
    assert module_path("ln_final.hook_scale") == (("final_norm",), "hook_scale")


def test_run_with_cache_keeps_only_what_is_asked_for(tiny, ids):
    cfg, params = tiny
    _, cache = run_with_cache(params, cfg, ids, names=[("pattern", 1), "hook_embed"])
    assert list(cache) == ["hook_embed", "blocks.1.attn.hook_pattern"]
    _, cache = run_with_cache(params, cfg, ids, names=lambda n: n.endswith("hook_scale"))
    assert list(cache) == ["blocks.0.ln1.hook_scale", "blocks.0.ln2.hook_scale",
                           "blocks.1.ln1.hook_scale", "blocks.1.ln2.hook_scale",
                           "ln_final.hook_scale"]
    with pytest.raises(KeyError, match="not in this cache"):
        cache["resid_pre", 0]
    with pytest.raises(ValueError, match=r"layer 2 is out of range \[0, 1\]"):
        run_with_cache(params, cfg, ids, names=[("resid_pre", 2)])
    with pytest.raises(ValueError, match="unknown cached name 'blocks.0.hook_x'"):
        run_with_cache(params, cfg, ids, names=["blocks.0.hook_x"])
    with pytest.raises(ValueError, match="a list of names or a predicate"):
        run_with_cache(params, cfg, ids, names="hook_embed")
    with pytest.raises(ValueError, match="more than the model's context_length 16"):
        run_with_cache(params, cfg, np.zeros((1, 17), np.int32))


def test_stack_activation_stacks_each_layers_activation(tiny, ids):
    cfg, params = tiny
    _, cache = run_with_cache(params, cfg, ids)
    for layer, count in ((None, cfg.n_layers), (-1, cfg.n_layers), (1, 1)):
        got = np.asarray(cache.stack_activation("resid_pre", layer))
        want = np.stack([np.asarray(cache[f"blocks.{i}.hook_resid_pre"]) for i in range(count)])
        np.testing.assert_array_equal(got, want, err_msg=f"stack_activation('resid_pre', "
                                                         f"{layer}) is not layers 0..{count - 1}")


def test_stop_at_layer_returns_the_residual_stream_and_runs_nothing_after(tiny, ids):
    cfg, params = tiny
    _, full = run_with_cache(params, cfg, ids)
    for n in range(cfg.n_layers + 1):
        resid, cache = run_with_cache(params, cfg, ids, stop_at_layer=n)
        want = full["resid_pre", n] if n < cfg.n_layers else full["resid_post", n - 1]
        np.testing.assert_allclose(resid, want, atol=1e-6)
        assert not [k for k in cache if k.startswith(f"blocks.{n}.") or k.startswith("ln_final")]
    jaxpr = jax.make_jaxpr(lambda p: GPTModel(cfg).apply(
        {"params": p}, jnp.asarray(ids), stop_at_layer=1, method=GPTModel.hidden))(params)
    # Block 0 only: Q, K, V, scores, weighted values, out_proj and the two feed-forward layers.
    assert str(jaxpr).count("dot_general") == 8
    with pytest.raises(ValueError, match=r"stop_at_layer must be an int in \[0, 2\], got 3"):
        run_with_hooks(params, cfg, ids, [], stop_at_layer=3)


# --- hooks ---------------------------------------------------------------------------------------


def test_patching_a_whole_residual_stream_reproduces_the_other_run(tiny, ids):
    cfg, params = tiny
    clean, corrupt = ids[:1], ids[1:]
    clean_logits, clean_cache = run_with_cache(params, cfg, clean)
    replace = Partial(lambda value, x, name: value, clean_cache["resid_pre", 1])
    patched = run_with_hooks(params, cfg, corrupt, [("blocks.1.hook_resid_pre", replace)])
    np.testing.assert_allclose(patched, clean_logits, atol=1e-5)
    plain = run_with_hooks(params, cfg, corrupt, [])
    assert np.abs(plain - clean_logits).max() > 0.1  # the patch did the work


def test_ablating_one_head_removes_exactly_its_write(tiny, ids):
    cfg, params = tiny
    head = 2

    def ablate(x, name):  # [B, T, H, Dh]
        return x.at[:, :, head].set(0.0)

    _, plain = run_with_cache(params, cfg, ids, names=[("z", 0), ("attn_out", 0)])
    _, ablated = run_with_cache(params, cfg, ids, names=[("attn_out", 0)],
                                hooks=[("blocks.0.attn.hook_z", ablate)])
    w_o = np.asarray(params["trf_blocks_0"]["att"]["out_proj"]["kernel"])  # [D, D]
    dh = cfg.head_dim
    write = np.asarray(plain["z", 0])[:, :, head] @ w_o[head * dh:(head + 1) * dh]
    np.testing.assert_allclose(ablated["attn_out", 0], plain["attn_out", 0] - write, atol=1e-5)


def test_hooks_at_one_point_run_in_order_and_see_their_name(tiny, ids):
    cfg, params = tiny
    seen = []

    def record(x, name):
        seen.append(name)
        return x

    vector = jnp.asarray(np.random.default_rng(1).normal(size=cfg.emb_dim), jnp.float32)
    hooks = [("blocks.0.hook_resid_post", Partial(_add, vector)),
             ("blocks.0.hook_resid_post", Partial(_scale, jnp.float32(2.0))),
             ("blocks.0.hook_resid_post", record)]
    _, plain = run_with_cache(params, cfg, ids, names=[("resid_post", 0)])
    _, hooked = run_with_cache(params, cfg, ids, names=[("resid_post", 0)], hooks=hooks)
    np.testing.assert_allclose(hooked["resid_post", 0], (plain["resid_post", 0] + vector) * 2,
                               atol=1e-5)
    assert seen == ["blocks.0.hook_resid_post"]
    with pytest.raises(ValueError, match="a hook is a \\(name, fn\\) pair"):
        run_with_hooks(params, cfg, ids, [("blocks.0.hook_resid_post",)])


def test_the_models_own_hooks_run_before_the_calls(tiny, ids):
    # At one point, a hooked model's hooks come first, then run_with_hooks'/run_with_cache's:
    # an add then a scale is not a scale then an add.
    cfg, params = tiny
    point = "blocks.1.hook_resid_mid"
    vector = jnp.asarray(np.random.default_rng(6).normal(size=cfg.emb_dim), jnp.float32)
    model = GPTModel(cfg, hooks=hook_table(cfg, [(point, Partial(_add, vector))]))
    _, plain = run_with_cache(params, cfg, ids, names=[point])
    _, hooked = run_with_cache(params, cfg, ids, names=[point], model=model,
                               hooks=[(point, Partial(_scale, jnp.float32(2.0)))])
    np.testing.assert_allclose(hooked[point], (plain[point] + vector) * 2, atol=1e-5,
                               err_msg="the model's own hook did not run before the call's")


def test_a_hook_that_changes_the_shape_is_refused(tiny, ids):
    cfg, params = tiny
    with pytest.raises(ValueError, match=r"the hook at blocks.0.hook_resid_post returned shape "
                                         r"\(2, 7\) for an activation of shape \(2, 7, 32\)"):
        run_with_hooks(params, cfg, ids, [("blocks.0.hook_resid_post",
                                           lambda x, name: x.sum(axis=-1))])


def test_run_with_hooks_is_differentiable_in_the_hooks_arrays(tiny, ids):
    cfg, params = tiny

    def logit(vector):
        out = run_with_hooks(params, cfg, ids[:1], [("blocks.0.hook_resid_mid",
                                                     Partial(_add, vector))])
        return out[0, -1, 5] - out[0, -1, 7]

    v0 = jnp.asarray(np.random.default_rng(2).normal(size=cfg.emb_dim), jnp.float32)
    grad = jax.grad(logit)(v0)
    direction = jnp.asarray(np.random.default_rng(3).normal(size=cfg.emb_dim), jnp.float32)
    eps = 1e-2
    # Central difference: error ~ eps**2 * (third derivative) plus fp32 rounding of logits of
    # order 1 divided by 2 eps (~1e-5): well inside 2e-3 of a derivative of order 0.1-1.
    numeric = (logit(v0 + eps * direction) - logit(v0 - eps * direction)) / (2 * eps)
    assert abs(float(grad @ direction)) > 1e-2
    np.testing.assert_allclose(grad @ direction, numeric, rtol=2e-3, atol=2e-4)


def test_new_arrays_in_a_pytree_hook_reuse_the_compiled_program(tiny, ids):
    cfg, params = tiny
    rng = np.random.default_rng(4)
    run_with_hooks(params, cfg, ids, [("blocks.1.hook_resid_pre", Partial(_add, jnp.zeros(32)))])
    size = cache_module._forward._cache_size()
    outs = [run_with_hooks(params, cfg, ids, [("blocks.1.hook_resid_pre", Partial(
        _add, jnp.asarray(rng.normal(size=32), jnp.float32)))]) for _ in range(3)]
    assert cache_module._forward._cache_size() == size
    assert np.abs(outs[0] - outs[1]).max() > 1e-3  # and each ran with its own vector
    # A plain closure is a new function each time: it compiles anew.
    vec = jnp.ones(32)
    run_with_hooks(params, cfg, ids, [("blocks.1.hook_resid_pre", lambda x, n: x + vec)])
    assert cache_module._forward._cache_size() == size + 1
    table, args = free_hooks(cfg, [("blocks.1.attn.hook_q", Partial(_scale, jnp.ones(())))])
    assert args == {"trf_blocks_1": {"att": {"hook_args": {"hook_q": [[jnp.ones(())]]}}}}


def test_a_models_own_pytree_hooks_run_before_those_of_the_call(tiny, ids):
    # A model may carry pytree hooks of its own (a free table, their arrays merged into the
    # params, as `patch_sweep(..., model=...)` takes them); the call's arrays at the same point
    # merge in beside them, and its hooks run after the model's.
    cfg, params = tiny
    point = "blocks.0.hook_resid_post"
    vector = jnp.asarray(np.random.default_rng(6).normal(size=cfg.emb_dim), jnp.float32)
    table, args = free_hooks(cfg, [(point, Partial(_add, vector))])
    _, plain = run_with_cache(params, cfg, ids, names=[point])
    _, got = run_with_cache(with_hook_args(params, args), cfg, ids, names=[point],
                            model=GPTModel(cfg, hooks=table),
                            hooks=[(point, Partial(_scale, jnp.float32(2.0)))])
    # An add and a doubling: two fp32 roundings of values of order 1.
    np.testing.assert_allclose(got[point], (plain[point] + vector) * 2, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_hooks_see_per_head_qkv_in_the_fused_decoding_layout(tiny, ids):
    cfg, params = tiny
    names = [f"blocks.1.attn.hook_{n}" for n in "qkv"]
    _, want = run_with_cache(params, cfg, ids[:, :5], names=names)
    layout = Layout(fused_qkv=True, qkv=True, out=True, fc=True, proj=True, head=True)
    model = GPTModel(cfg, layout=layout, hooks=hook_table(cfg, cache=names))
    variables = {"params": prepare(params, cfg, jnp.float32, layout)}
    cache = init_cache(cfg, 2, 8)
    out, state = model.apply(variables, jnp.asarray(ids[:, :4]), cache, 0,
                             method=GPTModel.decode, mutable=["intermediates"])
    _, state = model.apply(variables, jnp.asarray(ids[:, 4:5]), out.cache, 4,
                           positions=jnp.full((2, 1), 4), method=GPTModel.decode,
                           mutable=["intermediates"])
    got = dict(cache_module.flatten_sown(state["intermediates"]))
    for name in names:  # the cached step sees only its new token, [B, 1, H, Dh]
        np.testing.assert_allclose(got[name], want[name][:, 4:5], atol=1e-5)


class DoubledFeedForward(FeedForward):
    """A variant that replaces `__call__` and does not call the hook points inside it."""

    @nn.compact
    def __call__(self, x):
        return 2.0 * nn.Dense(self.cfg.emb_dim, name="layers_0")(x)


class QuietAttention(MultiHeadAttention):
    def score_bias(self, mask):
        return -0.5 * jnp.abs(mask.q_pos[:, None, :, None] - mask.k_pos[:, None, None, :])


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _quiet_pattern(cache, t, dh):
    """QuietAttention's pattern from its cached q and k, in float64: the softmax of the
    scaled scores plus its bias, causally masked."""
    q, k = (np.asarray(cache[name, 0], np.float64) for name in ("q", "k"))  # [B, T, H, Dh]
    pos = np.arange(t)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    scores = scores - 0.5 * np.abs(pos[:, None] - pos[None, :])
    return _softmax(np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf))


@pytest.mark.slow
def test_a_variant_part_keeps_the_hook_points_it_inherits(tiny, ids):
    cfg, params = tiny
    t, dh = ids.shape[1], cfg.head_dim
    names = [(n, 0) for n in ("q", "k", "pattern")]
    model = GPTModel(cfg, attention_cls=QuietAttention)
    plain_logits, plain = run_with_cache(params, cfg, ids, names=[("pattern", 0)])
    logits, biased = run_with_cache(params, cfg, ids, names=names, model=model)
    # Scores are dots of 8 fp32 terms, ~1e-7 relative each, of size < 1, and softmax moves by
    # no more than its scores do: 1e-6 holds the weights (each < 1) with a wide margin.
    np.testing.assert_allclose(biased["pattern", 0], _quiet_pattern(biased, t, dh), atol=1e-6)
    assert np.abs(plain["pattern", 0] - biased["pattern", 0]).max() > 0.05  # the bias acts
    # A hook at a point the variant inherits acts there: the pattern follows the hooked
    # queries (the cached q is after the hook), and the logits move.
    triple = [("blocks.0.attn.hook_q", Partial(_scale, jnp.float32(3.0)))]
    hooked_logits, hooked = run_with_cache(params, cfg, ids, names=names, model=model,
                                           hooks=triple)
    np.testing.assert_allclose(hooked["q", 0], 3 * np.asarray(biased["q", 0]), rtol=1e-6)
    np.testing.assert_allclose(hooked["pattern", 0], _quiet_pattern(hooked, t, dh), atol=1e-6)
    assert np.abs(hooked["pattern", 0] - biased["pattern", 0]).max() > 1e-3
    assert np.abs(hooked_logits - logits).max() > 1e-4 * np.abs(logits).max()
    assert np.abs(logits - plain_logits).max() > 1e-4 * np.abs(logits).max()

    # A feed-forward variant that replaces `__call__`: the block's points see what it computes,
    # 2 * layers_0(norm2(resid_mid)), here from the cached resid_mid in float64.
    doubled = GPTModel(cfg, feed_forward_cls=DoubledFeedForward)
    weights = doubled.init(jax.random.key(0), jnp.asarray(ids))["params"]
    _, cache = run_with_cache(weights, cfg, ids, names=[("resid_mid", 0), ("mlp_out", 0)],
                              model=doubled)
    block = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), weights["trf_blocks_0"])
    x = np.asarray(cache["resid_mid", 0], np.float64)
    centred = x - x.mean(-1, keepdims=True)
    normed = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5)
    dense = block["ff"]["layers_0"]
    want = 2 * ((block["norm2"]["scale"] * normed + block["norm2"]["shift"]) @ dense["kernel"]
                + dense["bias"])
    # Two fp32 steps of ~1e-7 relative on values of order 1 (the LayerNorm, a 32-term dot).
    np.testing.assert_allclose(cache["mlp_out", 0], want, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="never reached 'blocks.0.mlp.hook_pre'"):
        run_with_cache(weights, cfg, ids, names=[("pre", 0)], model=doubled)


# --- no hooks, no cost ---------------------------------------------------------------------------

def _live(jaxpr):
    """`jaxpr` without the equations nothing uses (the lowering drops them too)."""
    literal = jax.extend.core.Literal
    used = {v for v in jaxpr.outvars if not isinstance(v, literal)}
    keep = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in used for v in eqn.outvars):
            keep.append(eqn)
            used.update(v for v in eqn.invars if not isinstance(v, literal))
    return jaxpr.replace(eqns=keep[::-1])


def _programs(cfg, params, model):
    """The jaxprs (live equations) of the forward pass, a cached decoding step and the
    training gradient (attention remat) of `model`."""
    ids = jnp.zeros((2, 7), jnp.int32)
    programs = {
        "forward": jax.make_jaxpr(lambda p, i: model.apply({"params": p}, i))(params, ids),
        "cached_step": jax.make_jaxpr(lambda p, c, t: model.apply(
            {"params": p}, t, c, 7, positions=jnp.full((2, 1), 7), method=GPTModel.decode))(
            params, init_cache(cfg, 2, 16), jnp.zeros((2, 1), jnp.int32)),
        "train_grad": jax.make_jaxpr(jax.grad(lambda p, i: model.clone(remat="attention").apply(
            {"params": p}, i).sum()))(params, ids),
    }
    return {k: _live(p.jaxpr) for k, p in programs.items()}


def _ops(jaxpr, indent=""):
    """The equations as `primitive outputs <- inputs` (shapes, no variable names), nested
    programs indented: lines that a diff aligns."""
    lines = []
    for eqn in jaxpr.eqns:
        ins = " ".join(str(getattr(v, "aval", v)) for v in eqn.invars)
        lines.append(f"{indent}{eqn.primitive.name} "
                     f"{' '.join(str(v.aval) for v in eqn.outvars)} <- {ins}")
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            lines += _ops(sub, indent + "  ")
    return lines


def _differences(want, got):
    """Per program that differs, a unified diff of its equations (or of its text, where only
    the equations' parameters differ)."""
    out = {}
    for k in want:
        if str(want[k]) != str(got[k]):
            a, b = _ops(want[k]), _ops(got[k])
            if a == b:
                a, b = str(want[k]).splitlines(), str(got[k]).splitlines()
            out[k] = "\n".join(difflib.unified_diff(a, b, "without hook calls", "this model",
                                                    lineterm="", n=2))
    return out


def _without_hook_calls(monkeypatch):
    """The model's hook calls short-circuited where they are made: `hook_point` and the parts'
    `hook` methods return the activation they are given, untouched."""
    for module in (nn_model, nn_layers, nn_attention):
        monkeypatch.setattr(module, "hook_point", lambda module, table, name, x: x)
    monkeypatch.setattr(MultiHeadAttention, "hook", lambda self, name, x, shape: x)
    monkeypatch.setattr(FeedForward, "hook", lambda self, name, x, lead: x)


def test_a_model_without_hooks_traces_the_program_of_one_without_hook_calls(tiny, monkeypatch):
    # A model without hooks must cost nothing: its programs are those of the same model with
    # every hook call taken out, equation for equation (the diff says what was gained).
    cfg, params = tiny
    with monkeypatch.context() as m:
        _without_hook_calls(m)
        reference = _programs(cfg, params, GPTModel(cfg))
    assert GPTModel(cfg).hooks == HookTable()  # the default: an empty table
    differences = _differences(reference, _programs(cfg, params, GPTModel(cfg)))
    assert not differences, "\n\n".join(f"{k}:\n{d}" for k, d in differences.items())
    # Positive controls: a hook that adds 0 is seen in every program, as an add ...
    zero = GPTModel(cfg, hooks=hook_table(cfg, [("blocks.1.hook_resid_mid", _zero)]))
    differences = _differences(reference, _programs(cfg, params, zero))
    assert set(differences) == set(reference)
    assert all("\n+add " in d for d in differences.values()), differences
    # ... and a hook method that reshapes even when no hook is given is caught: the test
    # sees a model without hooks that gained equations.
    with monkeypatch.context() as m:
        m.setattr(MultiHeadAttention, "hook", lambda self, name, x, shape: hook_point(
            self, self.hooks, name, x.reshape(shape)).reshape(x.shape))
        differences = _differences(reference, _programs(cfg, params, GPTModel(cfg)))
    assert set(differences) == set(reference)
    assert all("\n+reshape " in d for d in differences.values()), differences


def _zero(x, name):
    return x + 0.0


def test_flat_logits_take_the_models_hooks(tiny, ids):
    # The training loss reads the logits through `flat_logits`: a hooked model changes them.
    cfg, params = tiny
    vector = jnp.asarray(np.random.default_rng(5).normal(size=cfg.emb_dim), jnp.float32)
    model = GPTModel(cfg, hooks=hook_table(cfg, [("blocks.0.hook_resid_post",
                                                  Partial(_add, vector))]))
    got = flat_logits(model, params, jnp.asarray(ids))
    want = run_with_hooks(params, cfg, ids, [("blocks.0.hook_resid_post", Partial(_add, vector))])
    np.testing.assert_allclose(got, want.reshape(-1, cfg.vocab_size), atol=1e-5)
