"""Hugging Face GPT-2 directories: loading, saving, and parity with transformers.

Every model here is a randomly initialised `GPT2LMHeadModel` saved with `save_pretrained`;
nothing is downloaded. transformers initialises biases to zero and LayerNorms to (1, 0), which
would hide a swapped bias or scale/shift mapping, so `_randomize` perturbs every parameter.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import reference

from jaxgpt.config import GPTConfig
from jaxgpt.inference import generate_text_simple
from jaxgpt.io.hf import (
    from_hf_state_dict,
    hf_name_map,
    hf_shape,
    load_pretrained,
    save_pretrained,
    to_hf_state_dict,
)
from jaxgpt.io.hf_config import gpt_config_to_hf, hf_config_to_gpt
from jaxgpt.io.params import flatten
from jaxgpt.nn import GPTModel, count_params, param_shapes

torch = reference("torch")
transformers = reference("transformers")

TINY_HF = dict(vocab_size=100, n_positions=16, n_embd=32, n_head=4, n_layer=2)
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _randomize(model, seed):
    """Every parameter random: weights N(0, 0.02), biases N(0, 0.02), LN scales near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise if p.ndim > 1 or "ln_" not in name else 0.1 * noise)
    return model


def hf_model(seed=0, **config):
    """A random `GPT2LMHeadModel` in eval mode (no dropout)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**{**TINY_HF, **NO_DROPOUT, **config})
    return _randomize(transformers.GPT2LMHeadModel(cfg), seed).eval()


def assert_close(got, want):
    """fp32 parity: every logit within 1e-5."""
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def jax_logits(params, cfg, ids):
    return np.asarray(GPTModel(cfg).apply({"params": params}, np.asarray(ids, np.int32)))


def hf_greedy(model, prompt, n):
    """transformers' greedy decoding, EOS stop disabled; also the top-2 margin at every step."""
    ids = torch.as_tensor(np.asarray(prompt), dtype=torch.long)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
        min_new_tokens=n, eos_token_id=None, pad_token_id=0, output_scores=True,
        return_dict_in_generate=True,
    )
    top2 = torch.stack(out.scores).topk(2, dim=-1).values  # [n, B, 2]
    return out.sequences.numpy(), float((top2[..., 0] - top2[..., 1]).min())


@pytest.fixture
def tiny_dir(tmp_path):
    model = hf_model(seed=1)
    path = tmp_path / "tiny-hf"
    model.save_pretrained(path)
    return model, path


def _ids(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


# --- loading ---------------------------------------------------------------------------------


def test_load_pretrained_logits_match_transformers(tiny_dir):
    model, path = tiny_dir
    cfg, params = load_pretrained(path)
    assert cfg == GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                            drop_rate=0.0, qkv_bias=True, tie_embeddings=True)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(param_shapes(cfg))
    ids = _ids(100, (3, 16))
    assert_close(jax_logits(params, cfg, ids), hf_logits(model, ids))


def test_greedy_generation_token_identical_to_transformers(tiny_dir):
    model, path = tiny_dir
    cfg, params = load_pretrained(path)
    prompt = _ids(100, (2, 4), seed=3)
    want, margin = hf_greedy(model, prompt, 12)
    assert margin > 1e-4, "argmax nearly tied: the comparison would be luck; change the seed"
    got = np.asarray(generate_text_simple(params, cfg, prompt, 12))
    np.testing.assert_array_equal(got, want)


def test_untied_hf_model_loads_with_its_own_head(tmp_path):
    model = hf_model(seed=2, tie_word_embeddings=False)
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    model.save_pretrained(tmp_path / "untied")
    cfg, params = load_pretrained(tmp_path / "untied")
    assert cfg.tie_embeddings is False and "out_head" in params
    ids = _ids(100, (2, 16))
    assert_close(jax_logits(params, cfg, ids), hf_logits(model, ids))


def test_sharded_safetensors_load(tiny_dir, tmp_path):
    model, _ = tiny_dir
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    assert not (path / "model.safetensors").exists()
    cfg, params = load_pretrained(path)
    ids = _ids(100, (2, 16))
    assert_close(jax_logits(params, cfg, ids), hf_logits(model, ids))


