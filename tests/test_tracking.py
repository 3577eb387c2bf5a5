"""Experiment trackers (`jaxgpt.training.tracking`): what a run logs to TensorBoard and W&B,
read back with their own readers and compared with `metrics.jsonl`, across a resume."""

import json
import os
import signal
import warnings

import numpy as np
import pytest
from conftest import TINY, as_f32, tb_scalars, wandb_runs
from tensorboard.plugins.hparams import plugin_data_pb2

from jaxgpt.config import ConfigError
from jaxgpt.nn.model import count_params, init_params
from jaxgpt.training import tracking
from jaxgpt.training.config import TrainConfig
from jaxgpt.training.loop import TrainingInterrupted, train_loop
from jaxgpt.training.progress import read_metrics
from jaxgpt.training.tracking import Tracker, TrackerWarning, parse_trackers


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], n).astype(np.uint16)


TOKENS = _tokens(8 * 14 + 1 + 200)


def _tc(**changes):
    base = dict(steps=7, batch_size=4, seq_len=8, lr=2e-3, warmup_steps=2, eval_every=3,
                save_every=2, keep=5, sample_tokens=4, sample_prompt="ab")
    return TrainConfig(**{**base, **changes})


def _train(cfg, tc, out, **kw):
    return train_loop(cfg, tc, TOKENS[:113], TOKENS[113:], out, progress=False, **kw)


def test_the_setting_names_trackers_once_in_one_order():
    assert parse_trackers(" WandB,tensorboard ,wandb") == ("tensorboard", "wandb")
    assert parse_trackers("") == parse_trackers(None) == ()
    assert TrainConfig(log="wandb, tensorboard").log == "tensorboard,wandb"
    with pytest.raises(ConfigError, match=r"TrainConfig.log must name trackers from "
                                          r"tensorboard, wandb.*'tensorbord'"):
        TrainConfig(log="tensorbord")
    with pytest.raises(ConfigError, match="TrainConfig.wandb_project"):
        TrainConfig(wandb_project=" ")


def test_a_tracker_not_installed_is_refused_before_anything_is_written(
        tmp_path, tiny_cfg, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r'^logging to wandb needs the wandb '
                                         r'package: pip install "jaxgpt\[wandb\]"$'):
        _train(tiny_cfg, _tc(log="tensorboard,wandb"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_log_directory_that_cannot_be_written_is_refused_before_training(tmp_path, tiny_cfg):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tensorboard").write_text("not a directory")
    with pytest.raises(ValueError, match=r"cannot log to tensorboard: .*tensorboard is a file"):
        _train(tiny_cfg, _tc(log="tensorboard"), out)
    assert sorted(p.name for p in out.iterdir()) == ["tensorboard"]
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(ValueError, match="not writable"):
            _train(tiny_cfg, _tc(log="tensorboard"), ro / "run")


@pytest.mark.slow
def test_tensorboard_holds_the_metrics_of_every_step_once_across_a_killed_run(
        tmp_path, tiny_cfg):
    cfg = tiny_cfg.replace(vocab_size=50257)  # GPT-2's vocabulary: the run draws samples
    out = tmp_path / "run"

    class Kill(Exception):
        pass

    def kill(step, record):
        if step == 5:  # steps 5 is logged, the newest checkpoint is step 4's
            raise Kill

    with pytest.raises(Kill):
        _train(cfg, _tc(log="tensorboard"), out, on_step=kill)
    _, before = tb_scalars(out / "tensorboard")
    assert [s for s, _ in before["loss"]] == [1, 2, 3, 4, 5]
    # Resumed with another learning rate: the steps after the checkpoint change, and only the
    # new values may be left.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = _train(cfg, _tc(log="tensorboard", lr=1e-3), out, resume=True)
    assert [r["step"] for r in records] == [5, 6, 7]
    metrics = read_metrics(out / "metrics.jsonl")
    acc, got = tb_scalars(out / "tensorboard")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "val_loss",
                "val_perplexity"):
        assert got[key] == as_f32(metrics, key), key
    assert [s for s, _ in got["loss"]] == list(range(1, 8))
    assert got["lr"][4][1] != before["lr"][4][1]  # step 5 is the resumed run's
    assert got["parameters"] == [(0, float(np.float32(count_params(init_params(cfg)))))]
    # The evaluation samples as text, at the steps evaluated; the config as hyper-parameters.
    samples = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("sample")}
    assert samples == {r["step"]: r["sample"] for r in metrics if "sample" in r}
    assert sorted(samples) == [3, 6, 7]
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.lr"].number_value == 2e-3  # the run's first settings
    assert hparams["model.emb_dim"].number_value == cfg.emb_dim


@pytest.mark.slow
def test_wandb_offline_run_holds_every_step_once_and_the_config_across_ctrl_c(
        tmp_path, tiny_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg.replace(vocab_size=50257)  # GPT-2's vocabulary: the run draws samples
    out = tmp_path / "run"

    def ctrl_c(step, record):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the loop saves step 4 and stops

    tc = _tc(log="tensorboard,wandb", save_every=3)
    with pytest.raises(TrainingInterrupted):
        _train(cfg, tc, out, on_step=ctrl_c)
    _train(cfg, tc, out, resume=True)
    metrics = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 8))

    runs = wandb_runs(out / "wandb")
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]  # the same W&B run, continued
    saved = json.loads((out / "wandb" / "jaxgpt-run.json").read_text())
    assert saved == {"id": runs[0]["id"], "step": 7}
    rows = [row for run in runs for row in run["history"] if "loss" in row]
    assert [row["_step"] for row in rows] == list(range(1, 8))
    for row, r in zip(rows, metrics, strict=True):
        for key in ("loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s"):
            assert row[key] == r[key], key
        assert row.get("val_loss") == r.get("val_loss")
        assert row.get("sample") == r.get("sample")
    config = runs[0]["config"]
    assert config["train"]["lr"] == tc.lr and config["train"]["log"] == "tensorboard,wandb"
    assert config["model"]["emb_dim"] == cfg.emb_dim
    assert config["parameters"] == count_params(init_params(cfg))
    assert any("sample" in row for row in rows)
    _, got = tb_scalars(out / "tensorboard")
    assert [s for s, _ in got["loss"]] == list(range(1, 8))


@pytest.mark.parametrize("which", ["tensorboard", "wandb"])
def test_a_tracker_that_fails_during_the_run_warns_once_and_training_goes_on(
        tmp_path, tiny_cfg, monkeypatch, which):
    if which == "wandb":
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        target = tracking._WandB
        method = "log"
    else:
        target, method = tracking._TensorBoard, "scalars"
    real = getattr(target, method)
    calls = []

    def failing(self, step, values):
        calls.append(step)
        if step >= 2:
            raise OSError(28, "No space left on device")
        return real(self, step, values)

    monkeypatch.setattr(target, method, failing)
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = _train(tiny_cfg, _tc(log=which, steps=4, sample_tokens=0), out)
    tracker_warnings = [w for w in caught if issubclass(w.category, TrackerWarning)]
    assert len(tracker_warnings) == 1
    assert str(tracker_warnings[0].message) == (
        f"jaxgpt train: logging to {which} failed ([Errno 28] No space left on device); "
        f"training goes on without it (metrics.jsonl has every step)")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "step_00000004").is_dir()
    assert max(calls) == 2  # dropped after its failure


def test_only_process_0_writes(tmp_path, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    tracker = Tracker.open(["tensorboard"], tmp_path, start=0, config={"a": 1}, parameters=3)
    tracker.log(1, {"loss": 1.0})
    tracker.close()
    assert not (tmp_path / "tensorboard").exists()
