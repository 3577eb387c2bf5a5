"""The activation store's memory for GPT-2 124M at layer 6, stated and measured.

    JAX_PLATFORMS=cpu python scripts/sae_store_memory.py [--hook blocks.6.hook_resid_pre]

On the CPU the device's memory is the process's: the resident set, sampled every 2 ms while a
store fills a buffer and serves batches from it, less what the process held just before (the
weights made, the store's programs compiled by a first store of the same shapes, whose buffer
is gone), is what the store costs; `store_memory` states it from the compiled program. The
process's own peak (`ru_maxrss`: the weights, XLA compiling) is printed too. sae-lens's
defaults: context 128, batches of 4096 tokens, 20 batches in a buffer, 32 windows per forward
pass, float32. Random weights (the sizes are what matter), random token ids.
docs/performance.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time

import jax
import numpy as np

from jaxgpt.config import GPT_CONFIG_124M, GPTConfig
from jaxgpt.nn.model import init_params
from jaxgpt.sae.store import ActivationStore
from jaxgpt.sae.train_config import SAETrainConfig

MB = 1 << 20


def peak_rss() -> int:
    """The process's peak resident set so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    """The process's resident set now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sampler(threading.Thread):
    """The largest resident set seen while running (sampled every 2 ms)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = rss(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hook", default="blocks.6.hook_resid_pre")
    p.add_argument("--batches", type=int, default=5, help="batches served (20 per buffer)")
    args = p.parse_args()
    cfg = GPTConfig(**GPT_CONFIG_124M)
    params = jax.block_until_ready(init_params(cfg, 0))
    tc = SAETrainConfig()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 3 * 20 * 4096, np.uint16)
    warm = ActivationStore(params, cfg, tokens, [args.hook], tc)
    jax.block_until_ready(warm.next_batch())  # compiles the store's programs
    del warm
    store = ActivationStore(params, cfg, tokens[::-1].copy(), [args.hook], tc)
    stated = store.memory()
    base = rss()
    sampler = Sampler()
    sampler.start()
    for _ in range(args.batches):
        jax.block_until_ready(store.next_batch())
    sampler.running = False
    sampler.join()
    out = {"hook": args.hook, "stated_MiB": {k: round(v / MB, 1) for k, v in stated.items()},
           "rss_before_MiB": round(base / MB, 1), "rss_peak_serving_MiB":
           round(sampler.peak / MB, 1), "store_measured_MiB": round((sampler.peak - base) / MB, 1),
           "process_peak_MiB": round(peak_rss() / MB, 1),
           "position": store.position.to_array().tolist()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
