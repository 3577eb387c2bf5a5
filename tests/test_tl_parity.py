"""Parity with TransformerLens 4.3 on the same weights: every activation by name.

Both sides load one random Hugging Face GPT-2 (non-trivial LayerNorms and biases); the bridge
computes with Hugging Face's numerics and no weight processing. fp32 throughout: activations
of order 1 agree within 1e-5, a few float roundings apart.
"""

import numpy as np
import pytest
from conftest import jax_weights_of, random_hf_gpt2, reference, tl_bridge

from jaxgpt.interp.cache import run_with_cache
from jaxgpt.nn.hooks import hook_names

torch = reference("torch")
reference("transformer_lens")

TOKENS = np.array([[3, 17, 42, 8, 99, 0, 56], [11, 12, 13, 14, 15, 16, 17]])


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    hf = random_hf_gpt2(seed=3)
    cfg, params = jax_weights_of(hf)
    return cfg, params, tl_bridge(hf, tmp_path_factory.mktemp("tok"))


def test_every_named_activation_matches_transformer_lens(both):
    cfg, params, bridge = both
    tl_logits, tl_cache = bridge.run_with_cache(torch.as_tensor(TOKENS))
    logits, cache = run_with_cache(params, cfg, TOKENS)
    assert list(cache) == list(hook_names(cfg))
    for name in hook_names(cfg):
        want = tl_cache[name].detach().numpy()
        got = np.asarray(cache[name])
        assert got.shape == want.shape, name
        if name.endswith("hook_attn_scores"):
            # Both mask with the float32 minimum; compare the scores a query may see.
            keep = np.broadcast_to(np.tril(np.ones((7, 7), bool)), got.shape)
            np.testing.assert_array_equal(got[~keep], want[~keep])
            got, want = got[keep], want[keep]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_allclose(logits, tl_logits.detach().numpy(), atol=1e-5, rtol=0)


def test_the_layernorm_hooks_read_what_transformer_lens_reads(both):
    # hook_normalized is before scale and shift (the bridge's convention): with LayerNorm
    # parameters away from (1, 0) it differs from the norm's output, which a swap would show.
    cfg, params, _ = both
    _, cache = run_with_cache(params, cfg, TOKENS[:1])
    x = np.asarray(cache["blocks.1.hook_resid_pre"], np.float64)
    centred = x - x.mean(-1, keepdims=True)
    std = np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(cache["blocks.1.ln1.hook_scale"], std, rtol=1e-5)
    np.testing.assert_allclose(cache["blocks.1.ln1.hook_normalized"], centred / std, atol=1e-5)
    norm = params["trf_blocks_1"]["norm1"]
    out = centred / std * np.asarray(norm["scale"]) + np.asarray(norm["shift"])
    assert np.abs(out - centred / std).max() > 0.05
