"""`jaxgpt` command line: the only module that parses arguments.

Each sub-command has an `_add_<name>` function that declares its flags and a `_cmd_<name>`
function that runs it. Results go to stdout, diagnostics to stderr.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from jaxgpt.config import PRESETS, GPTConfig


def _log(msg: str) -> None:
    """A message on stderr; with several processes, from process 0 only."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized() and jax.process_index() != 0:
        return
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


# --- compilation cache (generate, train) ---------------------------------------------------------


def _default_cache_dir() -> str:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxgpt", "xla")


def _add_cache_args(p) -> None:
    p.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="JAX's persistent compilation cache: compiled programs are kept here, so "
                        "a later run with the same shapes skips compiling (default "
                        "$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/jaxgpt/xla, "
                        "i.e. ~/.cache/jaxgpt/xla)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile from scratch and write no cache")


def _enable_compile_cache(args) -> str | None:
    """Turn on JAX's persistent compilation cache (before anything compiles); its directory."""
    import jax

    if args.no_compile_cache:
        return None
    path = args.compile_cache or jax.config.jax_compilation_cache_dir or _default_cache_dir()
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program: the default keeps only those compiling for >= 1 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


class _CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (or loading from the persistent
    cache), and how many programs came from that cache, through `jax.monitoring`."""

    _PHASES = ("/jax/core/compile/jaxpr_trace_duration",
               "/jax/core/compile/jaxpr_to_mlir_module_duration",
               "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.seconds, self.programs, self.cache_hits = 0.0, 0, 0
        self.backend_seconds = 0.0  # XLA's compile, or the load from the cache, alone

    def _duration(self, event, seconds, **kwargs):
        if event in self._PHASES:
            self.seconds += seconds
            if event == self._PHASES[-1]:
                self.programs += 1
                self.backend_seconds += seconds

    def _event(self, event, **kwargs):
        self.cache_hits += event == "/jax/compilation_cache/cache_hits"

    def __enter__(self):
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc):
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._duration)
        jax.monitoring.unregister_event_listener(self._event)
        return False


# --- generate ----------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (greedy, or sampled)")
    p.add_argument("--prompt", default="Hello, I am", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples (the key comes from --seed); "
                        "--top-k/--top-p need it")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the k most likely tokens, 1 <= k <= vocab_size")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest most-likely set with probability >= p, "
                        "0 < p <= 1")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--num-samples", type=int, default=1, metavar="K",
                   help="K continuations of the prompt, generated as one batch (split over the "
                        "visible devices); they differ only when sampling (default 1)")
    p.add_argument("--eos", action="store_true",
                   help="stop once the model emits <|endoftext|> (id 50256; it is printed)")
    _add_model_args(p)
    _add_cache_args(p)
    p.set_defaults(func=_cmd_generate)


def _peek_config(args) -> GPTConfig:
    """The config of the weights the flags name, without reading the weights."""
    from jaxgpt import checkpoint, weights

    if not getattr(args, "checkpoint", None):
        return GPTConfig.from_preset(args.preset)
    fmt = _checkpoint_format(args.checkpoint)
    try:
        if fmt == "orbax":
            return checkpoint.load_config(args.checkpoint)
        return weights.load_hf_config(args.checkpoint)
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"jaxgpt: cannot load the {_FORMAT_NAMES[fmt]} {args.checkpoint}: {e}"
        ) from e


def _flop_text(flops: float) -> str:
    """`254 GFLOP`, `65.5 MFLOP`: three significant digits with an SI prefix."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops >= scale:
            return f"{flops / scale:.3g} {prefix}FLOP"
    return f"{flops:.3g} FLOP"


