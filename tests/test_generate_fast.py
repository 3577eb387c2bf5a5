"""`jaxgpt.generate`: KV cache = recomputing = the book, past the context, ragged rows, EOS,
sampling, bounded compiles, streaming, argument errors."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, cached_logits, reference, torch_reference
from jax import lax

from jaxgpt import aot
from jaxgpt.config import GPTConfig
from jaxgpt.inference import (
    GenerationConfig,
    Generator,
    decode,
    generate,
    generate_stream,
    generate_text_simple,
    generator,
    simple,
)
from jaxgpt.inference.decode import TRACE_COUNTS, bucket_length
from jaxgpt.inference.sampling import sampling_config
from jaxgpt.io.torch_state import from_torch_state_dict
from jaxgpt.nn import GPTModel, init_params
from jaxgpt.nn.layout import Layout, prepare


@pytest.fixture(scope="module")
def tiny():
    cfg = GPTConfig(**TINY)  # context_length 16
    return cfg, init_params(cfg, 7)


def _reference_run(cfg_dict, prompt, n, seed=0):
    """(jaxgpt params, the book's generate_text_simple tokens) on the same weights."""
    torch = reference("torch")
    ch04 = reference("llms_from_scratch.ch04")
    model = torch_reference(cfg_dict, seed)
    params = from_torch_state_dict(model.state_dict(), GPTConfig(**cfg_dict))
    out = ch04.generate_text_simple(
        model, torch.as_tensor(np.asarray(prompt, np.int64)), n, cfg_dict["context_length"]
    )
    return params, out.numpy()


# --- GPTModel's cached calls and decode layouts -------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [pytest.param(Layout(), id="book"), pytest.param(Layout.for_batch(1, "cpu"), id="cpu-rule"),
     pytest.param(Layout.for_batch(1, "gpu"), id="gpu-batch-1", marks=pytest.mark.slow),
     pytest.param(Layout(fused_qkv=True, proj=True), id="proj-rows", marks=pytest.mark.slow),
     pytest.param(Layout(qkv=True, head=True), id="mixed-unfused", marks=pytest.mark.slow),
     pytest.param(Layout.for_batch(1, "tpu"), id="tpu", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("tied", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_every_layout_and_the_cache_give_the_plain_logits(rng, layout, tied):
    cfg = GPTConfig(**{**TINY, "tie_embeddings": tied})
    params = init_params(cfg, 1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)))
    want = GPTModel(cfg).apply({"params": params}, tokens)  # [B, T, V]
    model = GPTModel(cfg, layout=layout)
    prepared = prepare(params, cfg, layout=layout)
    np.testing.assert_allclose(model.apply({"params": prepared}, tokens), want, atol=1e-5)
    got = cached_logits(model, prepared, tokens, prefill=4, slots=12)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # One row, as decoding at B=1 runs it (where the GPU layout's LayerNorms take one pass).
    got = cached_logits(model, prepared, tokens[:1], prefill=1, slots=12)
    np.testing.assert_allclose(got, want[:1], atol=1e-5)


def test_padding_and_own_positions_match_the_row_alone(tiny, rng):
    """A left-padded row with its own positions and validity mask: the row's logits alone."""
    cfg, params = tiny
    row = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 5)))
    want = GPTModel(cfg).apply({"params": params}, row)[0]  # [5, V]
    padded = jnp.concatenate([jnp.zeros((1, 3), row.dtype), row], axis=1)  # 3 pad slots
    positions = jnp.maximum(jnp.arange(8) - 3, 0)[None]
    valid = (jnp.arange(8) >= 3)[None]
    got = GPTModel(cfg).apply({"params": params}, padded, positions=positions, valid=valid)
    np.testing.assert_allclose(got[0, 3:], want, atol=1e-5)


def test_layouts_per_backend():
    rows = Layout(True, True, True, True, True, True)
    gpu = rows._replace(one_pass_norm=True)
    assert Layout.for_batch(1, "gpu") == Layout.for_batch(32, "gpu") == gpu
    assert Layout.for_batch(1, "tpu") == Layout(fused_qkv=True)
    assert Layout.for_batch(32, "tpu") == Layout(fused_qkv=True)
    # The CPU's: every matrix as rows (docs/performance.md; tests/test_layouts.py).
    assert Layout.for_batch(1, "cpu") == Layout.for_batch(8, "cpu") == rows
    assert rows != gpu


