"""Shared fixtures: a tiny config for fast tests; the 124M config only where the figure matters."""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import GPT_CONFIG_124M, GPTConfig
from jaxgpt.nn.cache import init_cache

# What the parity tests compare against. A missing one would silently skip the parity suite,
# so the run stops instead and says how to install it (`bash .ci/run` installs them all).
REFERENCES = {
    "torch": "pip install torch==2.13.0",
    "transformers": 'pip install -e ".[test]"',
    "llms_from_scratch": "pip install --no-deps llms-from-scratch==1.0.19",
    "transformer_lens": 'pip install -e ".[test]"',
}
# Set to 1 to run only what needs no reference (the parity tests are then skipped); ignored
# under CI, where a missing reference is always an error.
SKIP_REFERENCES_ENV = "JAXGPT_TESTS_WITHOUT_REFERENCES"


def missing_references() -> list[str]:
    return [name for name in REFERENCES if importlib.util.find_spec(name) is None]


def pytest_configure(config):
    missing = missing_references()
    if not missing:
        return
    allowed = os.environ.get(SKIP_REFERENCES_ENV) == "1" and os.environ.get("CI") != "true"
    if allowed:
        return
    how = "; ".join(REFERENCES[name] for name in missing)
    raise pytest.UsageError(
        f"the parity tests' references are not installed: {', '.join(missing)}. Install them "
        f"({how}), or run `bash .ci/run`, which installs everything. To run only the tests "
        f"that need no reference, set {SKIP_REFERENCES_ENV}=1 (not honoured under CI=true)."
    )


@pytest.fixture(autouse=True)
def _compile_cache_in_tmp(tmp_path_factory, monkeypatch):
    """In-process CLI calls turn JAX's persistent compilation cache on: keep it in a directory
    of the test run, not the user's ~/.cache (nor the test's tmp_path, which tests use as a run
    directory that must hold only jaxgpt's files), and switch it off again afterwards."""
    import jax

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)


# The book's dict for a tiny model: vocab ~100, context 16, emb 32, 4 heads, 2 layers.
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
    """The book's PyTorch GPTModel in eval mode, seeded; skips the test if torch is missing."""
    torch = pytest.importorskip("torch")
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    torch.manual_seed(seed)
    return ch04.GPTModel(cfg_dict).eval()


def cached_logits(model, params, tokens, prefill, slots):
    """Logits `[B, T, V]` of `tokens` from `model`: `prefill` tokens at once into an empty
    cache, then one token per call, as generation runs it."""
    b, t = tokens.shape
    cache = init_cache(model.cfg, b, slots, model.dtype)
    out, cache = model.apply({"params": params}, tokens[:, :prefill], cache=cache, slot=0)
    steps = [out]
    for i in range(prefill, t):
        logits, cache = model.apply({"params": params}, tokens[:, i:i + 1],
                                    positions=jnp.full((b, 1), i), cache=cache, slot=i)
        steps.append(logits)
    return jnp.concatenate(steps, axis=1)


# --- Hugging Face GPT-2 and TransformerLens on the same weights ---------------------------------

TINY_HF = dict(vocab_size=100, n_positions=16, n_embd=32, n_head=4, n_layer=2,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def random_hf_gpt2(seed=0, **config):
    """A `GPT2LMHeadModel` in eval mode with every parameter random: weights and biases
    N(0, 0.02), LayerNorm scales 1 + N(0, 0.1) and shifts N(0, 0.1), so a swapped bias or a
    LayerNorm read without its parameters shows."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY_HF, **config}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = ".ln_" in name or name.startswith("transformer.ln_f")
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_((0.1 if is_norm else 0.02) * noise)
    return model.eval()


def tl_bridge(hf_model, tmp_dir):
    """TransformerLens 4.3's `TransformerBridge` around `hf_model`, offline: a word-level
    tokenizer written to `tmp_dir` (the tests pass token ids, never text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(hf_model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                            eos_token="t1").save_pretrained(tmp_dir)
    return TransformerBridge.boot_transformers(
        "gpt2", hf_model=hf_model, tokenizer=AutoTokenizer.from_pretrained(str(tmp_dir)),
        device="cpu")


def jax_weights_of(hf_model):
    """`(cfg, params)`: the jaxgpt config and params of a Hugging Face GPT-2."""
    from jaxgpt.io.hf import from_hf_state_dict
    from jaxgpt.io.hf_config import hf_config_to_gpt

    cfg = hf_config_to_gpt(hf_model.config.to_dict())
    return cfg, from_hf_state_dict(hf_model.state_dict(), cfg)
