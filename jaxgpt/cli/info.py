"""`jaxgpt info`: parameter count and size of a preset, with no weights allocated."""

from __future__ import annotations

import argparse
from typing import Any

from jaxgpt.config import PRESETS, GPTConfig


def add(sub: Any) -> None:
    p = sub.add_parser("info", help="parameter count and fp32 size of a preset (no weights "
                                    "allocated)")
    p.add_argument("--preset", choices=PRESETS, default="gpt2-small")
    p.add_argument("--tie-embeddings", action="store_true",
                   help="share the output head with tok_emb")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxgpt.nn.model import count_params, param_shapes, size_mb

    cfg = GPTConfig.from_preset(args.preset, tie_embeddings=args.tie_embeddings)
    shapes = param_shapes(cfg)  # jax.eval_shape: nothing is allocated
    print(f"preset: {args.preset}")
    for key, value in cfg.to_dict().items():
        print(f"{key}: {value}")
    print(f"parameters: {count_params(shapes):,}")
    print(f"size_fp32_mb: {size_mb(shapes):.2f}")
    return 0

