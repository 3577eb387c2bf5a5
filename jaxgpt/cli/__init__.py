"""`jaxgpt` command line: the only package that parses arguments.

Each command is a module of this package with an `add(sub)` that declares its flags and a
`run(args)` that runs it. Results go to stdout, diagnostics to stderr.

The command owns its process, so it keeps native start-up noise off stderr: jax is imported
by `build_parser`, under `quiet_native_logs`, before any command module (`import jaxgpt`
alone loads no jax and touches no file descriptor; `jaxgpt.native_logs` says what the noise
is). Importing this package loads no jax either, so that the `jaxgpt` executable handles
Ctrl-C (`jaxgpt.cli.interrupts`) from its first second, while jax loads.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxgpt.cli.interrupts import INTERRUPTED, Interrupts, claim_the_line
from jaxgpt.native_logs import quiet_native_logs, start_backends, use_cpu_without_accelerators

__all__ = ["INTERRUPTED", "build_parser", "entry", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The `jaxgpt` parser with every command."""
    with quiet_native_logs():  # jax loads its CUDA plugin, which logs when it finds no GPU
        import jax  # noqa: F401

    from jaxgpt.cli import attention, convert, generate, info, lens, patch, sae, train

    parser = argparse.ArgumentParser(
        prog="jaxgpt", description="The GPT of 'Build a Large Language Model From Scratch' in "
        "JAX: generate, train, convert, look inside, patch.")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add(sub)
    attention.add(sub)
    patch.add(sub)
    lens.add(sub)
    info.add(sub)
    convert.add(sub)
    train.add(sub)
    sae.add(sub)
    return parser


# The exit code of a command whose reader of stdout has gone (`| head`): 128 + SIGPIPE, what a
# shell reports of `yes | head` (Python ignores SIGPIPE, so it is said, not died of); not 0, as
# the output was not all written, which `set -o pipefail` should see, as it does for Unix tools.
BROKEN_PIPE = 141


def _stdout_to_devnull() -> None:
    """Point stdout's file descriptor at /dev/null, so that the flush at exit of what it still
    buffers does not fail on a closed pipe again ("Exception ignored ... BrokenPipeError")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (stdout replaced in-process)
        pass
    finally:
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run the `jaxgpt` command `argv` (default: the process's arguments); its exit code.

    Ctrl-C outside what a command handles itself, and the OS's errors about files (a full
    disk, a read-only directory), end the command with one line on stderr, not a traceback;
    a closed stdout (`jaxgpt generate | head -c 5`) ends it quietly with BROKEN_PIPE.
    On a machine with no GPU or TPU, JAX runs on the CPU unless JAX_PLATFORMS says otherwise
    (`jaxgpt.native_logs`).
    """
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to print a resume command
    use_cpu_without_accelerators()
    try:
        if args.command != "train":  # train starts them once the processes have joined
            start_backends()
        return args.func(args)
    except KeyboardInterrupt:
        claim_the_line()
        print(f"jaxgpt {args.command}: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
    except BrokenPipeError:  # quiet, as Unix tools are
        _stdout_to_devnull()
        return BROKEN_PIPE
    except OSError as e:
        raise SystemExit(f"jaxgpt {args.command}: {e}") from e


def entry() -> None:
    """The `jaxgpt` executable: `main`, then exit with its code. Ctrl-C at any moment, from
    start-up to the teardown, ends it at once with exit code 130 and one line, without an
    interpreter teardown (`jaxgpt.cli.interrupts`); `generate` prints the text it made first.
    """
    argv = sys.argv[1:]
    name = " ".join(["jaxgpt", *argv[:1]]) if argv and not argv[0].startswith("-") else "jaxgpt"
    interrupts = Interrupts(name).start()
    try:
        code: int | str | None = main(argv)
    except SystemExit as e:  # a message, or argparse's exit
        code = e.code
    except BaseException:
        # A KeyboardInterrupt that `main` did not handle, or what one turned into (an
        # ImportError while jax loads): the interrupt, not a traceback.
        if interrupts.seen.is_set():
            interrupts.exit()
        raise
    interrupts.finish(code, said=code == INTERRUPTED)


if __name__ == "__main__":
    entry()
