"""sae-lens's evaluations of an SAE on the model it reads, by its names and definitions.

    metrics, features = run_evals(params, cfg, sae, batches, ignore_tokens=[bos])
    metrics["model_performance_preservation"]["ce_loss_score"]
    features["feature_density"]                                  # [d_sae]

`run_evals` computes what sae-lens 6.54's `run_evals` with `get_eval_everything_config`
computes, on the same token batches (each batch both its reconstruction and its sparsity
batch), with the same groups and names:

- model_behavior_preservation: `kl_div_with_sae`, `kl_div_with_ablation` (KL(clean || run),
  per token over the vocabulary), `kl_div_score = (KL_ablation - KL_sae) / KL_ablation`;
- model_performance_preservation: next-token losses `ce_loss_without_sae`, `ce_loss_with_sae`,
  `ce_loss_with_ablation`, and `ce_loss_score = (CE_ablation - CE_sae) / (CE_ablation -
  CE_clean)`. The SAE's reconstruction replaces the activation except at the ignored tokens;
  the ablation zeroes the whole activation;
- reconstruction_quality: `explained_variance` (`1 - E|x - x_hat|^2 / Var(x)`, Var summed
  over dimensions, over all tokens at once), `explained_variance_legacy` (per token against
  its batch's mean, averaged), `mse` (`|x - x_hat|^2` per token), `cossim`;
- shrinkage: `l2_norm_in`, `l2_norm_out`, `l2_ratio` (per token; an input norm under 1e-4
  counts as 1), `relative_reconstruction_bias` (`E|x_hat|^2 / E[x . x_hat]` per batch,
  averaged over batches);
- sparsity: `l0` (features != 0 per token), `l1`;
- token_stats: the tokens run, both ways.

Every per-token metric is the mean over the tokens that are not `ignore_tokens`; a loss at
position t (predicting t + 1) counts if token t does. jaxgpt adds `features`:
`dead_features` (never active on these tokens) and `dense_features` (active on more than
`dense_threshold` of them), from `feature_density`, sae-lens's per-feature fraction of tokens
active. `feature_metrics` holds it and `consistent_activation_heuristic` (tokens active per
prompt active; NaN for a feature active nowhere).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.interp.cache import check_tokens, run_with_cache, run_with_hooks
from jaxgpt.interp.interventions import ablate
from jaxgpt.nn.model import GPTModel
from jaxgpt.sae.model import SAE, decode, encode
from jaxgpt.sae.splice import as_rows, check_hook, splice

# A feature active on more than this fraction of tokens counts as dense (sae-lens reports only
# the densities; 10% is where the literature's "dense latents" begin).
DENSE_THRESHOLD = 0.1
# sae-lens's l2_ratio: an input norm below this is taken as 1.
_TINY_NORM = 1e-4


def _setting(default: Any, help: str, none: str | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "none": none})


def _fail(name: str, rule: str, *value: Any) -> ConfigError:
    return ConfigError("EvalConfig", name, rule, *value)


@dataclass(frozen=True)
class EvalConfig:
    """What `jaxgpt sae eval` evaluates on: the token batches it makes of a text or token
    file, and which tokens the metrics leave out (defaults: sae-lens's for GPT-2)."""

    hook_name: str | None = _setting(None, "hook point the SAE reads",
                                     none="the SAE's own, from its cfg.json")
    n_batches: int = _setting(10, "batches of prompts evaluated")
    batch_size_prompts: int = _setting(8, "prompts per batch")
    context_size: int | None = _setting(None, "tokens per prompt",
                                        none="min(128, the model's context_length)")
    prepend_bos: bool = _setting(True, "start each prompt with <|endoftext|> (sae-lens does, "
                                 "for GPT-2)")
    exclude: tuple[int, ...] | None = _setting(
        None, "token ids the metrics leave out", none="<|endoftext|>: sae-lens leaves out the "
        "tokenizer's special tokens")
    dense_threshold: float = _setting(DENSE_THRESHOLD, "a feature active on more than this "
                                      "fraction of tokens counts as dense")

    def __post_init__(self) -> None:
        for name in ("n_batches", "batch_size_prompts", "context_size"):
            v = getattr(self, name)
            if v is None and name == "context_size":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _fail(name, "must be an int >= 1", v)
        if self.context_size is not None and self.context_size < 2:
            raise _fail("context_size", "must be >= 2 (the loss predicts the next token)",
                        self.context_size)
        t = self.dense_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1:
            raise _fail("dense_threshold", "must be in [0, 1)", t)
        if self.exclude is not None and any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.exclude):
            raise _fail("exclude", "must be token ids (ints >= 0)", self.exclude)

    def replace(self, **changes: Any) -> EvalConfig:
        return dataclasses.replace(self, **changes)


