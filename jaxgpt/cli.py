"""`jaxgpt` command line: the only module that parses arguments.

Each sub-command has an `_add_<name>` function that declares its flags and a `_cmd_<name>`
function that runs it. Results go to stdout, diagnostics to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from jaxgpt.config import PRESETS, GPTConfig


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- info --------------------------------------------------------------------------------------


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameter count and fp32 size of a preset (no weights allocated)")
    p.add_argument("--preset", choices=PRESETS, default="gpt2-small")
    p.add_argument("--tie-embeddings", action="store_true", help="share the output head with tok_emb")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> int:
    from jaxgpt.model import count_params, param_shapes, size_mb

    cfg = GPTConfig.from_preset(args.preset, tie_embeddings=args.tie_embeddings)
    shapes = param_shapes(cfg)  # jax.eval_shape: nothing is allocated
    print(f"preset: {args.preset}")
    for key, value in cfg.to_dict().items():
        print(f"{key}: {value}")
    print(f"parameters: {count_params(shapes):,}")
    print(f"size_fp32_mb: {size_mb(shapes):.2f}")
    return 0


# --- model source (shared by generate and other commands) ----------------------------------------


def _add_model_args(p) -> None:
    """Flags that say which weights to use."""
    p.add_argument("--preset", choices=PRESETS, default="gpt2-small",
                   help="architecture of the random weights (ignored with a checkpoint)")
    p.add_argument("--seed", type=int, default=123, help="seed of the random weights")


def _load_model(args):
    """`(cfg, params, description)` for the weights the flags name."""
    from jaxgpt.model import init_params

    cfg = GPTConfig.from_preset(args.preset)
    params = init_params(cfg, args.seed)
    desc = (f"{args.preset} with RANDOM weights (seed {args.seed}): the text is noise until a "
            f"checkpoint is given")
    return cfg, params, desc


# --- generate ----------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (greedy)")
    p.add_argument("--prompt", default="Hello, I am", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=20)
    _add_model_args(p)
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    import jax

    from jaxgpt.generation import generate_text_simple
    from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

    if args.max_new_tokens < 0:
        raise SystemExit(f"jaxgpt generate: --max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.prompt:
        raise SystemExit("jaxgpt generate: --prompt is empty; give at least one character")
    tokenizer = get_tokenizer()
    idx = text_to_token_ids(args.prompt, tokenizer)
    t0 = time.perf_counter()
    cfg, params, desc = _load_model(args)
    _log(f"jaxgpt: {desc}. Backend: {jax.default_backend()}")
    if idx.shape[1] > cfg.context_length:
        _log(f"jaxgpt: the prompt has {idx.shape[1]} tokens; the model sees the last "
             f"{cfg.context_length}")
    out = generate_text_simple(params, cfg, idx, args.max_new_tokens)
    text = token_ids_to_text(jax.device_get(out)[0], tokenizer)
    _log(f"jaxgpt: {args.max_new_tokens} tokens in {time.perf_counter() - t0:.2f}s "
         f"(load + compile + run)")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxgpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_info(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
