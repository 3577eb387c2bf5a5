"""Several processes for real: `jaxgpt train` as 2 processes x 2 CPU devices on localhost.

Each run starts real processes (`--coordinator 127.0.0.1:PORT --num-processes 2 --process-id I`,
gloo collectives, the same --out) and compares them with one process over 4 devices: the same
global batch on the same 4-device mesh, so the losses agree to float32 reduction-order noise.
Every process is started with a time limit and killed in a `finally`.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import as_f32, tb_scalars

from jaxgpt.io import checkpoint, formats
from jaxgpt.training.run_dir import list_checkpoints

STEPS, SAVE_EVERY = 6, 3
LIMIT_S = 240  # per run; a healthy run takes well under a minute on 2 loaded cores
# GPT-2's vocabulary, so each evaluation also draws a sample (the runs' text: ids below 97).
CFG = {"vocab_size": 50257, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
       "drop_rate": 0.1, "qkv_bias": False}
# The child: optionally arm a fault (the process with id KILL_PID kills itself right after its
# shards of the step-KILL_STEP checkpoint are written, before the commit), then run the CLI.
# With PYTHON_ROUTE=ADDR:N:I it starts the runtime itself, as the README shows, instead of
# passing --coordinator/--num-processes/--process-id.
CHILD = """
import os, signal, sys
import jax
route = os.environ.get("PYTHON_ROUTE")
if route:
    addr, n, i = route.rsplit(":", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=addr, num_processes=int(n), process_id=int(i))
from jaxgpt.io import checkpoint, formats
from jaxgpt.cli import main
kill = os.environ.get("KILL_AT")
if kill:
    pid, step = (int(v) for v in kill.split(":"))
    write = checkpoint._write_arrays
    def write_then_die(tmp, params, extra):
        write(tmp, params, extra)
        import jax
        if jax.process_index() == pid and tmp.name.startswith(f".step_{step:08d}."):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint._write_arrays = write_then_die
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(),
               PYTHONPATH=os.getcwd() + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def _launch(args, env, log):
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


