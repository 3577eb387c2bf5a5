"""The layers of the book's GPT: LayerNorm, GELU, Linear and the feed-forward block.

Parameter names mirror the book's PyTorch modules (`scale`/`shift`, `nn.Sequential`'s
`layers_0`/`layers_2`); Flax kernels are `[in, out]`.

Shapes: B batch, T tokens, D emb_dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxgpt.config import GPTConfig
from jaxgpt.nn.hooks import HookTable, hook_point
from jaxgpt.nn.layout import Layout
from jaxgpt.nn.quant import matmul as quantized_matmul

Dtype = Any
# GPT-2's initialisation (normal, std 0.02; zero biases). The book keeps PyTorch's defaults;
# parity tests copy weights across, so the choice only matters when training from scratch.
INIT = nn.initializers.normal(stddev=0.02)


def layer_norm(x: jax.Array, scale: jax.Array, shift: jax.Array, eps: float = 1e-5,
               dtype: Dtype = jnp.float32, one_pass: bool = False,
               hook: Callable[[str, jax.Array], jax.Array] | None = None) -> jax.Array:
    """The book's LayerNorm as a function: stats in fp32, biased variance, result in `dtype`.

    The book takes the mean, then the variance of `x - mean`: two reductions, one after the
    other. `one_pass` takes both from the same pass over `x` instead, as `mean(y)` and
    `mean(y**2) - mean(y)**2` of `y = x - x[..., :1]`, so a compiler can compute them in one
    kernel. Shifting by a value of the row keeps the subtraction from cancelling when the
    mean is large against the spread; the variance then differs from the book's by a few
    fp32 roundings (relative ~1e-7 times 1 + (x0 - mean)**2 / var).

    `hook(name, value)`, if given, sees (and may replace) `hook_scale`, the divisor
    `sqrt(var + eps)` `[..., 1]`, and `hook_normalized`, `(x - mean) / hook_scale` `[..., D]`
    before `scale` and `shift` (fp32 both).
    """
    x32 = x.astype(jnp.float32)
    if one_pass:
        y = x32 - lax.stop_gradient(x32[..., :1])
        mean_y = y.mean(axis=-1, keepdims=True)
        var = jnp.maximum(jnp.square(y).mean(axis=-1, keepdims=True) - jnp.square(mean_y), 0.0)
        centred = y - mean_y
    else:
        centred = x32 - x32.mean(axis=-1, keepdims=True)
        var = jnp.square(centred).mean(axis=-1, keepdims=True)
    std = jnp.sqrt(var + eps)
    if hook is not None:
        std = hook("hook_scale", std)
    norm_x = centred / std
    if hook is not None:
        norm_x = hook("hook_normalized", norm_x)
    return (scale * norm_x + shift).astype(dtype)


def gelu(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation, written out as in the book."""
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + jnp.tanh(c * (x + 0.044715 * x**3)))


class LayerNorm(nn.Module):
    """`scale * (x - mean) / sqrt(var + eps) + shift` with the biased variance; stats in fp32."""

    emb_dim: int
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    # Statistics of a single row in one pass (`layer_norm`'s `one_pass`; GPU decoding at B=1).
    one_pass: bool = False
    hooks: HookTable = HookTable()  # `hook_scale`, `hook_normalized` (see `layer_norm`)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (self.emb_dim,), jnp.float32)
        shift = self.param("shift", nn.initializers.zeros, (self.emb_dim,), jnp.float32)
        one_pass = self.one_pass and math.prod(x.shape[:-1]) == 1
        hook = functools.partial(hook_point, self, self.hooks) if self.hooks else None
        return layer_norm(x, scale, shift, self.eps, self.dtype, one_pass, hook)


def make_norm(norm_cls: type, emb_dim: int, dtype: Dtype, layout: Layout,
              name: str | None = None, hooks: HookTable | None = None) -> nn.Module:
    """`norm_cls(emb_dim, dtype=dtype)`; a `LayerNorm` also gets `layout.one_pass_norm` and
    the hook table (a variant's norm is built with the defaults' fields only)."""
    extra: dict[str, Any] = {}
    if issubclass(norm_cls, LayerNorm):
        extra = {"one_pass": True} if layout.one_pass_norm else {}
        extra.update({"hooks": hooks} if hooks is not None and hooks else {})
    return norm_cls(emb_dim, dtype=dtype, name=name, **extra)


