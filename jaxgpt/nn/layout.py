"""Decode-time weight layouts: a parameter transform, not a second model.

`prepare` fuses `W_query`/`W_key`/`W_value` into one `W_qkv` matrix, casts the matrices to
the compute dtype and stores the matrices a `Layout` names as `[out, in]`; `GPTModel(cfg,
layout=...)` reads params in that form. `inference.Generator` builds them once per params and
batch-size class.

Shapes: D emb_dim, V vocab_size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig


class Layout(NamedTuple):
    """How `GPTModel` holds its matrices (a static module field).

    `fused_qkv`: one `W_qkv` `[D, 3D]` instead of `W_query`/`W_key`/`W_value` (one matmul,
    one kernel). The others: store that matrix as rows, `[out, in]`, instead of `[in, out]`.
    Decoding multiplies one or a few rows by each matrix, and the compilers treat the two
    layouts differently: XLA:CPU runs them at different speeds, XLA:GPU re-lays `[in, out]`
    matrices out inside every step at one row, XLA:TPU re-lays them out whichever it gets
    (docs/performance.md has the figures).
    """

    fused_qkv: bool = False
    qkv: bool = False
    out: bool = False
    fc: bool = False
    proj: bool = False
    head: bool = False  # with tied embeddings the head is tok_emb, rows already: ignored
    one_pass_norm: bool = False  # a LayerNorm of one row: both statistics in one pass
    # int8 matrices (`nn.quant`, params from `quantize_params`): None, "int8" or "w8a8".
    quant: str | None = None
    # w8a8 multiplies a single row as two (`quant.matmul`): set by `with_quant`, on the CPU.
    pad_one_row: bool = False

    def with_quant(self, quant: str | None, backend: str | None = None) -> Layout:
        """This layout reading `quant` params on `backend` (default: JAX's): the one place
        that sets `quant` and `pad_one_row` (XLA:CPU multiplies one int8 row through an int32
        copy of the whole weight, two rows as int8)."""
        backend = jax.default_backend() if backend is None else backend
        return self._replace(quant=quant, pad_one_row=quant == "w8a8" and backend == "cpu")

    def matrix_form(self) -> Layout:
        """The fields that shape the params (`prepare`'s output): those that only change how
        the model computes (`one_pass_norm`, `pad_one_row`) reset."""
        return self._replace(one_pass_norm=False, pad_one_row=False)

    @classmethod
    def for_batch(cls, batch: int, backend: str | None = None,
                  quant: str | None = None) -> Layout:
        """The decoding layout for `batch` rows on `backend` (default: JAX's): a fixed rule
        per backend, from the figures in docs/performance.md ("Decoding choices").

        On GPU every matrix is held as rows, and a LayerNorm of a single row (a decoding step
        at B=1) takes its two statistics in one pass (`layers.layer_norm`): XLA:GPU runs a
        single row's two reductions as kernels one after the other, where two or more rows
        take one kernel. Of more rows, or on TPU, one pass adds kernels. On TPU the book's
        `[in, out]` (XLA:TPU re-lays a row's matrices out whichever form it gets). On the CPU
        every matrix as rows, at every batch: measured at 1 and 8 rows, 16-30% faster a step
        than `[in, out]` and within 1-4% of the best per-matrix choice. `quant`: see
        `with_quant`.
        """
        backend = jax.default_backend() if backend is None else backend
        if backend in ("gpu", "cuda", "rocm"):
            layout = cls(True, True, True, True, True, True, one_pass_norm=True)
        elif backend == "cpu":  # all rows: docs/performance.md, "CPU matrix layouts"
            layout = cls(True, True, True, True, True, True)
        else:
            layout = cls(fused_qkv=True)
        return layout.with_quant(quant, backend)


def prepare(params: Any, cfg: GPTConfig, dtype: Any = jnp.float32,
            layout: Layout | None = None) -> Any:
    """Params for `GPTModel(cfg, dtype=dtype, layout=layout)` from jaxgpt params.

    Matrices, biases and embeddings are cast to `dtype` (LayerNorm parameters stay float32),
    Q/K/V are fused when `layout.fused_qkv`, and the matrices `layout` names are transposed to
    `[out, in]`. Quantized params (`nn.quant.quantize_params`) keep their int8 matrices and
    float32 scales as they are (fusing concatenates the scales too: per output channel, the
    scales of a concatenation of outputs are the concatenated scales). Arrays it need not
    change are passed on as they are, so run it eagerly (under jit each would be copied).
    Parameters of a variant's own (not the book's names) are left as they are. `layout`
    defaults to the book's form.
    """
    layout = Layout() if layout is None else layout
    dtype = jnp.dtype(dtype)

    def cast(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        return x if x.dtype == dtype or x.dtype == jnp.int8 else x.astype(dtype)

    def cast_all(p: dict) -> dict:  # a quantized matrix's scales stay float32
        return {k: v if k.endswith("_scale") else cast(v) for k, v in p.items()}

    def linear(p: dict, rows: bool) -> dict:
        out = cast_all(p)
        if rows:
            out["kernel"] = out["kernel"].T
        return out

    def block(p: dict) -> dict:
        att, ff = dict(p["att"]), dict(p["ff"])
        names = ("W_query", "W_key", "W_value")
        if layout.fused_qkv:
            parts = [att.pop(n) for n in names]
            fused = {"kernel": jnp.concatenate([m["kernel"] for m in parts], axis=1)}
            for name in ("kernel_scale", "bias"):
                if name in parts[0]:
                    fused[name] = jnp.concatenate([m[name] for m in parts])
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
        out[name] = cast_all(params[name])
    if not cfg.tie_embeddings:
        out["out_head"] = linear(params["out_head"], layout.head)
    return out
