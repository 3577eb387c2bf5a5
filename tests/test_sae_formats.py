"""sae-lens's SAE folder both ways (`jaxgpt.sae.formats`), against folders sae-lens 6.54.12
wrote and its outputs on them, and folders jaxgpt wrote with sae-lens's forward of them
(tests/data/saelens/, made by `scripts/saelens_fixtures.py`)."""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, reference

from jaxgpt.sae import formats
from jaxgpt.sae import model as M
from jaxgpt.sae.formats import load_sae, read_cfg, save_sae

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "saelens"
sys.path.insert(0, str(ROOT / "scripts"))  # as `python scripts/NAME.py` has it

import saelens_fixtures  # noqa: E402

CASES = list(saelens_fixtures.CASES)
FOLDERS = [(case, kind) for case in CASES for kind in ("train", "inference")]
EPS = float(np.finfo(np.float32).eps)


def tol(want) -> float:
    """fp32 parity bound: sums of at most 32 products (d_sae) added in different orders by
    torch and XLA: 32 roundings of the largest magnitude (at least 1)."""
    return 32 * EPS * max(1.0, float(np.abs(np.asarray(want)).max()))


def expected(path: Path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def tensors(folder: Path) -> dict:
    return reference("safetensors.numpy").load_file(folder / formats.WEIGHTS_FILENAME)


# --- reading what sae-lens wrote -----------------------------------------------------------

@pytest.mark.parametrize("case,kind", FOLDERS)
def test_saelens_folder_loads_to_the_same_outputs(case, kind):
    """Each folder computes what sae-lens computes with it as `SAE.load_from_disk` loads it
    (`TrainingSAE.load_from_disk` for a batchtopk training save)."""
    e = expected(DATA / case / "expected.npz")
    sae = load_sae(DATA / case / kind)
    x = jnp.asarray(e["x"])
    assert_close(M.encode(sae, x), e[f"{kind}_encode"], tol(e[f"{kind}_encode"]),
                 f"{case}/{kind} encode")
    assert_close(M.forward(sae, x), e[f"{kind}_forward"], tol(e[f"{kind}_forward"]),
                 f"{case}/{kind} forward")
    acts = M.encode(sae, x)
    assert_close(M.decode(sae, acts, x), e[f"{kind}_forward"], tol(e[f"{kind}_forward"]),
                 f"{case}/{kind} decode")
    # sae-lens's hook_sae_acts_pre: before topk's rescaling by the decoder norms
    pre = M.process_sae_in(sae, x) @ sae.params["W_enc"] + sae.params["b_enc"]
    assert_close(pre, e[f"{kind}_hidden_pre"], tol(e[f"{kind}_hidden_pre"]),
                 f"{case}/{kind} hidden_pre")


@pytest.mark.parametrize("case,kind", FOLDERS)
def test_saelens_folder_config(case, kind):
    arch, fields = saelens_fixtures.CASES[case]
    cfg = load_sae(DATA / case / kind).cfg
    assert cfg.hook_name == saelens_fixtures.METADATA["hook_name"]
    assert cfg.architecture == ("jumprelu" if (arch, kind) == ("batchtopk", "inference")
                                else arch)
    assert (cfg.d_in, cfg.d_sae) == (saelens_fixtures.D_IN, saelens_fixtures.D_SAE)
    if cfg.architecture == arch:  # the training fields, from metadata in an inference save
        for name, value in fields.items():
            assert getattr(cfg, name) == value, name
    assert read_cfg(DATA / case / kind)["metadata"]["context_size"] == 16


def test_batchtopk_becomes_the_jumprelu_saelens_saves_for_inference():
    for case in ("batchtopk", "batchtopk_no_rescale"):
        trained = load_sae(DATA / case / "train")
        converted = M.to_inference(trained)
        saved = load_sae(DATA / case / "inference")
        fields = ("architecture", "d_in", "d_sae", "apply_b_dec_to_input", "hook_name",
                  "rescale_acts_by_decoder_norm")
        assert [getattr(converted.cfg, f) for f in fields] == [getattr(saved.cfg, f)
                                                                for f in fields]
        np.testing.assert_array_equal(converted.params["threshold"],
                                      np.full(32, trained.state["topk_threshold"]))
        for name, want in saved.params.items():
            assert_close(converted.params[name], want, tol(want), f"{case} {name}")


# --- writing what sae-lens writes ----------------------------------------------------------

@pytest.mark.parametrize("case,kind", FOLDERS)
def test_save_writes_the_folder_saelens_writes(case, kind, tmp_path):
    """A saved SAE, loaded and saved again the same way (training or inference), gives
    sae-lens's cfg.json (as JSON) and its tensors: names, dtypes, values."""
    src = DATA / case / "train"
    sae = load_sae(src)
    out = save_sae(sae, tmp_path / kind, inference=kind == "inference",
                   metadata=read_cfg(src)["metadata"])
    assert out == (tmp_path / kind).absolute()
    assert read_cfg(out) == read_cfg(DATA / case / kind)
    got, want = tensors(out), tensors(DATA / case / kind)
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {
        k: (v.dtype, v.shape) for k, v in want.items()}
    for name in want:
        # topk_threshold: float64 in sae-lens, held in float32 by jaxgpt
        assert_close(got[name], want[name], tol(want[name]) if name != "topk_threshold" else
                     EPS * abs(float(want[name])), f"{case}/{kind} {name}")


@pytest.mark.parametrize("case,kind", FOLDERS)
def test_saved_training_details_are_saelens(case, kind):
    """Without metadata given, the version and training architecture jaxgpt writes are
    sae-lens's: its fields' tables agree with sae-lens's configs."""
    cfg = load_sae(DATA / case / "train").cfg
    got = formats.sae_cfg_dict(cfg, inference=kind == "inference")
    want = read_cfg(DATA / case / kind)
    meta_got, meta_want = got.pop("metadata"), want.pop("metadata")
    assert got == want
    for name in ("sae_lens_version", "training_architecture", "training_architecture_details",
                 "hook_name"):
        assert meta_got[name] == meta_want[name], name


def test_topk_k_is_written_as_an_int_and_batchtopk_k_as_a_float():
    topk = formats.sae_cfg_dict(M.SAEConfig("topk", 4, 8, k=3.0), inference=False)
    batch = formats.sae_cfg_dict(M.SAEConfig("batchtopk", 4, 8, k=3), inference=False)
    assert type(topk["k"]) is int and type(batch["k"]) is float


# --- what jaxgpt writes, as sae-lens reads it ----------------------------------------------

@pytest.fixture(scope="module")
def jaxgpt_folders(tmp_path_factory):
    return saelens_fixtures.write_jaxgpt_folders(tmp_path_factory.mktemp("from_jaxgpt"))


def test_jaxgpt_writes_the_committed_folders(jaxgpt_folders):
    """What jaxgpt writes now is what sae-lens was given (so its recorded forward still
    speaks for it): cfg.json byte for byte, the tensors value for value."""
    assert [p.name for p in jaxgpt_folders] == list(saelens_fixtures.JAXGPT_FOLDERS)
    for folder in jaxgpt_folders:
        committed = DATA / "from_jaxgpt" / folder.name
        assert (folder / "cfg.json").read_bytes() == (committed / "cfg.json").read_bytes()
        got, want = tensors(folder), tensors(committed)
        assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
        for name in want:
            # the folds compute decoder norms: a few roundings of values near 1
            assert_close(got[name], want[name], 4 * EPS * max(1, np.abs(want[name]).max()),
                         f"{folder.name} {name}")


def test_saelens_loads_jaxgpt_folders_to_the_same_forward(jaxgpt_folders):
    e = expected(DATA / "from_jaxgpt" / "expected.npz")
    x = jnp.asarray(e["x"])
    np.testing.assert_array_equal(e["x"], saelens_fixtures.jaxgpt_folder_input())
    classes = {}
    for folder in jaxgpt_folders:
        sae = load_sae(folder)
        assert_close(M.forward(sae, x), e[f"{folder.name}/forward"], 1e-6,
                     f"{folder.name} forward")
        assert_close(M.encode(sae, x), e[f"{folder.name}/encode"], tol(e[f"{folder.name}/encode"]),
                     f"{folder.name} encode")
        classes[folder.name] = str(e[f"{folder.name}/class"])
    assert classes["batchtopk_inference"] == "JumpReLUSAE"
    assert classes["batchtopk_train"] == "BatchTopKTrainingSAE"
    assert classes["topk_rescale_inference"] == "TopKSAE"


def test_save_load_round_trip_keeps_everything(tmp_path):
    cfg = M.SAEConfig("jumprelu", 4, 8, dtype="bfloat16", jumprelu_bandwidth=0.2,
                      pre_act_loss_coefficient=1e-3, l0_warm_up_steps=5, hook_name="hook_embed")
    sae = M.init_sae(cfg, 1)
    for inference in (True, False):
        back = load_sae(save_sae(sae, tmp_path / str(inference), inference=inference))
        assert back.cfg == cfg
        for name, value in sae.params.items():
            assert back.params[name].dtype == value.dtype
            if name == "threshold":  # float32, cast to the SAE's dtype on load as sae-lens does
                value = value.astype(jnp.bfloat16).astype(jnp.float32)
            np.testing.assert_array_equal(back.params[name], value)


# --- writing safely ------------------------------------------------------------------------

def test_save_refuses_an_existing_folder_unless_told(tmp_path):
    sae = M.init_sae(M.SAEConfig("standard", 4, 8), 0)
    save_sae(sae, tmp_path / "sae")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_sae(sae, tmp_path / "sae")
    other = M.init_sae(M.SAEConfig("topk", 4, 8, k=2), 0)
    (tmp_path / "sae" / "sparsity.safetensors").write_bytes(b"")  # sae-lens's checkpoints add it
    save_sae(other, tmp_path / "sae", overwrite=True)
    assert load_sae(tmp_path / "sae").cfg.architecture == "topk"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_sae(sae, tmp_path / "mine", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "sae"]


def test_an_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.numpy

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_sae(M.init_sae(M.SAEConfig("standard", 4, 8), 0), tmp_path / "sae")
    assert list(tmp_path.iterdir()) == []


def test_a_save_removes_the_temporary_a_killed_save_left(tmp_path):
    import subprocess

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    stale = tmp_path / f".sae.tmp-{dead}-0123abcd"
    stale.mkdir()
    (stale / "cfg.json").write_text("{}")
    foreign = tmp_path / f".sae.tmp-{dead}-4567abcd"  # a name that fits, content that does not
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    save_sae(M.init_sae(M.SAEConfig("standard", 4, 8), 0), tmp_path / "sae")
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name, "sae"]


