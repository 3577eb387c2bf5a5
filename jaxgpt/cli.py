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
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="weights to load: a Hugging Face GPT-2 directory (config.json + "
                        "model.safetensors / sharded / pytorch_model.bin) or a jaxgpt orbax "
                        "checkpoint; the format is detected")
    p.add_argument("--preset", choices=PRESETS, default="gpt2-small",
                   help="architecture of the random weights (ignored with a checkpoint)")
    p.add_argument("--seed", type=int, default=123,
                   help="seed of the random weights (ignored with a checkpoint)")


_FORMAT_NAMES = {"hf": "Hugging Face GPT-2 directory", "orbax": "jaxgpt orbax checkpoint"}


def _checkpoint_format(path: str) -> str:
    """'hf' or 'orbax' for the directory `path`; SystemExit saying what is wrong otherwise."""
    from pathlib import Path

    from jaxgpt.checkpoint import is_checkpoint
    from jaxgpt.weights import HF_WEIGHT_FILES, is_hf_directory

    if not Path(path).is_dir():
        raise SystemExit(f"jaxgpt: no checkpoint directory at {path}")
    if is_checkpoint(path):
        return "orbax"
    if is_hf_directory(path):
        return "hf"
    raise SystemExit(
        f"jaxgpt: {path} is neither a jaxgpt orbax checkpoint (no jaxgpt.json) nor a Hugging "
        f"Face GPT-2 directory (config.json with one of {', '.join(HF_WEIGHT_FILES)})"
    )


def _read_checkpoint(path: str):
    """`(cfg, params, format)` from a checkpoint directory of either format."""
    from jaxgpt import checkpoint, weights

    fmt = _checkpoint_format(path)
    try:
        cfg, params = checkpoint.restore(path) if fmt == "orbax" else weights.load_pretrained(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"jaxgpt: cannot load the {_FORMAT_NAMES[fmt]} {path}: {e}") from e
    return cfg, params, fmt


def _load_model(args):
    """`(cfg, params, description)` for the weights the flags name."""
    from jaxgpt.model import count_params, init_params

    if getattr(args, "checkpoint", None):
        cfg, params, fmt = _read_checkpoint(args.checkpoint)
        desc = (f"{_FORMAT_NAMES[fmt]} {args.checkpoint} ({count_params(params):,} parameters: "
                f"{cfg.n_layers} layers, emb_dim {cfg.emb_dim}, {cfg.n_heads} heads, vocab "
                f"{cfg.vocab_size}, context {cfg.context_length}, "
                f"{'tied' if cfg.tie_embeddings else 'separate'} output head)")
        return cfg, params, desc
    cfg = GPTConfig.from_preset(args.preset)
    params = init_params(cfg, args.seed)
    desc = (f"{args.preset} with RANDOM weights (seed {args.seed}): the text is noise until a "
            f"checkpoint is given")
    return cfg, params, desc


# --- generate ----------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (greedy, or sampled)")
    p.add_argument("--prompt", default="Hello, I am", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples (the key comes from --seed)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest most-likely set with probability >= p, 0 < p <= 1")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--eos", action="store_true",
                   help="stop once the model emits <|endoftext|> (id 50256; it is printed)")
    _add_model_args(p)
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    import jax

    from jaxgpt import tokenizer as tok
    from jaxgpt.generation import cut_after_eos, generate, generate_stream
    from jaxgpt.sampling import check_sampling_args
    from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

    if args.max_new_tokens < 0:
        raise SystemExit(f"jaxgpt generate: --max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.prompt:
        raise SystemExit("jaxgpt generate: --prompt is empty; give at least one character")
    try:  # the vocabulary is not known yet: top_k's upper bound is checked by generate
        check_sampling_args(args.temperature, args.top_k, args.top_p, vocab_size=2**62)
    except ValueError as e:
        raise SystemExit(f"jaxgpt generate: {e}") from e
    tokenizer = get_tokenizer()
    idx = text_to_token_ids(args.prompt, tokenizer)
    t0 = time.perf_counter()
    cfg, params, desc = _load_model(args)
    _log(f"jaxgpt: {desc}. Backend: {jax.default_backend()}")
    if idx.shape[1] > cfg.context_length:
        _log(f"jaxgpt: the prompt has {idx.shape[1]} tokens; the model sees the last "
             f"{cfg.context_length}")
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   key=jax.random.key(args.seed) if args.temperature > 0 else None,
                   eos_id=tok.EOT_ID if args.eos else None)
    prompt = [int(t) for t in idx[0]]
    try:
        if args.stream:
            # Print the text as it grows; hold back a trailing partial UTF-8 character (shown as
            # U+FFFD) until its remaining bytes arrive, so the output ends as without --stream.
            ids, shown = list(prompt), ""
            for chunk in generate_stream(params, cfg, [prompt], args.max_new_tokens, **options):
                new = [int(t) for t in chunk[0]]
                kept = cut_after_eos(new, options["eos_id"])  # later slots repeat eos_id
                ids += kept
                ended = bool(kept) and kept[-1] == options["eos_id"]
                text = token_ids_to_text(ids, tokenizer).rstrip("\ufffd")
                print(text[len(shown):], end="", flush=True)
                shown = text
                if ended:
                    break
            text = token_ids_to_text(ids, tokenizer)
            print(text[len(shown):] if text.startswith(shown) else "", flush=True)
        else:
            out = generate(params, cfg, [prompt], args.max_new_tokens, **options)
            print(token_ids_to_text(out[0], tokenizer))
    except ValueError as e:
        raise SystemExit(f"jaxgpt generate: {e}") from e
    _log(f"jaxgpt: {args.max_new_tokens} tokens in {time.perf_counter() - t0:.2f}s "
         f"(load + compile + run)")
    return 0


