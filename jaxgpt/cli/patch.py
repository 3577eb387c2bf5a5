"""`jaxgpt patch`: an activation-patching heatmap for a clean and a corrupted prompt."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from jaxgpt.cli.common import add_model_args, load_model, log, peek_config, prompt_tokens

# --kind -> (the sweep's kind in `interp.patching.KINDS`, what the columns are)
KINDS = {"resid_pre": ("resid_pre", "position"), "attn_out": ("attn_out", "position"),
         "mlp_out": ("mlp_out", "position"), "heads": ("z_all_pos", "head")}


def add(sub: Any) -> None:
    p = sub.add_parser("patch", help="activation patching: which activations carry the answer")
    p.add_argument("--clean", required=True, help="the prompt the model gets right")
    p.add_argument("--corrupt", required=True,
                   help="the same prompt with the key detail changed (same number of tokens)")
    p.add_argument("--answer", required=True,
                   help="the clean prompt's next token, one token (mind its leading space)")
    p.add_argument("--wrong", required=True, help="the corrupted prompt's, one token")
    p.add_argument("--kind", choices=KINDS, default="resid_pre",
                   help="what to patch: the residual stream, attention or MLP output at each "
                        "layer and position, or each head's output (default resid_pre)")
    p.add_argument("--layers", metavar="FIRST:STOP", default=None,
                   help="draw only these layers (0-based, STOP excluded; default all)")
    p.add_argument("--normalize", action="store_true",
                   help="draw (patched - corrupted) / (clean - corrupted), 0 to 1, instead of "
                        "the logit difference")
    p.add_argument("--out", default="patch.png", help="PNG to write (default patch.png)")
    add_model_args(p)
    p.set_defaults(func=run)


def check_png(path: str, command: str) -> Path:
    """The PNG to write: its folder must exist and it must not be a folder."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise SystemExit(f"jaxgpt {command}: --out {path} must end in .png")
    if out.is_dir():
        raise SystemExit(f"jaxgpt {command}: --out {path} is a directory; give a file name")
    if not out.parent.is_dir():
        raise SystemExit(f"jaxgpt {command}: --out {path}: no directory {out.parent}")
    return out


def layer_range(spec: str | None, count: int, command: str) -> range:
    """`FIRST:STOP` (either may be left out) as a range within `count` rows."""
    if spec is None:
        return range(count)
    try:
        first, stop = (int(v) if v else None for v in spec.split(":"))
    except ValueError:
        raise SystemExit(f"jaxgpt {command}: --layers must be FIRST:STOP, e.g. 0:6, got "
                         f"{spec!r}") from None
    first = 0 if first is None else first
    stop = count if stop is None else stop
    if not 0 <= first < stop <= count:
        raise SystemExit(f"jaxgpt {command}: --layers {spec} is out of range: the model has "
                         f"{count} rows to draw, 0:{count}")
    return range(first, stop)


def one_token(text: str, flag: str, tokenizer: Any) -> int:
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise SystemExit(f"jaxgpt patch: {flag} {text!r} is {len(ids)} tokens {ids}; give one "
                         f"token (e.g. ' Mary', with its leading space)")
    return ids[0]


def run(args: argparse.Namespace) -> int:

    from jaxgpt.tokenizer import get_tokenizer

    out = check_png(args.out, "patch")
    tokenizer = get_tokenizer()
    cfg = peek_config(args)
    clean, corrupt = (prompt_tokens(text, cfg, flag, "patch")
                      for text, flag in ((args.clean, "--clean"), (args.corrupt, "--corrupt")))
    if len(clean) != len(corrupt):  # before the weights load; `patch_sweep` checks it after
        raise SystemExit(f"jaxgpt patch: --clean has {len(clean)} tokens and --corrupt "
                         f"{len(corrupt)}: patching needs two prompts of the same length")
    answer = one_token(args.answer, "--answer", tokenizer)
    wrong = one_token(args.wrong, "--wrong", tokenizer)
    cfg, params, desc = load_model(args)
    layers = layer_range(args.layers, cfg.n_layers, "patch")
    log(f"jaxgpt: {desc}")
    values, base = sweep(args, cfg, params, clean, corrupt, answer, wrong)
    kind, columns_are = KINDS[args.kind]
    columns = ([tokenizer.decode([int(t)]) for t in clean] if columns_are == "position"
               else [str(h) for h in range(cfg.n_heads)])
    what = "fraction of the logit difference restored" if args.normalize else \
        f"logit({args.answer!r}) - logit({args.wrong!r})"
    title = (f"patching {args.kind}, clean into corrupted: {what}\n"
             f"clean {base[0]:.2f}, corrupted {base[1]:.2f}")
    from jaxgpt.cli.common import written_whole  # the picture whole or not at all
    from jaxgpt.interp.plots import plot_patching

    with written_whole(out) as tmp:
        plot_patching(values[layers.start:layers.stop], [str(i) for i in layers], columns,
                      tmp, title=title, label=what, column_title=columns_are)
    path = out
    log(f"jaxgpt: wrote {path} ({len(layers)} layers x {len(columns)} {columns_are}s)")
    return 0


def sweep(args: argparse.Namespace, cfg: Any, params: Any, clean: Any, corrupt: Any,
          answer: int, wrong: int) -> tuple[Any, tuple[float, float]]:
    """`(values [L, T or H], (clean metric, corrupted metric))` of the chosen sweep."""
    import numpy as np

    from jaxgpt.interp.cache import run_with_cache
    from jaxgpt.interp.patching import patch_sweep

    def metric(logits: Any) -> Any:  # [T, V]
        return logits[-1, answer] - logits[-1, wrong]

    clean_logits, clean_cache = run_with_cache(params, cfg, clean)
    corrupt_logits, _ = run_with_cache(params, cfg, corrupt, names=[])
    base = float(metric(clean_logits[0])), float(metric(corrupt_logits[0]))
    kind = KINDS[args.kind][0]
    t0 = time.perf_counter()
    log(f"jaxgpt: patching {args.kind} ({cfg.n_layers} layers x "
        f"{len(clean) if kind != 'z_all_pos' else cfg.n_heads}), compiling first...")
    values = np.asarray(patch_sweep(
        params, cfg, corrupt, clean_cache, metric, kind,
        progress=lambda done, total: log(f"jaxgpt: {done}/{total} patches "
                                         f"({time.perf_counter() - t0:.1f} s)")))
    if args.normalize:
        if abs(base[0] - base[1]) < 1e-6:
            raise SystemExit(f"jaxgpt patch: --normalize: the clean and corrupted prompts give "
                             f"the same logit difference ({base[0]:.4f}); nothing to restore")
        values = (values - base[1]) / (base[0] - base[1])
    return values, base
