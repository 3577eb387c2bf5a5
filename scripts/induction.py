"""Find the induction head of a model trained on repeated random runs (docs/research.md).

    python scripts/repeat_tokens.py runs/repeat.u16
    jaxgpt train --token-file runs/repeat.u16 --config runs/induction.json ... --out runs/ind
    python scripts/induction.py runs/ind --out runs/induction

(the whole recipe, with the config and the flags, is in docs/research.md)

Prints the induction score of every head (its mean attention, on repeated random tokens, on the
token after the current token's earlier copy) for the trained model and for its untrained
initialisation, the loss on each half of the repeated sequences, and an activation-patching
sweep of each head's output; writes three pictures: `<out>_scores.png` (scores, trained and
untrained), `<out>_pattern.png` (the best head's attention: the stripe) and `<out>_patch.png`
(the patching heatmap).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.interp import induction, patching, plots
from jaxgpt.interp.cache import run_with_cache
from jaxgpt.nn.model import GPTModel, init_params


def half_losses(params: dict, cfg: GPTConfig, tokens: np.ndarray,
                model: GPTModel | None = None) -> tuple[float, float]:
    """Mean next-token loss over the first half's predictions and the second half's."""
    logits, _ = run_with_cache(params, cfg, tokens, names=[], model=model)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]
    half = tokens.shape[1] // 2
    return float(nll[:, :half - 1].mean()), float(nll[:, half:].mean())


def patch_heads(params: dict, cfg: GPTConfig, half: int, vocab: int, seed: int,
                model: GPTModel | None = None) -> tuple[np.ndarray, float, float]:
    """Each head's output (all positions) patched from a repeated sequence `[A, A]` into one
    whose first half is other tokens `[C, A]`: the metric is the mean log-probability of the
    second half's next tokens (the copy the clean run can make). `(sweep [L, H], clean,
    corrupted)`."""
    clean = induction.repeated_tokens(1, half, vocab, seed)[0]
    corrupt = clean.copy()
    corrupt[:half] = np.random.default_rng(seed + 1).integers(0, vocab, half)
    targets = clean[half + 1:]

    def metric(logits: jax.Array) -> jax.Array:  # [T, V]
        logp = jax.nn.log_softmax(logits[half:-1], axis=-1)
        return logp[np.arange(len(targets)), targets].mean()

    heads = [f"blocks.{i}.attn.hook_z" for i in range(cfg.n_layers)]  # what the sweep patches
    clean_logits, clean_cache = run_with_cache(params, cfg, clean, names=heads, model=model)
    corrupt_logits, _ = run_with_cache(params, cfg, corrupt, names=[], model=model)
    sweep = patching.get_act_patch_attn_head_out_all_pos(params, cfg, corrupt, clean_cache,
                                                         metric, model=model)
    return np.asarray(sweep), float(metric(clean_logits[0])), float(metric(corrupt_logits[0]))


def report(params: dict, cfg: GPTConfig, untrained: dict, out: str, *, half: int = 12,
           vocab: int | None = None, seed: int = 1, model: GPTModel | None = None) -> None:
    """Print the scores, losses and patching sweep of `params` against `untrained`, and write
    `<out>_scores.png`, `<out>_pattern.png` and `<out>_patch.png`."""
    vocab = cfg.vocab_size if vocab is None else vocab
    tokens = induction.repeated_tokens(64, half, vocab, seed)
    scores = {name: np.asarray(induction.induction_scores(w, cfg, tokens, model=model))
              for name, w in (("trained", params), ("untrained", untrained))}
    for name, s in scores.items():
        first, second = half_losses(params if name == "trained" else untrained, cfg, tokens,
                                    model)
        layer, head = np.unravel_index(s.argmax(), s.shape)
        print(f"{name:9}: best head {layer}.{head} score {s.max():.3f} (next best "
              f"{np.sort(s.ravel())[-2]:.3f}); loss first half {first:.3f}, second {second:.3f}")
        print(np.array2string(s, precision=3))
    s = scores["trained"]
    layer, head = (int(v) for v in np.unravel_index(s.argmax(), s.shape))
    both = np.concatenate([s, scores["untrained"]])
    rows = [f"{i} trained" for i in range(cfg.n_layers)] + \
        [f"{i} untrained" for i in range(cfg.n_layers)]
    plots.plot_patching(both, rows, [str(h) for h in range(cfg.n_heads)],
                        f"{out}_scores.png", title="induction score per head",
                        label="mean attention on the stripe", column_title="head")
    short = induction.repeated_tokens(1, min(12, half), vocab, seed + 7)
    _, cache = run_with_cache(params, cfg, short, names=[("pattern", layer)], model=model)
    plots.plot_attention(np.asarray(cache["pattern", layer][0]), [str(t) for t in short[0]],
                         f"{out}_pattern.png", layer=layer, head=head)
    sweep, clean, corrupt = patch_heads(params, cfg, half, vocab, seed + 3, model)
    print(f"patching each head's output, [C, A] <- [A, A]: clean {clean:.3f}, corrupted "
          f"{corrupt:.3f}\n{np.array2string(sweep, precision=3)}")
    plots.plot_patching(sweep - corrupt, [str(i) for i in range(cfg.n_layers)],
                        [str(h) for h in range(cfg.n_heads)], f"{out}_patch.png",
                        title=f"patching each head's output, [C, A] <- [A, A]\n"
                              f"clean {clean:.2f}, corrupted {corrupt:.2f}",
                        label="change of the mean log-prob of the copy", column_title="head")
    print(f"wrote {out}_scores.png, {out}_pattern.png, {out}_patch.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="the run's directory (jaxgpt train --out) or a checkpoint")
    p.add_argument("--out", default="induction", help="prefix of the PNGs")
    p.add_argument("--half", type=int, default=12, help="tokens before the repeat")
    p.add_argument("--vocab", type=int, default=64, help="ids the runs were drawn from")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    params, cfg = load_params(args.checkpoint)
    report(params, cfg, init_params(cfg, 123), args.out, half=args.half, vocab=args.vocab,
           seed=args.seed)


def load_params(path: str) -> tuple[dict, GPTConfig]:
    """A jaxgpt run directory's newest checkpoint (or any checkpoint directory)."""
    from jaxgpt.cli.common import read_checkpoint

    run = Path(path)
    ckpts = sorted((run / "checkpoints").glob("*")) if (run / "checkpoints").is_dir() else []
    cfg, params, _ = read_checkpoint(str(ckpts[-1] if ckpts else run))
    return params, cfg


if __name__ == "__main__":
    main()