def test_save_refuses_metadata_naming_another_hook(tmp_path):
    sae = M.init_sae(M.SAEConfig("standard", 4, 8, hook_name="blocks.0.hook_resid_pre"), 0)
    with pytest.raises(ValueError, match="hook_name"):
        save_sae(sae, tmp_path / "sae", metadata={"hook_name": "blocks.1.hook_resid_pre"})
    assert not (tmp_path / "sae").exists()


# --- refusing what is not an SAE jaxgpt reads ----------------------------------------------

def _edit_cfg(**changes):
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg.update(changes)
        (folder / "cfg.json").write_text(json.dumps(cfg))
    return edit


def _edit_tensors(drop=(), add=None):
    def edit(folder: Path) -> None:
        st = reference("safetensors.numpy")
        t = {k: v for k, v in st.load_file(folder / "sae_weights.safetensors").items()
             if k not in drop}
        st.save_file({**t, **(add or {})}, folder / "sae_weights.safetensors")
    return edit


BAD = {
    "no folder": (lambda f: f.rmdir(), "does not exist"),
    "a file": (lambda f: (f.rmdir(), f.write_text("x")), "is not a directory"),
    "empty": (lambda f: None, "is not an sae-lens SAE folder"),
    "a model directory": (lambda f: (f / "config.json").write_text("{}"), "model directory"),
}
BAD_SAE = {
    "no weights": (lambda f: (f / "sae_weights.safetensors").unlink(),
                   "sae_weights.safetensors is missing"),
    "no cfg": (lambda f: (f / "cfg.json").unlink(), "cfg.json is missing"),
    "bad json": (lambda f: (f / "cfg.json").write_text("{"), "not readable JSON"),
    "a list": (lambda f: (f / "cfg.json").write_text("[]"), "holds a list"),
    "gated": (_edit_cfg(architecture="gated"), "architecture 'gated' is not one jaxgpt reads"),
    "reshape": (_edit_cfg(reshape_activations="hook_q"), "reshape_activations='hook_q'"),
    "whitening": (_edit_cfg(normalize_activations="covariance_whitening"),
                  "normalize_activations"),
    "no d_sae": (lambda f: _edit_cfg()(f) or (f / "cfg.json").write_text(json.dumps(
        {k: v for k, v in json.loads((f / "cfg.json").read_text()).items() if k != "d_sae"})),
        "cfg.json has no d_sae"),
    "d_sae": (_edit_cfg(d_sae=16), "W_enc has shape (8, 32), but d_in=8, d_sae=16"),
    "dtype": (_edit_cfg(dtype="int8"), "dtype 'int8'"),
    "no threshold": (_edit_tensors(drop=("threshold",)), "threshold missing"),
    "extra": (_edit_tensors(add={"W_skip": np.zeros((8, 8), np.float32)}),
              "W_skip unexpected"),
    "truncated": (lambda f: (f / "sae_weights.safetensors").write_bytes(
        (f / "sae_weights.safetensors").read_bytes()[:100]), "not a readable safetensors"),
}


