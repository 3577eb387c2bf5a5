"""Each module against the book's PyTorch module with the same weights (fp32, 1e-5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference, torch_reference

from jaxgpt.config import GPT_CONFIG_124M, GPTConfig
from jaxgpt.io.torch_state import from_torch_state_dict
from jaxgpt.nn import (
    GELU,
    AttentionMask,
    FeedForward,
    GPTModel,
    KVCache,
    LayerNorm,
    LayerOutput,
    MultiHeadAttention,
    Output,
    TransformerBlock,
    apply_method,
    count_params,
    init_cache,
    init_params,
    layer_norm,
    param_shapes,
    size_mb,
)

torch = reference("torch")
ch04 = reference("llms_from_scratch.ch04")
ch03 = reference("llms_from_scratch.ch03")

ATOL = 1e-5


def _linear(module):
    """A torch nn.Linear as a Flax Dense params dict."""
    out = {"kernel": module.weight.detach().numpy().T}
    if module.bias is not None:
        out["bias"] = module.bias.detach().numpy()
    return out


def _norm(module):
    return {"scale": module.scale.detach().numpy(), "shift": module.shift.detach().numpy()}


def _x(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _close(got, want, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got), want.detach().numpy(), atol=atol, rtol=0)


def test_layernorm_matches_reference(rng):
    ref = ch04.LayerNorm(32)
    with torch.no_grad():
        ref.scale.copy_(torch.randn(32))
        ref.shift.copy_(torch.randn(32))
    x = _x(rng, 2, 5, 32) * 3 + 1
    got = LayerNorm(32).apply({"params": _norm(ref)}, x)
    _close(got, ref(torch.from_numpy(x)))


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_one_pass_layernorm_matches_the_reference(rng, offset):
    """`one_pass` (GPU decoding) against the book's two-pass LayerNorm, and against the
    float64 result of the same fp32 inputs, also on rows whose mean is 1e4 times their spread.

    After the shift by the row's first value the sums are over values of a few units, so the
    result is within ~1e-6 of float64 times |scale| (about 3 here): 1e-5 holds. At offset 1e4
    the book's own fp32 mean is off by ~1e-3 of the spread, so there the one-pass result is
    checked against float64 only, and must be no further from it than the book's result. Unshifted
    one-pass statistics would lose the variance to cancellation there (the control)."""
    ref = ch04.LayerNorm(768)
    with torch.no_grad():
        ref.scale.copy_(torch.randn(768))
        ref.shift.copy_(torch.randn(768))
    params = _norm(ref)
    x = _x(rng, 3, 4, 768) + np.float32(offset)
    got = np.asarray(layer_norm(x, params["scale"], params["shift"], one_pass=True))
    reference = ref(torch.from_numpy(x)).detach().numpy()
    x64 = x.astype(np.float64)
    norm64 = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    want64 = params["scale"].astype(np.float64) * norm64 + params["shift"]
    np.testing.assert_allclose(got, want64, atol=ATOL, rtol=0)
    if offset:
        assert np.abs(got - want64).max() <= np.abs(reference - want64).max()
    else:
        np.testing.assert_allclose(got, reference, atol=ATOL, rtol=0)
    naive = np.square(x).mean(axis=-1) - np.square(x.mean(axis=-1))  # fp32, no shift
    assert (np.abs(naive - x64.var(axis=-1)).max() > 0.1) == bool(offset)


def test_one_pass_applies_to_a_single_row_only(rng):
    params = {"scale": _x(rng, 64), "shift": _x(rng, 64)}
    norm = LayerNorm(64, one_pass=True)
    for shape in [(1, 1, 64), (64,), (2, 1, 64), (1, 3, 64)]:
        x = _x(rng, *shape) * 3 + 1
        want = layer_norm(x, params["scale"], params["shift"],
                          one_pass=math.prod(shape[:-1]) == 1)
        np.testing.assert_array_equal(norm.apply({"params": params}, x), want)
    x = _x(rng, 1, 64) * 3 + 1  # the two forms differ in the last bits (the test can fail)
    assert not np.array_equal(layer_norm(x, params["scale"], params["shift"], one_pass=True),
                              layer_norm(x, params["scale"], params["shift"]))


def test_gelu_matches_reference(rng):
    x = _x(rng, 4, 64) * 4
    _close(GELU().apply({}, x), ch04.GELU()(torch.from_numpy(x)))


def test_feedforward_matches_reference(rng, tiny_dict):
    torch.manual_seed(0)
    ref = ch04.FeedForward(tiny_dict)
    params = {"layers_0": _linear(ref.layers[0]), "layers_2": _linear(ref.layers[2])}
    x = _x(rng, 2, 7, 32)
    got = FeedForward(GPTConfig(**tiny_dict)).apply({"params": params}, x)
    _close(got, ref(torch.from_numpy(x)))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_multihead_attention_matches_reference(rng, qkv_bias):
    torch.manual_seed(0)
    ref = ch03.MultiHeadAttention(32, 32, context_length=16, dropout=0.0, num_heads=4,
                                  qkv_bias=qkv_bias).eval()
    params = {n: _linear(getattr(ref, n)) for n in ("W_query", "W_key", "W_value", "out_proj")}
    x = _x(rng, 3, 9, 32)
    mha = MultiHeadAttention(32, 32, context_length=16, dropout=0.0, num_heads=4, qkv_bias=qkv_bias)
    _close(mha.apply({"params": params}, x), ref(torch.from_numpy(x)))


def test_attention_is_causal(rng):
    mha = MultiHeadAttention(32, 32, context_length=16, dropout=0.0, num_heads=4)
    x = _x(rng, 1, 8, 32)
    params = mha.init(jax.random.PRNGKey(0), x)
    y = np.asarray(x).copy()
    y[:, 5:] = 100.0  # change the future only
    a, b = mha.apply(params, x), mha.apply(params, y)
    np.testing.assert_array_equal(np.asarray(a)[:, :5], np.asarray(b)[:, :5])
    assert not np.allclose(np.asarray(a)[:, 5:], np.asarray(b)[:, 5:])


def test_transformer_block_matches_reference(rng, tiny_dict):
    torch.manual_seed(0)
    ref = ch04.TransformerBlock(tiny_dict).eval()
    att = {n: _linear(getattr(ref.att, n)) for n in ("W_query", "W_key", "W_value", "out_proj")}
    params = {
        "att": att,
        "ff": {"layers_0": _linear(ref.ff.layers[0]), "layers_2": _linear(ref.ff.layers[2])},
        "norm1": _norm(ref.norm1),
        "norm2": _norm(ref.norm2),
    }
    x = _x(rng, 2, 11, 32)
    got = TransformerBlock(GPTConfig(**tiny_dict)).apply({"params": params}, x)
    _close(got, ref(torch.from_numpy(x)))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_full_model_logits_match_reference_tiny(rng, tiny_dict, qkv_bias):
    tiny_dict["qkv_bias"] = qkv_bias
    ref = torch_reference(tiny_dict, seed=1)
    cfg = GPTConfig(**tiny_dict)
    params = from_torch_state_dict(ref.state_dict(), cfg)
    ids = rng.integers(0, cfg.vocab_size, size=(3, cfg.context_length))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids))
    _close(GPTModel(cfg).apply({"params": params}, ids), want)


@pytest.mark.slow
def test_full_model_logits_match_reference_124m(rng, book_124m):
    ref, cfg, params = book_124m
    ids = rng.integers(0, cfg.vocab_size, size=(2, 64))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids))
    got = GPTModel(cfg).apply({"params": params}, ids)
    _close(got, want)


def test_dropout_is_off_by_default_and_seeded_when_on(rng, tiny_dict):
    cfg = GPTConfig(**{**tiny_dict, "drop_rate": 0.5})
    params = init_params(cfg, 0)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 8))
    model = GPTModel(cfg)
    eval_a = model.apply({"params": params}, ids)
    eval_b = model.apply({"params": params}, ids, deterministic=True)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = lambda seed: model.apply(  # noqa: E731
        {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(seed)}
    )
    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), eval_a)


def test_tied_head_uses_token_embedding(rng, tiny_dict):
    cfg = GPTConfig(**{**tiny_dict, "tie_embeddings": True})
    params = init_params(cfg, 0)
    assert "out_head" not in params
    ids = rng.integers(0, cfg.vocab_size, size=(1, 4))
    model = GPTModel(cfg)
    hidden = model.apply({"params": params}, ids, method=GPTModel.hidden)
    normed = LayerNorm(cfg.emb_dim).apply({"params": params["final_norm"]}, hidden)
    want = normed @ params["tok_emb"]["embedding"].T
    np.testing.assert_allclose(model.apply({"params": params}, ids), want, atol=1e-5)


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_params_and_logits(rng, tiny_cfg):
    # GPT-2's init gives attention scores of std ~0.01: a uniform softmax whatever their scale,
    # so no error of the attention's arithmetic would show. Q and K 10x larger give scores of
    # std ~1, as in a trained model.
    params = init_params(tiny_cfg, 0)
    params = {name: ({**part, "att": {**part["att"], **{
        w: jax.tree_util.tree_map(lambda a: 10 * a, part["att"][w]) for w in ("W_query", "W_key")
    }}} if name.startswith("trf_blocks_") else part) for name, part in params.items()}
    ids = rng.integers(0, tiny_cfg.vocab_size, size=(1, 6))
    logits = GPTModel(tiny_cfg, dtype=jnp.bfloat16).apply({"params": params}, ids)
    assert logits.dtype == jnp.float32
    ref = GPTModel(tiny_cfg).apply({"params": params}, ids)
    # bf16 keeps 8 significant bits: a rounding moves a value by at most 2^-9 of it. About ten
    # roundings lie on the way from the embeddings to a logit (the embedding sum, each block's
    # norm input and two residual sums, the final norm, the head's input and weights), each
    # moving the logits by at most 2^-9 of the head's absolute sum sum_d |x_d w_dv|, which at
    # these weights is about the largest logit: 10 * 2^-9 (2%) of max |logit|. Here the error
    # is 0.7% of it; attention scores scaled by 1/dh instead of 1/sqrt(dh) move them by 18%.
    err = float(jnp.max(jnp.abs(logits - ref)))
    assert 0 < err <= 10 * 2**-9 * float(jnp.max(jnp.abs(ref)))  # > 0: bf16 was computed
    # A bf16 model's own init keeps fp32 parameters (mixed precision: bf16 compute only).
    own = GPTModel(tiny_cfg, dtype=jnp.bfloat16).init(jax.random.PRNGKey(0), ids)["params"]
    leaves = jax.tree_util.tree_leaves(own)
    assert len(leaves) == len(jax.tree_util.tree_leaves(params))
    assert all(p.dtype == jnp.float32 for p in leaves)


def test_parameter_counts_of_the_124m_config():
    cfg = GPTConfig(**GPT_CONFIG_124M)
    shapes = param_shapes(cfg)
    assert count_params(shapes) == 163_009_536
    assert round(size_mb(shapes), 2) == 621.83
    assert count_params(param_shapes(cfg.replace(tie_embeddings=True))) == 124_412_160


def test_parameter_count_equals_the_torch_reference(tiny_dict):
    ref = torch_reference(tiny_dict)
    n_torch = sum(p.numel() for p in ref.parameters())
    assert count_params(init_params(GPTConfig(**tiny_dict))) == n_torch


def test_init_is_seeded(tiny_cfg):
    a, b, c = init_params(tiny_cfg, 3), init_params(tiny_cfg, 3), init_params(tiny_cfg, 4)
    leaves = lambda p: jax.tree_util.tree_leaves(p)  # noqa: E731
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))
    assert not np.array_equal(a["tok_emb"]["embedding"], c["tok_emb"]["embedding"])



def test_each_call_returns_one_type_whatever_its_arguments(rng, tiny_cfg):
    cfg = tiny_cfg
    params = init_params(cfg, 0)
    variables = {"params": params}
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 5)))
    model = GPTModel(cfg)
    full = model.apply(variables, ids)  # [B, T, V], the book's call
    decode = apply_method(model, variables, GPTModel.decode)
    out = decode(ids, init_cache(cfg, 2, 8), 0)
    assert isinstance(out, Output) and isinstance(out.cache, KVCache)
    np.testing.assert_allclose(out.logits, full, atol=1e-5)
    last = decode(ids, init_cache(cfg, 2, 8), 0, last_only=True)
    assert last.logits.shape == (2, cfg.vocab_size)
    np.testing.assert_allclose(last.logits, full[:, -1], atol=1e-5)
    np.testing.assert_array_equal(last.cache.pos[:, :6], [[0, 1, 2, 3, 4, -1]] * 2)
    # One block, with and without a cache: a LayerOutput, the book's call its `out`.
    x = apply_method(model, variables, GPTModel.hidden)(ids, stop_at_layer=1)  # [B, T, D]
    mask = AttentionMask.causal(5)
    alone = apply_method(model, variables, GPTModel.run_block)(1, x, mask)
    h, dh = cfg.n_heads, cfg.emb_dim // cfg.n_heads
    assert isinstance(alone, LayerOutput) and alone.kv[0].shape == (2 * h, 5, dh)
    book = TransformerBlock(cfg).apply({"params": params["trf_blocks_1"]}, x)
    np.testing.assert_allclose(alone.out, book, atol=1e-6)
    att = MultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.context_length, 0.0, cfg.n_heads,
                             cfg.qkv_bias)
    att_params = {"params": params["trf_blocks_1"]["att"]}
    y = att.apply(att_params, x)  # [B, T, D], the book's call
    z = att.apply(att_params, x, method=MultiHeadAttention.attend)
    assert isinstance(z, LayerOutput)
    np.testing.assert_array_equal(z.out, y)
