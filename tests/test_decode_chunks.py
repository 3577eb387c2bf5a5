"""Cached decoding in chunks (`Generator(chunk_steps=K)`): K steps between two checks for EOS,
and the tokens of one step per check (`chunk_steps=0`) for every K, also where a chunk runs
past the last token, past an EOS, or past `context_length`."""

import jax
import numpy as np
import pytest
from conftest import TINY

from jaxgpt.config import GPTConfig
from jaxgpt.inference import Generator, decode, generate_text_simple
from jaxgpt.inference.sampling import sampling_config
from jaxgpt.nn import init_params

CHUNKS = [0, 1, 3, 8]  # one step per check (no inactive steps), then chunks of 1, 3 and 8


@pytest.fixture(scope="module")
def tiny():
    cfg = GPTConfig(**TINY)  # context_length 16
    return cfg, init_params(cfg, 11)


def _gens(cfg, params):
    return {k: Generator(params, cfg, chunk_steps=k) for k in CHUNKS}


@pytest.mark.slow
def test_ragged_rows_past_the_context_are_the_books_for_every_chunk(tiny, rng):
    """Rows of 1 to 23 tokens, 13 new each: the cached loop stops at a different step for each
    longest prompt (and at once for the cropped 23), and the window steps take over past
    `context_length` 16; 13 is no multiple of 3 or 8, so the last chunk runs past the count."""
    cfg, params = tiny
    rows = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (1, 4, 9, 23)]
    want = [np.asarray(generate_text_simple(params, cfg, np.array([r]), 13))[0].tolist()
            for r in rows]
    for k, gen in _gens(cfg, params).items():
        assert gen.generate(rows, 13) == want, k
        # Alone, rows 0 and 1 decode 12 cached steps; row 2 7, then the window steps.
        assert [gen.generate([r], 13)[0] for r in rows[:3]] == want[:3], k


@pytest.mark.slow
def test_a_chunk_past_the_last_slot_leaves_the_last_token(tiny, rng):
    """One prompt token and 16 new (the bucket's 16 slots): 15 cached steps, so a chunk of 8
    runs step 16, whose token slot lies past the buffer (an index XLA clamps to the last)."""
    cfg, params = tiny
    prompt = rng.integers(0, cfg.vocab_size, (1, 1))
    want = np.asarray(generate_text_simple(params, cfg, prompt, 16))
    for k, gen in _gens(cfg, params).items():
        np.testing.assert_array_equal(gen.generate(prompt, 16), want, err_msg=f"chunk {k}")


@pytest.mark.slow
def test_eos_inside_a_chunk_stops_the_row_where_it_falls(tiny, rng):
    """Row 0's EOS is its 4th new token, inside the first chunk of 8 (and of 3's second);
    the other rows go on, and a later all-done state stops the loop in mid-chunk."""
    cfg, params = tiny
    prompt = rng.integers(0, cfg.vocab_size, (3, 4))
    free = np.asarray(Generator(params, cfg, chunk_steps=0).generate(prompt, 12))
    eos = int(free[0, 4 + 3])
    first = [np.flatnonzero(r[4:] == eos) for r in free]
    assert first[0][0] == 3  # the test is not vacuous: row 0 stops at its 4th new token
    outs = {k: np.asarray(g.generate(prompt, 12, eos_id=eos))
            for k, g in _gens(cfg, params).items()}
    for k, out in outs.items():
        np.testing.assert_array_equal(out, outs[0], err_msg=f"chunk_steps={k}")
    cut = 4 + 3 + 1
    np.testing.assert_array_equal(outs[8][0, :cut], free[0, :cut])
    assert (outs[8][0, cut:] == eos).all()
    lists = {k: g.generate(prompt[:1].tolist(), 40, eos_id=eos)
             for k, g in _gens(cfg, params).items()}
    assert all(v == [free[0, :cut].tolist()] for v in lists.values()), lists


@pytest.mark.slow
def test_sampled_tokens_do_not_depend_on_the_chunk(tiny, rng):
    """Step j draws with fold_in(key, j) whatever chunk it runs in; an inactive step's draw is
    dropped, so it shifts nothing."""
    cfg, params = tiny
    prompt = rng.integers(0, cfg.vocab_size, (2, 3))
    key = jax.random.key(9)
    outs = {k: np.asarray(g.generate(prompt, 11, temperature=1.3, top_k=40, key=key))
            for k, g in _gens(cfg, params).items()}
    for k, out in outs.items():
        np.testing.assert_array_equal(out, outs[0], err_msg=f"chunk_steps={k}")
    greedy = np.asarray(Generator(params, cfg).generate(prompt, 11))
    assert (outs[0] != greedy).any()  # sampling drew something other than the argmax


@pytest.mark.parametrize("chunk_size", [1, *(pytest.param(n, marks=pytest.mark.slow)
                                              for n in (3, 5, 8))])
def test_streamed_chunks_are_generates_tokens(tiny, rng, chunk_size):
    """Each streamed call stops at its count in mid-chunk; the next call's first step is the
    one the last inactive step computed, so its cache write and its token must agree."""
    cfg, params = tiny
    prompt = rng.integers(0, cfg.vocab_size, (2, 5))
    gen = Generator(params, cfg, chunk_steps=8)
    want = np.asarray(Generator(params, cfg, chunk_steps=0).generate(prompt, 21))[:, 5:]
    chunks = list(gen.stream(prompt, 21, chunk_size=chunk_size))
    assert [c.shape[1] for c in chunks[:-1]] == [chunk_size] * (len(chunks) - 1)
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), want)


def test_an_inactive_step_leaves_the_state_as_it_was(tiny, rng):
    """One call asked for 1 more token runs a chunk of 8: the count moves by 1, the token
    buffer only at that slot, and the other 7 steps change nothing a later step reads."""
    cfg, params = tiny
    gen = Generator(params, cfg)
    model, weights = gen.weights(1)
    prompt = rng.integers(0, cfg.vocab_size, (1, 8)).astype(np.int32)
    knobs = decode.make_knobs(None, 0.0, None, None, True)
    kw = dict(model=model, sampling=sampling_config(0.0, None, None))
    state = decode.start_decoding(weights, prompt, np.zeros(1, np.int32), knobs, new_slots=16,
                                  use_cache=True, **kw)
    before = np.asarray(state.tokens)
    state = decode.continue_decoding(weights, state, np.int32(2), knobs, prompt_slots=8,
                                     chunk_steps=8, **kw)
    assert int(state.step) == 2
    after = np.asarray(state.tokens)
    assert (after[:, :9] == before[:, :9]).all() and (after[:, 10:] == before[:, 10:]).all()
    state = decode.continue_decoding(weights, state, np.int32(16), knobs, prompt_slots=8,
                                     chunk_steps=8, **kw)
    want = np.asarray(generate_text_simple(params, cfg, prompt, 16))
    np.testing.assert_array_equal(np.asarray(state.tokens), want)


def test_chunk_steps_must_be_a_count():
    cfg = GPTConfig(**TINY)
    params = init_params(cfg, 0)
    with pytest.raises(ValueError, match="chunk_steps must be >= 0, got -1"):
        Generator(params, cfg, chunk_steps=-1)