def _cache_arrays_in_loop(params, cfg, batch, dtype):
    """(in-place updates of cache-sized arrays in the compiled generation program, and
    `aot.loop_stats` of its decoding loop, whose `cache_copies` are the copies, transposes and
    other whole writes of a cache-sized array inside the loop)."""
    shape = decode.program_shape(cfg, 5, 12)
    rows = generator._batch([np.arange(5, dtype=np.int32)] * batch, cfg, shape.prompt_slots)
    p, new_slots, slots = shape
    assert new_slots == 16 and slots == p + min(new_slots, cfg.context_length)
    assert slots != min(p + new_slots, cfg.context_length)
    model, prepared = generator.Generator(params, cfg, dtype=dtype).weights(batch)
    hlo = decode.generate_tokens.lower(
        prepared, jnp.asarray(rows.prompt), jnp.asarray(rows.start), jnp.int32(12),
        decode.make_knobs(None, 0.0, None, None, True), model=model, new_slots=new_slots,
        sampling=sampling_config(0.0, None, None), use_cache=True,
    ).compile().as_text()
    dt = {"float32": "f32", "bfloat16": "bf16"}[jnp.dtype(dtype).name]
    shape = f"= {dt}[{batch * cfg.n_heads},{slots},{cfg.head_dim}]"
    lines = [line.strip() for line in hlo.splitlines() if shape in line]
    updates = [line for line in lines
               if " dynamic-update-slice(" in line or line.startswith("%dynamic-update-slice")]
    return updates, aot.loop_stats(hlo, batch * cfg.n_heads * slots * cfg.head_dim)


@pytest.mark.parametrize("batch, dtype", [
    (1, "float32"), *(pytest.param(b, d, marks=pytest.mark.slow)
                      for b, d in ((3, "float32"), (1, "bfloat16"), (3, "bfloat16")))])
def test_the_decode_loop_updates_the_cache_in_place(batch, dtype):
    """No copy of a layer's cache in the compiled float32 loop (XLA:CPU once copied each one
    twice a step, a third of the step time at B=1); in bf16, only XLA:CPU's conversions.
    Slots and the recomputed window differ in size here, so a copy of the cache cannot be
    mistaken for one of the window's. The positive controls: the check finds the cache's own
    in-place updates (keys and values of every layer), so a change in how XLA prints them
    cannot make it pass vacuously, and it finds a copy and a transpose of a cache in a loop
    compiled here (the test after this one)."""
    cfg = GPTConfig(**TINY)  # context_length 16
    updates, loop = _cache_arrays_in_loop(init_params(cfg, 0), cfg, batch, dtype)
    assert len(updates) >= 2 * cfg.n_layers, updates
    if dtype == "bfloat16":
        # XLA:CPU has no bf16 arithmetic: each step it converts every layer's bf16 keys and
        # values to f32 and back around the update, whole (fusions named *convert*). Nothing
        # else may write a cache; on GPU and TPU the bf16 loop has none (tests/test_aot.py).
        assert all("convert" in c for c in loop.cache_copies), loop.cache_copies
    else:
        assert loop.cache_copies == []


@pytest.mark.parametrize("how", ["copy", "transpose"])
def test_the_cache_copy_check_finds_a_copy_and_a_transpose_in_a_loop(how):
    """A loop that updates its cache and also carries the cache as it was (so the update
    cannot happen in place), or carries it transposed: on this backend too, the check above
    finds the cache-sized copy or transpose in the loop."""
    shape = (8, 32, 32)

    def f(cache, x):  # cache [8, 32, 32], x [8, 32]
        def body(c):
            i, cache, old = c
            new = lax.dynamic_update_slice(cache, x[:, None, :] * i.astype(x.dtype), (0, i, 0))
            return (i + 1, new, cache) if how == "copy" else (i + 1, new.swapaxes(1, 2), old)

        return lax.while_loop(lambda c: c[0] < 32, body, (0, cache, cache))[1:]

    args = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct((8, 32), jnp.float32))
    loop = aot.loop_stats(jax.jit(f).lower(*args).compile().as_text(), math.prod(shape))
    assert any(how in c for c in loop.cache_copies), loop.cache_copies


