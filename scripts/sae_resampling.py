"""Does resampling dead features help? The same SAE trained with and without it.

    python scripts/sae_resampling.py [--checkpoint DIR] [--steps 1500] [--arch standard]

Trains an SAE on `--hook` of a model (default: `jaxgpt train`'s small demo config with random
weights, or `--checkpoint`) over the demo corpus (Python's help topics), with
`SAETrainConfig.resample_dead` off and on, everything else equal (sae-lens's defaults but for
the windows, scaled down to the run: dead after `--dead-window` steps without firing, resampled
every `--sampling-window`; inputs scaled to mean norm sqrt(d_in)), and prints the mean over
the last tenth of the run of MSE, L0, explained variance and dead fraction for each.
docs/sae.md has the figures.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from jaxgpt.sae.model import SAEConfig
from jaxgpt.sae.train_config import SAETrainConfig
from jaxgpt.sae.training import train_saes
from jaxgpt.training.config import DEMO_CONFIG
from jaxgpt.training.data import demo_corpus, tokenize_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a jaxgpt or Hugging Face checkpoint (default: the "
                                        "demo config, random weights)")
    p.add_argument("--hook", default="blocks.2.hook_resid_pre")
    p.add_argument("--arch", default="standard", choices=("standard", "topk"))
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--l1", type=float, default=5.0, help="standard: l1_coefficient")
    p.add_argument("--k", type=int, default=16, help="topk: k")
    p.add_argument("--kaiming", action="store_true",
                   help="decoder rows as torch initialises them (decoder_init_norm None), not "
                        "sae-lens's 0.1: the setting Anthropic resampled in")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dead-window", type=int, default=100)
    p.add_argument("--sampling-window", type=int, default=250)
    args = p.parse_args()

    if args.checkpoint:
        from jaxgpt.cli.common import read_checkpoint

        cfg, params, _ = read_checkpoint(args.checkpoint)
    else:
        from jaxgpt.nn.model import init_params

        cfg = DEMO_CONFIG.replace(drop_rate=0.0)
        params = init_params(cfg, 0)
    tokens = tokenize_text(demo_corpus())
    from jaxgpt.sae.store import hook_widths

    d_in = hook_widths(cfg, [args.hook])[args.hook]
    # Inputs scaled to mean norm sqrt(d_in), so the L1 coefficient means what it does in
    # sae-lens's runs that normalise.
    common = {"hook_name": args.hook, "normalize_activations": "expected_average_only_in",
              "decoder_init_norm": None if args.kaiming else 0.1}
    sae = (SAEConfig("standard", d_in, args.expansion * d_in, l1_coefficient=args.l1, **common)
           if args.arch == "standard" else
           SAEConfig("topk", d_in, args.expansion * d_in, k=args.k,
                     rescale_acts_by_decoder_norm=True, **common))
    tc = SAETrainConfig(training_tokens=args.steps * args.batch,
                        train_batch_size_tokens=args.batch,
                        context_size=min(128, cfg.context_length),
                        dead_feature_window=args.dead_window,
                        feature_sampling_window=args.sampling_window, log_every=10, lr=args.lr,
                        n_batches_for_norm_estimate=100)
    results = {}
    for resample in (False, True):
        logged: list[dict] = []
        train_saes(params, cfg, tokens, [sae], tc.replace(resample_dead=resample),
                   on_log=logged.extend)
        tail = logged[-max(1, len(logged) // 10):]
        results["on" if resample else "off"] = {
            k: float(np.mean([r[k] for r in tail]))
            for k in ("mse_loss", "l0", "explained_variance", "dead_fraction")}
        results["on" if resample else "off"]["resampled"] = sum(
            r.get("resampled", 0) for r in logged)
    print(json.dumps({"hook": args.hook, "arch": args.arch, "d_sae": sae.d_sae,
                      "decoder_init_norm": sae.decoder_init_norm, "lr": args.lr,
                      "steps": args.steps, "batch": args.batch, "results": results}))
    print(f"{'resampling':>10} {'MSE':>9} {'L0':>7} {'expl. var.':>10} {'dead':>7} "
          f"{'resampled':>9}")
    for name, r in results.items():
        print(f"{name:>10} {r['mse_loss']:9.4g} {r['l0']:7.1f} {r['explained_variance']:10.4f} "
              f"{r['dead_fraction']:7.2%} {r['resampled']:9d}")


if __name__ == "__main__":
    main()
