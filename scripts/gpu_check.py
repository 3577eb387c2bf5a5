"""jaxgpt on an NVIDIA GPU, in one unattended command: correctness, decoding and training speed.

    PYTHONPATH=. python3 scripts/gpu_check.py --out DIR            # on the GPU machine, < 8 min
    PYTHONPATH=. python3 scripts/gpu_check.py --cpu --tiny --out DIR  # here, on the CPU, seconds

It writes `DIR/gpu_check.json` and `DIR/gpu_check.md` after every measurement, so a run cut
short leaves what it had. Each section runs in its own try/except: an error is recorded in the
JSON (and the table) and the next section runs. Nothing is installed or downloaded; the
weights are random (GPT-2 124M shapes, or the tiny test config with `--tiny`).

Sections, in order (later ones are skipped, and say so, once `--budget-s` is spent):

- `environment`: GPU, driver, jax, jaxlib and plugin versions, CPU, Python.
- `correctness`: greedy tokens of the tiny config and of 124M fp32 on the device against the
  same program (same weights, same layout) on the CPU backend in this process, with the fp32
  top-2 logit margin where they differ; 124M bf16 logits against fp32 ones within the bound
  the bf16 tests use (`jaxgpt.nn.model.BF16_LOGITS_REL_ERROR`, 2% of the largest logit).
- `decoding`: 124M bf16 at B=1, 8 and 32 (prompt 8, 200 new tokens: the AOT report's sizes):
  ms per step, µs per token, tokens/s, and the fraction of the memory roofline (bytes a step
  reads, from XLA's cost analysis of one step on this device, over the bandwidth: the
  device's spec and a measured copy), beside the AOT report's floor for the same target;
  each with the cached steps in chunks (`Generator(chunk_steps=8)`) and one step per check
  (`chunk_steps=0`), timed alternately. A step's time is (t(200) - t(40)) / 160 with both
  counts in one compiled program, so prefill and dispatch drop out.
- `kernels`: kernels per decoding step as launched (a `jax.profiler` trace of two calls that
  differ by a known number of steps) against `aot.loop_stats`'s count for the same program.
- `training`: the 124M train step (bf16, T=1024) at the largest power-of-two batch whose
  compiled step fits the device's memory: tokens/s and MFU (model FLOPs 6N + 12LCT per token,
  and XLA's count, against the device's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

import numpy as np

# Dense bf16 peak FLOP/s by device kind (NVIDIA's data sheets), first match wins.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("B200", 2250e12))
# The compile-only target whose AOT report matches a device kind (`jaxgpt.aot.target_info`).
AOT_TARGET = (("H200", "h200"), ("GH200", "h200"), ("H100", "h100"), ("A100", "a100"))


class Run:
    """The report so far, the sizes of this run, and its time budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.sections: dict[str, Any] = {}
        self.json_path = os.path.join(args.out, "gpu_check.json")
        self.md_path = os.path.join(args.out, "gpu_check.md")

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        data = {"args": vars(self.args), "elapsed_s": round(time.perf_counter() - self.t0, 1),
                "sections": self.sections}
        for path, text in ((self.json_path, json.dumps(data, indent=1, default=str)),
                           (self.md_path, markdown(data))):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def section(run: Run, name: str, fn: Any, *a: Any, need_s: float = 0.0) -> None:
    """Run one section into `run.sections[name]`; its error, or a skip, is recorded instead."""
    if run.left() < need_s:
        run.sections[name] = {"skipped": f"{run.left():.0f} s of the budget left, "
                                         f"{need_s:.0f} s needed"}
        run.save()
        return
    log(f"{name} ({run.left():.0f} s left)")
    out: dict[str, Any] = {}
    run.sections[name] = out
    try:
        fn(run, out, *a)
    except Exception as e:  # recorded, and the next section runs
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc(limit=8)
        log(f"{name}: {out['error']}")
    run.save()


