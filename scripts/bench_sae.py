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
changes the update only by rounding), so the two SAEs follow one path and their held-out L0
and explained variance agree to rounding, which the run checks (within 0.01 and 0.5).

What is timed, alternating the two sides (the first side swaps each round) so that other work
on the machine slows both alike:

- end to end: jaxgpt's `train_saes(...)` call (store, model forward passes, SAE steps, and
  compiling its step, which it does for each run); sae-lens's `LanguageModelSAETrainingRunner`
  construction and `run()`. Not timed: building the model and its HookedTransformer, the
  tokens, the initial SAE, and one warm-up run of each side before the timed ones.
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
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "scripts" / "bench_sae_saelens.py"
# Each side's held-out L0 and explained variance must agree within these (issue 28).
L0_TOL, EV_TOL = 0.5, 0.01


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
    p.add_argument("--steps", type=int, help="SAE steps per timed round of the step alone "
                   f"(default {FULL.steps}; --quick {QUICK.steps})")
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
        t0 = time.perf_counter()
        (sae,) = train_saes(self.params, self.cfg, self.train_ids.reshape(-1), [self.sae_cfg],
                            tc, saes=[self.init], progress=False)
        jax.block_until_ready(sae)
        seconds = time.perf_counter() - t0
        self.trained = sae
        return {"seconds": seconds, "steps": tc.steps, **self.evaluate(sae)}

    def evaluate(self, sae: Any) -> dict[str, float]:
        """Held-out L0 and explained variance (sae-lens's evals definitions, float64 sums)."""
        from jaxgpt.sae.model import decode, encode

        acts = np.asarray(encode(sae, self.heldout))
        recon = np.asarray(decode(sae, acts), np.float64)
        x = self.heldout.astype(np.float64)
        total = np.square(x).sum(-1).mean() - np.square(x.mean(0)).sum()
        ev = 1 - np.square(x - recon).sum(-1).mean() / total
        return {"l0": float((acts != 0).sum(-1).mean()), "explained_variance": float(ev)}

    def step_timer(self) -> Any:
        """`run(steps) -> seconds per step` of the jitted SAE step on `step_acts`, compiled
        here; each call starts from the initial SAE and times `steps` steps after one."""
        import jax
        import jax.numpy as jnp

        from jaxgpt.sae.step import init_sae_state, make_sae_step

        step = make_sae_step(self.tc)
        acts = jnp.asarray(self.step_acts)
        t0 = time.perf_counter()
        state = init_sae_state([self.sae_cfg], self.tc, saes=[self.init])
        jax.block_until_ready(step(state, acts))
        self.step_compile_s = time.perf_counter() - t0

        def run(steps: int) -> float:
            state = init_sae_state([self.sae_cfg], self.tc, saes=[self.init])
            state, m = step(state, acts)
            jax.block_until_ready((state, m))
            t0 = time.perf_counter()
            for _ in range(steps):
                state, m = step(state, acts)
            jax.block_until_ready((state, m))
            return (time.perf_counter() - t0) / steps

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
    """The results as a Markdown table: each side's figures and jaxgpt's ratio."""
    sides = [s for s in ("jaxgpt", "sae-lens") if s in res]
    rate = {s: [tokens / r["seconds"] for r in res[s]["train"]] for s in sides}
    ms = {s: [1000 * x for x in res[s]["step"]] for s in sides}
    rows = [("end to end, tokens/s", {s: spread(rate[s]) for s in sides},
             lambda: statistics.median(rate["jaxgpt"]) / statistics.median(rate["sae-lens"])),
            ("SAE step alone, ms", {s: spread(ms[s]) for s in sides},
             lambda: statistics.median(ms["sae-lens"]) / statistics.median(ms["jaxgpt"])),
            ("held-out L0", {s: f"{res[s]['train'][-1]['l0']:.2f}" for s in sides}, None),
            ("held-out explained variance",
             {s: f"{res[s]['train'][-1]['explained_variance']:.4f}" for s in sides}, None)]
    lines = ["| | " + " | ".join(sides) + " | jaxgpt's speed-up |",
             "|---|" + "---:|" * (len(sides) + 1)]
    for label, cells, ratio in rows:
        r = f"{ratio():.2f}x" if ratio is not None and len(sides) == 2 else ""
        lines.append(f"| {label} | " + " | ".join(cells[s] for s in sides) + f" | {r} |")
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


def run_rounds(args: argparse.Namespace, ours: Jaxgpt, theirs: SaeLens | None
               ) -> dict[str, Any]:
    """Warm-up runs, then `args.repeats` alternating rounds of each side's run and steps."""
    batch = args.setup.batch_tokens
    run_ours = ours.step_timer()
    ours.train(batch)  # warm-up (compiles the store's forward pass)
    if theirs is not None:
        theirs.ask(op="train", tokens=batch)
    res: dict[str, Any] = {"jaxgpt": {"train": [], "step": []}}
    if theirs is not None:
        res["sae-lens"] = {"train": [], "step": []}
    for r in range(args.repeats):
        order = ["jaxgpt", "sae-lens"][:len(res)]
        for side in order if r % 2 == 0 else order[::-1]:
            got = ours.train(args.tokens) if side == "jaxgpt" else \
                theirs.ask(op="train", tokens=args.tokens)  # type: ignore[union-attr]
            res[side]["train"].append(got)
            print(f"round {r + 1} {side}: {args.tokens / got['seconds']:,.1f} tokens/s "
                  f"({got['seconds']:.1f}s), L0 {got['l0']:.2f}, explained variance "
                  f"{got['explained_variance']:.4f}", flush=True)
    for r in range(args.repeats):
        order = ["jaxgpt", "sae-lens"][:len(res)]
        for side in order if r % 2 == 0 else order[::-1]:
            s = run_ours(args.steps) if side == "jaxgpt" else \
                theirs.ask(op="step", steps=args.steps)["seconds_per_step"]  # type: ignore
            res[side]["step"].append(s)
            print(f"round {r + 1} {side}: SAE step {1000 * s:,.1f} ms", flush=True)
    return res


def report(args: argparse.Namespace, ours: Jaxgpt, res: dict[str, Any]) -> None:
    print()
    print(table(res, args.tokens))
    print(f"\njaxgpt's step compiled in {ours.step_compile_s:.1f}s (each train_saes call "
          f"compiles it; included above). Load average after: {os.getloadavg()[0]:.2f}.")
    problems = []
    if "sae-lens" in res:
        a, b = res["jaxgpt"]["train"][-1], res["sae-lens"]["train"][-1]
        dl0, dev = abs(a["l0"] - b["l0"]), abs(a["explained_variance"] -
                                               b["explained_variance"])
        print(f"held-out |L0 difference| {dl0:.3f} (bound {L0_TOL}), |explained variance "
              f"difference| {dev:.5f} (bound {EV_TOL})")
        if dl0 > L0_TOL or dev > EV_TOL:
            problems.append("the two SAEs' held-out L0 or explained variance differ beyond "
                            "the bounds")
    if args.json is not None:
        args.json.write_text(json.dumps({"tokens": args.tokens, **res}, indent=1) + "\n")
    if problems:
        raise SystemExit("; ".join(problems))


if __name__ == "__main__":
    main()
