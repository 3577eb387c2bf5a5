"""Quantized decoding (`jaxgpt.nn.quant`): int8 params, the error bounds of both modes, every
generation path and decoding layout with `quantize=`, and the int8 product in the CPU's HLO."""

import re
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

from jaxgpt.config import GPTConfig
from jaxgpt.inference import Generator, decode, generate, generate_stream, generator
from jaxgpt.inference.decode import TRACE_COUNTS
from jaxgpt.inference.sampling import sampling_config
from jaxgpt.interp import interventions
from jaxgpt.nn import GPTModel, MultiHeadAttention, init_params, param_shapes
from jaxgpt.nn.layers import Linear
from jaxgpt.nn.layout import Layout, prepare
from jaxgpt.nn.model import nbytes, quantized_shapes
from jaxgpt.nn.quant import MODES, QMAX, is_quantized, matmul, quantize, quantize_params

# How far a quantized model's logits may be from fp32's, as a fraction of the largest fp32
# logit, on GPT-2-initialised random weights. Derived, per matmul: a weight's rounding error is
# uniform in [-s/2, s/2] with s = max|w_col| / 127, so the output's RMS error over its RMS is
# (max|w_col| / rms(w_col)) / (127 * sqrt(12)) <= 4 / 440 ~ 0.9% (a Gaussian column of <= 3072
# entries stays within 4 RMS); w8a8 adds the same for the activations' per-token rounding
# (LayerNorm'd or GELU'd rows, also within ~4 RMS): ~1.3%. Independent errors of the 9
# matmuls of the tiny model (4 a block, and the head) add in quadrature: x3, 2.7% and 3.9% of
# the logits' RMS; the largest error and the largest logit are both ~3.5 RMS of their
# (Gaussian-like) spreads, so the ratio stays that; x2 headroom for the heavier tails.
LOGITS_REL_ERROR = {"int8": 0.05, "w8a8": 0.08}
# int8 mode multiplies by weights that are exact in float32 (|q| <= 127), so its cached and
# uncached paths differ by float32 rounding only, as the float model's do (its tests: 1e-5).
FLOAT_ORDER_ATOL = 1e-4
LAYOUTS = {"book": Layout(), "cpu": Layout.for_batch(1, "cpu"),
           "gpu": Layout.for_batch(1, "gpu"), "tpu": Layout.for_batch(1, "tpu")}


@pytest.fixture(scope="module")
def tiny():
    cfg = GPTConfig(**TINY)
    return cfg, init_params(cfg, 1)


def _linear_paths(cfg):
    """The key paths of every Linear of the book's params (all of them quantized)."""
    paths = [(f"trf_blocks_{i}", part, name) for i in range(cfg.n_layers)
             for part, names in (("att", ("W_query", "W_key", "W_value", "out_proj")),
                                 ("ff", ("layers_0", "layers_2"))) for name in names]
    return [*paths, ("out_head",)]


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _quantized_model(cfg, mode, layout=LAYOUTS["book"]):
    return GPTModel(cfg, layout=layout.with_quant(mode, "cpu"))


# --- the parameter transform --------------------------------------------------------------------


def test_quantize_params_rounds_each_weight_to_within_half_a_step(tiny):
    """|w - q * s| <= s / 2 per weight: `w / s` is rounded to the nearest integer. Computed in
    float64, where `q * s` is exact (8 x 24 significant bits); the float32 division `w / s` is
    off by at most 127 * 2^-24 < 2^-17 of a step, hence the bound s * (1/2 + 2^-17)."""
    cfg, params = tiny
    zero_col = params["out_head"]["kernel"].at[:, 3].set(0.0)
    params = {**params, "out_head": {"kernel": zero_col}}
    qp = quantize_params(params, cfg)
    for path in _linear_paths(cfg):
        w = np.asarray(_at(params, path)["kernel"], np.float64)
        got = _at(qp, path)
        q, s = np.asarray(got["kernel"]), np.asarray(got["kernel_scale"], np.float64)
        assert q.dtype == np.int8 and q.shape == w.shape and s.shape == (w.shape[1],), path
        assert np.all(np.abs(w - q * s) <= s * (0.5 + 2.0**-17)), path
        amax = np.abs(w).max(axis=0)
        np.testing.assert_allclose(s, np.where(amax > 0, amax / QMAX, 1.0), rtol=2**-23)
        assert np.abs(q).max() == QMAX and q.min() >= -QMAX, path  # the absmax uses the range
    head = qp["out_head"]
    assert head["kernel_scale"][3] == 1.0 and not head["kernel"][:, 3].any()
    emb = np.asarray(params["tok_emb"]["embedding"], np.float64)  # per row
    q, s = np.asarray(qp["tok_emb"]["embedding"]), np.asarray(qp["tok_emb"]["embedding_scale"])
    assert q.dtype == np.int8 and s.shape == (cfg.vocab_size,)
    assert np.all(np.abs(emb - q * s[:, None].astype(np.float64)) <= s[:, None] * (0.5 + 2**-17))
    # LayerNorms, biases and pos_emb are the float arrays as given.
    block, qblock = params["trf_blocks_0"], qp["trf_blocks_0"]
    assert qblock["norm1"] is block["norm1"] and qp["pos_emb"] is params["pos_emb"]
    assert qblock["att"]["out_proj"]["bias"] is block["att"]["out_proj"]["bias"]
    shapes = quantized_shapes(cfg)
    assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), qp) == \
        jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), shapes)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_params(qp, cfg)


