"""A finding, offline: the features of a sparse autoencoder on a small GPT's residual stream are
single tokens far more often than the MLP's neurons or random directions.

    python scripts/sae_finding.py --control --out runs/finding --images docs/images \
        --page docs/sae_features.html                     # docs/research.md's run
    python scripts/sae_finding.py --quick --out /tmp/finding   # the test's shortened version

It trains a small GPT on the offline demo corpus (Python's help topics, `pydoc_data.topics`,
as `jaxgpt train` does) with jaxgpt's train step, over the corpus's own vocabulary (the GPT-2
ids the text uses, renumbered: the 50257-wide head would be most of each CPU step), then a
TopK SAE on its residual stream at `blocks.{L}.hook_resid_post`. On the held-out tail of the
text it takes, for each unit, the `--top` positions where the unit is largest:

- units: the SAE's features; the MLP's neurons of the same block (`blocks.{L}.mlp.hook_post`);
  as many random directions of the residual stream (`x @ d`, d ~ N(0, I)) as the SAE has
  features;
- a unit is *one token* if at least `--purity` of its top positions hold the same token, *one
  word* if they hold the same token once whitespace and case are dropped (" The", "the"), *one
  previous token* if the same token comes just before them;
- a unit is scored only if it is positive at `--top` positions or more (an SAE feature that
  fires less often on the held-out text is left out, and counted).

It prints each share with its Wilson 95% interval and writes `finding.json` to `--out`.
`--control` does the same on the GPT before training; `--images DIR` draws the shares and a
few features' top contexts there; `--page FILE` writes the features page
(`jaxgpt.sae.features`) of the first scored features.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.interp.cache import run_with_cache
from jaxgpt.nn.model import init_params
from jaxgpt.sae import model as sae_model
from jaxgpt.sae.features import FeaturesConfig, feature_stats, write_features_page
from jaxgpt.sae.model import SAE, SAEConfig
from jaxgpt.sae.train_config import SAETrainConfig
from jaxgpt.sae.training import train_saes
from jaxgpt.tokenizer import get_tokenizer
from jaxgpt.training import data
from jaxgpt.training.config import TrainConfig
from jaxgpt.training.evaluation import evaluate, make_eval_step
from jaxgpt.training.loop import run_steps
from jaxgpt.training.step import dropout_key, init_train_state, make_train_step

PAGE_FEATURES = 30  # features on the page: the first scored ones, by index
MEASURES = ("one token", "one word", "one previous token")


@dataclass(frozen=True)
class Recipe:
    """The experiment's settings: the GPT, its training, the SAE and the measure."""

    layers: int = 4
    emb: int = 128
    heads: int = 4
    seq: int = 128
    gpt_steps: int = 400
    gpt_batch: int = 16
    gpt_lr: float = 2e-3
    layer: int = 1  # the block whose output the SAE reads
    d_sae: int = 512
    k: int = 16
    sae_steps: int = 2000
    sae_batch: int = 512
    sae_lr: float = 3e-4
    # A feature that has not fired for this many steps is dead (TopK's auxiliary loss).
    dead_window: int = 100
    holdout: float = 0.2  # the tail of the text the measure reads
    top: int = 20
    purity: float = 0.8
    seed: int = 1


QUICK = Recipe(layers=2, emb=64, heads=4, seq=64, gpt_steps=300, layer=1, d_sae=256, k=8,
               sae_steps=800, sae_batch=256)


# --- the text and the GPT --------------------------------------------------------------------

def corpus_ids() -> tuple[np.ndarray, np.ndarray]:
    """The demo corpus over its own vocabulary: `(vocab [V] GPT-2 ids, ids [N] in [0, V))`."""
    gpt2_ids = data.tokenize_text(data.demo_corpus())
    vocab, ids = np.unique(gpt2_ids, return_inverse=True)
    return vocab, ids.astype(np.int32)


