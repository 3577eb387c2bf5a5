"""`generate_text_simple`: the book's greedy tokens, one jit-compiled call."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference, torch_reference

from jaxgpt.config import GPTConfig
from jaxgpt.inference import generate_text_simple
from jaxgpt.inference.decode import TRACE_COUNTS
from jaxgpt.io.torch_state import from_torch_state_dict
from jaxgpt.nn import init_params
from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

torch = reference("torch")
ch04 = reference("llms_from_scratch.ch04")


def _reference_tokens(model, ids, max_new_tokens, context_size):
    out = ch04.generate_text_simple(model, torch.from_numpy(np.asarray(ids, dtype=np.int64)),
                                    max_new_tokens, context_size)
    return out.numpy()


@pytest.fixture
def tiny_pair(tiny_dict):
    ref = torch_reference(tiny_dict, seed=11)
    cfg = GPTConfig(**tiny_dict)
    return ref, cfg, from_torch_state_dict(ref.state_dict(), cfg)


@pytest.mark.parametrize(
    "batch, prompt_len, new, context_size",
    [
        (1, 4, 8, None),  # inside context_length (16)
        (3, 5, 11, None),  # batch > 1, ends exactly at context_length
        (2, 6, 30, None),  # runs far past context_length: the sliding crop
        (2, 20, 5, None),  # the prompt alone is longer than the context
        (3, 3, 12, 5),  # a context_size smaller than context_length
    ],
)
def test_greedy_tokens_equal_the_reference(tiny_pair, rng, batch, prompt_len, new, context_size):
    ref, cfg, params = tiny_pair
    ids = rng.integers(0, cfg.vocab_size, size=(batch, prompt_len))
    ctx = context_size or cfg.context_length
    want = _reference_tokens(ref, ids, new, ctx)
    got = generate_text_simple(params, cfg, ids, new, context_size=context_size)
    assert got.shape == (batch, prompt_len + new) and got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)


def test_zero_new_tokens_returns_the_prompt(tiny_pair, rng):
    _, cfg, params = tiny_pair
    ids = rng.integers(0, cfg.vocab_size, size=(2, 3))
    np.testing.assert_array_equal(generate_text_simple(params, cfg, ids, 0), ids)


def test_same_shapes_do_not_retrace(tiny_pair, rng):
    _, cfg, params = tiny_pair
    ids = rng.integers(0, cfg.vocab_size, size=(2, 7))
    generate_text_simple(params, cfg, ids, 9)
    before = TRACE_COUNTS["generate_text_simple"]
    other = rng.integers(0, cfg.vocab_size, size=(2, 7))
    generate_text_simple(params, cfg, other, 9)
    generate_text_simple(params, cfg, list(map(list, other)), 9)  # same shape as a nested list
    assert TRACE_COUNTS["generate_text_simple"] == before
    generate_text_simple(params, cfg, ids, 10)  # a new shape compiles once
    assert TRACE_COUNTS["generate_text_simple"] == before + 1


@pytest.mark.parametrize(
    "idx, new, context_size, message",
    [
        (np.zeros((1, 0), np.int32), 3, None, "empty"),
        (np.zeros((0, 4), np.int32), 3, None, "empty"),
        (np.array([[1, 2, 100]]), 3, None, "100"),  # vocab is [0, 100)
        (np.array([[1, -1]]), 3, None, "-1"),
        (np.array([[1.0, 2.0]]), 3, None, "float"),
        (np.array([True, False])[None], 3, None, "bool"),
        (np.array([1, 2, 3]), 3, None, r"shape \(3,\)"),
        (np.zeros((1, 2, 3), np.int32), 3, None, "shape"),
        (np.array([[1, 2]]), -1, None, "max_new_tokens must be >= 0, got -1"),
        (np.array([[1, 2]]), 2.5, None, "max_new_tokens must be an int"),
        (np.array([[1, 2]]), 3, 17, "context_size 17 exceeds"),
        (np.array([[1, 2]]), 3, 0, "context_size must be >= 1"),
    ],
)
def test_bad_input_raises_before_tracing(tiny_pair, idx, new, context_size, message):
    _, cfg, params = tiny_pair
    before = sum(TRACE_COUNTS.values())
    with pytest.raises(ValueError, match=message):
        generate_text_simple(params, cfg, idx, new, context_size=context_size)
    assert sum(TRACE_COUNTS.values()) == before


@pytest.mark.slow
def test_reference_golden_check_through_jaxgpt(book_124m):
    """The reference's own test: seed 123, "Hello, I am", 10 new tokens."""
    _, cfg, params = book_124m
    tok = get_tokenizer()
    out = generate_text_simple(params, cfg, text_to_token_ids("Hello, I am", tok), 10)
    golden = [15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267, 49706, 43231,
              47062, 34657]
    assert np.asarray(out)[0].tolist() == golden
    assert token_ids_to_text(out, tok).startswith("Hello, I am")


def test_random_init_params_generate(tiny_cfg, rng):
    params = init_params(tiny_cfg, 0)
    out = generate_text_simple(params, tiny_cfg, rng.integers(0, 100, size=(1, 3)), 4)
    assert out.shape == (1, 7) and int(out.max()) < tiny_cfg.vocab_size
