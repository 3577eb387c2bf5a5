"""A/B of cached decoding: this tree against another checkout (e.g. main), alternately, in one run.

Each side runs in its own Python process (`PYTHONPATH` set to its tree) that compiles once and
then times on demand, so the two alternate round by round on the same machine state. Per
workload and round, a side times `Generator.generate` for N new tokens and for a count in the
same compiled bucket (N's bucket / 2 + 8). A step is (t(N) - t(short)) / (N - short): the
decoding steps alone, without the prefill or the call's overhead; "best" takes the least of
each count over the rounds (noise only adds time), and the per-round figures show the
spread. The process's CPU time per step (all its threads) is given beside the wall time: on a
machine shared with other work it moves less, since waiting for a core is not counted.
Weights: `init_params(124M, 0)`, fp32; prompts from `numpy.random.default_rng(0)`; both
sides' tokens are compared.

    python scripts/bench_decode.py --baseline /path/to/main          # before / after
    python scripts/bench_decode.py --baseline /path/to/main --old-layouts  # chunks alone

`--old-layouts` gives this tree the CPU layouts main chose by constant before issue 19 (B=1:
the 4D projection as rows; more rows: every matrix as rows) as `Generator(layout=...)`
(`layout_lab.parse_layout`), so that only the loop differs; without it this tree uses its
rule (`Layout.for_batch`). `--chunk-steps K`
passes `Generator(chunk_steps=K)` to this tree (0: one step per check). Wrap the run in
`flock /tmp/jaxgpt-bench.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {"B=1, prompt 4, 200 new": (1, 4, 200), "B=8, prompt 32, 128 new": (8, 32, 128)}
OLD_LAYOUTS = {1: "proj", 8: "all"}  # main's Layout.for_batch on the CPU, by rows


def child(batch: int, prompt_len: int, new: int, chunk_steps: int | None,
          layout: str | None) -> None:
    """Serve timing rounds on stdin ("run"), one JSON line each on stdout."""
    import jax
    import numpy as np

    import jaxgpt
    from jaxgpt.config import GPT_CONFIG_124M, GPTConfig

    cfg = GPTConfig(**GPT_CONFIG_124M)
    params = jaxgpt.init_params(cfg, 0)
    kw: dict = {} if chunk_steps is None else {"chunk_steps": chunk_steps}
    if layout is not None:  # this tree's side only (the lab imports this tree's jaxgpt)
        import layout_lab

        kw["layout"] = layout_lab.parse_layout(layout)
    gen = jaxgpt.Generator(params, cfg, **kw)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len))
    bucket = 1 << (new - 1).bit_length()
    short = bucket // 2 + 8

    def call(n: int) -> tuple[float, float, np.ndarray]:
        c0, t0 = time.process_time(), time.perf_counter()
        out = np.asarray(jax.block_until_ready(gen.generate(prompt, n)))
        return time.perf_counter() - t0, time.process_time() - c0, out

    *_, tokens = call(new)  # compile
    call(short)
    model, _ = gen.weights(batch)
    layout = [k for k, v in model.layout._asdict().items() if v and k != "fused_qkv"]
    digest = hashlib.sha256(tokens.tobytes()).hexdigest()[:12]
    print(json.dumps({"ready": True, "layout": layout, "tokens": digest}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t_long, c_long, _ = call(new)
        t_short, c_short, _ = call(short)
        print(json.dumps({"long_s": t_long, "short_s": t_short, "long_cpu_s": c_long,
                          "short_cpu_s": c_short, "steps": new - short,
                          "load": os.getloadavg()[0]}), flush=True)


def _start(tree: Path, workload: tuple[int, int, int], layout: str | None,
           chunk_steps: int | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child",
           ",".join(map(str, workload))]
    if chunk_steps is not None:
        cmd += ["--chunk-steps", str(chunk_steps)]
    if layout is not None:
        cmd += ["--child-layout", layout]
    return subprocess.Popen(cmd, cwd=tree, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _ask(proc: subprocess.Popen, line: str | None) -> dict:
    assert proc.stdin is not None and proc.stdout is not None
    if line is not None:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    reply = proc.stdout.readline()
    if not reply:
        raise SystemExit(f"a timing process ended early (exit {proc.wait()})")
    return json.loads(reply)


def compare(name: str, workload: tuple[int, int, int], args: argparse.Namespace) -> None:
    batch = workload[0]
    layout = OLD_LAYOUTS[batch] if args.old_layouts else None
    sides = {"baseline": _start(Path(args.baseline).resolve(), workload, None, None),
             "this tree": _start(ROOT, workload, layout, args.chunk_steps)}
    ready = {side: _ask(proc, None) for side, proc in sides.items()}  # sequential compiles
    replies: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side, proc in sides.items():
            replies[side].append(_ask(proc, "run"))
    for proc in sides.values():
        _ask_stop(proc)
    same = len({r["tokens"] for r in ready.values()}) == 1
    loads = [r["load"] for rs in replies.values() for r in rs]
    print(f"\n{name}: {args.rounds} alternating rounds, load average "
          f"{min(loads):.1f}-{max(loads):.1f}; tokens {'equal' if same else 'DIFFER'}")
    print("| side | layout (rows) | ms/step, best | ms/step per round: median (min-max) | "
          "tokens/s, best | CPU ms/step, best |")
    print("|---|---|---:|---:|---:|---:|")
    best, cpu = {}, {}
    for side, rs in replies.items():
        # The least disturbed of each count: noise only ever adds time.
        best[side] = (min(r["long_s"] for r in rs) - min(r["short_s"] for r in rs)) / rs[0]["steps"]
        cpu[side] = (min(r["long_cpu_s"] for r in rs)
                     - min(r["short_cpu_s"] for r in rs)) / rs[0]["steps"]
        each = [(r["long_s"] - r["short_s"]) / r["steps"] for r in rs]
        print(f"| {side} | {', '.join(ready[side]['layout']) or 'none'} | "
              f"{best[side] * 1e3:.2f} | {statistics.median(each) * 1e3:.2f} "
              f"({min(each) * 1e3:.2f}-{max(each) * 1e3:.2f}) | {batch / best[side]:.1f} | "
              f"{cpu[side] * 1e3:.2f} |")
    print(f"this tree / baseline, best step: {best['this tree'] / best['baseline']:.3f} "
          f"(CPU time: {cpu['this tree'] / cpu['baseline']:.3f})")


def _ask_stop(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.write("stop\n")
    proc.stdin.close()
    proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="the other checkout's root (its jaxgpt is imported)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--old-layouts", action="store_true",
                   help="this tree decodes with main's constant CPU layouts")
    p.add_argument("--chunk-steps", type=int, default=None,
                   help="Generator(chunk_steps=K) on this tree's side")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--child", metavar="B,P,N", help=argparse.SUPPRESS)
    p.add_argument("--child-layout", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        batch, prompt_len, new = map(int, args.child.split(","))
        child(batch, prompt_len, new, args.chunk_steps, args.child_layout)
        return 0
    if not args.baseline:
        p.error("--baseline is required")
    print(f"{os.cpu_count()} CPUs; baseline {args.baseline}, this tree {ROOT}")
    for name in args.workloads:
        compare(name, WORKLOADS[name], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