def versions() -> dict[str, str]:
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("jax", "flax", "optax", "orbax", "tiktoken", "torch",
                            "transformers", "nvidia-cu", "ml-dtypes", "numpy")):
            found[name] = dist.version
    return dict(sorted(found.items()))


def environment(run: Run, out: dict) -> None:
    import jax

    dev = jax.devices()[0]
    out.update(backend=jax.default_backend(), device_kind=dev.device_kind,
               devices=len(jax.devices()), jax=jax.__version__, python=sys.version.split()[0],
               cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
               packages=versions())
    try:
        with open("/proc/cpuinfo") as f:
            out["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                              if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    stats = getattr(dev, "memory_stats", lambda: None)()
    if stats:
        out["memory_bytes_limit"] = stats.get("bytes_limit")
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        out["nvidia_smi"] = f"not available: {e}"


# --- correctness -------------------------------------------------------------------------------


def _greedy(params: Any, cfg: Any, prompt: np.ndarray, n: int, layout: Any, device: Any) -> Any:
    """Greedy tokens of `Generator` with `layout`, every array on `device`."""
    import jax

    import jaxgpt

    with jax.default_device(device):
        p = jax.device_put(params, device)
        gen = jaxgpt.Generator(p, cfg, devices=[device], layout=layout)
        return np.asarray(gen.generate(prompt, n))


def _compare_tokens(cfg: Any, params: Any, prompt: np.ndarray, n: int, device: Any,
                    cpu: Any) -> dict:
    """The device's greedy tokens against the CPU backend's, with the device's layout."""
    import jax

    from jaxgpt.nn.layout import Layout
    from jaxgpt.nn.model import GPTModel

    layout = Layout.for_batch(len(prompt), jax.default_backend())
    t0 = time.perf_counter()
    on_device = _greedy(params, cfg, prompt, n, layout, device)
    on_cpu = _greedy(params, cfg, prompt, n, layout, cpu)
    res: dict[str, Any] = {"batch": len(prompt), "prompt": prompt.shape[1], "new": n,
                           "layout": layout._asdict(), "equal": bool((on_device == on_cpu).all()),
                           "seconds": round(time.perf_counter() - t0, 1)}
    if not res["equal"]:
        b, j = (int(i[0]) for i in np.nonzero(on_device != on_cpu))
        with jax.default_device(cpu):
            logits = GPTModel(cfg).apply({"params": jax.device_put(params, cpu)},
                                         on_cpu[b:b + 1, :j])[0, -1]
        top2 = np.sort(np.asarray(logits))[-2:]
        res.update(first_difference={"row": b, "slot": j},
                   fp32_top2_margin_there=float(top2[1] - top2[0]),
                   largest_logit=float(np.abs(np.asarray(logits)).max()))
    return res


def correctness(run: Run, out: dict, cfg: Any, tiny: Any) -> None:
    import jax
    import jax.numpy as jnp

    from jaxgpt.inference import Generator
    from jaxgpt.nn.model import BF16_LOGITS_REL_ERROR, GPTModel, init_params

    device, cpu = jax.devices()[0], jax.devices("cpu")[0]
    rng = np.random.default_rng(0)
    tiny_params = init_params(tiny, 1)
    out["tiny"] = _compare_tokens(tiny, tiny_params, rng.integers(0, tiny.vocab_size, (3, 5)),
                                  20, device, cpu)  # 5 + 20 passes context_length 16
    run.save()
    params = init_params(cfg, 0)
    if cfg != tiny:
        prompt = rng.integers(0, cfg.vocab_size, (2, 8))
        out["fp32"] = _compare_tokens(cfg, params, prompt, 24, device, cpu)
        if not out["fp32"]["equal"]:  # TF32 matmuls? compare at full fp32 precision as well
            with jax.default_matmul_precision("highest"):
                out["fp32_highest_precision"] = _compare_tokens(cfg, params, prompt, 24, device,
                                                                cpu)
        run.save()
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, min(32, cfg.context_length))))
    model, prepared = Generator(params, cfg, dtype=jnp.bfloat16).weights(2)
    bf16 = np.asarray(model.apply({"params": prepared}, tokens))
    with jax.default_device(cpu):
        want = np.asarray(GPTModel(cfg).apply({"params": jax.device_put(params, cpu)},
                                              jax.device_put(tokens, cpu)))
    bound = BF16_LOGITS_REL_ERROR * float(np.abs(want).max())
    err = float(np.abs(bf16 - want).max())
    out["bf16_logits"] = {"max_abs_error": err, "bound": bound, "within": err <= bound,
                          "tokens": list(tokens.shape), "layout": model.layout._asdict()}


