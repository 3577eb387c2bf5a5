"""Ctrl-C in the `jaxgpt` command: exit 130 with one line, at once, never a crash, never lost.

Python's default SIGINT handler raises KeyboardInterrupt at the main thread's next bytecode.
In a process running JAX that goes wrong in four ways (issue 31, each reproduced):

- the command prints its line and returns, and the interpreter's teardown then races XLA's
  threads (a compile or a computation still in flight): a segmentation fault, exit 139;
- the next bytecode is in a garbage-collector callback (jax's `_xla_gc_callback`) or a
  `__del__`, where Python reports "Exception ignored" and drops the exception: the run goes
  on and exits 0;
- the next bytecode is in Python code that native code called (importing jaxlib): an
  ImportError's traceback, or an abort;
- the main thread is inside XLA (a compile can take many seconds) and runs no bytecode: the
  Ctrl-C waits for it.

So the command's handler raises nothing: it ends the process itself (the one line, then
`os._exit(130)`: no teardown), and a watchdog thread, woken by the signal itself
(`signal.set_wakeup_fd`), does the same while the main thread is inside native code. A part
of a command with something to do on Ctrl-C (print the text generated so far) asks for the
KeyboardInterrupt with `raising()`; the watchdog then gives it `GRACE_S` seconds, and one that
Python drops is raised again.

A process started with SIGINT ignored keeps it ignored, as Unix programs do: that is how a
shell without job control starts a background job (`cmd &` in a script), so that a Ctrl-C
meant for the foreground leaves it running; such a job is stopped with `kill` (SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

# The exit code of a command stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED = 128 + signal.SIGINT

# How long a part of a command that asked for the KeyboardInterrupt (`raising`) has to end the
# command by itself before the watchdog ends it: far longer than Python takes to act on a
# signal between two bytecodes, far shorter than a compile.
GRACE_S = 2.0

_active: Interrupts | None = None  # the command's, once started


class Interrupts:
    """The `jaxgpt` command's SIGINT handling, from `start` (in the main thread) to the end of
    the process: see the module's docstring. `command` names the program in the one line
    printed (`jaxgpt patch`)."""

    def __init__(self, command: str = "jaxgpt") -> None:
        self.command = command
        self.seen = threading.Event()  # a SIGINT reached the handler
        self.said = threading.Event()  # the command printed its own line about it
        self.temporaries: set[Path] = set()  # files to remove if the process ends here
        self._raising = 0  # depth of `raising()` blocks
        self._exiting = threading.RLock()  # held by the thread ending the process
        self._redeliver = threading.Event()  # a KeyboardInterrupt was dropped: raise it again
        self._previous_hook = sys.unraisablehook
        self._stderr = 2

    def start(self) -> Interrupts:
        """Take SIGINT over, unless the process was started with it ignored or a handler of
        someone else's is installed: then nothing changes."""
        global _active
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return self
        # The terminal's stderr, for the one line: fd 2 may go elsewhere at the time
        # (`quiet_native_logs` while jax loads).
        self._stderr = os.dup(2)
        read, write = os.pipe()
        os.set_blocking(write, False)  # set_wakeup_fd's requirement: a signal never blocks
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        signal.signal(signal.SIGINT, self._on_sigint)
        sys.unraisablehook = self._unraisable
        threading.Thread(target=self._watch, args=(read,), name="jaxgpt-interrupts",
                         daemon=True).start()
        _active = self
        return self

    def finish(self, code: int | str | None, said: bool) -> NoReturn:
        """Exit with `code` (as `sys.exit` takes it); with 130 and no teardown if a SIGINT was
        seen on the way, after the one line unless the command has `said` it."""
        if self.seen.is_set():
            self.exit(say=not said)
        sys.exit(code)

    def exit(self, say: bool = True, flush: bool = True) -> NoReturn:
        """End the process now with exit code 130, after what the command wrote (`flush`) and
        the one line (`say`), its `temporaries` removed; no interpreter teardown to race XLA's
        threads. Another thread calling it too (the watchdog and the main thread at once) waits
        for the first; the same thread again (a second Ctrl-C meanwhile) goes on at once."""
        if not self._exiting.acquire(blocking=False):
            while True:
                time.sleep(60)
        if flush:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):  # a closed pipe, a write in progress
                    stream.flush()
        for path in list(self.temporaries):
            with contextlib.suppress(OSError):
                path.unlink()
        if say and not self.said.is_set():
            with contextlib.suppress(OSError):
                os.write(self._stderr, f"{self.command}: interrupted\n".encode())
        os._exit(INTERRUPTED)

    def claim(self) -> None:
        """Called by the thread about to print the command's own line about a Ctrl-C: the end
        of the process is that thread's from here (the watchdog, if it is already ending it,
        is left to finish, and this thread waits; else the watchdog waits and adds no line)."""
        if not self._exiting.acquire(blocking=False):
            while True:
                time.sleep(60)
        self.said.set()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.seen.set()
        if not self._raising:
            self.exit()
        raise KeyboardInterrupt

    def _unraisable(self, unraisable: Any) -> None:
        # A KeyboardInterrupt where Python cannot raise it: the watchdog raises it again a
        # moment later (raised from here, it would land in this very hook).
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            self._redeliver.set()
            return
        self._previous_hook(unraisable)

    def _watch(self, wakeup: int) -> None:
        """The watchdog thread: after each SIGINT that the handler gets, end the process
        (inside `raising()`: give the main thread `GRACE_S` seconds to end it, raising a
        dropped KeyboardInterrupt again). Training takes SIGINT over, to stop after its step
        and save: a SIGINT then is its handler's."""
        while True:
            got = os.read(wakeup, 64)
            if signal.SIGINT not in got or signal.getsignal(signal.SIGINT) != self._on_sigint:
                continue
            # Inside `raising()`, the main thread's to end; outside, the main thread ends it at
            # its next bytecode (flushing stdout first): it is waited for a moment.
            deadline = time.monotonic() + (GRACE_S if self._raising else 0.1)
            while time.monotonic() < deadline:
                if self._redeliver.wait(0.05):
                    self._redeliver.clear()
                    time.sleep(0.01)  # for the main thread to leave the hook
                    # A real signal, so that it also cuts a sleep of the main thread short.
                    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            self.exit(flush=False)  # the main thread may hold stdout's lock


def claim_the_line() -> None:
    """Before a command prints its own line about a Ctrl-C (`Interrupts.claim`): no second
    line, and no race with the watchdog over who ends the process."""
    if _active is not None:
        _active.claim()


@contextlib.contextmanager
def raising() -> Iterator[None]:
    """Within the block, Ctrl-C raises KeyboardInterrupt, for the block to handle (print the
    text generated so far, say), as Python's default handler does; the command then has
    `GRACE_S` seconds to end. Outside the `jaxgpt` command (no `Interrupts` started) it
    changes nothing."""
    interrupts = _active
    if interrupts is None:
        yield
        return
    interrupts._raising += 1
    try:
        yield
    finally:
        interrupts._raising -= 1


@contextlib.contextmanager
def removed_if_interrupted(path: Path) -> Iterator[Path]:
    """Within the block, a Ctrl-C that ends the `jaxgpt` command removes the file `path` (a
    temporary being written) first."""
    interrupts = _active
    if interrupts is None:
        yield path
        return
    interrupts.temporaries.add(path)
    try:
        yield path
    finally:
        interrupts.temporaries.discard(path)
