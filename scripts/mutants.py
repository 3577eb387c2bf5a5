"""Mutation testing of the research tools: put one plausible bug at a time into a scratch copy
of the tree, run the tests that should catch it, and print which bugs survived.

    python scripts/mutants.py                   # every mutant, two at a time
    python scripts/mutants.py --only chunk,neg  # those whose name holds one of these
    python scripts/mutants.py --list            # the mutants, and the tests of each

Each mutant is a name, a short description of what it does to a user, and a change: exact
text of the tree (a line, a few where the bug needs them), found once, and its replacement.
A mutant is killed when one of its tests fails (or cannot be collected); the table says by
which. Every tier runs (`-m ""`): a bug caught only by a slow test is still caught. Before the
mutants, the same tests run on the unchanged copy (`--no-baseline` skips this): a test that
fails anyway would kill every mutant and mean nothing.

The tests that should catch each bug are named with it: a bug that survives them is a gap in
those tests, whatever another file might catch. It takes 20-40 minutes on 2 cores; it is not
part of CI. Add a mutant whenever a bug gets past the tests (docs/development.md).
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Mutant(NamedTuple):
    name: str
    what: str  # what it does to a user
    path: str  # relative to the repository
    changes: tuple[tuple[str, str], ...]  # (text found once in `path`, its replacement)
    tests: tuple[str, ...]  # test files or node ids that should catch it


def one(old: str, new: str) -> tuple[tuple[str, str], ...]:
    return ((old, new),)


HOOKS = ("tests/test_hook_points.py", "tests/test_hooks.py")
PATHS = ("tests/test_hook_points.py", "tests/test_hooks_paths.py")
PATCHING = ("tests/test_patching.py",)
READS = ("tests/test_reads.py",)
ATTRIBUTION = ("tests/test_residual.py",)

MUTANTS = [
    # --- the six bugs that once passed every test (issue: the research tools' tests) --------------
    Mutant("short-last-chunk", "a sweep drops the patches of a short last chunk (0.0 there)",
           "jaxgpt/interp/patching.py",
           one("for i in range(0, len(rows), per)]",
               "for i in range(0, len(rows) - per + 1, per)]"), PATCHING),
    Mutant("by-pos-every-transposed",
           "get_act_patch_attn_head_by_pos_every returns [5, L, H, T]: wrong values when T == H",
           "jaxgpt/interp/patching.py",
           one("return jnp.stack([*out, pattern.transpose(0, 2, 1)])",
               "return jnp.stack([*(o.transpose(0, 2, 1) for o in out), pattern])"), PATCHING),
    Mutant("neg-is-a-move", "reads treats neg as a move: x[-1, 3] + (-x[-1, 4]) evaluated wrong",
           "jaxgpt/interp/reads.py",
           one('_MOVES = {"slice": (0, 1),', '_MOVES = {"neg": (0, 1), "slice": (0, 1),'),
           READS),
    Mutant("attribution-at-clean",
           "attribution takes the gradient at the clean activations, not the corrupted run's",
           "jaxgpt/interp/attribution.py", (
               ("names: list[str], *, model: GPTModel | None = None,\n",
                "names: list[str], *, model: GPTModel | None = None, at: Any = None,\n"),
               ("hooks = [(n, jax.tree_util.Partial(_add, deltas[n])) for n in names]",
                "hooks = [(n, jax.tree_util.Partial(_add, deltas[n] if at is None else "
                "deltas[n] + jnp.asarray(at[n]) - shapes[n])) for n in names]"),
               ("return metric(logits if lead else logits[0]), dict(cache.acts)",
                "return metric(logits if lead else logits[0]), dict(shapes.acts)"),
               ("metric_and_gradients(params, cfg, corrupted_tokens, metric, names,\n",
                "metric_and_gradients(params, cfg, corrupted_tokens, metric, names, "
                "at=clean_cache,\n"),
           ), ATTRIBUTION),
    Mutant("scores-hook-lost-when-cached",
           "hook_attn_scores runs in cached decoding, but its result is discarded",
           "jaxgpt/nn/attention.py",
           one('scores = self.hook("hook_attn_scores", scores, (b, h, t, s))',
               'scores = self.hook("hook_attn_scores", scores, (b, h, t, s)) if cache is None '
               'else (self.hook("hook_attn_scores", scores, (b, h, t, s)), scores)[1]'), PATHS),
    Mutant("ln2-args-under-norm1", "ln2's pytree-hook arrays are stored under norm1",
           "jaxgpt/nn/hooks.py",
           one('Part("ln2", "norm2", _NORM),', 'Part("ln2", "norm1", _NORM),'), HOOKS),
    # --- hooks ------------------------------------------------------------------------------------
    Mutant("cache-before-hooks", "a cached activation is the value before its hooks ran",
           "jaxgpt/nn/hooks.py", (
               ("    free = 0\n", "    free, before = 0, x\n"),
               ('module.sow("intermediates", full, x,',
                'module.sow("intermediates", full, before,'),
           ), HOOKS),
    Mutant("hook-dtype-kept", "a float32 hook turns bf16 activations into float32",
           "jaxgpt/nn/hooks.py",
           one("x = y.astype(x.dtype)  #", "x = y  #"), PATHS),
    Mutant("free-counter", "two pytree hooks at one point both take the first's arrays",
           "jaxgpt/nn/hooks.py", one("            free += 1\n", "            free += 0\n"),
           HOOKS),
    Mutant("hook-shape-unchecked", "a hook that returns another shape is not refused",
           "jaxgpt/nn/hooks.py",
           one('if getattr(y, "shape", None) != x.shape:', "if False:"), HOOKS),
    Mutant("call-hooks-first", "run_with_hooks' hooks run before the model's own at a point",
           "jaxgpt/nn/hooks.py",
           one("return HookTable(self.hooks + other.hooks,",
               "return HookTable(other.hooks + self.hooks,"), HOOKS),
    Mutant("plus-drops-cache", "a hooked model's run_with_cache keeps only the model's names",
           "jaxgpt/nn/hooks.py",
           one("self.cache | other.cache, self.prefix)", "self.cache, self.prefix)"),
           HOOKS + PATCHING),
    Mutant("any-point", "a part's hook_point of a name the table lacks is not refused",
           "jaxgpt/nn/hooks.py",
           one("return name in _OUTSIDE if inside is None else inside[1] in _IN_BLOCK",
               "return True"), HOOKS),
    Mutant("args-replace-held", "a call's pytree-hook arrays replace a hooked model's own",
           "jaxgpt/nn/hooks.py", one("            held = out.get(key, {})\n",
                                     "            held = {}\n"), HOOKS),
    Mutant("nested-args-dropped", "with_hook_args drops the arrays of nested parts",
           "jaxgpt/nn/hooks.py",
           one("            out[key] = with_hook_args(out.get(key, {}), value)",
               "            out[key] = out.get(key, {})"), HOOKS),
    # --- attention --------------------------------------------------------------------------------
    Mutant("z-hook-unused", "hook_z's result is cached but out_proj reads the unhooked z",
           "jaxgpt/nn/attention.py",
           one('context = self.hook("hook_z", z, z.shape).reshape(b * t, self.d_out)',
               'context = (self.hook("hook_z", z, z.shape), z)[1].reshape(b * t, self.d_out)'),
           HOOKS),
    Mutant("v-hook-unused", "hook_v's result is cached but the values are the unhooked ones",
           "jaxgpt/nn/attention.py", (
               ("        q, k, v = (self.hook(name, y, (b, t, h, dh))",
                "        v_in, (q, k, v) = v, (self.hook(name, y, (b, t, h, dh))"),
               ("q, keys, values = heads(q), heads(k), heads(v)",
                "q, keys, values = heads(q), heads(k), heads(v_in)"),
           ), HOOKS),
    Mutant("q-hook-regrouped-when-cached", "a decoding step's hook_q sees [B, H, T, Dh]",
           "jaxgpt/nn/attention.py",
           one("        q, k, v = (self.hook(name, y, (b, t, h, dh))",
               '        q, k, v = (self.hook(name, y, (b, t, h, dh) if cache is None or '
               'name != "hook_q" else (b, h, t, dh))'), PATHS),
    Mutant("scaled-mask-unclamped", "a scores hook that scales the mask up gives NaN padding rows",
           "jaxgpt/nn/attention.py",
           one("            scores = jnp.maximum(scores, MASKED)\n", "            pass\n"), PATHS),
    Mutant("pos-embed-hook-skipped-when-decoding", "a decoding step skips hook_pos_embed",
           "jaxgpt/nn/model.py",
           one('pos = hook_point(self, self.hooks, "hook_pos_embed", '
               'jnp.broadcast_to(pos, tok.shape))',
               'pos = jnp.broadcast_to(pos, tok.shape) if in_idx.shape[1] == 1 else '
               'hook_point(self, self.hooks, "hook_pos_embed", jnp.broadcast_to(pos, tok.shape))'),
           PATHS),
    Mutant("pattern-heads-regrouped", "hook_pattern sees [H, B, T, S] regrouped as [B, H, T, S]",
           "jaxgpt/nn/attention.py",
           one('weights = self.hook("hook_pattern", weights, (b, h, t, s))',
               'weights = self.hook("hook_pattern", weights, (h, b, t, s))'),
           HOOKS + ("tests/test_tl_parity.py",)),
    Mutant("mask-tiled", "a per-row mask is tiled over the heads, not repeated per row",
           "jaxgpt/nn/attention.py",
           one("allowed = jnp.repeat(allowed, h, axis=0)",
               "allowed = jnp.tile(allowed, (h, 1, 1))"),
           PATCHING),
    # --- the cache and names ----------------------------------------------------------------------
    Mutant("short-name-default", "act_name('scale', 2) is ln2's, not ln1's",
           "jaxgpt/interp/cache.py",
           one("part = sub if sub in parts else next(iter(parts))",
               "part = sub if sub in parts else list(parts)[-1]"), ("tests/test_hooks.py",)),
    Mutant("cache-first-row", "the cache keeps the first prompt of a batch only",
           "jaxgpt/interp/cache.py",
           one("ordered = {n: acts[n] for n in wanted if n in acts}",
               "ordered = {n: acts[n][:1] for n in wanted if n in acts}"), HOOKS),
    Mutant("stack-short", "stack_activation leaves out the last layer",
           "jaxgpt/interp/cache.py",
           one("stop = self.cfg.n_layers if layer is None or layer == -1 else layer",
               "stop = self.cfg.n_layers - 1 if layer is None or layer == -1 else layer"),
           ("tests/test_hooks.py",)),
    # --- patching ---------------------------------------------------------------------------------
    Mutant("resid-pre-hooked-twice", "a sweep's rows start after hook_resid_pre, which "
           "the block then runs again", "jaxgpt/interp/patching.py", (
               ('names = inputs + [act_name(short, i) for short in ("k", "v") for i in range(n)]',
                'names = inputs + [act_name(short, i) for short in ("resid_pre", "k", "v") '
                'for i in range(n)]'),
               ('return Corrupted(jnp.stack(resid), heads("k"), heads("v"), final)',
                'return Corrupted(cache.stack_activation("resid_pre"), heads("k"), heads("v"), '
                'final)'),
           ), ("tests/test_hook_points.py::test_the_patching_sweeps_run_a_hooked_models_hooks",)),
    Mutant("oldest-rows", "a sweep patches the oldest group of rows, not the newest",
           "jaxgpt/interp/patching.py",
           one("newest = act[-b * p:].reshape(packed.shape)",
               "newest = act[:b * p].reshape(packed.shape)"), PATCHING),
    Mutant("prefix-mask", "a packed patch also sees the corrupted key at its own position",
           "jaxgpt/interp/patching.py",
           one("prefix = np.arange(t)[None, :] < start[:, None]",
               "prefix = np.arange(t)[None, :] <= start[:, None]"), PATCHING),
    Mutant("read-from", "a read position before the patch's start is read one token off",
           "jaxgpt/interp/patching.py",
           one("corrupted_at = owner.size  #", "corrupted_at = owner.size - 1  #"),
           PATCHING),
    Mutant("dest-src", "a pattern_dest_src patch replaces every key but its own",
           "jaxgpt/interp/patching.py",
           one("| (key_pos == patch_src[..., None])", "| (key_pos != patch_src[..., None])"),
           PATCHING),
    Mutant("progress", "progress counts patches per layer, not over all layers",
           "jaxgpt/interp/patching.py",
           one("done += cfg.n_layers * len(members)", "done += len(members)"), PATCHING),
    Mutant("length-check", "a clean run of another length is patched in silently",
           "jaxgpt/interp/patching.py", one("    if got != (b, t):\n", "    if False:\n"),
           PATCHING),
    # --- attribution ------------------------------------------------------------------------------
    Mutant("batch-mean", "attribution averages the prompts of a batch instead of summing",
           "jaxgpt/interp/attribution.py",
           one("x = diff_times_grad.sum(axis=0)  #", "x = diff_times_grad.mean(axis=0)  #"),
           ATTRIBUTION),
    Mutant("pattern-row-sum", "attribution of a pattern row sums over queries, not keys",
           "jaxgpt/interp/attribution.py",
           one('return x if "src" in axes else x.sum(axis=2)',
               'return x if "src" in axes else x.sum(axis=1)'), ATTRIBUTION),
    # --- reads ------------------------------------------------------------------------------------
    Mutant("rows-unwrapped", "reads takes a batched metric's flat row for its position",
           "jaxgpt/interp/reads.py",
           one("rows = np.unique((read // v) % t)", "rows = np.unique(read // v)"), READS),
    Mutant("outputs-unmarked", "a metric that returns a logit itself reads nothing",
           "jaxgpt/interp/reads.py",
           one("        plan.mark(out)\n", "        pass\n"), READS),
    Mutant("move-index-unknown", "a gather with an index computed from logits is a move",
           "jaxgpt/interp/reads.py",
           one("    if any(isinstance(v, (_View, _Dep)) for i, v in enumerate(ins) "
               "if not lo <= i < hi):", "    if False:"), READS),
    Mutant("gather-fill", "an out-of-bounds gather's fill is taken for logit 0",
           "jaxgpt/interp/reads.py",
           one('params = {**eqn.params, "fill_value": -1} if "fill_value" in eqn.params',
               'params = eqn.params if "fill_value" in eqn.params'), READS),
    Mutant("evaluate-skips-sub", "the compact evaluation skips a subtraction of logits",
           "jaxgpt/interp/reads.py",
           one("if not any(isinstance(self.env[v], _Dep) for v in eqn.outvars):",
               'if not any(isinstance(self.env[v], _Dep) for v in eqn.outvars) '
               'or eqn.primitive.name == "sub":'), READS),
    Mutant("convert-is-a-move", "a conversion to float16 is evaluated on the float32 logits",
           "jaxgpt/interp/reads.py",
           one('    if eqn.primitive.name == "convert_element_type" and \\\n',
               "    if False and \\\n"), READS),
    Mutant("remat2-unfollowed", "reads does not look inside jax.checkpoint",
           "jaxgpt/interp/reads.py",
           one('"remat": "jaxpr", "remat2": "jaxpr"}', '"remat": "jaxpr"}'), READS),
    Mutant("calls-unfollowed", "reads does not look inside a nested jit or custom_jvp",
           "jaxgpt/interp/reads.py",
           one("    key = _CALLS.get(eqn.primitive.name)\n", "    key = None\n"), READS),
    # --- the other readers ------------------------------------------------------------------------
    Mutant("stripe-off-by-one", "the induction stripe is the earlier copy itself",
           "jaxgpt/interp/induction.py",
           one("return pattern[..., queries, queries - half + 1]",
               "return pattern[..., queries, queries - half]"), ("tests/test_interventions.py",)),
    Mutant("search-layer-mean", "the search prints each layer's mean head, not its best",
           "scripts/induction_search.py",
           one("return scores.max(axis=1)", "return scores.mean(axis=1)"),
           ("tests/test_induction_search.py::test_the_search_reports_each_layers_score",)),
    Mutant("ablate-neighbour", "ablate_head zeroes the head before the one asked for",
           "jaxgpt/interp/interventions.py",
           one(".at[head].set(0.0)", ".at[head - 1].set(0.0)"),
           ("tests/test_interventions.py",)),
    Mutant("replace-swapped", "replace keeps the activation where it should put the value",
           "jaxgpt/interp/interventions.py",
           one("return jnp.where(where, value, x)", "return jnp.where(where, x, value)"),
           ("tests/test_interventions.py",)),
    Mutant("ln-at-mlp-input", "apply_ln_to_stack divides by ln1's scale at the MLP's input",
           "jaxgpt/interp/residual.py",
           one('ln{2 if mlp_input else 1}.hook_scale', 'ln{1 if mlp_input else 2}.hook_scale'),
           ATTRIBUTION),
    Mutant("incorrect-added", "logit_attrs adds the incorrect tokens' directions",
           "jaxgpt/interp/residual.py",
           one("directions = directions - unembed_directions(",
               "directions = directions + unembed_directions("), ATTRIBUTION),
]


def check(mutants: list[Mutant]) -> None:
    """Every change's text is in its file exactly once, and every test file exists."""
    for m in mutants:
        text = (ROOT / m.path).read_text()
        for old, _ in m.changes:
            if text.count(old) != 1:
                sys.exit(f"mutant {m.name}: {old.strip()!r} is in {m.path} "
                         f"{text.count(old)} times, not once: update the mutant")
        for test in m.tests:
            if not (ROOT / test.split("::")[0]).exists():
                sys.exit(f"mutant {m.name}: no test file {test}")


