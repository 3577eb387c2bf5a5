"""`jaxgpt sae eval`: sae-lens's evaluations of an SAE on a text or token file."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from jaxgpt.cli.common import (
    add_model_args,
    check_output_file,
    flag_error,
    load_model,
    log,
    peek_config,
)

COMMAND = "sae eval"
# The `EvalConfig` fields and their flags (help and defaults come from the fields).
_FLAGS = {"hook_name": "--hook", "n_batches": "--batches", "batch_size_prompts": "--batch-size",
          "context_size": "--context-size", "prepend_bos": "--no-prepend-bos",
          "exclude": "--exclude", "dense_threshold": "--dense-threshold"}
_METAVARS = {"hook_name": "NAME", "n_batches": "N", "batch_size_prompts": "B",
             "context_size": "T", "dense_threshold": "F"}
# Text read from a --text-file: about this many characters per token needed (GPT-2 averages
# about 4), so a large file is not tokenized whole for a few batches.
_CHARS_PER_TOKEN = 16


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"jaxgpt {COMMAND}: {msg}")


def add(sub: Any) -> None:
    from jaxgpt.sae.evals import EvalConfig

    p = sub.add_parser("eval", help="sae-lens's evaluations of an SAE (L0, explained variance, "
                                    "ce_loss_score, KL, dead and dense features...)")
    p.add_argument("--sae", required=True, metavar="DIR",
                   help="the SAE: an sae-lens folder (cfg.json + sae_weights.safetensors)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text-file", metavar="F",
                      help="UTF-8 text to evaluate on (GPT-2 tokens; default: the offline demo "
                           "corpus, Python's help topics)")
    data.add_argument("--token-file", metavar="F", help="raw uint16 token ids to evaluate on")
    add_model_args(p)
    fields = EvalConfig.__dataclass_fields__
    for name, flag in _FLAGS.items():
        meta = fields[name].metadata
        default = fields[name].default
        shown = meta["none"] if default is None else default
        kwargs: dict[str, Any] = {"dest": name, "help": f"{meta['help']} (default {shown})"}
        if isinstance(default, bool):
            kwargs.update(action="store_false", help=f"do not {meta['help']}")
        elif name == "exclude":
            kwargs.update(nargs="*", type=int, metavar="ID",
                          help=f"{meta['help']}; --exclude alone: none (default {shown})")
        else:
            kwargs.update(default=default, metavar=_METAVARS[name], type={
                "hook_name": str, "context_size": int}.get(name, type(default)))
        p.add_argument(flag, **kwargs)
    p.add_argument("--out", metavar="FILE.json", help="also write the metrics here, as JSON")
    p.set_defaults(func=run)


def eval_config(args: argparse.Namespace) -> Any:
    """The `EvalConfig` of the flags; its errors said of the flags."""
    from jaxgpt.sae.evals import EvalConfig

    values = {name: getattr(args, name) for name in _FLAGS}
    if values["exclude"] is not None:
        values["exclude"] = tuple(values["exclude"])
    try:
        return EvalConfig(**values)
    except ValueError as e:
        raise _fail(flag_error(e, _FLAGS, {})) from e


def run(args: argparse.Namespace) -> int:
    from jaxgpt.sae.evals import run_evals

    ec = eval_config(args)
    out = check_output_file(args.out, "--out", COMMAND) if args.out else None
    cfg = peek_config(args)
    sae, hook = _sae_for(args, ec, cfg)
    batches, exclude, source = _batches(args, ec, cfg)
    cfg, params, desc = load_model(args)
    log(f"jaxgpt: {desc}")
    log(f"jaxgpt: {args.sae} ({sae.cfg.architecture}, d_sae {sae.cfg.d_sae}) at {hook}, on "
        f"{batches.shape[0]} batches of {batches.shape[1]} x {batches.shape[2]} tokens of "
        f"{source}")
    metrics, features = run_evals(params, cfg, sae, batches, ignore_tokens=exclude,
                                  hook_name=hook, dense_threshold=ec.dense_threshold)
    print(_table(metrics))
    if out is not None:
        report = {"sae": str(args.sae), "hook_name": hook, "model": desc, "data": source,
                  "eval_config": {**ec.__dict__, "hook_name": hook, "context_size":
                                  int(batches.shape[2]), "exclude": list(exclude)},
                  "metrics": metrics, "feature_metrics": {
                      k: [None if math.isnan(v) else float(v) for v in vals]
                      for k, vals in features.items()}}
        _write_json(out, report)
        log(f"jaxgpt: wrote {out}")
    return 0


def _sae_for(args: argparse.Namespace, ec: Any, cfg: Any) -> tuple[Any, str]:
    """The SAE of --sae (batchtopk as the jumprelu SAE it stands for) and the hook point it
    reads, checked against the model: one line and exit if either is wrong."""
    from jaxgpt.sae.formats import load_sae
    from jaxgpt.sae.model import to_inference
    from jaxgpt.sae.splice import check_hook

    try:
        sae = load_sae(args.sae)
    except (OSError, ValueError) as e:
        raise _fail(f"--sae {e}") from e
    if sae.cfg.architecture == "batchtopk":
        log("jaxgpt: a batchtopk SAE: evaluating the jumprelu SAE with its learned threshold "
            "that it stands for at inference (as sae-lens saves it)")
        sae = to_inference(sae)
    try:
        hook = check_hook(cfg, ec.hook_name or sae.cfg.hook_name, sae.cfg.d_in)
    except ValueError as e:
        where = "--hook" if ec.hook_name else f"--sae {args.sae}:"
        raise _fail(f"{where} {e}") from e
    return sae, hook


def _batches(args: argparse.Namespace, ec: Any, cfg: Any) -> tuple[Any, tuple[int, ...], str]:
    """`(batches [N, B, T], token ids left out, where they came from)`, checked against the
    model before its weights load."""
    from jaxgpt.sae.evals import token_batches
    from jaxgpt.tokenizer import get_tokenizer

    eot = get_tokenizer().eot_token
    context = ec.context_size or min(128, cfg.context_length)
    if context > cfg.context_length:
        raise _fail(f"--context-size {context} is longer than the model's context_length "
                    f"{cfg.context_length}")
    if ec.prepend_bos and eot >= cfg.vocab_size:
        raise _fail(f"the prompts start with <|endoftext|> ({eot}), which this model's "
                    f"{cfg.vocab_size}-token vocabulary lacks: give --no-prepend-bos")
    tokens, source = _tokens(args, ec.n_batches * ec.batch_size_prompts * context)
    if len(tokens) and int(tokens.max()) >= cfg.vocab_size:
        raise _fail(f"{source} holds token id {int(tokens.max())}, beyond the model's "
                    f"vocabulary of {cfg.vocab_size}")
    try:
        batches = token_batches(tokens, ec.n_batches, ec.batch_size_prompts, context,
                                eot if ec.prepend_bos else None)
    except ValueError as e:
        raise _fail(f"{source}: {e}") from e
    if len(batches) < ec.n_batches:
        log(f"jaxgpt: {source} fills {len(batches)} of --batches {ec.n_batches}; evaluating "
            f"those")
    return batches, ec.exclude if ec.exclude is not None else (eot,), source


def _tokens(args: argparse.Namespace, needed: int) -> tuple[Any, str]:
    """The token ids of --token-file, --text-file (its start, enough for `needed` tokens) or
    the demo corpus, and their source's name."""
    import numpy as np

    from jaxgpt.training import data

    try:
        if args.token_file:
            return np.asarray(data.load_token_file(args.token_file)), f"--token-file " \
                f"{args.token_file}"
        if args.text_file:
            with open(args.text_file, encoding="utf-8") as f:
                text = f.read(needed * _CHARS_PER_TOKEN)
            return data.tokenize_text(text), f"--text-file {args.text_file}"
    except UnicodeDecodeError as e:
        raise _fail(f"--text-file {args.text_file} is not UTF-8 text ({e.reason})") from e
    except (OSError, ValueError) as e:
        raise _fail(str(e)) from e
    return data.tokenize_text(data.demo_corpus()), "the demo corpus (Python's help topics)"


def _table(metrics: dict[str, dict[str, Any]]) -> str:
    """The metrics by group, one per line."""
    lines = []
    for group, values in metrics.items():
        lines.append(group)
        for name, value in values.items():
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
            lines.append(f"  {name:36s} {shown}")
    return "\n".join(lines)


def _write_json(path: Path, report: dict) -> None:
    """`report` as JSON at `path`, whole or not at all (written beside it, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(f"jaxgpt {COMMAND}: cannot write --out {path}: {e}", file=sys.stderr)
        raise SystemExit(1) from e
