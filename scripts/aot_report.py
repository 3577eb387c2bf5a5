"""What jaxgpt costs on an accelerator this machine does not have: compiled for the target
without the device (`jaxgpt.aot`), read off XLA's memory and cost analyses and the optimized HLO.

    JAX_PLATFORMS=cpu python scripts/aot_report.py --target h100 --json docs/aot_h100.json
    JAX_PLATFORMS=cpu python scripts/aot_report.py --target tpu-v5e --json docs/aot_tpu-v5e.json

For the 124M model in bfloat16 and float32, at B=1 and B=32 (a prompt of 8 tokens, 200 new
tokens: a cache of 264 slots), it compiles the whole generation (`aot.lower_generate`) and
one decoding step alone (`aot.lower_decode_step`), and reports:

- compile seconds; argument / output / alias / temp bytes (`memory_analysis`);
- flops and bytes accessed per decoding step (XLA's HloCostAnalysis of the step);
- weight bytes (all, and those a step reads: every matrix, one row of each embedding table);
- kernels per decoding step: launches in the loop's body and condition (fusions, library
  calls, other non-fused instructions), and how they split into a per-block part and a fixed
  part (the same loop compiled with 1 layer);
- copies or transposes of cache-sized arrays inside the loop, and other arrays larger than
  the cache written whole each step (e.g. weight matrices re-laid out), and apart from
  those, such arrays staged into on-chip memory (TPU: a weight copied into VMEM for a matmul);
- a bandwidth floor: bytes per step / the target's memory bandwidth (µs per step, per token);
- the trip count of the loop that holds the decoding step, where XLA knows it when compiling
  (`known_trip_count`: the steps of a chunk, run without the host reading the loop's condition
  back in between; "-" where unknown).

And the training step for 124M at T=1024, B=8 with the defaults for the target (the chunked
loss head and attention rematerialisation: `TrainConfig.loss_chunk`, `TrainConfig.remat`):
memory and flops, beside the same step without rematerialisation (`no_remat`) and with neither
(`plain_head`: all logits at once, nothing recomputed, as before either existed); and the
largest batch whose default step fits the device memory by `memory_analysis` (arguments +
outputs - aliased + temporaries).

Only structure, bytes, flops and memory are meaningful: without a device, kernel tiles are
not autotuned. The environment must allow the target (see `jaxgpt.aot`): JAX_PLATFORMS=cpu
is set here before JAX starts, so the GPU plugin registers without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp

from jaxgpt import aot
from jaxgpt.config import GPT_CONFIG_124M, GPTConfig
from jaxgpt.training.config import TrainConfig, resolve_loss_chunk, resolve_remat

PROMPT_LEN, NEW_TOKENS = 8, 200
TRAIN_B, TRAIN_T = 8, 1024
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _compile(lowered):
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def generation_report(cfg, dtype_name, batch, devices, info, with_blocks):
    dtype = DTYPES[dtype_name]
    sizes = dict(batch=batch, prompt_len=PROMPT_LEN, max_new_tokens=NEW_TOKENS, dtype=dtype)
    cache_total, layer_shape = aot.cache_bytes(cfg, **sizes)
    cache_elems = math.prod(layer_shape)

    compiled, gen_s = _compile(aot.lower_generate(cfg, devices=devices, **sizes))
    loop = aot.loop_stats(compiled.as_text(), cache_elems)
    gen_mem = aot.memory_stats(compiled)

    step_lowered = aot.lower_decode_step(cfg, devices=devices, **sizes)
    step_compiled, step_s = _compile(step_lowered)
    cost = aot.cost_stats(step_lowered, step_compiled)
    step_mem = aot.memory_stats(step_compiled)
    all_w, read_w = aot.weight_bytes(cfg, dtype)
    out = {
        "compile_s": round(gen_s, 1),
        **gen_mem,
        "cache_bytes": cache_total,
        "weight_bytes": read_w,
        "weight_bytes_all": all_w,
        "bytes_per_step": cost["bytes_accessed"],
        "flops_per_step": cost["flops"],
        "bytes_per_step_over_weight_bytes": round(cost["bytes_accessed"] / read_w, 3),
        "kernels_per_step": loop.kernels_per_step,
        "cache_copies_in_loop": len(loop.cache_copies),
        "cache_copies": loop.cache_copies,
        "large_writes_in_loop": len(loop.large_writes),
        "large_writes": loop.large_writes,
        "on_chip_writes_in_loop": len(loop.on_chip_writes),
        "async_copies_per_step": loop.async_copies_per_step,
        "loops": loop.loops,
        "decoding_loop_trip_count": loop.trip_count,
        "cost_source": cost["source"],
        "bytes_per_step_hlo_cost_analysis": cost["bytes_accessed_hlo"],
        "decode_step": {"compile_s": round(step_s, 1), **step_mem},
    }
    if info.bandwidth_bytes_per_s:
        us = cost["bytes_accessed"] / info.bandwidth_bytes_per_s * 1e6
        out["floor_us_per_step"] = round(us, 1)
        out["floor_us_per_token"] = round(us / batch, 2)
    if with_blocks and cfg.n_layers > 1:
        one = cfg.replace(n_layers=1)
        c1, _ = _compile(aot.lower_generate(one, devices=devices, **sizes))
        loop1 = aot.loop_stats(c1.as_text(), cache_elems)
        per_block = (loop.kernels_per_step - loop1.kernels_per_step) / (cfg.n_layers - 1)
        out["kernels_per_block"] = per_block
        out["kernels_fixed"] = loop1.kernels_per_step - per_block
        out["kernels_one_layer_loop"] = [f"{kind} {name.split('/body/')[-1]}"
                                         for kind, name in loop1.kernels]
    return out


def train_report(cfg, dtype_name, devices, info, find_max_batch):
    """The train step's memory and flops: the target's defaults (`loss_chunk` and `remat`
    resolved for its platform) at the top level, `no_remat` and `plain_head` beside them."""
    tc = TrainConfig(dtype=dtype_name)
    platform = aot.platform_of(devices)
    chunk, remat = resolve_loss_chunk(tc, platform), resolve_remat(tc.remat, platform)
    out = {"batch": TRAIN_B, "seq_len": TRAIN_T}

    def one(batch, settings):
        low = aot.lower_train_step(cfg, tc.replace(**settings), batch=batch, seq_len=TRAIN_T,
                                   devices=devices)
        compiled, secs = _compile(low)
        return compiled, low, secs

    def variant(**settings):
        compiled, low, secs = one(TRAIN_B, settings)
        return {**settings, "compile_s": round(secs, 1), **aot.memory_stats(compiled),
                "flops": aot.cost_stats(low, compiled)["flops"]}

    default = variant(loss_chunk=chunk, remat=remat)
    out.update(default)
    out["no_remat"] = variant(loss_chunk=chunk, remat="none")
    out["plain_head"] = variant(loss_chunk=0, remat="none")

    def saved(than, by):  # the fraction of `than`'s temporaries that `by` does without
        return round(1 - by["temp_bytes"] / than["temp_bytes"], 3)

    out["temp_bytes_saved_by_chunked_head"] = saved(out["plain_head"], out["no_remat"])
    out["temp_bytes_saved_by_remat"] = saved(out["no_remat"], default)
    out["temp_bytes_saved_vs_plain_head"] = saved(out["plain_head"], default)
    out["flops_added_by_remat"] = round(default["flops"] / out["no_remat"]["flops"] - 1, 3)
    if find_max_batch and info.memory_bytes:
        _log(f"  largest batch that fits {info.memory_bytes / 1e9:.1f} GB ...")
        out["max_batch"] = max_batch(one, dict(loss_chunk=chunk, remat=remat),
                                     default["peak_bytes"], info.memory_bytes)
        out["device_memory_bytes"] = info.memory_bytes
    return out


def max_batch(one, settings, peak_at_b, limit):
    """The largest batch whose step fits `limit` bytes: from a line through the peaks at B and
    2B, doubling until a batch does not fit, then bisecting, each candidate compiled (XLA
    schedules and rematerializes to fit the device's memory, so the peak is not linear in B,
    nor always monotonic: the result is the bisection's). 0 if B itself does not fit."""
    if peak_at_b > limit:
        return 0

    def peak(b):  # None where XLA refuses to compile the step (it cannot fit)
        try:
            return aot.memory_stats(one(b, settings)[0])["peak_bytes"]
        except Exception as e:
            _log(f"  batch {b}: does not compile ({str(e).splitlines()[0][:120]})")
            return None

    def fitting(b, p):
        if p is not None:
            _log(f"  batch {b}: peak {p / 1e9:.2f} GB ({'fits' if p <= limit else 'too big'})")
        return p is not None and p <= limit

    def fits(b):
        return fitting(b, peak(b))

    peak2 = peak(2 * TRAIN_B)
    if not fitting(2 * TRAIN_B, peak2):
        lo, hi = TRAIN_B, 2 * TRAIN_B  # B fits (the caller's step), 2B does not
    else:
        per_row = max((peak2 - peak_at_b) / TRAIN_B, 1.0)
        guess = max(2 * TRAIN_B + 1,
                    int((limit - (peak_at_b - per_row * TRAIN_B)) // per_row))
        lo, hi = 2 * TRAIN_B, guess
        while fits(hi):
            lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _fmt_bytes(n):
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def print_table(target, report):
    print(f"\n{target}: 124M, prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens")
    print("| config | compile s | bytes/step | weight bytes read | ratio | flops/step | "
          "kernels/step (per block + fixed) | cache copies in loop | larger arrays written "
          "per step (+ staged on chip) | temp | floor µs/token | known trip count |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in report["generate"].items():
        on_chip = r.get("on_chip_writes_in_loop", 0)
        staged = f" + {on_chip} on chip" if on_chip else ""
        blocks = (f" ({r['kernels_per_block']:g} x {report['n_layers']} + "
                  f"{r['kernels_fixed']:g})" if "kernels_per_block" in r else "")
        print(f"| {name} | {r['compile_s']} | {_fmt_bytes(r['bytes_per_step'])} | "
              f"{_fmt_bytes(r['weight_bytes'])} | {r['bytes_per_step_over_weight_bytes']} | "
              f"{r['flops_per_step'] / 1e6:,.0f} M | {r['kernels_per_step']}{blocks} | "
              f"{r['cache_copies_in_loop']} | {r['large_writes_in_loop']}{staged} | "
              f"{_fmt_bytes(r['temp_bytes'])} | "
              f"{r.get('floor_us_per_token', '-')} | "
              f"{r.get('decoding_loop_trip_count') or '-'} |")
    for dtype_name, t in report["train_step"].items():
        fit = f", largest batch that fits: {t['max_batch']}" if "max_batch" in t else ""
        if "no_remat" not in t:  # kept from a report written before remat was reported
            print(f"train step {dtype_name}: temp {_fmt_bytes(t['temp_bytes'])}{fit}")
            continue
        plain, no_remat = t["plain_head"], t["no_remat"]
        print(f"train step {dtype_name} B={t['batch']} T={t['seq_len']} (loss_chunk "
              f"{t['loss_chunk']}, remat {t['remat']}): temp {_fmt_bytes(t['temp_bytes'])}, "
              f"peak {_fmt_bytes(t['peak_bytes'])}, {t['flops'] / 1e12:.2f} TFLOP{fit}; "
              f"without remat {_fmt_bytes(no_remat['temp_bytes'])}, "
              f"{no_remat['flops'] / 1e12:.2f} TFLOP (remat: {t['temp_bytes_saved_by_remat']:.0%} "
              f"less temp, {t['flops_added_by_remat']:+.0%} flops); plain head, no remat "
              f"{_fmt_bytes(plain['temp_bytes'])} ({t['temp_bytes_saved_vs_plain_head']:.0%} "
              f"less with both)")


def write(args, report) -> None:
    """Write the JSON so far (after every section: a long run leaves its results behind).

    The issue's layout: per target and config, `generate.*` and `train_step.*` side by side.
    """
    if not args.json:
        return
    configs = {name: {"generate": gen, "train_step": report["train_step"].get(name.split("/")[1])}
               for name, gen in report["generate"].items()}
    for dtype_name, train in report["train_step"].items():  # run with --no-generate
        if not any(name.split("/")[1] == dtype_name for name in configs):
            configs[f"124M/{dtype_name}"] = {"generate": None, "train_step": train}
    meta = {k: v for k, v in report.items() if k not in ("generate", "train_step")}
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump({args.target: configs, "meta": meta}, f, indent=1)
    os.replace(tmp, args.json)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, choices=aot.TARGETS)
    p.add_argument("--json", metavar="FILE", help="write the report here as JSON")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bfloat16", "float32"])
    p.add_argument("--no-generate", action="store_true", help="only the training step")
    p.add_argument("--no-train", action="store_true",
                   help="skip the training step (keeping its figures from an existing --json)")
    p.add_argument("--max-batch-dtypes", nargs="*", choices=sorted(DTYPES), default=["bfloat16"],
                   help="search the largest training batch for these compute dtypes "
                        "(default bfloat16; each search compiles the step several times)")
    args = p.parse_args(argv)

    cfg = GPTConfig(**GPT_CONFIG_124M)
    kept_train = {}
    if args.no_train and args.json and os.path.exists(args.json):
        # Keep the training figures of an earlier run (they take the longest to compile).
        with open(args.json) as f:
            for name, c in json.load(f).get(args.target, {}).items():
                if c.get("train_step"):
                    kept_train[name.split("/")[1]] = c["train_step"]
    devices = aot.target_devices(args.target)
    info = aot.target_info(args.target)
    report = {"target": args.target, "device": devices[0].device_kind, "jax": jax.__version__,
              "n_layers": cfg.n_layers, "prompt_len": PROMPT_LEN, "max_new_tokens": NEW_TOKENS,
              "memory_bytes": info.memory_bytes,
              "bandwidth_bytes_per_s": info.bandwidth_bytes_per_s, "generate": {},
              "train_step": kept_train}
    for dtype_name in args.dtypes:
        for batch in [] if args.no_generate else args.batches:
            name = f"124M/{dtype_name}/B={batch}"
            _log(f"{args.target}: generation {name} ...")
            report["generate"][name] = generation_report(cfg, dtype_name, batch, devices, info,
                                                         with_blocks=batch == 1)
            write(args, report)
        if not args.no_train:
            _log(f"{args.target}: train step 124M/{dtype_name} ...")
            report["train_step"][dtype_name] = train_report(
                cfg, dtype_name, devices, info, dtype_name in args.max_batch_dtypes)
            write(args, report)
    print_table(args.target, report)
    write(args, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
