"""Generation speed of jaxgpt against its PyTorch peers, on the same random 124M weights.

One run times, for (B=1, prompt 4, 200 new) and (B=8, prompt 32, 128 new):

- `jaxgpt.generate` with the KV cache, and without it (`use_cache=False`);
- the book's `llms_from_scratch.ch04.generate_text_simple` (no cache);
- transformers' `GPT2LMHeadModel.generate(do_sample=False, use_cache=True)`, unable to stop
  early (no EOS, `min_new_tokens = max_new_tokens`).

Weights: the book's `ch04.GPTModel` seeded with `torch.manual_seed`, converted to jaxgpt with
`from_torch_state_dict` and to transformers with `to_hf_state_dict`. Greedy tokens of every
method are compared with jaxgpt's and the match is printed. Compile time (first call minus a
steady call) is reported apart from the steady state (best of `--repeats` calls). The roofline
is the weight bytes read per step (every matrix once; one row of each embedding per token)
over the memory read bandwidth measured here: the median of several jitted sums over 1 GiB
(a read-only stream, far past the caches), measured before and after the timings; the spread
of both is printed. Each workload prints the decoding layout `Generator` chose (the
package's fixed rule, `Layout.for_batch`; `--layout` gives another, as `Generator(layout=...)`:
none, all, or the matrices held as rows, e.g. qkv,proj).

    python scripts/bench_generate.py              # the full run (several minutes on 2 cores)
    python scripts/bench_generate.py --quick      # fewer tokens, a smoke test
    python scripts/bench_generate.py --dtype bfloat16 --skip-torch   # e.g. on a GPU

The two slow paths (the book's reference and jaxgpt without cache) can be timed on fewer new
tokens (`--slow-tokens`); the table says so when they are.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Result:
    workload: str
    method: str
    batch: int
    new_tokens: int  # tokens per row actually timed
    seconds: float  # steady-state wall time of one call
    compile_s: float | None = None
    match: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.new_tokens / self.seconds


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_bandwidth(gib: float = 1.0, repeats: int = 9) -> tuple[float, str]:
    """Memory read bandwidth (bytes/s): the median of `repeats` jitted sums over `gib` GiB of
    fp32, a read-only stream through XLA (as decoding streams its weights) over a buffer far
    larger than the last-level cache; the range of the runs is reported beside it."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        rates.append(x.nbytes / (time.perf_counter() - t0))
    median = float(np.median(rates))
    return median, (f"median of {repeats} jitted sums over {gib:g} GiB (range "
                    f"{min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f})")


