"""`jaxgpt generate`: text from a prompt, greedy or sampled, streamed or not."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from jaxgpt.cli.common import (
    CompileClock,
    add_cache_args,
    add_model_args,
    enable_compile_cache,
    field_flags,
    flag_error,
    load_model,
    log,
    peek_config,
)
from jaxgpt.cli.interrupts import claim_the_line, raising
from jaxgpt.config import GPTConfig


def add(sub: Any) -> None:
    from jaxgpt.nn.quant import MODES

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
    p.add_argument("--eos", action="store_true", dest="eos_id",
                   help="stop once the model emits <|endoftext|> (id 50256; it is printed)")
    p.add_argument("--quantize", choices=MODES, default=None,
                   help="decode with int8 weights, quantized once after loading: int8 (products "
                        "in float) or w8a8 (activations int8 per token too, int32 accumulation); "
                        "default: float32 weights")
    add_model_args(p)
    add_cache_args(p)
    # The flags that set GenerationConfig's fields (and `generate`'s quantize) have the
    # fields' names as their dests.
    p.set_defaults(func=run, flags=field_flags(p))


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


def run(args: argparse.Namespace) -> int:
    """Generate from `args.prompt`; the text on stdout, timings on stderr. Ctrl-C prints the
    text generated so far and returns 130."""
    import jax

    from jaxgpt.tokenizer import get_tokenizer, text_to_token_ids

    _check_flags(args)
    t_start = time.perf_counter()
    cfg = peek_config(args)  # config.json only: the flags are checked before the weights load
    config = _generation_config(args, cfg)
    tokenizer = get_tokenizer()
    idx = text_to_token_ids(args.prompt, tokenizer)
    _check_buffer(args, cfg, idx.shape[1], config)
    cache_dir = enable_compile_cache(args)
    clock = CompileClock()  # random weights are made by a compiled init: count it apart
    with clock:
        cfg, params, desc = load_model(args)
        jax.block_until_ready(params)
    t_load, compile_load = time.perf_counter() - t_start, clock.seconds
    log(f"jaxgpt: {desc}. Backend: {jax.default_backend()}")
    if idx.shape[1] > cfg.context_length:
        log(f"jaxgpt: the prompt has {idx.shape[1]} tokens; the model sees the last "
            f"{cfg.context_length}")
    prompt = [int(t) for t in idx[0]]
    if max(prompt) >= cfg.vocab_size:
        raise _fail(f"the prompt holds GPT-2 token id {max(prompt)}, outside the model's "
                    f"vocabulary [0, {cfg.vocab_size}): this model does not use GPT-2's "
                    f"tokenizer")
    past = _warn_past_context(args, cfg, params, len(prompt))
    gen = _generator(args, cfg, params)
    del params  # with --quantize, the generator holds the int8 weights only
    key = jax.random.key(args.seed) if config.temperature > 0 else None
    progress = (_TokenProgress(args.max_new_tokens)
                if past > 0 and args.max_new_tokens and args.num_samples == 1 else None)
    t0 = time.perf_counter()
    with raising():  # Ctrl-C as a KeyboardInterrupt: the text so far is printed
        try:
            with clock:
                n_new, interrupted = _print_generation(args, gen, prompt, config, key,
                                                       progress)
        except (ValueError, FloatingPointError) as e:  # a bad value, or NaN logits
            raise _fail(str(e)) from e
        if interrupted:
            log(f"jaxgpt generate: interrupted: {n_new} of "
                f"{args.max_new_tokens * args.num_samples} new tokens were generated (printed "
                f"above)")
            return 130
    # Compiling happens inside the call: its time is taken out.
    gen = max(time.perf_counter() - t0 - (clock.seconds - compile_load), 1e-9)
    log(f"jaxgpt: load {t_load - compile_load:.2f}s, compile {clock.seconds:.2f}s "
        f"({_compile_text(clock, cache_dir)}), generation {gen:.2f}s for {n_new} tokens: "
        f"{n_new / gen:.1f} tokens/s")
    return 0


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"jaxgpt generate: {msg}")


def _check_flags(args: argparse.Namespace) -> None:
    """SystemExit naming the flag, before anything is read, loaded or compiled."""
    from jaxgpt.inference.checks import check_count

    try:
        check_count(args.max_new_tokens, "--max-new-tokens")
    except ValueError as e:
        raise _fail(str(e)) from e
    if not args.prompt:
        raise _fail("--prompt is empty; give at least one character")
    if args.num_samples < 1:
        raise _fail(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_samples > 1 and args.stream:
        raise _fail("--stream prints one sample as it grows; drop it or --num-samples")


def _generation_config(args: argparse.Namespace, cfg: GPTConfig) -> Any:
    """The `GenerationConfig` of the flags, checked against `cfg`'s vocabulary; SystemExit
    naming the flag whose value it refuses (the config checks; this command only adds that
    --top-k and --top-p need a temperature)."""
    from jaxgpt.inference.sampling import GenerationConfig
    from jaxgpt.tokenizer import EOT_ID

    try:
        config = GenerationConfig(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            eos_id=EOT_ID if args.eos_id else None).check_vocab(cfg.vocab_size)
    except ValueError as e:
        raise _fail(flag_error(e, args.flags, {})) from e
    if config.temperature == 0 and (config.top_k is not None or config.top_p is not None):
        given = " and ".join(args.flags[f] for f in ("top_k", "top_p")
                             if getattr(config, f) is not None)
        raise _fail(f"{given} only apply when sampling, and sampling needs a temperature above "
                    f"0 (e.g. --temperature 1.0); without --temperature the output is greedy")
    return config


def _check_buffer(args: argparse.Namespace, cfg: GPTConfig, prompt_len: int,
                  config: Any) -> None:
    """SystemExit saying the limit if --max-new-tokens is more than the token buffer can hold,
    or the --num-samples rows more than the memory can, before the weights load or anything
    compiles (the rows are split over the devices as `generate_stream` splits them)."""
    from jaxgpt.inference.checks import check_generation_memory, check_new_tokens
    from jaxgpt.inference.decode import program_shape

    shape = program_shape(cfg, prompt_len, args.max_new_tokens)
    try:
        check_new_tokens(args.max_new_tokens, args.num_samples, shape.prompt_slots,
                         shape.new_slots, name="--max-new-tokens")
        check_generation_memory(cfg, args.num_samples, shape, sampling=config.sampling,
                                what=f"--num-samples {args.num_samples:,}", unit="samples")
    except ValueError as e:
        raise _fail(str(e)) from e


def _generator(args: argparse.Namespace, cfg: GPTConfig, params: Any) -> Any:
    """The `Generator` of the loaded weights, quantized as --quantize says (logged)."""
    from jaxgpt.inference.generator import Generator
    from jaxgpt.nn.model import nbytes, param_shapes, quantized_shapes

    try:
        gen = Generator(params, cfg, quantize=args.quantize)
    except ValueError as e:
        raise _fail(str(e)) from e
    if args.quantize:
        mib = 1024 * 1024
        log(f"jaxgpt: int8 weights ({args.quantize}), {nbytes(quantized_shapes(cfg)) / mib:.1f} "
            f"MiB (float32: {nbytes(param_shapes(cfg)) / mib:.1f} MiB)")
    return gen


def _warn_past_context(args: argparse.Namespace, cfg: GPTConfig, params: Any,
                       prompt_len: int) -> int:
    """How many new tokens lie past `context_length`; a warning with their cost if any."""
    from jaxgpt.nn.model import count_params

    past = min(prompt_len + args.max_new_tokens - cfg.context_length, args.max_new_tokens)
    if past > 0:
        first = max(cfg.context_length - prompt_len, 0) + 1
        flops = 2 * count_params(params)  # multiply-adds of one token through the weights
        log(f"jaxgpt: warning: {past} of the {args.max_new_tokens} new tokens lie past "
            f"context_length {cfg.context_length}: from new token {first} on, each one "
            f"recomputes the whole {cfg.context_length}-token window as the book does (a cache "
            f"cannot slide), about {_flop_text(flops * cfg.context_length)} per token instead "
            f"of {_flop_text(flops)}" + ("; progress follows" if args.num_samples == 1 else ""))
    return past


def _print_generation(args: argparse.Namespace, gen: Any, prompt: list[int], config: Any,
                      key: Any, progress: _TokenProgress | None) -> tuple[int, bool]:
    """Generate the --num-samples rows in chunks, the text printed as it grows (--stream) or
    at the end; `(new tokens, interrupted)`. Ctrl-C stops it at once (the chunk in flight is
    dropped) and what was generated before is printed."""
    from jaxgpt.inference.generator import cut_after_eos
    from jaxgpt.tokenizer import get_tokenizer, token_ids_to_text

    tokenizer = get_tokenizer()
    eos, k = config.eos_id, args.num_samples
    new: list[list[int]] = [[] for _ in range(k)]
    shown, interrupted = "", False
    chunks = gen.stream([prompt] * k, args.max_new_tokens, config,
                        chunk_size=8 if args.stream else 32, key=key)
    try:
        for chunk in chunks:
            for row, tokens in zip(new, np.asarray(chunk).tolist(), strict=True):
                row += tokens
            if progress:
                progress.add(chunk.shape[1])
            if args.stream:
                # Hold back a trailing partial UTF-8 character (shown as U+FFFD) until its
                # remaining bytes arrive, so the output ends as without --stream.
                text = token_ids_to_text(prompt + cut_after_eos(new[0], eos), tokenizer)
                print(text.rstrip("\ufffd")[len(shown):], end="", flush=True)
                shown = text.rstrip("\ufffd")
    except KeyboardInterrupt:
        claim_the_line()  # the text so far and the one line are this thread's to print
        interrupted = True
    if progress:
        progress.close()
    rows = [prompt + cut_after_eos(row, eos) for row in new]  # later slots repeat eos_id
    for i, row in enumerate(rows, 1):
        text = token_ids_to_text(row, tokenizer)
        if k > 1:
            print(f"--- sample {i} of {k} ---")
        print(text[len(shown):] if text.startswith(shown) else "", flush=True)
    return sum(len(row) - len(prompt) for row in rows), interrupted


def _compile_text(clock: CompileClock, cache_dir: str | None) -> str:
    """Where compiling went: XLA's share, and what the persistent cache supplied."""
    import os

    if cache_dir is not None:
        home = os.path.expanduser("~")
        if cache_dir.startswith(home + os.sep):
            cache_dir = "~" + cache_dir[len(home):]
    cache = ("compile cache off" if cache_dir is None else
             f"{clock.cache_hits} of {clock.programs} programs from the compile cache {cache_dir}")
    return f"XLA {clock.backend_seconds:.2f}s, the rest tracing and lowering; {cache}"
