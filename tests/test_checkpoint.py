"""Orbax checkpoints: bit-identical round trip, config kept, atomic save, clear errors."""

import json
import os
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxgpt.io import checkpoint, files, formats
from jaxgpt.nn import param_shapes


def random_params(cfg, seed=0):
    """Random params without a jit compile (every leaf distinct, non-zero)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jax.numpy.asarray(rng.standard_normal(s.shape), dtype=s.dtype), param_shapes(cfg)
    )


def assert_bit_identical(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("tie", [False, True])
def test_save_restore_is_bit_identical_and_keeps_config(tmp_path, tiny_cfg, tie):
    cfg = tiny_cfg.replace(tie_embeddings=tie, drop_rate=0.25)
    params = random_params(cfg)
    out = checkpoint.save(tmp_path / "ckpt", params, cfg, metadata={"step": 12})
    assert out == (tmp_path / "ckpt").absolute()
    assert formats.is_checkpoint(out)
    assert checkpoint.load_config(out) == cfg
    assert checkpoint.load_metadata(out)["step"] == 12
    cfg2, params2 = checkpoint.restore(out)
    assert cfg2 == cfg
    assert_bit_identical(params2, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(params2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left


def test_extra_state_round_trip(tmp_path, tiny_cfg):
    params = random_params(tiny_cfg)
    extra = {"step": np.int32(7), "mu": random_params(tiny_cfg, seed=1)}
    checkpoint.save(tmp_path / "ckpt", params, tiny_cfg, extra=extra)
    back = checkpoint.restore_extra(tmp_path / "ckpt", extra)
    assert int(back["step"]) == 7
    assert_bit_identical(back["mu"], extra["mu"])
    checkpoint.save(tmp_path / "bare", params, tiny_cfg)
    with pytest.raises(ValueError, match="without extra state"):
        checkpoint.restore_extra(tmp_path / "bare", extra)


def test_save_refuses_an_existing_path_unless_overwrite(tmp_path, tiny_cfg):
    checkpoint.save(tmp_path / "ckpt", random_params(tiny_cfg), tiny_cfg)
    with pytest.raises(FileExistsError, match="ckpt"):
        checkpoint.save(tmp_path / "ckpt", random_params(tiny_cfg), tiny_cfg)
    params = random_params(tiny_cfg, seed=3)
    checkpoint.save(tmp_path / "ckpt", params, tiny_cfg, overwrite=True)
    assert_bit_identical(checkpoint.restore(tmp_path / "ckpt")[1], params)
    (tmp_path / "empty").mkdir()
    checkpoint.save(tmp_path / "empty", params, tiny_cfg, overwrite=True)
    assert formats.is_checkpoint(tmp_path / "empty")


def _hf_like(path, *extra):
    path.mkdir()
    for name in ("config.json", "model.safetensors", *extra):
        (path / name).write_text("x")
    return path


@pytest.mark.parametrize(
    "make, held",
    [
        (lambda d: (d.mkdir(), (d / "notes.txt").write_text("mine")), "notes.txt"),
        (lambda d: _hf_like(d, "tokenizer.json"), "tokenizer.json"),
        (lambda d: (_hf_like(d), (d / "data").mkdir()), "data/"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "no checkpoint marker"),
    ],
)
def test_overwrite_replaces_only_checkpoint_directories(tmp_path, tiny_cfg, make, held):
    dst = tmp_path / "dst"
    make(dst)
    before = sorted(p.name for p in dst.iterdir())
    with pytest.raises(FileExistsError, match=f"not a jaxgpt or Hugging Face checkpoint.*{held}"):
        checkpoint.save(dst, random_params(tiny_cfg), tiny_cfg, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == before  # nothing touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no temporary left


def test_overwrite_replaces_a_hugging_face_directory_but_not_a_link(tmp_path, tiny_cfg):
    hf = _hf_like(tmp_path / "hf", "generation_config.json", "model-00001-of-00002.safetensors")
    files.check_replaceable(hf)
    checkpoint.save(hf, random_params(tiny_cfg), tiny_cfg, overwrite=True)
    assert formats.is_checkpoint(hf) and not (hf / "model.safetensors").exists()
    (tmp_path / "link").symlink_to(hf)
    with pytest.raises(FileExistsError, match="symbolic link"):
        checkpoint.save(tmp_path / "link", random_params(tiny_cfg), tiny_cfg, overwrite=True)
    assert formats.is_checkpoint(hf)


def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_a_save_removes_the_temporaries_of_killed_saves_and_nothing_else(tmp_path, tiny_cfg):
    dead = _dead_pid()
    stale = tmp_path / f".ckpt.tmp-{dead}-0123abcd"  # a save killed while orbax wrote params
    (stale / "params").mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    # killed before orbax renamed its own temporary (a multi-process save waits longer there)
    in_orbax = tmp_path / f".ckpt.tmp-{dead}-4567abcd"
    (in_orbax / "params.orbax-checkpoint-tmp").mkdir(parents=True)
    legacy = tmp_path / ".ckpt.tmp-89abcdef"  # the name before the PID was part of it
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    live = tmp_path / f".ckpt.tmp-{os.getpid()}-0123abcd"  # a save in progress
    live.mkdir()
    foreign = tmp_path / f".ckpt.tmp-{dead}-fedcba98"  # a name that fits, content that does not
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    other = tmp_path / f".other.tmp-{dead}-0123abcd"  # another checkpoint's: left to its save
    other.mkdir()
    checkpoint.save(tmp_path / "ckpt", random_params(tiny_cfg), tiny_cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt", live.name, foreign.name, other.name]
    )


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_have_the_modes_of_plain_files(tmp_path, tiny_cfg, umask):
    from jaxgpt.io.hf import save_pretrained

    old = os.umask(umask)
    try:
        save_pretrained(random_params(tiny_cfg), tiny_cfg, tmp_path / "hf")
        checkpoint.save(tmp_path / "ckpt", random_params(tiny_cfg), tiny_cfg)
    finally:
        os.umask(old)
    for path in [*(tmp_path / "hf").rglob("*"), *(tmp_path / "ckpt").rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_interrupted_save_leaves_no_half_written_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    import orbax.checkpoint as ocp

    old = random_params(tiny_cfg, seed=0)
    checkpoint.save(tmp_path / "ckpt", old, tiny_cfg)
    real_save = ocp.StandardCheckpointer.save

    def crash_after_writing(self, *args, **kwargs):
        real_save(self, *args, **kwargs)  # the params are (being) written ...
        raise KeyboardInterrupt  # ... and then the process is stopped

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash_after_writing)
    new = random_params(tiny_cfg, seed=1)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "fresh", new, tiny_cfg)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "ckpt", new, tiny_cfg, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()
    assert_bit_identical(checkpoint.restore(tmp_path / "ckpt")[1], old)


def test_a_directory_without_the_marker_is_not_a_checkpoint(tmp_path, tiny_cfg):
    checkpoint.save(tmp_path / "ckpt", random_params(tiny_cfg), tiny_cfg)
    (tmp_path / "ckpt" / "jaxgpt.json").unlink()  # as if the save died before the last write
    assert not formats.is_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="not a jaxgpt checkpoint"):
        checkpoint.restore(tmp_path / "ckpt")


def test_restore_errors_name_the_path(tmp_path, tiny_cfg):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.restore(tmp_path / "nowhere")
    path = tmp_path / "ckpt"
    checkpoint.save(path, random_params(tiny_cfg), tiny_cfg)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(ValueError, match=r"params.*do not fit .*config\.json"):
        checkpoint.restore(path)
    (path / "config.json").write_text(json.dumps({**config, "n_embd": 3}))
    with pytest.raises(ValueError, match=r"config\.json: not a valid jaxgpt config.*n_embd"):
        checkpoint.restore(path)
    (path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config\.json: not a valid jaxgpt config"):
        checkpoint.load_config(path)


def test_a_directory_without_params_is_not_a_checkpoint(tmp_path, tiny_cfg):
    path = checkpoint.save(tmp_path / "ckpt", random_params(tiny_cfg), tiny_cfg)
    assert formats.is_checkpoint(path)
    import shutil

    shutil.rmtree(path / "params")  # the marker alone (as a racing writer could leave it)
    assert not formats.is_checkpoint(path)
    with pytest.raises(ValueError, match="not a jaxgpt checkpoint"):
        checkpoint.restore(path)