def weight_bytes_per_step(cfg, bytes_per_param: int) -> int:
    """Bytes of weights one decoding step reads: all but the embedding tables (one row each)."""
    from jaxgpt.nn import count_params, param_shapes

    n = count_params(param_shapes(cfg))
    embeddings = (cfg.vocab_size + cfg.context_length) * cfg.emb_dim
    head = 0 if not cfg.tie_embeddings else cfg.vocab_size * cfg.emb_dim  # tied: read as head
    return (n - embeddings + head) * bytes_per_param


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="24 new tokens for B=1 and 16 for B=8, one repeat"
    )
    parser.add_argument("--new-b1", type=int, default=200, help="new tokens at B=1")
    parser.add_argument("--new-b8", type=int, default=128, help="new tokens at B=8")
    parser.add_argument(
        "--slow-tokens",
        type=int,
        default=None,
        help="time the book's reference and jaxgpt without cache on this many "
        "new tokens (default: as many as the others)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="steady-state calls (best is kept)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="jaxgpt compute dtype (bfloat16 for accelerators)",
    )
    parser.add_argument("--seed", type=int, default=123, help="torch.manual_seed of the weights")
    parser.add_argument(
        "--skip-torch", action="store_true", help="time jaxgpt only (no reference, no transformers)"
    )
    parser.add_argument("--skip-uncached", action="store_true", help="skip jaxgpt without cache")
    parser.add_argument(
        "--with-b32", action="store_true", help="add (B=32, prompt 32, 128 new), e.g. for a GPU run"
    )
    parser.add_argument(
        "--chart", default="docs/bench_generate.png", help="PNG to write ('' = none)"
    )
    parser.add_argument("--layout", default="rule",
                        help="the Generator's decoding layout: rule (the package's), none, all, "
                             "or matrices held as rows, e.g. qkv,proj")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_b1, args.new_b8, args.repeats = 24, 16, 1
        args.slow_tokens = args.slow_tokens or 8

    import jax
    import jax.numpy as jnp

    import jaxgpt
    from jaxgpt.config import GPT_CONFIG_124M, GPTConfig
    from jaxgpt.io.hf import to_hf_state_dict
    from jaxgpt.io.hf_config import gpt_config_to_hf
    from jaxgpt.io.torch_state import from_torch_state_dict

    cfg = GPTConfig(**GPT_CONFIG_124M)
    dtype = jnp.dtype(args.dtype)
    layout_kw = {}  # the rule: any tree's Generator, e.g. an A/B against an older checkout
    if args.layout != "rule":
        import layout_lab

        layout_kw["layout"] = layout_lab.parse_layout(args.layout)
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; jaxgpt dtype {args.dtype}"
    )

    import torch

    torch.manual_seed(args.seed)
    if not args.skip_torch:
        from llms_from_scratch import ch04

        reference = ch04.GPTModel(dict(GPT_CONFIG_124M)).eval()
        params = from_torch_state_dict(reference.state_dict(), cfg)
    else:
        params = jaxgpt.init_params(cfg, args.seed)
    if not args.skip_torch:
        import transformers

        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt_config_to_hf(cfg))).eval()
        hf.load_state_dict(
            {k: torch.from_numpy(v) for k, v in to_hf_state_dict(params, cfg).items()}
        )
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    bandwidth_before, how_before = measure_bandwidth()
    workloads = [("B=1, prompt 4", 1, 4, args.new_b1), ("B=8, prompt 32", 8, 32, args.new_b8)]
    if args.with_b32:
        workloads.append(("B=32, prompt 32", 32, 32, args.new_b8))
    results: list[Result] = []
    rng = np.random.default_rng(0)
    for name, batch, prompt_len, new in workloads:
        prompt = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
        label = f"{name}, {new} new"
        slow = min(new, args.slow_tokens or new)

        def run_jax(n: int, use_cache: bool) -> np.ndarray:
            out = jaxgpt.generate(params, cfg, prompt, n, use_cache=use_cache, dtype=dtype)
            return np.asarray(jax.block_until_ready(out))

        t0 = time.perf_counter()
        ours = run_jax(new, True)
        first = time.perf_counter() - t0
        steady = _best(lambda: run_jax(new, True), args.repeats)
        results.append(
            Result(label, "jaxgpt, KV cache", batch, new, steady, max(first - steady, 0.0))
        )
        print(f"  {_row(results[-1])}", flush=True)

        if hasattr(jaxgpt, "Generator"):  # weights prepared once, outside the timed calls
            gen = jaxgpt.Generator(params, cfg, dtype=dtype, **layout_kw)
            t0 = time.perf_counter()
            gen.weights(batch)
            prep = time.perf_counter() - t0

            def run_gen() -> np.ndarray:
                return np.asarray(jax.block_until_ready(gen.generate(prompt, new)))

            model, _ = gen.weights(batch)
            rows = [k for k, v in model.layout._asdict().items() if v and k != "fused_qkv"]
            print(f"  decoding layout at B={batch}: rows {', '.join(rows) or 'none'}", flush=True)
            out = run_gen()
            r = Result(label, "jaxgpt Generator, KV cache", batch, new,
                       _best(run_gen, args.repeats), match=_match(out, ours))
            r.notes.append(f"weights prepared once in {prep:.3f} s")
            results.append(r)
            print(f"  {_row(r)}  (prepared once: {prep:.3f} s; per generate() call: "
                  f"{results[-2].seconds - r.seconds:+.3f} s)", flush=True)

        if not args.skip_uncached:
            t0 = time.perf_counter()
            out = run_jax(slow, False)
            first = time.perf_counter() - t0
            steady = _best(lambda: run_jax(slow, False), max(1, args.repeats - 2))
            r = Result(
                label,
                "jaxgpt, no cache",
                batch,
                slow,
                steady,
                max(first - steady, 0.0),
                match=_match(out, ours[:, : prompt_len + slow]),
            )
            results.append(r)
            print(f"  {_row(results[-1])}", flush=True)

        if args.skip_torch:
            continue
        idx = torch.from_numpy(prompt.astype(np.int64))
        with torch.no_grad():
            t0 = time.perf_counter()
            out = ch04.generate_text_simple(reference, idx, slow, cfg.context_length).numpy()
            steady = time.perf_counter() - t0  # one call: it is slow and has nothing to compile
        results.append(
            Result(
                label,
                "the book's generate_text_simple",
                batch,
                slow,
                steady,
                match=_match(out, ours[:, : prompt_len + slow]),
            )
        )
        print(f"  {_row(results[-1])}", flush=True)

        mask = torch.ones_like(idx)

        def run_hf() -> np.ndarray:
            with torch.no_grad():
                return hf.generate(
                    idx,
                    attention_mask=mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    use_cache=True,
                ).numpy()

        t0 = time.perf_counter()
        out = run_hf()
        first = time.perf_counter() - t0
        steady = _best(run_hf, max(1, args.repeats - 1))  # slow: one call fewer
        results.append(
            Result(
                label,
                "transformers generate",
                batch,
                new,
                steady,
                max(first - steady, 0.0),
                match=_match(out, ours),
            )
        )
        print(f"  {_row(results[-1])}", flush=True)

    bandwidth_after, how_after = measure_bandwidth()
    bandwidth = float(np.median([bandwidth_before, bandwidth_after]))
    how = f"before the timings: {bandwidth_before / 1e9:.1f}, {how_before}; after: " \
          f"{bandwidth_after / 1e9:.1f}, {how_after}; load average {os.getloadavg()[0]:.2f}"
    bytes_per_step = weight_bytes_per_step(cfg, dtype.itemsize)
    _report(results, workloads, bandwidth, how, bytes_per_step, args)
    if args.chart:
        title = (
            f"GPT-2 124M greedy generation, jaxgpt {args.dtype}, "
            f"{jax.default_backend()} ({os.cpu_count()} CPUs)"
        )
        _chart(results, workloads, bandwidth, bytes_per_step, args.chart, title)
        print(f"chart: {args.chart}")
    return 0