def token_batches(tokens: np.ndarray, n_batches: int, batch_size: int, context_size: int,
                  bos: int | None = None) -> np.ndarray:
    """Consecutive windows of `tokens` as `[N, batch_size, context_size]` int32, each
    starting with `bos` when given (sae-lens's batches for a model that prepends BOS), as many
    whole batches as the tokens fill, at most `n_batches`; a ValueError if not one."""
    per_row = context_size - (bos is not None)
    rows = min(len(tokens) // per_row, n_batches * batch_size) // batch_size * batch_size
    if rows == 0:
        raise ValueError(f"{len(tokens)} tokens do not fill one batch of {batch_size} prompts "
                         f"of {context_size} tokens ({batch_size * per_row} needed)")
    out = np.asarray(tokens[:rows * per_row], np.int32).reshape(rows, per_row)
    if bos is not None:
        out = np.concatenate([np.full((rows, 1), bos, np.int32), out], axis=1)
    return out.reshape(-1, batch_size, context_size)


# --- one batch -----------------------------------------------------------------------------

@jax.jit
def _downstream(clean: jax.Array, spliced: jax.Array, ablated: jax.Array, tokens: jax.Array,
                keep: jax.Array) -> dict[str, jax.Array]:
    """Sums over the kept tokens of a batch: the next-token losses and KL divergences of the
    three runs' logits `[B, T, V]`, and the tokens counted."""
    log_p = jax.nn.log_softmax(clean)
    p = jnp.exp(log_p)
    next_keep = keep[:, :-1]

    def ce(logits: jax.Array) -> jax.Array:  # [B, T - 1], TransformerLens's per-token loss
        log_q = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(log_q, tokens[:, 1:, None], axis=-1)[..., 0]

    def kl(logits: jax.Array) -> jax.Array:  # [B, T], KL(clean || run), torch's kl_div's
        terms = p * (log_p - jax.nn.log_softmax(logits))
        return jnp.where(p > 0, terms, 0.0).sum(-1)

    def total(v: jax.Array, where: jax.Array) -> jax.Array:
        return jnp.where(where, v, 0.0).sum()

    return {"ce_loss_without_sae": total(ce(clean), next_keep),
            "ce_loss_with_sae": total(ce(spliced), next_keep),
            "ce_loss_with_ablation": total(ce(ablated), next_keep),
            "kl_div_with_sae": total(kl(spliced), keep),
            "kl_div_with_ablation": total(kl(ablated), keep),
            "ce_tokens": next_keep.sum(), "kl_tokens": keep.sum()}


@jax.jit
def _reconstruction(sae: SAE, x: jax.Array, keep: jax.Array) -> dict[str, jax.Array]:
    """Sums over the kept tokens of a batch of the SAE's per-token metrics on activations
    `x [B, T, d_in]`, the feature counts, and what explained variance is made of."""
    b, t, _ = x.shape
    feats = encode(sae, x)
    out = decode(sae, feats, x).astype(jnp.float32)
    x = x.astype(jnp.float32)
    k = keep[..., None]
    n = keep.sum()

    def total(v: jax.Array) -> jax.Array:  # a per-token metric [B, T], summed where kept
        return jnp.where(keep, v, 0.0).sum()

    norm_in, norm_out = jnp.linalg.norm(x, axis=-1), jnp.linalg.norm(out, axis=-1)
    rss = jnp.square(x - out).sum(-1)
    mean = jnp.where(k, x, 0.0).sum((0, 1)) / n  # the batch's mean activation
    cos = ((x / norm_in[..., None]) * (out / norm_out[..., None])).sum(-1)
    active = (feats != 0) & k  # [B, T, d_sae]
    return {
        "l2_norm_in": total(norm_in), "l2_norm_out": total(norm_out),
        "l2_ratio": total(norm_out / jnp.where(jnp.abs(norm_in) < _TINY_NORM, 1.0, norm_in)),
        "l0": total((feats != 0).sum(-1).astype(jnp.float32)),
        "l1": total(jnp.abs(feats).sum(-1)),
        "mse": total(rss), "cossim": total(cos),
        "explained_variance_legacy": total(1 - rss / jnp.square(x - mean).sum(-1)),
        "relative_reconstruction_bias": total(jnp.square(norm_out)) / total((x * out).sum(-1)),
        "sum_x": jnp.where(k, x, 0.0).sum((0, 1)), "sum_x2": total(jnp.square(x).sum(-1)),
        "feature_tokens": active.sum((0, 1)), "feature_prompts": active.any(1).sum(0),
        "tokens": n,
    }


# --- all batches ---------------------------------------------------------------------------

def _check_batches(batches: Any, cfg: GPTConfig) -> list[np.ndarray]:
    if isinstance(batches, (np.ndarray, jax.Array)):
        if np.ndim(batches) != 3:
            raise ValueError(f"batches must be int [N, B, T] (or a list of [B, T]), got shape "
                             f"{np.shape(batches)}")
        batches = list(batches)
    out = [check_tokens(np.asarray(b), cfg, f"batches[{i}]") for i, b in enumerate(batches)]
    if not out:
        raise ValueError("batches is empty: give at least one batch of token ids")
    short = [i for i, b in enumerate(out) if b.shape[1] < 2]
    if short:
        raise ValueError(f"batches[{short[0]}] has 1 token: the loss needs 2 or more")
    return out


def run_evals(params: Any, cfg: GPTConfig, sae: SAE, batches: Any, *,
              ignore_tokens: Iterable[int] = (), hook_name: str | None = None,
              model: GPTModel | None = None, dense_threshold: float = DENSE_THRESHOLD,
              ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """sae-lens's metrics of `sae` at its hook point, on the token `batches` (see the module's
    docstring).

    Args:
      params, cfg: the model's weights and config (`model`: a variant of it).
      sae: the SAE (batchtopk: `to_inference(sae)`).
      batches: int `[N, B, T]`, or a list of `[B, T]` batches.
      ignore_tokens: token ids whose positions no metric counts and where the SAE leaves the
        activation as it is (sae-lens's `exclude_special_tokens`: BOS).
      hook_name: where the SAE reads; default `sae.cfg.hook_name`.
      dense_threshold: the density above which a feature counts as dense.

    Returns:
      `(metrics, feature_metrics)`: floats by sae-lens's groups and names (and `features`),
      and `feature_density`, `consistent_activation_heuristic` `[d_sae]`.
    """
    hook = check_hook(cfg, hook_name or sae.cfg.hook_name, sae.cfg.d_in)
    splice(sae)  # refuses an SAE it cannot splice (batchtopk), before anything runs
    rows = _check_batches(batches, cfg)
    ignore = np.asarray(list(ignore_tokens), np.int32)
    down: dict[str, float] = {}
    recon: dict[str, Any] = {}
    rrb = []  # sae-lens averages relative_reconstruction_bias over batches
    for tokens in rows:
        keep = ~np.isin(tokens, ignore)
        clean, cache = run_with_cache(params, cfg, tokens, names=[hook], model=model)
        spliced = run_with_hooks(params, cfg, tokens, [(hook, splice(sae, exclude=~keep))],
                                 model=model)
        ablated = run_with_hooks(params, cfg, tokens, [(hook, ablate())], model=model)
        for k, v in _downstream(clean, spliced, ablated, tokens, keep).items():
            down[k] = down.get(k, 0.0) + float(v)
        x = as_rows(cache[hook], sae.cfg.d_in, hook)
        sums = jax.device_get(_reconstruction(sae, x, jnp.asarray(keep)))
        rrb.append(float(sums.pop("relative_reconstruction_bias")))
        for k, v in sums.items():
            recon[k] = recon.get(k, 0) + np.asarray(v, np.float64)
    return _metrics(down, recon, rrb, sum(r.size for r in rows), dense_threshold)


def _metrics(down: dict[str, float], recon: dict[str, Any], rrb: Sequence[float],
             tokens_run: int, dense_threshold: float,
             ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """The totals of every batch as sae-lens's means, scores and groups."""

    def mean(k: str, n: float) -> float:
        return float(recon[k]) / n if n else math.nan

    ce = {k: down[k] / down["ce_tokens"] for k in
          ("ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae")}
    kl = {k: down[k] / down["kl_tokens"] for k in ("kl_div_with_sae", "kl_div_with_ablation")}
    n = float(recon["tokens"])
    # Explained variance over every token at once: Var(x) = E|x|^2 - |E x|^2, in float64.
    variance = mean("sum_x2", n) - float(np.square(recon["sum_x"] / n).sum())
    mse = mean("mse", n)
    explained = (1.0 if mse < 1e-10 else 0.0) if variance < 1e-10 else 1.0 - mse / variance
    density = recon["feature_tokens"] / n
    with np.errstate(invalid="ignore", divide="ignore"):
        consistency = recon["feature_tokens"] / recon["feature_prompts"]
    metrics: dict[str, dict[str, float]] = {
        "model_behavior_preservation": {
            "kl_div_score": (kl["kl_div_with_ablation"] - kl["kl_div_with_sae"])
            / kl["kl_div_with_ablation"], **kl},
        "model_performance_preservation": {
            "ce_loss_score": (ce["ce_loss_with_ablation"] - ce["ce_loss_with_sae"])
            / (ce["ce_loss_with_ablation"] - ce["ce_loss_without_sae"]), **ce},
        "reconstruction_quality": {
            "explained_variance": explained,
            "explained_variance_legacy": mean("explained_variance_legacy", n),
            "mse": mse, "cossim": mean("cossim", n)},
        "shrinkage": {"l2_norm_in": mean("l2_norm_in", n), "l2_norm_out": mean("l2_norm_out", n),
                      "l2_ratio": mean("l2_ratio", n),
                      "relative_reconstruction_bias": float(np.mean(rrb))},
        "sparsity": {"l0": mean("l0", n), "l1": mean("l1", n)},
        "features": {"dead_features": int((density == 0).sum()),
                     "dense_features": int((density > dense_threshold).sum()),
                     "dense_threshold": float(dense_threshold)},
        "token_stats": {"total_tokens_eval_reconstruction": tokens_run,
                        "total_tokens_eval_sparsity_variance": tokens_run},
    }
    return metrics, {"feature_density": density, "consistent_activation_heuristic": consistency}