# --- decoding ----------------------------------------------------------------------------------


def measured_bandwidth(device: Any, nbytes: int) -> dict:
    """Bytes/s of a jitted read-only sum and of a copy (read + write) over `nbytes`, median of
    7 each."""
    import jax
    import jax.numpy as jnp

    x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), device)
    total, copy = jax.jit(jnp.sum), jax.jit(lambda a: a + 1.0)
    out = {}
    for name, fn, moved in (("sum", total, nbytes), ("copy", copy, 2 * nbytes)):
        jax.block_until_ready(fn(x))
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x))
            times.append(time.perf_counter() - t0)
        out[name] = moved / float(np.median(times))
    return out


def _match(kind: str, table: tuple) -> Any:
    return next((v for key, v in table if key.lower() in kind.lower()), None)


def _step_times(gens: dict, prompt: np.ndarray, short: int, long: int,
                repeats: int) -> dict[Any, dict]:
    """Seconds per decoding step of each generator, `(best t(long) - best t(short)) / (long -
    short)`, the generators timed alternately in every repeat."""
    def call(gen: Any, n: int) -> float:
        t0 = time.perf_counter()
        np.asarray(gen.generate(prompt, n))
        return time.perf_counter() - t0

    first = {k: call(gen, long) for k, gen in gens.items()}  # compiles
    for gen in gens.values():
        call(gen, short)
    longs: dict[Any, list[float]] = {k: [] for k in gens}
    shorts: dict[Any, list[float]] = {k: [] for k in gens}
    for _ in range(repeats):
        for k, gen in gens.items():
            longs[k].append(call(gen, long))
            shorts[k].append(call(gen, short))
    n = long - short
    return {k: {"step_s": (min(longs[k]) - min(shorts[k])) / n,
                "step_s_each_repeat": [(a - b) / n for a, b in zip(longs[k], shorts[k],
                                                                    strict=True)],
                "first_call_s": round(first[k], 2)} for k in gens}


def _aot_floor(cfg: Any, batch: int, prompt_len: int, new: int, dtype: Any, device: Any,
               bandwidth: float | None) -> dict:
    """The AOT report's figures for one step of this program, compiled for this device."""
    from jaxgpt import aot

    lowered = aot.lower_decode_step(cfg, batch=batch, prompt_len=prompt_len,
                                    max_new_tokens=new, dtype=dtype, devices=[device])
    cost = aot.cost_stats(lowered, lowered.compile())
    out = {"bytes_per_step": cost["bytes_accessed"], "flops_per_step": cost["flops"],
           "cost_source": cost["source"]}
    if bandwidth and cost["bytes_accessed"]:
        out["floor_us_per_token"] = cost["bytes_accessed"] / bandwidth / batch * 1e6
    return out