def _match(out: np.ndarray, ours: np.ndarray) -> str:
    if out.shape != ours.shape:
        return f"shape {out.shape} vs {ours.shape}"
    same = int((out == ours).all(axis=1).sum())
    return f"{same}/{len(out)} rows equal jaxgpt's"


def _row(r: Result) -> str:
    comp = f"{r.compile_s:9.2f}" if r.compile_s is not None else f"{'-':>9}"
    return (
        f"{r.workload:<28} {r.method:<29} {r.new_tokens:>7} {r.tokens_per_s:8.1f} "
        f"{1e3 * r.seconds / r.new_tokens:8.1f} {comp}  {r.match or 'reference'}"
    )


def _report(results, workloads, bandwidth, how, bytes_per_step, args) -> None:
    print()
    print(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s ({how})")
    print(f"weights read per step {bytes_per_step / 1e6:.1f} MB ({args.dtype})")
    header = (
        f"{'workload':<28} {'method':<29} {'new/row':>7} {'tok/s':>8} {'ms/step':>8} "
        f"{'compile s':>9}  tokens"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        print(_row(r))
    print()
    for label, batch, _, new in workloads:
        rows = [r for r in results if r.workload.startswith(label)]
        ours = next((r for r in rows if r.method == "jaxgpt, KV cache"), None)
        if ours is None:
            continue
        roof = batch * bandwidth / bytes_per_step
        parts = [
            f"{r.method} {ours.tokens_per_s / r.tokens_per_s:.1f}x" for r in rows if r is not ours
        ]
        print(
            f"{label}, {new} new: jaxgpt cached {ours.tokens_per_s:.1f} tok/s = "
            f"{', '.join(parts) or '-'}; roofline {roof:.1f} tok/s, jaxgpt at "
            f"{100 * ours.tokens_per_s / roof:.0f}%"
        )
    if any(
        r.new_tokens < n
        for r in results
        for (lbl, _, _, n) in workloads
        if r.workload.startswith(lbl)
    ):
        print(
            "note: rows with fewer new tokens per row were timed on that many (--slow-tokens); "
            "no-cache paths get slower per token as the sequence grows"
        )


def _chart(results, workloads, bandwidth, bytes_per_step, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.method for r in results))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs, ys = [], []
        for j, (label, *_rest) in enumerate(workloads):
            r = next(
                (r for r in results if r.method == method and r.workload.startswith(label)), None
            )
            if r is not None:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(r.tokens_per_s)
        bars = ax.bar(xs, ys, width, label=method)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    for j, (_, batch, _, _) in enumerate(workloads):
        roof = batch * bandwidth / bytes_per_step
        ax.hlines(
            roof,
            j - 0.45,
            j + 0.45,
            colors="k",
            linestyles="--",
            label="memory roofline" if j == 0 else None,
        )
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([f"{label}, {new} new" for label, _, _, new in workloads])
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (log)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
