"""`jaxgpt sae train`: train SAEs on a model's activations at one or more hook points.

One SAE per `--hook` and `--d-sae` (all from one forward pass of the model), with sae-lens's
defaults. The training settings are `SAETrainConfig`'s fields (flags, defaults and help from
them); the SAEs' are `SAEConfig`'s. Everything is checked before the weights load: a hook
that is not a hook point (the closest is named), a `--d-in` that is not the hook's width, k
larger than d_sae, a setting out of range.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from jaxgpt.cli.common import (
    add_cache_args,
    add_model_args,
    check_output_dir,
    enable_compile_cache,
    flag_error,
    load_model,
    log,
    peek_config,
)

COMMAND = "sae train"
# SAETrainConfig fields whose flag is not `--field-name` (the model's --seed is its weights').
_RENAMED = {"seed": "--sae-seed"}
# Where the field's default is None, the flag's type (resample_dead is auto/on/off).
_TYPES = {"lr_end": float, "grad_clip": float, "run_name": str, "wandb_project": str}
# The SAEConfig fields the command sets besides the architecture, width and hook.
_SAE_FIELDS = ("k", "l1_coefficient", "l1_warm_up_steps", "lp_norm", "l0_coefficient",
               "l0_warm_up_steps", "aux_loss_coefficient", "normalize_activations",
               "decoder_init_norm", "apply_b_dec_to_input")
_SAE_HELP = {
    "k": "topk: features kept per token; batchtopk: kept per token on average",
    "l1_coefficient": "standard: the L1 penalty's weight",
    "l1_warm_up_steps": "standard: steps over which the L1 weight ramps up from 0",
    "lp_norm": "standard: p of the sparsity penalty's norm",
    "l0_coefficient": "jumprelu: the L0 penalty's weight",
    "l0_warm_up_steps": "jumprelu: steps over which the L0 weight ramps up from 0",
    "aux_loss_coefficient": "topk/batchtopk: the dead features' auxiliary loss weight",
    "normalize_activations": "none, or expected_average_only_in (inputs scaled to mean norm "
                             "sqrt(d_in), the factor folded into the saved SAE)",
    "decoder_init_norm": "the decoder rows' norm at init",
    "apply_b_dec_to_input": "subtract b_dec from the input before encoding",
}


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"jaxgpt {COMMAND}: {msg}")


def _train_flag(name: str) -> str:
    return _RENAMED.get(name, "--" + name.replace("_", "-"))


def _sae_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add(sub: Any) -> None:
    import dataclasses

    from jaxgpt.sae.model import ARCHITECTURES, SAEConfig
    from jaxgpt.sae.train_config import SAETrainConfig

    p = sub.add_parser("train", help="train SAEs on the model's activations (sae-lens's "
                                     "defaults; several hooks or widths from one forward pass)")
    p.add_argument("--hook", nargs="+", required=True, metavar="NAME",
                   help="hook point(s) to read, e.g. blocks.6.hook_resid_pre, "
                        "blocks.3.attn.hook_z, blocks.2.mlp.hook_post")
    p.add_argument("--architecture", choices=ARCHITECTURES, default="topk",
                   help="the SAEs' architecture (default topk)")
    p.add_argument("--d-sae", nargs="+", type=int, metavar="N",
                   help="features of each SAE: one SAE per hook and width (default 8 x d_in)")
    p.add_argument("--d-in", type=int, metavar="N",
                   help="the width the SAEs expect; refused unless it is the hooks' (default: "
                        "the hook's)")
    sae_fields = {f.name: f for f in dataclasses.fields(SAEConfig)}
    for name in _SAE_FIELDS:
        default = sae_fields[name].default
        kwargs: dict[str, Any] = {"default": default, "dest": f"sae_{name}",
                                  "help": f"{_SAE_HELP[name]} (default {default})"}
        if isinstance(default, bool):
            kwargs.update(type=_bool, metavar="{true,false}")
        elif name == "normalize_activations":
            kwargs["choices"] = ("none", "expected_average_only_in")
        else:
            kwargs["type"] = float if name in ("k", "decoder_init_norm") else type(default)
            kwargs["metavar"] = "N" if kwargs["type"] is int else "X"
        p.add_argument(_sae_flag(name), **kwargs)
    p.add_argument("--no-rescale", action="store_true",
                   help="topk/batchtopk: select and decode with the decoder rows as they are "
                        "(sae-lens trains as if they had norm 1: rescale_acts_by_decoder_norm)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text-file", metavar="F", help="UTF-8 text to train on (GPT-2 tokens; "
                      "default: the offline demo corpus, Python's help topics)")
    data.add_argument("--token-file", metavar="F", help="raw uint16 token ids to train on")
    add_model_args(p)
    for field in dataclasses.fields(SAETrainConfig):
        _add_setting(p, field)
    p.add_argument("--out", metavar="DIR", default="jaxgpt-sae-run",
                   help="metrics.jsonl, metrics.png, checkpoints/ and saes/ go here (default "
                        "jaxgpt-sae-run)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out")
    add_cache_args(p)
    p.set_defaults(func=run)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_setting(p: argparse.ArgumentParser, field: Any) -> None:
    """The flag of an `SAETrainConfig` field, its default and help from the field."""
    meta, default = field.metadata, field.default
    shown = meta["none"] if default is None else default
    kwargs: dict[str, Any] = {"default": default, "dest": field.name,
                              "help": f"{meta['help']} (default {shown})"}
    if field.name == "resample_dead":
        kwargs.update(choices=("auto", "on", "off"), default="auto",
                      help=f"{meta['help']}; auto: {meta['none']} (default auto)")
    elif field.name == "log":
        kwargs.update(type=str, metavar="TRACKERS",
                      help=f"{meta['help']} (default none: metrics.jsonl and metrics.png only)")
    elif field.name == "grad_clip":
        kwargs.update(type=float, metavar="X",
                      help=f"{meta['help']}; 0 turns it off (default {default})")
    else:
        kwargs["type"] = _TYPES.get(field.name) or type(default)
        kwargs["metavar"] = {int: "N", float: "X"}.get(kwargs["type"])
        if field.name == "lr_scheduler_name":
            from jaxgpt.sae.train_config import LR_SCHEDULERS

            kwargs["choices"] = LR_SCHEDULERS
        elif field.name == "dtype":
            from jaxgpt.sae.train_config import DTYPES

            kwargs["choices"] = DTYPES
    p.add_argument(_train_flag(field.name), **kwargs)


def _flags() -> dict[str, str]:
    """Config field -> the flag that sets it, for the library's messages."""
    import dataclasses

    from jaxgpt.sae.train_config import SAETrainConfig

    out = {f.name: _train_flag(f.name) for f in dataclasses.fields(SAETrainConfig)}
    out.update({name: _sae_flag(name) for name in _SAE_FIELDS})
    out.update(d_sae="--d-sae", d_in="--d-in", architecture="--architecture",
               hook_name="--hook")
    return out