def decoding(run: Run, out: dict, cfg: Any) -> None:
    import jax
    import jax.numpy as jnp

    from jaxgpt import aot
    from jaxgpt.inference import Generator
    from jaxgpt.nn.model import init_params

    a = run.args
    device = jax.devices()[0]
    target = _match(device.device_kind, AOT_TARGET)
    spec = aot.target_info(target).bandwidth_bytes_per_s if target else None
    probe = measured_bandwidth(device, a.probe_mb * 2**20)
    out.update(aot_target=target, spec_bandwidth=spec, measured_bandwidth=probe,
               weight_bytes_read_per_step=aot.weight_bytes(cfg, jnp.bfloat16)[1])
    bandwidth = spec or probe["copy"]
    params = init_params(cfg, 0)
    rng = np.random.default_rng(1)
    rows = out.setdefault("rows", [])
    for batch in a.batches:
        if run.left() < a.reserve_s:
            rows.append({"batch": batch, "skipped": "budget"})
            break
        prompt = rng.integers(0, cfg.vocab_size, (batch, a.prompt))
        row: dict[str, Any] = {"batch": batch}
        rows.append(row)
        try:  # reads XLA's cost analysis: the first thing a new jax may change
            row.update(_aot_floor(cfg, batch, a.prompt, a.new, jnp.bfloat16, device, bandwidth))
        except Exception as e:
            row["aot_error"] = f"{type(e).__name__}: {e}"
        gens = {k: Generator(params, cfg, dtype=jnp.bfloat16, chunk_steps=k) for k in a.chunks}
        for k, timed in _step_times(gens, prompt, a.short, a.new, a.repeats).items():
            step = timed["step_s"]
            row[f"chunk_{k}"] = timed
            timed.update(
                us_per_token=step / batch * 1e6, tokens_per_s=batch / step,
                roofline_fraction=(row["bytes_per_step"] / bandwidth / step
                                   if row.get("bytes_per_step") else None))
        del gens
        run.save()
    committed = os.path.join("docs", f"aot_{target}.json")
    if target and os.path.exists(committed):  # the report's own run, for the same sizes
        with open(committed) as f:
            report = json.load(f).get(target, {})
        for row in rows:
            gen = (report.get(f"124M/bfloat16/B={row['batch']}") or {}).get("generate") or {}
            if "floor_us_per_token" in gen:
                row["aot_report_floor_us_per_token"] = gen["floor_us_per_token"]


# --- kernels per step --------------------------------------------------------------------------


def launched(fn: Any, names: set[str]) -> dict[str, int]:
    """Events of a `jax.profiler` trace of `fn()`: GPU kernels (the device planes' stream lines,
    less memcpy and memset), and host events named as an instruction in `names` (XLA:CPU runs
    each as a thunk)."""
    import jax

    where = tempfile.mkdtemp(prefix="gpu_check_trace_")
    jax.profiler.start_trace(where)
    try:
        fn()
    finally:
        jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
    counts = {"gpu_kernels": 0, "cpu_thunks": 0}
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if plane.name.startswith("/device:GPU") and line.name.startswith("Stream"):
                    counts["gpu_kernels"] += not ev.name.startswith(("Memcpy", "Memset"))
                elif plane.name.startswith("/host") and ev.name in names:
                    counts["cpu_thunks"] += 1
    return counts


