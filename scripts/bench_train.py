"""Issue-5 figures: tokens/s of jaxgpt's jitted train step next to the book's PyTorch step.

Both sides train the same model (the book's `GPTModel`, same config, same random weights
copied across) on the same batches with AdamW (lr 4e-4, weight decay 0.1 on weight matrices,
constant rate, no clipping: the book's `train_model_simple` step: zero_grad, forward,
cross-entropy, backward, step). The timed rounds alternate between the two sides, so a
machine shared with other work slows both alike; the figure is the median step time of each.

CPU (default): a model smaller than 124M, so the bench takes a minute:

    python scripts/bench_train.py                    # emb 256, 4 layers, 4 heads, T 128, B 8

GPU (when `jax.default_backend()` is gpu): 124M at T=1024 in bf16 compute (fp32 master
weights), reporting tokens/s and MFU with FLOPs/token = 6N + 12·L·C·T against 989 TFLOP/s
(H100 dense bf16), N = the parameters that take part in matmuls (all but the two embedding
tables). The PyTorch side is skipped there unless --torch-on-gpu is given and torch has CUDA.

    python scripts/bench_train.py --gpu [--batch-size 16] [--remat none|attention|block]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def _jax_step(cfg, tc, params):
    import jax

    from jaxgpt.training.step import dropout_key, init_train_state, make_train_step

    state = jax.device_put(init_train_state(cfg, tc, params))
    step = make_train_step(cfg, tc)
    key = dropout_key(tc)
    holder = {"state": state}

    def run(batch):
        holder["state"], metrics = step(holder["state"], batch, key)
        return metrics

    def sync(metrics):
        return float(metrics["loss"])

    return run, sync


def _torch_step(ref, tc, device="cpu"):
    import torch

    decay = [p for p in ref.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": tc.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=tc.lr,
        betas=(tc.b1, tc.b2),
        eps=tc.eps,
    )
    ref.train()

    def run(batch):
        inputs, targets = (
            torch.from_numpy(np.asarray(a, dtype=np.int64)).to(device) for a in batch
        )
        opt.zero_grad()
        logits = ref(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        return loss

    def sync(loss):
        return float(loss.item())

    return run, sync


def _time(run, sync, batches, steps):
    t0 = time.perf_counter()
    out = None
    for i in range(steps):
        out = run(batches[i % len(batches)])
    sync(out)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="124M, T=1024, bf16, MFU")
    p.add_argument("--emb-dim", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--drop-rate", type=float, default=0.1, help="the book's 0.1 by default")
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per side")
    p.add_argument("--remat", nargs="?", const="block", default=None,
                   choices=("none", "attention", "block"),
                   help="TrainConfig.remat (--remat alone: block; default: attention on GPU, "
                        "none on CPU)")
    p.add_argument("--torch-on-gpu", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for both sides (default: all cores); 1 is steadier on a "
        "machine shared with other work",
    )
    args = p.parse_args()
    if args.threads:
        # Must be set before jax is imported: XLA reads its flags once.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
            f"{'false' if args.threads == 1 else 'true'} "
            f"intra_op_parallelism_threads={args.threads}"
        ).strip()

    import jax
    import torch

    from jaxgpt.config import GPTConfig
    from jaxgpt.io.torch_state import from_torch_state_dict
    from jaxgpt.nn import count_params
    from jaxgpt.training.config import TrainConfig

    gpu = args.gpu
    if gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--gpu: jax sees no GPU (backend {jax.default_backend()})")
    emb, layers, heads = (768, 12, 12) if gpu else (256, 4, 4)
    emb, layers, heads = args.emb_dim or emb, args.n_layers or layers, args.n_heads or heads
    seq_len = args.seq_len or (1024 if gpu else 128)
    batch = args.batch_size or (16 if gpu else 8)
    cfg = GPTConfig(
        vocab_size=args.vocab_size,
        context_length=seq_len,
        emb_dim=emb,
        n_heads=heads,
        n_layers=layers,
        drop_rate=args.drop_rate,
        qkv_bias=False,
    )
    tc = TrainConfig(
        steps=10**6,
        batch_size=batch,
        seq_len=seq_len,
        lr=4e-4,
        min_lr=4e-4,
        weight_decay=0.1,
        grad_clip=None,
        dtype="bfloat16" if gpu else "float32",
        remat=args.remat,
    )
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(123)
    from llms_from_scratch.ch04 import GPTModel as TorchGPT

    ref = TorchGPT(cfg.to_dict())
    params = from_torch_state_dict(ref.state_dict(), cfg)
    n_params = count_params(params)
    n_matmul = n_params - cfg.vocab_size * emb - seq_len * emb
    rng = np.random.default_rng(0)
    batches = [
        (rng.integers(0, cfg.vocab_size, (batch, seq_len)).astype(np.int32),) * 1 for _ in range(4)
    ]
    batches = [(b[0], np.roll(b[0], -1, axis=1)) for b in batches]
    tokens = batch * seq_len
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{threads} CPU thread(s); config emb {emb}, {layers} layers, {heads} heads, "
        f"vocab {cfg.vocab_size}, T {seq_len}, B {batch}, drop {cfg.drop_rate}, "
        f"{n_params / 1e6:.1f}M params; compute {tc.dtype}; AdamW, fp32 master weights"
    )

    jax_run, jax_sync = _jax_step(cfg, tc, params)
    t0 = time.perf_counter()
    jax_sync(jax_run(batches[0]))
    print(f"jaxgpt first step (trace + compile + run): {time.perf_counter() - t0:.1f}s")
    sides = {"jaxgpt": (jax_run, jax_sync)}
    device = "cuda" if gpu else "cpu"
    if not gpu or (args.torch_on_gpu and torch.cuda.is_available()):
        sides["pytorch"] = _torch_step(ref.to(device), tc, device)
        _time(*sides["pytorch"], batches, 1)  # warm-up
    times = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (run, sync) in sides.items():
            times[name].append(_time(run, sync, batches, args.steps))
    rates = {}
    for name, ts in times.items():
        rates[name] = tokens / statistics.median(ts)
        print(
            f"{name:8s} {rates[name]:>12,.0f} tokens/s  "
            f"(median step {statistics.median(ts) * 1e3:.1f} ms "
            f"over {args.rounds} rounds of {args.steps} steps)"
        )
    if "pytorch" in rates:
        print(f"ratio jaxgpt / pytorch: {rates['jaxgpt'] / rates['pytorch']:.2f}x")
    flops_per_token = 6 * n_matmul + 12 * layers * emb * seq_len
    mfu = rates["jaxgpt"] * flops_per_token / (args.peak_tflops * 1e12)
    print(
        f"FLOPs/token 6N + 12LCT = {flops_per_token / 1e6:.1f}M (N = {n_matmul / 1e6:.1f}M "
        f"matmul params); jaxgpt MFU vs {args.peak_tflops:g} TFLOP/s: {100 * mfu:.2f}%"
    )


if __name__ == "__main__":
    main()