def windows(ids: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Back-to-back windows of `ids`: `(inputs, targets)`, each int32 `[W, seq]`."""
    w = data.SlidingWindows(ids, seq, seq)
    return w.get(np.arange(len(w)))


def train_gpt(cfg: GPTConfig, r: Recipe, train: np.ndarray, val: np.ndarray) -> Any:
    """The GPT trained on `train` with jaxgpt's train step; prints the losses. Its params."""
    tc = TrainConfig(steps=r.gpt_steps, batch_size=r.gpt_batch, seq_len=r.seq,
                     lr=r.gpt_lr, warmup_steps=min(50, r.gpt_steps), seed=r.seed)
    state = init_train_state(cfg, tc)
    loader = data.BatchLoader(data.SlidingWindows(train, r.seq, r.seq), r.gpt_batch,
                              seed=r.seed)
    batches = ((jnp.asarray(x), jnp.asarray(y)) for x, y in loader)
    val_x, val_y = windows(val, r.seq)
    val_batches = [(val_x[i:i + 16], val_y[i:i + 16]) for i in range(0, len(val_x), 16)]
    eval_step, losses, t0 = make_eval_step(cfg), [], time.time()
    every = max(r.gpt_steps // 4, 1)

    def report(step: int, state: Any, metrics: dict, seconds: float) -> bool:
        losses.append(float(metrics["loss"]))
        if step % every == 0 or step == r.gpt_steps:
            print(f"GPT step {step}: loss {np.mean(losses[-every:]):.3f}, held-out "
                  f"{evaluate(eval_step, state.params, val_batches):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        return False

    state = run_steps(make_train_step(cfg, tc), state, batches, range(1, r.gpt_steps + 1),
                      dropout_key(tc), report)
    return jax.device_get(state.params)


def activations(params: Any, cfg: GPTConfig, inputs: np.ndarray, names: list[str],
                batch: int = 16) -> dict[str, np.ndarray]:
    """The activations `names` on the windows `inputs [W, T]`, flattened: `[W * T, d]` each."""
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(inputs), batch):
        _, cache = run_with_cache(params, cfg, inputs[i:i + batch], names=names)
        for n in names:
            out[n].append(np.asarray(cache[n]).reshape(-1, np.shape(cache[n])[-1]))
    return {n: np.concatenate(v) for n, v in out.items()}


# --- the SAE ---------------------------------------------------------------------------------

def train_sae(params: Any, cfg: GPTConfig, train: np.ndarray, r: Recipe, hook: str) -> SAE:
    """A TopK SAE trained on the GPT's activations at `hook` over `train` with
    `jaxgpt.sae.training.train_saes` (sae-lens's defaults but the sizes); for inference."""
    sae_cfg = SAEConfig("topk", d_in=cfg.emb_dim, d_sae=r.d_sae, k=r.k,
                        rescale_acts_by_decoder_norm=True, hook_name=hook)
    tc = SAETrainConfig(training_tokens=r.sae_steps * r.sae_batch,
                        train_batch_size_tokens=r.sae_batch, context_size=r.seq, lr=r.sae_lr,
                        dead_feature_window=r.dead_window, seed=r.seed,
                        log_every=max(r.sae_steps // 4, 1), save_every=r.sae_steps)
    t0 = time.time()

    def report(records: list[dict]) -> None:
        for rec in records:
            print(f"SAE step {rec['step']}: explained variance {rec['explained_variance']:.3f}, "
                  f"L0 {rec['l0']:.1f}, dead {rec['dead_features']} of {r.d_sae} "
                  f"({time.time() - t0:.0f} s)", flush=True)

    [sae] = train_saes(params, cfg, train, [sae_cfg], tc, progress=False, on_log=report)
    return sae_model.to_inference(sae)


# --- the measure -----------------------------------------------------------------------------

def top_positions(acts: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's `top` largest positions and whether it is scored (positive at all of them).

    Args:
      acts: `[N, U]`, unit u's activation at position n.
    Returns:
      `(positions [top, U], scored [U] bool)`, largest first.
    """
    if not 0 < top <= len(acts):
        raise ValueError(f"top must be in [1, {len(acts)}] (the positions), got {top}")
    order = np.argsort(-acts, axis=0, kind="stable")[:top]
    return order, acts[order[-1], np.arange(acts.shape[1])] > 0


def purity(labels: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The share of each unit's top positions that carry its commonest label: `[U]`.

    Args:
      labels: int `[N]`, a label (token, word...) per position.
      positions: `[top, U]` from `top_positions`.
    """
    held = labels[positions]  # [top, U]
    same = (held[:, None, :] == held[None, :, :]).sum(1)  # [top, U]: matches of each entry
    return same.max(0) / len(positions)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a share of `k` in `n`."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, mid - half), min(1.0, mid + half)


def position_labels(inputs: np.ndarray, words: np.ndarray) -> dict[str, np.ndarray]:
    """Per position of the windows `inputs [W, T]` (flattened): the token, its word (the id of
    the token with whitespace and case dropped) and the token before it. A window's first
    position has none: its label, `-1 - window`, matches no other position's."""
    starts = -1 - np.arange(len(inputs))[:, None]
    prev = np.concatenate([starts, inputs[:, :-1]], axis=1)
    return {"one token": inputs.reshape(-1), "one word": words[inputs].reshape(-1),
            "one previous token": prev.reshape(-1)}


def shares(units: dict[str, np.ndarray], labels: dict[str, np.ndarray],
           r: Recipe) -> dict[str, dict[str, Any]]:
    """For each kind of unit: the units, those scored, and per measure the count of units whose
    purity reaches `r.purity`, its share and Wilson 95% interval."""
    table: dict[str, dict[str, Any]] = {}
    for name, acts in units.items():
        positions, scored = top_positions(acts, r.top)
        row: dict[str, Any] = {"units": int(acts.shape[1]), "scored": int(scored.sum())}
        for measure, lbl in labels.items():
            k = int((purity(lbl, positions)[scored] >= r.purity).sum())
            row[measure] = {"count": k, "share": k / max(row["scored"], 1),
                            "wilson95": wilson(k, row["scored"])}
        table[name] = row
    return table


def verdicts(acts: np.ndarray, labels: dict[str, np.ndarray], pieces: list[bytes],
             r: Recipe) -> list[dict[str, Any]]:
    """Per scored unit of `acts [N, U]`, by index: its index, the commonest token among its
    top positions, and its purity by each measure."""
    positions, scored = top_positions(acts, r.top)
    pure = {m: purity(lbl, positions) for m, lbl in labels.items()}
    tokens = labels["one token"][positions]  # [top, U]
    return [{"feature": int(u), "token": shown(pieces[np.bincount(tokens[:, u]).argmax()]),
             **{m: float(pure[m][u]) for m in labels}} for u in np.flatnonzero(scored)]


def token_bytes(vocab: np.ndarray) -> list[bytes]:
    """The GPT-2 bytes of each token of `vocab [V]` (a character may span several tokens)."""
    tokenizer = get_tokenizer()
    return [tokenizer.decode_single_token_bytes(int(t)) for t in vocab]


def shown(piece: bytes) -> str:
    """A token's bytes as text: a byte that is not whole UTF-8 as `\\xNN`."""
    return piece.decode("utf-8", "backslashreplace")


def word_ids(pieces: list[bytes]) -> np.ndarray:
    """An id per token `[V]`, shared by the tokens equal once whitespace and case are dropped
    (" The", "the")."""
    _, words = np.unique([shown(b).strip().lower() for b in pieces], return_inverse=True)
    return words.astype(np.int64)


class CorpusTokens:
    """The corpus's own vocabulary as the features page reads a tokenizer: each id's GPT-2
    token bytes."""

    def __init__(self, vocab: np.ndarray):
        self.vocab, self.gpt2 = vocab, get_tokenizer()

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.gpt2.decode_single_token_bytes(int(self.vocab[token]))


def write_page(params: Any, cfg: GPTConfig, sae: SAE, held: np.ndarray, vocab: np.ndarray,
               features: list[int], r: Recipe, path: Path) -> None:
    """The features page (`jaxgpt.sae.features`) of `features` over the held-out text."""
    fc = FeaturesConfig(context_size=r.seq, features=tuple(features), contexts=5, before=8,
                        after=3, logit_tokens=6, bins=16)
    stats = feature_stats(params, cfg, sae, held, fc)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_features_page(stats, path, CorpusTokens(vocab), title=f"{len(features)} features of "
                        f"a TopK SAE at {sae.cfg.hook_name} (scripts/sae_finding.py)")
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


# --- pictures --------------------------------------------------------------------------------

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_shares(tables: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars, a panel per table: per measure, each kind of unit's share with its Wilson
    95% interval, the count above it."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 3.8), sharey=True,
                             squeeze=False, layout="constrained")
    for ax, (panel, table) in zip(axes[0], tables.items(), strict=True):
        width = 0.8 / len(table)
        for j, (name, row) in enumerate(table.items()):
            xs = np.arange(len(MEASURES)) + (j - (len(table) - 1) / 2) * width
            values = np.array([row[m]["share"] for m in MEASURES])
            bounds = np.array([row[m]["wilson95"] for m in MEASURES])  # [measures, 2]
            bars = ax.bar(xs, values, width, yerr=np.abs(bounds.T - values), capsize=3,
                          label=f"{name} ({row['scored']} scored)")
            ax.bar_label(bars, [f"{row[m]['count']}" for m in MEASURES], fontsize=7, padding=2)
        ax.set_xticks(np.arange(len(MEASURES)), MEASURES)
        ax.set_title(panel, fontsize=10)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("share of units")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _visible(text: str) -> str:
    return text.replace("\n", "\\n").replace("\t", "\\t")


def contexts(inputs: np.ndarray, pieces: list[bytes], acts: np.ndarray, unit: int, n: int,
             before: int = 8, after: int = 2) -> list[str]:
    """The unit's `n` top positions as lines of text: the activation, then the tokens around
    the position with the position's own token in [brackets]."""
    seq = inputs.shape[1]

    def text(ids: np.ndarray) -> str:
        return _visible(b"".join(pieces[i] for i in ids).decode("utf-8", "replace"))

    lines = []
    for pos in np.argsort(-acts[:, unit], kind="stable")[:n]:
        w, t = divmod(int(pos), seq)
        left, right = text(inputs[w, max(0, t - before):t]), text(inputs[w, t + 1:t + 1 + after])
        lines.append(f"{acts[pos, unit]:6.2f}  {left[-40:]:>40}"
                     f"[{_visible(shown(pieces[inputs[w, t]]))}]{right[:16]}")
    return lines


def plot_examples(blocks: list[tuple[str, list[str]]], path: Path) -> None:
    """Text blocks (a title, then lines) one under the other, in a monospace font."""
    plt = _pyplot()
    rows = sum(len(lines) + 1.6 for _, lines in blocks)
    fig = plt.figure(figsize=(8.5, 0.19 * rows + 0.3))
    y = 1.0
    for title, lines in blocks:
        fig.text(0.01, y, title, fontsize=9, weight="bold", va="top")
        y -= 1.1 / rows
        for line in lines:
            fig.text(0.01, y, line, fontsize=8, family="monospace", va="top")
            y -= 1.0 / rows
        y -= 0.5 / rows
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- the experiment --------------------------------------------------------------------------

def measure(params: Any, cfg: GPTConfig, train: np.ndarray, inputs: np.ndarray,
            labels: dict[str, np.ndarray], r: Recipe) -> tuple[dict, dict[str, np.ndarray], SAE]:
    """An SAE trained on the GPT `params` at block `r.layer`'s output, and the shares of its
    features, the block's neurons and random directions on the held-out windows `inputs`:
    `(shares' table, each kind's activations [N, U], the SAE)`."""
    hook, neurons = f"blocks.{r.layer}.hook_resid_post", f"blocks.{r.layer}.mlp.hook_post"
    sae = train_sae(params, cfg, train, r, hook)
    acts = activations(params, cfg, inputs, [hook, neurons])
    directions = np.random.default_rng(r.seed).standard_normal((cfg.emb_dim, r.d_sae))
    units = {"SAE features": np.asarray(sae_model.encode(sae, jnp.asarray(acts[hook]))),
             "MLP neurons": acts[neurons],
             "random directions": acts[hook] @ directions.astype(np.float32)}
    table = shares(units, labels, r)
    for name, row in table.items():
        print(f"{name:18} {row['scored']:4} scored of {row['units']:4}: " + ", ".join(
            f"{m} {row[m]['count']} ({row[m]['share']:.3f}, 95% "
            f"{row[m]['wilson95'][0]:.3f}-{row[m]['wilson95'][1]:.3f})" for m in MEASURES))
    return table, units, sae


def run(r: Recipe, out: Path, *, control: bool = False, images: Path | None = None,
        page: Path | None = None) -> dict[str, Any]:
    """The experiment end to end; writes `out/finding.json`. `control`: the same on the GPT
    before training; `images`: the pictures there; `page`: the first `PAGE_FEATURES` scored
    features' page."""
    t0 = time.time()
    vocab, ids = corpus_ids()
    train, held = data.train_val_split(ids, 1 - r.holdout)
    cfg = GPTConfig(vocab_size=len(vocab), context_length=r.seq, emb_dim=r.emb,
                    n_heads=r.heads, n_layers=r.layers, drop_rate=0.1)
    print(f"{len(ids)} tokens ({len(vocab)} distinct), {len(held)} held out; {cfg}", flush=True)
    params = train_gpt(cfg, r, train, held)
    inputs = windows(held, r.seq)[0]
    pieces = token_bytes(vocab)
    words = word_ids(pieces)
    labels = position_labels(inputs, words)
    table, units, sae = measure(params, cfg, train, inputs, labels, r)
    result: dict[str, Any] = {
        "recipe": dataclasses.asdict(r), "hook": sae.cfg.hook_name, "tokens": int(len(ids)),
        "held_out": int(len(held)), "shares": table}
    tables = {"trained GPT": table}
    if control:
        print("The same on the GPT before training:")
        result["untrained"] = tables["untrained GPT"] = measure(
            init_params(cfg, r.seed), cfg, train, inputs, labels, r)[0]
    result["seconds"] = round(time.time() - t0)
    if images is not None:
        draw(tables, units["SAE features"], inputs, pieces, r, images)
    if page is not None:
        result["page"] = verdicts(units["SAE features"], labels, pieces, r)[:PAGE_FEATURES]
        write_page(params, cfg, sae, held, vocab, [f["feature"] for f in result["page"]], r,
                   page)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finding.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def draw(tables: dict[str, dict[str, Any]], features: np.ndarray, inputs: np.ndarray,
         pieces: list[bytes], r: Recipe, images: Path) -> None:
    """The shares' bar chart (a panel per table) and the top contexts of the first six
    scored features."""
    images.mkdir(parents=True, exist_ok=True)
    plot_shares(tables, images / "sae_finding_shares.png",
                f"units whose top {r.top} held-out activations are >= {r.purity:.0%} one ...")
    _, scored = top_positions(features, r.top)
    blocks = [(f"feature {u}", contexts(inputs, pieces, features, u, 5))
              for u in np.flatnonzero(scored)[:6]]
    plot_examples(blocks, images / "sae_finding_examples.png")
    print(f"wrote {images / 'sae_finding_shares.png'}, {images / 'sae_finding_examples.png'}")


def check(r: Recipe) -> str | None:
    """What is wrong with `r`, in a line naming the flag; None if nothing."""
    if not 0 <= r.layer < r.layers:
        return f"--layer must be in [0, {r.layers}) (--layers), got {r.layer}"
    if r.heads <= 0 or r.emb % r.heads:
        return f"--heads ({r.heads}) must divide --emb ({r.emb})"
    if not 0 < r.holdout < 1:
        return f"--holdout must be in (0, 1), got {r.holdout}"
    if not 0 < r.purity <= 1:
        return f"--purity must be in (0, 1], got {r.purity}"
    if not 0 < r.k <= r.d_sae:
        return f"--k must be in [1, {r.d_sae}] (--d-sae), got {r.k}"
    small = [f.name for f in dataclasses.fields(Recipe)
             if f.name not in ("layer", "holdout", "purity", "k") and getattr(r, f.name) <= 0]
    if small:
        return f"--{small[0].replace('_', '-')} must be positive, got {getattr(r, small[0])}"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for finding.json")
    p.add_argument("--images", help="directory for the pictures (none drawn without it)")
    p.add_argument("--page", help=f"write the page of the first {PAGE_FEATURES} scored "
                   f"features here (an .html file)")
    p.add_argument("--control", action="store_true",
                   help="also measure an SAE on the GPT before training")
    p.add_argument("--quick", action="store_true",
                   help="the shortened version the test runs (a 2-layer GPT, 300 steps)")
    for f in dataclasses.fields(Recipe):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                       help=f"default {f.default} ({getattr(QUICK, f.name)} with --quick)")
    a = p.parse_args()
    base = QUICK if a.quick else Recipe()
    changes = {f.name: getattr(a, f.name) for f in dataclasses.fields(Recipe)
               if getattr(a, f.name) is not None}
    r = dataclasses.replace(base, **changes)
    if problem := check(r):
        p.error(problem)
    run(r, Path(a.out), control=a.control, images=Path(a.images) if a.images else None,
        page=Path(a.page) if a.page else None)


if __name__ == "__main__":
    main()