def kernels(run: Run, out: dict, cfg: Any) -> None:
    import math

    import jax
    import jax.numpy as jnp

    from jaxgpt import aot
    from jaxgpt.aot.hlo import parse_hlo
    from jaxgpt.inference import Generator
    from jaxgpt.nn.model import init_params

    a = run.args
    device = jax.devices()[0]
    params = init_params(cfg, 0)
    for batch in a.kernel_batches:
        prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, (batch, a.prompt))
        sizes = dict(batch=batch, prompt_len=a.prompt, max_new_tokens=a.new, dtype=jnp.bfloat16)
        _, layer = aot.cache_bytes(cfg, **sizes)
        for k in a.chunks:
            name = f"B={batch}/chunk_{k}"
            try:
                text = aot.lower_generate(cfg, devices=[device], chunk_steps=k,
                                          **sizes).compile().as_text()
                stats = aot.loop_stats(text, math.prod(layer))
                names = {i.name for insts in parse_hlo(text)[0].values() for i in insts
                         if i.opcode != "while"}
                gen = Generator(params, cfg, dtype=jnp.bfloat16, chunk_steps=k)
                np.asarray(gen.generate(prompt, a.new))  # compile and warm up
                short = launched(lambda gen=gen: np.asarray(gen.generate(prompt, a.short)),
                                 names)
                long = launched(lambda gen=gen: np.asarray(gen.generate(prompt, a.new)), names)
            except Exception as e:  # the next program may still work
                out[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            per_step = {key: (long[key] - short[key]) / (a.new - a.short) for key in long}
            out[name] = {
                "launched_per_step": per_step, "trace_counts": {"short": short, "long": long},
                "loop_stats_kernels_per_step": stats.kernels_per_step,
                "loop_stats_trip_count": stats.trip_count}
            run.save()


# --- training ----------------------------------------------------------------------------------


def _train_program(cfg: Any, batch: int, seq_len: int) -> tuple[Any, Any, Any, dict]:
    """`(compiled step, lowered, args, memory)` of the bf16 train step for `[batch, seq_len]`."""
    import jax
    import jax.numpy as jnp

    from jaxgpt.aot import memory_stats
    from jaxgpt.training.config import TrainConfig
    from jaxgpt.training.step import dropout_key, init_train_state, make_train_step

    tc = TrainConfig(dtype="bfloat16", batch_size=batch, seq_len=seq_len)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size,
                                                           (batch, seq_len + 1)), jnp.int32)
    args = (init_train_state(cfg, tc), (tokens[:, :-1], tokens[:, 1:]), dropout_key(tc))
    lowered = make_train_step(cfg, tc).lower(*args)  # type: ignore[attr-defined]
    compiled = lowered.compile()
    jax.block_until_ready(args)
    return compiled, lowered, args, memory_stats(compiled)


def _largest_batch(cfg: Any, seq_len: int, limit: int | None, cap: int, first: int,
                   left: Any) -> tuple:
    """The largest power-of-two batch <= cap whose step's peak fits `limit`: a guess from
    the peak at `first` rows (peak / rows per row: an upper bound, the state does not grow
    with B), down from it until one fits, then up while the next fits; no batch is tried
    once `left()` seconds would not hold two more compiles like the last."""
    tried: dict[int, int | str] = {}
    last = [0.0]

    def fits(b: int) -> tuple | None:
        if tried and left() < 2 * last[0]:
            tried[b] = "not tried: budget"
            return None
        t0 = time.perf_counter()
        try:
            prog = _train_program(cfg, b, seq_len)
        except Exception as e:  # XLA refuses a program that cannot fit
            tried[b] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return None
        finally:
            last[0] = time.perf_counter() - t0
        tried[b] = prog[3]["peak_bytes"]
        return prog if limit is None or prog[3]["peak_bytes"] <= limit else None

    best = fits(first)
    if best is None:
        return None, first, tried
    batch, guess, per_row = first, first, best[3]["peak_bytes"] / first
    while guess * 2 <= cap and (limit is None or guess * 2 * per_row <= 0.9 * limit):
        guess *= 2
    while guess > batch:
        prog = fits(guess)
        if prog is not None:
            best, batch = prog, guess
            break
        guess //= 2
    while batch * 2 <= cap and batch * 2 not in tried:
        prog = fits(batch * 2)
        if prog is None:
            break
        best, batch = prog, batch * 2
    return best, batch, tried


