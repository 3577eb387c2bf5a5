"""`jaxgpt train`: flags, outputs (metrics.jsonl, loss.png, checkpoints, samples), resume."""

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, default_sigint

from jaxgpt.cli import main
from jaxgpt.training.run_dir import RUN_LOCK


def _train(tmp_path, cfg, tokens, *extra):
    return main(
        [
            "train",
            "--config",
            str(cfg),
            "--token-file",
            str(tokens),
            "--seq-len",
            "8",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "run"),
            *extra,
        ]
    )


def test_train_writes_metrics_plot_and_rotating_checkpoints(tmp_path, tiny_files, capsys):
    cfg, tokens = tiny_files
    assert (
        _train(
            tmp_path,
            cfg,
            tokens,
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--save-every",
            "2",
            "--keep",
            "2",
        )
        == 0
    )
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens_seen"] for r in lines] == [32 * s for s in range(1, 7)]
    assert all(np.isfinite(r["loss"]) for r in lines)
    assert [r["step"] for r in lines if "val_loss" in r] == [3, 6]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib: a dependency
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000004",
        "step_00000006",
    ]
    out, err = capsys.readouterr()
    assert "step 6: loss" in out and "val loss" in out
    assert "tok/s" in err and "step 3: train loss" in err
    assert re.search(r"step 1/6 loss [\d.]+ compiling elapsed \d+:\d\d\n", err), err
    assert re.search(r"step 6/6 loss [\d.]+ [\d,]+ tok/s elapsed \d+:\d\d ETA 0:00\n", err), err
    # Running again into the same directory needs --resume; the library's errors about the
    # settings are said of the flags.
    with pytest.raises(SystemExit, match="^jaxgpt train: .* already holds checkpoints .*; pass "
                                         "--resume or choose another output directory$"):
        _train(tmp_path, cfg, tokens, "--steps", "6")
    with pytest.raises(SystemExit, match="^jaxgpt train: --seed must stay 123 to resume "
                                         ".*step_00000006: .*, got 5$"):
        _train(tmp_path, cfg, tokens, "--steps", "8", "--seed", "5", "--resume")
    with pytest.raises(SystemExit, match="^jaxgpt train: --steps must be more than 6 to extend "
                                         "the run: .*step_00000006 is at step 6, got 6$"):
        _train(tmp_path, cfg, tokens, "--steps", "6", "--resume")


