"""`jaxgpt lens`: the logit lens of a prompt, each layer's best guess at every position."""

from __future__ import annotations

import argparse
from typing import Any

from jaxgpt.cli.common import add_model_args, load_model, log, peek_config, prompt_tokens
from jaxgpt.cli.patch import add_layers_arg, check_png, layer_range


def add(sub: Any) -> None:
    p = sub.add_parser("lens", help="the logit lens: what each layer would predict")
    p.add_argument("--prompt", required=True, help="text whose positions to read")
    add_layers_arg(p, "draw only these rows (0-based over the layers' inputs and the final "
                      "output, STOP excluded, negative from the end as in Python; default all)")
    p.add_argument("--out", default="lens.png", help="PNG to write (default lens.png)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from jaxgpt.interp.cache import run_with_cache
    from jaxgpt.interp.plots import plot_logit_lens
    from jaxgpt.interp.residual import logit_lens
    from jaxgpt.tokenizer import get_tokenizer, token_strings

    out = check_png(args.out, "lens")
    tokenizer = get_tokenizer()
    cfg = peek_config(args)
    ids = prompt_tokens(args.prompt, cfg, "--prompt", "lens")
    rows = layer_range(args.layers, cfg.n_layers + 1, "lens")
    cfg, params, desc = load_model(args)
    log(f"jaxgpt: {desc}")
    names = [f"blocks.{i}.hook_resid_pre" for i in range(cfg.n_layers)]
    names.append(f"blocks.{cfg.n_layers - 1}.hook_resid_post")
    _, cache = run_with_cache(params, cfg, ids, names=names)
    logits, labels = logit_lens(cache)  # [L + 1, 1, T, V]
    probs = jax.nn.softmax(logits[:, 0], axis=-1)  # [L + 1, T, V]
    top = np.asarray(probs.argmax(-1))  # [L + 1, T]
    best = np.take_along_axis(np.asarray(probs), top[..., None], axis=-1)[..., 0]
    words = [token_strings(row, tokenizer) for row in top]
    from jaxgpt.cli.common import written_whole  # the picture whole or not at all

    with written_whole(out) as tmp:
        plot_logit_lens([words[r] for r in rows], best[rows.start:rows.stop],
                        [labels[r] for r in rows], token_strings(ids, tokenizer),
                        tmp, title=f"logit lens: {args.prompt!r}")
    path = out
    log(f"jaxgpt: wrote {path} ({len(rows)} rows x {len(ids)} positions)")
    return 0
