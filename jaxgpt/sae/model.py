"""Sparse autoencoders as sae-lens 6.54.12 defines them, in pure JAX.

An `SAE` is a pytree: `params` (`W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`,
`b_dec [d_in]`, and `threshold [d_sae]` for JumpReLU), `state` (what training updates without
gradients: BatchTopK's `topk_threshold`), and its static `SAEConfig`. `encode`, `decode` and
`forward` are plain functions of it, so they jit, vmap, differentiate, and ride in a hook
(`jaxgpt.sae.splice`).

The four architectures sae-lens trains:

- standard: `ReLU(x' @ W_enc + b_enc)`, trained with an L1 penalty on the activations weighted
  by the decoder rows' norms;
- topk: the k largest pre-activations, ReLU'd, the rest 0; trained with the auxiliary loss that
  makes dead features reconstruct the residual error; `rescale_acts_by_decoder_norm` selects
  and decodes as if the decoder's rows had norm 1;
- batchtopk: the `k * N` largest activations over a batch of N rows (k on average per row),
  with a threshold learned along the way (`state["topk_threshold"]`); it is used and saved as
  a jumprelu SAE with that threshold (`to_inference`);
- jumprelu: `ReLU(h) * (h > threshold)`, trained through straight-through estimates of the
  step's gradient (a rectangle of width `jumprelu_bandwidth`) with an L0 penalty, the
  threshold kept `>= 0` (`project_threshold`).

Where `x' = x - b_dec` when `apply_b_dec_to_input`. Shapes: `x [..., d_in]`, activations
`[..., d_sae]`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
SPARSITY_LOSS_MODES = ("step", "tanh", "quadratic")


@dataclass(frozen=True)
class SAEConfig:
    """An SAE's architecture and the coefficients of its training loss, with sae-lens's field
    names and defaults (its `*TrainingSAEConfig`s'). Frozen and hashable: a static part of
    the `SAE` pytree."""

    architecture: str
    d_in: int
    d_sae: int
    # topk: features kept per row; batchtopk: kept per row on average over a batch.
    k: float = 100
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    # topk/batchtopk: select and decode as if W_dec's rows had norm 1 (sae-lens trains with it).
    rescale_acts_by_decoder_norm: bool = False
    dtype: str = "float32"
    # Training: the decoder rows' norm at init (Anthropic's "heuristic" init); None: kaiming.
    decoder_init_norm: float | None = 0.1
    # standard: the sparsity penalty `l1_coefficient * mean(|acts * |W_dec rows||_p)`.
    l1_coefficient: float = 1.0
    lp_norm: float = 1.0
    l1_warm_up_steps: int = 0
    # topk/batchtopk: the weight of the dead features' auxiliary reconstruction loss.
    aux_loss_coefficient: float = 1.0
    # batchtopk: the rate of the threshold's moving average of the smallest kept activation.
    topk_threshold_lr: float = 0.01
    # jumprelu
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_loss_mode: str = "step"
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    pre_act_loss_coefficient: float | None = None
    jumprelu_tanh_scale: float = 4.0
    jumprelu_ste_to_input: bool = False
    target_l0: float | None = None
    # Where it reads (a hook point name); sae-lens keeps it in `metadata.hook_name`.
    hook_name: str | None = None
    # "hook_z": it reads attention heads' `[..., H, Dh]` flattened to `[..., H * Dh]` (encode
    # takes the flattened rows; `jaxgpt.sae.splice` flattens a hook_z point whatever this says).
    reshape_activations: str = "none"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAE architecture {self.architecture!r} is not one jaxgpt knows: "
                             f"{', '.join(ARCHITECTURES)}")
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.reshape_activations not in ("none", "hook_z"):
            raise ValueError(f"reshape_activations must be 'none' or 'hook_z', got "
                             f"{self.reshape_activations!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALIZATIONS}, got "
                             f"{self.normalize_activations!r}")
        if self.architecture in ("topk", "batchtopk"):
            if not 0 < self.k <= self.d_sae:
                raise ValueError(f"k must be in (0, d_sae={self.d_sae}], got {self.k!r}")
            if self.architecture == "topk" and int(self.k) != self.k:
                raise ValueError(f"topk's k is a whole number of features, got {self.k!r}")
        if self.jumprelu_sparsity_loss_mode not in SPARSITY_LOSS_MODES:
            raise ValueError(f"jumprelu_sparsity_loss_mode must be one of "
                             f"{SPARSITY_LOSS_MODES}, got {self.jumprelu_sparsity_loss_mode!r}")
        if self.architecture == "jumprelu" and self.jumprelu_sparsity_loss_mode == "quadratic" \
                and (self.target_l0 is None or not 0 < self.target_l0 <= self.d_sae):
            raise ValueError(f"the quadratic sparsity loss needs target_l0 in (0, d_sae="
                             f"{self.d_sae}], got {self.target_l0!r}")

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)


class SAE(struct.PyTreeNode):
    """A sparse autoencoder: its weights, its gradient-free training state, its config."""

    params: dict[str, jax.Array]
    state: dict[str, jax.Array]
    cfg: SAEConfig = struct.field(pytree_node=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return forward(self, x)


def param_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """The params an SAE of `cfg` holds, by sae-lens's names, and their shapes."""
    shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,),
              "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (cfg.d_sae,)
    return shapes