def test_quantized_shapes_allocate_nothing_and_take_a_quarter_of_the_bytes():
    """124M untied: every matrix at 1 byte, scales and the rest at 4 (design note: 158.7 MiB
    against 621.8 MiB)."""
    from jaxgpt.config import GPT_CONFIG_124M

    cfg = GPTConfig(**GPT_CONFIG_124M)
    shapes = quantized_shapes(cfg)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(shapes))
    assert round(nbytes(param_shapes(cfg)) / 2**20, 1) == 621.8
    assert round(nbytes(shapes) / 2**20, 1) == 158.7


def test_fused_qkv_of_quantized_params_is_the_quantized_fused_qkv(tiny):
    """Per output channel, quantizing commutes with concatenating outputs: prepare on int8
    params equals quantizing the prepared float params, bit for bit."""
    cfg, params = tiny
    layout = Layout(fused_qkv=True)
    a = prepare(quantize_params(params, cfg), cfg, layout=layout)
    b = quantize_params(prepare(params, cfg, layout=layout), cfg)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


# --- the products ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [False, True])
def test_a_quantized_linear_is_within_its_derived_bound(rng, mode, rows):
    """Per output j: int8, y' - y = x (q s - w), so |dy_j| <= s_j / 2 * ||x||_1. w8a8 adds the
    activations' rounding: x' w' - x w = (x' - x) w' + x (w' - w), |x'_i - x_i| <= a / 2 with
    a = max|x| / 127 per row, so |dy_j| <= a / 2 * ||w'_j||_1 + s_j / 2 * ||x||_1. Plus float32
    rounding of the sums (1e-5 relative, far below)."""
    d_in, d_out = 64, 48
    w = jnp.asarray(rng.normal(0, 0.02, (d_in, d_out)), jnp.float32)
    x = jnp.asarray(rng.normal(0, 1, (5, d_in)), jnp.float32)
    q, s = (np.asarray(a) for a in quantize(w, axis=0))
    kernel = q.T if rows else q
    y = Linear(d_out, use_bias=False, rows=rows, quant=mode).apply(
        {"params": {"kernel": kernel, "kernel_scale": s}}, x)
    xn, wq = np.asarray(x, np.float64), q.astype(np.float64) * s
    err = np.abs(np.asarray(y, np.float64) - xn @ np.asarray(w, np.float64))
    bound = s / 2 * np.abs(xn).sum(axis=1, keepdims=True)
    if mode == "w8a8":
        a = np.abs(xn).max(axis=1, keepdims=True) / QMAX
        bound = bound + a / 2 * np.abs(wq).sum(axis=0)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-6), (err / bound).max()
    assert (err / bound).max() > 0.01  # the bound is not vacuous against the real error


def test_one_row_padded_to_two_gives_the_same_w8a8_product(rng):
    """XLA:CPU keeps a 2-row int8 product int8; the zero row is dropped, and int32
    accumulation is exact, so padding changes no bit."""
    q = jnp.asarray(rng.integers(-QMAX, QMAX + 1, (48, 64)), jnp.int8)
    s = jnp.asarray(rng.uniform(1e-4, 1e-3, 48), jnp.float32)
    x = jnp.asarray(rng.normal(0, 1, (1, 1, 64)), jnp.float32)
    plain = matmul(x, q, s, "w8a8", rows=True)
    padded = matmul(x, q, s, "w8a8", rows=True, pad_one_row=True)
    assert padded.shape == plain.shape == (1, 1, 48) and np.array_equal(padded, plain)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tied", [False, True])
