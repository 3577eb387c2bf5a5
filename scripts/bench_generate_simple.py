"""Issue-2 figures: jaxgpt's `generate_text_simple` next to the book's reference, one run.

Same random weights on both sides (the reference `GPTModel` seeded with torch.manual_seed,
converted with `jaxgpt.io.torch_state.from_torch_state_dict`). Prints the max |logits difference|,
jaxgpt's first-call (trace + compile + run) time, steady-state tokens/s for both, and their
ratio. Usage: python scripts/bench_generate_simple.py [--new 50] [--prompt-len 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", type=int, default=50, help="new tokens per call")
    p.add_argument("--prompt-len", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (median)")
    p.add_argument("--seed", type=int, default=123)
    args = p.parse_args()

    import jax
    import torch
    from llms_from_scratch.ch04 import GPTModel as TorchGPT
    from llms_from_scratch.ch04 import generate_text_simple as torch_generate

    import jaxgpt
    from jaxgpt.io.torch_state import from_torch_state_dict

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = jaxgpt.GPTConfig(**jaxgpt.GPT_CONFIG_124M)
    torch.manual_seed(args.seed)
    ref = TorchGPT(jaxgpt.GPT_CONFIG_124M).eval()
    params = jax.device_put(from_torch_state_dict(ref.state_dict(), cfg))

    rng = np.random.default_rng(args.seed)
    probe = rng.integers(0, cfg.vocab_size, size=(2, 128))
    with torch.no_grad():
        want = ref(torch.from_numpy(probe)).numpy()
    got = np.asarray(jaxgpt.GPTModel(cfg).apply({"params": params}, probe))
    print(f"max |dlogits| 124M, [2, 128] tokens, fp32: {np.abs(got - want).max():.3e}")

    ids = rng.integers(0, cfg.vocab_size, size=(args.batch, args.prompt_len))
    t0 = time.perf_counter()
    out = jaxgpt.generate_text_simple(params, cfg, ids, args.new)
    out.block_until_ready()
    first = time.perf_counter() - t0

    def time_jax() -> float:
        t = time.perf_counter()
        jaxgpt.generate_text_simple(params, cfg, ids, args.new).block_until_ready()
        return time.perf_counter() - t

    def time_torch() -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        res = torch_generate(ref, torch.from_numpy(ids), args.new, cfg.context_length)
        return time.perf_counter() - t, res.numpy()

    jax_times, torch_times = [], []
    for _ in range(args.repeats):  # interleaved, so both sides see the same machine load
        jax_times.append(time_jax())
        seconds, ref_out = time_torch()
        torch_times.append(seconds)
    same = np.array_equal(np.asarray(out), ref_out)
    n = args.batch * args.new
    jax_tps, torch_tps = n / statistics.median(jax_times), n / statistics.median(torch_times)
    print(f"124M fp32, B={args.batch}, prompt {args.prompt_len}, {args.new} new tokens, "
          f"backend {jax.default_backend()}, median of {args.repeats}")
    print(f"  jaxgpt first call (trace + compile + run): {first:.2f} s")
    print(f"  jaxgpt steady state:   {jax_tps:8.2f} tokens/s")
    print(f"  reference (the book): {torch_tps:8.2f} tokens/s   (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print(f"  ratio jaxgpt/reference: {jax_tps / torch_tps:.2f}x; identical tokens: {same}")


if __name__ == "__main__":
    main()
