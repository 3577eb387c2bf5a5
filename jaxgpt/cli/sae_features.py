"""`jaxgpt sae features`: a page of an SAE's features over a text, for a person to look at."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from jaxgpt.cli.common import (
    add_model_args,
    check_output_file,
    field_flags,
    flag_error,
    load_model,
    log,
    peek_config,
)

COMMAND = "sae features"
PAGE_SUFFIXES = (".html", ".htm")
# Where a flag reads differently from its `FeaturesConfig` field: its name, and what it adds.
_FLAG_NAMES = {"hook_name": "--hook"}
_ALSO = {"top": "0: all", "features": "comma-separated, e.g. 3,17"}
# Settings whose default is what the SAE's cfg.json says of its training (sae-lens's metadata).
_FROM_SAE = {"context_size": "the SAE's metadata.context_size, at most the model's context, "
                             "else min(128, context_length)",
             "prepend_bos": "the SAE's metadata.prepend_bos, else no"}


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"jaxgpt {COMMAND}: {msg}")


def _feature_list(text: str) -> tuple[int, ...]:
    """`--features 3,17` as (3, 17)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be feature indices like 3,17, got {text!r}") from None


def _add_settings(p: argparse.ArgumentParser) -> None:
    """A flag per `FeaturesConfig` field, its default and help taken from the field."""
    from jaxgpt.sae.features import FeaturesConfig

    for field in dataclasses.fields(FeaturesConfig):
        flag = _FLAG_NAMES.get(field.name, "--" + field.name.replace("_", "-"))
        help_text = field.metadata["help"]
        if field.name in _ALSO:
            help_text += f"; {_ALSO[field.name]}"
        default = None if field.name in _FROM_SAE else field.default  # None: the SAE's
        shown = _FROM_SAE.get(field.name, field.metadata["none"] if default is None else default)
        kwargs: dict[str, Any] = {"dest": field.name, "default": default}
        if isinstance(field.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"features": _feature_list, "hook_name": str}.get(field.name, int)
            kwargs["metavar"] = {"features": "F,F", "hook_name": "NAME"}.get(field.name, "N")
        p.add_argument(flag, help=f"{help_text} (default {shown})", **kwargs)


def add(sub: Any) -> None:
    p = sub.add_parser(
        "features", help="one HTML page of an SAE's features over a text: densest first, "
                         "top contexts, histograms, promoted tokens")
    p.add_argument("--sae", metavar="DIR", required=True,
                   help="the SAE: a sae-lens folder (cfg.json + sae_weights.safetensors)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text-file", metavar="F", help="UTF-8 text to read (GPT-2 tokens); "
                      "default: Python's own help topics (an offline demo corpus)")
    data.add_argument("--token-file", metavar="F", help="raw uint16 token ids")
    p.add_argument("--out", metavar="FILE.html", default="features.html",
                   help="the page to write (default features.html)")
    p.add_argument("--title", default=None, help="the page's title")
    _add_settings(p)
    add_model_args(p)
    p.set_defaults(func=run, flags=field_flags(p))


def _config(args: argparse.Namespace) -> Any:
    """The `FeaturesConfig` of the flags; its errors said of the flags."""
    from jaxgpt.sae.features import FeaturesConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FeaturesConfig)}
    values["top"] = values["top"] or None  # --top 0: all
    values["prepend_bos"] = bool(values["prepend_bos"])  # None: the SAE's, filled in later
    try:
        return FeaturesConfig(**values)
    except ValueError as e:
        raise _fail(flag_error(e, args.flags, values)) from e


def _check_files(args: argparse.Namespace) -> Path:
    """The page's path, and the input files, checked before anything loads."""
    if Path(args.out).suffix.lower() not in PAGE_SUFFIXES:
        raise _fail(f"--out {args.out} must end in .html (the page is HTML)")
    out = check_output_file(args.out, "--out", COMMAND)
    for name in ("text_file", "token_file"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            raise _fail(f"--{name.replace('_', '-')} {path} does not exist")
    return out


def _load_sae(path: str) -> Any:
    """The SAE of the folder `path`; one line if it is not one jaxgpt can read."""
    from jaxgpt.sae.formats import load_sae

    try:
        return load_sae(path)
    except (OSError, ValueError) as e:
        raise _fail(f"--sae {e}") from e


def _tokens(args: argparse.Namespace, vocab_size: int) -> tuple[Any, str]:
    """The token ids the flags name, checked against the model's vocabulary, and where they
    came from."""
    import numpy as np

    from jaxgpt.training import data

    if args.token_file:
        try:
            tokens, desc = data.load_token_file(args.token_file), f"token file {args.token_file}"
        except data.TextNotTokens:
            raise _fail(f"--token-file {args.token_file} holds text, not uint16 token ids; "
                        f"give it as --text-file") from None
    elif args.text_file:
        try:
            tokens, desc = data.tokenize_file(args.text_file), f"text file {args.text_file}"
        except ValueError as e:  # not UTF-8
            raise _fail(f"--text-file {e}") from e
    else:
        tokens = data.tokenize_text(data.demo_corpus())
        desc = "the demo corpus (Python's help topics, pydoc_data.topics)"
    if not len(tokens):
        raise _fail(f"the {desc} has no tokens")
    top = int(np.max(tokens))
    if top >= vocab_size:
        raise _fail(f"the {desc} has token id {top}, outside the model's vocab_size "
                    f"{vocab_size}")
    return tokens, desc


def _as_trained(fc: Any, args: argparse.Namespace, context_length: int) -> Any:
    """`fc` with the settings the flags left open as the SAE's cfg.json says it was trained
    (sae-lens's `metadata.context_size` and `prepend_bos`)."""
    from jaxgpt.sae.formats import read_cfg

    meta = read_cfg(args.sae).get("metadata") or {}
    changes: dict[str, Any] = {}
    size = meta.get("context_size")
    if args.context_size is None and isinstance(size, int) and size >= 2:
        changes["context_size"] = min(size, context_length)
    if args.prepend_bos is None:
        changes["prepend_bos"] = bool(meta.get("prepend_bos", False))
    return dataclasses.replace(fc, **changes)


def run(args: argparse.Namespace) -> int:
    from jaxgpt.sae.features import feature_stats, write_features_page

    fc = _config(args)
    out = _check_files(args)
    sae = _load_sae(args.sae)
    model_cfg = peek_config(args)
    try:
        fc = _as_trained(fc, args, model_cfg.context_length).check(sae.cfg, model_cfg)
    except ValueError as e:
        raise _fail(flag_error(e, args.flags, {})) from e
    tokens, source = _tokens(args, model_cfg.vocab_size)
    cfg, params, desc = load_model(args)
    log(f"jaxgpt: {desc}")
    n_read = min(len(tokens), fc.max_tokens or len(tokens))
    log(f"jaxgpt: reading {n_read:,} tokens of {source} at {fc.resolve_hook(sae.cfg)}, "
        f"in windows of {fc.window(cfg)}{' led by <|endoftext|>' if fc.prepend_bos else ''}")
    stats = feature_stats(params, cfg, sae, tokens, fc)
    path = write_features_page(stats, out, title=args.title)
    log(f"jaxgpt: wrote {path} ({len(stats.features):,} features of {stats.d_sae:,}; "
        f"{stats.n_dead:,} of the {stats.n_scanned:,} read never fired)")
    return 0
