"""`jaxgpt patch`: an activation-patching heatmap for a clean and a corrupted prompt."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from jaxgpt.cli.common import (
    add_model_args,
    check_output_file,
    load_model,
    log,
    peek_config,
    prompt_tokens,
)

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
    add_layers_arg(p, "draw only these layers (0-based, STOP excluded, negative from the end "
                      "as in Python: -2: is the last two; default all)")
    p.add_argument("--normalize", action="store_true",
                   help="draw (patched - corrupted) / (clean - corrupted) instead of the logit "
                        "difference: 0 is the corrupted run, 1 the clean one (a patch can go "
                        "beyond either)")
    p.add_argument("--out", default="patch.png", help="PNG to write (default patch.png)")
    add_model_args(p)
    p.set_defaults(func=run)


def check_png(path: str, command: str) -> Path:
    """The PNG to write: its folder must exist and be writable, and it must not be a folder."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise SystemExit(f"jaxgpt {command}: --out {path} must end in .png")
    if out.is_dir():
        raise SystemExit(f"jaxgpt {command}: --out {path} is a directory; give a file name")
    if not out.parent.is_dir():
        raise SystemExit(f"jaxgpt {command}: --out {path}: no directory {out.parent}")
    return check_output_file(path, "--out", command)  # and writable, before the sweep


# argparse takes only `-2` and `-2.5` for negative values; anything else that starts with `-`
# is a flag to it, so `--layers -2:` would be "expected one argument" (Python 3.13 takes any
# `-<digit>...`, as this does).
_NEGATIVE_VALUE = re.compile(r"^-\d[\d:-]*$|^-\d*\.\d+$")


def add_layers_arg(p: argparse.ArgumentParser, help: str) -> None:
    """`--layers FIRST:STOP`, whose FIRST may be negative (`--layers -2:`)."""
    p.add_argument("--layers", metavar="FIRST:STOP", default=None, help=help)
    p._negative_number_matcher = _NEGATIVE_VALUE


def layer_range(spec: str | None, count: int, command: str) -> range:
    """`FIRST:STOP` (either may be left out, negative counts from the end as in a Python
    slice) as a non-empty range within `count` rows."""
    if spec is None:
        return range(count)
    try:
        first, stop = (int(v) if v else None for v in spec.split(":"))
    except ValueError:
        raise SystemExit(f"jaxgpt {command}: --layers must be FIRST:STOP, e.g. 0:6, got "
                         f"{spec!r}") from None
    ends = [v + count if v is not None and v < 0 else v for v in (first, stop)]
    first, stop = 0 if ends[0] is None else ends[0], count if ends[1] is None else ends[1]
    if not (0 <= first <= count and 0 <= stop <= count):
        raise SystemExit(f"jaxgpt {command}: --layers {spec} is out of range: the model has "
                         f"{count} rows to draw, 0:{count} (or -{count}:)")
    if first >= stop:
        how = f"is reversed, e.g. {stop}:{first}" if first > stop else "selects no row"
        raise SystemExit(f"jaxgpt {command}: --layers {spec} {how}: FIRST must be below STOP "
                         f"(STOP excluded)")
    return range(first, stop)


def one_token(text: str, flag: str, tokenizer: Any) -> int:
    from jaxgpt.tokenizer import ENDOFTEXT

    ids = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    if len(ids) != 1:
        raise SystemExit(f"jaxgpt patch: {flag} {text!r} is {len(ids)} tokens {ids}; give one "
                         f"token (e.g. ' Mary', with its leading space)")
    return ids[0]


def run(args: argparse.Namespace) -> int:

    from jaxgpt.tokenizer import get_tokenizer, token_strings

    out = check_png(args.out, "patch")
    tokenizer = get_tokenizer()
    cfg = peek_config(args)
    clean, corrupt = (prompt_tokens(text, cfg, flag, "patch")
                      for text, flag in ((args.clean, "--clean"), (args.corrupt, "--corrupt")))
    if len(clean) != len(corrupt):  # before the weights load; `patch_sweep` checks it after
        raise SystemExit(f"jaxgpt patch: --clean has {len(clean)} tokens and --corrupt "
                         f"{len(corrupt)}: patching needs two prompts of the same length")
    if args.normalize and list(clean) == list(corrupt):
        raise SystemExit("jaxgpt patch: --normalize: --clean and --corrupt are the same tokens, "
                         "so they give the same logit difference; nothing to restore")
    answer = one_token(args.answer, "--answer", tokenizer)
    wrong = one_token(args.wrong, "--wrong", tokenizer)
    layers = layer_range(args.layers, cfg.n_layers, "patch")
    cfg, params, desc = load_model(args)
    log(f"jaxgpt: {desc}")
    values, base = sweep(args, cfg, params, clean, corrupt, answer, wrong)
    kind, columns_are = KINDS[args.kind]
    columns = (token_strings(clean, tokenizer) if columns_are == "position"
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
    if args.normalize and abs(base[0] - base[1]) < 1e-6:  # before the sweep, not after it
        raise SystemExit(f"jaxgpt patch: --normalize: the clean and corrupted prompts give "
                         f"the same logit difference ({base[0]:.4f}); nothing to restore")
    kind = KINDS[args.kind][0]
    t0 = time.perf_counter()
    log(f"jaxgpt: patching {args.kind} ({cfg.n_layers} layers x "
        f"{len(clean) if kind != 'z_all_pos' else cfg.n_heads}), compiling first...")
    values = np.asarray(patch_sweep(
        params, cfg, corrupt, clean_cache, metric, kind,
        progress=lambda done, total: log(f"jaxgpt: {done}/{total} patches "
                                         f"({time.perf_counter() - t0:.1f} s)")))
    if args.normalize:
        values = (values - base[1]) / (base[0] - base[1])
    return values, base
