"""`jaxgpt generate --checkpoint DIR` (both formats, detected) and `jaxgpt convert`."""

import json

import jax
import numpy as np
import pytest
from conftest import reference

from jaxgpt.cli import main
from jaxgpt.io import checkpoint, formats
from jaxgpt.io.hf import load_pretrained
from jaxgpt.tokenizer import get_tokenizer

torch = reference("torch")
transformers = reference("transformers")

PROMPT = "Hello, I am"
NEW = 6


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small random GPT-2 with the real vocabulary (the CLI tokenizes with GPT-2's BPE)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_head=4,
                                     n_layer=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and LayerNorms random too, so that a mis-mapping shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
    path = tmp_path_factory.mktemp("cli") / "hf"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def expected_text(hf_dir):
    """transformers' greedy continuation of PROMPT, decoded."""
    model, _ = hf_dir
    tok = get_tokenizer()
    ids = torch.tensor([tok.encode(PROMPT)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + NEW
    return tok.decode(out[0].tolist())


def run(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_generate_from_a_hugging_face_directory(hf_dir, expected_text, capsys):
    _, path = hf_dir
    rc, out, err = run(capsys, "generate", "--checkpoint", str(path), "--prompt", PROMPT,
                       "--max-new-tokens", str(NEW))
    assert rc == 0
    assert out.strip() == expected_text
    assert f"Hugging Face GPT-2 directory {path}" in err
    assert "RANDOM" not in err


def test_generate_from_an_orbax_checkpoint(hf_dir, expected_text, capsys, tmp_path):
    _, path = hf_dir
    cfg, params = load_pretrained(path)
    checkpoint.save(tmp_path / "ckpt", params, cfg)
    rc, out, err = run(capsys, "generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt",
                       PROMPT, "--max-new-tokens", str(NEW))
    assert rc == 0
    assert out.strip() == expected_text
    assert f"jaxgpt orbax checkpoint {tmp_path / 'ckpt'}" in err


def test_convert_both_ways_keeps_every_weight(hf_dir, capsys, tmp_path):
    model, path = hf_dir
    cfg, params = load_pretrained(path)
    rc, out, _ = run(capsys, "convert", str(path), str(tmp_path / "ckpt"))  # default: to orbax
    assert rc == 0 and out.strip() == str((tmp_path / "ckpt").absolute())
    assert formats.is_checkpoint(tmp_path / "ckpt")
    cfg2, params2 = checkpoint.restore(tmp_path / "ckpt")
    assert cfg2 == cfg
    assert jax.tree_util.tree_structure(params2) == jax.tree_util.tree_structure(params)
    leaves, leaves2 = jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)
    for a, b in zip(leaves, leaves2, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    rc, _, _ = run(capsys, "convert", str(tmp_path / "ckpt"), str(tmp_path / "hf2"))  # to hf
    assert rc == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf2").eval()
    ids = torch.tensor(np.random.default_rng(0).integers(0, 50257, (2, 32)))
    with torch.no_grad():
        np.testing.assert_array_equal(back(ids).logits.numpy(), model(ids).logits.numpy())

    rc, _, _ = run(capsys, "convert", str(tmp_path / "hf2"), str(tmp_path / "hf3"), "--to", "hf")
    assert rc == 0 and load_pretrained(tmp_path / "hf3")[0] == cfg


def test_convert_refuses_an_existing_destination(hf_dir, capsys, tmp_path):
    _, path = hf_dir
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["convert", str(path), str(tmp_path / "taken")])
    assert list((tmp_path / "taken").iterdir()) == []
    assert main(["convert", str(path), str(tmp_path / "taken"), "--overwrite"]) == 0
    assert formats.is_checkpoint(tmp_path / "taken")


def test_checkpoint_errors_are_clear(hf_dir, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint directory at .*nowhere"):
        main(["generate", "--checkpoint", str(tmp_path / "nowhere")])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(SystemExit, match="neither a jaxgpt orbax checkpoint .* nor a Hugging Face"):
        main(["convert", str(tmp_path / "junk"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    _, path = hf_dir
    bad = tmp_path / "bad-hf"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(SystemExit, match=r"cannot load .*config\.json: model_type='llama'"):
        main(["generate", "--checkpoint", str(bad)])


def test_convert_never_deletes_the_source_or_other_files(hf_dir, tmp_path):
    _, path = hf_dir
    parent = tmp_path / "parent"
    src = parent / "src"
    parent.mkdir()
    assert main(["convert", str(path), str(src), "--to", "hf"]) == 0
    (parent / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(parent) for p in parent.rglob("*"))
    with pytest.raises(SystemExit, match="DST .*parent contains SRC"):
        main(["convert", str(src), str(parent), "--overwrite"])
    with pytest.raises(SystemExit, match="DST .*inside SRC"):
        main(["convert", str(src), str(src / "sub"), "--overwrite"])
    with pytest.raises(SystemExit, match="SRC and DST are the same"):
        main(["convert", str(src), str(src), "--overwrite"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--overwrite refused: .*other is not a jaxgpt or "
                                         "Hugging Face checkpoint directory .*notes.txt"):
        main(["convert", str(src), str(other), "--overwrite"])
    assert (other / "notes.txt").read_text() == "mine"
    assert sorted(p.relative_to(parent) for p in parent.rglob("*")) == before
    assert load_pretrained(src)[0] == load_pretrained(path)[0]
    # A checkpoint directory jaxgpt wrote is replaced.
    assert main(["convert", str(src), str(tmp_path / "ckpt")]) == 0
    assert main(["convert", str(path), str(tmp_path / "ckpt"), "--overwrite"]) == 0
