"""Quantized decoding (`jaxgpt.nn.quant`): int8 params, the error bounds of both modes, every
generation path and decoding layout with `quantize=`, and the int8 product in the CPU's HLO."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

from jaxgpt.config import GPTConfig
from jaxgpt.nn import GPTModel, init_params, param_shapes
from jaxgpt.nn.layers import Linear
from jaxgpt.nn.layout import Layout, prepare
from jaxgpt.nn.model import nbytes, quantized_shapes
from jaxgpt.nn.quant import MODES, QMAX, matmul, quantize, quantize_params

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
