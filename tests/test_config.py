import dataclasses

import pytest

from jaxgpt.config import GPT_CONFIG_124M, PRESETS, GPTConfig


def test_reference_dict_builds_the_124m_config():
    cfg = GPTConfig(**GPT_CONFIG_124M)
    assert cfg == GPTConfig.from_preset("gpt2-small")
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim) == (50257, 1024, 768)
    assert (cfg.n_heads, cfg.n_layers, cfg.drop_rate, cfg.qkv_bias) == (12, 12, 0.1, False)
    assert cfg.tie_embeddings is False  # the book keeps the output head separate


@pytest.mark.parametrize(
    "name, sizes",
    [
        ("gpt2-small", (768, 12, 12)),
        ("gpt2-medium", (1024, 24, 16)),
        ("gpt2-large", (1280, 36, 20)),
        ("gpt2-xl", (1600, 48, 25)),
    ],
)
def test_presets_have_gpt2_sizes(name, sizes):
    cfg = GPTConfig.from_preset(name)
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == sizes
    assert cfg.vocab_size == 50257 and cfg.context_length == 1024
    assert name in PRESETS


def test_config_is_frozen_and_hashable():
    cfg = GPTConfig(**GPT_CONFIG_124M)
    assert hash(cfg) == hash(GPTConfig(**GPT_CONFIG_124M))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.emb_dim = 10


def test_dict_round_trip_and_unknown_keys():
    cfg = GPTConfig.from_preset("gpt2-medium", tie_embeddings=True)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig.from_dict({**GPT_CONFIG_124M, "n_embd": 768})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="gpt2-xl"):
        GPTConfig.from_preset("gpt3")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"emb_dim": 770}, "emb_dim"),  # not divisible by 12 heads
        ({"vocab_size": 0}, "vocab_size"),
        ({"context_length": -1}, "context_length"),
        ({"emb_dim": 0}, "emb_dim"),
        ({"n_heads": 0}, "n_heads"),
        ({"n_layers": 0}, "n_layers"),
        ({"n_layers": 2.0}, "n_layers"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"qkv_bias": "yes"}, "qkv_bias"),
    ],
)
def test_invalid_values_raise_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**GPT_CONFIG_124M, **change})