def test_train_resume_continues_an_interrupted_run_exactly(tmp_path, tiny_files, monkeypatch):
    cfg, tokens = tiny_files
    flags = ("--steps", "4", "--save-every", "2", "--eval-every", "4")
    assert _train(tmp_path / "a", cfg, tokens, *flags) == 0

    import jaxgpt.training.loop as train_mod

    real = train_mod.train_loop

    def interrupted(*args, **kwargs):  # a run killed after step 3 (checkpoint at 2)
        def stop(step, record):
            if step == 3:
                raise KeyboardInterrupt

        return real(*args, on_step=stop, **kwargs)

    monkeypatch.setattr(train_mod, "train_loop", interrupted)
    assert _train(tmp_path / "b", cfg, tokens, *flags) == 130
    monkeypatch.setattr(train_mod, "train_loop", real)
    assert _train(tmp_path / "b", cfg, tokens, *flags, "--resume") == 0
    read = [
        [json.loads(x) for x in (tmp_path / d / "run" / "metrics.jsonl").read_text().splitlines()]
        for d in ("a", "b")
    ]
    assert [r["loss"] for r in read[0]] == [r["loss"] for r in read[1]]
    assert read[0][-1]["val_loss"] == read[1][-1]["val_loss"]


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_files, capsys
):
    cfg, tokens = tiny_files
    code = _train(
        tmp_path,
        cfg,
        tokens,
        "--steps",
        "5",
        "--save-every",
        "1",
        "--lr",
        "1e30",
        "--min-lr",
        "1e30",
        "--grad-clip",
        "0",
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite values at step 2" in err and "step_00000001" in err
    assert err.rstrip().endswith(". Try a lower --lr or --grad-clip, then --resume")
    assert err.count("non-finite") == 1
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000001"]


@pytest.mark.slow
def test_without_a_text_file_it_trains_on_the_demo_corpus_and_prints_samples(tmp_path, capsys):
    cfg = tmp_path / "gpt2vocab.json"  # a GPT-2 vocabulary, so samples decode to text
    cfg.write_text(json.dumps(dict(TINY, vocab_size=50257, emb_dim=16, n_heads=2)))
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--steps",
                "2",
                "--eval-every",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "8",
                "--sample-tokens",
                "3",
                "--prompt",
                "def",
                "--out",
                str(tmp_path / "demo"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "pydoc_data.topics" in err
    assert "sample: def" in err
    last = json.loads((tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["sample"].startswith("def") and len(last["sample"]) > 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
        (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
        (["--stride", "0"], "--stride must be >= 1, got 0"),
        (["--seq-len", "32"], "--seq-len must be at most the model's context_length 16, got 32"),
        (["--grad-accum", "3"], r"--batch-size must be divisible by --grad-accum \(3\), got 4"),
        (["--lr", "0"], "--lr must be a positive number, got 0.0"),
        (["--min-lr", "1", "--lr", "0.5"], r"--min-lr must be in \[0, --lr = 0.5\], got 1.0"),
        (["--val-ratio", "1"], "--val-ratio must be in \\(0, 1\\), got 1.0"),
        (["--grad-clip", "-1"], r"--grad-clip must be > 0 \(None: no clipping\), got -1.0"),
        (["--warmup-steps", "50", "--steps", "10"],
         r"--warmup-steps must be at most --steps \(10\), got 50"),
    ],
)
def test_bad_flags_fail_clearly_before_anything_is_written(tmp_path, tiny_files, flags, message):
    cfg, tokens = tiny_files
    with pytest.raises(SystemExit, match=f"^jaxgpt train: {message}$"):
        _train(tmp_path, cfg, tokens, *flags)
    assert not (tmp_path / "run").exists()


def test_bad_inputs_fail_clearly(tmp_path, tiny_files):
    cfg, tokens = tiny_files
    with pytest.raises(SystemExit, match="--text-file .*missing.txt does not exist"):
        main(["train", "--text-file", str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(TINY, n_head=4)))
    with pytest.raises(SystemExit, match="unknown GPTConfig field.*n_head"):
        main(["train", "--config", str(bad), "--token-file", str(tokens)])
    small = tmp_path / "small.json"
    small.write_text(json.dumps(dict(TINY, vocab_size=50)))  # the tokens go up to 99
    with pytest.raises(SystemExit, match="token id 99, outside the model's vocabulary \\[0, 50\\)"):
        main(
            [
                "train",
                "--config",
                str(small),
                "--token-file",
                str(tokens),
                "--seq-len",
                "8",
                "--out",
                str(tmp_path / "x"),
            ]
        )
    with pytest.raises(SystemExit):  # argparse: --preset and --config together
        main(["train", "--preset", "gpt2-small", "--config", str(cfg)])


def test_out_holding_other_files_is_refused_and_left_alone(tmp_path, tiny_files):
    cfg, tokens = tiny_files
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("not mine to delete\n")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds files that jaxgpt train did not write .notes.txt"):
        _train(tmp_path, cfg, tokens, "--steps", "2")
    assert (run / "metrics.jsonl").read_text() == "not mine to delete\n"
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "notes.txt"]


def test_resume_without_a_checkpoint_fails_naming_the_directory(tmp_path, tiny_files):
    cfg, tokens = tiny_files
    with pytest.raises(SystemExit, match=f"nothing to resume: {tmp_path / 'run' / 'checkpoints'}"):
        _train(tmp_path, cfg, tokens, "--steps", "2", "--resume")
    assert not (tmp_path / "run").exists()


def test_the_loss_plot_legend_covers_no_data(tmp_path, monkeypatch):
    import matplotlib  # a dependency of jaxgpt's default install (see the last test here)
    from matplotlib.figure import Figure

    from jaxgpt.training.progress import plot_losses

    records = [  # two points: the legend must not sit on either
        {"step": 1, "loss": 9.0, "tokens_seen": 32, "val_loss": 9.1},
        {"step": 2, "loss": 8.0, "tokens_seen": 64, "val_loss": 8.5},
    ]
    seen = []
    real_savefig = Figure.savefig

    def keep(fig, *args, **kwargs):  # measure the drawn figure before plot_losses closes it
        out = real_savefig(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        seen.append((ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer),
                     [line.get_marker() for line in ax.get_lines()]))
        return out

    monkeypatch.setattr(Figure, "savefig", keep)
    assert plot_losses(records, tmp_path / "loss.png") == tmp_path / "loss.png"
    ((legend, axes, markers),) = seen
    assert not legend.overlaps(axes)
    assert all(m not in (None, "None", "") for m in markers)  # each point is drawn
    assert matplotlib.get_backend().lower() == "agg"


class _Training:
    """`jaxgpt train` in a subprocess (a long run of the tiny model); stderr read line by line."""

    def __init__(self, tmp_path, cfg, tokens):
        import jaxgpt

        self.out = tmp_path / "run"
        self.argv = ["train", "--config", str(cfg), "--token-file", str(tokens), "--seq-len", "8",
                     "--batch-size", "4", "--steps", "100000", "--save-every", "100000",
                     "--eval-every", "100000", "--out", str(self.out)]
        root = str(Path(jaxgpt.__file__).resolve().parents[1])
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(default_sigint([sys.executable, "-m", "jaxgpt", *self.argv]),
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines = queue.Queue()
        self.err = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.err.append(line)
            self.lines.put(line)

    def wait_for_steps(self, n, timeout=300):
        """Block until metrics.jsonl has `n` steps (compiling takes most of the time)."""
        metrics = self.out / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.err)
            if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
                return
            time.sleep(0.05)
        raise AssertionError(f"no {n} steps in {timeout}s: " + "".join(self.err))

    def wait_for_line(self, text, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.05)
            except queue.Empty:
                continue
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} in {timeout}s: " + "".join(self.err))

    def finish(self, timeout=120):
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.1)  # let the reader thread take the last lines
        return rc, "".join(self.err)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_current_step_and_says_how_to_resume(tmp_path, tiny_files, sig, code):
    cfg, tokens = tiny_files
    run = _Training(tmp_path, cfg, tokens)
    try:
        run.wait_for_steps(3)
        run.proc.send_signal(sig)
        rc, err = run.finish()
    finally:
        run.kill()
    assert rc == code, err
    assert "Traceback" not in err
    steps = [json.loads(x)["step"] for x in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3
    ckpts = sorted(p.name for p in (run.out / "checkpoints").iterdir())
    assert ckpts == [f"step_{steps[-1]:08d}"]  # the step in flight, none before (save-every 1e5)
    assert (run.out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    resume = [line for line in err.splitlines() if "Resume with:" in line]
    assert len(resume) == 1, err
    assert f"{signal.Signals(sig).name} at step {steps[-1]}" in resume[0]
    assert resume[0].endswith(shlex.join(["jaxgpt", *run.argv, "--resume"]))
    if sig == signal.SIGINT:  # the printed command works (here extended to two more steps)
        argv = run.argv[:]
        argv[argv.index("--steps") + 1] = str(steps[-1] + 2)
        assert main([*argv, "--resume"]) == 0
        lines = (run.out / "metrics.jsonl").read_text().splitlines()
        again = [json.loads(x)["step"] for x in lines]
        assert again == list(range(1, steps[-1] + 3))


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_without_saving(tmp_path, tiny_files):
    cfg, tokens = tiny_files
    run = _Training(tmp_path, cfg, tokens)
    try:
        run.wait_for_steps(3)
        run.proc.send_signal(signal.SIGINT)
        run.wait_for_line("stopping after this step")
        run.proc.send_signal(signal.SIGINT)  # while the first one's checkpoint is being saved
        rc, err = run.finish()
    finally:
        run.kill()
    assert rc == 130, err
    assert "second interrupt: exiting now, without saving" in err
    assert "Resume with" not in err and "Traceback" not in err
    # Nothing saved: no step_* (the second Ctrl-C has so far always come before the save began,
    # so no temporary either). Were it cut short mid-save, the one thing allowed is the hidden
    # temporary of that save (`.step_N.tmp-PID-HEX`), which the next save of the run removes.
    written = sorted(p.relative_to(run.out).as_posix() for p in run.out.rglob("*"))
    temporary = re.compile(
        rf"checkpoints(/\.step_\d{{8}}\.tmp-{run.proc.pid}-[0-9a-f]{{8}}(/.*)?)?$")
    kept = {"metrics.jsonl", RUN_LOCK}  # the lock file stays; its lock went with the process
    assert [w for w in written if w not in kept and not temporary.match(w)] == [], written


def test_matplotlib_is_a_dependency_of_the_default_install():
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "matplotlib" for d in deps), deps


def test_log_flag_names_the_trackers_and_refuses_a_missing_one_in_one_line(
        tmp_path, tiny_files, capsys, monkeypatch):
    from jaxgpt.training import tracking

    cfg, tokens = tiny_files
    with pytest.raises(SystemExit, match=r"^jaxgpt train: --log must name trackers from "
                                         r"tensorboard, wandb, comma-separated .*'tensorbord'"):
        _train(tmp_path, cfg, tokens, "--steps", "2", "--log", "tensorbord")
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit, match=r'^jaxgpt train: logging to tensorboard needs the '
                                         r'tensorboard package: pip install '
                                         r'"jaxgpt\[tensorboard\]"$'):
        _train(tmp_path, cfg, tokens, "--steps", "2", "--log", "tensorboard")
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    assert _train(tmp_path, cfg, tokens, "--steps", "2", "--log", "tensorboard",
                  "--run-name", "tiny") == 0
    assert any((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
