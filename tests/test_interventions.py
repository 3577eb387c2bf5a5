"""The intervention makers and the induction tools: what each computes, on the tiny model."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import sharpened, stripe_means

from jaxgpt.interp import induction
from jaxgpt.interp import interventions as iv
from jaxgpt.interp.cache import run_with_cache, run_with_hooks


def test_the_makers_do_what_they_say(tiny):
    cfg, params = tiny
    ids = np.array([[3, 14, 15, 92, 65]])
    _, cache = run_with_cache(params, cfg, ids)
    name = "blocks.0.attn.hook_z"
    vector = jnp.arange(cfg.emb_dim, dtype=jnp.float32) / 10
    z = cache[name]  # [B, T, H, Dh]
    cases = [
        (iv.add(vector), "blocks.1.hook_resid_pre",
         cache["blocks.1.hook_resid_pre"] + vector),
        (iv.scale(0.5), name, z * 0.5),
        (iv.ablate(), name, z * 0.0),
        (iv.ablate_head(2, cfg.n_heads), name, z.at[:, :, 2].set(0.0)),
        (iv.replace(jnp.ones_like(z), jnp.arange(5)[None, :, None, None] == 3), name,
         z.at[:, 3].set(1.0)),
    ]
    for hook, point, want in cases:  # a cached value is the one after the hooks
        _, got = run_with_cache(params, cfg, ids, names=[point], hooks=[(point, hook)])
        # The same float32 arithmetic in another program: a rounding or two of O(0.1) values.
        np.testing.assert_allclose(got[point], want, atol=1e-6)
    with pytest.raises(ValueError, match=r"head must be an int in \[0, 3\], got 4"):
        iv.ablate_head(4, cfg.n_heads)


def test_a_zeroed_head_changes_the_logits_and_a_zero_vector_does_not(tiny):
    cfg, params = tiny
    ids = np.array([[3, 14, 15, 92, 65]])
    plain = run_with_hooks(params, cfg, ids, [])
    same = run_with_hooks(params, cfg, ids, [("blocks.0.hook_resid_post",
                                              iv.add(jnp.zeros(cfg.emb_dim)))])
    ablated = run_with_hooks(params, cfg, ids, [("blocks.0.attn.hook_z",
                                                 iv.ablate_head(1, cfg.n_heads))])
    # Adding zeros changes nothing but XLA's fusion: logits of O(1) within a few roundings.
    np.testing.assert_allclose(same, plain, atol=1e-5)
    assert np.abs(np.asarray(ablated - plain)).max() > 1e-3


def test_the_induction_stripe_is_the_token_after_the_earlier_copy():
    tokens = induction.repeated_tokens(2, 5, 50, seed=1)
    assert tokens.shape == (2, 10)
    np.testing.assert_array_equal(tokens[:, :5], tokens[:, 5:])
    pattern = np.zeros((1, 10, 10))
    for q in range(5, 10):
        pattern[0, q, q - 4] = 1.0  # attends to the token after its earlier copy
    np.testing.assert_array_equal(induction.induction_stripe(jnp.asarray(pattern), 5), 1.0)
    shifted = np.roll(pattern, 1, axis=-1)  # one token off: not an induction head
    np.testing.assert_array_equal(induction.induction_stripe(jnp.asarray(shifted), 5), 0.0)
    stream = induction.repeated_runs(3, 2, 4, 20, seed=2)
    i = 0
    while i < len(stream):  # each run is followed by itself
        n = next(n for n in range(2, 5) if np.array_equal(stream[i:i + n],
                                                          stream[i + n:i + 2 * n]))
        i += 2 * n
    assert i == len(stream)


def test_repeated_runs_with_more_copies_and_gaps_before_each():
    stream = induction.repeated_runs(50, 3, 6, 10_000, seed=4, copies=3, max_gap=4)

    def copy_at(i, run):  # the gap before the copy of `run` that starts within 4 of i
        return next((g for g in range(5)
                     if np.array_equal(stream[i + g:i + g + len(run)], run)), None)

    i, gaps = 0, []
    while i < len(stream):  # a run, then twice: 0-4 other ids and the run again
        # The longest length whose copy follows (ids from 10,000 do not repeat by chance).
        n = next(n for n in range(6, 2, -1) if copy_at(i + n, stream[i:i + n]) is not None)
        run, i = stream[i:i + n], i + n
        for _ in range(2):
            g = copy_at(i, run)
            assert g is not None
            gaps.append(g)
            i += g + n
    assert i == len(stream) and len(gaps) == 100 and set(gaps) == set(range(5))
    with pytest.raises(ValueError, match="copies >= 2"):
        induction.repeated_runs(2, 3, 6, 10, copies=1)


def test_induction_scores_are_a_mean_attention_per_head(tiny):
    cfg, params = tiny
    params = sharpened(params)  # heads that differ: random weights attend nearly uniformly
    half = 6
    tokens = induction.repeated_tokens(3, half, cfg.vocab_size, seed=3)
    scores = np.asarray(induction.induction_scores(params, cfg, tokens))
    assert scores.shape == (cfg.n_layers, cfg.n_heads)
    _, cache = run_with_cache(params, cfg, tokens, names=lambda n: n.endswith("hook_pattern"))
    want = np.stack([stripe_means(np.asarray(cache["pattern", i], np.float64), half)
                     for i in range(cfg.n_layers)])
    # The same float32 weights, averaged in another order: a few roundings of values < 1.
    np.testing.assert_allclose(scores, want, rtol=0, atol=1e-6,
                               err_msg="induction_scores is not each head's mean weight on "
                                       "the stripe q - half + 1")
    # The scores tell heads apart (a test on equal scores would not see heads swapped).
    assert np.ptp(want) > 1e-3, want
    # A head that is an induction head scores 1, one a token off scores 0, uniform 1/(q+1).
    made = np.zeros((1, 3, 2 * half, 2 * half))
    for q in range(2 * half):
        made[0, 1, q, : q + 1] = 1 / (q + 1)  # uniform over the keys it may see
        if q >= half:
            made[0, 0, q, q - half + 1] = 1.0
            made[0, 2, q, q - half] = 1.0
    got = np.asarray(induction.induction_stripe(jnp.asarray(made), half).mean(axis=(0, 2)))
    uniform = np.mean([1 / (q + 1) for q in range(half, 2 * half)])
    np.testing.assert_allclose(got, [1.0, uniform, 0.0], rtol=1e-6)
    assert ((scores >= 0) & (scores <= 1)).all()
