"""`jaxgpt convert`: a checkpoint from Hugging Face's format to orbax, or back."""

from __future__ import annotations

import argparse
from typing import Any

from jaxgpt.cli.common import (
    check_output_dir,
    checkpoint_format,
    log,
    read_checkpoint,
    run_checkpoints,
)
from jaxgpt.io.formats import FORMAT_NAMES


def add(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between Hugging Face and orbax")
    p.add_argument("src", metavar="SRC", help="a Hugging Face GPT-2 directory or orbax checkpoint")
    p.add_argument("dst", metavar="DST", help="the directory to write (must not exist)")
    p.add_argument("--to", choices=("hf", "orbax"), default=None,
                   help="format of DST (default: the other one than SRC's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is an existing jaxgpt or Hugging Face checkpoint "
                        "directory (or empty); a directory holding other files is refused")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxgpt.io import checkpoint, files, hf

    src_fmt = "orbax" if run_checkpoints(args.src) else checkpoint_format(args.src)
    to = args.to or ("orbax" if src_fmt == "hf" else "hf")
    dst = Path(args.dst)
    src, target = Path(args.src).resolve(), dst.resolve()
    if target == src:
        raise SystemExit("jaxgpt convert: SRC and DST are the same directory")
    if target in src.parents:
        raise SystemExit(f"jaxgpt convert: DST {dst} contains SRC {args.src}; choose a new "
                         f"directory for DST")
    if src in target.parents:
        raise SystemExit(f"jaxgpt convert: DST {dst} is inside SRC {args.src}; choose a "
                         f"directory outside it")
    if dst.exists() or dst.is_symlink():
        if not args.overwrite:
            raise SystemExit(f"jaxgpt convert: {dst} exists; pass --overwrite to replace it")
        try:  # before loading anything: only a checkpoint directory may be replaced
            files.check_replaceable(dst)
        except FileExistsError as e:
            raise SystemExit(f"jaxgpt convert: --overwrite refused: {e}") from e
    check_output_dir(args.dst, "DST", "convert")
    cfg, params, _ = read_checkpoint(args.src)
    try:
        if to == "hf":
            out = hf.save_pretrained(params, cfg, dst, overwrite=args.overwrite)
        else:
            out = checkpoint.save(dst, params, cfg, overwrite=args.overwrite)
    except checkpoint.CheckpointError as e:  # names DST itself; nothing is left there
        raise SystemExit(f"jaxgpt convert: {e}") from e
    except OSError as e:  # a full disk: nothing left at DST
        raise SystemExit(f"jaxgpt convert: cannot write {dst}: {e}") from e
    log(f"jaxgpt: {FORMAT_NAMES[src_fmt]} {args.src} -> {FORMAT_NAMES[to]} {out}")
    print(out)
    return 0