class Runs:
    """`jaxgpt train` runs started in the background; every process is killed at `close`."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.logs = []

    def start(self, name, flags, *, processes=1, devices=4, kill_at=None, python_route=False):
        """Start `processes` processes of `devices` CPU devices each; `kill_at=(process_id,
        step)` makes that process kill itself mid-save of that step; `python_route` starts
        the runtime in Python rather than by flags. Returns the processes."""
        tmp = self.tmp
        base = ["train", "--token-file", str(tmp / "tokens.bin"),
                "--config", str(tmp / "cfg.json"), "--steps", str(STEPS), "--batch-size", "8",
                "--seq-len", "16", "--eval-every", str(SAVE_EVERY), "--eval-iters", "2",
                "--save-every", str(SAVE_EVERY), "--sample-tokens", "4",
                "--compile-cache", str(tmp.parent / "xla-multiprocess"), *flags]
        port = _free_port()
        procs = []
        for i in range(processes):
            extra, dist = {}, []
            if kill_at:
                extra["KILL_AT"] = f"{kill_at[0]}:{kill_at[1]}"
            if processes > 1 and python_route:
                extra["PYTHON_ROUTE"] = f"127.0.0.1:{port}:{processes}:{i}"
            elif processes > 1:
                dist = ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                        str(processes), "--process-id", str(i), "--distributed-timeout", "60"]
            self.logs.append(open(tmp / f"{name}.{i}.log", "w"))
            procs.append(_launch(base + dist, _env(devices, **extra), self.logs[-1]))
            self.procs.append(procs[-1])
        return procs

    def wait(self, procs) -> list[int]:
        """Exit codes, once every process of `procs` ends (killed after `LIMIT_S`)."""
        deadline = time.monotonic() + LIMIT_S
        try:
            for p in procs:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            _end(procs)
        return [p.returncode for p in procs]

    def close(self) -> None:
        _end(self.procs)
        for log in self.logs:
            log.close()


def _end(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.fixture
def runs(tmp_path):
    r = Runs(tmp_path)
    try:
        yield r
    finally:
        r.close()


def _log_text(tmp_path, name) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob(f"{name}*.log")))


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "one metrics row per step"
    return np.array([r["loss"] for r in rows]), rows


@pytest.fixture
def files(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(CFG))
    rng = np.random.default_rng(0)
    rng.integers(0, 97, 6000).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    return tmp_path


# 1 process x 4 devices vs 2 x 2: the same mesh of 4, the same rows on each device, so only the
# order of the cross-device sums can differ: float32 rounding, a few 1e-7 relative on losses of
# ~10.8 (up to ~2e-6 after 6 steps), below the bound of 1e-5. One process on one
# device sums the 4 shards in another order too.
LOSS_TOL = 1e-5
# Weights: AdamW's m / (sqrt(v) + eps) turns ~1e-7 relative gradient noise into ~1e-7 of lr for
# gradients well above eps and at most ~lr * 1e-2 for those near it (as tests/test_sharding.py
# argues), so 6 steps at lr 4e-4 stay below 1e-5.
WEIGHT_TOL = 1e-5


def _max_diff(a, b) -> float:
    worst = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        worst = max(worst, float(np.max(np.abs(np.asarray(x) - np.asarray(y)))))
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["data-parallel", "fsdp"])
def test_two_processes_match_one_and_resume_exactly(files, runs, fsdp):
    tmp = files
    flags = ["--fsdp"] if fsdp else []
    ref, multi = tmp / "ref", tmp / "multi"
    # The 1 x 4 reference and a 2 x 2 run whose process 1 dies after writing its shards of the
    # step-6 checkpoint, before the commit (run side by side).
    ref_run = runs.start("ref", [*flags, "--out", str(ref)])
    killed = runs.start("killed", [*flags, "--out", str(multi)], processes=2, devices=2,
                        kill_at=(1, STEPS))
    assert runs.wait(ref_run) == [0], _log_text(tmp, "ref")
    codes = runs.wait(killed)
    assert codes[1] == -signal.SIGKILL and codes[0] == 1, _log_text(tmp, "killed")
    ref_losses, ref_rows = _losses(ref)
    ckpts = multi / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000003"]
    # Process 0 fails at the commit barrier with one line and removes the temporary (a
    # process killed there too would leave it for the next save to remove).
    assert all(p.name.startswith(".step_00000006.tmp-") for p in ckpts.iterdir()
               if p.name != "step_00000003")
    assert "another process failed" in (tmp / "killed.0.log").read_text()
    assert "Traceback" not in (tmp / "killed.0.log").read_text()

    # --resume from the step-3 checkpoint of the 2 x 2 run: on 2 x 2, and on 1 x 1 (a copy).
    single = tmp / "single"
    (single / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts / "step_00000003", single / "checkpoints" / "step_00000003")
    # (This run starts the distributed runtime the README's Python way, the others by flags.)
    # It also logs to TensorBoard: only process 0 may write (tests/test_tracking.py has the rest).
    resumed = runs.start("resumed", [*flags, "--resume", "--out", str(multi), "--log",
                                     "tensorboard"], processes=2, devices=2, python_route=True)
    one = runs.start("single", [*flags, "--resume", "--out", str(single)], devices=1)
    assert runs.wait(resumed) == [0, 0], _log_text(tmp, "resumed")
    assert runs.wait(one) == [0], _log_text(tmp, "single")

    multi_losses, rows = _losses(multi)
    single_rows = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    single_losses = np.array([r["loss"] for r in single_rows])
    print(f"fsdp={fsdp}\n  1x4 losses {ref_losses.tolist()}\n  2x2 losses "
          f"{multi_losses.tolist()}\n  max |diff| {np.max(np.abs(multi_losses - ref_losses)):.2e}"
          f"\n  1x1 resumed losses (steps 4-6) {single_losses.tolist()}")
    assert len(set(ref_losses.tolist())) == STEPS  # the losses move: the comparison means something
    np.testing.assert_allclose(multi_losses, ref_losses, rtol=0, atol=LOSS_TOL)
    np.testing.assert_allclose([rows[-1]["val_loss"]], [ref_rows[-1]["val_loss"]], rtol=0,
                               atol=LOSS_TOL)
    # The sample (drawn from all the weights, gathered to every process) is the 1-process
    # run's: the weights differ by < 1e-7, so a token could only change if a uniform draw fell
    # within ~1e-7 of a boundary of the top-k distribution.
    assert rows[-1]["sample"].startswith("Every effort moves you")
    assert [r.get("sample") for r in rows] == [r.get("sample") for r in ref_rows]
    assert [r["step"] for r in single_rows] == list(range(SAVE_EVERY + 1, STEPS + 1))
    np.testing.assert_allclose(single_losses, ref_losses[SAVE_EVERY:], rtol=0, atol=LOSS_TOL)
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["step_00000003", "step_00000006"], names  # no temporary left
    assert (multi / "loss.png").is_file()
    # Process 1 wrote no messages: only process 0's log speaks of the run.
    assert "jaxgpt train:" not in (tmp / "resumed.1.log").read_text()
    assert len(list((multi / "tensorboard").glob("events.out.tfevents.*"))) == 1
    _, scalars = tb_scalars(multi / "tensorboard")
    assert scalars["loss"] == as_f32(rows[SAVE_EVERY:], "loss")  # steps 4-6, once each

    # The 2-process checkpoint restores in this single process, equal to the 1-process run's.
    final = ckpts / "step_00000006"
    meta = checkpoint.load_metadata(final)
    assert formats.is_checkpoint(final) and meta["processes"] == 2 and meta["step"] == STEPS
    _, params_multi = checkpoint.restore(final)
    _, params_ref = checkpoint.restore(ref / "checkpoints" / "step_00000006")
    worst = _max_diff(params_multi, params_ref)
    print(f"  max |weight diff| 2x2 vs 1x4 after {STEPS} steps: {worst:.2e}")
    assert worst <= WEIGHT_TOL


# What a child prints that is not jaxgpt's: the C++ log lines of XLA's plugins (with the test
# extra's CUDA plugin installed, loading it logs "Could not find cuda drivers" even under
# JAX_PLATFORMS=cpu), in absl's format `I0000 00:00:... file.cc:31] ...` and its preamble.
_NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|"
                         r"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ )")


def _jaxgpt_lines(stderr: str) -> list[str]:
    """The lines of `stderr` that jaxgpt printed (native libraries' log lines left out)."""
    return [line for line in stderr.strip().splitlines() if not _NATIVE_LOG.match(line)]


def test_native_log_lines_are_told_apart():
    noise = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
             "STDERR\nI0000 00:00:1795349516.904213   26241 cudart_stub.cc:31] Could not find "
             "cuda drivers on your machine, GPU will not be used.\n")
    assert _jaxgpt_lines(noise + "jaxgpt train: stop\n") == ["jaxgpt train: stop"]
    assert _jaxgpt_lines("Traceback (most recent call last):\nI0 boom") == [
        "Traceback (most recent call last):", "I0 boom"]


