"""Where a B=8 decoding step's time goes on the CPU: a cached decoding step
(`layout_lab.step_timer`: 124M cut to its first 6 blocks, every matrix as rows)
at 1 and 8 rows under each of XLA:CPU's matrix-product back ends, beside the machine's peak (a
2048^3 product).

    python scripts/bench_matmul_backends.py                  # fp32, 5 rounds
    python scripts/bench_matmul_backends.py --rows 8 --rounds 9

Each back end runs in its own process (XLA reads its flags once), alternately, round by
round; a figure is the best of the rounds with the median beside it. GFLOP/s counts
2 * rows * matrix weights per step (the blocks' and the head's); GB/s their bytes per step.
One row reads each weight once for 2 flops, so it is bound by bandwidth; 8 rows do 16 flops
per 4-byte weight, and where the 8-row step runs far below both the bandwidth and the peak,
the product's kernel is what bounds it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# XLA_FLAGS per back end of XLA:CPU's dot (jax 0.10: YNNPACK by default; the others are
# what XLA falls back to when its fusion types leave dots out).
BACKENDS = {
    "default": "",
    "xnnpack": "--xla_cpu_experimental_ynn_fusion_type=eltwise",
    "eigen": "--xla_cpu_experimental_ynn_fusion_type=eltwise --xla_cpu_use_xnnpack=false",
    "onednn": "--xla_cpu_experimental_ynn_fusion_type=eltwise --xla_cpu_use_onednn=true",
}


def child(rows: int, rounds: int) -> None:
    import jax
    import jax.numpy as jnp
    import layout_lab

    from jaxgpt.config import GPT_CONFIG_124M, GPTConfig

    cfg = GPTConfig(**GPT_CONFIG_124M)
    steps = layout_lab.step_timer(cfg, "float32", rows)
    out = {"rows_all": [steps(layout_lab.ALL_ROWS) for _ in range(rounds)]}
    a = jnp.ones((2048, 2048), jnp.float32)
    prod = jax.jit(lambda a: a @ a)
    jax.block_until_ready(prod(a))
    peak = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(prod(a))
        peak.append(2 * 2048**3 / (time.perf_counter() - t0) / 1e9)
    out["peak_gflops"] = max(peak)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args.child, args.rounds)
        return
    import layout_lab

    from jaxgpt.config import GPT_CONFIG_124M, GPTConfig

    cfg = GPTConfig(**GPT_CONFIG_124M)
    blocks = min(cfg.n_layers, layout_lab.STEP_LAYERS)
    weights = sum(i * o * (1 if n == "head" else blocks)
                  for n, (i, o, _) in layout_lab.matrix_shapes(cfg).items())
    samples: dict[tuple[str, int], list[float]] = {}
    peaks: dict[str, float] = {}
    for _ in range(2):  # two passes over the back ends, alternating
        for rows in args.rows:
            for name in args.backends:
                env = {**os.environ, "XLA_FLAGS": BACKENDS[name], "JAX_PLATFORMS": "cpu",
                       "PYTHONPATH": str(ROOT)}
                res = subprocess.run([sys.executable, __file__, "--child", str(rows),
                                      "--rounds", str(args.rounds)], env=env, check=True,
                                     capture_output=True, text=True)
                got = json.loads(res.stdout.strip().splitlines()[-1])
                samples.setdefault((name, rows), []).extend(got["rows_all"])
                peaks[name] = max(peaks.get(name, 0.0), got["peak_gflops"])
    print(f"{os.cpu_count()} CPUs; 124M's first {blocks} blocks and head, a cached decoding "
          f"step ({weights / 1e6:.1f}M matrix weights, every matrix as rows), fp32, best "
          f"(median) of {2 * args.rounds} rounds")
    print("| back end | rows | ms per step | GFLOP/s | GB/s of weights | 2048^3 peak GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for (name, rows), ts in samples.items():
        best = min(ts)
        print(f"| {name} | {rows} | {best * 1e3:.1f} ({statistics.median(ts) * 1e3:.1f}) | "
              f"{2 * rows * weights / best / 1e9:.1f} | {4 * weights / best / 1e9:.1f} | "
              f"{peaks[name]:.0f} |")


if __name__ == "__main__":
    main()