# --- convert -----------------------------------------------------------------------------------


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between Hugging Face and orbax")
    p.add_argument("src", metavar="SRC", help="a Hugging Face GPT-2 directory or orbax checkpoint")
    p.add_argument("dst", metavar="DST", help="the directory to write (must not exist)")
    p.add_argument("--to", choices=("hf", "orbax"), default=None,
                   help="format of DST (default: the other one than SRC's)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    from pathlib import Path

    from jaxgpt import checkpoint, weights

    src_fmt = _checkpoint_format(args.src)
    to = args.to or ("orbax" if src_fmt == "hf" else "hf")
    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise SystemExit(f"jaxgpt convert: {dst} exists; pass --overwrite to replace it")
    if dst.resolve() == Path(args.src).resolve():
        raise SystemExit("jaxgpt convert: SRC and DST are the same directory")
    cfg, params, _ = _read_checkpoint(args.src)
    if to == "hf":
        out = weights.save_pretrained(params, cfg, dst, overwrite=args.overwrite)
    else:
        out = checkpoint.save(dst, params, cfg, overwrite=args.overwrite)
    _log(f"jaxgpt: {_FORMAT_NAMES[src_fmt]} {args.src} -> {_FORMAT_NAMES[to]} {out}")
    print(out)
    return 0


# --- train -------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train (or fine-tune) a GPT on a text file; with no --text-file, on "
                      "Python's own help topics (an offline demo corpus)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text-file", metavar="F", help="UTF-8 text to train on (GPT-2 tokens)")
    data.add_argument("--token-file", metavar="F",
                      help="raw uint16 token ids (memory-mapped; for corpora larger than memory)")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=PRESETS, help="a GPT-2 size trained from scratch")
    model.add_argument("--config", metavar="FILE.json",
                       help="GPTConfig fields as JSON (vocab_size, context_length, emb_dim, ...)")
    model.add_argument("--init-from", metavar="DIR",
                       help="fine-tune: start from a jaxgpt or Hugging Face checkpoint")
    p.add_argument("--steps", type=int, default=500, help="optimizer updates (default 500)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per update (default 8)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: min(256, context_length))")
    p.add_argument("--stride", type=int, default=None,
                   help="distance between window starts (default: --seq-len, no overlap)")
    p.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (default 4e-4)")
    p.add_argument("--min-lr", type=float, default=None,
                   help="learning rate at the end of the cosine decay (default lr/10)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW decay of weight matrices (default 0.1)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="global-norm clip, 0 turns it off (default 1.0)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per update; must divide --batch-size (default 1)")
    p.add_argument("--eval-every", type=int, default=100,
                   help="validation loss and a sample every N steps (default 100)")
    p.add_argument("--eval-iters", type=int, default=5, help="validation batches (default 5)")
    p.add_argument("--save-every", type=int, default=250,
                   help="checkpoint every N steps, and at the end (default 250)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
    p.add_argument("--seed", type=int, default=123,
                   help="seed of the weights, the data order and dropout (default 123)")
    p.add_argument("--val-ratio", type=float, default=0.1,
                   help="fraction of the tokens held out for validation (default 0.1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; weights and AdamW state stay float32")
    p.add_argument("--remat", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--fsdp", action="store_true",
                   help="also shard weights and AdamW moments over the devices")
    p.add_argument("--loss-chunk", type=int, default=None, metavar="N",
                   help="run the output head and loss over N tokens at a time, so the logits "
                        "of the whole batch never exist at once; 0: all at once (default: "
                        "1024 on GPU/TPU, 0 on CPU)")
    p.add_argument("--prompt", default="Every effort moves you",
                   help="start of the sample generated at each evaluation")
    p.add_argument("--sample-tokens", type=int, default=30, help="0 turns the samples off")
    p.add_argument("--out", metavar="DIR", default="jaxgpt-run",
                   help="metrics.jsonl, loss.png and checkpoints/ go here (default jaxgpt-run)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out, exactly")
    p.set_defaults(func=_cmd_train)


def _train_model_config(args):
    """`(cfg, params or None, description)` from --preset / --config / --init-from / the default."""
    import json
    from pathlib import Path

    from jaxgpt.train import DEMO_CONFIG

    if args.init_from:
        cfg, params, fmt = _read_checkpoint(args.init_from)
        return cfg, params, f"fine-tuning the {_FORMAT_NAMES[fmt]} {args.init_from}"
    if args.config:
        path = Path(args.config)
        try:
            fields = json.loads(path.read_text())
        except OSError as e:
            raise SystemExit(f"jaxgpt train: cannot read --config {path}: {e}") from e
        except ValueError as e:
            raise SystemExit(f"jaxgpt train: --config {path} is not valid JSON: {e}") from e
        if not isinstance(fields, dict):
            raise SystemExit(f"jaxgpt train: --config {path} must hold a JSON object of "
                             f"GPTConfig fields, got {type(fields).__name__}")
        try:
            return GPTConfig.from_dict(fields), None, f"config {path}"
        except (TypeError, ValueError) as e:
            raise SystemExit(f"jaxgpt train: --config {path}: {e}") from e
    if args.preset:
        return GPTConfig.from_preset(args.preset), None, f"preset {args.preset}"
    return DEMO_CONFIG, None, "the small demo config (jaxgpt.train.DEMO_CONFIG)"


def _cmd_train(args) -> int:
    import re
    from pathlib import Path

    from jaxgpt import data
    from jaxgpt.train import TrainConfig, TrainingDiverged, train_loop

    def fail(msg: str) -> SystemExit:
        return SystemExit(f"jaxgpt train: {msg}")

    for flag in ("steps", "batch_size", "grad_accum", "eval_every", "eval_iters", "save_every",
                 "keep"):
        value = getattr(args, flag)
        if value < 1:
            raise fail(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    for flag in ("seq_len", "stride"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise fail(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not 0.0 < args.val_ratio < 1.0:
        raise fail(f"--val-ratio must be in (0, 1), got {args.val_ratio}")
    if args.grad_clip < 0:
        raise fail(f"--grad-clip must be >= 0 (0 turns clipping off), got {args.grad_clip}")
    for name in ("text_file", "token_file"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            raise fail(f"--{name.replace('_', '-')} {path} does not exist")

    cfg, params, desc = _train_model_config(args)
    seq_len = args.seq_len if args.seq_len is not None else min(256, cfg.context_length)
    if seq_len > cfg.context_length:
        raise fail(f"--seq-len {seq_len} exceeds the model's context_length {cfg.context_length}")
    try:
        tc = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, seq_len=seq_len, stride=args.stride,
            lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip or None,
            grad_accum=args.grad_accum, train_ratio=1.0 - args.val_ratio, seed=args.seed,
            dtype=args.dtype, remat=args.remat, fsdp=args.fsdp, loss_chunk=args.loss_chunk,
            eval_every=args.eval_every,
            eval_iters=args.eval_iters, save_every=args.save_every, keep=args.keep,
            sample_prompt=args.prompt, sample_tokens=args.sample_tokens)
    except ValueError as e:
        # TrainConfig names its fields; the user typed flags.
        msg = re.sub(r"TrainConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
        raise fail(msg) from e

    if args.token_file:
        tokens, source = data.load_token_file(args.token_file), f"token file {args.token_file}"
    elif args.text_file:
        tokens, source = data.tokenize_file(args.text_file), f"text file {args.text_file}"
    else:
        tokens = data.tokenize_text(data.demo_corpus())
        source = "the demo corpus (Python's help topics, pydoc_data.topics)"
    train_tokens, val_tokens = data.train_val_split(tokens, tc.train_ratio)
    _log(f"jaxgpt train: {desc}; {source}: {len(tokens):,} tokens "
         f"({len(train_tokens):,} train / {len(val_tokens):,} validation)")
    try:
        records = train_loop(cfg, tc, train_tokens, val_tokens, args.out, resume=args.resume,
                             params=params)
    except TrainingDiverged:
        return 1  # the loop has said what happened and where the last good checkpoint is
    except (FileExistsError, ValueError) as e:
        raise fail(str(e)) from e
    if records:
        last = records[-1]
        val = f", val loss {last['val_loss']:.4f}" if "val_loss" in last else ""
        print(f"step {last['step']}: loss {last['loss']:.4f}{val}; {last['tokens_seen']:,} "
              f"tokens seen; outputs in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxgpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_info(sub)
    _add_convert(sub)
    _add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