def init_sae(cfg: SAEConfig, key: jax.Array | int = 0) -> SAE:
    """A new SAE as sae-lens initialises its training SAEs: W_dec kaiming-uniform (torch's
    default, bound sqrt(6 / d_in)), its rows scaled to `decoder_init_norm` unless that is None,
    `W_enc = W_dec.T`, zero biases, JumpReLU's threshold at `jumprelu_init_threshold`."""
    if isinstance(key, int):
        key = jax.random.key(key)
    dtype = jnp.dtype(cfg.dtype)
    bound = (6.0 / cfg.d_in) ** 0.5
    W_dec = jax.random.uniform(key, (cfg.d_sae, cfg.d_in), jnp.float32, -bound, bound)
    if cfg.decoder_init_norm is not None:
        W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True) * cfg.decoder_init_norm
    params = {"W_enc": W_dec.T.astype(dtype), "b_enc": jnp.zeros(cfg.d_sae, dtype),
              "W_dec": W_dec.astype(dtype), "b_dec": jnp.zeros(cfg.d_in, dtype)}
    if cfg.architecture == "jumprelu":
        params["threshold"] = jnp.full(cfg.d_sae, cfg.jumprelu_init_threshold, jnp.float32)
    state = {"topk_threshold": jnp.zeros((), jnp.float32)} if cfg.architecture == "batchtopk" \
        else {}
    return SAE(params, state, cfg)


def from_params(cfg: SAEConfig, params: Mapping[str, Any],
                state: Mapping[str, Any] | None = None) -> SAE:
    """An SAE of `cfg` holding `params` (checked against `param_shapes(cfg)`)."""
    want = param_shapes(cfg)
    missing = sorted(set(want) - set(params))
    if missing:
        raise ValueError(f"a {cfg.architecture} SAE needs {', '.join(missing)} among its "
                         f"weights, which hold {', '.join(sorted(params))}")
    out = {}
    for name, shape in want.items():
        value = jnp.asarray(params[name])
        if value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}, but d_in={cfg.d_in}, "
                             f"d_sae={cfg.d_sae} need {shape}")
        out[name] = value if name == "threshold" else value.astype(cfg.dtype)
    state = dict(state or {})
    if cfg.architecture == "batchtopk":
        state["topk_threshold"] = jnp.asarray(state.get("topk_threshold", 0.0), jnp.float32)
    return SAE(out, {k: jnp.asarray(v) for k, v in state.items()}, cfg)


# --- the activation functions and their training gradients ---------------------------------

