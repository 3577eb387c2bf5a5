"""Shared fixtures: a tiny config for fast tests; the 124M config only where the figure matters."""

import numpy as np
import pytest

from jaxgpt.config import GPT_CONFIG_124M, GPTConfig

# The seeds' dict for a tiny model: vocab ~100, context 16, emb 32, 4 heads, 2 layers.
TINY = {
    "vocab_size": 100,
    "context_length": 16,
    "emb_dim": 32,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": True,
}


@pytest.fixture
def tiny_dict():
    return dict(TINY)


@pytest.fixture
def tiny_cfg():
    return GPTConfig(**TINY)


@pytest.fixture
def cfg_124m():
    return GPTConfig(**GPT_CONFIG_124M)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def torch_reference(cfg_dict, seed=0):
    """The seeds' PyTorch GPTModel in eval mode, seeded; skips the test if torch is missing."""
    torch = pytest.importorskip("torch")
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    torch.manual_seed(seed)
    return ch04.GPTModel(cfg_dict).eval()
