"""Reading the residual stream (TransformerLens's `ActivationCache` methods on the same
weights), the logit lens, and attribution patching."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, jax_weights_of, random_hf_gpt2, reference, sharpened, tl_bridge

from jaxgpt.interp import patching, residual
from jaxgpt.interp.attribution import attribution_patch, metric_and_gradients
from jaxgpt.interp.cache import ActivationCache, run_with_cache, run_with_hooks

TOKENS = np.array([[3, 17, 42, 8, 99, 0], [11, 12, 13, 14, 15, 16]])


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    torch = reference("torch")
    reference("transformer_lens")
    hf = random_hf_gpt2(seed=7)
    cfg, params = jax_weights_of(hf)
    bridge = tl_bridge(hf, tmp_path_factory.mktemp("tok"))
    _, tl_cache = bridge.run_with_cache(torch.as_tensor(TOKENS))
    _, cache = run_with_cache(params, cfg, TOKENS)
    return cfg, params, cache, bridge, tl_cache


def close(got, want):
    # fp32 activations of order 1 from two implementations: a few roundings apart.
    np.testing.assert_allclose(np.asarray(got), want.detach().numpy(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [{}, {"apply_ln": True}, {"layer": 1, "incl_mid": True},
                                    {"layer": 1, "mlp_input": True, "apply_ln": True},
                                    {"pos_slice": -1, "apply_ln": True}])
def test_accumulated_resid_is_transformer_lens_s(both, kwargs):
    cfg, params, cache, bridge, tl_cache = both
    got, labels = cache.accumulated_resid(return_labels=True, **kwargs)
    want, tl_labels = tl_cache.accumulated_resid(return_labels=True, **kwargs)
    assert labels == tl_labels
    close(got, want)


@pytest.mark.parametrize("kwargs", [{}, {"apply_ln": True}, {"layer": 1, "mlp_input": True},
                                    {"mode": "attn", "pos_slice": slice(2, 5)}])
def test_decompose_resid_is_transformer_lens_s(both, kwargs):
    cfg, params, cache, bridge, tl_cache = both
    got, labels = cache.decompose_resid(return_labels=True, **kwargs)
    want, tl_labels = tl_cache.decompose_resid(return_labels=True, **kwargs)
    assert labels == tl_labels
    close(got, want)


@pytest.mark.parametrize("kwargs", [{}, {"incl_remainder": True, "apply_ln": True},
                                    {"layer": 1, "pos_slice": -1}])
def test_stack_head_results_is_transformer_lens_s(both, kwargs):
    cfg, params, cache, bridge, tl_cache = both
    got, labels = cache.stack_head_results(return_labels=True, **kwargs)
    want, tl_labels = tl_cache.stack_head_results(return_labels=True, **kwargs)
    assert labels == tl_labels
    close(got, want)


def test_the_parts_of_the_residual_stream_add_up(both):
    cfg, params, cache, _, _ = both
    final = cache["resid_post", cfg.n_layers - 1]
    np.testing.assert_allclose(cache.decompose_resid().sum(0), final, atol=2e-5)
    heads = cache.stack_head_results(incl_remainder=True)
    np.testing.assert_allclose(heads.sum(0), final, atol=2e-5)
    biases = sum(params[f"trf_blocks_{i}"]["att"]["out_proj"]["bias"] for i in range(2))
    attn = cache.decompose_resid(mode="attn", incl_embeds=False).sum(0)
    np.testing.assert_allclose(cache.stack_head_results().sum(0) + biases, attn, atol=2e-5)


def test_direct_logit_attributions_sum_to_the_logit_difference(both):
    cfg, params, cache, _, _ = both
    logits, _ = run_with_cache(params, cfg, TOKENS, names=[])
    a, b = 7, 40
    stack = cache.decompose_resid(pos_slice=-1)  # [C, B, D]
    attrs = cache.logit_attrs(stack, a, b, pos_slice=-1)  # [C, B]
    shift = params["final_norm"]["shift"]
    w_u = params["tok_emb"]["embedding"]  # tied
    rest = shift @ (w_u[a] - w_u[b])
    np.testing.assert_allclose(attrs.sum(0) + rest, logits[:, -1, a] - logits[:, -1, b],
                               atol=2e-5)


def test_logit_attrs_are_transformer_lens_s_where_its_definition_agrees(tmp_path):
    # TransformerLens's unfolded bridge leaves the final LayerNorm's scale out of the direction
    # (its docstring warns): with that scale 1 the two definitions are one.
    torch = reference("torch")
    hf = random_hf_gpt2(seed=8)
    with torch.no_grad():
        hf.transformer.ln_f.weight.fill_(1.0)
    cfg, params = jax_weights_of(hf)
    bridge = tl_bridge(hf, tmp_path)
    _, tl_cache = bridge.run_with_cache(torch.as_tensor(TOKENS))
    _, cache = run_with_cache(params, cfg, TOKENS)
    stack, tl_stack = cache.stack_head_results(), tl_cache.stack_head_results()
    got = cache.logit_attrs(stack, jnp.array([7, 9]), jnp.array([40, 41]))
    want = tl_cache.logit_attrs(tl_stack, torch.tensor([7, 9]), torch.tensor([40, 41]))
    close(got, want)


def test_the_logit_lens_ends_in_the_models_logits(both):
    cfg, params, cache, bridge, tl_cache = both
    logits, _ = run_with_cache(params, cfg, TOKENS, names=[])
    lens, labels = residual.logit_lens(cache)
    assert lens.shape == (cfg.n_layers + 1, 2, 6, cfg.vocab_size)
    assert labels[-1] == "final_post"
    np.testing.assert_allclose(lens[-1], logits, atol=2e-5)
    want = tl_cache.accumulated_resid(apply_ln=True) @ bridge.W_U
    close(lens, want)


# --- attribution patching ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny):
    cfg, params = tiny  # conftest's tiny model, sharpened
    return cfg, sharpened(params)


def logit_diff(logits):
    return logits[-1, 3] - logits[-1, 4]


def test_the_gradient_is_the_metrics_derivative(tiny):
    cfg, params = tiny
    tokens = np.array([5, 9, 13, 2, 71])
    names = ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"]
    value, acts, grads = metric_and_gradients(params, cfg, tokens, logit_diff, names)
    rng = np.random.default_rng(3)
    for name in names:
        direction = jnp.asarray(rng.normal(size=acts[name].shape), jnp.float32)
        eps = 1e-2 / float(jnp.linalg.norm(direction)) * float(jnp.linalg.norm(acts[name]))

        def moved(sign, name=name, step=eps, direction=direction):
            hook = (name, lambda x, n: x + sign * step * direction)
            logits, _ = run_with_cache(params, cfg, tokens, names=[], hooks=[hook])
            return float(logit_diff(logits[0]))

        numeric = (moved(1) - moved(-1)) / (2 * eps)
        # A central difference of a 1% move: error ~ eps^2 times the metric's third
        # derivative, and fp32 rounding of O(1) logits over 2 eps; within 1% of a derivative
        # of order 1.
        np.testing.assert_allclose(float(jnp.vdot(grads[name], direction)), numeric, rtol=1e-2,
                                   atol=1e-3)
        assert abs(numeric) > 1e-2


@pytest.mark.parametrize("kind", ["resid_pre", "pattern_dest_src",
                                  *(pytest.param(k, marks=pytest.mark.slow) for k in (
                                      "attn_out", "z_by_pos", "v_all_pos", "pattern_by_pos"))])
def test_attribution_matches_exact_patching_for_a_small_difference(tiny, kind):
    # When the clean run differs from the corrupted one by a small amount, the first-order
    # estimate is the exact patch's effect up to second order.
    cfg, params = tiny
    tokens = np.array([5, 9, 13, 2, 71])
    _, corrupted = run_with_cache(params, cfg, tokens)
    rng = np.random.default_rng(4)
    eps = 1e-3
    near = {n: v + eps * jnp.asarray(rng.normal(size=v.shape), jnp.float32) * jnp.abs(v).mean()
            for n, v in corrupted.items()}
    clean = ActivationCache(near, params=params, cfg=cfg, model=corrupted.model)
    base = logit_diff(run_with_cache(params, cfg, tokens, names=[])[0][0])
    exact = patching.patch_sweep(params, cfg, tokens, clean, logit_diff, kind) - base
    estimate = attribution_patch(params, cfg, tokens, clean, logit_diff, kind)
    scale = float(jnp.abs(exact).max())
    assert scale > 1e-5
    # estimate - exact is the Taylor remainder, 1/2 d.H.d for the move d: second order in the
    # noise, so it scales as the first-order effects squared, <= K scale^2 with K the metric's
    # curvature along the moves over its slope squared. Measured at 4x the noise, where the
    # remainder is far above rounding: K <= 4.2 on every kind (2.4 resid_pre, 2.0
    # pattern_dest_src); K = 5. Plus the rounding of the two metric values subtracted (the
    # sweep's and one forward pass's, |metric| 1.85, logits <= 2.4, in other groupings): with
    # nothing patched they are measured <= 9.5e-7 apart on every kind, 4 of fp32's spacings
    # there (2.4e-7); 2e-6. Measured |estimate - exact|: 7.7e-7 (resid_pre) to 1.2e-6.
    assert_close(estimate, exact, 5 * scale**2 + 2e-6, f"attribution_patch({kind!r}) is not "
                 f"exact patching's effect to second order in a small difference")


# Two prompts of the tiny model far apart: 3 of their 5 tokens differ.
CLEAN, CORRUPTED = np.array([5, 60, 13, 88, 47]), np.array([5, 9, 13, 2, 71])


def _moved(alpha, direction, x, name):
    return x + alpha * direction


def first_order(params, cfg, kind, clean, corrupted, tokens=CORRUPTED, metric=None):
    """`[L, *axes]`: for each patch of `kind`, d/da of the metric of the corrupted run with the
    activation at that patch's cells moved by a (clean - corrupted), at a = 0, by forward mode.
    Every layer has its hook (a move of zeros but at the patch's layer), so one program serves
    every patch of the kind. `tokens` `[T]` (the metric `logit_diff` of `[T, V]`) or `[B, T]`
    (`metric` of `[B, T, V]`)."""
    what = patching.KINDS[kind]
    dims = what.shape.split()
    shape = patching.sizes(what, np.shape(tokens)[-1], cfg.n_heads)
    names = [f"blocks.{i}.{what.hook}" for i in range(cfg.n_layers)]
    out = np.zeros((cfg.n_layers, *shape), np.float32)
    cells = list(itertools.product(*map(range, shape)))
    for layer, cell in itertools.product(range(cfg.n_layers), cells):
        index = [slice(None)] * len(dims)  # every prompt, and all of what the patch replaces
        for axis, i in zip(what.axes, cell, strict=True):
            index[dims.index(patching.AXIS_DIM[axis])] = i
        moves = [np.zeros(corrupted[n].shape, np.float32) for n in names]
        moves[layer][tuple(index)] = np.asarray(clean[names[layer]] - corrupted[names[layer]])[
            tuple(index)]

        def moved_metric(a, moves=moves):
            hooks = [(n, jax.tree_util.Partial(_moved, a, jnp.asarray(m)))
                     for n, m in zip(names, moves, strict=True)]
            logits = run_with_hooks(params, cfg, tokens, hooks)
            return logit_diff(logits[0]) if metric is None else metric(logits)

        _, out[(layer, *cell)] = jax.jvp(moved_metric, (jnp.float32(0),), (jnp.float32(1),))
    return out


@pytest.mark.parametrize("kind", [k if k in ("resid_pre", "z_by_pos") else
                                  pytest.param(k, marks=pytest.mark.slow) for k in patching.KINDS])
def test_attribution_is_the_first_order_term_at_the_corrupted_run(tiny, kind):
    # Far from the clean run, where the first-order term at the corrupted run and at the clean
    # one differ (by 0.18 to 1.9 here): attribution patching takes the corrupted run's.
    cfg, params = tiny
    _, clean = run_with_cache(params, cfg, CLEAN)
    _, corrupted = run_with_cache(params, cfg, CORRUPTED)
    for i in range(cfg.n_layers):
        a, b = (c[f"blocks.{i}.{patching.KINDS[kind].hook}"] for c in (clean, corrupted))
        assert jnp.linalg.norm(a - b) > 0.1 * jnp.linalg.norm(b), "the runs must be far apart"
    want = first_order(params, cfg, kind, clean, corrupted)
    got = attribution_patch(params, cfg, CORRUPTED, clean, logit_diff, kind)
    # Forward and reverse mode differentiate the same fp32 function, summing the same products
    # in other orders: each sum rounds at 2^-24 (6e-8) of its terms, and a derivative of order
    # 1 (here <= 1.05) passes through some tens of sums in the two blocks, a few 1e-6 at worst.
    # Measured <= 8.3e-7 on every kind (3.1e-7 resid_pre, 2.2e-7 z_by_pos); 1e-5.
    assert_close(got, want, 1e-5, f"attribution_patch({kind!r}) is not (clean - corrupted) . "
                 f"the gradient at the corrupted run")
    assert np.abs(want).max() > 0.1, "the estimates must be of some size for this to mean much"


def test_attribution_of_a_batch_sums_its_prompts(tiny):
    # A patch replaces the activation in every prompt at once (as TransformerLens's batched
    # sweeps do), so its first-order term is the sum over the prompts, not their mean.
    cfg, params = tiny
    clean_tokens = np.stack([CLEAN, CORRUPTED[::-1]])
    corrupted_tokens = np.stack([CORRUPTED, CLEAN[::-1]])

    def metric(logits):  # [B, T, V]: each prompt's logit difference, summed
        return (logits[:, -1, 3] - logits[:, -1, 4]).sum()

    _, clean = run_with_cache(params, cfg, clean_tokens)
    _, corrupted = run_with_cache(params, cfg, corrupted_tokens)
    want = first_order(params, cfg, "resid_pre", clean, corrupted, corrupted_tokens, metric)
    got = attribution_patch(params, cfg, corrupted_tokens, clean, metric, "resid_pre")
    # As for one prompt above (two prompts' terms of order 1 summed): 1e-5.
    assert_close(got, want, 1e-5, "attribution_patch of a batch is not the first-order term "
                 "of patching every prompt at once")
    assert np.abs(want).max() > 0.1
