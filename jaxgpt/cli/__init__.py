"""`jaxgpt` command line: the only package that parses arguments.

Each command is a module of this package with an `add(sub)` that declares its flags and a
`run(args)` that runs it. Results go to stdout, diagnostics to stderr.
"""

from __future__ import annotations

import argparse
import sys

from jaxgpt.cli import attention, convert, generate, info, lens, patch, train


def build_parser() -> argparse.ArgumentParser:
    """The `jaxgpt` parser with every command."""
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `jaxgpt` command `argv` (default: the process's arguments); its exit code."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to print a resume command
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