def test_logits_error_on_random_weights_within_the_modes_bound(rng, mode, tied):
    """See LOGITS_REL_ERROR for the derivation; the book's form and the CPU's layout alike."""
    cfg = GPTConfig(**{**TINY, "tie_embeddings": tied})
    params = init_params(cfg, 1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 12)))
    want = np.asarray(GPTModel(cfg).apply({"params": params}, tokens))
    qp = quantize_params(params, cfg)
    for layout in (Layout(), LAYOUTS["cpu"]):
        got = _quantized_model(cfg, mode, layout).apply(
            {"params": prepare(qp, cfg, layout=layout)}, tokens)
        rel = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
        assert rel <= LOGITS_REL_ERROR[mode], (layout, rel)
        assert rel > 1e-4  # quantized for real: float32 alone would be ~1e-6


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_decoding_layout_takes_quantized_params(rng, tiny, mode, name):
    """Each backend's layout, full forward and cached (several rows, and one row as a B=1
    step runs it), gives the book form's quantized logits. The int8 products are exact, so the
    layouts differ only by float32 rounding, except where that moves a w8a8 activation across
    a rounding boundary (one step of one activation: within the mode's bound)."""
    from conftest import cached_logits

    cfg, params = tiny
    qp = quantize_params(params, cfg)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)))
    want = np.asarray(_quantized_model(cfg, mode).apply({"params": qp}, tokens))
    layout = LAYOUTS[name]
    model = _quantized_model(cfg, mode, layout)
    prepared = prepare(qp, cfg, layout=layout)
    atol = (FLOAT_ORDER_ATOL if mode == "int8" else LOGITS_REL_ERROR[mode] * np.abs(want).max())
    np.testing.assert_allclose(model.apply({"params": prepared}, tokens), want, atol=atol)
    np.testing.assert_allclose(cached_logits(model, prepared, tokens, 4, 12), want, atol=atol)
    np.testing.assert_allclose(cached_logits(model, prepared, tokens[:1], 1, 12), want[:1],
                               atol=atol)


# --- generation ---------------------------------------------------------------------------------


def _full_forward_check(cfg, qp, mode, prompts, rows_out, eos_id=None):
    """Every new token of `rows_out` (prompt + new, list API) against the argmax of the
    quantized model's uncached full forward over the tokens before it, wherever that forward's
    top-2 margin exceeds what the two paths may differ by; the share of tokens checked."""
    model = _quantized_model(cfg, mode)
    checked = total = 0
    for prompt, row in zip(prompts, rows_out, strict=True):
        for k in range(len(prompt), len(row)):
            logits = np.asarray(model.apply({"params": qp}, jnp.asarray([row[:k]])))[0, -1]
            top2 = np.sort(logits)[-2:]
            # int8: float32 rounding only. w8a8: the same int8 weights and per-token scales, so
            # the paths differ only where float32 rounding moves an activation across a rounding
            # boundary, one step of one activation each: less than all of a row's rounding,
            # which LOGITS_REL_ERROR bounds.
            tol = (FLOAT_ORDER_ATOL if mode == "int8"
                   else LOGITS_REL_ERROR[mode] * np.abs(logits).max())
            total += 1
            if top2[1] - top2[0] > tol:
                checked += 1
                assert row[k] == int(np.argmax(logits)), (mode, prompt, k, row)
            if eos_id is not None and row[k] == eos_id:
                assert k == len(row) - 1  # cut after the first EOS
    return checked / total


@pytest.mark.parametrize("mode", MODES)
def test_quantized_greedy_tokens_are_the_uncached_full_forwards(tiny, mode):
    """Ragged prompts through the cache: each token is the full forward's argmax of its own
    prefix (the same int8 params, no cache, one row alone, no padding)."""
    cfg, params = tiny
    qp = quantize_params(params, cfg)
    gen = Generator(params, cfg, quantize=mode)
    prompts = [[5, 17, 3], [42], [7, 7, 8, 9, 60]]
    out = gen.generate(prompts, 9)
    assert [len(r) for r in out] == [12, 10, 14]
    assert _full_forward_check(cfg, qp, mode, prompts, out) > 0.4  # 0.59 of w8a8's here
    # EOS: the first row's 4th new token as eos_id; rows stop after their first one.
    eos = out[0][len(prompts[0]) + 3]
    cut = gen.generate(prompts, 9, eos_id=eos)
    assert cut[0] == out[0][:len(prompts[0]) + 4]
    _full_forward_check(cfg, qp, mode, prompts, cut, eos_id=eos)
    # Streaming: the chunks are generate's new tokens, the same program in pieces.
    chunks = list(gen.stream(prompts, 9, chunk_size=4))
    new = np.concatenate(chunks, axis=1)
    assert [list(r) for r in new] == [r[len(p):] for p, r in zip(prompts, out, strict=True)]
    # And no cache at all (the window recomputed every step) gives the same tokens too.
    assert gen.generate(prompts, 9, use_cache=False) == out


