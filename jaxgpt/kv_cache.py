"""What cached decoding needs besides the model: the cache, the attention mask, and
decode-time weight layouts.

`GPTModel` (model.py) is the only forward pass; it takes a `KVCache` and an `AttentionMask` is
what it hands each attention layer. This module keeps the data around it:

- `KVCache`: per layer, keys and values as `[B * H, S, Dh]`, plus each slot's position. A new
  token's keys/values are written in place, and attention reads the cache as it is, as a
  batched matrix-vector product over the B * H (row, head) pairs. The batch and head axes are
  merged because XLA:CPU otherwise reshapes the updated cache for the dot, which made it copy
  every layer's cache twice per step (measured: 14 of 42 ms per step at B=1 with 264 slots).
- `Layout` and `prepare`: a parameter transform, not a second model. `prepare` fuses
  `W_query`/`W_key`/`W_value` into one `W_qkv` matrix, casts the matrices to the compute dtype
  and, on CPU, stores some of them as `[out, in]`; `GPTModel(cfg, layout=...)` reads params in
  that form. Built once per params and batch-size class by `generation.Generator`.

Shapes: B batch, T new tokens, S cache slots, D emb_dim, H heads, Dh = D // H.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig


class AttentionMask(NamedTuple):
    """Which keys each query may attend to, and where both stand in the sequence.

    Leading axes may be 1 (broadcast). `q_pos`/`k_pos` are the positions `pos_emb` sees; a
    variant of attention (ALiBi, relative positions) reads them.
    """

    allowed: jax.Array  # bool [B, T, S]
    q_pos: jax.Array  # int [B, T]
    k_pos: jax.Array  # int [B, S]; -1 for a slot that holds no token (empty, or padding)

    @classmethod
    def causal(cls, t: int) -> AttentionMask:
        """The seeds' mask for a window of `t` tokens at positions 0..t-1."""
        pos = jnp.arange(t)[None, :]  # [1, T]
        return cls(jnp.tril(jnp.ones((t, t), dtype=bool))[None], pos, pos)


class KVCache(NamedTuple):
    """Per layer, keys and values `[B * H, S, Dh]`; `pos` `[B, S]` each slot's position
    (-1: nothing written there, or padding)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    pos: jax.Array


def init_cache(cfg: GPTConfig, batch: int, slots: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache of `slots` positions per row (every slot invalid)."""
    shape = (batch * cfg.n_heads, slots, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    return KVCache(zeros, zeros, jnp.full((batch, slots), -1, jnp.int32))


class Layout(NamedTuple):
    """How `GPTModel` holds its matrices (a static module field).

    `fused_qkv`: one `W_qkv` `[D, 3D]` instead of `W_query`/`W_key`/`W_value` (one matmul,
    one kernel). The others: store that matrix as rows, `[out, in]`, instead of `[in, out]`.
    Decoding multiplies one or a few rows by each matrix, and XLA:CPU runs that at different
    speeds from the two layouts. Measured on a 2-core CPU (124M, fp32, in a decoding loop): at
    one row only the `[4D, D]` projection is faster as rows (about 0.45 against 0.7 ms) and
    the head is faster as `[D, V]` (6.3 against 7.7 ms); at 8 rows every matrix is as fast or
    faster as rows, the head most (12 against 23 ms). XLA:GPU, given `[in, out]` matrices at
    one row, re-lays two of them out inside every step (the H100 compile of 124M bf16 wrote 24
    weight-sized arrays a step: 1.62x the weight bytes read); as rows it reads each once
    (1.05x), and at 32 rows it does the same either way. XLA:TPU re-lays them out at one row
    whichever layout it gets, so there only the fusion applies.
    """

    fused_qkv: bool = False
    qkv: bool = False
    out: bool = False
    fc: bool = False
    proj: bool = False
    head: bool = False  # with tied embeddings the head is tok_emb, rows already: ignored
    one_pass_norm: bool = False  # a LayerNorm of one row: both statistics in one pass

    @classmethod
    def for_batch(cls, batch: int, backend: str | None = None) -> Layout:
        """The faster decoding layout for `batch` rows on `backend` (default: JAX's).

        On GPU a LayerNorm of a single row (a decoding step at B=1) also takes its two
        statistics in one pass (`model.layer_norm`). XLA:GPU computes a LayerNorm of two or
        more rows in one kernel, but one of a single row (its reductions become reductions to
        a scalar) in three: two reductions, one after the other, then the normalisation. In
        one pass both reductions share a kernel: 13 kernels per block per decoding step
        instead of 15 (H100 compile, 124M, B=1). Of more rows, one pass would break the
        one-kernel form (16 instead of 13 per block at B=8), so it applies to one row only.
        On TPU it added 19 kernels per block at B=1; the CPU keeps the seeds' arithmetic."""
        backend = jax.default_backend() if backend is None else backend
        if backend in ("gpu", "cuda", "rocm"):
            return cls(True, True, True, True, True, True, one_pass_norm=True)
        if backend == "cpu" and batch > 1:
            return cls(True, True, True, True, True, True)
        if backend == "cpu":
            return cls(fused_qkv=True, proj=True)
        return cls(fused_qkv=True)


def prepare(params: Any, cfg: GPTConfig, dtype: Any = jnp.float32,
            layout: Layout | None = None) -> Any:
    """Params for `GPTModel(cfg, dtype=dtype, layout=layout)` from jaxgpt params.

    Matrices, biases and embeddings are cast to `dtype` (LayerNorm parameters stay float32),
    Q/K/V are fused when `layout.fused_qkv`, and the matrices `layout` names are transposed to
    `[out, in]`. Arrays it need not change are passed on as they are, so run it eagerly (under
    jit each would be copied). Parameters of a variant's own (not the seeds' names) are left
    as they are. `layout` defaults to the seeds' form.
    """
    layout = Layout() if layout is None else layout
    dtype = jnp.dtype(dtype)

    def cast(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        return x if x.dtype == dtype else x.astype(dtype)

    def linear(p: dict, rows: bool) -> dict:
        out = {k: cast(v) for k, v in p.items()}
        if rows:
            out["kernel"] = out["kernel"].T
        return out

    def block(p: dict) -> dict:
        att, ff = dict(p["att"]), dict(p["ff"])
        names = ("W_query", "W_key", "W_value")
        if layout.fused_qkv:
            parts = [att.pop(n) for n in names]
            fused = {"kernel": jnp.concatenate([cast(m["kernel"]) for m in parts], axis=1)}
            if "bias" in parts[0]:
                fused["bias"] = jnp.concatenate([cast(m["bias"]) for m in parts])
            att["W_qkv"] = linear(fused, layout.qkv)
        else:
            att.update({n: linear(att[n], layout.qkv) for n in names if n in att})
        for group, name, rows in ((att, "out_proj", layout.out), (ff, "layers_0", layout.fc),
                                  (ff, "layers_2", layout.proj)):
            if name in group:
                group[name] = linear(group[name], rows)
        return {**p, "att": att, "ff": ff}

    out = dict(params)
    for i in range(cfg.n_layers):
        out[f"trf_blocks_{i}"] = block(params[f"trf_blocks_{i}"])
    for name in ("tok_emb", "pos_emb"):
        out[name] = {"embedding": cast(params[name]["embedding"])}
    if not cfg.tie_embeddings:
        out["out_head"] = linear(params["out_head"], layout.head)
    return out
