"""Ctrl-C never crashes the `jaxgpt` command and is never lost: each command interrupted at
several moments (start-up while jax loads, compiling, writing the picture) exits 130 with one
line; an interrupt that Python drops (in a gc callback) or that arrives while the main thread
is inside XLA still ends the command at once (`jaxgpt.cli.interrupts`).

Each child handles SIGINT as a process started from a terminal does: a suite started as a
background job inherits SIGINT ignored, and a command started so keeps it ignored (as Unix
programs do). The moments are found from the child's stderr, not from timings; where the
command gives no sign (start-up, the picture), the child announces the moment itself: a
wrapper around `jaxgpt.cli.entry` that changes nothing else.
"""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import default_sigint

from jaxgpt.cli import interrupts
from jaxgpt.config import GPTConfig
from jaxgpt.io import checkpoint
from jaxgpt.nn import init_params

ROOT = Path(__file__).resolve().parents[1]

# A model the command line can tokenize for (GPT-2's vocabulary), small enough to be quick.
SMALL = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=2,
                  drop_rate=0.0, qkv_bias=False)

# The start of every child: SIGINT as Python sets it up in a process started from a terminal,
# whatever this suite inherited (a background job has it ignored). (Not a `preexec_fn`: that
# would fork this process, which runs JAX's threads.)

# `jaxgpt ARGS` (`entry`, as the executable runs it), announcing on stderr the moments the
# command does not show: `started` once Ctrl-C is jaxgpt's (jax not loaded yet); with
# JAXGPT_TEST_SLOW_PICTURE set, `writing` once a picture is half written (then it waits).
_CHILD = """
import os, sys, time
from jaxgpt import cli
from jaxgpt.cli import interrupts

start = interrupts.Interrupts.start
def announced(self):
    started = start(self)
    assert "jax" not in sys.modules
    print("jaxgpt-test: started", file=sys.stderr, flush=True)
    return started
interrupts.Interrupts.start = announced

if os.environ.get("JAXGPT_TEST_SLOW_PICTURE"):
    import matplotlib.figure
    def slow(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\\x89PNG\\r\\n\\x1a\\n")  # the first bytes of a picture
        print("jaxgpt-test: writing", file=sys.stderr, flush=True)
        time.sleep(120)
    matplotlib.figure.Figure.savefig = slow

sys.argv = ["jaxgpt", *sys.argv[1:]]
cli.entry()
"""


def _env(tmp_path, **extra):
    """The children's environment: offline, their caches under `tmp_path`, this checkout's
    jaxgpt first on the path (not an installed one)."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu",
                TIKTOKEN_CACHE_DIR=str(tmp_path / "no-cache"), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
                XDG_CACHE_HOME=str(tmp_path / "xdg"), **extra)


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def _interrupt(tmp_path, code, args, marker, **env):
    """Run `python -c code args` with SIGINT's default disposition, send SIGINT once a line
    of its stderr holds `marker`: `(exit code, stdout, stderr's lines from then on)`."""
    proc = subprocess.Popen(
        default_sigint([sys.executable, "-c", code, *args]), env=_env(tmp_path, **env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # A hang is the failure, not a slow exit: the child is killed after 5 minutes.
    guard = threading.Timer(300, proc.kill)
    guard.start()
    try:
        err, line = "", ""
        while marker not in line:
            line = proc.stderr.readline()
            assert line, f"exit {proc.wait()} before {marker!r}: {err}"
            err += line
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate()
    finally:
        guard.cancel()
        proc.kill()
        proc.wait()
    return proc.returncode, out, _lines(rest)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return checkpoint.save(tmp_path_factory.mktemp("small") / "ckpt", init_params(SMALL, 0), SMALL)


def _command(name, ckpt, out):
    """The arguments of command `name` on the checkpoint `ckpt`, its picture `out`."""
    prompt = "When Mary and John went to the store, John gave a drink to"
    return {
        "generate": ["generate", "--prompt", "Hello", "--max-new-tokens", "10",
                     "--no-compile-cache"],
        "lens": ["lens", "--prompt", prompt, "--out", str(out)],
        "attention": ["attention", "--prompt", prompt, "--out", str(out)],
        "patch": ["patch", "--clean", prompt, "--corrupt", prompt.replace("John gave", "Mary gave"),
                  "--answer", " Mary", "--wrong", " John", "--kind", "heads", "--out", str(out)],
    }[name] + ["--checkpoint", str(ckpt)]


# Each command at each moment: while jax loads; once the weights are in (what follows is
# compiling and computing; for patch, the sweep's compile).
MOMENTS = [(name, moment) for name in ("generate", "lens", "attention", "patch")
           for moment in ("jaxgpt-test: started",
                          "compiling first" if name == "patch" else "jaxgpt: jaxgpt orbax")]


@pytest.mark.slow
@pytest.mark.parametrize("name, marker", MOMENTS)
def test_ctrl_c_exits_130_with_one_line(tmp_path, small_ckpt, name, marker):
    out = tmp_path / "picture.png"
    code, stdout, lines = _interrupt(tmp_path, _CHILD, _command(name, small_ckpt, out), marker)
    assert (code, lines) == (130, [f"jaxgpt {name}: interrupted"]), (code, lines)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lens", "attention", "patch"])
def test_ctrl_c_while_the_picture_is_written_leaves_no_file(tmp_path, small_ckpt, name):
    out = tmp_path / "picture.png"
    code, _, lines = _interrupt(tmp_path, _CHILD, _command(name, small_ckpt, out),
                                "jaxgpt-test: writing", JAXGPT_TEST_SLOW_PICTURE="1")
    assert (code, lines) == (130, [f"jaxgpt {name}: interrupted"]), (code, lines)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == []


# `jaxgpt demo [raising]`: a command whose Ctrl-C lands in a gc callback, where Python drops
# the KeyboardInterrupt ("Exception ignored in ..."), then sleeps; with `raising`, it asks for
# the KeyboardInterrupt (as generate does, to print its text) and says it caught it.
_DROPPED = """
import contextlib, gc, signal, sys, time
from jaxgpt import cli
from jaxgpt.cli.interrupts import raising