# --- one model: a change to jaxgpt.nn reaches every generation path ----------------------------


@pytest.mark.slow
def test_a_change_to_the_model_reaches_generate(monkeypatch, rng):
    """The researcher's experiment from issue 9: replace the activation in jaxgpt.nn."""
    from jaxgpt.nn import layers

    cfg = GPTConfig(**{**TINY, "vocab_size": 97})  # a config no other test compiles
    params = init_params(cfg, 2)
    prompt = rng.integers(0, cfg.vocab_size, (2, 5))
    before = np.asarray(generate(params, cfg, prompt, 12))
    decode.generate_tokens.clear_cache()
    simple._generate_simple.clear_cache()
    monkeypatch.setattr(layers, "gelu", lambda x: jnp.maximum(x, 0.0))  # ReLU
    try:
        want = np.asarray(generate_text_simple(params, cfg, prompt, 12))
        assert (want != before).any()  # the change matters
        np.testing.assert_array_equal(generate(params, cfg, prompt, 12), want)
        np.testing.assert_array_equal(generate(params, cfg, prompt, 12, use_cache=False), want)
    finally:
        decode.generate_tokens.clear_cache()
        simple._generate_simple.clear_cache()


# --- greedy parity ----------------------------------------------------------------------------


def test_cache_equals_no_cache_equals_generate_text_simple(tiny, rng):
    cfg, params = tiny
    prompt = rng.integers(0, cfg.vocab_size, (3, 5))
    want = np.asarray(generate_text_simple(params, cfg, prompt, 9))
    np.testing.assert_array_equal(generate(params, cfg, prompt, 9), want)
    np.testing.assert_array_equal(generate(params, cfg, prompt, 9, use_cache=False), want)


@pytest.mark.parametrize("prompt_len", [  # short, exactly the context, longer
    pytest.param(3, marks=pytest.mark.slow), pytest.param(16, marks=pytest.mark.slow), 21])
def test_past_context_length_matches_the_reference_sliding_crop(prompt_len, rng):
    prompt = rng.integers(0, TINY["vocab_size"], (2, prompt_len))
    params, want = _reference_run(TINY, prompt, 30)  # far past context_length 16
    cfg = GPTConfig(**TINY)
    np.testing.assert_array_equal(generate(params, cfg, prompt, 30), want)
    np.testing.assert_array_equal(generate(params, cfg, prompt, 30, use_cache=False), want)


@pytest.mark.slow
def test_cache_equals_no_cache_and_reference_124m(book_124m):
    ref, cfg, params = book_124m
    prompt = np.array([[15496, 11, 314, 716], [40, 1101, 257, 2746]])  # "Hello, I am" ...
    want = reference("llms_from_scratch.ch04").generate_text_simple(
        ref, reference("torch").as_tensor(prompt), 6, cfg.context_length).numpy()
    cached = np.asarray(generate(params, cfg, prompt, 6))
    np.testing.assert_array_equal(cached, want)
    np.testing.assert_array_equal(generate(params, cfg, prompt, 6, use_cache=False), want)
    # The ragged path on the real width: row 1 cut to 2 tokens equals its solo run.
    rows = generate(params, cfg, [prompt[0].tolist(), prompt[1, :2].tolist()], 5)
    assert rows[0] == cached[0, :9].tolist()
    assert rows[1] == generate(params, cfg, [prompt[1, :2].tolist()], 5)[0]


# --- ragged batches ---------------------------------------------------------------------------


def test_ragged_rows_equal_their_solo_runs(tiny, rng):
    cfg, params = tiny
    rows = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (1, 4, 9, 16, 23)]
    for use_cache in (True, False):
        out = generate(params, cfg, rows, 12, use_cache=use_cache)
        assert isinstance(out, list) and len(out) == len(rows)
        for row, got in zip(rows, out, strict=True):
            solo = np.asarray(generate_text_simple(params, cfg, np.array([row]), 12))[0]
            assert got == solo.tolist()
            assert got[: len(row)] == row


# --- EOS --------------------------------------------------------------------------------------


