"""The sampling rule (temperature -> top-k -> top-p -> sample) on hand-made logits: no model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.inference.sampling import (
    SamplingConfig,
    check_sampling_args,
    choose_next,
    filter_logits,
    sampling_config,
)


def _kept(logits, temperature=1.0, top_k=None, top_p=None):
    cfg = SamplingConfig(greedy=False, top_k=top_k, use_top_p=top_p is not None and top_p < 1)
    out = filter_logits(
        jnp.asarray([logits], jnp.float32),
        jnp.float32(temperature),
        jnp.float32(1.0 if top_p is None else top_p),
        cfg,
    )
    return set(np.flatnonzero(np.isfinite(np.asarray(out[0]))).tolist())


def test_top_k_keeps_the_k_largest():
    assert _kept([0.1, 3.0, -1.0, 2.0, 0.5], top_k=2) == {1, 3}
    assert _kept([0.1, 3.0, -1.0, 2.0, 0.5], top_k=5) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    assert _kept(logits, top_p=0.5) == {0}  # 0.5 alone reaches 0.5
    assert _kept(logits, top_p=0.6) == {0, 1}
    assert _kept(logits, top_p=0.9) == {0, 1, 2}
    assert _kept(logits, top_p=0.01) == {0}  # the most likely token is always kept
    assert _kept(logits, top_p=1.0) == {0, 1, 2, 3}


def test_top_p_applies_to_the_tempered_top_k_distribution():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    logits = np.log(probs)
    # top-p sees the renormalised top-k distribution: 4/7 alone reaches 0.5, 0.4 does not.
    assert _kept(logits, top_p=0.5) == {0, 1}
    assert _kept(logits, top_k=2, top_p=0.5) == {0}
    # Temperature comes before top-p: sharper (T=0.1) needs one token, flatter (T=10) more.
    assert _kept(logits, temperature=0.1, top_p=0.5) == {0}
    assert _kept(logits, temperature=10.0, top_p=0.5) == {0, 1}
    assert _kept(logits, temperature=10.0, top_p=0.6) == {0, 1, 2}


def test_top_k_one_samples_the_argmax():
    logits = jax.random.normal(jax.random.key(1), (16, 50))
    greedy = choose_next(
        logits, jax.random.key(0), jnp.float32(1), jnp.float32(1), SamplingConfig(greedy=True)
    )
    for seed in range(3):
        sampled = choose_next(
            logits,
            jax.random.key(seed),
            jnp.float32(5.0),
            jnp.float32(1),
            SamplingConfig(greedy=False, top_k=1),
        )
        np.testing.assert_array_equal(sampled, greedy)


def test_sampling_follows_the_distribution():
    # 4000 draws from softmax([0, log 3]) = [0.25, 0.75].
    logits = jnp.tile(jnp.log(jnp.asarray([[1.0, 3.0]])), (4000, 1))
    draws = choose_next(
        logits, jax.random.key(0), jnp.float32(1), jnp.float32(1), SamplingConfig(greedy=False)
    )
    assert abs(float(draws.mean()) - 0.75) < 0.03


def test_temperature_zero_is_greedy_and_ignores_top_k_top_p():
    assert sampling_config(0.0, 5, 0.5) == SamplingConfig(greedy=True)
    assert sampling_config(0.7, 5, 0.5) == SamplingConfig(False, 5, True)
    assert sampling_config(0.7, None, 1.0) == SamplingConfig(False, None, False)


@pytest.mark.parametrize(
    "temperature, top_k, top_p, match",
    [
        (-0.5, None, None, r"temperature must be a finite number >= 0.*-0.5"),
        (float("nan"), None, None, "temperature"),
        ("hot", None, None, "temperature must be a number"),
        (1.0, 0, None, r"top_k must be in \[1, 100\].*got 0"),
        (1.0, 101, None, r"top_k must be in \[1, 100\].*got 101"),
        (1.0, 2.5, None, "top_k must be None or an int"),
        (1.0, True, None, "top_k must be None or an int"),
        (1.0, None, 0.0, r"top_p must be in \(0, 1\], got 0.0"),
        (1.0, None, 1.5, r"top_p must be in \(0, 1\], got 1.5"),
        (1.0, None, "all", "top_p must be None or a number"),
    ],
)
def test_bad_sampling_arguments_are_named(temperature, top_k, top_p, match):
    with pytest.raises(ValueError, match=match):
        check_sampling_args(temperature, top_k, top_p, vocab_size=100)
