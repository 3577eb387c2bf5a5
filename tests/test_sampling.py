"""The sampling rule (temperature -> top-k -> top-p -> sample) on hand-made logits: no model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import ConfigError
from jaxgpt.inference.sampling import (
    GenerationConfig,
    SamplingConfig,
    choose_next,
    filter_logits,
    generation_config,
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


def test_a_generation_config_gives_the_compiled_loop_its_switches():
    assert GenerationConfig().sampling == SamplingConfig(greedy=True)
    assert GenerationConfig(temperature=0.7, top_k=5, top_p=0.5).sampling == SamplingConfig(
        False, 5, True)
    # numpy scalars are taken as the Python numbers they hold
    config = GenerationConfig(temperature=np.float32(0.5), top_k=np.int64(3), eos_id=np.int32(2))
    assert (type(config.temperature), type(config.top_k), type(config.eos_id)) == (
        float, int, int)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"temperature": -0.5}, r"^GenerationConfig.temperature must be a finite number >= 0 "
                                r"\(0 = greedy\), got -0.5$"),
        ({"temperature": float("nan")}, "GenerationConfig.temperature must be a finite number"),
        ({"temperature": "hot"}, "^GenerationConfig.temperature must be a number >= 0, got 'hot'$"),
        ({"top_k": 0}, "^GenerationConfig.top_k must be >= 1, got 0$"),
        ({"top_k": 2.5}, "^GenerationConfig.top_k must be None or an int >= 1, got 2.5$"),
        ({"top_k": True}, "^GenerationConfig.top_k must be None or an int >= 1, got True$"),
        ({"top_p": 0.0}, r"^GenerationConfig.top_p must be in \(0, 1\], got 0.0$"),
        ({"top_p": 1.5}, r"^GenerationConfig.top_p must be in \(0, 1\], got 1.5$"),
        ({"top_p": "all"}, r"^GenerationConfig.top_p must be None or a number in \(0, 1\]"),
        ({"eos_id": -1}, "^GenerationConfig.eos_id must be None or an int >= 0, got -1$"),
        ({"use_cache": 1}, "^GenerationConfig.use_cache must be a bool, got 1$"),
    ],
)
def test_bad_settings_are_named_when_the_config_is_made(settings, match):
    with pytest.raises(ConfigError, match=match) as info:
        GenerationConfig(**settings)
    (field, value), = settings.items()
    assert info.value.field == field and info.value.owner == "GenerationConfig"


def test_the_vocabulary_bounds_top_k_and_eos_id():
    assert GenerationConfig(top_k=100, eos_id=99).check_vocab(100).top_k == 100
    with pytest.raises(ConfigError, match=r"^GenerationConfig.top_k must be in \[1, 100\] "
                                          r"\(the vocabulary\), got 101$"):
        GenerationConfig(top_k=101).check_vocab(100)
    with pytest.raises(ConfigError, match=r"^GenerationConfig.eos_id must be in the vocabulary "
                                          r"\[0, 100\), got 100$"):
        GenerationConfig(eos_id=100).check_vocab(100)


def test_keywords_build_a_config_and_cannot_join_one():
    assert generation_config(None, {"temperature": 0.8, "top_k": 50}) == GenerationConfig(
        temperature=0.8, top_k=50)
    config = GenerationConfig(eos_id=3)
    assert generation_config(config, {}) is config
    with pytest.raises(ValueError, match="^give config= or the keywords top_k, not both"):
        generation_config(config, {"top_k": 5})
    with pytest.raises(TypeError, match="^unknown generation keyword 'topk': the settings are "
                                        "temperature, top_k, top_p, eos_id, use_cache"):
        generation_config(None, {"topk": 5})
    with pytest.raises(TypeError, match="config must be a jaxgpt.GenerationConfig or None"):
        generation_config({"top_k": 5}, {})  # type: ignore[arg-type]