def test_eos_stops_a_row_array_pads_list_cuts(tiny, rng):
    cfg, params = tiny
    prompt = rng.integers(0, cfg.vocab_size, (4, 3))
    free = np.asarray(generate(params, cfg, prompt, 10))
    eos = int(free[0, 3 + 2])  # row 0's third new token
    hits = [np.flatnonzero(r[3:] == eos) for r in free]
    out = np.asarray(generate(params, cfg, prompt, 10, eos_id=eos))
    lists = generate(params, cfg, prompt.tolist(), 10, eos_id=eos)
    for b in range(4):
        if len(hits[b]) == 0:  # never emits eos: unchanged
            np.testing.assert_array_equal(out[b], free[b])
            assert lists[b] == free[b].tolist()
            continue
        cut = 3 + hits[b][0] + 1  # up to and including the first eos
        np.testing.assert_array_equal(out[b, :cut], free[b, :cut])
        assert (out[b, cut:] == eos).all()
        assert lists[b] == free[b, :cut].tolist()
    assert len(lists[0]) == 3 + 3  # the test is not vacuous: row 0 is cut


def test_eos_when_every_row_finishes_early(tiny, rng):
    cfg, params = tiny
    prompt = rng.integers(0, cfg.vocab_size, (1, 4))
    eos = int(np.asarray(generate(params, cfg, prompt, 1))[0, -1])  # the very first new token
    out = np.asarray(generate(params, cfg, prompt, 40, eos_id=eos))
    assert out.shape == (1, 44) and (out[0, 4:] == eos).all()
    assert generate(params, cfg, [prompt[0].tolist()], 40, eos_id=eos) == [
        prompt[0].tolist() + [eos]
    ]


# --- sampling ---------------------------------------------------------------------------------


def test_sampling_is_reproducible_from_the_key(tiny, rng):
    cfg, params = tiny
    prompt = rng.integers(0, cfg.vocab_size, (2, 4))

    def run(key, **kw):
        return np.asarray(generate(params, cfg, prompt, 20, temperature=1.5, key=key, **kw))

    a = run(jax.random.key(0))
    np.testing.assert_array_equal(a, run(jax.random.key(0)))
    assert (a != run(jax.random.key(1))).any()
    # A fresh key per step: the uncached path draws the same tokens (same fold_in(key, j)).
    np.testing.assert_array_equal(a, run(jax.random.key(0), use_cache=False))
    greedy = np.asarray(generate(params, cfg, prompt, 20))
    np.testing.assert_array_equal(run(jax.random.key(3), top_k=1), greedy)
    assert (a != greedy).any()


@pytest.mark.slow
def test_step_j_samples_with_fold_in_key_j(tiny, rng):
    """The documented contract, rebuilt by hand from GPTModel logits."""
    cfg, params = tiny
    seq = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 3)))
    key = jax.random.key(42)
    out = np.asarray(generate(params, cfg, seq, 6, temperature=0.8, top_k=20, key=key))
    apply = jax.jit(GPTModel(cfg).apply)
    for j in range(6):
        logits = apply({"params": params}, seq)[:, -1] / 0.8
        kth = jax.lax.top_k(logits, 20)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
        nxt = jax.random.categorical(jax.random.fold_in(key, j), logits)
        seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
    np.testing.assert_array_equal(out, seq)


# --- compiles ---------------------------------------------------------------------------------


def test_bucket_length():
    assert [bucket_length(n, 8) for n in (1, 8, 9, 16, 17, 200)] == [8, 8, 16, 16, 32, 256]
    assert bucket_length(900, 8, cap=1024) == 1024
    assert bucket_length(20, 8, cap=16) == 20  # never below n
    assert bucket_length(10, 8, cap=12) == 12


