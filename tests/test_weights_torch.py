"""state_dict of the book's PyTorch GPTModel <-> jaxgpt params."""

import jax
import numpy as np
import pytest
from conftest import reference, torch_reference

from jaxgpt.config import GPTConfig
from jaxgpt.io.torch_state import from_torch_state_dict, to_torch_state_dict

torch = reference("torch")


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_round_trip_torch_jaxgpt_torch_is_exact(tiny_dict, qkv_bias):
    tiny_dict["qkv_bias"] = qkv_bias
    ref = torch_reference(tiny_dict, seed=5)
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
