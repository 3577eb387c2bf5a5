"""Issue-28 figures: a TopK SAE trained by jaxgpt next to sae-lens 6.54.12, in one run.

Both sides train the same SAE (TopK, d_sae 6,144, k 32, sae-lens's TopK defaults:
`rescale_acts_by_decoder_norm`, decoder rows at norm 0.1, `W_enc = W_dec.T`, no dead features
in so short a run) from the same initial weights (jaxgpt's `init_sae`) on
`blocks.6.hook_resid_pre` of the same random GPT-2-small-shaped model (jaxgpt's weights,
written once as a Hugging Face directory; sae-lens gets them as a HookedTransformer, not folded
or centred), over the same random tokens: context 128, batches of 4,096 tokens, Adam at lr
3e-4 with sae-lens's gradient clip at norm 1, fp32.

The same tokens in the same order: jaxgpt's store holds one batch at a time
(`n_batches_in_buffer=1`: the model runs over 32 windows, their rows are shuffled, and the SAE
steps on them), taking the windows in the order `ActivationStore.epoch_order(0)` gives; sae-lens
reads the windows in that order too, 32 per step (one LM batch, its mixing buffer one batch).
Each step of either side trains on the same 4,096 tokens (shuffled among themselves, which
changes the update only by rounding), so the two SAEs follow one path: the run checks that
their held-out L0 is equal and their explained variance within 0.01, and prints how far apart
their weights end.

What is timed, in wall-clock and CPU seconds (all threads; the steadier figure on a machine
shared with other work), alternating the two sides (the first side swaps each round):

- end to end: jaxgpt's `train_saes(...)` call (store, model forward passes, SAE steps, and
  compiling its step, which it does for each run); sae-lens's `LanguageModelSAETrainingRunner`
  construction and `run()`. Not timed: building the model and its HookedTransformer, the
  tokens, the initial SAE, and one warm-up run of each side before the timed ones.
- the LM forward pass of a batch alone: `--steps` batches of each side's activation store
  (jaxgpt's `ActivationStore.next_batch`, sae-lens's `next(ActivationsStore)`), after one.
- the SAE step alone: `--steps` steps on one fixed batch of 4,096 activations after an untimed
  one: jaxgpt's `make_sae_step` (jitted, compiled beforehand), sae-lens's `SAETrainer.step`
  (forward, firing statistics, backward, clip, Adam).

Held-out L0 and explained variance: both sides' trained SAEs on the activations of the same
held-out windows (each side's own model computes them), by sae-lens's evals definitions (L0:
nonzero features per token; explained variance `1 - E|x - x_hat|^2 / (E|x|^2 - |E x|^2)`).

    python scripts/bench_sae.py --saelens-python ~/saelens-venv/bin/python
    python scripts/bench_sae.py --no-saelens --quick     # jaxgpt only, a tiny model (the test)

sae-lens pins transformer-lens<4, so it gets its own environment (docs/performance.md):

    python3 -m venv ~/saelens-venv
    ~/saelens-venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    ~/saelens-venv/bin/pip install sae-lens==6.54.12
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "scripts" / "bench_sae_saelens.py"
# The two SAEs' held-out L0 must be equal (to a hundredth of a feature a token: a few tokens
# where a k-th pre-activation of ~0 rounds either way) and explained variance within 0.01
# (issue 28).
L0_TOL, EV_TOL = 0.01, 0.01


@dataclass(frozen=True)
class Setup:
    """The model, the SAE and the batches both sides train with."""

    model: dict[str, Any]  # GPTConfig fields
    hook_name: str
    d_sae: int
    k: int
    context: int
    batch_tokens: int
    heldout_windows: int
    tokens: int  # default --tokens
    steps: int  # default --steps
    repeats: int  # default --repeats


FULL = Setup(dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12),
             "blocks.6.hook_resid_pre", 6144, 32, 128, 4096, 32, 32768, 5, 3)
QUICK = Setup(dict(vocab_size=256, context_length=32, emb_dim=64, n_heads=4, n_layers=2),
              "blocks.1.hook_resid_pre", 256, 8, 32, 256, 8, 1024, 2, 1)


def timed(fn: Callable[[], Any], n: int) -> dict[str, float]:
    """Seconds and CPU seconds (all the process's threads) per call of `fn`, over `n` calls
    after an untimed one (which compiles, or lets torch allocate)."""
    fn()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return {"seconds": (time.perf_counter() - t0) / n,
            "cpu_seconds": (time.process_time() - c0) / n}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saelens-python", type=Path,
                   help="a Python with sae-lens 6.54.12 and torch (see docs/performance.md)")
    p.add_argument("--no-saelens", action="store_true", help="the jaxgpt side only")
    p.add_argument("--quick", action="store_true", help="a tiny model and SAE (for the test)")
    p.add_argument("--tokens", type=int, help="tokens each timed run trains on (default "
                   f"{FULL.tokens:,}; --quick {QUICK.tokens:,}); a multiple of the batch")
    p.add_argument("--repeats", type=int, help="timed rounds of each side (default "
                   f"{FULL.repeats}; --quick {QUICK.repeats})")
    p.add_argument("--steps", type=int, help="SAE steps, and LM batches, per timed round of "
                   f"the step and the forward pass alone (default {FULL.steps}; --quick "
                   f"{QUICK.steps})")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    setup = QUICK if args.quick else FULL
    args.tokens = setup.tokens if args.tokens is None else args.tokens
    args.repeats = setup.repeats if args.repeats is None else args.repeats
    args.steps = setup.steps if args.steps is None else args.steps
    if args.tokens < setup.batch_tokens or args.tokens % setup.batch_tokens:
        p.error(f"--tokens must be a positive multiple of the batch, {setup.batch_tokens:,}; "
                f"got {args.tokens:,}")
    for name in ("repeats", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.no_saelens == (args.saelens_python is not None):
        p.error("give --saelens-python PATH (a Python with sae-lens 6.54.12) or --no-saelens")
    if args.saelens_python is not None and not os.access(args.saelens_python, os.X_OK):
        p.error(f"--saelens-python {args.saelens_python} is not an executable file")
    args.setup = setup
    return args


class SaeLens:
    """The sae-lens worker (`scripts/bench_sae_saelens.py`) in sae-lens's Python: one JSON
    command a line in, one JSON answer a line out; its log goes to `work/saelens.log`."""

    def __init__(self, python: Path, work: Path):
        self.log_path = work / "saelens.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
        self.proc = subprocess.Popen([str(python), str(WORKER), str(work)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env)
        self.ready = self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log_path.read_text()[-3000:]
            raise SystemExit(f"the sae-lens worker stopped (exit {self.proc.returncode}); the "
                             f"end of {self.log_path}:\n{tail}")
        return json.loads(line)

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def trained(self) -> dict[str, np.ndarray]:
        """The weights of the SAE the worker trained last."""
        return dict(np.load(self.log_path.parent / "saelens_trained.npz"))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self._log.close()


class Jaxgpt:
    """The jaxgpt side: the model, its tokens, and the same SAE and settings."""

    def __init__(self, setup: Setup, args: argparse.Namespace, work: Path | None):
        import jax

        from jaxgpt.config import GPTConfig
        from jaxgpt.nn.model import init_params
        from jaxgpt.sae.model import SAEConfig, init_sae
        from jaxgpt.sae.store import ActivationStore

        self.setup, self.args = setup, args
        self.cfg = GPTConfig(**setup.model, drop_rate=0.0, qkv_bias=True, tie_embeddings=True)
        self.params = jax.device_put(init_params(self.cfg, args.seed))
        t = setup.context
        windows = args.tokens // t
        rng = np.random.default_rng(args.seed)
        all_ids = rng.integers(0, self.cfg.vocab_size, (windows + setup.heldout_windows, t))
        self.train_ids = all_ids[:windows].astype(np.int32)
        self.heldout_ids = all_ids[windows:].astype(np.int32)
        # sae-lens's TopK training defaults (checked against its own config at start-up).
        self.sae_cfg = SAEConfig("topk", self.cfg.emb_dim, setup.d_sae, k=setup.k,
                                 rescale_acts_by_decoder_norm=True, hook_name=setup.hook_name)
        self.init = init_sae(self.sae_cfg, jax.random.key(args.seed))
        self.tc = self.train_config(args.tokens)
        store = ActivationStore(self.params, self.cfg, self.train_ids.reshape(-1),
                                [setup.hook_name], self.tc)
        self.order = store.epoch_order(0)
        self.heldout = self.activations(self.heldout_ids)
        self.step_acts = self.activations(self.train_ids[self.order[:setup.batch_tokens // t]])
        if work is not None:
            self.write(work)

    def train_config(self, tokens: int) -> Any:
        from jaxgpt.sae.train_config import SAETrainConfig

        s = self.setup
        return SAETrainConfig(training_tokens=tokens, train_batch_size_tokens=s.batch_tokens,
                              context_size=s.context, n_batches_in_buffer=1,
                              store_batch_size_prompts=s.batch_tokens // s.context,
                              lr=self.args.lr, seed=self.args.seed, dtype="float32")

    def activations(self, ids: np.ndarray) -> np.ndarray:
        """The hook's activations of windows `ids [W, T]`, `[W * T, d_in]`."""
        import re

        from jaxgpt.interp.cache import run_with_cache

        layer = int(re.match(r"blocks\.(\d+)\.", self.setup.hook_name).group(1))
        out = []
        for rows in np.array_split(ids, max(1, len(ids) // 32)):
            _, cache = run_with_cache(self.params, self.cfg, rows,
                                      names=[self.setup.hook_name], stop_at_layer=layer + 1)
            out.append(np.asarray(cache[self.setup.hook_name]).reshape(-1, self.cfg.emb_dim))
        return np.concatenate(out)

    def write(self, work: Path) -> None:
        """What the sae-lens worker reads (its docstring lists the files)."""
        from jaxgpt.io.hf import save_pretrained

        s = self.setup
        save_pretrained(self.params, self.cfg, work / "hf")
        np.save(work / "train_tokens.npy", self.train_ids[self.order])  # jaxgpt's order
        np.save(work / "heldout_tokens.npy", self.heldout_ids)
        np.save(work / "heldout_acts.npy", self.heldout)
        np.save(work / "step_acts.npy", self.step_acts)
        np.savez(work / "sae_init.npz", **{k: np.asarray(v) for k, v in self.init.params.items()})
        spec = dict(hook_name=s.hook_name, d_in=self.cfg.emb_dim, d_sae=s.d_sae, k=s.k,
                    lr=self.args.lr, context=s.context, batch_tokens=s.batch_tokens,
                    seed=self.args.seed)
        (work / "spec.json").write_text(json.dumps(spec))

    def train(self, tokens: int) -> dict[str, Any]:
        import jax

        from jaxgpt.sae.training import train_saes

        tc = self.train_config(tokens)
        t0, c0 = time.perf_counter(), time.process_time()
        (sae,) = train_saes(self.params, self.cfg, self.train_ids.reshape(-1), [self.sae_cfg],
                            tc, saes=[self.init], progress=False)
        jax.block_until_ready(sae)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.trained = sae
        return {"seconds": seconds, "cpu_seconds": cpu, "steps": tc.steps, **self.evaluate(sae)}

    def evaluate(self, sae: Any) -> dict[str, float]:
        """Held-out L0 and explained variance (sae-lens's evals definitions, float64 sums)."""
        from jaxgpt.sae.model import decode, encode

        acts = np.asarray(encode(sae, self.heldout))
        recon = np.asarray(decode(sae, acts), np.float64)
        x = self.heldout.astype(np.float64)
        total = np.square(x).sum(-1).mean() - np.square(x.mean(0)).sum()
        ev = 1 - np.square(x - recon).sum(-1).mean() / total
        return {"l0": float((acts != 0).sum(-1).mean()), "explained_variance": float(ev)}

    def forward_timer(self) -> Callable[[int], dict[str, float]]:
        """`run(n)`: the time of `n` batches of the activation store `train_saes` uses (with
        one batch a buffer, each runs the model over one batch's windows), after one."""
        import jax

        from jaxgpt.sae.store import ActivationStore

        store = ActivationStore(self.params, self.cfg, self.train_ids.reshape(-1),
                                [self.setup.hook_name], self.tc)
        return lambda n: timed(lambda: jax.block_until_ready(store.next_batch()), n)

    def step_timer(self) -> Callable[[int], dict[str, float]]:
        """`run(n)`: the time of `n` jitted SAE steps on `step_acts` from the initial SAE,
        after one; the step is compiled here (`step_compile_s`)."""
        import jax
        import jax.numpy as jnp

        from jaxgpt.sae.step import init_sae_state, make_sae_step

        step = make_sae_step(self.tc)
        acts = jnp.asarray(self.step_acts)
        held: dict[str, Any] = {}

        def one() -> None:
            held["state"], metrics = step(held["state"], acts)  # the state is donated
            jax.block_until_ready(metrics)

        def run(n: int) -> dict[str, float]:
            held["state"] = init_sae_state([self.sae_cfg], self.tc, saes=[self.init])
            return timed(one, n)

        t0 = time.perf_counter()
        held["state"] = init_sae_state([self.sae_cfg], self.tc, saes=[self.init])
        one()
        self.step_compile_s = time.perf_counter() - t0
        return run


def check_same_sae(ours: Any, theirs: dict[str, Any]) -> None:
    """SystemExit unless sae-lens's TopK training config has the settings jaxgpt's has."""
    for name in ("d_in", "d_sae", "k", "apply_b_dec_to_input", "normalize_activations",
                 "rescale_acts_by_decoder_norm", "decoder_init_norm", "aux_loss_coefficient"):
        if getattr(ours, name) != theirs.get(name):
            raise SystemExit(f"sae-lens's TopK SAE has {name}={theirs.get(name)!r}, jaxgpt's "
                             f"{getattr(ours, name)!r}: the two would not train the same SAE")


def spread(values: list[float]) -> str:
    """`median (min-max, +-x%)`."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.1f}"
    return (f"{med:,.1f} ({min(values):,.1f}-{max(values):,.1f}, "
            f"{(max(values) - min(values)) / med:.0%})")


def table(res: dict[str, Any], tokens: int) -> str:
    """The results as a Markdown table: each side's figures and jaxgpt's speed-up."""
    sides = [s for s in ("jaxgpt", "sae-lens") if s in res]
    figures = {  # label -> side -> values over the rounds; True where higher is faster
        "end to end, tokens/s": ({s: [tokens / r["seconds"] for r in res[s]["train"]]
                                  for s in sides}, True),
        "end to end, tokens per CPU-second": ({s: [tokens / r["cpu_seconds"]
                                                   for r in res[s]["train"]] for s in sides},
                                              True),
        "LM forward of a batch, ms": ({s: [1000 * r["seconds"] for r in res[s]["forward"]]
                                       for s in sides}, False),
        "LM forward of a batch, CPU ms": ({s: [1000 * r["cpu_seconds"]
                                               for r in res[s]["forward"]] for s in sides},
                                          False),
        "SAE step alone, ms": ({s: [1000 * r["seconds"] for r in res[s]["step"]]
                                for s in sides}, False),
        "SAE step alone, CPU ms": ({s: [1000 * r["cpu_seconds"] for r in res[s]["step"]]
                                    for s in sides}, False),
    }
    lines = ["| | " + " | ".join(sides) + " | jaxgpt's speed-up |",
             "|---|" + "---:|" * (len(sides) + 1)]
    for label, (values, higher) in figures.items():
        ratio = ""
        if len(sides) == 2:
            a, b = (statistics.median(values[s]) for s in sides)
            ratio = f"{(a / b if higher else b / a):.2f}x"
        lines.append(f"| {label} | " + " | ".join(spread(values[s]) for s in sides)
                     + f" | {ratio} |")
    for key, label in (("l0", "held-out L0"), ("explained_variance",
                                                "held-out explained variance")):
        lines.append(f"| {label} | " + " | ".join(f"{res[s]['train'][-1][key]:.4f}"
                                                  for s in sides) + " | |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    args = parse_args()
    setup = args.setup
    import jax

    print(f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          f"jax {jax.__version__} ({jax.default_backend()})", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_sae_") as tmp:
        work = None if args.no_saelens else Path(tmp)
        t0 = time.perf_counter()
        ours = Jaxgpt(setup, args, work)
        print(f"setup {time.perf_counter() - t0:.1f}s: {setup.hook_name}, TopK d_sae "
              f"{setup.d_sae:,} k {setup.k}, context {setup.context}, batches of "
              f"{setup.batch_tokens:,} tokens, {args.tokens:,} tokens a run, "
              f"{args.repeats} round(s)", flush=True)
        theirs = None
        try:
            if work is not None:
                theirs = SaeLens(args.saelens_python, work)
                check_same_sae(ours.sae_cfg, theirs.ready["sae_cfg"])
                print(f"sae-lens {theirs.ready['sae_lens']}, torch {theirs.ready['torch']} "
                      f"({theirs.ready['threads']} threads); its activations are within "
                      f"{theirs.ready['heldout_gap']:.1e} of jaxgpt's", flush=True)
            res = run_rounds(args, ours, theirs)
        finally:
            if theirs is not None:
                theirs.close()
    report(args, ours, res)


PHASES = {"train": "end to end", "forward": "LM forward of a batch",
          "step": "SAE step alone"}


def run_rounds(args: argparse.Namespace, ours: Jaxgpt, theirs: SaeLens | None
               ) -> dict[str, Any]:
    """A warm-up run of each side, then for each phase `args.repeats` rounds of each side,
    alternating, the first side swapping each round."""
    batch = args.setup.batch_tokens
    mine = {"train": ours.train, "forward": ours.forward_timer(), "step": ours.step_timer()}
    ours.train(batch)
    if theirs is not None:
        theirs.ask(op="train", n=batch)
    sides = ["jaxgpt"] + (["sae-lens"] if theirs is not None else [])
    res: dict[str, Any] = {side: {phase: [] for phase in PHASES} for side in sides}
    for phase, n in (("train", args.tokens), ("forward", args.steps), ("step", args.steps)):
        for r in range(args.repeats):
            for side in sides if r % 2 == 0 else sides[::-1]:
                got = mine[phase](n) if side == "jaxgpt" else \
                    theirs.ask(op=phase, n=n)  # type: ignore[union-attr]
                res[side][phase].append(got)
                print(f"round {r + 1}, {PHASES[phase]}, {side}: {got['seconds']:,.2f}s "
                      f"(CPU {got['cpu_seconds']:,.2f}s)" + (
                          f", L0 {got['l0']:.2f}, explained variance "
                          f"{got['explained_variance']:.4f}" if phase == "train" else ""),
                      flush=True)
    if theirs is not None:
        res["weights_gap"] = weights_gap(ours.trained, theirs.trained())
    return res


def weights_gap(ours: Any, theirs: dict[str, np.ndarray]) -> dict[str, float]:
    """How far apart the two sides' trained SAEs are: each weight's largest difference
    relative to its largest entry."""
    return {k: float(np.abs(np.asarray(v) - theirs[k]).max() / np.abs(theirs[k]).max())
            for k, v in ours.params.items() if np.abs(theirs[k]).max() > 0}


def report(args: argparse.Namespace, ours: Jaxgpt, res: dict[str, Any]) -> None:
    print()
    print(table(res, args.tokens))
    print(f"\njaxgpt's SAE step compiles in {ours.step_compile_s:.1f}s, once a process "
          f"(train_saes caches it: the timed runs after the warm-up do not pay it). Load "
          f"average after: {os.getloadavg()[0]:.2f}.")
    problems = []
    if "sae-lens" in res:
        a, b = res["jaxgpt"]["train"][-1], res["sae-lens"]["train"][-1]
        dl0, dev = abs(a["l0"] - b["l0"]), abs(a["explained_variance"] -
                                               b["explained_variance"])
        print(f"held-out |L0 difference| {dl0:.3f} (bound {L0_TOL}), |explained variance "
              f"difference| {dev:.5f} (bound {EV_TOL})")
        gaps = ", ".join(f"{k} {v:.1e}" for k, v in res["weights_gap"].items())
        print(f"the two trained SAEs' largest weight differences, relative to the largest "
              f"weight: {gaps}")
        if dl0 > L0_TOL or dev > EV_TOL:
            problems.append("the two SAEs' held-out L0 or explained variance differ beyond "
                            "the bounds")
    if args.json is not None:
        args.json.write_text(json.dumps({"tokens": args.tokens, **res}, indent=1) + "\n")
    if problems:
        raise SystemExit("; ".join(problems))


if __name__ == "__main__":
    main()
