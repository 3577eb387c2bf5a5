"""TopK's training forward pass without its dense `[N, d_sae]` work: the fast twin of
`jaxgpt.sae.model.training_forward` for `architecture="topk"`, held to it by the tests.

A TopK SAE's training step computes the encoder's pre-activations `[N, F]` (a dense matrix
product that nothing avoids), keeps k of each row's F, and from there on touches only k
features per row. Written densely (as sae-lens and `model.training_forward` do), the decoder
product, and the gradients of the decoder and of the encoder, are three more `[N, F]` products
of which all but `k / F` is zeros (at k = 32, F = 6144: 0.5%). Here they are gathers and
scatters over the k kept features (`decode_rows`, and the gradient of `selected_pre`), and the
auxiliary loss reads only the dead features: all of them when they are at most `d_in // 2`
(its top-k then keeps them all), or the top `d_in // 2` by a top-k when more; with none dead
it costs nothing (`lax.cond`).

Shapes: N rows, F d_sae, d d_in, k kept per row.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from jaxgpt.sae.model import SAE, decoder_norms, process_sae_in

# Rows a gather or scatter over the kept features handles at once: its `[rows, k, d]`
# temporaries stay tens of MB at k = 32, d = 768.
ROW_BLOCK = 512


class SparseTrainOutput(struct.PyTreeNode):
    """`model.TrainOutput` with the activations kept sparse: `acts [N, k]` (ReLU'd) of the
    features `idx [N, k]`."""

    loss: jax.Array
    losses: dict[str, jax.Array]
    sae_out: jax.Array
    acts: jax.Array
    idx: jax.Array


def _blocks(n: int) -> int:
    """The row block for `n` rows: `ROW_BLOCK`, or all of them when fewer or not divisible."""
    return ROW_BLOCK if n > ROW_BLOCK and n % ROW_BLOCK == 0 else n


def _combine(w: jax.Array, idx: jax.Array, table: jax.Array) -> jax.Array:
    """`out[n] = sum_j w[n, j] * table[idx[n, j]]`: `[N, k]`, `[N, k]`, `[F, d]` -> `[N, d]`."""
    b = _blocks(w.shape[0])

    def block(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        wb, ib = args
        return (wb[..., None] * table[ib]).sum(1)

    out = lax.map(block, (w.reshape(-1, b, w.shape[1]), idx.reshape(-1, b, idx.shape[1])))
    return out.reshape(w.shape[0], table.shape[1])


def _dots(a: jax.Array, idx: jax.Array, table: jax.Array) -> jax.Array:
    """`out[n, j] = a[n] . table[idx[n, j]]`: `[N, d]`, `[N, k]`, `[F, d]` -> `[N, k]`."""
    b = _blocks(a.shape[0])

    def block(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        ab, ib = args
        return (table[ib] * ab[:, None, :]).sum(-1)

    out = lax.map(block, (a.reshape(-1, b, a.shape[1]), idx.reshape(-1, b, idx.shape[1])))
    return out.reshape(idx.shape)


def _scatter_outer(w: jax.Array, idx: jax.Array, a: jax.Array, rows: int) -> jax.Array:
    """`out[f] = sum over (n, j) with idx[n, j] = f of w[n, j] * a[n]`: `[rows, d]`."""
    b = _blocks(a.shape[0])

    def block(acc: jax.Array, args: tuple[jax.Array, jax.Array, jax.Array]
              ) -> tuple[jax.Array, None]:
        wb, ib, ab = args
        upd = (wb[..., None] * ab[:, None, :]).reshape(-1, a.shape[1])
        return acc.at[ib.reshape(-1)].add(upd), None

    init = jnp.zeros((rows, a.shape[1]), a.dtype)
    k = idx.shape[1]
    out, _ = lax.scan(block, init, (w.reshape(-1, b, k), idx.reshape(-1, b, k),
                                    a.reshape(-1, b, a.shape[1])))
    return out


def _int_zero(x: jax.Array) -> np.ndarray:
    return np.zeros(x.shape, jax.dtypes.float0)


@jax.custom_vjp
def decode_rows(w: jax.Array, idx: jax.Array, W_dec: jax.Array) -> jax.Array:
    """`sum_j w[n, j] * W_dec[idx[n, j]]` `[N, d]`: the decoder on k features per row."""
    return _combine(w, idx, W_dec)


def _decode_fwd(w: jax.Array, idx: jax.Array, W_dec: jax.Array) -> tuple[jax.Array, Any]:
    return _combine(w, idx, W_dec), (w, idx, W_dec)


def _decode_bwd(res: Any, g: jax.Array) -> tuple[jax.Array, np.ndarray, jax.Array]:
    w, idx, W_dec = res
    return (_dots(g, idx, W_dec).astype(w.dtype), _int_zero(idx),
            _scatter_outer(w.astype(g.dtype), idx, g, W_dec.shape[0]).astype(W_dec.dtype))


decode_rows.defvjp(_decode_fwd, _decode_bwd)


@jax.custom_vjp
def selected_pre(x: jax.Array, b_dec_in: jax.Array, W_enc: jax.Array, b_enc: jax.Array,
                 values: jax.Array, idx: jax.Array) -> jax.Array:
    """`values`, the encoder's pre-activations `((x - b_dec_in) @ W_enc + b_enc)[n, idx[n, j]]`
    `[N, k]` as the dense product gave them, with their gradients to `b_dec_in`, `W_enc` and
    `b_enc` through the k features alone. `x` is data: it gets no gradient (a zero), and
    `values` is a constant."""
    return values


def _selected_fwd(x: jax.Array, b_dec_in: jax.Array, W_enc: jax.Array, b_enc: jax.Array,
                  values: jax.Array, idx: jax.Array) -> tuple[jax.Array, Any]:
    return values, (x, b_dec_in, W_enc, idx)


def _selected_bwd(res: Any, g: jax.Array) -> tuple[Any, ...]:
    x, b_dec_in, W_enc, idx = res
    # Summed over the rows, a feature's gradient is all b_enc and b_dec need: no [N, d] work.
    per_feature = jnp.zeros(W_enc.shape[1], jnp.float32).at[idx.reshape(-1)].add(
        g.reshape(-1).astype(jnp.float32))
    d_b_dec = -(W_enc.astype(jnp.float32) @ per_feature)
    xp = (x - b_dec_in).astype(W_enc.dtype)
    d_W = _scatter_outer(g.astype(xp.dtype), idx, xp, W_enc.shape[1]).T
    return (jnp.zeros_like(x), d_b_dec.astype(b_dec_in.dtype), d_W.astype(W_enc.dtype),
            per_feature.astype(W_enc.dtype), jnp.zeros_like(g), _int_zero(idx))


selected_pre.defvjp(_selected_fwd, _selected_bwd)


def topk_training_forward(sae: SAE, x: jax.Array,
                          dead_mask: jax.Array | None = None) -> SparseTrainOutput:
    """`model.training_forward` of a topk SAE on rows `x [N, d]`, with the kept features'
    activations sparse: the same loss, `mse_loss` and `auxiliary_reconstruction_loss`, and
    gradients, up to float rounding."""
    cfg = sae.cfg
    if cfg.architecture != "topk":
        raise ValueError(f"topk_training_forward trains topk SAEs, not {cfg.architecture}")
    if cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
        raise ValueError(f"the sparse TopK path does not take {cfg.normalize_activations}")
    p = sae.params
    sae_in = x.astype(cfg.dtype)
    b_dec_in = p["b_dec"] * cfg.apply_b_dec_to_input
    xp = process_sae_in(sae, x)  # x - b_dec_in, in the SAE's dtype
    pre = lax.stop_gradient(xp @ p["W_enc"] + p["b_enc"])  # [N, F]: only k per row get grads
    rescale = cfg.rescale_acts_by_decoder_norm
    norms = decoder_norms(sae)
    h = pre * lax.stop_gradient(norms) if rescale else pre
    _, idx = lax.top_k(h, int(cfg.k))
    values = selected_pre(sae_in, b_dec_in, p["W_enc"], p["b_enc"],
                          jnp.take_along_axis(pre, idx, -1), idx)
    if rescale:
        values = values * norms[idx]
    acts = jax.nn.relu(values)
    w = acts / norms[idx] if rescale else acts
    sae_out = decode_rows(w, idx, p["W_dec"]) + p["b_dec"]
    mse = jnp.square(sae_out - sae_in).sum(-1).mean()
    losses = {"mse_loss": mse}
    aux = jnp.zeros((), jnp.float32)
    if dead_mask is not None:
        residual = lax.stop_gradient(sae_in - sae_out)
        aux = _aux_loss(sae, sae_in, xp, pre, h, norms, residual, dead_mask)
    losses["auxiliary_reconstruction_loss"] = aux
    return SparseTrainOutput(mse + aux, losses, sae_out, acts, idx)


def _aux_loss(sae: SAE, sae_in: jax.Array, xp: jax.Array, pre: jax.Array, h: jax.Array,
              norms: jax.Array, residual: jax.Array, dead: jax.Array) -> jax.Array:
    """`model.topk_aux_loss`, reading only the dead features: all of them when at most
    `d_in // 2` (the top-k then keeps every one), else a top-k of `d_in // 2` among them;
    0 without a lax.cond branch's work when none is dead."""
    cfg = sae.cfg
    p = sae.params
    k_aux = min(cfg.d_in // 2, cfg.d_sae)
    num_dead = dead.sum()
    rescale = cfg.rescale_acts_by_decoder_norm

    def recon_loss(vals: jax.Array, idx: jax.Array, valid: jax.Array) -> jax.Array:
        """The loss of reconstructing `residual` from raw pre-activations `vals [N, k_aux]` of
        features `idx` (entries where not `valid` left out)."""
        vals = jnp.where(valid, vals, 0.0)
        w = vals / norms[idx] if rescale else vals
        recons = decode_rows(w, idx, p["W_dec"])
        return jnp.square(recons - residual).sum(-1).mean()

    def few(_: Any) -> jax.Array:
        # Every dead feature: its index among the first k_aux dead ones, padded with 0.
        (cols,) = jnp.nonzero(dead, size=k_aux, fill_value=0)
        valid = jnp.arange(k_aux) < num_dead
        pre = xp @ p["W_enc"][:, cols] + p["b_enc"][cols]  # [N, k_aux], differentiable
        vals = pre * norms[cols] if rescale else pre
        idx = jnp.broadcast_to(cols, vals.shape)
        return recon_loss(vals, idx, valid[None, :])

    def many(_: Any) -> jax.Array:
        _, idx = lax.top_k(jnp.where(dead, h, -jnp.inf), k_aux)
        b_dec_in = p["b_dec"] * cfg.apply_b_dec_to_input
        vals = selected_pre(sae_in, b_dec_in, p["W_enc"], p["b_enc"],
                            jnp.take_along_axis(pre, idx, -1), idx)
        vals = vals * norms[idx] if rescale else vals
        return recon_loss(vals, idx, jnp.ones((), bool))

    def none(_: Any) -> jax.Array:
        return jnp.zeros((), jnp.float32)

    branch = jnp.where(num_dead == 0, 0, jnp.where(num_dead <= k_aux, 1, 2))
    loss = lax.switch(branch, (none, few, many), None)
    scale = jnp.minimum(num_dead / (cfg.d_in // 2), 1.0)
    return cfg.aux_loss_coefficient * scale * loss