@pytest.mark.slow
def test_an_unreachable_coordinator_is_one_line_within_the_timeout(files):
    port = _free_port()  # nothing listens there
    args = ["train", "--token-file", str(files / "tokens.bin"), "--config",
            str(files / "cfg.json"), "--out", str(files / "x"), "--coordinator",
            f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
            "--distributed-timeout", "3"]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jaxgpt", *args], env=_env(1),
                          capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    lines = _jaxgpt_lines(proc.stderr)
    assert len(lines) == 1 and "did not start within 3s" in lines[0], proc.stderr
    assert elapsed < 60
    assert not (files / "x").exists()


@pytest.mark.slow
def test_the_environment_route_without_a_process_count_is_one_line(files):
    # JAX_COORDINATOR_ADDRESS alone: jax.distributed.initialize looks for the rest in a cluster
    # environment (Slurm, Open MPI), finds none here, and says so; the CLI makes it one line.
    args = ["train", "--token-file", str(files / "tokens.bin"), "--config",
            str(files / "cfg.json"), "--out", str(files / "x")]
    proc = subprocess.run([sys.executable, "-m", "jaxgpt", *args],
                          env=_env(1, JAX_COORDINATOR_ADDRESS="127.0.0.1:1"),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert _jaxgpt_lines(proc.stderr) == [
        "jaxgpt train: cannot start the distributed runtime: Number of processes must be defined."
    ], proc.stderr
    assert not (files / "x").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
         r"--process-id must be in \[0, 1\]"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "0", "--process-id", "0"],
         "--num-processes must be >= 1"),
    ],
)
def test_bad_distributed_flags_fail_clearly(files, flags, message):
    from jaxgpt.cli import main

    with pytest.raises(SystemExit, match=message):
        main(["train", "--token-file", str(files / "tokens.bin"), "--config",
              str(files / "cfg.json"), "--out", str(files / "x"), *flags])


def test_a_batch_that_does_not_divide_by_the_process_count_is_refused(monkeypatch):
    from jaxgpt import sharding

    sharding.check_batch_split(6)  # one process: any batch
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    sharding.check_batch_split(8)
    with pytest.raises(ValueError, match="batch of 6 rows does not divide by the 4 processes"):
        sharding.check_batch_split(6)
