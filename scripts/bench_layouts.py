"""What the CPU decoding layout rule rests on: each matrix of a model (124M by default)
multiplied by a few rows as `[in, out]` and as rows `[out, in]` (`layout_lab.measure`, the
two forms alternately), the per-matrix choice made from it, and that choice against every
matrix as rows (the package's rule, `Layout.for_batch`) and none, in the decoding program
(`layout_lab.confirm`: a cached step's time each).

    python scripts/bench_layouts.py                      # 1 and 8 rows, fp32, 9 rounds
    python scripts/bench_layouts.py --rows 8 --rounds 15 --dtype bfloat16

Each figure is the best of the rounds (noise only adds time) with the median beside it, and
the bytes of all the copies of that matrix over the best time. Nothing is written anywhere.
`--tiny` times a two-block toy model instead (seconds, a smoke test: `tests/test_layouts.py`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--tiny", action="store_true", help="a two-block toy model (a smoke test)")
    args = p.parse_args(argv)

    import jax.numpy as jnp
    import layout_lab

    from jaxgpt.config import GPT_CONFIG_124M, GPTConfig

    cfg = GPTConfig(**GPT_CONFIG_124M)
    if args.tiny:
        cfg = cfg.replace(vocab_size=256, context_length=64, emb_dim=32, n_heads=2, n_layers=2)
    itemsize = jnp.dtype(args.dtype).itemsize
    shapes = layout_lab.matrix_shapes(cfg)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{'tiny' if args.tiny else '124M'}, {args.dtype}, "
          f"best (median) of {args.rounds} rounds; rows win by more than "
          f"{layout_lab.MARGIN:.0%}")
    for rows in args.rows:
        timer = layout_lab.matmul_timer(cfg, args.dtype, rows)
        samples: dict[tuple[str, bool], list[float]] = {}

        def recording(name: str, as_rows: bool, timer=timer, samples=samples) -> float:
            t = timer(name, as_rows)
            samples.setdefault((name, as_rows), []).append(t)
            return t

        chosen = layout_lab.choose(layout_lab.measure(cfg, recording, args.rounds))
        held = [n for n in shapes if getattr(chosen, n)]
        print(f"\n{rows} row(s): chosen rows {', '.join(held) or 'none'}")
        print("| matrix | MB | [in, out] ms | rows ms | [in, out] GB/s | rows GB/s |")
        print("|---|---:|---:|---:|---:|---:|")
        total = [0.0, 0.0]
        for name, (d_in, d_out, copies) in shapes.items():
            mb = d_in * d_out * copies * itemsize / 1e6
            cells = []
            for i, form in enumerate((False, True)):
                ts = samples[name, form]
                total[i] += min(ts)
                cells.append(f"{min(ts) * 1e3:.2f} ({statistics.median(ts) * 1e3:.2f})")
            rates = [mb / 1e3 / min(samples[name, f]) for f in (False, True)]
            print(f"| {name} | {mb:.0f} | {cells[0]} | {cells[1]} | {rates[0]:.1f} | "
                  f"{rates[1]:.1f} |")
        print(f"| all | | {total[0] * 1e3:.2f} | {total[1] * 1e3:.2f} | | |")
        steps = layout_lab.step_timer(cfg, args.dtype, rows)
        step_samples: dict[str, list[float]] = {}
        labels = {lay: label for label, lay in layout_lab.candidates(chosen).items()}

        def step_recording(lay, steps=steps, step_samples=step_samples, labels=labels) -> float:
            t = steps(lay)
            step_samples.setdefault(labels[lay], []).append(t)
            return t

        final, _ = layout_lab.confirm(chosen, step_recording, args.rounds)
        print(f"\nconfirmed in the decoding program ({layout_lab.STEP_LAYERS} blocks): "
              f"{', '.join(n for n in shapes if getattr(final, n)) or 'none'} as rows")
        print("| candidate | ms per step, best (median) |")
        print("|---|---:|")
        for label, ts in step_samples.items():
            print(f"| {label} | {min(ts) * 1e3:.2f} ({statistics.median(ts) * 1e3:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