def _openai_style_state_dict(model):
    """As OpenAI's original upload: no `transformer.` prefix, `attn.bias` mask buffers."""
    sd = {k.removeprefix("transformer."): v.clone() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def test_pytorch_model_bin_unprefixed_with_buffers_loads(tiny_dir, tmp_path):
    model, src = tiny_dir
    path = tmp_path / "bin"
    path.mkdir()
    (path / "config.json").write_text((src / "config.json").read_text())
    torch.save(_openai_style_state_dict(model), path / "pytorch_model.bin")
    cfg, params = load_pretrained(path)
    ids = _ids(100, (2, 16))
    assert_close(jax_logits(params, cfg, ids), hf_logits(model, ids))


class _Payload:
    """Unpickling this calls `Path.touch`: a file that runs code when loaded unsafely."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pytorch_model_bin_never_runs_code(tiny_dir, tmp_path):
    _, src = tiny_dir
    path = tmp_path / "evil"
    path.mkdir()
    (path / "config.json").write_text((src / "config.json").read_text())
    marker = tmp_path / "code-ran"
    torch.save({"transformer.wte.weight": torch.zeros(100, 32), "x": _Payload(marker)},
               path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*weights_only=True"):
        load_pretrained(path)
    assert not marker.exists()
    # The payload is real: an unrestricted unpickler runs it.
    torch.load(path / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_bfloat16_safetensors_load_as_float32(tiny_dir, tmp_path):
    model, _ = tiny_dir
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, params = load_pretrained(tmp_path / "bf16")
    leaves = jax.tree_util.tree_leaves(params)
    assert {leaf.dtype for leaf in leaves} == {np.dtype(np.float32)}
    wte = model.transformer.wte.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["tok_emb"]["embedding"]), wte)


def test_from_hf_state_dict_splits_fused_qkv(tiny_dir):
    model, _ = tiny_dir
    cfg = hf_config_to_gpt(model.config.to_dict())
    params = from_hf_state_dict(model.state_dict(), cfg)
    w = model.transformer.h[1].attn.c_attn.weight.detach().numpy()  # [D, 3D], Conv1D [in, out]
    b = model.transformer.h[1].attn.c_attn.bias.detach().numpy()
    att = params["trf_blocks_1"]["att"]
    for k, name in enumerate(("W_query", "W_key", "W_value")):
        np.testing.assert_array_equal(np.asarray(att[name]["kernel"]), w[:, 32 * k:32 * (k + 1)])
        np.testing.assert_array_equal(np.asarray(att[name]["bias"]), b[32 * k:32 * (k + 1)])


# --- saving / round trip -----------------------------------------------------------------------


def random_params(cfg, seed=0):
    """Random params with non-zero biases and shifts (a mis-mapped one shows); no jit compile."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jax.numpy.asarray(base + 0.05 * rng.standard_normal(s.shape), dtype=np.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))


@pytest.mark.parametrize("tie,qkv_bias", [(True, True), (False, False)])
def test_save_pretrained_round_trip_through_transformers(tmp_path, tiny_cfg, tie, qkv_bias):
    cfg = tiny_cfg.replace(tie_embeddings=tie, qkv_bias=qkv_bias)
    params = random_params(cfg, 5)
    path = save_pretrained(params, cfg, tmp_path / "out")
    assert sorted(f.name for f in path.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".out*")), "the temporary directory was left behind"
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="np") as f:
        assert ("lm_head.weight" in f.keys()) is (not tie)
    model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    assert model.config.tie_word_embeddings is tie
    ids = _ids(100, (2, 16))
    want = jax_logits(params, cfg, ids)
    assert_close(hf_logits(model, ids), want)
    # ... and back: the same config (config.json keeps qkv_bias=False, whose biases were
    # written as zeros), with the same logits.
    cfg2, params2 = load_pretrained(path)
    assert cfg2 == cfg
    np.testing.assert_array_equal(jax_logits(params2, cfg2, ids), want)


@pytest.mark.parametrize("tie", [True, False])
def test_to_hf_state_dict_loads_strictly_into_transformers(tiny_cfg, tie):
    cfg = tiny_cfg.replace(tie_embeddings=tie)
    params = random_params(cfg, 7)
    sd = to_hf_state_dict(params, cfg)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**TINY_HF, **NO_DROPOUT, tie_word_embeddings=tie)).eval()
    assert set(sd) == set(model.state_dict())
    assert all(v.dtype == np.float32 and v.flags.writeable for v in sd.values())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    ids = _ids(100, (2, 16))
    assert_close(hf_logits(model, ids), jax_logits(params, cfg, ids))


