"""state_dict of the book's PyTorch GPTModel <-> jaxgpt params: each direction checked by the
logits of the model it feeds, not only by the other direction."""

import jax
import numpy as np
import pytest
from conftest import reference, torch_reference

from jaxgpt.config import GPTConfig
from jaxgpt.io.torch_state import from_torch_state_dict, to_torch_state_dict
from jaxgpt.nn import GPTModel, init_params

torch = reference("torch")


def _random_norms(ref, seed):
    """The book's model with random LayerNorm scales and shifts: they start at 1 and 0, where a
    swapped norm mapping (norm1 for norm2, scale for shift) would change nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith((".scale", ".shift")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + name.endswith(".scale"))
    return ref


def _torch_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.from_numpy(ids)).numpy()


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_from_torch_gives_the_books_logits(tiny_dict, qkv_bias, rng):
    tiny_dict["qkv_bias"] = qkv_bias
    ref = _random_norms(torch_reference(tiny_dict, seed=5), seed=5)
    cfg = GPTConfig(**tiny_dict)
    ids = rng.integers(0, cfg.vocab_size, (2, cfg.context_length))
    logits = GPTModel(cfg).apply({"params": from_torch_state_dict(ref.state_dict(), cfg)}, ids)
    # fp32 on both sides, the same operations in another order: roundings of ~1e-7 of logits
    # of up to ~2.5 (here 6e-7 apart), within the suite's parity bound of 1e-5.
    np.testing.assert_allclose(logits, _torch_logits(ref, ids), atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_to_torch_gives_jaxgpts_logits_in_the_book_model(tiny_dict, qkv_bias, rng):
    tiny_dict["qkv_bias"] = qkv_bias
    cfg = GPTConfig(**tiny_dict)
    flat, tree = jax.tree_util.tree_flatten_with_path(init_params(cfg, 6))
    keys = jax.random.split(jax.random.PRNGKey(6), len(flat))
    params = jax.tree_util.tree_unflatten(tree, [  # norms and biases random too (init: 1 and 0)
        a + 0.5 * jax.random.normal(key, a.shape) if path[-1].key in ("scale", "shift", "bias")
        else a for (path, a), key in zip(flat, keys, strict=True)])
    ref = torch_reference(tiny_dict, seed=0)
    ref.load_state_dict(to_torch_state_dict(params, cfg))
    ids = rng.integers(0, cfg.vocab_size, (2, cfg.context_length))
    np.testing.assert_allclose(_torch_logits(ref, ids),
                               GPTModel(cfg).apply({"params": params}, ids), atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_round_trip_torch_jaxgpt_torch_is_exact(tiny_dict, qkv_bias):
    tiny_dict["qkv_bias"] = qkv_bias
    ref = _random_norms(torch_reference(tiny_dict, seed=5), seed=5)
    cfg = GPTConfig(**tiny_dict)
    back = to_torch_state_dict(from_torch_state_dict(ref.state_dict(), cfg), cfg)
    sd = ref.state_dict()
    assert set(back) == set(sd)
    for key, tensor in sd.items():
        assert torch.equal(back[key], tensor), key
    fresh = torch_reference(tiny_dict, seed=6)
    fresh.load_state_dict(back)  # strict: every key and buffer is there


def test_params_have_the_shapes_of_the_flax_model(tiny_dict, tiny_cfg):
    from jaxgpt.nn import param_shapes

    params = from_torch_state_dict(torch_reference(tiny_dict).state_dict(), tiny_cfg)
    want = jax.tree_util.tree_map(lambda s: s.shape, param_shapes(tiny_cfg))
    assert jax.tree_util.tree_map(lambda a: a.shape, params) == want


def test_missing_key_is_named(tiny_dict, tiny_cfg):
    sd = dict(torch_reference(tiny_dict).state_dict())
    del sd["trf_blocks.1.ff.layers.2.bias"]
    with pytest.raises(ValueError, match=r"trf_blocks\.1\.ff\.layers\.2\.bias"):
        from_torch_state_dict(sd, tiny_cfg)


def test_shape_mismatch_is_named(tiny_dict, tiny_cfg):
    sd = dict(torch_reference(tiny_dict).state_dict())
    sd["trf_blocks.0.att.W_key.weight"] = torch.zeros(32, 16)
    with pytest.raises(ValueError, match=r"trf_blocks\.0\.att\.W_key\.weight.*\(32, 16\)"):
        from_torch_state_dict(sd, tiny_cfg)


def test_state_dict_of_another_config_is_refused(tiny_dict, tiny_cfg):
    sd = torch_reference({**tiny_dict, "n_layers": 3}).state_dict()
    with pytest.raises(ValueError, match="trf_blocks.2"):
        from_torch_state_dict(sd, tiny_cfg)


def test_params_of_another_config_are_refused(tiny_dict, tiny_cfg):
    params = from_torch_state_dict(torch_reference(tiny_dict).state_dict(), tiny_cfg)
    wider = tiny_cfg.replace(emb_dim=64)
    with pytest.raises(ValueError, match="tok_emb"):
        to_torch_state_dict(params, wider)


def test_accepts_numpy_arrays(tiny_dict, tiny_cfg):
    sd = {k: v.numpy() for k, v in torch_reference(tiny_dict).state_dict().items()}
    params = from_torch_state_dict(sd, tiny_cfg)
    np.testing.assert_array_equal(params["pos_emb"]["embedding"], sd["pos_emb.weight"])