@pytest.mark.slow
def test_prompt_lengths_and_counts_share_compiles(tiny, rng):
    cfg, params = tiny
    b = 6  # a batch size no other test uses, so nothing is compiled yet
    generate(params, cfg, rng.integers(0, 100, (b, 3)), 5)  # compile the (8, 16) bucket
    before = TRACE_COUNTS["generate"]
    for t in (1, 2, 5, 7, 8):  # all in the prompt bucket 8
        for n in (1, 6, 16):  # all in the new-token bucket 16
            generate(params, cfg, rng.integers(0, 100, (b, t)), n)
    generate(params, cfg, [[1], [2, 3, 4, 5, 6, 7]] * 3, 9)  # ragged, same buckets
    assert TRACE_COUNTS["generate"] == before
    generate(params, cfg, rng.integers(0, 100, (b, 12)), 5)  # prompt bucket 16: one more
    generate(params, cfg, rng.integers(0, 100, (b, 12)), 17)  # new-token bucket 32: one more
    assert TRACE_COUNTS["generate"] == before + 2


# --- streaming --------------------------------------------------------------------------------


@pytest.mark.slow
def test_stream_yields_the_same_tokens_in_chunks(tiny, rng):
    cfg, params = tiny
    prompt = rng.integers(0, cfg.vocab_size, (3, 5))
    want = np.asarray(generate(params, cfg, prompt, 25))[:, 5:]  # past the context too
    chunks = list(generate_stream(params, cfg, prompt, 25, chunk_size=4))
    assert [c.shape[1] for c in chunks] == [4] * 6 + [1]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), want)
    key = jax.random.key(5)
    sampled = np.asarray(generate(params, cfg, prompt, 12, temperature=1.0, key=key))[:, 5:]
    chunks = generate_stream(params, cfg, prompt, 12, chunk_size=5, temperature=1.0, key=key)
    np.testing.assert_array_equal(np.concatenate(list(chunks), axis=1), sampled)


def test_stream_stops_once_every_row_is_done(tiny, rng):
    cfg, params = tiny
    prompt = rng.integers(0, cfg.vocab_size, (1, 4))
    eos = int(np.asarray(generate(params, cfg, prompt, 1))[0, -1])
    chunks = list(generate_stream(params, cfg, prompt, 40, chunk_size=2, eos_id=eos))
    assert len(chunks) == 1 and chunks[0].shape == (1, 40) and (chunks[0] == eos).all()


# --- argument errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        (np.zeros((2, 0), int), {}, r"prompts is empty"),
        (np.zeros((3,), int), {}, r"prompts must have shape \[batch, tokens\]"),
        ([[1, 2], []], {}, r"prompts\[1\] is empty"),
        ([], {}, "prompts is an empty list"),
        ([[1, 100]], {}, r"prompts\[0\] holds token id 100, outside the vocabulary \[0, 100\)"),
        (np.full((1, 2), 0.5), {}, "integer token ids"),
        ([[1]], {"max_new_tokens": -1}, "max_new_tokens must be >= 0, got -1"),
        ([[1]], {"temperature": -1.0}, "GenerationConfig.temperature must be a finite number "
                                       ">= 0"),
        ([[1]], {"temperature": 1.0}, "needs a PRNG key"),
        ([[1]], {"top_k": 0}, "GenerationConfig.top_k must be >= 1, got 0"),
        ([[1]], {"top_k": 101}, r"GenerationConfig.top_k must be in \[1, 100\]"),
        ([[1]], {"top_p": 0.0}, r"GenerationConfig.top_p must be in \(0, 1\]"),
        ([[1]], {"eos_id": 100}, r"GenerationConfig.eos_id must be in the vocabulary \[0, 100\), "
                                 r"got 100"),
        ([[1]], {"temperature": 1.0, "key": 3}, "key must be a PRNG key"),
    ],
)
def test_bad_arguments_raise_before_tracing(tiny, prompts, kwargs, match):
    cfg, params = tiny
    kwargs = {"max_new_tokens": 3, **kwargs}
    before = dict(TRACE_COUNTS)
    with pytest.raises(ValueError, match=match):
        generate(params, cfg, prompts, **kwargs)
    assert dict(TRACE_COUNTS) == before