def test_save_pretrained_refuses_existing_path(tmp_path, tiny_cfg):
    params = random_params(tiny_cfg, 0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out"):
        save_pretrained(params, tiny_cfg, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a checkpoint directory: not one holding other files.
    with pytest.raises(FileExistsError, match="not a jaxgpt or Hugging Face checkpoint.*keep.txt"):
        save_pretrained(params, tiny_cfg, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    save_pretrained(params, tiny_cfg, tmp_path / "hf")
    save_pretrained(random_params(tiny_cfg, 1), tiny_cfg, tmp_path / "hf", overwrite=True)
    assert load_pretrained(tmp_path / "hf")[0] == tiny_cfg


def test_interrupted_save_pretrained_leaves_nothing(tmp_path, tiny_cfg, monkeypatch):
    import safetensors.numpy

    params = random_params(tiny_cfg, 0)
    save_pretrained(params, tiny_cfg, tmp_path / "old")

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file, then the "crash"
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(params, tiny_cfg, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(random_params(tiny_cfg, 1), tiny_cfg, tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temporary left either
    _, back = load_pretrained(tmp_path / "old")  # the previous directory, intact
    np.testing.assert_array_equal(back["tok_emb"]["embedding"], params["tok_emb"]["embedding"])


# --- config.json -------------------------------------------------------------------------------


def test_config_round_trip_and_defaults(tiny_cfg):
    cfg = tiny_cfg.replace(drop_rate=0.1, tie_embeddings=True)
    assert hf_config_to_gpt(gpt_config_to_hf(cfg)) == cfg
    assert hf_config_to_gpt(transformers.GPT2Config().to_dict()) == GPTConfig(
        qkv_bias=True, tie_embeddings=True)
    # Old configs: n_ctx instead of n_positions, no model_type but a GPT-2 architecture.
    old = {"architectures": ["GPT2LMHeadModel"], "n_ctx": 16, "n_embd": 32, "n_head": 4,
           "n_layer": 2, "vocab_size": 100}
    assert hf_config_to_gpt(old).context_length == 16


def test_config_with_differing_dropout_rates_warns(tiny_cfg):
    d = {**gpt_config_to_hf(tiny_cfg), "attn_pdrop": 0.2, "resid_pdrop": 0.1}
    with pytest.warns(UserWarning, match="resid_pdrop"):
        assert hf_config_to_gpt(d).drop_rate == 0.1


@pytest.mark.parametrize(
    "key,value",
    [
        ("model_type", "bert"),
        ("model_type", "gpt_neo"),
        ("layer_norm_epsilon", 1e-6),
        ("activation_function", "relu"),
        ("activation_function", "gelu"),
        ("scale_attn_weights", False),
        ("scale_attn_by_inverse_layer_idx", True),
        ("reorder_and_upcast_attn", True),
        ("add_cross_attention", True),
        ("n_inner", 100),
        ("n_head", 5),
        ("n_layer", 0),
        ("vocab_size", "100"),
        ("tie_word_embeddings", "yes"),
        ("resid_pdrop", 1.5),
    ],
)
def test_unsupported_config_names_file_and_key(tiny_dir, key, value):
    _, path = tiny_dir
    config = json.loads((path / "config.json").read_text())
    config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load_pretrained(path)
    assert str(path / "config.json") in str(err.value)
    assert key in str(err.value)


# --- bad input ---------------------------------------------------------------------------------


def test_missing_directory_config_or_weights(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(tmp_path / "nowhere")
    _, path = tiny_dir
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no weights.*model\.safetensors"):
        load_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_pretrained(path)


def test_config_json_not_json(tiny_dir):
    _, path = tiny_dir
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_pretrained(path)


def test_truncated_safetensors_names_file_and_tensor(tiny_dir):
    _, path = tiny_dir
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert str(file) in msg and "truncated" in msg
    assert "tensor 'transformer." in msg or "tensor 'lm_head" in msg


def test_corrupt_safetensors_header_names_file(tiny_dir):
    _, path = tiny_dir
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header is garbage now
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=str(file).replace(".", r"\.")):
        load_pretrained(path)
    file.write_bytes(b"\x01\x02")  # shorter than the length prefix
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(path)


@pytest.mark.parametrize(
    "key,value,tensor",
    [
        ("n_layer", 3, "transformer.h.2."),  # config wants a layer the file lacks
        ("n_layer", 1, "transformer.h.1."),  # the file has a layer the config lacks
        ("vocab_size", 120, "transformer.wte.weight"),
        ("n_positions", 32, "transformer.wpe.weight"),
        ("n_embd", 48, "transformer."),
    ],
)
def test_tensors_not_matching_config_name_file_and_tensor(tiny_dir, key, value, tensor):
    _, path = tiny_dir
    config = json.loads((path / "config.json").read_text())
    config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert str(path / "model.safetensors") in msg
    assert f"'{tensor}" in msg
    assert f"{key}={value}" in msg


def test_untied_config_without_lm_head_is_an_error(tiny_dir):
    _, path = tiny_dir
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lm_head\.weight.*tie_word_embeddings is false"):
        load_pretrained(path)


def test_sharded_index_problems_name_the_shard(tiny_dir, tmp_path):
    model, _ = tiny_dir
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["transformer.wte.weight"]
    moved = next(k for k, v in index["weight_map"].items() if v != shard)
    index["weight_map"][moved] = shard  # a tensor that is not in that shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{shard}: no tensor '{moved}'"):
        load_pretrained(path)
    (path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        load_pretrained(path)
    index["weight_map"]["transformer.wte.weight"] = "../outside.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"outside\.safetensors"):
        load_pretrained(path)


def test_from_hf_state_dict_refuses_nonzero_qkv_bias_without_qkv_bias(tiny_dir, tiny_cfg):
    model, _ = tiny_dir
    with pytest.raises(ValueError, match=r"c_attn\.bias.*qkv_bias=False"):
        from_hf_state_dict(model.state_dict(), tiny_cfg.replace(qkv_bias=False,
                                                                tie_embeddings=True))


# --- the real GPT-2 sizes ----------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["gpt2-small", "gpt2-medium",
                                    *(pytest.param(p, marks=pytest.mark.slow)
                                      for p in ("gpt2-large", "gpt2-xl"))])
def test_gpt2_sizes_match_transformers_shapes(preset):
    cfg = GPTConfig.from_preset(preset, qkv_bias=True, tie_embeddings=True)
    hf_cfg = transformers.GPT2Config(**{k: v for k, v in gpt_config_to_hf(cfg).items()
                                        if k not in ("architectures", "model_type", "dtype")})
    assert hf_config_to_gpt(hf_cfg.to_dict()) == cfg
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = transformers.GPT2LMHeadModel(hf_cfg)
    hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    shapes = dict(flatten(param_shapes(cfg)))  # jax.eval_shape
    ours = {k: hf_shape(paths, t, shapes) for k, (paths, t) in hf_name_map(cfg).items()}
    assert ours == hf_shapes
    assert count_params(param_shapes(cfg)) == sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def hf_124m(tmp_path_factory):
    model = hf_model(seed=0, vocab_size=50257, n_positions=1024, n_embd=768, n_head=12, n_layer=12)
    path = tmp_path_factory.mktemp("gpt2-124m") / "hf"
    model.save_pretrained(path)
    return model, path, *load_pretrained(path)


@pytest.mark.slow
def test_124m_load_logits_and_round_trip_match_transformers(hf_124m, tmp_path):
    model, _, cfg, params = hf_124m
    assert cfg == GPTConfig(drop_rate=0.0, qkv_bias=True, tie_embeddings=True)
    ids = _ids(50257, (1, 32), seed=4)
    want = hf_logits(model, ids)
    got = jax_logits(params, cfg, ids)
    assert_close(got, want)
    out = save_pretrained(params, cfg, tmp_path / "again")
    again = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    np.testing.assert_array_equal(hf_logits(again, ids), want)  # the same weights, bit for bit


@pytest.mark.slow
def test_124m_greedy_generation_token_identical(hf_124m):
    model, _, cfg, params = hf_124m
    prompt = np.array([[15496, 11, 314, 716]])  # "Hello, I am"
    want, margin = hf_greedy(model, prompt, 8)
    assert margin > 1e-4, "argmax nearly tied: the comparison would be luck; change the seed"
    np.testing.assert_array_equal(np.asarray(generate_text_simple(params, cfg, prompt, 8)), want)
