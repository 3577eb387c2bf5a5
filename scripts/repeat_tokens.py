"""Write a token file of random runs, each followed by itself: the data an induction head
learns from (a run's repeat is predictable only by looking back at its first copy).

    python scripts/repeat_tokens.py runs/repeat.u16 --runs 40000 --min-half 4 --max-half 16

Each run is n random ids in [0, vocab), n drawn from [min_half, max_half], then the same n
ids again (`--copies` times in all, each repeat after 0 to `--max-gap` other random ids); the
file is the runs back to back, raw uint16 (`jaxgpt train --token-file`).
Lengths vary so that the repeat's offset does: with one fixed length, a head can copy from a
fixed distance back without matching anything, which is not an induction head.
docs/research.md has the whole experiment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxgpt.interp.induction import repeated_runs
from jaxgpt.training.data import save_token_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the token file to write")
    p.add_argument("--runs", type=int, default=40000)
    p.add_argument("--min-half", type=int, default=4, help="shortest run before its repeat")
    p.add_argument("--max-half", type=int, default=16, help="longest run before its repeat")
    p.add_argument("--vocab", type=int, default=64, help="ids are drawn from [0, vocab)")
    p.add_argument("--copies", type=int, default=2, help="the run and its repeats")
    p.add_argument("--max-gap", type=int, default=0,
                   help="0 to this many random ids before each repeat")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        tokens = repeated_runs(args.runs, args.min_half, args.max_half, args.vocab,
                               seed=args.seed, copies=args.copies, max_gap=args.max_gap)
    except ValueError as e:
        p.error(str(e))
    path = save_token_file(tokens, args.out)
    print(f"wrote {path}: {args.runs} runs of {args.min_half}-{args.max_half} tokens, each "
          f"{args.copies} times, up to {args.max_gap} other ids before each repeat "
          f"({len(tokens):,} tokens from [0, {args.vocab}))")


if __name__ == "__main__":
    main()
