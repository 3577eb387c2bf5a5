"""One line for every failure, nothing lost, nothing hung: damaged checkpoints, a full disk,
two runs on one directory, Ctrl-C, read-only outputs, bad inputs (issue 18's table, a test per
row), and a command line without plugin noise.

Subprocesses where only a real process shows the behaviour (its whole stderr, a signal, a
lock held by another process); the rest in-process through `main`.
"""

import ast
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY, default_sigint

from jaxgpt.cli import main
from jaxgpt.config import GPTConfig
from jaxgpt.io import checkpoint, hf
from jaxgpt.native_logs import accelerator_files, drop_noise
from jaxgpt.nn import init_params

# A model the command line can tokenize for (GPT-2's vocabulary), small enough to be quick.
SMALL = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1,
                  drop_rate=0.0, qkv_bias=False)


def _env(tmp_path, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TIKTOKEN_CACHE_DIR=str(tmp_path / "no-cache"),
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.update(extra)
    return env


def _jaxgpt(tmp_path, *args, timeout=300, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "jaxgpt", *args], capture_output=True,
                          text=True, timeout=timeout, env=env or _env(tmp_path), **kwargs)


def _lines(stderr):
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return checkpoint.save(tmp_path_factory.mktemp("small") / "ckpt", init_params(SMALL, 0), SMALL)


