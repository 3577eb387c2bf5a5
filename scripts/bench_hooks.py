"""What hook points cost when no hook is given: `jaxgpt.generate` on two source trees.

A (the baseline, default commit 9cb758e, the last before hook points, exported with `git
archive`) and B (default: this working tree) each run in fresh processes, alternately A B, B A,
... for `--rounds` rounds: 124M random weights, greedy `Generator.generate` at B=1 (prompt 4,
64 new tokens) and B=8 (prompt 32, 64 new), steady state (best of `--repeats` calls after a
warm-up call). The table gives each side's median and range over the rounds and B/A.

It also says whether the programs are the same: `aot.lower_generate` for 124M at B=1 and B=8
on each tree, as lowered StableHLO (locations and the module's name stripped) and as
optimized HLO (metadata stripped).

    python scripts/bench_hooks.py                       # 3 rounds, several minutes on 2 cores
    python scripts/bench_hooks.py --rounds 5 --baseline REV --candidate REV_OR_DIR
    python scripts/bench_hooks.py --programs-only       # the programs' comparison alone
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ((1, 4, 64), (8, 32, 64))  # batch, prompt length, new tokens


def _strip(hlo: str) -> str:
    """Compiled HLO without what names the source: file and function tables, metadata."""
    lines = [ln for ln in hlo.split("\n") if not re.match(r'^\s*\d+ ("|\{)', ln)]
    text = re.sub(r", metadata=\{[^}]*\}", "", "\n".join(lines))
    text = re.sub(r",? ?stack_frame_id=\d+", "", text)
    return re.sub(r"HloModule \S+", "HloModule", text)


def _strip_mlir(text: str) -> str:
    """Lowered StableHLO without locations and the module's name."""
    text = "\n".join(ln for ln in text.split("\n") if not ln.startswith("#loc"))
    text = re.sub(r" loc\([^()]*(\([^()]*\)[^()]*)*\)", "", text)
    return re.sub(r"module @\S+", "module", text)


def child(src: str, repeats: int, hlo: bool, timed: bool = True) -> None:
    """One side's run: prints a JSON line of timings (and program fingerprints)."""
    sys.path.insert(0, src)
    import jax
    import numpy as np

    import jaxgpt
    from jaxgpt.aot.lowering import lower_generate
    from jaxgpt.config import GPT_CONFIG_124M, GPTConfig

    assert Path(jaxgpt.__file__).resolve().is_relative_to(Path(src).resolve()), jaxgpt.__file__
    cfg = GPTConfig(**GPT_CONFIG_124M)
    gen = jaxgpt.Generator(jaxgpt.init_params(cfg, 0), cfg)
    out: dict = {"times": {}, "hlo": {}}
    rng = np.random.default_rng(0)
    for batch, prompt_len, new in WORKLOADS:
        prompt = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
        run = lambda: jax.block_until_ready(gen.generate(prompt, new))  # noqa: E731
        times = []
        for _ in range(repeats + 1 if timed else 0):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        out["times"][f"B={batch}"] = min(times[1:], default=float("nan"))
        if hlo:
            lowered = lower_generate(cfg, batch=batch, prompt_len=prompt_len,
                                     max_new_tokens=new)
            texts = [("StableHLO", _strip_mlir(lowered.as_text())),
                     ("compiled HLO", _strip(lowered.compile().as_text()))]
            for what, text in texts:
                digest = hashlib.sha256(text.encode()).hexdigest()
                out["hlo"][f"{what}, B={batch}"] = digest
    print("RESULT " + json.dumps(out), flush=True)


def _tree(rev: str, tmp: Path) -> str:
    """A directory holding `rev`'s jaxgpt package (a directory is taken as it is)."""
    if Path(rev).is_dir():
        return str(Path(rev).resolve())
    out = tmp / rev.replace("/", "_")
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "jaxgpt"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return str(out)


def _run(src: str, repeats: int, hlo: bool, env: dict, timed: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", src, "--repeats", str(repeats)]
    cmd += (["--hlo"] if hlo else []) + ([] if timed else ["--programs-only"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"bench_hooks: the run of {src} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default="9cb758e", help="git revision or directory (A)")
    p.add_argument("--candidate", default=str(ROOT), help="git revision or directory (B)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--hlo", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--programs-only", action="store_true",
                   help="only compare the programs (no timing)")
    args = p.parse_args()
    if args.child:
        return child(args.child, args.repeats, args.hlo, not args.programs_only)
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"A": _tree(args.baseline, Path(tmp)), "B": _tree(args.candidate, Path(tmp))}
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
               "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "xla")}
        env.pop("PYTHONPATH", None)
        results: dict[str, list[dict]] = {"A": [], "B": []}
        if args.programs_only:
            for side in "AB":
                results[side].append(_run(sides[side], 0, True, env, timed=False))
            return _programs(results)
        for r in range(args.rounds):
            for side in ("AB" if r % 2 == 0 else "BA"):
                results[side].append(_run(sides[side], args.repeats, r == 0, env))
                print(f"round {r + 1} {side}: {results[side][-1]['times']}", file=sys.stderr)
    _report(args, results)


def _report(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    import statistics

    print(f"A = {args.baseline}, B = {args.candidate}; {args.rounds} rounds, best of "
          f"{args.repeats} calls each; 124M, greedy, 64 new tokens")
    print(f"{'workload':10} {'A median s':>11} {'A range':>17} {'B median s':>11} "
          f"{'B range':>17} {'B/A':>6}")
    for key in (f"B={b}" for b, _, _ in WORKLOADS):
        a = [r["times"][key] for r in results["A"]]
        b = [r["times"][key] for r in results["B"]]
        print(f"{key:10} {statistics.median(a):11.3f} {min(a):8.3f}-{max(a):<8.3f} "
              f"{statistics.median(b):11.3f} {min(b):8.3f}-{max(b):<8.3f} "
              f"{statistics.median(b) / statistics.median(a):6.3f}")
    _programs(results)


def _programs(results: dict[str, list[dict]]) -> None:
    for key, digest in results["A"][0]["hlo"].items():
        same = digest == results["B"][0]["hlo"][key]
        print(f"generate program ({key}): {'identical' if same else 'DIFFERENT'} "
              f"(sha256 {digest[:12]} / {results['B'][0]['hlo'][key][:12]})")


if __name__ == "__main__":
    main()
