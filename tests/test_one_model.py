"""One model for every path: variants of a part, cached activations, the Generator, bf16, top-p."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, cached_logits

from jaxgpt.config import GPTConfig
from jaxgpt.inference import Generator, decode, generate, generate_text_simple, generator
from jaxgpt.interp.cache import run_with_cache
from jaxgpt.nn import FeedForward, GPTModel, LayerNorm, Linear, MultiHeadAttention, init_params
from jaxgpt.nn.cache import init_cache
from jaxgpt.nn.layout import Layout
from jaxgpt.nn.model import BF16_LOGITS_REL_ERROR


class ALiBiAttention(MultiHeadAttention):
    """ALiBi (Press et al., 2022): a linear penalty on the query-key distance, one slope a head."""

    def score_bias(self, mask):
        slopes = 2.0 ** (-8.0 * jnp.arange(1, self.num_heads + 1) / self.num_heads)  # [H]
        dist = mask.q_pos[:, None, :, None] - mask.k_pos[:, None, None, :]  # [B, 1, T, S]
        return -slopes[None, :, None, None] * dist.astype(jnp.float32)


class SquaredReLUFeedForward(FeedForward):
    """Another activation, written as its own __call__ (so generation keeps the book's layout)."""

    @nn.compact
    def __call__(self, x):
        d = self.cfg.emb_dim
        h = Linear(4 * d, dtype=self.dtype, name="layers_0")(x)
        return Linear(d, dtype=self.dtype, name="layers_2")(jnp.square(jax.nn.relu(h)))


class RMSNorm(LayerNorm):
    """RMS normalisation (no mean subtraction), with the book's parameter names."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (self.emb_dim,), jnp.float32)
        shift = self.param("shift", nn.initializers.zeros, (self.emb_dim,), jnp.float32)
        x32 = x.astype(jnp.float32)
        norm_x = x32 / jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (scale * norm_x + shift).astype(self.dtype)


VARIANTS = {
    "alibi": dict(attention_cls=ALiBiAttention),
    "squared-relu": dict(feed_forward_cls=SquaredReLUFeedForward),
    "rmsnorm": dict(norm_cls=RMSNorm),
}


@pytest.fixture(scope="module")
def tiny():
    cfg = GPTConfig(**TINY)  # context_length 16
    return cfg, init_params(cfg, 7)


# One variant in the fast tier; every path is the same code for each.
@pytest.mark.parametrize("name", [n if n == "rmsnorm" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in VARIANTS])
def test_a_variant_part_runs_in_every_generation_path(tiny, rng, name):
    cfg, params = tiny
    model = GPTModel(cfg, **VARIANTS[name])
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 10)))
    base = GPTModel(cfg).apply({"params": params}, ids)
    assert np.abs(model.apply({"params": params}, ids) - base).max() > 1e-3  # it changes numbers
    # Ragged rows (1 to 23 tokens: short, at and past context_length 16), 30 new tokens each.
    rows = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (1, 6, 16, 23)]
    cached = generate(params, cfg, rows, 30, model=model)
    assert cached == generate(params, cfg, rows, 30, model=model, use_cache=False)
    plain = generate(params, cfg, rows, 30)
    assert cached != plain
    for row, got in zip(rows, cached, strict=True):
        solo = generate_text_simple(params, cfg, np.array([row]), 30, model=model)
        assert got == np.asarray(solo)[0].tolist()


@pytest.mark.slow
def test_a_variant_trains(tiny, rng):
    """The training step applies the variant: its loss is the variant's, not GPTModel's."""
    from jaxgpt.training.config import TrainConfig
    from jaxgpt.training.loss import cross_entropy_loss
    from jaxgpt.training.step import init_train_state, make_train_step

    cfg, _ = tiny
    model = GPTModel(cfg, **VARIANTS["alibi"])
    tc = TrainConfig(steps=2, batch_size=2, seq_len=8, lr=1e-3, warmup_steps=0)
    state = init_train_state(cfg, tc)
    inputs = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    targets = jnp.roll(inputs, -1, axis=1)
    want = cross_entropy_loss(model.apply({"params": state.params}, inputs), targets)
    base = cross_entropy_loss(GPTModel(cfg).apply({"params": state.params}, inputs), targets)
    step = make_train_step(cfg, tc, model=model)
    _, metrics = step(state, (inputs, targets), jax.random.key(0))
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    assert abs(float(want) - float(base)) > 1e-4


class NoFeedForward(FeedForward):
    """A part with no parameters of its own: an attention-only model."""

    def __call__(self, x):
        return jnp.zeros_like(x)


def test_init_params_of_a_variant(tiny):
    """A variant's params are its own structure (here, no feed-forward weights), the same
    numbers as the book's model's where the structures agree, and its compiled init is kept
    whatever its dtype or hooks."""
    from jaxgpt.nn import model as model_module

    cfg, _ = tiny
    book = init_params(cfg, 3)
    variant = GPTModel(cfg, feed_forward_cls=NoFeedForward)
    params = init_params(cfg, 3, model=variant)
    assert "ff" not in params["trf_blocks_0"] and "ff" in book["trf_blocks_0"]
    np.testing.assert_array_equal(params["tok_emb"]["embedding"], book["tok_emb"]["embedding"])
    np.testing.assert_array_equal(params["trf_blocks_1"]["att"]["W_query"]["kernel"],
                                  book["trf_blocks_1"]["att"]["W_query"]["kernel"])
    init = jax.jit(variant.init)  # (eager init rounds a few values differently)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params,
                           init(jax.random.PRNGKey(3), jnp.zeros((1, 1), jnp.int32))["params"])
    compiled = model_module._jitted_init.cache_info().currsize
    again = init_params(cfg, 4, model=variant.clone(dtype=jnp.bfloat16))
    assert model_module._jitted_init.cache_info().currsize == compiled
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match="model.cfg .* differs from cfg"):
        init_params(cfg.replace(n_layers=1), 0, model=variant)


def test_a_variant_for_another_config_is_refused(tiny):
    cfg, params = tiny
    other = GPTModel(cfg.replace(n_layers=1))
    with pytest.raises(ValueError, match="model.cfg .* differs from cfg"):
        generate(params, cfg, [[1, 2]], 3, model=other)


# --- cached activations -----------------------------------------------------------------------


def test_attention_patterns_and_block_outputs_are_kept_only_when_asked(tiny, rng):
    cfg, params = tiny
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 7)))
    model = GPTModel(cfg)
    plain = model.apply({"params": params}, ids)
    assert isinstance(plain, jax.Array)
    # Without a table nothing is sown, even when the collection is mutable.
    _, state = model.apply({"params": params}, ids, mutable=["intermediates"])
    assert not state.get("intermediates")
    names = [f"blocks.{i}.{n}" for i in range(cfg.n_layers)
             for n in ("attn.hook_pattern", "hook_resid_post")]
    logits, cache = run_with_cache(params, cfg, ids, names=names)
    np.testing.assert_allclose(logits, plain, atol=1e-5)
    assert list(cache) == names
    for i in range(cfg.n_layers):
        w = np.asarray(cache["pattern", i])
        assert w.shape == (2, cfg.n_heads, 7, 7)
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
        assert (w[..., np.triu_indices(7, 1)[0], np.triu_indices(7, 1)[1]] == 0).all()
    hidden = model.apply({"params": params}, ids, method=GPTModel.hidden)
    np.testing.assert_allclose(cache["resid_post", cfg.n_layers - 1], hidden, atol=1e-6)
    inter = {"trf_blocks_0": {"att": {"attn_weights": cache["pattern", 0]}}}

    # Layer 0's weights recomputed by hand from the parameters (NumPy, float64).
    p = jax.tree_util.tree_map(np.asarray, params)
    x = p["tok_emb"]["embedding"][np.asarray(ids)] + p["pos_emb"]["embedding"][:7]
    blk = p["trf_blocks_0"]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    h = blk["norm1"]["scale"] * (x - mu) / np.sqrt(var + 1e-5) + blk["norm1"]["shift"]

    def heads(name):  # [B, H, T, Dh]
        y = h @ blk["att"][name]["kernel"] + blk["att"][name]["bias"]
        return y.reshape(2, 7, cfg.n_heads, cfg.head_dim).transpose(0, 2, 1, 3)

    scores = heads("W_query") @ heads("W_key").transpose(0, 1, 3, 2) / np.sqrt(cfg.head_dim)
    scores = np.where(np.tril(np.ones((7, 7), bool)), scores, -np.inf)
    want = np.exp(scores - scores.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(inter["trf_blocks_0"]["att"]["attn_weights"], want, atol=1e-5)


def test_cli_attention_draws_the_heatmap(tmp_path, monkeypatch):
    from jaxgpt import cli
    from jaxgpt.cli import attention as attention_command

    cfg = GPTConfig(**{**TINY, "vocab_size": 50257})
    monkeypatch.setattr(attention_command, "load_model",
                        lambda args: (cfg, init_params(cfg, 3), "tiny"))
    one, grid = tmp_path / "one.png", tmp_path / "grid.png"
    argv = ["attention", "--prompt", "Your journey starts with one step", "--layer", "1"]
    assert cli.main([*argv, "--head", "2", "--out", str(one)]) == 0
    assert cli.main([*argv, "--out", str(grid)]) == 0
    for path in (one, grid):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert grid.stat().st_size > one.stat().st_size  # 4 heads drawn, not 1
    with pytest.raises(SystemExit, match=r"--layer must be in \[0, 1\] .* got 2"):
        cli.main(["attention", "--layer", "2"])
    with pytest.raises(SystemExit, match=r"--head must be in \[0, 3\] .* got 4"):
        cli.main(["attention", "--head", "4"])


# --- Generator: decode-ready weights built once -----------------------------------------------


@pytest.mark.slow
def test_generator_prepares_the_weights_once_and_drops_the_books_copy(tiny, rng, monkeypatch):
    cfg, params = tiny
    calls = []
    real = generator.prepare
    monkeypatch.setattr(generator, "prepare", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    gen = Generator(params, cfg)
    prompt = rng.integers(0, cfg.vocab_size, (1, 5))
    first = np.asarray(gen.generate(prompt, 6))
    for _ in range(3):
        np.testing.assert_array_equal(gen.generate(prompt, 6), first)
    chunks = list(gen.stream(prompt, 6, chunk_size=4))
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), first[:, 5:])
    gen.generate(rng.integers(0, cfg.vocab_size, (3, 5)), 6)  # another batch class
    assert len(calls) == 1 and gen._book is None  # one decode-ready copy, no book-form one
    monkeypatch.setattr(generator, "prepare", real)
    np.testing.assert_array_equal(generate(params, cfg, prompt, 6), first)


def test_a_rule_giving_several_rows_another_matrix_form_is_refused(tiny, rng, monkeypatch):
    # The generator keeps one decode-ready copy (the book-form one is dropped), so a layout
    # rule that held matrices differently for several rows could not be served from it.
    cfg, params = tiny
    monkeypatch.setattr(generator.Layout, "for_batch", classmethod(
        lambda cls, rows, backend=None, quant=None: Layout(fused_qkv=True, proj=rows == 1)))
    gen = Generator(params, cfg)
    gen.generate(rng.integers(0, cfg.vocab_size, (1, 5)), 2)
    with pytest.raises(RuntimeError, match="one matrix form per backend"):
        gen.generate(rng.integers(0, cfg.vocab_size, (3, 5)), 2)


def test_a_part_that_replaces_where_it_reads_its_matrices_gets_the_books_layout():
    class OwnAttention(MultiHeadAttention):  # reads its matrices in its own compact method
        @nn.compact
        def attend(self, x, deterministic=True, mask=None, cache=None, slot=None):
            return super().attend(x, deterministic, mask, cache, slot)

    keeps = generator._keeps_layout
    assert keeps(ALiBiAttention, MultiHeadAttention) and keeps(FeedForward, FeedForward)
    assert not keeps(OwnAttention, MultiHeadAttention)
    assert not keeps(SquaredReLUFeedForward, FeedForward)


# --- bf16 ---------------------------------------------------------------------------------------

# bf16 logits are held to `BF16_LOGITS_REL_ERROR` of the largest fp32 logit (its comment says
# why; 2% is the bound the issue set, the measured error here is ~0.5%), as gpu_check holds them.


def _sharp_attention(params):
    """`params` with W_query and W_key 10x larger: GPT-2's init gives attention scores of std
    ~0.01, a uniform softmax whatever their scale, so no error in the attention's arithmetic
    would show; 10x gives scores of std ~1, as in a trained model."""
    def sharpen(part):
        att = {**part["att"], **{w: jax.tree_util.tree_map(lambda a: 10 * a, part["att"][w])
                                 for w in ("W_query", "W_key")}}
        return {**part, "att": att}
    return {name: sharpen(part) if name.startswith("trf_blocks_") else part
            for name, part in params.items()}


@pytest.mark.slow
def test_bf16_decoding_logits_are_close_to_fp32(tiny, rng):
    """The cached path in bf16, on sharp attention (an attention scale of 1/dh instead of
    1/sqrt(dh) in bf16 decoding moves the logits far past the bound)."""
    cfg, params = tiny
    params = _sharp_attention(params)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)))
    want = np.asarray(GPTModel(cfg).apply({"params": params}, tokens))
    model, prepared = Generator(params, cfg, dtype=jnp.bfloat16).weights(2)
    assert prepared["trf_blocks_0"]["att"]["W_qkv"]["kernel"].dtype == jnp.bfloat16
    assert init_cache(cfg, 2, 12, model.dtype).keys[0].dtype == jnp.bfloat16
    got = np.asarray(cached_logits(model, prepared, tokens, prefill=4, slots=12))
    assert got.dtype == np.float32
    err = np.abs(got - want).max()
    assert 0 < err <= BF16_LOGITS_REL_ERROR * np.abs(want).max()


@pytest.mark.slow
def test_bf16_generate_picks_fp32_tokens_where_the_margin_allows(tiny, rng):
    """At every step whose fp32 top-2 margin, given the tokens bf16 chose before it, exceeds
    twice the bf16 logit error bound, bf16 chose fp32's token: no rounding within the bound
    can swap the argmax there. Given bf16's own prefix, every such step is compared, not only
    those before the first near-tie."""
    cfg, params = tiny
    prompt = rng.integers(0, cfg.vocab_size, (3, 4))
    bf16 = np.asarray(generate(params, cfg, prompt, 8, dtype=jnp.bfloat16))  # [3, 12]
    logits = np.asarray(GPTModel(cfg).apply({"params": params}, bf16))[:, 3:-1]  # [B, 8, V]
    top2 = np.sort(logits, axis=-1)[..., -2:]
    bound = BF16_LOGITS_REL_ERROR * np.abs(logits).max()
    safe = (top2[..., 1] - top2[..., 0]) > 2 * bound  # [B, 8]
    np.testing.assert_array_equal(bf16[:, 4:][safe], logits.argmax(-1)[safe])
    # The top two of 100 random logits lie ~1/3 of their spread apart and the largest ~2.5
    # spreads out, so the margin exceeds 4% of it at about 3 steps in 4 (here 16 of 24).
    assert safe.sum() >= safe.size // 2


# --- top-p through generate and the CLI ---------------------------------------------------------


def _top_p_by_hand(logits, top_p):
    """The documented nucleus filter, in NumPy: keep the most likely tokens while the mass
    before each is below top_p."""
    order = np.argsort(-logits, axis=-1, kind="stable")
    probs = np.take_along_axis(np.exp(logits - logits.max(-1, keepdims=True)), order, axis=-1)
    probs /= probs.sum(-1, keepdims=True)
    keep_sorted = (np.cumsum(probs, axis=-1) - probs) < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, logits, -np.inf)


def test_top_p_sampling_through_generate(tiny, rng):
    cfg, params = tiny
    seq = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 3)))
    key = jax.random.key(11)
    out = np.asarray(generate(params, cfg, seq, 6, temperature=0.05, top_p=0.5, key=key))
    apply = jax.jit(GPTModel(cfg).apply)
    kept = []
    for j in range(6):
        logits = np.asarray(apply({"params": params}, seq)[:, -1], np.float64) / 0.05
        filtered = _top_p_by_hand(logits, 0.5)
        kept.append(np.isfinite(filtered).sum(-1))
        nxt = jax.random.categorical(jax.random.fold_in(key, j), jnp.asarray(filtered, jnp.float32))
        seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
    np.testing.assert_array_equal(out, seq)
    kept = np.array(kept)
    assert (kept >= 1).all() and (kept < cfg.vocab_size).all() and (kept > 1).any()


@pytest.mark.slow
def test_cli_top_p_samples_from_the_nucleus(monkeypatch, capsys):
    """Every token `jaxgpt generate --top-p 0.3` prints lies in the nucleus that the fp32
    logits of its prefix give (computed here in NumPy), where one drawn without --top-p from
    the same key mostly does not."""
    from jaxgpt import cli, tokenizer
    from jaxgpt.cli import generate as generate_command

    cfg = GPTConfig(**{**TINY, "vocab_size": 50257})
    params = init_params(cfg, 3)
    monkeypatch.setattr(generate_command, "load_model", lambda args: (cfg, params, "tiny"))
    printed = []  # the token ids the command turns into text
    real = tokenizer.token_ids_to_text

    def spy(ids, tok=None):
        printed.append([int(i) for i in ids])
        return real(ids, tok)

    monkeypatch.setattr(tokenizer, "token_ids_to_text", spy)
    argv = ["generate", "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "1.0",
            "--seed", "4"]
    apply = jax.jit(GPTModel(cfg).apply)
    p = len(tokenizer.text_to_token_ids("Hello")[0])

    def mass_before(ids):
        """For each new token: the probability of the tokens more likely than it."""
        logits = np.asarray(apply({"params": params}, jnp.asarray([ids])), np.float64)[0]
        probs = np.exp(logits - logits.max(-1, keepdims=True))  # [T, V]
        probs /= probs.sum(-1, keepdims=True)
        return [probs[i][probs[i] > probs[i, ids[i + 1]]].sum() for i in range(p - 1, len(ids) - 1)]

    assert cli.main([*argv, "--top-p", "0.3"]) == 0
    out = capsys.readouterr().out
    (ids,) = printed
    assert out == real(ids) + "\n" and len(ids) == p + 8
    # jaxgpt sums the sorted probabilities in float32: over <= 50257 terms, each rounding off by
    # at most 2^-24 of the running sum, the mass before a token is within 50257 * 2^-24 = 3e-3.
    assert max(mass_before(ids)) < 0.3 + 3e-3
    printed.clear()
    assert cli.main(argv) == 0  # without --top-p: a draw from the whole distribution
    assert capsys.readouterr().out != out
    assert max(mass_before(printed[0])) > 0.3 + 3e-3  # the check above can fail


def test_generate_runs_the_same_jit_for_equal_variants(tiny):
    """Models are static jit arguments: equal modules share one compiled loop."""
    cfg, params = tiny
    generate(params, cfg, [[1, 2, 3]], 4, model=GPTModel(cfg, attention_cls=ALiBiAttention))
    before = decode.TRACE_COUNTS["generate"]
    generate(params, cfg, [[4, 5]], 3, model=GPTModel(cfg, attention_cls=ALiBiAttention))
    assert decode.TRACE_COUNTS["generate"] == before
