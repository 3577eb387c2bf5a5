"""The same hooks reach every path through the model: cached and recomputing generation,
streaming, the book's greedy loop, and the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, reference, torch_reference

from jaxgpt.config import GPTConfig
from jaxgpt.inference import Generator, decode, generate, generate_stream, generate_text_simple
from jaxgpt.io.torch_state import from_torch_state_dict
from jaxgpt.training.config import TrainConfig
from jaxgpt.training.step import init_train_state, make_train_step

torch = reference("torch")
Partial = jax.tree_util.Partial
LAYER = 1


def _add(vector, x, name):
    return x + vector


@pytest.fixture(scope="module")
def book():
    ref = torch_reference(TINY, seed=5)
    cfg = GPTConfig(**TINY)
    return ref, cfg, from_torch_state_dict(ref.state_dict(), cfg)


def _steering(cfg, seed):
    # Of norm ~8 against a residual stream of norm ~0.3: it moves the greedy choice.
    return np.random.default_rng(seed).normal(size=cfg.emb_dim).astype(np.float32) * 1.5


def _book_tokens(ref, prompt, n, vector):
    """The book's `generate_text_simple`, with the vector added to block LAYER's output by a
    PyTorch forward hook (the book's own model, untouched)."""
    from llms_from_scratch.ch04 import generate_text_simple as book_generate

    handle = ref.trf_blocks[LAYER].register_forward_hook(
        lambda module, inputs, out: out + torch.as_tensor(vector))
    try:
        with torch.no_grad():
            out = book_generate(ref, torch.as_tensor(prompt, dtype=torch.long), n,
                                TINY["context_length"])
    finally:
        handle.remove()
    return out.numpy()


@pytest.mark.slow
def test_steering_gives_the_books_tokens_on_every_generation_path(book):
    ref, cfg, params = book
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 5)).astype(np.int32)
    n = 14  # 5 + 14 > context 16: the last steps crop the window, as the book does
    vector = _steering(cfg, 1)
    hooks = [(f"blocks.{LAYER}.hook_resid_post", Partial(_add, jnp.asarray(vector)))]
    want = _book_tokens(ref, prompt, n, vector)
    np.testing.assert_array_equal(generate(params, cfg, prompt, n, hooks=hooks), want)
    np.testing.assert_array_equal(generate(params, cfg, prompt, n, hooks=hooks,
                                           use_cache=False), want)
    np.testing.assert_array_equal(generate_text_simple(params, cfg, prompt, n, hooks=hooks),
                                  want)
    chunks = list(generate_stream(params, cfg, prompt, n, chunk_size=3, hooks=hooks))
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), want[:, 5:])
    plain = np.asarray(generate(params, cfg, prompt, n))
    np.testing.assert_array_equal(plain, _book_tokens(ref, prompt, n, np.zeros_like(vector)))
    assert (plain[:, 5:] != want[:, 5:]).mean() > 0.3  # the vector steers


def test_a_new_steering_vector_reuses_the_compiled_loop(book):
    _, cfg, params = book
    gen = Generator(params, cfg)
    prompt = [[1, 2, 3]]
    name = f"blocks.{LAYER}.hook_resid_post"
    first = gen.generate(prompt, 6, hooks=[(name, Partial(_add, jnp.asarray(_steering(cfg, 2))))])
    before = decode.TRACE_COUNTS["generate"]
    outs = [gen.generate(prompt, 6, hooks=[(name, Partial(_add, jnp.asarray(_steering(cfg, s))))])
            for s in (3, 4)]
    assert decode.TRACE_COUNTS["generate"] == before
    assert len({tuple(o[0]) for o in [first, *outs]}) > 1  # each ran with its own vector
    with pytest.raises(ValueError, match="unknown hook point 'blocks.1.hook_resid'"):
        gen.generate(prompt, 2, hooks=[("blocks.1.hook_resid", Partial(_add, jnp.zeros(32)))])


def test_a_bf16_generation_keeps_its_dtype_under_a_float32_hook(book):
    _, cfg, params = book
    seen = []

    def record(x, name):  # a plain function, bound: it runs when the program is traced
        seen.append((name, x.shape[1], x.dtype))
        return x

    # The float32 vector goes into block 0's output; the recorder sees that point after it
    # (hooks at one point run in order) and points of block 1 downstream. (The LayerNorms'
    # points are float32 whatever the dtype: their statistics are.)
    steered = "blocks.0.hook_resid_post"
    later = [steered, "blocks.1.hook_resid_pre", "blocks.1.attn.hook_v",
             "blocks.1.hook_resid_post"]
    gen = Generator(params, cfg, dtype=jnp.bfloat16)

    def tokens(vector):
        hooks = [(steered, Partial(_add, jnp.asarray(vector, jnp.float32)))]
        return gen.generate([[4, 5, 6]], 8, hooks=hooks + [(name, record) for name in later])

    out = tokens(_steering(cfg, 5))
    # Every forward pass of the program was traced: the prefill (the prompt's 8 slots), the
    # cached steps (one token) and the window recomputed past the context (16 tokens).
    assert [t for _, t, _ in seen] == [8] * 4 + [1] * 4 + [16] * 4, seen
    assert [name for name, _, _ in seen] == later * 3
    assert all(dtype == jnp.bfloat16 for _, _, dtype in seen), seen
    # The hook acts: with a zero vector (the same compiled program) the tokens are unsteered.
    assert out != tokens(np.zeros(cfg.emb_dim))


@pytest.mark.slow
def test_the_train_step_runs_the_hooks_in_its_forward_pass(book):
    _, cfg, params = book
    head, dh = 2, cfg.head_dim

    def ablate(x, name):  # z [B, T, H, Dh]: head 2 of layer 0 writes nothing
        return x.at[:, :, head].set(0.0)

    tc = TrainConfig(batch_size=2, seq_len=8, steps=1)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 9)))
    batch = (tokens[:, :-1], tokens[:, 1:])
    grads = {}
    for label, hooks in (("plain", ()), ("ablated", [("blocks.0.attn.hook_z", ablate)])):
        step = make_train_step(cfg, tc.replace(lr=1.0, weight_decay=0.0, grad_clip=None,
                                               warmup_steps=0), hooks=hooks)
        state = init_train_state(cfg, tc, params)
        new, metrics = step(state, batch, jax.random.key(0))
        w_before = np.asarray(params["trf_blocks_0"]["att"]["out_proj"]["kernel"])
        w_after = np.asarray(new.params["trf_blocks_0"]["att"]["out_proj"]["kernel"])
        grads[label] = (w_after - w_before)[head * dh:(head + 1) * dh]
    # An ablated head's output rows get no gradient (z_h = 0), so AdamW leaves them alone.
    np.testing.assert_array_equal(grads["ablated"], 0.0)
    assert np.abs(grads["plain"]).max() > 0.1
