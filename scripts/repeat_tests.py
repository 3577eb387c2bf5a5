"""Run a pytest selection N times in a row as a background job, optionally under a CPU load:
the check that a test passes however the suite is launched (issue 31).

    python scripts/repeat_tests.py -n 20 --load 3 -- tests/test_reliability.py -k ctrl_c

Each run is `python -m pytest -q -p no:xdist ARGS` started as `cmd &` by a non-interactive
bash, as a script or a CI runner starts a background job: it inherits SIGINT ignored (the script
checks that it does, once, before the first run). `--load L` keeps L busy loops
(`python -c "while 1: pass"`, which also end with this script) running through all the runs
and always stops them. The runs stop at the first failure, whose output is printed; one
summary line per run, then the total.
Exit code 0 when every run passed, 1 at a failure, 2 when the launch is not a background one.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A non-interactive bash runs `cmd &` with SIGINT and SIGQUIT ignored (no job control); `wait`
# hands back the job's exit status.
BACKGROUND = ["bash", "-c", '"$@" & wait $!', "bash"]
PROBE = "import signal; print(repr(signal.getsignal(signal.SIGINT)))"
IGNORED = repr(signal.SIG_IGN)


def background(argv: list[str], **kwargs: object) -> subprocess.Popen:
    """`argv` started as a background job of a non-interactive shell, in a session of its own
    (so that it can be stopped as a group)."""
    return subprocess.Popen([*BACKGROUND, *argv], cwd=ROOT, start_new_session=True,
                            **kwargs)  # type: ignore[call-overload]


def sigint_of_a_background_job() -> str:
    """SIGINT's disposition in a Python started as the runs are: `IGNORED` when it is."""
    proc = background([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    return out.strip()


# A busy loop that also ends when its parent does: were this script killed (SIGKILL skips its
# `finally`), the loops would otherwise spin on forever.
BUSY_LOOP = "import os, sys\nwhile os.getppid() == int(sys.argv[1]): pass"


def start_load(n: int) -> list[subprocess.Popen]:
    """`n` busy-loop processes (one core each)."""
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(os.getpid())])
            for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill each of `procs` (by its own id) and reap it."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def summary(output: str) -> str:
    """pytest's last line (`6 passed in 90.1s`), or the last line there is."""
    lines = [line for line in output.splitlines() if line.strip()]
    found = [line for line in lines if re.search(r"\d+ (passed|failed|error)", line)]
    return (found or lines or ["(no output)"])[-1].strip("= ")


def run_once(pytest_args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """One run of the selection as a background job: (exit code, its output)."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", *pytest_args]
    proc = background(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True)
    try:
        out, _ = proc.communicate()
    except BaseException:  # Ctrl-C of this script: the job ignores SIGINT, so end its group
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", "--runs", type=int, default=20, help="how many runs (default 20)")
    p.add_argument("--load", type=int, default=0, metavar="L",
                   help="busy-loop processes to keep running meanwhile (default 0)")
    p.add_argument("pytest_args", nargs="+", help="the selection, after `--`")
    args = p.parse_args()
    if args.runs < 1 or args.load < 0:
        p.error("--runs must be at least 1 and --load at least 0")

    seen = sigint_of_a_background_job()
    print(f"SIGINT in the background job: {seen}", flush=True)
    if seen != IGNORED:
        print(f"repeat_tests: the runs would not start with SIGINT ignored ({seen}), so they "
              f"would not test a background launch", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("CI", "true")

    loops = start_load(args.load)
    t0 = time.monotonic()
    try:
        for i in range(1, args.runs + 1):
            start = time.monotonic()
            code, out = run_once(args.pytest_args, env)
            load = os.getloadavg()[0]
            print(f"run {i}/{args.runs}: {summary(out)} (exit {code}, "
                  f"{time.monotonic() - start:.0f} s, load {load:.1f})", flush=True)
            if code != 0:
                print(out[-20000:])
                print(f"total: run {i} of {args.runs} failed (--load {args.load}, "
                      f"{time.monotonic() - t0:.0f} s)")
                return 1
    finally:
        stop(loops)
    print(f"total: {args.runs} of {args.runs} runs passed (--load {args.load}, "
          f"{time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
