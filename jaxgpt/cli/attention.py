"""`jaxgpt attention`: a heatmap of one layer's attention weights for a prompt."""

from __future__ import annotations

import argparse
from typing import Any

from jaxgpt.cli.common import (
    IMAGE_SUFFIXES,
    add_model_args,
    check_output_file,
    load_model,
    log,
    peek_config,
    prompt_tokens,
)


def add(sub: Any) -> None:
    p = sub.add_parser("attention", help="draw one layer's attention weights for a prompt")
    p.add_argument("--prompt", default="Every effort moves you", help="text whose tokens to show")
    p.add_argument("--layer", type=int, default=0, help="layer index, 0-based (default 0)")
    p.add_argument("--head", type=int, default=None,
                   help="head index, 0-based (default: every head, as a grid)")
    p.add_argument("--out", default="attention.png",
                   help=f"picture to write, its format from the suffix "
                        f"({', '.join(IMAGE_SUFFIXES)}; default attention.png)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxgpt.interp.cache import attention_weights
    from jaxgpt.interp.plots import plot_attention
    from jaxgpt.tokenizer import token_strings

    out = check_output_file(args.out, "--out", "attention", IMAGE_SUFFIXES)
    idx = prompt_tokens(args.prompt, peek_config(args), "--prompt", "attention")[None]  # [1, T]
    cfg, params, desc = load_model(args)
    checks = [("--layer", args.layer, cfg.n_layers, "layers")]
    if args.head is not None:
        checks.append(("--head", args.head, cfg.n_heads, "heads"))
    for flag, value, count, what in checks:
        if not 0 <= value < count:
            raise SystemExit(f"jaxgpt attention: {flag} must be in [0, {count - 1}] (the model "
                             f"has {count} {what}), got {value}")
    log(f"jaxgpt: {desc}")
    weights = attention_weights(params, cfg, idx)[args.layer][0]  # [H, T, T]
    tokens = token_strings(idx[0])
    from jaxgpt.cli.common import written_whole  # the picture whole or not at all

    with written_whole(out) as tmp:
        plot_attention(weights, tokens, tmp, layer=args.layer, head=args.head)
    path = out
    log(f"jaxgpt: wrote {path} (layer {args.layer}, "
         f"{'head ' + str(args.head) if args.head is not None else f'{cfg.n_heads} heads'}, "
         f"{len(tokens)} tokens)")
    return 0