@pytest.mark.parametrize("mode", MODES)
def test_quantized_sampling_is_reproducible_and_the_same_with_or_without_the_cache(tiny, mode):
    cfg, params = tiny
    gen = Generator(params, cfg, quantize=mode)
    prompts = np.asarray([[5, 17, 3], [1, 2, 3]])
    kw = dict(key=jax.random.key(3), temperature=1.0, top_k=20)
    a = np.asarray(gen.generate(prompts, 10, **kw))
    assert np.array_equal(a, gen.generate(prompts, 10, **kw))
    assert np.array_equal(a, gen.generate(prompts, 10, use_cache=False, **kw))
    assert not np.array_equal(a, gen.generate(prompts, 10, **{**kw, "key": jax.random.key(4)}))
    # The function forms quantize as the Generator does.
    assert np.array_equal(a, generate(params, cfg, prompts, 10, quantize=mode, **kw))
    streamed = np.concatenate(list(generate_stream(params, cfg, prompts, 10, quantize=mode,
                                                   chunk_size=3, **kw)), axis=1)
    assert np.array_equal(streamed, a[:, 3:])


def test_hooks_see_float_activations_and_steer_under_quantize(tiny):
    cfg, params = tiny
    seen = {}

    def record(x, name):
        seen[name] = x.dtype
        return x

    names = ["hook_embed", "blocks.0.attn.hook_q", "blocks.0.attn.hook_z",
             "blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post",
             "ln_final.hook_normalized"]
    prompts = [[5, 17, 3]]
    for mode in MODES:
        gen = Generator(params, cfg, quantize=mode)
        seen.clear()
        gen.generate(prompts, 4, hooks=[(n, record) for n in names])
        assert seen == dict.fromkeys(names, jnp.float32), (mode, seen)
        plain = gen.generate(prompts, 8)
        v = 40.0 * jax.random.normal(jax.random.key(0), (cfg.emb_dim,))
        steered = gen.generate(prompts, 8, hooks=[("blocks.1.hook_resid_post",
                                                   interventions.add(v))])
        assert steered != plain  # the vector reaches the int8 layers after it
        # The steering of the float model, where a push this size decides the tokens.
        assert steered == generate(params, cfg, prompts, 8, hooks=[(
            "blocks.1.hook_resid_post", interventions.add(v))])


def test_the_generator_holds_int8_matrices_only(tiny):
    """After quantizing, no float matrix is referenced: every 2-D array the generator holds,
    but `pos_emb` (float by design), is int8; the caller's float arrays can be freed."""
    cfg, _ = tiny
    params = init_params(cfg, 4)
    watch = weakref.ref(params["trf_blocks_0"]["ff"]["layers_0"]["kernel"])
    gen = Generator(params, cfg, quantize="w8a8")
    del params
    gen.generate([[1, 2, 3]], 3)
    assert watch() is None
    held = jax.tree_util.tree_flatten_with_path(vars(gen))[0]
    matrices = [(jax.tree_util.keystr(path), x.dtype) for path, x in held
                if isinstance(x, jax.Array) and x.ndim == 2]
    assert matrices and all(dt == jnp.int8 for path, dt in matrices if "pos_emb" not in path), \
        matrices
    assert is_quantized(gen.weights(1)[1])


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("mode", [None, *MODES])
def test_each_backend_keeps_one_matrix_form_over_batch_sizes(backend, mode):
    """A Generator prepares its params once and drops the book form: that holds while the
    layout of every batch size holds its matrices alike."""
    forms = {Layout.for_batch(b, backend, mode).matrix_form() for b in range(1, 65)}
    assert len(forms) == 1 and next(iter(forms)).quant == mode
    assert Layout.for_batch(1, backend, "w8a8").pad_one_row == (backend == "cpu")


class _OwnAttention(MultiHeadAttention):
    def attend(self, x, deterministic=True, mask=None, cache=None, slot=None):
        return super().attend(x, deterministic, mask, cache, slot)