def train_config(args: argparse.Namespace) -> Any:
    """The `SAETrainConfig` of the flags; its errors said of the flags."""
    import dataclasses

    from jaxgpt.sae.train_config import SAETrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SAETrainConfig)}
    values["resample_dead"] = {"auto": None, "on": True, "off": False}[values["resample_dead"]]
    values["grad_clip"] = values["grad_clip"] or None
    try:
        return SAETrainConfig(**values)
    except ValueError as e:
        raise _fail(flag_error(e, _flags(), {})) from e


def sae_configs(args: argparse.Namespace, cfg: Any) -> list[Any]:
    """The SAEs the flags ask for on the model `cfg`: one per hook and width, each checked."""
    import re

    from jaxgpt.sae.model import SAEConfig
    from jaxgpt.sae.store import hook_widths

    try:
        widths = hook_widths(cfg, args.hook)
    except ValueError as e:
        raise _fail(f"--hook {e}") from e
    for hook, width in widths.items():
        if args.d_in is not None and args.d_in != width:
            raise _fail(f"--d-in {args.d_in} does not match --hook {hook}, whose activations "
                        f"have {width} features per token")
    out = []
    for hook, width in widths.items():
        for d_sae in args.d_sae or [8 * width]:
            fields = {name: getattr(args, f"sae_{name}") for name in _SAE_FIELDS}
            if args.architecture == "topk":
                fields["k"] = int(fields["k"]) if fields["k"] == int(fields["k"]) else fields["k"]
            try:
                out.append(SAEConfig(
                    args.architecture, width, d_sae, hook_name=hook,
                    rescale_acts_by_decoder_norm=args.architecture in ("topk", "batchtopk")
                    and not args.no_rescale, **fields))
            except ValueError as e:
                msg = re.sub(r"^SAEConfig\.(\w+)", lambda m: _flags().get(m.group(1), m[0]),
                             str(e))
                msg = re.sub(r"^k must", "--k must", msg)
                raise _fail(msg.replace("d_sae=", "--d-sae ")) from e
    return out


