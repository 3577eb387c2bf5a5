"""The book's chapter 2-3 building blocks: attention variants against ch03 with the same
weights, and SimpleTokenizerV2 (the earlier teaching steps are in test_teaching.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference

from jaxgpt.book.ch02 import SimpleTokenizerV2, build_vocab
from jaxgpt.book.ch03 import (
    CausalAttention,
    MultiHeadAttentionWrapper,
    SelfAttention,
    SelfAttention_v2,
    params_from_torch,
)


def _torch_out(module, x):
    torch = reference("torch")
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_self_attention_v2_matches_torch(qkv_bias, rng):
    torch = reference("torch")
    ch03 = reference("llms_from_scratch.ch03")
    torch.manual_seed(0)
    ref = ch03.SelfAttention_v2(3, 2, qkv_bias=qkv_bias)
    x = rng.normal(size=(6, 3)).astype(np.float32)  # the book's [6 tokens, 3 dims]
    params = params_from_torch(ref.state_dict())
    got = SelfAttention_v2(3, 2, qkv_bias).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(got, _torch_out(ref, x), atol=1e-6)
    assert SelfAttention is SelfAttention_v2


def test_causal_attention_matches_torch_and_ignores_the_future(rng):
    torch = reference("torch")
    ch03 = reference("llms_from_scratch.ch03")
    torch.manual_seed(1)
    ref = ch03.CausalAttention(4, 5, context_length=8, dropout=0.5, qkv_bias=True)
    x = rng.normal(size=(2, 6, 4)).astype(np.float32)
    module = CausalAttention(4, 5, context_length=8, dropout=0.5, qkv_bias=True)
    params = params_from_torch(ref.state_dict())
    got = module.apply({"params": params}, jnp.asarray(x))  # deterministic: dropout off
    np.testing.assert_allclose(got, _torch_out(ref, x), atol=1e-6)
    x2 = x.copy()
    x2[:, 4:] += 10.0  # change the last two tokens: earlier outputs must not move
    got2 = module.apply({"params": params}, jnp.asarray(x2))
    np.testing.assert_allclose(got2[:, :4], got[:, :4], atol=1e-6)
    assert np.abs(np.asarray(got2[:, 4:] - got[:, 4:])).max() > 1e-3
    dropped = module.apply(
        {"params": params},
        jnp.asarray(x),
        deterministic=False,
        rngs={"dropout": jax.random.PRNGKey(0)},
    )
    assert np.abs(np.asarray(dropped - got)).max() > 1e-3


def test_multi_head_wrapper_matches_torch(rng):
    torch = reference("torch")
    ch03 = reference("llms_from_scratch.ch03")
    torch.manual_seed(2)
    ref = ch03.MultiHeadAttentionWrapper(3, 2, context_length=6, dropout=0.0, num_heads=2)
    x = rng.normal(size=(2, 6, 3)).astype(np.float32)
    params = params_from_torch(ref.state_dict())
    assert sorted(params) == ["heads_0", "heads_1"]
    got = MultiHeadAttentionWrapper(3, 2, 6, 0.0, 2).apply({"params": params}, jnp.asarray(x))
    assert got.shape == (2, 6, 4)  # [B, T, H * D_out]
    np.testing.assert_allclose(got, _torch_out(ref, x), atol=1e-6)


def test_simple_tokenizer_v2_golden_ids_unknown_words_and_decode():
    text = 'Hello, world. Is this-- a test? "Yes"'
    vocab = build_vocab(text)
    # sorted unique words (punctuation sorts first), then <|endoftext|>, <|unk|>
    assert list(vocab) == [
        '"',
        ",",
        "--",
        ".",
        "?",
        "Hello",
        "Is",
        "Yes",
        "a",
        "test",
        "this",
        "world",
        "<|endoftext|>",
        "<|unk|>",
    ]
    tok = SimpleTokenizerV2(vocab)
    ids = tok.encode("Hello, do you like tea? <|endoftext|> Is this a test.")
    assert ids == [5, 1, 13, 13, 13, 13, 4, 12, 6, 10, 8, 9, 3]
    assert tok.decode(ids) == (
        "Hello, <|unk|> <|unk|> <|unk|> <|unk|>? <|endoftext|> Is this a test."
    )
    assert tok.decode(tok.encode(text)) == 'Hello, world. Is this -- a test?" Yes"'
    assert SimpleTokenizerV2.from_text(text).str_to_int == vocab
    with pytest.raises(ValueError, match="token id 99"):
        tok.decode([99])