def test_a_bad_mode_or_a_model_that_cannot_take_it_is_refused_before_tracing(tiny):
    cfg, params = tiny
    before = dict(TRACE_COUNTS)
    with pytest.raises(ValueError, match=r"^quantize must be one of 'int8', 'w8a8' or None, "
                                         r"got 'int4'$"):
        generate(params, cfg, [[1, 2]], 3, quantize="int4")
    variant = GPTModel(cfg, attention_cls=_OwnAttention)
    with pytest.raises(ValueError, match=r"^quantize='w8a8' needs the book's Linear layers, "
                                         r"and _OwnAttention replaces __call__ or attend"):
        Generator(params, cfg, model=variant, quantize="w8a8")
    with pytest.raises(ValueError, match=r"^params hold int8 matrices \(quantized\)"):
        Generator(quantize_params(params, cfg), cfg)
    assert dict(TRACE_COUNTS) == before
    # Params quantized beforehand are taken as they are.
    qp = quantize_params(params, cfg)
    assert Generator(qp, cfg, quantize="int8").generate([[1, 2]], 3) == \
        Generator(params, cfg, quantize="int8").generate([[1, 2]], 3)


# --- the compiled CPU step ------------------------------------------------------------------------


def _dots(params, cfg, mode, batch, pad_one_row=None):
    """`{(result, lhs, rhs) element types}` of every dot in the compiled generation program."""
    shape = decode.program_shape(cfg, 5, 4)
    rows = generator._batch([np.arange(5, dtype=np.int32)] * batch, cfg, shape.prompt_slots)
    model, weights = Generator(params, cfg, quantize=mode).weights(batch)
    if pad_one_row is not None:
        model = model.clone(layout=model.layout._replace(pad_one_row=pad_one_row))
    hlo = decode.generate_tokens.lower(
        weights, jnp.asarray(rows.prompt), jnp.asarray(rows.start), jnp.int32(4),
        decode.make_knobs(None, 0.0, None, None, True), model=model,
        new_slots=shape.new_slots, sampling=sampling_config(0.0, None, None), use_cache=True,
    ).compile().as_text()
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))  # HLO names are module-unique
    found = re.findall(r"= (\w+)\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    return {(out, types[a], types[b]) for out, a, b in found}


@pytest.mark.parametrize("batch", [1, 3])
def test_the_cpu_w8a8_step_multiplies_int8_by_int8_into_int32(tiny, batch):
    """Every product with the weights is s8 x s8 -> s32, also at one row (padded to two,
    which XLA:CPU keeps int8). Positive controls: the float program has no such dot, and a
    one-row product left unpadded multiplies an s32 conversion of the weight."""
    cfg, params = tiny
    assert _dots(params, cfg, None, batch) == {("f32", "f32", "f32")}
    dots = _dots(params, cfg, "w8a8", batch)
    assert ("s32", "s8", "s8") in dots
    assert {d for d in dots if d[0] != "f32"} == {("s32", "s8", "s8")}  # the rest: attention
    if batch == 1:
        unpadded = _dots(params, cfg, "w8a8", 1, pad_one_row=False)
        assert any(d[0] == "s32" and "s32" in d[1:] for d in unpadded), unpadded


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_generate_quantize_flag_decodes_with_int8_weights(tmp_path, capsys, mode):
    """`jaxgpt generate --quantize MODE` on a small random checkpoint prints the tokens of
    `generate(..., quantize=MODE)` and says the weights' size."""
    from jaxgpt.cli import main
    from jaxgpt.io import checkpoint
    from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

    cfg = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1,
                    drop_rate=0.0, qkv_bias=False)
    params = init_params(cfg, 0)
    path = checkpoint.save(tmp_path / "ckpt", params, cfg)
    assert main(["generate", "--checkpoint", str(path), "--max-new-tokens", "6",
                 "--no-compile-cache", "--quantize", mode]) == 0
    out, err = capsys.readouterr()
    tok = get_tokenizer()
    prompt = [int(t) for t in text_to_token_ids("Hello, I am", tok)[0]]
    want = generate(params, cfg, [prompt], 6, quantize=mode)[0]
    assert out == token_ids_to_text(want, tok) + "\n"
    mib = nbytes(quantized_shapes(cfg)) / 2**20
    assert f"jaxgpt: int8 weights ({mode}), {mib:.1f} MiB (float32: " in err


def test_generate_quantize_flag_refuses_an_unknown_mode(capsys):
    from jaxgpt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--quantize", "int4"])
    assert e.value.code == 2
    assert "--quantize: invalid choice: 'int4' (choose from" in capsys.readouterr().err