@pytest.mark.parametrize("name", list(BAD) + list(BAD_SAE))
def test_a_bad_folder_is_refused_in_one_line_naming_it(name, tmp_path):
    folder = tmp_path / "sae"
    if name in BAD:
        folder.mkdir()
        make, message = BAD[name]
    else:
        save_sae(load_sae(DATA / "jumprelu" / "inference"), folder,
                 metadata=read_cfg(DATA / "jumprelu" / "inference")["metadata"])
        make, message = BAD_SAE[name]
    make(folder)
    with pytest.raises(ValueError) as err:
        load_sae(folder)
    text = str(err.value)
    assert message in text and str(folder) in text and "\n" not in text, text


def test_a_pre_6_config_is_read_as_saelens_reads_it():
    cfg = formats.config_from_dict({"d_in": 8, "d_sae": 16, "hook_point": "blocks.0.hook_mlp_out",
                                    "activation_fn": "topk", "activation_fn_kwargs": {"k": 4},
                                    "normalize_activations": False})
    assert (cfg.architecture, cfg.k, cfg.hook_name) == ("topk", 4, "blocks.0.hook_mlp_out")
    assert cfg.normalize_activations == "none" and cfg.apply_b_dec_to_input


def test_a_hook_z_folder_keeps_its_reshape_both_ways(tmp_path):
    """sae-lens marks SAEs on attention heads' hook_z `reshape_activations: hook_z`: read, and
    written back as it was."""
    src = tmp_path / "src"
    save_sae(load_sae(DATA / "jumprelu" / "inference"), src)
    _edit_cfg(reshape_activations="hook_z")(src)
    sae = load_sae(src)
    assert sae.cfg.reshape_activations == "hook_z"
    save_sae(sae, tmp_path / "out")
    assert read_cfg(tmp_path / "out")["reshape_activations"] == "hook_z"