def scratch_copy(into: Path) -> None:
    """The tree as git sees it (tracked files, and new ones it does not ignore)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, into / name)


class Result(NamedTuple):
    killed: bool | None  # None: the run could not say (timed out, or collected no test)
    by: str
    seconds: float


def run_tests(tree: Path, tests: tuple[str, ...], timeout: int) -> Result:
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu", "CI": "true"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-m", "", "-p", "no:xdist",
           "-p", "no:cacheprovider", *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(None, f"timed out after {timeout} s", time.time() - t0)
    seconds = time.time() - t0
    out = proc.stdout + proc.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.MULTILINE)
    if proc.returncode == 0:
        return Result(False, "", seconds)
    if proc.returncode in (1, 2) and failed:
        return Result(True, failed[0].replace("tests/", ""), seconds)
    if proc.returncode == 2:
        return Result(True, "collection error", seconds)
    return Result(None, f"pytest exit code {proc.returncode}", seconds)


def mutate(tree: Path, m: Mutant, timeout: int) -> Result:
    path = tree / m.path
    original = path.read_text()
    text = original
    for old, new in m.changes:
        text = text.replace(old, new)
    path.write_text(text)
    try:
        return run_tests(tree, m.tests, timeout)
    finally:
        path.write_text(original)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma-separated parts of mutant names to run")
    p.add_argument("--jobs", type=int, default=2, help="mutants run at once (one core each)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per test run")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip running the tests on the unchanged tree first")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    a = p.parse_args()
    mutants = MUTANTS
    if a.only:
        parts = a.only.split(",")
        mutants = [m for m in MUTANTS if any(part in m.name for part in parts)]
        if not mutants:
            p.error(f"--only {a.only}: no mutant's name holds any of these")
    check(mutants)
    if a.list:
        for m in mutants:
            print(f"{m.name:26} {m.path:32} {' '.join(m.tests)}\n{'':26} {m.what}")
        return
    with tempfile.TemporaryDirectory(prefix="jaxgpt-mutants-") as tmp:
        trees: queue.Queue[Path] = queue.Queue()
        for j in range(a.jobs):
            tree = Path(tmp) / f"tree{j}"
            scratch_copy(tree)
            trees.put(tree)

        def run(task: Mutant | tuple[str, ...]) -> Result:
            tree = trees.get()
            try:
                if isinstance(task, Mutant):
                    return mutate(tree, task, a.timeout)
                return run_tests(tree, task, a.timeout)
            finally:
                trees.put(tree)

        with ThreadPoolExecutor(a.jobs) as pool:
            if not a.no_baseline:
                files = sorted({t.split("::")[0] for m in mutants for t in m.tests})
                groups = [tuple(files[i::a.jobs]) for i in range(a.jobs) if files[i::a.jobs]]
                for files_run, base in zip(groups, pool.map(run, groups), strict=True):
                    if base.killed is not False:
                        sys.exit(f"the unchanged tree fails {base.by or ' '.join(files_run)}: "
                                 f"fix that first (or --no-baseline)")
                print(f"baseline: {len(files)} test files pass on the unchanged tree")
            t0 = time.time()
            futures = {pool.submit(run, m): m for m in mutants}
            for done, future in enumerate(as_completed(futures), 1):
                r = future.result()
                said = f"killed by {r.by}" if r.killed else \
                    "SURVIVED" if r.killed is False else r.by
                print(f"[{done}/{len(mutants)}] {futures[future].name}: {said} "
                      f"({r.seconds:.0f} s)", flush=True)
            results = [f.result() for f in futures]
    print("\n| mutant | what it does | killed by | s |\n|---|---|---|---:|")
    for m, r in zip(mutants, results, strict=True):
        verdict = r.by if r.killed else ("**SURVIVED**" if r.killed is False else
                                         f"**unknown** ({r.by})")
        print(f"| {m.name} | {m.what} | {verdict} | {r.seconds:.0f} |")
    survived = [m.name for m, r in zip(mutants, results, strict=True) if r.killed is not True]
    print(f"\n{len(mutants) - len(survived)} of {len(mutants)} killed in "
          f"{time.time() - t0:.0f} s" + (f"; not killed: {', '.join(survived)}" if survived
                                          else ""))
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