def _rectangle(x: jax.Array) -> jax.Array:
    return ((x > -0.5) & (x < 0.5)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def jumprelu(x: jax.Array, threshold: jax.Array, bandwidth: float,
             ste_to_input: bool) -> jax.Array:
    """`ReLU(x) * (x > threshold)` (sae-lens's `JumpReLUSAE`; its training SAE computes
    `x * (x > threshold)`, the same for the non-negative thresholds it trains with), with
    sae-lens's straight-through gradient for the threshold
    (`-(threshold / bandwidth) * rectangle((x - threshold) / bandwidth)`), and for `x` too
    when `ste_to_input` (Anthropic's variant)."""
    return jax.nn.relu(x) * (x > threshold).astype(x.dtype)


def _jumprelu_fwd(x: jax.Array, threshold: jax.Array, bandwidth: float,
                  ste_to_input: bool) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return jumprelu(x, threshold, bandwidth, ste_to_input), (x, threshold)


def _jumprelu_bwd(bandwidth: float, ste_to_input: bool, res: tuple[jax.Array, jax.Array],
                  g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, threshold = res
    ste = (threshold / bandwidth) * _rectangle((x - threshold) / bandwidth) * g
    x_grad = (x > threshold).astype(g.dtype) * g + (ste if ste_to_input else 0.0)
    return x_grad, _sum_to(-ste, threshold)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def step(x: jax.Array, threshold: jax.Array, bandwidth: float, ste_to_input: bool) -> jax.Array:
    """`x > threshold` as 0/1, with sae-lens's straight-through gradient
    (`-(1 / bandwidth) * rectangle((x - threshold) / bandwidth)` for the threshold)."""
    return (x > threshold).astype(x.dtype)


def _step_fwd(x: jax.Array, threshold: jax.Array, bandwidth: float,
              ste_to_input: bool) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return step(x, threshold, bandwidth, ste_to_input), (x, threshold)


def _step_bwd(bandwidth: float, ste_to_input: bool, res: tuple[jax.Array, jax.Array],
              g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, threshold = res
    ste = (1.0 / bandwidth) * _rectangle((x - threshold) / bandwidth) * g
    return (ste if ste_to_input else jnp.zeros_like(x)), _sum_to(-ste, threshold)


step.defvjp(_step_fwd, _step_bwd)


def _sum_to(g: jax.Array, like: jax.Array) -> jax.Array:
    """`g` summed over the leading axes `like` broadcast along."""
    return g.reshape(-1, *like.shape).sum(0).astype(like.dtype)


def topk(h: jax.Array, k: int) -> jax.Array:
    """ReLU of the `k` largest entries of each row of `h`, 0 elsewhere."""
    values, idx = jax.lax.top_k(h, k)
    return _scatter_last(jnp.zeros_like(h), idx, jax.nn.relu(values))


def batch_topk(h: jax.Array, k: float) -> jax.Array:
    """The `int(k * rows)` largest of `ReLU(h)` over the whole batch, 0 elsewhere."""
    acts = jax.nn.relu(h)
    flat = acts.reshape(-1)
    rows = max(1, flat.size // h.shape[-1])
    values, idx = jax.lax.top_k(flat, int(k * rows))
    return jnp.zeros_like(flat).at[idx].set(values).reshape(h.shape)


def _scatter_last(out: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
    """`out` with `values` put at indices `idx` of its last axis (row by row)."""
    flat_out = out.reshape(-1, out.shape[-1])
    rows = jnp.arange(flat_out.shape[0])[:, None]
    flat = flat_out.at[rows, idx.reshape(flat_out.shape[0], -1)].set(
        values.reshape(flat_out.shape[0], -1))
    return flat.reshape(out.shape)


# --- encode, decode, forward ---------------------------------------------------------------

def decoder_norms(sae: SAE) -> jax.Array:
    """`|W_dec rows|`, `[d_sae]`."""
    return jnp.linalg.norm(sae.params["W_dec"], axis=-1)


def clamped_decoder_norms(sae: SAE) -> jax.Array:
    """`|W_dec rows|` at least 1e-8, what sae-lens folds with (`get_W_dec_norm`), `[d_sae]`."""
    return jnp.maximum(decoder_norms(sae), 1e-8)


def _norm_in(cfg: SAEConfig, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """`x` normalised as `cfg` asks at run time, and the statistics `_norm_out` undoes it
    with (constant_norm_rescale: the coefficient; layer_norm: the std and the mean)."""
    if cfg.normalize_activations == "constant_norm_rescale":
        coeff = cfg.d_in ** 0.5 / jnp.linalg.norm(x, axis=-1, keepdims=True)
        return x * coeff, (coeff, jnp.zeros((), x.dtype))
    if cfg.normalize_activations == "layer_norm":
        mu = x.mean(-1, keepdims=True)
        std = jnp.std(x - mu, axis=-1, keepdims=True, ddof=1)  # torch's std is unbiased
        return (x - mu) / (std + 1e-5), (std, mu)
    return x, (jnp.ones((), x.dtype), jnp.zeros((), x.dtype))


def _norm_out(cfg: SAEConfig, x: jax.Array, out: jax.Array) -> jax.Array:
    """`out` taken back from the normalised space of input `x` (as sae-lens rounds it)."""
    a, b = _norm_in(cfg, x)[1]
    if cfg.normalize_activations == "constant_norm_rescale":
        return out / a
    return out * a + b  # layer_norm: without the epsilon, as sae-lens undoes it


def process_sae_in(sae: SAE, x: jax.Array) -> jax.Array:
    """The input as the encoder sees it: cast to the SAE's dtype, normalised if its config
    says so at run time, less `b_dec` when `apply_b_dec_to_input`."""
    x = _norm_in(sae.cfg, x.astype(sae.cfg.dtype))[0]
    return x - sae.params["b_dec"] * sae.cfg.apply_b_dec_to_input


def hidden_pre(sae: SAE, x: jax.Array) -> jax.Array:
    """The encoder's pre-activations (sae-lens's `hook_sae_acts_pre`; topk/batchtopk with
    `rescale_acts_by_decoder_norm`: times the decoder norms, as its training SAEs return
    them)."""
    h = process_sae_in(sae, x) @ sae.params["W_enc"] + sae.params["b_enc"]
    if sae.cfg.architecture in ("topk", "batchtopk") and sae.cfg.rescale_acts_by_decoder_norm:
        h = h * decoder_norms(sae)
    return h


def activation(sae: SAE, h: jax.Array) -> jax.Array:
    """The feature activations of pre-activations `h` (training semantics: batchtopk keeps
    `k` per row on average over all rows of `h`)."""
    cfg = sae.cfg
    if cfg.architecture == "standard":
        return jax.nn.relu(h)
    if cfg.architecture == "topk":
        return topk(h, int(cfg.k))
    if cfg.architecture == "batchtopk":
        return batch_topk(h, cfg.k)
    threshold = sae.params["threshold"].astype(h.dtype)
    return jumprelu(h, threshold, cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input)


def encode_with_hidden_pre(sae: SAE, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(feature activations, pre-activations)`, each `[..., d_sae]`."""
    h = hidden_pre(sae, x)
    return activation(sae, h), h


def encode(sae: SAE, x: jax.Array) -> jax.Array:
    """The feature activations `[..., d_sae]` of activations `x [..., d_in]`."""
    return encode_with_hidden_pre(sae, x)[0]


def _times_W_dec(sae: SAE, acts: jax.Array) -> jax.Array:
    if sae.cfg.architecture in ("topk", "batchtopk") and sae.cfg.rescale_acts_by_decoder_norm:
        acts = acts * (1 / decoder_norms(sae))  # sae-lens's rounding: times the reciprocal
    return acts @ sae.params["W_dec"]


def decode_linear(sae: SAE, acts: jax.Array) -> jax.Array:
    """`acts @ W_dec + b_dec` `[..., d_in]`: the reconstruction before a run-time
    normalisation is undone (sae-lens's `hook_sae_recons`)."""
    return _times_W_dec(sae, acts) + sae.params["b_dec"]


def denormalize(sae: SAE, out: jax.Array, x: jax.Array | None) -> jax.Array:
    """`out` `[..., d_in]` with the run-time normalisation (`constant_norm_rescale`,
    `layer_norm`) of the input `x` undone; `out` as it is for the other SAEs."""
    if sae.cfg.normalize_activations not in ("constant_norm_rescale", "layer_norm"):
        return out
    if x is None:
        raise ValueError(f"decode needs the input x to undo the SAE's "
                         f"{sae.cfg.normalize_activations} normalisation")
    return _norm_out(sae.cfg, x.astype(sae.cfg.dtype), out)


def decode(sae: SAE, acts: jax.Array, x: jax.Array | None = None) -> jax.Array:
    """The reconstruction `[..., d_in]` of feature activations `acts`. `x`, the input they
    came from, is needed only to undo a run-time normalisation (`constant_norm_rescale`,
    `layer_norm`)."""
    return denormalize(sae, decode_linear(sae, acts), x)


def forward(sae: SAE, x: jax.Array) -> jax.Array:
    """The reconstruction of `x`: `decode(encode(x))`."""
    return decode(sae, encode(sae, x), x)


# --- training losses -----------------------------------------------------------------------

class TrainOutput(struct.PyTreeNode):
    """What one training forward pass gives, as sae-lens's `TrainStepOutput`: the total loss,
    its terms by sae-lens's names (`mse_loss`, `l1_loss`, `auxiliary_reconstruction_loss`,
    `l0_loss`, `pre_act_loss`), and the activations."""

    loss: jax.Array
    losses: dict[str, jax.Array]
    sae_out: jax.Array
    feature_acts: jax.Array
    hidden_pre: jax.Array


def training_forward(sae: SAE, x: jax.Array, dead_mask: jax.Array | None = None,
                     coefficient: jax.Array | float = 1.0) -> TrainOutput:
    """sae-lens's `training_forward_pass` on rows `x [N, d_in]`.

    Args:
      dead_mask: `[d_sae]` bool, the features counted dead (topk/batchtopk's auxiliary loss,
        jumprelu's pre-activation loss); None: none are.
      coefficient: the sparsity coefficient this step (the config's, ramped over its warm-up
        steps by the trainer); unused by topk/batchtopk.

    JumpReLU's threshold is used projected onto `>= 0`, as sae-lens projects the parameter
    before each pass (its gradient is the projected value's); a trainer that means to follow
    sae-lens's steps exactly stores the projection too (`project_threshold`) before the step.
    """
    cfg = sae.cfg
    if cfg.architecture in ("topk", "batchtopk") and dead_mask is not None \
            and cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
        raise ValueError(f"the TopK auxiliary loss (which needs dead_mask) does not support "
                         f"normalize_activations={cfg.normalize_activations!r}: it would "
                         f"reconstruct the normalised residual (sae-lens refuses it too)")
    if cfg.architecture == "jumprelu":
        t = sae.params["threshold"]
        # The projected value with the identity's gradient: sae-lens's gradient is taken at
        # the clamped parameter and flows to it whole.
        sae = sae.replace(params={**sae.params, "threshold": t + jax.lax.stop_gradient(
            jnp.maximum(t, 0) - t)})
    acts, h = encode_with_hidden_pre(sae, x)
    sae_out = decode(sae, acts, x)
    sae_in = x.astype(cfg.dtype)
    mse = jnp.square(sae_out - sae_in).sum(-1).mean()
    losses = {"mse_loss": mse}
    norms = decoder_norms(sae)
    if cfg.architecture == "standard":
        weighted = acts * norms
        sparsity = jnp.sum(jnp.abs(weighted) ** cfg.lp_norm, -1) ** (1.0 / cfg.lp_norm)
        losses["l1_loss"] = (coefficient * sparsity).mean()
    elif cfg.architecture in ("topk", "batchtopk"):
        losses["auxiliary_reconstruction_loss"] = topk_aux_loss(sae, sae_in, sae_out, h,
                                                                dead_mask)
    else:
        threshold = sae.params["threshold"].astype(h.dtype)
        if cfg.jumprelu_sparsity_loss_mode in ("step", "quadratic"):
            l0 = step(h, threshold, cfg.jumprelu_bandwidth, cfg.jumprelu_ste_to_input).sum(-1)
            if cfg.jumprelu_sparsity_loss_mode == "quadratic":
                assert cfg.target_l0 is not None  # checked by SAEConfig
                l0 = 2 / cfg.target_l0 * (l0 - cfg.target_l0) ** 2
        else:
            l0 = jnp.tanh(cfg.jumprelu_tanh_scale * acts * norms).sum(-1)
        losses["l0_loss"] = (coefficient * l0).mean()
        if cfg.pre_act_loss_coefficient is not None:
            dead = jnp.zeros(cfg.d_sae, bool) if dead_mask is None else dead_mask
            per_row = (jax.nn.relu(threshold - h) * dead * norms).sum(-1)
            losses["pre_act_loss"] = cfg.pre_act_loss_coefficient * per_row.mean()
    loss = sum(losses.values(), jnp.zeros((), jnp.float32))
    return TrainOutput(loss, losses, sae_out, acts, h)


def project_threshold(sae: SAE) -> SAE:
    """The SAE with JumpReLU's threshold clamped to `>= 0`, as sae-lens sets the parameter
    before each training pass (any other SAE unchanged)."""
    if sae.cfg.architecture != "jumprelu":
        return sae
    return sae.replace(params={**sae.params, "threshold": jnp.maximum(sae.params["threshold"],
                                                                        0)})


def topk_aux_loss(sae: SAE, sae_in: jax.Array, sae_out: jax.Array, h: jax.Array,
                  dead_mask: jax.Array | None) -> jax.Array:
    """The TopK auxiliary loss: the `d_in // 2` largest pre-activations among the dead
    features reconstruct the (gradient-free) residual `sae_in - sae_out`; scaled by
    `min(dead / (d_in // 2), 1)`, 0 when none are dead."""
    if dead_mask is None:
        return jnp.zeros((), jnp.float32)
    k_aux = sae.cfg.d_in // 2
    num_dead = dead_mask.sum()
    # top_k needs a static k: take d_in // 2 (or d_sae) always; the entries beyond the number
    # of dead features are live ones, masked to -inf, and count as 0.
    k_static = min(k_aux, sae.cfg.d_sae)
    masked = jnp.where(dead_mask, h, -jnp.inf)
    values, idx = jax.lax.top_k(masked, k_static)
    values = jnp.where(jnp.isfinite(values), values, 0.0)
    aux_acts = _scatter_last(jnp.zeros_like(h), idx, values)
    residual = jax.lax.stop_gradient(sae_in - sae_out)
    recons = _times_W_dec(sae, aux_acts)
    loss = jnp.square(recons - residual).sum(-1).mean()
    scale = jnp.minimum(num_dead / k_aux, 1.0)
    return jnp.where(num_dead > 0, sae.cfg.aux_loss_coefficient * scale * loss, 0.0)


def update_topk_threshold(sae: SAE, acts: jax.Array) -> SAE:
    """BatchTopK's threshold after a batch whose activations were `acts`: a moving average
    (rate `topk_threshold_lr`) of the smallest positive activation; unchanged when none."""
    positive = acts > 0
    smallest = jnp.min(jnp.where(positive, acts, jnp.inf)).astype(jnp.float32)
    lr = sae.cfg.topk_threshold_lr
    old = sae.state["topk_threshold"]
    new = jnp.where(positive.any(), (1 - lr) * old + lr * smallest, old)
    return sae.replace(state={**sae.state, "topk_threshold": new})


# --- folding -------------------------------------------------------------------------------

def fold_W_dec_norm(sae: SAE) -> SAE:
    """The same SAE with W_dec's rows scaled to norm 1 and the encoder (and JumpReLU's
    threshold) scaled to match: the same reconstructions (sae-lens's `fold_W_dec_norm`)."""
    if sae.cfg.architecture in ("topk", "batchtopk") \
            and not sae.cfg.rescale_acts_by_decoder_norm:
        raise ValueError(f"folding the decoder norms changes which features a "
                         f"{sae.cfg.architecture} SAE keeps unless it was trained with "
                         f"rescale_acts_by_decoder_norm")
    n = clamped_decoder_norms(sae)
    p = dict(sae.params)
    p["W_dec"] = p["W_dec"] / n[:, None]
    p["W_enc"] = p["W_enc"] * n[None, :]
    p["b_enc"] = p["b_enc"] * n
    if "threshold" in p:
        p["threshold"] = p["threshold"] * n
    return sae.replace(params=p)


def fold_activation_norm_scaling_factor(sae: SAE, scaling_factor: float) -> SAE:
    """The SAE trained on activations times `scaling_factor`, rewritten to take the raw ones
    (sae-lens's fold at the end of an `expected_average_only_in` run)."""
    p = dict(sae.params)
    p["W_enc"] = p["W_enc"] * scaling_factor
    p["W_dec"] = p["W_dec"] / scaling_factor
    p["b_dec"] = p["b_dec"] / scaling_factor
    state = dict(sae.state)
    if sae.cfg.architecture == "batchtopk" and sae.cfg.rescale_acts_by_decoder_norm:
        state["topk_threshold"] = state["topk_threshold"] / scaling_factor
    return SAE(p, state, sae.cfg.replace(normalize_activations="none"))


def to_inference(sae: SAE) -> SAE:
    """The SAE as sae-lens saves it for inference: topk/batchtopk trained with
    `rescale_acts_by_decoder_norm` get their decoder norms folded in; batchtopk becomes a
    jumprelu SAE whose threshold is the learned `topk_threshold` for every feature."""
    cfg = sae.cfg
    if cfg.architecture not in ("topk", "batchtopk"):
        return sae
    p = dict(sae.params)
    if cfg.rescale_acts_by_decoder_norm:
        n = clamped_decoder_norms(sae)
        p["b_enc"] = p["b_enc"] * n
        p["W_dec"] = p["W_dec"] / n[:, None]
        p["W_enc"] = p["W_enc"] * n[None, :]
    if cfg.architecture == "topk":
        return sae.replace(params=p)
    p["threshold"] = jnp.full(cfg.d_sae, sae.state["topk_threshold"], p["b_enc"].dtype)
    return SAE(p, {}, cfg.replace(architecture="jumprelu", rescale_acts_by_decoder_norm=False))
