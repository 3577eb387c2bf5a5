"""Reading the residual stream (TransformerLens's `ActivationCache` methods on the same
weights), the logit lens, and attribution patching."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jax_weights_of, random_hf_gpt2, reference, sharpened, tl_bridge

from jaxgpt.interp import patching, residual
from jaxgpt.interp.attribution import attribution_patch, metric_and_gradients
from jaxgpt.interp.cache import ActivationCache, run_with_cache

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
    assert estimate.shape == exact.shape
    scale = float(jnp.abs(exact).max())
    assert scale > 1e-5
    np.testing.assert_allclose(estimate, exact, atol=0.05 * scale + 2e-6)
