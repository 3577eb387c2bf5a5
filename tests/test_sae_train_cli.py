"""`jaxgpt sae train`: one-line refusals before anything loads, and a run's outputs."""

import json

import pytest

from jaxgpt.cli import main
from jaxgpt.io import checkpoint
from jaxgpt.sae.formats import load_sae

HOOK = "blocks.6.hook_resid_pre"


def _refusal(capsys, *argv):
    """The one line `jaxgpt sae train` exits with (on the 124M preset: its config alone is
    read, never weights, before a refusal)."""
    with pytest.raises(SystemExit) as e:
        main(["sae", "train", "--preset", "gpt2-small", *argv])
    message = str(e.value.code) if e.value.code not in (None, 2) else capsys.readouterr().err
    return message.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, said", [
    (["--hook", "blocks.6.hook_resid_pr"], "--hook 'blocks.6.hook_resid_pr' is not a hook point "
     "of this model (12 layers); the closest is 'blocks.6.hook_resid_pre'"),
    (["--hook", "blocks.6.attn.hook_pattern"], "not one vector per token"),
    (["--hook", HOOK, "--d-in", "512"], f"--d-in 512 does not match --hook {HOOK}, whose "
     f"activations have 768 features per token"),
    (["--hook", HOOK, "--d-sae", "16", "--k", "32"], "--k must be in (0, --d-sae 16], got 32"),
    (["--hook", HOOK, "--architecture", "gated"], "argument --architecture: invalid choice: "
     "'gated'"),
    (["--hook", HOOK, "--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--hook", HOOK, "--training-tokens", "100"], "--training-tokens must be at least one "
     "batch (--train-batch-size-tokens = 4096), got 100"),
    (["--hook", HOOK, "--lr-scheduler-name", "linear"], "invalid choice: 'linear'"),
])
def test_bad_input_is_refused_in_one_line(capsys, tmp_path, argv, said):
    assert said in _refusal(capsys, *argv, "--out", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_output_directory_that_cannot_hold_a_run_is_refused(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert "notes.txt" in _refusal(capsys, "--hook", HOOK, "--out", str(tmp_path))
    assert "holds no complete checkpoint" in _refusal(capsys, "--hook", HOOK, "--out",
                                                      str(tmp_path / "new"), "--resume")


@pytest.mark.slow
def test_a_run_trains_an_sae_per_hook_and_width(tiny, tiny_files, tmp_path, capsys):
    cfg, params = tiny
    model = checkpoint.save(tmp_path / "model", params, cfg)
    _, tokens = tiny_files
    out = tmp_path / "run"
    argv = ["sae", "train", "--checkpoint", str(model), "--token-file", str(tokens),
            "--hook", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_z", "--d-sae", "48", "64",
            "--k", "4", "--training-tokens", "640", "--train-batch-size-tokens", "64",
            "--context-size", "16", "--n-batches-in-buffer", "4", "--log-every", "5",
            "--out", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = ["blocks.1.hook_resid_pre.topk.48", "blocks.1.hook_resid_pre.topk.64",
             "blocks.0.attn.hook_z.topk.48", "blocks.0.attn.hook_z.topk.64"]
    assert [line.split(":")[0] for line in lines] == names
    assert all("L0 4.0, explained variance" in line for line in lines)
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5] * 4 + [10] * 4
    for name in names:
        sae = load_sae(out / "saes" / name)
        assert (sae.cfg.architecture, sae.cfg.k) == ("topk", 4)
        assert sae.cfg.d_sae == int(name.rsplit(".", 1)[1])
    # A finished run extends with --resume and more tokens, and refuses to start over.
    assert main([*argv, "--training-tokens", "960", "--resume"]) == 0
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 15
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        main(argv)