def main(argv):
    def interrupt_in_gc(phase, info):
        gc.callbacks.remove(interrupt_in_gc)
        print("jaxgpt-test: in gc", file=sys.stderr, flush=True)
        signal.raise_signal(signal.SIGINT)
    with raising() if argv[1:] == ["raising"] else contextlib.nullcontext():
        try:
            gc.callbacks.append(interrupt_in_gc)
            gc.collect()
            time.sleep(10)
        except KeyboardInterrupt:
            print("jaxgpt demo: caught it", file=sys.stderr, flush=True)
            return 130
    return 0

cli.main = main
sys.argv = ["jaxgpt", "demo", *sys.argv[1:]]
print("jaxgpt-test: go", file=sys.stderr, flush=True)
cli.entry()
"""


@pytest.mark.slow
@pytest.mark.parametrize("raising", [False, True])
def test_an_interrupt_python_drops_is_not_lost(tmp_path, raising):
    proc = subprocess.run(
        default_sigint([sys.executable, "-c", _DROPPED, *(["raising"] if raising else [])]),
        env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    said = "jaxgpt demo: caught it" if raising else "jaxgpt demo: interrupted"
    assert (proc.returncode, _lines(proc.stderr)) == (
        130, ["jaxgpt-test: go", "jaxgpt-test: in gc", said]), proc.stderr


# `jaxgpt demo`: a command that waits for an XLA program that never ends (an odd counter
# stepping by 2 never reaches 0), so the main thread never runs a bytecode again.
_IN_XLA = """
import sys
from jaxgpt import cli

def main(argv):
    import jax

    spin = jax.jit(lambda n: jax.lax.while_loop(lambda i: i != n, lambda i: i + 2, 1))
    compiled = spin.lower(0).compile()
    print("jaxgpt-test: computing", file=sys.stderr, flush=True)
    compiled(0).block_until_ready()  # on the CPU, run in this call
    return 0

cli.main = main
sys.argv = ["jaxgpt", "demo"]
cli.entry()
"""


@pytest.mark.slow
def test_ctrl_c_inside_xla_ends_the_command(tmp_path):
    code, _, lines = _interrupt(tmp_path, _IN_XLA, [], "jaxgpt-test: computing")
    assert (code, lines) == (130, ["jaxgpt demo: interrupted"])


def test_sigint_ignored_at_start_stays_ignored(monkeypatch):
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN)
    monkeypatch.setattr(signal, "signal", lambda *a: pytest.fail("took SIGINT over"))
    interrupts.Interrupts("jaxgpt demo").start()
    assert interrupts._active is None



# --- pictures: whole or not at all ------------------------------------------------------------


@pytest.mark.parametrize("name", ["lens", "attention", "patch"])
def test_a_full_disk_while_the_picture_is_written_names_it_and_leaves_nothing(
        tmp_path, small_ckpt, name, monkeypatch):
    import errno

    import matplotlib.figure

    from jaxgpt.cli import main

    def full(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n")  # the first bytes of a picture, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    (tmp_path / "picture.png").write_bytes(b"an older picture")
    out = tmp_path / "picture.png"
    with pytest.raises(SystemExit) as e:
        main(_command(name, small_ckpt, out))
    assert str(e.value) == f"jaxgpt {name}: [Errno 28] No space left on device: '{out}'"
    assert out.read_bytes() == b"an older picture"  # left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picture.png"]