def test_one_config_or_its_keywords_at_every_entry_point(tiny, rng):
    cfg, params = tiny
    prompt = rng.integers(0, cfg.vocab_size, (2, 5))
    key = jax.random.key(3)
    config = GenerationConfig(temperature=0.9, top_k=20, top_p=0.9, eos_id=7)
    want = np.asarray(generate(params, cfg, prompt, 9, temperature=0.9, top_k=20, top_p=0.9,
                               eos_id=7, key=key))
    np.testing.assert_array_equal(generate(params, cfg, prompt, 9, config, key=key), want)
    gen = Generator(params, cfg)
    np.testing.assert_array_equal(gen.generate(prompt, 9, config=config, key=key), want)
    for chunks in (gen.stream(prompt, 9, config, chunk_size=4, key=key),
                   generate_stream(params, cfg, prompt, 9, config, chunk_size=4, key=key)):
        np.testing.assert_array_equal(np.concatenate(list(chunks), axis=1), want[:, 5:])
    before = dict(TRACE_COUNTS)
    for call in (lambda: generate(params, cfg, prompt, 9, config, top_k=5, key=key),
                 lambda: gen.stream(prompt, 9, config, eos_id=3, key=key)):
        with pytest.raises(ValueError, match="give config= or the keywords .*, not both"):
            call()
    with pytest.raises(TypeError, match="unknown generation keyword 'temp'"):
        generate_stream(params, cfg, prompt, 9, temp=0.5)
    assert dict(TRACE_COUNTS) == before


def test_zero_new_tokens_returns_the_prompts(tiny):
    cfg, params = tiny
    np.testing.assert_array_equal(generate(params, cfg, np.array([[1, 2, 3]]), 0), [[1, 2, 3]])
    assert generate(params, cfg, [[4], [5, 6]], 0) == [[4], [5, 6]]


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def small_vocab_model(monkeypatch):
    """`jaxgpt generate` on a tiny model with GPT-2's vocabulary (fast, and text decodes)."""
    from jaxgpt import cli
    from jaxgpt.cli import generate as generate_command

    cfg = GPTConfig(**{**TINY, "vocab_size": 50257})
    params = init_params(cfg, 3)
    monkeypatch.setattr(generate_command, "load_model",
                        lambda args: (cfg, params, "tiny test model"))
    return types.SimpleNamespace(main=cli.main, cfg=cfg, params=params)


@pytest.mark.parametrize("sampling", [[], pytest.param(
    ["--temperature", "1.0", "--top-k", "50", "--seed", "4"], marks=pytest.mark.slow)])
def test_cli_stream_prints_the_same_text(small_vocab_model, capsys, sampling):
    argv = ["generate", "--prompt", "Hello, I am", "--max-new-tokens", "20", *sampling]
    assert small_vocab_model.main(argv) == 0
    plain = capsys.readouterr().out
    assert small_vocab_model.main([*argv, "--stream"]) == 0
    assert capsys.readouterr().out == plain
    assert plain.startswith("Hello, I am") and len(plain) > len("Hello, I am\n")


def test_cli_rejects_bad_sampling_flags(small_vocab_model):
    with pytest.raises(SystemExit, match=r"^jaxgpt generate: --top-p must be in \(0, 1\], "
                                         r"got 1.5$"):
        small_vocab_model.main(["generate", "--top-p", "1.5"])
    with pytest.raises(SystemExit, match=r"^jaxgpt generate: --top-k must be in \[1, 50257\] "
                                         r"\(the vocabulary\), got 60000$"):
        small_vocab_model.main(["generate", "--temperature", "1", "--top-k", "60000"])


def test_cli_eos_stops_after_the_first_end_of_text(small_vocab_model, capsys, monkeypatch):
    from jaxgpt import tokenizer as tok

    cfg, params = small_vocab_model.cfg, small_vocab_model.params
    prompt = [int(t) for t in tok.text_to_token_ids("Hello, I am", tok.get_tokenizer())[0]]
    ids = generate(params, cfg, [prompt], 12)[0]
    stop = ids[len(prompt) + 3]  # pretend the 4th new token is <|endoftext|>
    want = ids[: ids.index(stop, len(prompt)) + 1]
    monkeypatch.setattr(tok, "EOT_ID", stop)
    argv = ["generate", "--prompt", "Hello, I am", "--max-new-tokens", "12", "--eos"]
    for extra in ([], ["--stream"]):
        assert small_vocab_model.main([*argv, *extra]) == 0
        assert capsys.readouterr().out == tok.token_ids_to_text(want, tok.get_tokenizer()) + "\n"
    assert len(want) < len(ids)
