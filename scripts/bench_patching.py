"""Activation-patching sweeps: jaxgpt against TransformerLens 4.3, same weights, one run.

GPT-2 124M with random weights (a seeded Hugging Face `GPT2LMHeadModel`, converted to jaxgpt
with `from_hf_state_dict`; TransformerLens's `TransformerBridge` wraps the same model, offline,
with a word-level tokenizer: only token ids are passed). The metric is the logit difference
" Mary" - " John" at the last position; TransformerLens gets `logits[0, -1, mary] - ...` of
`[1, T, V]` logits, jaxgpt the same function of the same shape.

- `get_act_patch_resid_pre` on a 15-token pair (12 x 15 = 180 patches):
  "When Mary and John went to the shops, John gave a cold drink to" / "..., Mary gave ...".
- `get_act_patch_attn_head_out_by_pos` on an 8-token pair (12 x 8 x 12 = 1,152 patches):
  "When Mary and John went to the shops" / "When John and Mary went to the shops".

Each sweep runs `--repeats` times, TransformerLens and jaxgpt alternately (after one jaxgpt
call that compiles); the table gives the median, the range, the ratio of medians, jaxgpt's
compile time (its first call less a steady one), the largest difference between the two
results, and the activation memory of jaxgpt's compiled chunk program (XLA's temp bytes).

    python scripts/bench_patching.py               # several minutes on 2 cores
    python scripts/bench_patching.py --repeats 1 --skip-heads
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time

import numpy as np

CLEAN = "When Mary and John went to the shops, John gave a cold drink to"
CORRUPT = "When Mary and John went to the shops, Mary gave a cold drink to"
CLEAN8 = "When Mary and John went to the shops"
CORRUPT8 = "When John and Mary went to the shops"


def setup(seed: int):
    """`(cfg, params, bridge, tokenizer)`: random 124M weights on both sides."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge

    from jaxgpt.io.hf import from_hf_state_dict
    from jaxgpt.io.hf_config import hf_config_to_gpt
    from jaxgpt.tokenizer import get_tokenizer

    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    cfg = hf_config_to_gpt(hf.config.to_dict())
    params = from_hf_state_dict(hf.state_dict(), cfg)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, "t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tmp = tempfile.mkdtemp()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0")
    fast.save_pretrained(tmp)
    bridge = TransformerBridge.boot_transformers(
        "gpt2", hf_model=hf, tokenizer=transformers.AutoTokenizer.from_pretrained(tmp),
        device="cpu")
    return cfg, params, bridge, get_tokenizer()


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench(name, cfg, params, bridge, clean, corrupt, sweep, tl_sweep, metric, repeats):
    """One sweep on both sides: a row of the table."""
    import jax
    import torch

    from jaxgpt.interp import patching
    from jaxgpt.interp.cache import run_with_cache

    _, clean_cache = run_with_cache(params, cfg, clean)
    _, tl_cache = bridge.run_with_cache(torch.as_tensor(clean))
    run = lambda: np.asarray(jax.block_until_ready(  # noqa: E731
        sweep(params, cfg, corrupt, clean_cache, metric)))
    ours, first = _timed(run)
    tl_times, our_times = [], []
    for _ in range(repeats):
        with contextlib.redirect_stderr(io.StringIO()):  # TransformerLens's progress bar
            theirs, s = _timed(lambda: tl_sweep(bridge, torch.as_tensor(corrupt), tl_cache,
                                                metric).numpy())
        tl_times.append(s)
        ours, s = _timed(run)
        our_times.append(s)
    mem = chunk_memory(patching, params, cfg, corrupt, clean_cache, metric, sweep.kind)
    return dict(name=name, patches=int(np.prod(ours.shape)), tl=tl_times, ours=our_times,
                compile=first - statistics.median(our_times),
                diff=float(np.abs(ours - theirs).max()), spread=float(np.abs(theirs).max()),
                mem=mem)


def chunk_memory(patching, params, cfg, corrupt, clean_cache, metric, kind) -> float:
    """MB of activations XLA allocates for the sweep's (first) chunk program."""
    plan = patching.plan_sweep(params, cfg, corrupt, clean_cache, metric, kind)
    _, packing = patching.plan_chunk(plan, plan.chunks[0])
    program = patching.sweep_chunk.lower(params, plan.run, plan.clean, packing, model=plan.model,
                                         kind=plan.kind, reads=plan.reads, lead=plan.lead)
    return program.compile().memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-heads", action="store_true", help="only the 180-patch sweep")
    args = p.parse_args()
    import transformer_lens.patching as tlp

    from jaxgpt.interp import patching

    cfg, params, bridge, tok = setup(args.seed)
    mary, john = tok.encode(" Mary")[0], tok.encode(" John")[0]

    def metric(logits):  # the same function of [1, T, V] logits, torch or JAX
        return logits[0, -1, mary] - logits[0, -1, john]

    ids = lambda text: np.asarray([tok.encode(text)], np.int32)  # noqa: E731
    rows = [bench("resid_pre, 15 tokens", cfg, params, bridge, ids(CLEAN), ids(CORRUPT),
                  patching.get_act_patch_resid_pre, tlp.get_act_patch_resid_pre, metric,
                  args.repeats)]
    if not args.skip_heads:
        rows.append(bench("head out by pos, 8 tokens", cfg, params, bridge, ids(CLEAN8),
                          ids(CORRUPT8), patching.get_act_patch_attn_head_out_by_pos,
                          tlp.get_act_patch_attn_head_out_by_pos, metric, args.repeats))
    report(rows, args.repeats)


def report(rows, repeats) -> None:
    print(f"GPT-2 124M, random weights; median of {repeats} runs each side, alternating "
          f"(range in brackets)")
    print(f"{'sweep':26} {'patches':>7} {'TransformerLens s':>22} {'jaxgpt s':>20} "
          f"{'ratio':>6} {'compile s':>9} {'max |diff|':>10} {'chunk MB':>8}")
    for r in rows:
        tl, us = statistics.median(r["tl"]), statistics.median(r["ours"])
        print(f"{r['name']:26} {r['patches']:7d} {tl:8.2f} [{min(r['tl']):5.2f}-"
              f"{max(r['tl']):5.2f}] {us:6.3f} [{min(r['ours']):5.3f}-{max(r['ours']):5.3f}] "
              f"{tl / us:6.1f} {r['compile']:9.1f} {r['diff']:10.1e} {r['mem']:8.0f}")
    print("max |diff|: the largest difference between the two sweeps' results "
          f"(results up to {max(r['spread'] for r in rows):.2f} in size)")


if __name__ == "__main__":
    main()