def training(run: Run, out: dict, cfg: Any) -> None:
    import jax

    from jaxgpt import aot
    from jaxgpt.nn.model import count_params, param_shapes

    a = run.args
    device = jax.devices()[0]
    stats = getattr(device, "memory_stats", lambda: None)() or {}
    limit = stats.get("bytes_limit")
    if limit is not None:
        limit -= stats.get("bytes_in_use", 0)
    t = min(a.train_seq, cfg.context_length)
    prog, batch, tried = _largest_batch(cfg, t, limit, a.max_train_batch, a.first_train_batch,
                                        run.left)
    out.update(seq_len=t, memory_limit=limit, peak_bytes_tried=tried, batch=batch)
    if prog is None:
        out["error"] = f"no batch fits (tried {tried})"
        return
    compiled, lowered, (state, batch_arrays, key), memory = prog
    out["memory"] = memory
    for _ in range(2):  # warm up (the state is donated: keep the new one)
        state, metrics = compiled(state, batch_arrays, key)
    float(metrics["loss"])
    t0 = time.perf_counter()
    for _ in range(a.train_steps):
        state, metrics = compiled(state, batch_arrays, key)
    out["loss"] = float(metrics["loss"])
    step_s = (time.perf_counter() - t0) / a.train_steps
    tokens = batch * t
    n_matmul = count_params(param_shapes(cfg)) - (cfg.vocab_size + cfg.context_length) * cfg.emb_dim
    model_flops = (6 * n_matmul + 12 * cfg.n_layers * cfg.emb_dim * t) * tokens
    try:
        xla_flops = aot.cost_stats(lowered, compiled)["flops"]
    except Exception as e:  # XLA's cost analysis: the first thing a new jax may change
        xla_flops, out["cost_error"] = None, f"{type(e).__name__}: {e}"
    peak = _match(device.device_kind, PEAK_BF16)
    out.update(step_s=step_s, tokens_per_s=tokens / step_s, model_flops_per_step=model_flops,
               xla_flops_per_step=xla_flops, peak_bf16_flops=peak,
               mfu=model_flops / step_s / peak if peak else None,
               xla_flops_utilisation=xla_flops / step_s / peak if peak and xla_flops else None)


# --- the report --------------------------------------------------------------------------------


def _f(x: Any, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt) if isinstance(x, (int, float)) else str(x)