class _TokenProgress:
    """`generated N/M tokens, X tok/s, ETA` on stderr while a long generation runs (the rate
    from the second chunk on: the first one includes compiling)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.tty, self.last = sys.stderr.isatty(), 0.0
        self.first: tuple[float, int] | None = None  # (time, tokens) after the first chunk

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, self.done)
        if now - self.last < (0.2 if self.tty else 10.0) and self.done < self.total:
            return
        self.last = now
        t_first, n_first = self.first
        rate = (self.done - n_first) / (now - t_first) if self.done > n_first else 0.0
        eta = f"ETA {(self.total - self.done) / rate:.0f}s" if rate > 0 else "ETA after a chunk"
        line = (f"jaxgpt: generated {self.done}/{self.total} tokens, {rate:.2f} tok/s, {eta}")
        print(("\r" + line + "\x1b[K") if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.done:
            print(file=sys.stderr)


def _cmd_generate(args) -> int:
    import os

    import jax

    from jaxgpt import tokenizer as tok
    from jaxgpt.generation import cut_after_eos, generate, generate_stream
    from jaxgpt.model import count_params
    from jaxgpt.sampling import check_sampling_args
    from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

    def fail(msg: str) -> SystemExit:
        return SystemExit(f"jaxgpt generate: {msg}")

    if args.max_new_tokens < 0:
        raise fail(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.prompt:
        raise fail("--prompt is empty; give at least one character")
    if args.num_samples < 1:
        raise fail(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_samples > 1 and args.stream:
        raise fail("--stream prints one sample as it grows; drop it or --num-samples")
    t_start = time.perf_counter()
    cfg = _peek_config(args)  # config.json only: the flags are checked before the weights load
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p, vocab_size=cfg.vocab_size)
    except ValueError as e:
        raise fail(str(e)) from e
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        given = " and ".join(f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p))
                             if v is not None)
        raise fail(f"{given} only apply when sampling, and sampling needs a temperature above 0 "
                   f"(e.g. --temperature 1.0); without --temperature the output is greedy")
    cache_dir = _enable_compile_cache(args)
    tokenizer = get_tokenizer()
    idx = text_to_token_ids(args.prompt, tokenizer)
    clock = _CompileClock()  # random weights are made by a compiled init: count it apart
    with clock:
        cfg, params, desc = _load_model(args)
        jax.block_until_ready(params)
    t_load, compile_load = time.perf_counter() - t_start, clock.seconds
    _log(f"jaxgpt: {desc}. Backend: {jax.default_backend()}")
    if idx.shape[1] > cfg.context_length:
        _log(f"jaxgpt: the prompt has {idx.shape[1]} tokens; the model sees the last "
             f"{cfg.context_length}")
    prompt = [int(t) for t in idx[0]]
    if max(prompt) >= cfg.vocab_size:
        raise fail(f"the prompt holds GPT-2 token id {max(prompt)}, outside the model's "
                   f"vocabulary [0, {cfg.vocab_size}): this model does not use GPT-2's tokenizer")
    past = len(prompt) + args.max_new_tokens - cfg.context_length
    if past > 0 and args.max_new_tokens > 0:
        first = max(cfg.context_length - len(prompt), 0) + 1
        flops = 2 * count_params(params)  # multiply-adds of one token through the weights
        _log(f"jaxgpt: warning: {past} of the {args.max_new_tokens} new tokens lie past "
             f"context_length {cfg.context_length}: from new token {first} on, each one "
             f"recomputes the whole {cfg.context_length}-token window as the book does (a cache "
             f"cannot slide), about {_flop_text(flops * cfg.context_length)} per token instead "
             f"of {_flop_text(flops)}" + ("; progress follows" if args.num_samples == 1 else ""))
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   key=jax.random.key(args.seed) if args.temperature > 0 else None,
                   eos_id=tok.EOT_ID if args.eos else None)
    progress = (_TokenProgress(args.max_new_tokens)
                if past > 0 and args.max_new_tokens and args.num_samples == 1 else None)
    t0 = time.perf_counter()
    try:
        with clock:
            if args.stream or progress:
                # Print the text as it grows; hold back a trailing partial UTF-8 character
                # (shown as U+FFFD) until its remaining bytes arrive, so the output ends as
                # without --stream.
                ids, shown = list(prompt), ""
                for chunk in generate_stream(params, cfg, [prompt], args.max_new_tokens,
                                             **options):
                    new = [int(t) for t in chunk[0]]
                    kept = cut_after_eos(new, options["eos_id"])  # later slots repeat eos_id
                    ids += kept
                    if progress:
                        progress.add(len(new))
                    ended = bool(kept) and kept[-1] == options["eos_id"]
                    if args.stream:
                        text = token_ids_to_text(ids, tokenizer).rstrip("\ufffd")
                        print(text[len(shown):], end="", flush=True)
                        shown = text
                    if ended:
                        break
                if progress:
                    progress.close()
                text = token_ids_to_text(ids, tokenizer)
                print(text[len(shown):] if text.startswith(shown) else "", flush=True)
                n_new = len(ids) - len(prompt)
            elif args.num_samples == 1:
                out = generate(params, cfg, [prompt], args.max_new_tokens, **options)
                print(token_ids_to_text(out[0], tokenizer))
                n_new = len(out[0]) - len(prompt)
            else:  # one batch of K rows: one row per sample, each with its own random draws
                out = generate(params, cfg, [prompt] * args.num_samples, args.max_new_tokens,
                               **options)
                for i, row in enumerate(out, 1):
                    print(f"--- sample {i} of {args.num_samples} ---")
                    print(token_ids_to_text(row, tokenizer))
                n_new = sum(len(row) - len(prompt) for row in out)
    except ValueError as e:
        raise fail(str(e)) from e
    wall = time.perf_counter() - t0
    gen = max(wall - (clock.seconds - compile_load), 1e-9)  # compiling happens inside the call
    if cache_dir is not None:
        home = os.path.expanduser("~")
        if cache_dir.startswith(home + os.sep):
            cache_dir = "~" + cache_dir[len(home):]
    cache = ("compile cache off" if cache_dir is None else
             f"{clock.cache_hits} of {clock.programs} programs from the compile cache {cache_dir}")
    cache = f"XLA {clock.backend_seconds:.2f}s, the rest tracing and lowering; {cache}"
    _log(f"jaxgpt: load {t_load - compile_load:.2f}s, compile {clock.seconds:.2f}s ({cache}), "
         f"generation {gen:.2f}s for {n_new} tokens: {n_new / gen:.1f} tokens/s")
    return 0


# --- attention ---------------------------------------------------------------------------------


def _add_attention(sub) -> None:
    p = sub.add_parser("attention", help="draw one layer's attention weights for a prompt")
    p.add_argument("--prompt", default="Every effort moves you", help="text whose tokens to show")
    p.add_argument("--layer", type=int, default=0, help="layer index, 0-based (default 0)")
    p.add_argument("--head", type=int, default=None,
                   help="head index, 0-based (default: every head, as a grid)")
    p.add_argument("--out", default="attention.png", help="PNG to write (default attention.png)")
    _add_model_args(p)
    p.set_defaults(func=_cmd_attention)


def _cmd_attention(args) -> int:
    from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids
    from jaxgpt.visualize import attention_weights, plot_attention

    if not args.prompt:
        raise SystemExit("jaxgpt attention: --prompt is empty; give at least one character")
    tokenizer = get_tokenizer()
    idx = text_to_token_ids(args.prompt, tokenizer)  # [1, T]
    cfg, params, desc = _load_model(args)
    checks = [("--layer", args.layer, cfg.n_layers, "layers")]
    if args.head is not None:
        checks.append(("--head", args.head, cfg.n_heads, "heads"))
    for flag, value, count, what in checks:
        if not 0 <= value < count:
            raise SystemExit(f"jaxgpt attention: {flag} must be in [0, {count - 1}] (the model "
                             f"has {count} {what}), got {value}")
    if idx.shape[1] > cfg.context_length:
        raise SystemExit(f"jaxgpt attention: the prompt has {idx.shape[1]} tokens, more than the "
                         f"model's context_length {cfg.context_length}")
    _log(f"jaxgpt: {desc}")
    weights = attention_weights(params, cfg, idx)[args.layer][0]  # [H, T, T]
    tokens = [tokenizer.decode([int(t)]) for t in idx[0]]
    path = plot_attention(weights, tokens, args.out, layer=args.layer, head=args.head)
    _log(f"jaxgpt: wrote {path} (layer {args.layer}, "
         f"{'head ' + str(args.head) if args.head is not None else f'{cfg.n_heads} heads'}, "
         f"{len(tokens)} tokens)")
    return 0


# --- convert -----------------------------------------------------------------------------------


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between Hugging Face and orbax")
    p.add_argument("src", metavar="SRC", help="a Hugging Face GPT-2 directory or orbax checkpoint")
    p.add_argument("dst", metavar="DST", help="the directory to write (must not exist)")
    p.add_argument("--to", choices=("hf", "orbax"), default=None,
                   help="format of DST (default: the other one than SRC's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is an existing jaxgpt or Hugging Face checkpoint "
                        "directory (or empty); a directory holding other files is refused")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    from pathlib import Path

    from jaxgpt import checkpoint, weights

    src_fmt = _checkpoint_format(args.src)
    to = args.to or ("orbax" if src_fmt == "hf" else "hf")
    dst = Path(args.dst)
    src, target = Path(args.src).resolve(), dst.resolve()
    if target == src:
        raise SystemExit("jaxgpt convert: SRC and DST are the same directory")
    if target in src.parents:
        raise SystemExit(f"jaxgpt convert: DST {dst} contains SRC {args.src}; choose a new "
                         f"directory for DST")
    if src in target.parents:
        raise SystemExit(f"jaxgpt convert: DST {dst} is inside SRC {args.src}; choose a "
                         f"directory outside it")
    if dst.exists() or dst.is_symlink():
        if not args.overwrite:
            raise SystemExit(f"jaxgpt convert: {dst} exists; pass --overwrite to replace it")
        try:  # before loading anything: only a checkpoint directory may be replaced
            checkpoint.check_replaceable(dst)
        except FileExistsError as e:
            raise SystemExit(f"jaxgpt convert: --overwrite refused: {e}") from e
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
    p.add_argument("--remat", nargs="?", const="block", default=None,
                   choices=("none", "attention", "block"),
                   help="what the backward pass recomputes to save memory: none, attention (the "
                        "[B, H, T, T] attention scores, softmax and dropout), block (whole "
                        "blocks; --remat alone); default attention on GPU/TPU, none on CPU")
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
                   help="continue from the newest checkpoint in --out (an error if there is "
                        "none); changed optimisation flags (--lr, --steps, ...) are allowed "
                        "with a warning, changed model or data flags are not")
    dist = p.add_argument_group(
        "several processes", "run the same command once per process (e.g. one per host), all "
        "with the same --out on a shared filesystem; without these flags, JAX_COORDINATOR_ADDRESS "
        "and a cluster environment (Slurm, Open MPI) are read as jax.distributed.initialize does")
    dist.add_argument("--coordinator", metavar="HOST:PORT",
                      help="address of process 0, which serves the coordination service")
    dist.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    dist.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    dist.add_argument("--distributed-timeout", type=float, default=300.0, metavar="S",
                      help="seconds to wait for every process to join (default 300)")
    _add_cache_args(p)
    p.set_defaults(func=_cmd_train)


def _start_distributed(args, fail) -> None:
    """`jax.distributed.initialize` from --coordinator/--num-processes/--process-id (or the
    environment), before anything touches a device; one line and exit 1 if it cannot start
    within --distributed-timeout (JAX itself would abort with a stack trace)."""
    import os
    import threading

    import jax

    flags = (args.coordinator, args.num_processes, args.process_id)
    if jax.distributed.is_initialized():  # started by the caller (the README's Python route)
        if any(f is not None for f in flags):
            raise fail("the distributed runtime is already running; drop --coordinator, "
                       "--num-processes and --process-id")
        return
    if all(f is None for f in flags) and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return  # one process
    if not args.distributed_timeout > 0:
        raise fail(f"--distributed-timeout must be > 0 seconds, got {args.distributed_timeout}")
    if args.coordinator is not None:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise fail(f"--coordinator must be HOST:PORT with a port in 1..65535, "
                       f"got {args.coordinator!r}")
    if args.num_processes is not None and args.num_processes < 1:
        raise fail(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and args.num_processes is not None and not (
            0 <= args.process_id < args.num_processes):
        raise fail(f"--process-id must be in [0, {args.num_processes - 1}] for --num-processes "
                   f"{args.num_processes}, got {args.process_id}")
    where = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    timeout = args.distributed_timeout

    def give_up():
        os.write(2, (f"jaxgpt train: the distributed runtime did not start within {timeout:g}s "
                     f"(coordinator {where}): process 0 unreachable or not every process "
                     f"joined; check --coordinator, --num-processes and that all processes "
                     f"run\n").encode())
        os._exit(1)

    # CPU devices talk over gloo (the default CPU client cannot run cross-process collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes,
            process_id=args.process_id, initialization_timeout=int(timeout) + 60)
    except (RuntimeError, ValueError, TypeError) as e:  # e.g. no process count from anywhere
        raise fail(f"cannot start the distributed runtime: {str(e).splitlines()[0]}") from e
    finally:
        watchdog.cancel()


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
    from jaxgpt.train import TrainConfig, TrainingDiverged, TrainingInterrupted, train_loop

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

    if args.init_from and Path(args.out).resolve() in Path(args.init_from).resolve().parents:
        raise fail(f"--init-from {args.init_from} is inside --out {args.out}, where checkpoints "
                   f"are rotated out; copy it elsewhere or choose another --out")
    _start_distributed(args, fail)
    _enable_compile_cache(args)
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

    try:
        if args.token_file:
            tokens = data.load_token_file(args.token_file)
            source = f"token file {args.token_file}"
        elif args.text_file:
            tokens, source = data.tokenize_file(args.text_file), f"text file {args.text_file}"
        else:
            tokens = data.tokenize_text(data.demo_corpus())
            source = "the demo corpus (Python's help topics, pydoc_data.topics)"
        train_tokens, val_tokens = data.train_val_split(tokens, tc.train_ratio)
        _log(f"jaxgpt train: {desc}; {source}: {len(tokens):,} tokens "
             f"({len(train_tokens):,} train / {len(val_tokens):,} validation)")
        records = train_loop(cfg, tc, train_tokens, val_tokens, args.out, resume=args.resume,
                             params=params)
    except TrainingDiverged:
        return 1  # the loop has said what happened and where the last good checkpoint is
    except TrainingInterrupted as e:
        argv = list(getattr(args, "argv", None) or sys.argv[1:])
        again = shlex.join(["jaxgpt", *argv, *([] if "--resume" in argv else ["--resume"])])
        _log(f"jaxgpt train: interrupted ({e}). Resume with: {again}")
        return 128 + e.signum
    except KeyboardInterrupt:  # outside the steps, where the loop handles the signals itself
        _log(f"jaxgpt train: interrupted outside the training steps; checkpoints saved before "
             f"in {args.out} are intact")
        return 130
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        raise fail(str(e)) from e
    except Exception as e:
        import jax

        if jax.process_count() == 1 or not isinstance(e, jax.errors.JaxRuntimeError):
            raise
        # A collective failed: another process died or was killed (its log says why). Exit
        # at once: JAX's shutdown at exit would wait for the dead process, then abort.
        import os

        print(f"jaxgpt train: another process failed or was killed (process "
              f"{jax.process_index()} stopped: {str(e).splitlines()[0]}); checkpoints committed "
              f"before are intact, resume with --resume", file=sys.stderr, flush=True)
        os._exit(1)
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
    _add_attention(sub)
    _add_info(sub)
    _add_convert(sub)
    _add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to print a resume command
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