class GELU(nn.Module):
    """GELU, tanh approximation, written out as in the book."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(x)


class Linear(nn.Module):
    """The book's `nn.Linear`: `x @ kernel + bias`, with nn.Dense's parameter names.

    `kernel` is `[in, out]` as in Flax; with `rows=True` it is held as `[out, in]`, a
    decode-time layout that XLA:CPU multiplies faster for a few rows (see `nn.layout.Layout`;
    `nn.layout.prepare` builds such params). Inputs and weights are cast to `dtype`.
    `columns` (int `[C]`), if given, computes only those output features: `[..., C]`.
    With `quant` ("int8" or "w8a8"), `kernel` is int8 with a float32 `kernel_scale` `[out]`
    (`nn.quant.quantize_params`), multiplied by `nn.quant.matmul`; the output is float.
    """

    features: int
    use_bias: bool = True
    rows: bool = False
    dtype: Dtype = jnp.float32
    quant: str | None = None
    pad_one_row: bool = False  # see `nn.quant.matmul`

    @nn.compact
    def __call__(self, x: jax.Array, columns: jax.Array | None = None) -> jax.Array:
        d_in = x.shape[-1]
        shape = (self.features, d_in) if self.rows else (d_in, self.features)
        if self.quant is not None:
            q = self.param("kernel", nn.initializers.zeros, shape, jnp.int8)
            scale = self.param("kernel_scale", nn.initializers.ones, (self.features,),
                               jnp.float32)
            y = quantized_matmul(x, q, scale, self.quant, rows=self.rows,
                                 pad_one_row=self.pad_one_row, dtype=self.dtype,
                                 columns=columns)
        else:
            kernel = self.param("kernel", INIT, shape, jnp.float32)
            if columns is not None:
                kernel = kernel[columns] if self.rows else kernel[:, columns]
            contract = ((x.ndim - 1,), (1 if self.rows else 0,))
            y = lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                (contract, ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + (bias if columns is None else bias[columns]).astype(self.dtype)
        return y


def make_linear(features: int, use_bias: bool, rows: bool, dtype: Dtype, layout: Layout,
                name: str | None = None) -> Linear:
    """A `Linear` of the model's matrices, reading them as `layout` holds them (quantized or
    not): the one place the model's parts build one."""
    return Linear(features, use_bias, rows, dtype, quant=layout.quant,
                  pad_one_row=layout.pad_one_row, name=name)


class FeedForward(nn.Module):
    """Linear(D, 4D) -> GELU -> Linear(4D, D); names `layers_0`/`layers_2` as in nn.Sequential.

    A variant (another activation, a gated unit) subclasses this and overrides `__call__`
    (calling `self.hook` on its own activations, if it wants them seen). Hook points
    `hook_pre` and `hook_post`, `[B, T, 4D]`: before and after GELU.
    """

    cfg: GPTConfig
    dtype: Dtype = jnp.float32
    layout: Layout = Layout()
    hooks: HookTable = HookTable()

    def hook(self, name: str, x: jax.Array, lead: tuple[int, ...]) -> jax.Array:
        """`x` `[B*T, F]` through the hook point `name`, which sees it as `[*lead, F]`."""
        if not self.hooks:
            return x
        return hook_point(self, self.hooks, name, x.reshape(*lead, -1)).reshape(x.shape)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.cfg.emb_dim
        lead = x.shape[:-1]
        # Matmuls on [B*T, D] rather than [B, T, D]: XLA:CPU then needs no transposing copies
        # in the backward pass.
        x = make_linear(4 * d, True, self.layout.fc, self.dtype, self.layout, "layers_0")(
            x.reshape(-1, d))
        x = self.hook("hook_pre", x, lead)
        x = self.hook("hook_post", GELU()(x), lead)  # [B*T, 4D]
        x = make_linear(d, True, self.layout.proj, self.dtype, self.layout, "layers_2")(x)
        return x.reshape(*lead, d)  # [B, T, D]

