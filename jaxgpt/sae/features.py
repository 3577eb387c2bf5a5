"""Features a person can look at: what each SAE feature fires on, over a text, as one HTML page.

    stats = feature_stats(params, cfg, sae, tokens, FeaturesConfig(top=50))
    write_features_page(stats, "features.html")

`feature_stats` cuts the tokens into windows of `context_size`, runs the model to the SAE's hook
(`run_with_cache(..., stop_at_layer=...)`) a batch of windows at a time, encodes, and keeps per
feature, in memory that does not grow with the text:

- density: the fraction of tokens whose activation is > 0 (sae-lens's feature sparsity);
- the largest activation;
- a histogram of the positive activations: `bins` equal bins over `[0, 2**e)`, `2**e` the
  smallest power of two above the largest activation. When a batch raises it, the bins merge in
  pairs, so the counts are exactly `np.histogram` of every activation over the final edges;
- its top contexts: the windows whose largest activation is highest, each the tokens around
  that maximum with their activations, kept by a bounded top-n merge batch after batch (ties:
  the earlier window first, so the merge gives what one top-n over all windows would);
- the tokens it promotes and suppresses most through the unembedding, its "logit weights" as
  sae-lens's Neuronpedia dashboards compute them: `W_dec[f] @ W_U`, with the final LayerNorm's
  scale folded into `W_U` as TransformerLens's default (folded) `HookedTransformer` does. The
  LayerNorm's centring and its division by the residual's norm are left out: they depend on the
  context the feature writes into.

`token_windows` and `feature_activations` are the windows and the activations it reads.
`features_page` renders those statistics as one self-contained page (inline CSS and SVG, no
script; a Content-Security-Policy refuses anything else), and `write_features_page` writes it.

Shapes: N windows, T tokens per window, F features kept, n contexts, W tokens shown per context.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math
import os
import unicodedata
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.sae.model import SAE, SAEConfig, decoder_norms, encode
from jaxgpt.sae.splice import check_hook, stop_layer


def setting(default: Any, help: str, none: str | None = None) -> Any:
    """A `FeaturesConfig` field: its default, its one-line help (the flag's), and what None
    means where it may be None."""
    return dataclasses.field(default=default, metadata={"help": help, "none": none})


def _fail(name: str, rule: str, *value: Any) -> ConfigError:
    return ConfigError("FeaturesConfig", name, rule, *value)


@dataclass(frozen=True)
class FeaturesConfig:
    """What `feature_stats` reads and keeps, and which features a page shows.

    Checked when made (`ConfigError` naming the field); `check(sae_cfg, cfg)` checks it against
    the SAE and the model."""

    hook_name: str | None = setting(None, "hook point the SAE reads",
                                    none="the SAE's own hook_name")
    context_size: int | None = setting(None, "tokens per window run through the model",
                                       none="min(128, context_length)")
    batch_size: int = setting(16, "windows per forward pass")
    max_tokens: int | None = setting(None, "read at most this many tokens of the text",
                                     none="all")
    prepend_bos: bool = setting(False, "start every window with <|endoftext|>, as sae-lens "
                                "trains most GPT-2 SAEs (its activations there are left out)")
    top: int | None = setting(100, "show the N densest features", none="all")
    features: tuple[int, ...] | None = setting(None, "show these features, not the densest",
                                               none="the top ones")
    contexts: int = setting(10, "top-activating contexts per feature")
    before: int = setting(12, "tokens shown before a context's most active token")
    after: int = setting(4, "tokens shown after it")
    bins: int = setting(32, "bins of each feature's histogram (a power of two)")
    logit_tokens: int = setting(10, "promoted and suppressed tokens shown per feature")

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("contexts", 1), ("before", 0), ("after", 0),
                          ("bins", 1), ("logit_tokens", 1)):
            _at_least(self, name, low)
        for name in ("context_size", "max_tokens", "top"):
            if getattr(self, name) is not None:
                _at_least(self, name, 2 if name == "context_size" and self.prepend_bos else 1)
        if self.bins & (self.bins - 1):
            raise _fail("bins", "must be a power of two (the bins merge in pairs)", self.bins)
        if self.features is not None:
            feats = tuple(self.features)
            if not feats or any(isinstance(f, bool) or not isinstance(f, (int, np.integer))
                                or f < 0 for f in feats):
                raise _fail("features", "must be a non-empty list of feature indices >= 0",
                            self.features)
            if len(set(feats)) != len(feats):
                raise _fail("features", "lists a feature twice", self.features)
            object.__setattr__(self, "features", tuple(int(f) for f in feats))  # frozen

    def check(self, sae_cfg: SAEConfig, cfg: GPTConfig) -> FeaturesConfig:
        """This config, if it fits the SAE and the model; ConfigError (or the ValueError of
        `jaxgpt.sae.splice.check_hook`: no such hook point, the closest named, or d_in not its
        width) if not."""
        check_hook(cfg, self.resolve_hook(sae_cfg), sae_cfg.d_in)
        if self.features is not None and max(self.features) >= sae_cfg.d_sae:
            raise _fail("features", f"must be below the SAE's d_sae {sae_cfg.d_sae}",
                        max(self.features))
        if self.context_size is not None and self.context_size > cfg.context_length:
            raise _fail("context_size", f"must be at most the model's context_length "
                        f"{cfg.context_length}", self.context_size)
        if self.window(cfg) < 1 + self.prepend_bos:
            raise _fail("prepend_bos", f"leaves no room for the text in windows of "
                        f"{self.window(cfg)} token")
        return self

    def resolve_hook(self, sae_cfg: SAEConfig) -> str:
        """The hook point to read: `hook_name`, or the SAE's."""
        name = self.hook_name or sae_cfg.hook_name
        if not name:
            raise _fail("hook_name", "must be given: the SAE does not say where it reads")
        return name

    def window(self, cfg: GPTConfig) -> int:
        """Tokens per window for the model `cfg`."""
        return self.context_size or min(128, cfg.context_length)


def _at_least(fc: FeaturesConfig, name: str, low: int) -> None:
    v = getattr(fc, name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise _fail(name, f"must be an int >= {low}", v)


# --- statistics ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureStats:
    """What `feature_stats` found, per feature shown (NumPy; rows sorted by density, densest
    first, ties by index).

    Attributes:
      features: `[F]` the features' indices in the SAE.
      density: `[F]` fraction of the tokens with activation > 0.
      max_act: `[F]` largest activation (0 for a feature never active).
      hist_counts: `[F, bins]` counts of the positive activations in equal bins over
        `[0, hist_range)`.
      hist_range: `[F]` the histograms' upper edges, powers of two (0: never active).
      context_act: `[F, n]` each top context's largest activation, highest first; contexts
        past `context_count` are padding.
      context_count: `[F]` top contexts found (those with an activation > 0).
      context_window: `[F, n]` the window (row of the token stream cut in `context_size`)
        of each context; context_pos `[F, n]` its most active token's position there.
      context_tokens: `[F, n, W]` the tokens around it (-1 past a window's edge), the most
        active one at index `before`; context_token_acts `[F, n, W]` their activations.
      promoted, suppressed: `[F, k]` token ids of the largest and smallest logit weights;
        promoted_logit, suppressed_logit `[F, k]` those weights.
      n_tokens: tokens read (the windows' first token left out when `prepend_bos`);
        n_windows, context_size: how they were cut.
      n_dead: features (of all `d_sae`, or of the listed ones) never active on them;
        n_scanned: features the statistics covered.
      before: index of the most active token in each context's tokens.
      hook_name, architecture, d_in, d_sae: the SAE's.
    """

    features: np.ndarray
    density: np.ndarray
    max_act: np.ndarray
    hist_counts: np.ndarray
    hist_range: np.ndarray
    context_act: np.ndarray
    context_count: np.ndarray
    context_window: np.ndarray
    context_pos: np.ndarray
    context_tokens: np.ndarray
    context_token_acts: np.ndarray
    promoted: np.ndarray
    promoted_logit: np.ndarray
    suppressed: np.ndarray
    suppressed_logit: np.ndarray
    n_tokens: int
    n_windows: int
    context_size: int
    n_dead: int
    n_scanned: int
    before: int
    hook_name: str
    architecture: str
    d_in: int
    d_sae: int


class _Running(NamedTuple):
    """The streamed statistics of F features, on the device."""

    active: jax.Array  # [F] int32 tokens with activation > 0
    max: jax.Array  # [F] float32
    exponent: jax.Array  # [F] int32: the histogram covers [0, 2**exponent)
    hist: jax.Array  # [F, bins] int32
    top_act: jax.Array  # [F, n] float32, -inf where empty
    top_window: jax.Array  # [F, n] int32
    top_pos: jax.Array  # [F, n] int32
    top_tokens: jax.Array  # [F, n, W] int32
    top_acts: jax.Array  # [F, n, W] float32


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _start(f: int, n: int, w: int, bins: int) -> _Running:
    """Nothing seen yet by F features keeping n contexts of W tokens (one compiled program)."""
    return _Running(jnp.zeros(f, jnp.int32), jnp.zeros(f, jnp.float32), jnp.zeros(f, jnp.int32),
                    jnp.zeros((f, bins), jnp.int32), jnp.full((f, n), -jnp.inf, jnp.float32),
                    jnp.full((f, n), -1, jnp.int32), jnp.zeros((f, n), jnp.int32),
                    jnp.full((f, n, w), -1, jnp.int32), jnp.zeros((f, n, w), jnp.float32))


def _histogram(run: _Running, acts: jax.Array, new_max: jax.Array, bins: int) -> tuple:
    """`(exponent, hist)` after a batch of activations `acts [N, F]`: the range raised to the
    power of two above `new_max` (old bins merged in pairs, as often as it doubled), then the
    batch's positive activations counted. Powers of two make `acts / width` exact, so a value on
    an edge falls in the bin it starts, as in `np.histogram`."""
    _, top = jnp.frexp(new_max)  # new_max = m * 2**top with m in [0.5, 1): 2**top > new_max
    exponent = jnp.where(new_max > 0, top, 0).astype(jnp.int32)
    shift = jnp.where(run.max > 0, exponent - run.exponent, 0).clip(0, 31)
    rows = jnp.arange(acts.shape[1])[:, None]
    merged = jnp.zeros_like(run.hist).at[rows, jnp.arange(bins) >> shift[:, None]].add(run.hist)
    width = jnp.ldexp(jnp.float32(1.0), exponent - int(math.log2(bins)))  # [F]
    idx = jnp.floor(acts / width).astype(jnp.int32).clip(0, bins - 1)
    hist = merged.at[jnp.broadcast_to(rows[:, 0], acts.shape), idx].add(
        (acts > 0).astype(jnp.int32))
    return exponent, hist


def _contexts(acts: jax.Array, tokens: jax.Array, row0: jax.Array, n: int, before: int,
              after: int) -> tuple[jax.Array, ...]:
    """A batch's best `n` windows per feature: `(act, window, pos, tokens, acts)` as `_Running`
    holds them, from activations `[B, T, F]` and tokens `[B, T]`; ties: the earlier window."""
    b, t, f = acts.shape
    row_max = acts.max(1).T  # [F, B]
    row_pos = acts.argmax(1).T  # [F, B]: the first position holding the maximum
    order = jnp.argsort(-row_max, axis=1, stable=True)[:, :min(n, b)]  # [F, k]
    act = jnp.take_along_axis(row_max, order, 1)
    pos = jnp.take_along_axis(row_pos, order, 1)
    at = pos[..., None] + jnp.arange(-before, after + 1)  # [F, k, W]
    inside = (at >= 0) & (at < t)
    at = at.clip(0, t - 1)
    rows = order[..., None]
    win_tokens = jnp.where(inside, tokens[rows, at], -1)
    win_acts = jnp.where(inside, acts[rows, at, jnp.arange(f)[:, None, None]], 0.0)
    return act, (row0 + order).astype(jnp.int32), pos.astype(jnp.int32), win_tokens, win_acts


@functools.partial(jax.jit, static_argnames=("n", "before", "after", "bins"),
                   donate_argnums=(0,))
def _update(run: _Running, acts: jax.Array, tokens: jax.Array, row0: jax.Array, *, n: int,
            before: int, after: int, bins: int) -> _Running:
    """The statistics after one batch: activations `acts [B, T, F]` of `tokens [B, T]`, the
    windows `row0..row0+B-1`."""
    flat = acts.reshape(-1, acts.shape[-1])
    new_max = jnp.maximum(run.max, flat.max(0))
    exponent, hist = _histogram(run, flat, new_max, bins)
    merged = [jnp.concatenate(pair, axis=1) for pair in zip(
        run[4:], _contexts(acts, tokens, row0, n, before, after), strict=True)]
    keep = jnp.argsort(-merged[0], axis=1, stable=True)[:, :n]  # the old ones first on ties
    top = [jnp.take_along_axis(m, keep.reshape(*keep.shape, *(1,) * (m.ndim - 2)), 1)
           for m in merged]
    return _Running(run.active + (flat > 0).sum(0, dtype=jnp.int32), new_max, exponent, hist,
                    *top)


def token_windows(tokens: Any, cfg: GPTConfig, fc: FeaturesConfig) -> np.ndarray:
    """`tokens [N]` as the windows `feature_stats` reads, int32 `[N // T', T]`: `fc.window(cfg)`
    tokens each (a text shorter than one window: one shorter window; a shorter tail is left
    out), each led by <|endoftext|> when `fc.prepend_bos`."""
    from jaxgpt.tokenizer import EOT_ID

    ids = np.asarray(tokens).reshape(-1)
    if fc.max_tokens is not None:
        ids = ids[:fc.max_tokens]
    if not ids.size:
        raise ValueError("the text has no tokens")
    t = fc.window(cfg) - fc.prepend_bos
    rows = ids[:len(ids) // t * t].reshape(-1, t) if len(ids) >= t else ids[None]
    rows = rows.astype(np.int32)
    if fc.prepend_bos:
        rows = np.concatenate([np.full((len(rows), 1), EOT_ID, np.int32), rows], axis=1)
    return rows


@functools.partial(jax.jit, static_argnames=("width", "skip_first"))
def _encode(sae: SAE, x: jax.Array, tokens: jax.Array, columns: jax.Array | None, *,
            width: int, skip_first: bool) -> tuple[jax.Array, jax.Array]:
    """`(tokens, feature activations [B, T, F] float32)` of hook activations `x [B, T, ...]`
    (hook_z's heads flattened), the first position dropped when `skip_first`."""
    acts = encode(sae, x.reshape(*tokens.shape, width)).astype(jnp.float32)
    if columns is not None:
        acts = acts[..., columns]
    if skip_first:  # the <|endoftext|> put before each window: not the text's
        return tokens[:, 1:], acts[:, 1:]
    return tokens, acts


def feature_activations(params: Any, cfg: GPTConfig, sae: SAE, windows: np.ndarray,
                        fc: FeaturesConfig) -> Iterator[tuple[int, jax.Array, jax.Array]]:
    """The activations `feature_stats` reads, a batch of `fc.batch_size` windows at a time:
    `(first window, tokens [B, T], acts [B, T, F])`, F the features `fc.features` (default
    all), without the position of the <|endoftext|> that `fc.prepend_bos` put first.

    Args:
      windows: int `[N, T]`, as `token_windows` cuts them.
    """
    from jaxgpt.interp.cache import run_with_cache

    hook = fc.resolve_hook(sae.cfg)
    check_hook(cfg, hook, sae.cfg.d_in)
    columns = None if fc.features is None else jnp.asarray(fc.features, jnp.int32)
    for start in range(0, len(windows), fc.batch_size):
        batch = windows[start:start + fc.batch_size]
        _, cache = run_with_cache(params, cfg, batch, names=[hook],
                                  stop_at_layer=stop_layer([hook]))
        yield (start, *_encode(sae, cache[hook], jnp.asarray(batch), columns,
                               width=sae.cfg.d_in, skip_first=fc.prepend_bos))


def feature_stats(params: Any, cfg: GPTConfig, sae: SAE, tokens: Any,
                  fc: FeaturesConfig | None = None) -> FeatureStats:
    """Each feature's density, largest activation, histogram, top contexts and logit weights
    over `tokens`, streamed a batch of windows at a time (see the module's docstring).

    Args:
      params, cfg: the model's weights and config.
      sae: the SAE; it reads `fc.hook_name` or its own `cfg.hook_name`.
      tokens: token ids `[N]` (a text; cut by `token_windows`).
      fc: what to read and keep (default `FeaturesConfig()`).

    Returns:
      `FeatureStats` of the features shown: `fc.features`, or the `fc.top` densest.
    """
    fc = (fc or FeaturesConfig()).check(sae.cfg, cfg)
    windows = token_windows(tokens, cfg, fc)
    scanned = sae.cfg.d_sae if fc.features is None else len(fc.features)
    run = _start(scanned, fc.contexts, fc.before + 1 + fc.after, fc.bins)
    for start, batch, acts in feature_activations(params, cfg, sae, windows, fc):
        run = _update(run, acts, batch, jnp.int32(start), n=fc.contexts, before=fc.before,
                      after=fc.after, bins=fc.bins)
    host = {name: np.asarray(a) for name, a in run._asdict().items()}
    n_tokens = windows.size - len(windows) * fc.prepend_bos
    density = host["active"] / n_tokens
    index = np.arange(scanned) if fc.features is None else np.asarray(fc.features)
    order = np.lexsort((index, -density))  # densest first, then by index
    if fc.features is None and fc.top is not None:
        order = order[:fc.top]
    hook = fc.resolve_hook(sae.cfg)
    promoted, suppressed = logit_weights(params, cfg, sae, index[order], fc.logit_tokens, hook)
    found = host["top_act"][order] > 0
    return FeatureStats(
        features=index[order], density=density[order], max_act=host["max"][order],
        hist_counts=host["hist"][order].astype(np.int64),
        hist_range=np.where(host["max"][order] > 0, np.ldexp(1.0, host["exponent"][order]), 0.0),
        context_act=np.where(found, host["top_act"][order], 0.0), context_count=found.sum(1),
        context_window=np.where(found, host["top_window"][order], -1),
        context_pos=host["top_pos"][order], context_tokens=host["top_tokens"][order],
        context_token_acts=host["top_acts"][order], promoted=promoted[0],
        promoted_logit=promoted[1], suppressed=suppressed[0], suppressed_logit=suppressed[1],
        n_tokens=int(n_tokens), n_windows=len(windows), context_size=windows.shape[1],
        n_dead=int((host["active"] == 0).sum()), n_scanned=scanned, before=fc.before,
        hook_name=hook, architecture=sae.cfg.architecture, d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae)


def decoder_directions(sae: SAE, features: Any) -> jax.Array:
    """What one unit of each feature's activation adds to the reconstruction, `[F, d_in]`:
    its W_dec row (divided by the row's norm where topk/batchtopk decode with
    `rescale_acts_by_decoder_norm`)."""
    features = jnp.asarray(features, jnp.int32)
    rows = sae.params["W_dec"][features].astype(jnp.float32)
    if sae.cfg.architecture in ("topk", "batchtopk") and sae.cfg.rescale_acts_by_decoder_norm:
        rows = rows / decoder_norms(sae)[features][:, None]
    return rows


# The projection that carries a hook point's vectors into the residual stream, by local name:
# the module (under the point's own) and its kernel. Points of shape "B T D" are there already.
_OUT_PROJ = {"hook_z": ("out_proj",), "hook_post": ("layers_2",)}


def residual_directions(params: Any, cfg: GPTConfig, hook_name: str,
                        directions: jax.Array) -> jax.Array | None:
    """`directions [F, width]` at the hook point `hook_name` as residual-stream directions
    `[F, D]`: as they are for points of width D (resid, attn_out, mlp_out, embeddings), through
    the attention's `out_proj` for `attn.hook_z` and the MLP's second layer for
    `mlp.hook_post` (biases left out); None for any other point (q, k, v, pre-activations)."""
    from jaxgpt.nn.hooks import hook_points, module_path

    shape = dict(hook_points(cfg))[hook_name].shape
    if shape == "B T D":
        return directions
    path, local = module_path(hook_name)
    if local not in _OUT_PROJ or shape.split()[2:] not in (["H", "Dh"], ["4D"]):
        return None
    module = params
    for key in (*path, *_OUT_PROJ[local]):
        module = module[key]
    return directions @ module["kernel"].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "hook_name", "k"))
def _logit_extremes(params: Any, sae: SAE, features: jax.Array, *, cfg: GPTConfig,
                    hook_name: str, k: int) -> tuple[jax.Array, ...]:
    """`(top weights, their ids, bottom weights, their ids)`, each `[F, k]`, of the logit
    weights of `features [F]` (see `logit_weights`)."""
    from jaxgpt.interp.residual import unembed_directions

    resid = residual_directions(params, cfg, hook_name, decoder_directions(sae, features))
    assert resid is not None  # logit_weights asks only for points that have one
    unembed = unembed_directions(params, cfg, jnp.arange(cfg.vocab_size)).astype(jnp.float32)
    logits = resid @ unembed.T  # [F, V]
    top, top_ids = jax.lax.top_k(logits, k)
    bottom, bottom_ids = jax.lax.top_k(-logits, k)
    return top, top_ids, -bottom, bottom_ids


def logit_weights(params: Any, cfg: GPTConfig, sae: SAE, features: Any, k: int,
                  hook_name: str, chunk: int = 256) -> tuple[tuple[np.ndarray, np.ndarray],
                                                             tuple[np.ndarray, np.ndarray]]:
    """The tokens each feature promotes and suppresses most: `((ids, weights), (ids,
    weights))`, each `[F, k]`, largest and smallest first, of the logit weights: the
    feature's residual direction (`decoder_directions`, then `residual_directions`) times
    `final_norm.scale * W_U` (`[F, V]`, made `chunk` features at a time). `[F, 0]` where the
    hook point has no residual direction (`residual_directions` is None)."""
    features = np.asarray(features, np.int64).reshape(-1)
    k = min(k, cfg.vocab_size)
    probe = jax.eval_shape(lambda: residual_directions(params, cfg, hook_name,
                                                       jnp.zeros((1, sae.cfg.d_in))))
    if probe is None or not features.size:
        empty = (np.zeros((len(features), 0), np.int64), np.zeros((len(features), 0)))
        return empty, empty
    chunk = min(chunk, len(features))
    padded = np.resize(features, -(-len(features) // chunk) * chunk)  # one shape for all
    parts = [_logit_extremes(params, sae, jnp.asarray(padded[i:i + chunk], jnp.int32),
                             cfg=cfg, hook_name=hook_name, k=k)
             for i in range(0, len(padded), chunk)]
    top, top_ids, bottom, bottom_ids = (np.concatenate([np.asarray(p[j]) for p in parts])
                                        [:len(features)] for j in range(4))
    return (top_ids, top), (bottom_ids, bottom)


# --- the page ------------------------------------------------------------------------------

class TokenBytes(Protocol):
    """What the page needs of a tokenizer (a `tiktoken.Encoding` has it): a token's bytes."""

    def decode_single_token_bytes(self, token: int) -> bytes: ...


# Characters a token may hold that would vanish or break the line on the page, as shown.
_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}  # and a token of spaces only: "·" each
_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:16px;
 color:#1d1d1f;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:0}h3{font-size:12px;margin:10px 0 4px;
 text-transform:uppercase;letter-spacing:.04em;color:#666}
.meta{color:#555;margin:0 0 12px}a{color:#0b57d0;text-decoration:none}
table.index{border-collapse:collapse;font-variant-numeric:tabular-nums;margin-bottom:20px}
.index td,.index th{padding:2px 10px;border-bottom:1px solid #e4e4e4;text-align:right}
.index th{font-weight:600;color:#444}.bar{display:inline-block;height:8px;background:#f08a24;
 vertical-align:middle;margin-left:6px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 14px;margin:12px 0}
.card.dead{color:#777}.badge{font-size:11px;background:#eee;border-radius:3px;padding:1px 5px;
 margin-left:6px;color:#555;font-weight:normal}
.grid{display:grid;grid-template-columns:minmax(0,1fr) 280px;gap:18px}
.ctx{margin:0;padding-left:0;list-style:none}.ctx li{display:grid;padding:2px 0;
 grid-template-columns:52px minmax(0,3fr) auto minmax(0,1fr);border-bottom:1px dotted #eee}
.ctx .v{color:#666;font-variant-numeric:tabular-nums;text-align:right;padding-right:10px}
.ctx .pre{display:flex;justify-content:flex-end;overflow:hidden}.ctx .post{overflow:hidden}
.toks{font-family:ui-monospace,monospace;font-size:13px;white-space:pre;overflow-x:auto}
.t{border-radius:2px;padding:0 1px}.t.max{outline:2px solid #b3261e;font-weight:600}
.t.ws{color:#999}.t.bytes{color:#8a4baf}.t.special{color:#0b57d0}
table.logits{border-collapse:collapse;font-size:13px;width:100%}
.logits td{padding:0 4px}.logits td.n{text-align:right;color:#555;
 font-variant-numeric:tabular-nums}
svg text{font:10px system-ui,sans-serif;fill:#555}
"""


def _token_text(tokenizer: TokenBytes, token: int) -> tuple[str, str]:
    """`(text shown, css class)` of one token: whitespace made visible, bytes that are not
    whole UTF-8 characters (a piece of an emoji) as `\\xNN`, special tokens as themselves, an
    id the tokenizer lacks as `<id N>`. Not yet HTML-escaped."""
    try:
        raw = tokenizer.decode_single_token_bytes(int(token))
    except (KeyError, ValueError):
        return f"<id {token}>", "special"
    text = raw.decode("utf-8", errors="backslashreplace")  # b" \xf0\x9f": " \\xf0\\x9f"
    if text in getattr(tokenizer, "special_tokens_set", ()):
        return text, "special"
    shown = "".join(_VISIBLE.get(c, c) if unicodedata.category(c) != "Cc" or c in _VISIBLE
                    else f"\\x{ord(c):02x}" for c in text)
    if not _whole_characters(raw):
        return shown, "bytes"
    if text and not text.strip():  # only whitespace: each space as a dot, so it shows
        return shown.replace(" ", "·"), "ws"
    return shown, ""


def _whole_characters(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _token_span(tokenizer: TokenBytes, token: int, act: float | None = None,
                scale: float = 1.0, is_max: bool = False, part_of: str | None = None) -> str:
    """One token as an HTML span, shaded by `act / scale` where `act` is given; `part_of`:
    the characters a run of byte tokens around it makes (said in its tooltip)."""
    text, kind = _token_text(tokenizer, token)
    classes = " ".join(c for c in ("t", kind, "max" if is_max else "") if c)
    style, tip = "", f"token {token}" + (f" · part of {part_of!r}" if part_of else "")
    if act is not None:
        tip = f"activation {act:.4g} · {tip}"
        alpha = min(max(act / scale, 0.0), 1.0) if scale > 0 else 0.0
        if alpha > 0:
            style = f' style="background:rgba(240,138,36,{alpha:.3f})"'
    return (f'<span class="{classes}"{style} title="{html.escape(tip)}">'
            f"{html.escape(text)}</span>")


def _histogram_svg(counts: np.ndarray, upper: float) -> str:
    """The activation histogram as an inline SVG: `counts [bins]` over `[0, upper)`."""
    w, h, pad = 260, 80, 14
    bins, top = len(counts), max(int(counts.max()), 1)
    width = w / bins
    bars = []
    for i, c in enumerate(counts):
        bar = (h - pad) * c / top
        lo, hi = upper * i / bins, upper * (i + 1) / bins
        bars.append(f'<rect x="{i * width:.2f}" y="{h - pad - bar:.2f}" width="{width - 1:.2f}" '
                    f'height="{bar:.2f}" fill="#f08a24"><title>[{lo:.3g}, {hi:.3g}): {c}'
                    f"</title></rect>")
    return (f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
            f'aria-label="histogram of the positive activations">{"".join(bars)}'
            f'<line x1="0" y1="{h - pad}" x2="{w}" y2="{h - pad}" stroke="#999"/>'
            f'<text x="0" y="{h - 2}">0</text><text x="{w}" y="{h - 2}" text-anchor="end">'
            f'{upper:.3g}</text><text x="{w}" y="10" text-anchor="end">{top} max count</text>'
            f"</svg>")


def _byte_runs(tokenizer: TokenBytes, tokens: Sequence[int]) -> dict[int, str]:
    """For each token of `tokens` that is not whole UTF-8 characters, the text of the run of
    such tokens it is part of (an emoji split over two tokens: the emoji)."""
    runs: dict[int, str] = {}
    run: list[int] = []
    for w, tok in enumerate([*tokens, -1]):
        partial = tok >= 0 and _token_text(tokenizer, int(tok))[1] == "bytes"
        if partial:
            run.append(w)
            continue
        if run:
            raw = b"".join(tokenizer.decode_single_token_bytes(int(tokens[r])) for r in run)
            runs.update(dict.fromkeys(run, raw.decode("utf-8", errors="replace")))
            run = []
    return runs


def _contexts_html(stats: FeatureStats, i: int, tokenizer: TokenBytes) -> str:
    """Feature row `i`'s top contexts as a list, each token shaded by its activation, the
    most active token of each in one column (what precedes it cut on the left if long)."""
    scale = float(stats.max_act[i])
    items = []
    for j in range(int(stats.context_count[i])):
        toks = stats.context_tokens[i, j]
        runs = _byte_runs(tokenizer, toks)
        spans = [_token_span(tokenizer, int(tok), float(act), scale, w == stats.before,
                             runs.get(w)) if tok >= 0 else ""
                 for w, (tok, act) in enumerate(zip(toks, stats.context_token_acts[i, j],
                                                    strict=True))]
        b = stats.before
        where = f"window {stats.context_window[i, j]}, token {stats.context_pos[i, j]}"
        items.append(f'<li><span class="v" title="{where}">{stats.context_act[i, j]:.3g}'
                     f'</span><span class="toks pre">{"".join(spans[:b])}</span>'
                     f'<span class="toks">{spans[b]}</span>'
                     f'<span class="toks post">{"".join(spans[b + 1:])}</span></li>')
    return f'<ol class="ctx">{"".join(items)}</ol>'


def _logits_html(ids: np.ndarray, weights: np.ndarray, tokenizer: TokenBytes) -> str:
    rows = "".join(f'<tr><td class="toks">{_token_span(tokenizer, int(t))}</td>'
                   f'<td class="n">{w:+.3f}</td></tr>' for t, w in zip(ids, weights, strict=True))
    return f'<table class="logits">{rows}</table>'


def _card(stats: FeatureStats, i: int, tokenizer: TokenBytes) -> str:
    """Feature row `i`'s card: a header, then (unless it never fired) its contexts, histogram
    and logit weights."""
    f = int(stats.features[i])
    if stats.max_act[i] <= 0:
        return (f'<section class="card dead" id="f{f}"><h2>Feature {f}<span class="badge">'
                f"dead</span></h2><p>never active on these {stats.n_tokens:,} tokens</p>"
                f"</section>")
    logits = ("<p>no logit weights: this hook point writes no residual direction</p>"
              if not stats.promoted.shape[1] else
              f"<h3>Promotes</h3>"
              f"{_logits_html(stats.promoted[i], stats.promoted_logit[i], tokenizer)}"
              f"<h3>Suppresses</h3>"
              f"{_logits_html(stats.suppressed[i], stats.suppressed_logit[i], tokenizer)}")
    return (f'<section class="card" id="f{f}"><h2>Feature {f}</h2>'
            f'<p class="meta">density {_percent(stats.density[i])} · max activation '
            f"{stats.max_act[i]:.4g} · <a href=\"#index\">index</a></p>"
            f'<div class="grid"><div><h3>Top contexts</h3>{_contexts_html(stats, i, tokenizer)}'
            f"</div><div><h3>Activations &gt; 0</h3>"
            f"{_histogram_svg(stats.hist_counts[i], float(stats.hist_range[i]))}{logits}</div>"
            f"</div></section>")


def _percent(x: float) -> str:
    return f"{100 * x:.3g}%"


def _index(stats: FeatureStats) -> str:
    """The table of the features shown, densest first, each linking to its card."""
    top = float(stats.density.max()) if len(stats.density) else 0.0
    rows = []
    for i, f in enumerate(stats.features):
        bar = 80 * stats.density[i] / top if top > 0 else 0
        dead = '<span class="badge">dead</span>' if stats.max_act[i] <= 0 else ""
        rows.append(f'<tr><td><a href="#f{f}">{f}</a>{dead}</td><td>'
                    f'{_percent(stats.density[i])}<span class="bar" style="width:{bar:.1f}px">'
                    f"</span></td><td>{stats.max_act[i]:.4g}</td></tr>")
    return (f'<table class="index" id="index"><thead><tr><th>feature</th><th>density</th>'
            f"<th>max activation</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def features_page(stats: FeatureStats, tokenizer: TokenBytes | None = None, *,
                  title: str | None = None) -> str:
    """The page of `stats`: one self-contained HTML document (inline CSS and SVG, no script,
    a Content-Security-Policy that loads nothing else): a header, the index of features by
    density, and a card per feature. `tokenizer`: default GPT-2's; every token is escaped."""
    if tokenizer is None:
        from jaxgpt.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    title = title or f"SAE features at {stats.hook_name}"
    meta = (f"{stats.architecture} SAE, d_in {stats.d_in}, d_sae {stats.d_sae}, reading "
            f"{stats.hook_name}, over {stats.n_tokens:,} tokens ({stats.n_windows:,} windows of "
            f"{stats.context_size}). {len(stats.features):,} features shown, densest first; "
            f"{stats.n_dead:,} of the {stats.n_scanned:,} read never fired.")
    cards = "".join(_card(stats, i, tokenizer) for i in range(len(stats.features)))
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            'style-src \'unsafe-inline\'">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f'<header><h1>{html.escape(title)}</h1><p class="meta">{html.escape(meta)}</p>'
            f"</header><nav>{_index(stats)}</nav><main>{cards}</main></body></html>\n")


def write_features_page(stats: FeatureStats, path: str | os.PathLike,
                        tokenizer: TokenBytes | None = None, *,
                        title: str | None = None) -> Path:
    """Write `features_page(stats, ...)` to `path`, atomically (a hidden temporary beside it,
    renamed into place when complete); the path written."""
    path = Path(path)
    text = features_page(stats, tokenizer, title=title)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