def _markdown_decoding(d: dict, chunks: list[int]) -> list[str]:
    bw = d.get("spec_bandwidth")
    probe = d.get("measured_bandwidth") or {}
    lines = [f"Bandwidth: spec {_f(bw and bw / 1e9)} GB/s; measured sum "
             f"{_f(probe.get('sum') and probe['sum'] / 1e9)} GB/s, copy "
             f"{_f(probe.get('copy') and probe['copy'] / 1e9)} GB/s. AOT target "
             f"{d.get('aot_target')}.", "",
             "| B | steps per check | ms/step | µs/token | tokens/s | roofline | AOT floor "
             "µs/token (report) | bytes/step |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in d.get("rows", []):
        if "skipped" in row:
            lines.append(f"| {row['batch']} | skipped: {row['skipped']} |||||||")
            continue
        for k in chunks:
            r = row.get(f"chunk_{k}") or {}
            lines.append(
                f"| {row['batch']} | {k or 1} {'(chunk)' if k else '(no chunk)'} | "
                f"{_f(r.get('step_s') and r['step_s'] * 1e3)} | {_f(r.get('us_per_token'))} | "
                f"{_f(r.get('tokens_per_s'), '.1f')} | {_f(r.get('roofline_fraction'), '.0%')} | "
                f"{_f(row.get('floor_us_per_token'))} "
                f"({_f(row.get('aot_report_floor_us_per_token'))}) | "
                f"{_f(row.get('bytes_per_step') and row['bytes_per_step'] / 1e6, '.1f')} MB |")
    return lines


def markdown(data: dict) -> str:
    """The JSON's figures as Markdown tables."""
    s = data["sections"]
    chunks = data["args"].get("chunks", [])
    lines = ["# gpu_check", "", f"{data['elapsed_s']} s.", ""]
    env = s.get("environment", {})
    if env:
        lines += [f"- device: {env.get('device_kind')} x{env.get('devices')} "
                  f"({env.get('nvidia_smi', '-')}), backend {env.get('backend')}",
                  f"- jax {env.get('jax')}, Python {env.get('python')}, CPU {env.get('cpu')} "
                  f"x{env.get('cpu_count')}",
                  "- " + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()), ""]
    for name, body in s.items():
        if "skipped" in body or "error" in body:
            lines += [f"## {name}", "", f"{'skipped' if 'skipped' in body else 'error'}: "
                      f"{body.get('skipped') or body.get('error')}", ""]
    c = s.get("correctness", {})
    if any(k in c for k in ("tiny", "fp32", "bf16_logits")):
        lines += ["## correctness", "", "| check | result |", "|---|---|"]
        for key in ("tiny", "fp32", "fp32_highest_precision"):
            if key in c:
                r = c[key]
                margin = _f(r.get("fp32_top2_margin_there"))
                extra = "" if r["equal"] else (f" (first difference {r['first_difference']}, "
                                               f"fp32 top-2 margin {margin})")
                lines.append(f"| greedy tokens {key}, device = CPU | {r['equal']}{extra} |")
        if "bf16_logits" in c:
            r = c["bf16_logits"]
            lines.append(f"| bf16 logits max error {_f(r['max_abs_error'])} <= bound "
                         f"{_f(r['bound'])} | {r['within']} |")
        lines.append("")
    if s.get("decoding", {}).get("rows"):
        lines += ["## decoding (bf16)", ""] + _markdown_decoding(s["decoding"], chunks) + [""]
    k = {key: v for key, v in s.get("kernels", {}).items() if key.startswith("B=")}
    if k:
        lines += ["## kernels per decoding step", "", "| program | launched (trace) | "
                  "loop_stats | known trip count |", "|---|---:|---:|---:|"]
        for key, r in k.items():
            per = r["launched_per_step"]
            shown = per["gpu_kernels"] if per.get("gpu_kernels") else per.get("cpu_thunks")
            lines.append(f"| {key} | {_f(shown, '.1f')} | {r['loop_stats_kernels_per_step']} | "
                         f"{_f(r['loop_stats_trip_count'])} |")
        lines.append("")
    t = s.get("training", {})
    if "tokens_per_s" in t:
        lines += ["## training (bf16)", "", "| B | T | step s | tokens/s | MFU | XLA flops "
                  "utilisation | peak memory |", "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {t['batch']} | {t['seq_len']} | {_f(t['step_s'])} | "
                  f"{_f(t['tokens_per_s'], ',.0f')} | {_f(t['mfu'], '.1%')} | "
                  f"{_f(t['xla_flops_utilisation'], '.1%')} | "
                  f"{_f(t['memory']['peak_bytes'] / 1e9, '.2f')} GB |", ""]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.json and .md")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (JAX_PLATFORMS=cpu)")
    p.add_argument("--tiny", action="store_true",
                   help="the tiny test config instead of 124M, small sizes: a smoke test")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="seconds after which the remaining sections are skipped")
    args = p.parse_args(argv)
    big = dict(batches=[1, 8, 32], kernel_batches=[1, 8], prompt=8, new=200, short=40,
               repeats=3, probe_mb=2048, reserve_s=120.0, train_seq=1024, max_train_batch=512,
               first_train_batch=16, train_steps=5)
    small = dict(batches=[2], kernel_batches=[2], prompt=4, new=24, short=8, repeats=1,
                 probe_mb=8, reserve_s=0.0, train_seq=16, max_train_batch=2,
                 first_train_batch=2, train_steps=2)
    for key, value in (small if args.tiny else big).items():
        setattr(args, key, value)
    args.chunks = [8, 0]  # chunked (the default) and one step per check
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX starts
    os.makedirs(args.out, exist_ok=True)
    run = Run(args)
    from jaxgpt.config import GPT_CONFIG_124M, GPTConfig

    tiny = GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                     drop_rate=0.0, qkv_bias=True)
    cfg = tiny if args.tiny else GPTConfig(**GPT_CONFIG_124M)
    big = 0.0 if args.tiny else 1.0  # the budget a section needs at 124M, in minutes
    section(run, "environment", environment)
    section(run, "correctness", correctness, cfg, tiny, need_s=60 * big)
    section(run, "decoding", decoding, cfg, need_s=90 * big)
    section(run, "kernels", kernels, cfg, need_s=45 * big)
    section(run, "training", training, cfg, need_s=90 * big)
    log(f"done in {time.perf_counter() - run.t0:.0f} s: {run.md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
