"""`jaxgpt train`: train or fine-tune a GPT on a text or token file, on one or many processes."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from typing import Any

from jaxgpt.cli.common import (
    add_cache_args,
    check_output_dir,
    enable_compile_cache,
    flag_error,
    log,
    read_checkpoint,
)
from jaxgpt.config import PRESETS, GPTConfig
from jaxgpt.io.formats import FORMAT_NAMES
from jaxgpt.native_logs import start_backends

# The `TrainConfig` settings the command line sets, in the order `--help` lists them, as
# (field, flag or None for --field-name, add_argument overrides). Defaults, choices and help
# come from `TrainConfig`'s fields; the overrides say where a flag reads differently from its
# field: "also" is help the flag adds, "shown" the default its help shows.
_SETTINGS: tuple[tuple[str, str | None, dict], ...] = (
    ("steps", None, {}),
    ("batch_size", None, {}),
    ("seq_len", None, {"default": None, "shown": "min(256, context_length)"}),
    ("stride", None, {"type": int}),
    ("lr", None, {}),
    ("min_lr", None, {"type": float}),
    ("warmup_steps", None, {}),
    ("weight_decay", None, {}),
    ("grad_clip", None, {"also": "0 turns it off"}),
    ("grad_accum", None, {}),
    ("eval_every", None, {}),
    ("eval_iters", None, {}),
    ("save_every", None, {}),
    ("keep", None, {}),
    ("seed", None, {}),
    ("train_ratio", "--val-ratio", {"help": "fraction of the tokens held out for validation"}),
    ("dtype", None, {"choices": "DTYPES"}),
    ("remat", None, {"nargs": "?", "const": "block", "choices": "REMAT_MODES",
                     "also": "--remat alone: block"}),
    ("fsdp", None, {}),
    ("loss_chunk", None, {"type": int, "metavar": "N"}),
    ("sample_prompt", "--prompt", {}),
    ("sample_tokens", None, {}),
    ("log", None, {"metavar": "TRACKERS", "shown": "none: metrics.jsonl and loss.png only"}),
    ("wandb_project", None, {"type": str}),
    ("run_name", None, {"type": str}),
)


def _flag(name: str, flag: str | None) -> str:
    """The flag of the `TrainConfig` field `name` (`flag` from `_SETTINGS`)."""
    return flag or "--" + name.replace("_", "-")


def _add_setting(p: argparse.ArgumentParser, name: str, flag: str | None,
                 **overrides: Any) -> None:
    """The flag of the `TrainConfig` field `name`, its default and help taken from the field."""
    from jaxgpt.nn.model import REMAT_MODES
    from jaxgpt.training.config import DTYPES, TrainConfig
    from jaxgpt.training.config import default as config_default

    field = TrainConfig.__dataclass_fields__[name].metadata
    default = overrides.pop("default", config_default(name))
    if name == "train_ratio":  # the flag is the held-out fraction
        default = round(1.0 - config_default(name), 12)
    shown = overrides.pop("shown", field["none"] if default is None else default)
    help_text = overrides.pop("help", field["help"])
    if "also" in overrides:
        help_text += "; " + overrides.pop("also")
    if shown is not None and not isinstance(default, bool):
        help_text += f" (default {shown})"
    named = {"DTYPES": tuple(DTYPES), "REMAT_MODES": REMAT_MODES}
    choices = named.get(overrides.pop("choices", ""))
    kwargs: dict[str, Any] = {"default": default, "help": help_text, **overrides}
    if isinstance(default, bool):
        kwargs["action"] = "store_true"
    elif choices is not None:
        kwargs["choices"] = choices
    elif "type" not in kwargs:
        base = config_default(name)  # the field's own default says the flag's type
        if base is None:
            raise TypeError(f"_SETTINGS: give the type of --{name} (its default is None)")
        kwargs["type"] = type(base)
    p.add_argument(_flag(name, flag), **kwargs)


def _train_config(args: argparse.Namespace, cfg: GPTConfig | None = None) -> Any:
    """The `TrainConfig` of the flags, checked against the model `cfg` when given (without
    it, --seq-len's default is not yet cut to the model's context). `TrainConfig` checks the
    values; its errors are said here of the flags the user typed."""
    from jaxgpt.training.config import TrainConfig, default

    given = {name: getattr(args, _flag(name, flag).lstrip("-").replace("-", "_"))
             for name, flag, _ in _SETTINGS}
    values = dict(given)
    if values["seq_len"] is None:
        values["seq_len"] = min(default("seq_len"), cfg.context_length if cfg else math.inf)
    values["grad_clip"] = values["grad_clip"] or None  # 0 turns clipping off
    values["train_ratio"] = 1.0 - values["train_ratio"]
    try:
        tc = TrainConfig(**values)
        return tc.check_model(cfg) if cfg is not None else tc
    except ValueError as e:
        raise _fail(_flag_error(e, given)) from e


def _flag_error(e: Exception, given: dict[str, Any] | None = None) -> str:
    """A library error as the flags say it: `TrainConfig.field` as its flag (`_SETTINGS`),
    the value as typed (`given`), and `resume=True` as --resume."""
    flags = {name: _flag(name, flag) for name, flag, _ in _SETTINGS}
    typed = {k: v for k, v in (given or {}).items() if v is not None}
    return flag_error(e, flags, typed).replace("resume=True", "--resume")


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"jaxgpt train: {msg}")


def add(sub: Any) -> None:
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
    for name, flag, kwargs in _SETTINGS:
        _add_setting(p, name, flag, **kwargs)
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
    add_cache_args(p)
    p.set_defaults(func=run)


def _start_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` from --coordinator/--num-processes/--process-id (or the
    environment), before anything touches a device; one line and exit 1 if it cannot start
    within --distributed-timeout (JAX itself would abort with a stack trace)."""
    import os
    import threading

    import jax

    flags = (args.coordinator, args.num_processes, args.process_id)
    if jax.distributed.is_initialized():  # started by the caller (the README's Python route)
        if any(f is not None for f in flags):
            raise _fail("the distributed runtime is already running; drop --coordinator, "
                       "--num-processes and --process-id")
        return
    if all(f is None for f in flags) and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return  # one process
    if not args.distributed_timeout > 0:
        raise _fail(f"--distributed-timeout must be > 0 seconds, got {args.distributed_timeout}")
    if args.coordinator is not None:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _fail(f"--coordinator must be HOST:PORT with a port in 1..65535, "
                       f"got {args.coordinator!r}")
    if args.num_processes is not None and args.num_processes < 1:
        raise _fail(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and args.num_processes is not None and not (
            0 <= args.process_id < args.num_processes):
        raise _fail(f"--process-id must be in [0, {args.num_processes - 1}] for --num-processes "
                   f"{args.num_processes}, got {args.process_id}")
    where = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    timeout = args.distributed_timeout

    def give_up() -> None:
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
        raise _fail(f"cannot start the distributed runtime: {str(e).splitlines()[0]}") from e
    finally:
        watchdog.cancel()


def _train_model_config(args: argparse.Namespace) -> tuple[GPTConfig, Any, str]:
    """`(cfg, params or None, description)` from --preset / --config / --init-from / the default."""
    import json
    from pathlib import Path

    from jaxgpt.training.config import DEMO_CONFIG

    if args.init_from:
        cfg, params, fmt = read_checkpoint(args.init_from)
        return cfg, params, f"fine-tuning the {FORMAT_NAMES[fmt]} {args.init_from}"
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
    return DEMO_CONFIG, None, "the small demo config (jaxgpt.training.config.DEMO_CONFIG)"


def run(args: argparse.Namespace) -> int:
    """Train as the flags say; the last step's losses on stdout, progress on stderr."""
    _check_flags(args)
    _train_config(args)  # the settings checked before anything starts or loads
    _start_distributed(args)
    start_backends()
    enable_compile_cache(args)
    cfg, params, desc = _train_model_config(args)
    tc = _train_config(args, cfg)
    try:
        records = _train(args, cfg, tc, params, desc)
    except _Exit as e:
        return e.code
    if records:
        last = records[-1]
        val = f", val loss {last['val_loss']:.4f}" if "val_loss" in last else ""
        print(f"step {last['step']}: loss {last['loss']:.4f}{val}; {last['tokens_seen']:,} "
              f"tokens seen; outputs in {args.out}")
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """SystemExit naming the flag, before anything starts: the files and the output
    directory (the settings are `TrainConfig`'s to check, see `_train_config`)."""
    from pathlib import Path

    for name in ("text_file", "token_file"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            raise _fail(f"--{name.replace('_', '-')} {path} does not exist")
    check_output_dir(args.out, "--out", "train")
    if args.init_from and Path(args.out).resolve() in Path(args.init_from).resolve().parents:
        raise _fail(f"--init-from {args.init_from} is inside --out {args.out}, where "
                    f"checkpoints are rotated out; copy it elsewhere or choose another --out")


class _Exit(Exception):
    """The run ended with a message already given; the process exits with `code`."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _tokens(args: argparse.Namespace) -> tuple[Any, str]:
    """The token ids the flags name, and a description of where they came from."""
    from jaxgpt.training import data

    if args.token_file:
        try:
            return data.load_token_file(args.token_file), f"token file {args.token_file}"
        except data.TextNotTokens:
            raise _fail(f"{args.token_file} holds text, not uint16 token ids; train on it as a "
                        f"text file (--text-file), which tokenizes it") from None
    if args.text_file:
        return data.tokenize_file(args.text_file), f"text file {args.text_file}"
    tokens = data.tokenize_text(data.demo_corpus())
    return tokens, "the demo corpus (Python's help topics, pydoc_data.topics)"


def _train(args: argparse.Namespace, cfg: GPTConfig, tc: Any, params: Any,
           desc: str) -> list[dict]:
    """`train_loop` on the flags' data; each way it can end said in one line (`_Exit`)."""
    import warnings

    from jaxgpt.training import data
    from jaxgpt.training.loop import (
        ResumeWarning,
        TrainingDiverged,
        TrainingInterrupted,
        train_loop,
    )

    shown_as_python_shows = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if not issubclass(category, ResumeWarning):  # another library's: as Python shows it
            return shown_as_python_shows(message, category, filename, lineno, file, line)
        log(f"jaxgpt train: warning: {_flag_error(Warning(str(message)))}")

    try:
        tokens, source = _tokens(args)
        train_tokens, val_tokens = data.train_val_split(tokens, tc.train_ratio)
        log(f"jaxgpt train: {desc}; {source}: {len(tokens):,} tokens "
            f"({len(train_tokens):,} train / {len(val_tokens):,} validation)")
        with warnings.catch_warnings():
            warnings.simplefilter("always", ResumeWarning)
            warnings.showwarning = show  # the loop's ResumeWarnings in the flags' words
            return train_loop(cfg, tc, train_tokens, val_tokens, args.out, resume=args.resume,
                              params=params)
    except TrainingDiverged as e:
        log(_flag_error(e))  # what happened, and the last good checkpoint
        raise _Exit(1) from None
    except TrainingInterrupted as e:
        argv = list(getattr(args, "argv", None) or sys.argv[1:])
        again = shlex.join(["jaxgpt", *argv, *([] if "--resume" in argv else ["--resume"])])
        log(f"jaxgpt train: interrupted ({e}). Resume with: {again}")
        raise _Exit(128 + e.signum) from None
    except KeyboardInterrupt:  # outside the steps, where the loop handles the signals itself
        log(f"jaxgpt train: interrupted outside the training steps; checkpoints saved before "
            f"in {args.out} are intact")
        raise _Exit(130) from None
    except (FileExistsError, FileNotFoundError, PermissionError, ValueError) as e:
        raise _fail(_flag_error(e)) from e
    except Exception as e:
        _exit_if_a_peer_died(e)
        raise


def _exit_if_a_peer_died(e: Exception) -> None:
    """With several processes, a failed collective means another process died or was killed
    (its log says why): say so and exit at once, as JAX's shutdown at exit would wait for the
    dead process, then abort."""
    import os

    import jax

    if jax.process_count() == 1 or not isinstance(e, jax.errors.JaxRuntimeError):
        return
    print(f"jaxgpt train: another process failed or was killed (process "
          f"{jax.process_index()} stopped: {str(e).splitlines()[0]}); checkpoints committed "
          f"before are intact, resume with --resume", file=sys.stderr, flush=True)
    os._exit(1)