def _damage(ckpt):
    """Truncate the largest data file of a checkpoint's params to a third (a copy cut short)."""
    data = max((p for p in (Path(ckpt) / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 3)
    return data


def _train(out, files, *extra):
    cfg, tokens = files
    return main(["train", "--config", str(cfg), "--token-file", str(tokens), "--seq-len", "8",
                 "--batch-size", "4", "--eval-every", "100", "--no-compile-cache", "--out",
                 str(out), *extra])


# --- damaged checkpoints, a full disk -------------------------------------------------------


@pytest.mark.slow
def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, small_ckpt):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(small_ckpt, bad)
    _damage(bad)
    res = _jaxgpt(tmp_path, "generate", "--checkpoint", str(bad), "--max-new-tokens", "3",
                  "--no-compile-cache")
    assert res.returncode == 1
    # The whole stderr, interpreter exit included: no traceback, no asyncio leftovers.
    assert _lines(res.stderr) == [_lines(res.stderr)[0]], res.stderr
    assert res.stderr.startswith(f"jaxgpt: cannot read the checkpoint {bad}: reading array ")


@pytest.mark.slow
def test_resume_passes_over_a_damaged_newest_checkpoint(tmp_path, tiny_files, capsys):
    out = tmp_path / "run"
    assert _train(out, tiny_files, "--steps", "4", "--save-every", "2") == 0
    ckpts = out / "checkpoints"
    _damage(ckpts / "step_00000004")
    capsys.readouterr()
    assert _train(out, tiny_files, "--steps", "6", "--save-every", "2", "--resume") == 0
    err = capsys.readouterr().err
    assert (f"jaxgpt train: warning: cannot read the checkpoint {ckpts / 'step_00000004'}: "
            f"reading array ") in err
    assert f"resumed from {ckpts / 'step_00000002'} (step 2" in err
    # The library's ResumeWarning for the changed setting, in the command's flags.
    assert ("jaxgpt train: warning: --steps changed from 4 to 6: the run is no longer an exact "
            "replay") in err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    # Steps 3 and 4 were redone and saved again; none restores once all are damaged.
    assert checkpoint.restore(ckpts / "step_00000004")[0] == GPTConfig(**TINY)
    saved = sorted(ckpts.iterdir())
    for path in saved:
        _damage(path)
    with pytest.raises(SystemExit, match=rf"jaxgpt train: no checkpoint in {ckpts} restores "
                                         rf"\({len(saved)} tried\); the newest: cannot read the "
                                         rf"checkpoint {ckpts / 'step_00000006'}"):
        _train(out, tiny_files, "--steps", "8", "--save-every", "2", "--resume")


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_older_checkpoint(
        tmp_path, tiny_files, capfd):
    out = tmp_path / "run"
    assert _train(out, tiny_files, "--steps", "2", "--save-every", "2") == 0
    old = out / "checkpoints" / "step_00000002"
    # Each part's _METADATA is one JSON file orbax writes whole (its array data files are not:
    # OCDBT may split them into more, smaller files, as it did once under load).
    smallest = min(p.stat().st_size for p in old.rglob("_METADATA"))
    capfd.readouterr()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Files may not grow past half of it: the save fails as on a full disk (Python ignores
    # SIGXFSZ, so the writes fail with EFBIG); the run's own small files still grow.
    resource.setrlimit(resource.RLIMIT_FSIZE, (smallest // 2, hard))
    try:
        with pytest.raises(SystemExit) as stop:
            _train(out, tiny_files, "--steps", "4", "--save-every", "2", "--resume")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(stop.value)
    assert message.startswith(f"jaxgpt train: cannot write the checkpoint "
                              f"{out / 'checkpoints' / 'step_00000004'}: "), message
    assert message.endswith(f"File too large (errno 27); training stopped after step 4, the "
                            f"newest checkpoint is {old}"), message
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop" not in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert checkpoint.restore(old)[0] == GPTConfig(**TINY)


# --- one run per directory --------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path, tiny_files):
    cfg, tokens = tiny_files
    out = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--token-file", str(tokens), "--seq-len", "8",
            "--batch-size", "4", "--eval-every", "1000000", "--save-every", "1000000",
            "--no-compile-cache", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "jaxgpt", *args, "--steps", "1000000"],
                             env=_env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock, deadline = out / "jaxgpt-train.lock", time.monotonic() + 240
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "no lock taken"
            time.sleep(0.2)
        for extra in ([], ["--resume"]):
            second = _jaxgpt(tmp_path, *args, "--steps", "3", *extra, timeout=240)
            assert second.returncode == 1
            assert "Traceback" not in second.stderr, second.stderr
            assert _lines(second.stderr)[-1] == (
                f"jaxgpt train: {out} is in use by another jaxgpt train (process {first.pid}, "
                f"which holds {lock}); wait for it to end, or choose another output directory")
        first.kill()  # SIGKILL: nothing runs at exit, the lock file stays behind
        first.wait(timeout=60)
        assert lock.read_text().strip() == str(first.pid)
        third = _jaxgpt(tmp_path, *args, "--steps", "2", timeout=240)  # the OS freed the lock
        assert third.returncode == 0, third.stderr
    finally:
        first.kill()
        first.wait(timeout=60)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # one run's records, not two interleaved


def test_a_metrics_file_jaxgpt_did_not_write_is_not_overwritten(tmp_path, tiny_files):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own measurements\n")
    with pytest.raises(SystemExit, match=r"metrics.jsonl was not written by jaxgpt train \(line 1 "
                                         r"is not a record of a training step\)"):
        _train(out, tiny_files, "--steps", "2")
    assert (out / "metrics.jsonl").read_text() == "my own measurements\n"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


# --- generation -------------------------------------------------------------------------------


@pytest.mark.slow
def test_more_new_tokens_than_the_buffer_holds_is_refused_before_compiling(tmp_path,
                                                                          small_ckpt):
    t0 = time.monotonic()
    res = _jaxgpt(tmp_path, "generate", "--checkpoint", str(small_ckpt), "--max-new-tokens",
                  "10000000000", "--no-compile-cache", timeout=120)
    assert res.returncode == 1
    assert _lines(res.stderr) == [_lines(res.stderr)[0]], res.stderr
    assert res.stderr.startswith("jaxgpt generate: --max-new-tokens 10,000,000,000 is more "
                                 "than the token buffer can hold: at most ")
    assert time.monotonic() - t0 < 120


def test_the_python_api_refuses_it_before_tracing():
    from jaxgpt import generate
    from jaxgpt.inference import decode
    from jaxgpt.inference.checks import INT32_MAX, max_new_slots

    before = dict(decode.TRACE_COUNTS)
    cfg = GPTConfig(**TINY)
    with pytest.raises(ValueError, match="max_new_tokens 4,294,967,296 is more than the token "
                                         "buffer can hold: at most"):
        generate(init_params(cfg, 0), cfg, [[1, 2]], 2**32)
    assert dict(decode.TRACE_COUNTS) == before
    # The limit: int32 slots, and 2 copies of the buffer in half the memory.
    assert max_new_slots(1, 8, None) == 2**30 and 8 + 2**30 <= INT32_MAX
    # 2 copies * 4 rows * (8 + N) slots * 4 B <= 512 MiB: N <= 2^24 - 8, a power of two.
    assert max_new_slots(4, 8, 2**30) == 2**23


def test_the_buffer_limit_follows_the_process_memory_limits(monkeypatch, tmp_path):
    """A value under half the host's RAM but past `ulimit -v` (or the cgroup's limit) hung in
    the compiled loop when XLA's allocation failed: the limit is the least of the three."""
    from jaxgpt.inference import checks

    cpu = jax.devices("cpu")[0]
    ram = checks.physical_memory()
    assert ram and checks.device_memory(cpu) <= ram
    monkeypatch.setattr(resource, "getrlimit", lambda _: (6 * 2**30, resource.RLIM_INFINITY))
    assert checks.device_memory(cpu) == min(ram, 6 * 2**30, checks.cgroup_memory_limit() or ram)
    with pytest.raises(ValueError, match=r"at most 268,435,456 for 1 row\(s\) here .* half of "
                                         r"the 6.0 GiB cpu memory this process may use"):
        checks.check_new_tokens(2**30, 1, 8, 2**30, device=cpu)
    limit = tmp_path / "memory.max"
    limit.write_text("max\n")
    assert checks.cgroup_memory_limit(str(limit)) is None
    limit.write_text("1073741824\n")
    assert checks.cgroup_memory_limit(str(limit)) == 2**30


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_ctrl_c_prints_the_text_so_far_and_exits_130_at_once(tmp_path, small_ckpt, stream):
    # Past the 16-token context every token recomputes its window: 10^6 of them take minutes.
    args = ["generate", "--checkpoint", str(small_ckpt), "--max-new-tokens", "1000000",
            "--no-compile-cache", *(["--stream"] if stream else [])]
    proc = subprocess.Popen(default_sigint([sys.executable, "-m", "jaxgpt", *args]),
                            env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        err = ""
        while "jaxgpt: generated" not in err:  # a chunk is done (the progress line)
            line = proc.stderr.readline()
            assert line, err
            err += line
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, rest = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 130
    # The chunk in flight is not waited for; the bound leaves room for a loaded machine.
    assert elapsed < 10, elapsed
    assert "Traceback" not in rest, rest
    last = _lines(rest)[-1]
    n = int(last.split("interrupted: ")[1].split()[0])
    assert n > 0 and last.endswith(" of 1000000 new tokens were generated (printed above)")
    assert out.startswith("Hello, I am") and len(out) > len("Hello, I am") + n // 2


@pytest.mark.slow
def test_a_child_started_by_default_sigint_takes_ctrl_c_however_the_suite_was_launched():
    # A parent with SIGINT ignored, as `pytest &` in a script starts: a plain child inherits
    # the ignored SIGINT (the control), one started through `default_sigint` gets Python's own.
    parent = ("import signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
              "subprocess.run(sys.argv[1:], check=True)")
    show = [sys.executable, "-c", "import signal; print(repr(signal.getsignal(signal.SIGINT)))"]
    seen = [subprocess.run([sys.executable, "-c", parent, *argv], capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
            for argv in (show, default_sigint(show))]
    assert seen == ["<Handlers.SIG_IGN: 1>", "<built-in function default_int_handler>"]


def test_every_test_that_interrupts_a_child_starts_it_by_default_sigint():
    """A test module that sends a child a signal starts its children through
    `conftest.default_sigint`, else its test fails when the suite runs in the background."""
    def calls(path):
        return {node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
                and isinstance(node.func, (ast.Attribute, ast.Name))}

    modules = {p.name: calls(p) for p in sorted(Path(__file__).parent.glob("test_*.py"))}
    senders = [name for name, called in modules.items() if "send_signal" in called]
    assert set(senders) >= {"test_reliability.py", "test_train_cli.py"}
    assert [name for name in senders if "default_sigint" not in modules[name]] == []


def test_the_past_context_warning_counts_only_the_new_tokens(small_ckpt, capsys):
    prompt = " ".join(["word"] * 40)  # 40 tokens, more than the context of 16
    assert main(["generate", "--checkpoint", str(small_ckpt), "--prompt", prompt,
                 "--max-new-tokens", "5", "--no-compile-cache"]) == 0
    err = capsys.readouterr().err
    assert ("warning: 5 of the 5 new tokens lie past context_length 16: from new token 1 on"
            in err), err


# --- outputs ----------------------------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path):
    """A directory nobody may write into: chattr +i as root (root ignores modes), else 0555."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("root, and chattr +i is not available to make a read-only directory")
        yield path
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


def test_read_only_outputs_are_refused_before_the_work(read_only, tiny_files, small_ckpt,
                                                       monkeypatch):
    import jaxgpt.cli.attention as attention_cli

    with pytest.raises(SystemExit, match=rf"jaxgpt train: cannot write --out {read_only}/run: "
                                         rf"{read_only}, where it would be made, is not "
                                         r"writable"):
        _train(read_only / "run", tiny_files, "--steps", "2")
    with pytest.raises(SystemExit, match=rf"jaxgpt convert: cannot write DST {read_only}/hf"):
        main(["convert", str(small_ckpt), str(read_only / "hf")])
    monkeypatch.setattr(attention_cli, "load_model", lambda args: pytest.fail("computed"))
    with pytest.raises(SystemExit, match=rf"jaxgpt attention: --out {read_only}/a.png: cannot "
                                         r"write there \(permission denied\)"):
        main(["attention", "--checkpoint", str(small_ckpt), "--out", str(read_only / "a.png")])
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("name, message", [
    ("attn.txt", r"--out {out}: '.txt' is not a picture format; use one of .png, .pdf, .svg"),
    ("attn", r"--out {out}: no suffix is not a picture format"),
    ("adir", r"--out {out} is a directory; give a file name"),
])
def test_attention_checks_its_output_before_computing(tmp_path, small_ckpt, monkeypatch, name,
                                                      message):
    import jaxgpt.cli.attention as attention_cli

    (tmp_path / "adir").mkdir()
    out = tmp_path / name
    monkeypatch.setattr(attention_cli, "load_model", lambda args: pytest.fail("computed"))
    with pytest.raises(SystemExit, match="jaxgpt attention: " + message.format(out=out)):
        main(["attention", "--checkpoint", str(small_ckpt), "--out", str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


def test_attention_writes_the_file_it_names(tmp_path, small_ckpt, capsys):
    out = tmp_path / "attn.svg"
    assert main(["attention", "--checkpoint", str(small_ckpt), "--out", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<?xml")
    assert f"jaxgpt: wrote {out} (layer 0" in capsys.readouterr().err


# --- inputs -----------------------------------------------------------------------------------


def test_a_text_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path, tiny_files):
    text = tmp_path / "latin1.txt"
    text.write_bytes("Déjà vu\n".encode() * 3000 + "café\n".encode("latin-1"))
    offset = len("Déjà vu\n".encode()) * 3000 + len("caf")
    with pytest.raises(SystemExit, match=rf"jaxgpt train: {text} is not UTF-8 text: byte 0xe9 "
                                         rf"at offset {offset} \(invalid continuation byte\)"):
        main(["train", "--text-file", str(text), "--config", str(tiny_files[0]), "--out",
              str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_token_file_holding_text_is_refused(tmp_path, tiny_files):
    book = tmp_path / "book.txt"
    book.write_text("It was the best of times, it was the worst of times.\n" * 100)
    with pytest.raises(SystemExit, match=rf"jaxgpt train: {book} holds text, not uint16 token "
                                         r"ids; train on it as a text file \(--text-file\)"):
        main(["train", "--token-file", str(book), "--config", str(tiny_files[0]), "--out",
              str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_misspelt_hugging_face_config_key_is_named(tmp_path):
    path = hf.save_pretrained(init_params(SMALL, 0), SMALL, tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    config["n_embed"] = config.pop("n_embd")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"config.json: unknown key 'n_embed'; did you mean "
                                         r"'n_embd'\? Without 'n_embd', transformers and jaxgpt "
                                         r"take its default 768"):
        main(["generate", "--checkpoint", str(path)])


def test_generate_from_a_run_directory_uses_its_newest_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    for step, seed in ((2, 1), (4, 2)):
        checkpoint.save(run / "checkpoints" / f"step_{step:08d}", init_params(SMALL, seed), SMALL)
    newest = run / "checkpoints" / "step_00000004"
    args = ["generate", "--max-new-tokens", "5", "--no-compile-cache", "--checkpoint"]
    assert main([*args, str(newest)]) == 0
    expected = capsys.readouterr().out
    assert main([*args, str(run)]) == 0
    out, err = capsys.readouterr()
    assert f"jaxgpt: {run} is a training run; using its newest checkpoint {newest}" in err
    assert out == expected


def test_convert_orbax_to_hf_and_back_is_lossless(tmp_path, small_ckpt):
    import jax

    assert main(["convert", str(small_ckpt), str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    cfg, params = checkpoint.restore(small_ckpt)
    cfg2, params2 = checkpoint.restore(tmp_path / "back")
    assert cfg2 == cfg and not cfg2.qkv_bias
    # What the GPT-2 format cannot say, in a key of its own.
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["jaxgpt_qkv_bias"] is False
    assert jax.tree_util.tree_structure(params2) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- a quiet command line ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("platforms", [None, "cpu"])
def test_the_command_line_prints_no_plugin_noise(tmp_path, platforms):
    if platforms is None and accelerator_files():
        pytest.skip(f"this machine has accelerators ({accelerator_files()[0]}): JAX may use them")
    env = _env(tmp_path)
    env.pop("JAX_PLATFORMS")
    if platforms:
        env["JAX_PLATFORMS"] = platforms
    res = _jaxgpt(tmp_path, "info", env=env)
    assert res.returncode == 0 and "parameters: 163,009,536" in res.stdout
    assert res.stderr == "", res.stderr


# Run in a fresh interpreter: records every os.dup/os.dup2 that names stderr (fd 2) while
# jaxgpt is imported and its public names (hence jax, and its plugins) are loaded.
_WATCH_FD2 = """
import os
touched = []
dup, dup2 = os.dup, os.dup2
def watch_dup(fd):
    if fd == 2:
        touched.append(("dup", fd))
    return dup(fd)
def watch_dup2(fd, fd2, *rest):
    if 2 in (fd, fd2):
        touched.append(("dup2", fd, fd2))
    return dup2(fd, fd2, *rest)
os.dup, os.dup2 = watch_dup, watch_dup2
import jaxgpt
jaxgpt.GPTModel, jaxgpt.generate, jaxgpt.init_params
print(touched)
"""


def _absl_lines(stderr):
    """stderr's lines with the numbers (times, thread ids) masked."""
    return [re.sub(r"\d+", "N", line) for line in _lines(stderr)]


@pytest.mark.slow
def test_importing_jaxgpt_leaves_stderr_alone(tmp_path):
    """A library import does not redirect fd 2: what jax's plugins print when they load is
    passed on as `import jax` alone prints it (the command line quiets it, above)."""
    env = _env(tmp_path)
    ours = subprocess.run([sys.executable, "-c", _WATCH_FD2], capture_output=True, text=True,
                          env=env, timeout=120)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.strip() == "[]", ours.stdout
    plain = subprocess.run([sys.executable, "-c", "import jax"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert _absl_lines(ours.stderr) == _absl_lines(plain.stderr)


def test_only_absls_info_lines_are_dropped():
    noise = (b"WARNING: All log messages before absl::InitializeLog() is called are written to "
             b"STDERR\nI0000 00:00:1795999083.372433   22857 cudart_stub.cc:31] Could not find "
             b"cuda drivers on your machine, GPU will not be used.\n")
    kept = (b"E0000 00:00:1795.1 21169 common_lib.cc:554] INVALID_ARGUMENT: bad\n"
            b"Traceback (most recent call last):\nI0 is not absl's\n")
    assert drop_noise(noise + kept + noise) == kept


def test_a_metrics_line_cut_short_by_a_killed_run_is_ours(tmp_path):
    from jaxgpt.training.progress import foreign_metrics_line, read_metrics

    path = tmp_path / "metrics.jsonl"
    record = json.dumps({"step": 1, "loss": 4.6, "tokens_seen": 32})
    path.write_text(record + "\n" + record[:9])  # killed while writing step 2
    assert foreign_metrics_line(path) is None
    assert [r["step"] for r in read_metrics(path)] == [1]
    path.write_text(record + "\n" + record[:9] + "\n")  # a complete line that is not a record
    assert foreign_metrics_line(path) == 2
    path.write_text(record + '\n{"step": "x", "loss": 1, "tokens_seen": 2}\n')
    assert foreign_metrics_line(path) == 2


def test_the_cause_of_a_failure_is_one_line():
    from jaxgpt.io.checkpoint import failure_cause

    try:
        try:
            raise OSError(28, "No space left on device", "/data/x")
        except OSError as e:
            raise RuntimeError("orbax: commit failed\nwith details") from e
    except RuntimeError as e:
        assert failure_cause(e) == "No space left on device (errno 28): /data/x"
    ts = ValueError('OUT_OF_RANGE: Error writing "final_norm.shift/0" in OCDBT database at local '
                    'file "/run/x/": Failed writing: "/run/x/d/ca0f": Failed to write 1962296 '
                    "bytes to file 6: File too large [os_error_code='27']")
    assert failure_cause(ts) == "writing array final_norm.shift: File too large (errno 27)"
    assert failure_cause(RuntimeError("two\n  lines")) == "two lines"
