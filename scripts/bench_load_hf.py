"""Issue-4 figures: a 124M Hugging Face GPT-2 directory through `load_pretrained`.

Builds a randomly initialised `transformers.GPT2LMHeadModel` (124M shape, every tensor random,
dropout off), saves it with `save_pretrained` to a temporary directory (nothing is downloaded),
then prints the wall time of `jaxgpt.io.hf.load_pretrained` (+ block_until_ready), the first
call cold, and the max |logits difference| against transformers in fp32.

Usage: python scripts/bench_load_hf.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import jax
    import torch
    import transformers

    from jaxgpt.io.hf import load_pretrained
    from jaxgpt.nn import GPTModel

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # transformers starts biases at 0 and LayerNorms at (1, 0)
        gen = torch.Generator().manual_seed(0)
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt2-124m"
        model.save_pretrained(path)
        size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            cfg, params = load_pretrained(path)
            jax.block_until_ready(params)
            times.append(time.perf_counter() - t0)
    print(f"load_pretrained, 124M safetensors directory ({size:.0f} MB), wall seconds; first "
          f"is cold: {', '.join(f'{t:.2f}' for t in times)}; median {np.median(times):.2f}")

    apply = jax.jit(lambda prm, x: GPTModel(cfg).apply({"params": prm}, x))
    for shape in [(4, 256), (1, 1024)]:
        ids = np.random.default_rng(1).integers(0, cfg.vocab_size, shape)
        with torch.no_grad():
            want = model(torch.from_numpy(ids)).logits.numpy()
        got = np.asarray(apply(params, ids.astype(np.int32)))
        print(f"ids {shape}: max |dlogits| vs transformers {np.abs(got - want).max():.2e} "
              f"(max |logit| {np.abs(want).max():.2f})")


if __name__ == "__main__":
    main()
