"""Where the time of a cached decoding step goes on the CPU, by part of the model.

XLA:CPU runs every instruction of the compiled program as a thunk, and `jax.profiler` records
each; each thunk's name is an instruction of the optimized HLO, whose `op_name` says which
part of `GPTModel` it computes. For each layout asked for, a `Generator` (124M fp32, random
weights) decodes N new tokens and a shorter count in the same compiled program under the
profiler; a part's time per step is (its time over N - its time over the short count) /
(N - short), so the prefill drops out. The layouts are profiled alternately, `--repeats`
times; the table gives the median per part and the range over the repeats, and for each
matrix the bytes it reads per step over its time (GB/s).

    python scripts/profile_decode.py --batch 8 --prompt 32 --new 128 --layouts none all rule
    python scripts/profile_decode.py --batch 1 --prompt 4 --new 200

A layout is "rule" (the package's, as `Generator` picks it: `Layout.for_batch`), "none"
(every matrix `[in, out]`), "all" (every matrix as rows), or matrices as rows ("qkv,proj"),
passed as `Generator(layout=...)` (`layout_lab.parse_layout`). Profiling adds a little time
to every thunk, so the total is above a plain run's; compare parts and layouts within one run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile
import time

# (op_name fragment, part), first match wins.
PARTS = (("W_qkv", "qkv"), ("out_proj", "out"), ("layers_0", "fc"), ("layers_2", "proj"),
         ("out_head", "head"), ("GELU", "gelu"), ("norm", "layer norms"),
         ("att/dynamic_update_slice", "cache write"), ("xqk", "attention"), ("xqd", "attention"),
         ("att/", "attention"), ("choose_next", "next token"), ("reduce", "next token"))


def part_of(op_name: str) -> str:
    return next((part for key, part in PARTS if key in op_name), "other")


def thunk_parts(text: str) -> dict[str, str]:
    """{instruction name: part} of an optimized HLO module; unlabelled dots are attention's
    (XLA:CPU drops the op_name of the batched score and context dots)."""
    from jaxgpt.aot import parse_hlo

    comps, _ = parse_hlo(text)
    out = {}
    for insts in comps.values():
        for i in insts:
            if i.opcode == "while":
                continue
            label = i.label()
            out[i.name] = part_of(label) if label else ("attention" if i.opcode == "dot"
                                                        else "other")
    return out


def profile(fn, parts: dict[str, str]) -> collections.Counter:
    """Seconds per part of the thunks `fn()` runs."""
    import jax

    where = tempfile.mkdtemp(prefix="profile_decode_")
    jax.profiler.start_trace(where)
    try:
        fn()
    finally:
        jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True))[-1]
    total: collections.Counter = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in parts:
                    total[parts[ev.name]] += ev.duration_ns * 1e-9
    return total


def setup(layout: str, args: argparse.Namespace, params, cfg, prompt):
    """A Generator for `layout`, warmed up, with its program's {thunk: part}."""
    import jax.numpy as jnp
    import layout_lab
    import numpy as np

    import jaxgpt
    from jaxgpt.inference import decode
    from jaxgpt.inference.sampling import sampling_config

    gen = jaxgpt.Generator(params, cfg, chunk_steps=args.chunk_steps,
                           layout=layout_lab.parse_layout(layout))
    model, weights = gen.weights(args.batch)
    shape = decode.program_shape(cfg, args.prompt, args.new)
    text = decode.generate_tokens.lower(
        weights, jnp.asarray(prompt, jnp.int32), jnp.zeros((args.batch,), jnp.int32),
        jnp.int32(args.new), decode.make_knobs(None, 0.0, None, None, True), model=model,
        new_slots=shape.new_slots, sampling=sampling_config(0.0, None, None), use_cache=True,
        chunk_steps=args.chunk_steps).compile().as_text()
    for n in (args.new, args.short):
        np.asarray(gen.generate(prompt, n))
    rows = [k for k, v in model.layout._asdict().items() if v and k != "fused_qkv"]
    return gen, thunk_parts(text), rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--layouts", nargs="+", default=["rule"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-steps", type=int, default=8)
    args = p.parse_args(argv)
    bucket = 1 << (args.new - 1).bit_length()
    args.short = max(1, bucket // 2 + 1) if args.new > 16 else 1

    import numpy as np
    from layout_lab import matrix_shapes

    import jaxgpt
    from jaxgpt.config import GPT_CONFIG_124M, GPTConfig

    cfg = GPTConfig(**GPT_CONFIG_124M)
    params = jaxgpt.init_params(cfg, 0)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt))
    runs = {layout: setup(layout, args, params, cfg, prompt) for layout in args.layouts}
    per_step: dict[str, list[collections.Counter]] = {layout: [] for layout in runs}
    walls: dict[str, list[float]] = {layout: [] for layout in runs}
    steps = args.new - args.short
    for _ in range(args.repeats):
        for layout, (gen, parts, _) in runs.items():
            t0 = time.perf_counter()
            long = profile(lambda gen=gen: np.asarray(gen.generate(prompt, args.new)), parts)
            short = profile(lambda gen=gen: np.asarray(gen.generate(prompt, args.short)), parts)
            walls[layout].append(time.perf_counter() - t0)
            per_step[layout].append(collections.Counter(
                {k: (long[k] - short[k]) / steps for k in long}))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; B={args.batch}, "
          f"prompt {args.prompt}, {args.new} new (steps {args.short}..{args.new} timed), "
          f"chunk_steps {args.chunk_steps}; ms per step, median (range) of {args.repeats}")
    report(runs, per_step, matrix_shapes(cfg))
    return 0


def report(runs: dict, per_step: dict, shapes: dict) -> None:
    names = sorted({k for counters in per_step.values() for c in counters for k in c},
                   key=lambda k: -statistics.median(c[k] for c in per_step[next(iter(runs))]))
    head = "| part | " + " | ".join(f"{lay} (rows: {', '.join(runs[lay][2]) or 'none'})"
                                     for lay in runs) + " |"
    print(head)
    print("|---|" + "---:|" * len(runs))
    for name in [*names, "total"]:
        cells = []
        for layout in runs:
            vals = [sum(c.values()) if name == "total" else c[name] for c in per_step[layout]]
            med = statistics.median(vals)
            cell = f"{med * 1e3:.2f} ({min(vals) * 1e3:.2f}-{max(vals) * 1e3:.2f})"
            if name in shapes and med > 0:
                d_in, d_out, copies = shapes[name]
                cell += f", {d_in * d_out * copies * 4 / med / 1e9:.1f} GB/s"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
