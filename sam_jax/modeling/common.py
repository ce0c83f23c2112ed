"""Shared layers (official `modeling/common.py`) and the layer factories every module uses.

Every parameter is created float32 and annotated with logical axis names
(`nn.with_logical_partitioning`), so training can shard it by rules in its
config; inference simply unboxes. Computation runs in the `dtype` the caller
passes (the config's compute dtype); layer norms and softmaxes run in float32.

Logical axis names used across the model:
  "embed"  the width of a residual stream (ViT width or prompt width)
  "mlp"    the hidden width of an MLP
  "qkv"    the width of attention projections
  "conv_in", "conv_out"  conv channels; "norm" layer-norm vectors; None: never sharded
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.lecun_normal()


def accum_dtype(dtype: Any) -> Any:
    """The dtype for norms, softmaxes and accumulations: float32, or wider if computing wider."""
    return jnp.promote_types(dtype, jnp.float32)


def dense(
    features: int,
    axes: Axes,
    *,
    dtype: Any,
    use_bias: bool = True,
    kernel_init: Any = default_kernel_init,
    name: str | None = None,
) -> nn.Dense:
    """A `torch.nn.Linear` counterpart with kernel (in, out) and logical axes `axes` (bias: zeros)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
        name=name,
    )


class PatchConv(nn.Module):
    """A convolution whose kernel equals its stride (non-overlapping patches, no padding),
    computed as one matrix product: (B, H, W, C) -> (B, H/k, W/k, features).

    Same parameters as `nn.Conv` (kernel (k, k, C, features) HWIO, bias (features,)) and the
    same result; XLA:CPU runs the convolution's weight gradient for such tiny kernels as a
    huge-window convolution, many times slower than this product.
    """

    features: int
    kernel_size: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    axes: Axes = (None, None, "conv_in", "conv_out")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel_size, x.shape[-1]
        *batch, h, w, _ = x.shape
        if h % k or w % k:
            raise ValueError(f"PatchConv: spatial size {h}x{w} is not a multiple of the kernel size {k}")
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(default_kernel_init, self.axes),
            (k, k, c, self.features),
            jnp.float32,
        )
        x = x.astype(self.dtype).reshape(*batch, h // k, k, w // k, k, c)
        y = jnp.einsum("...hpwqc,pqco->...hwo", x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[-1],)),
                (self.features,),
                jnp.float32,
            )
            y = y + bias.astype(self.dtype)
        return y


class ConvTranspose2x2(nn.Module):
    """`torch.nn.ConvTranspose2d(in, features, kernel_size=2, stride=2)`, in the sub-pixel
    layout: (..., in) -> (..., 2, 2, features), for any leading shape.

    Kernel (2, 2, features, in): the official (in, out, kH, kW) weight permuted by (2, 3, 1, 0).
    Each input pixel writes its own 2x2 output block (no overlap), so this is one matrix
    product: y[..., a, b, o] = sum_c x[..., c] kernel[a, b, o, c] + bias[o] is the official
    output pixel (2i + a, 2j + b) of input pixel (i, j). The blocks are not interleaved into
    a (2H, 2W) grid here: the decoder interleaves only its final masks, once.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(default_kernel_init, (None, None, "conv_out", "conv_in")),
            (2, 2, self.features, c),
            jnp.float32,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
            (self.features,),
            jnp.float32,
        )
        return jnp.einsum("...c,aboc->...abo", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(
            self.dtype
        )


def conv(
    features: int,
    kernel_size: int,
    *,
    dtype: Any,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = True,
    axes: Axes = (None, None, "conv_in", "conv_out"),
    name: str | None = None,
) -> nn.Module:
    """A `torch.nn.Conv2d` counterpart on NHWC inputs (kernel HWIO). Patch-style convolutions
    (kernel = stride, no padding: patch embedding, the mask downscaling, 1x1) are `PatchConv`."""
    if stride == kernel_size and padding == 0:
        return PatchConv(features, kernel_size, use_bias=use_bias, dtype=dtype, axes=axes, name=name)
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(default_kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
        name=name,
    )


def conv_transpose_2x2(features: int, *, dtype: Any, name: str | None = None) -> ConvTranspose2x2:
    """`torch.nn.ConvTranspose2d(in, features, kernel_size=2, stride=2)`, sub-pixel layout (see `ConvTranspose2x2`)."""
    return ConvTranspose2x2(features, dtype=dtype, name=name)


def embedding(num: int, features: int, name: str | None = None) -> nn.Embed:
    """A `torch.nn.Embedding` counterpart (table (num, features))."""
    return nn.Embed(
        num,
        features,
        param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
        name=name,
    )


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32, cast back to the input dtype.

    Serves both `torch.nn.LayerNorm` (eps 1e-5 in the two-way transformer, 1e-6
    in the ViT) and the official `LayerNorm2d` (eps 1e-6), which on channels-last
    tensors is the same operation. The variance is the two-pass
    E[(x - mean)^2], as torch computes it (Flax's fast variance is not).
    """

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (dim,), jnp.float32
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (dim,), jnp.float32
        )
        xf = x.astype(accum_dtype(x.dtype))
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, `torch.nn.GELU()`."""
    return nn.gelu(x, approximate=False)


class MLPBlock(nn.Module):
    """Official `MLPBlock`: lin1 -> act -> lin2 (GELU in the ViT, ReLU in the two-way transformer)."""

    mlp_dim: int
    act: str = "gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., D) -> (..., D)."""
        h = dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="lin1")(x)
        h = gelu(h) if self.act == "gelu" else nn.relu(h)
        return dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="lin2")(h)


class MLP(nn.Module):
    """The mask decoder's `MLP`: `len(features)` linear layers with ReLU between them."""

    features: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in) -> (..., features[-1])."""
        n = len(self.features)
        for i, f in enumerate(self.features):
            axes = ("embed" if i == 0 else None, "mlp" if i < n - 1 else None)
            x = dense(f, axes, dtype=self.dtype, name=f"layers_{i}")(x)
            if i < n - 1:
                x = nn.relu(x)
        return x