def run(args: argparse.Namespace) -> int:
    """Check everything, load the model and data, train; a line per SAE on stdout."""
    tc = train_config(args)
    for name in ("text_file", "token_file"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            raise _fail(f"--{name.replace('_', '-')} {path} does not exist")
    check_output_dir(args.out, "--out", COMMAND)
    cfg = peek_config(args)
    sae_cfgs = sae_configs(args, cfg)
    _check_run(args, cfg, sae_cfgs, tc)
    enable_compile_cache(args)
    cfg, params, desc = load_model(args)
    log(f"jaxgpt {COMMAND}: {desc}")
    tokens, source = _tokens(args)
    log(f"jaxgpt {COMMAND}: {source}: {len(tokens):,} tokens")
    code = _train(args, params, cfg, tokens, sae_cfgs, tc)
    if code:
        return code
    from jaxgpt.training.progress import read_metrics

    last = {r["sae"]: r for r in read_metrics(Path(args.out) / "metrics.jsonl")}
    for name, record in last.items():
        print(f"{name}: L0 {record['l0']:.1f}, explained variance "
              f"{record['explained_variance']:.4f}, MSE {record['mse_loss']:.4g}, dead "
              f"{record['dead_fraction']:.2%}; saved in {Path(args.out) / 'saes' / name}")
    return 0


def _check_run(args: argparse.Namespace, cfg: Any, sae_cfgs: list, tc: Any) -> None:
    """The output directory and the resume request, before anything loads."""
    from jaxgpt.io.checkpoint import CheckpointError
    from jaxgpt.sae.training import check_run_dir, resume_changes
    from jaxgpt.training.run_dir import list_checkpoints

    out = Path(args.out)
    try:
        check_run_dir(out)
        existing = list_checkpoints(out / "checkpoints")
        if existing and not args.resume:
            raise _fail(f"--out {out} already holds checkpoints (newest {existing[-1].name}); "
                        f"add --resume, or choose another --out")
        if args.resume and not existing:
            raise _fail(f"--resume: {out / 'checkpoints'} holds no complete checkpoint")
        if existing:
            resume_changes(existing[-1], cfg, sae_cfgs, tc)
    except (FileExistsError, CheckpointError, ValueError) as e:
        raise _fail(flag_error(e, _flags(), {}).replace("resume=True", "--resume")) from e


def _tokens(args: argparse.Namespace) -> tuple[Any, str]:
    from jaxgpt.training import data

    if args.token_file:
        try:
            return data.load_token_file(args.token_file), f"token file {args.token_file}"
        except data.TextNotTokens:
            raise _fail(f"{args.token_file} holds text, not uint16 token ids; give it as "
                        f"--text-file") from None
    if args.text_file:
        return data.tokenize_file(args.text_file), f"text file {args.text_file}"
    return data.tokenize_text(data.demo_corpus()), "the demo corpus (Python's help topics)"


def _train(args: argparse.Namespace, params: Any, cfg: Any, tokens: Any, sae_cfgs: list,
           tc: Any) -> int:
    """`train_saes` as the flags say: 0, or the exit code of an interrupted run (its message
    given)."""
    import warnings

    from jaxgpt.sae.training import train_saes
    from jaxgpt.training.loop import ResumeWarning, TrainingDiverged, TrainingInterrupted

    shown = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if not issubclass(category, ResumeWarning):
            return shown(message, category, filename, lineno, file, line)
        log(f"jaxgpt {COMMAND}: warning: {flag_error(Warning(str(message)), _flags(), {})}")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", ResumeWarning)
            warnings.showwarning = show
            train_saes(params, cfg, tokens, sae_cfgs, tc, args.out, resume=args.resume)
            return 0
    except TrainingInterrupted as e:
        argv = list(getattr(args, "argv", None) or sys.argv[1:])
        again = shlex.join(["jaxgpt", *argv, *([] if "--resume" in argv else ["--resume"])])
        log(f"jaxgpt {COMMAND}: interrupted ({e}). Resume with: {again}")
        return 128 + e.signum
    except TrainingDiverged as e:
        raise _fail(flag_error(e, _flags(), {})) from e
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        raise _fail(flag_error(e, _flags(), {})) from e
