"""TinyViT, MobileSAM's image encoder (official `mobile_sam/modeling/tiny_vit_sam.py`), channels-last.

images (B, S, S, 3) normalized and padded -> embeddings (B, S/16, S/16, C), C = prompt_embed_dim
(256). For vit_t (TinyViT-5M, S = 1024):

  patch_embed  two 3x3 stride-2 convolutions (GELU between)           (B, 256, 256, 64)
  layers_0     2 MBConv blocks, then a patch merging (stride 2)        (B, 128, 128, 128)
  layers_1     2 TinyViT blocks (window 7), patch merging (stride 2)   (B, 64, 64, 160)
  layers_2     6 TinyViT blocks (window 14), patch merging (stride 1)  (B, 64, 64, 320)
  layers_3     2 TinyViT blocks (window 7)                             (B, 64, 64, 320)
  neck         1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d            (B, 64, 64, 256)

Every convolution is a `Conv2d_BN`: a bias-free convolution and an inference-mode BatchNorm
(running statistics, eps 1e-5). The statistics are params here (`BatchNorm2d`), behind
`stop_gradient`: training keeps them as loaded, as an encoder fine-tuned with frozen batch
norms. A TinyViT block attends within square windows: the grid is zero-padded bottom/right
to a multiple of the window *before* the attention's LayerNorm (padded tokens are keys, not
masked), and each head adds a learned bias per (|dy|, |dx|) offset. LayerNorms inside the
blocks use eps 1e-5, the neck's 1e-6; every GELU is exact.

Light HQ-SAM (`interm=True`) also takes stage 1's output, `layers_1` after its patch merging
((B, 64, 64, 160) for vit_tiny_hq, as `segment_anything_hq`'s TinyViT returns it in
`interm_embeddings`), as the early features its decoder fuses (`ImageEmbeddings.interm`).

The ImageNet classifier of TinyViT's pretraining (`norm_head`, `head`) is in MobileSAM's
checkpoints but never used; its params are created at init so checkpoints round-trip.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sam_jax.config import TinyViTConfig
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.modeling.common import LayerNorm, accum_dtype, conv, default_kernel_init, dense, gelu
from sam_jax.modeling.image_encoder import DropPathBlock, window_partition, window_unpartition

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, in the attention and MLP of a TinyViT block
NECK_EPS = 1e-6  # LayerNorm2d


class BatchNorm2d(nn.Module):
    """`torch.nn.BatchNorm2d` in eval mode on (..., C): (x - mean) / sqrt(var + eps) * scale + bias,
    as the per-channel affine PyTorch computes, in float32. `mean` and `var` (the running
    statistics) get no gradient."""

    scale_init: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]

        def vector(name: str, value: float) -> jax.Array:
            init = nn.with_logical_partitioning(nn.initializers.constant(value), ("norm",))
            return self.param(name, init, (c,), jnp.float32)

        scale, bias = vector("scale", self.scale_init), vector("bias", 0.0)
        mean, var = jax.lax.stop_gradient(vector("mean", 0.0)), jax.lax.stop_gradient(vector("var", 1.0))
        alpha = scale * jax.lax.rsqrt(var + BN_EPS)
        beta = bias - mean * alpha
        acc = accum_dtype(x.dtype)
        return (x.astype(acc) * alpha + beta).astype(x.dtype)


class DepthwiseConv(nn.Module):
    """`torch.nn.Conv2d(C, C, k, stride, padding, groups=C, bias=False)` on (B, H, W, C): kernel
    (k, k, 1, C) HWIO, as `nn.Conv` with `feature_group_count=C` holds it. Computed as the sum of
    the k * k strided shifts of the zero-padded input, each times its per-channel weights: one
    fused elementwise loop, where XLA:CPU's grouped convolution is ~10x slower."""

    kernel_size: int
    stride: int = 1
    padding: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, p = self.kernel_size, self.stride, self.padding
        b, h, w, c = x.shape
        init = nn.with_logical_partitioning(default_kernel_init, (None, None, None, "conv_out"))
        kernel = self.param("kernel", init, (k, k, 1, c), jnp.float32).astype(self.dtype)
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (p, p), (p, p), (0, 0)))
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        out = None
        for i in range(k):
            for j in range(k):
                tap = x[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s, :] * kernel[i, j, 0]
                out = tap if out is None else out + tap
        return out


class Conv2dBN(nn.Module):
    """Official `Conv2d_BN`: a bias-free k x k convolution `c` (groups 1 or depthwise) and a
    BatchNorm `bn`: (B, H, W, C) -> (B, H', W', features)."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    depthwise: bool = False
    bn_weight_init: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.depthwise:
            c = DepthwiseConv(self.kernel_size, self.stride, self.padding, dtype=self.dtype, name="c")
        else:
            c = conv(
                self.features,
                self.kernel_size,
                stride=self.stride,
                padding=self.padding,
                use_bias=False,
                dtype=self.dtype,
                name="c",
            )
        return BatchNorm2d(self.bn_weight_init, name="bn")(c(x.astype(self.dtype)))


class PatchEmbed(nn.Module):
    """images (B, S, S, 3) -> (B, S/4, S/4, embed_dim): `seq.0` (3x3, stride 2), GELU, `seq.2` (3x3, stride 2)."""

    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.embed_dim
        x = gelu(Conv2dBN(n // 2, 3, 2, 1, dtype=self.dtype, name="seq_0")(x))
        return Conv2dBN(n, 3, 2, 1, dtype=self.dtype, name="seq_2")(x)


class MBConv(DropPathBlock):
    """Inverted residual: (B, H, W, C) -> (B, H, W, C). 1x1 expansion, GELU, 3x3 depthwise, GELU,
    1x1 projection (its BatchNorm scale starts at 0), residual, GELU."""

    expand_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        c = x.shape[-1]
        hidden = int(c * self.expand_ratio)
        y = gelu(Conv2dBN(hidden, dtype=self.dtype, name="conv1")(x))
        y = gelu(Conv2dBN(hidden, 3, 1, 1, depthwise=True, dtype=self.dtype, name="conv2")(y))
        y = Conv2dBN(c, bn_weight_init=0.0, dtype=self.dtype, name="conv3")(y)
        return gelu(self._drop_path(y, deterministic) + x)


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, H', W', out_dim): 1x1, GELU, 3x3 depthwise with `stride` (H' = ceil(H / stride)),
    GELU, 1x1."""

    out_dim: int
    stride: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = gelu(Conv2dBN(self.out_dim, dtype=self.dtype, name="conv1")(x))
        x = gelu(Conv2dBN(self.out_dim, 3, self.stride, 1, depthwise=True, dtype=self.dtype, name="conv2")(x))
        return Conv2dBN(self.out_dim, dtype=self.dtype, name="conv3")(x)


def attention_bias_idxs(resolution: tuple[int, int]) -> np.ndarray:
    """The official `attention_bias_idxs` of an (R0, R1) window: (N, N) indices, N = R0 * R1, into
    the table of offsets (|dy|, |dx|) numbered in order of first appearance. Query (0, 0) meets
    every offset first, in row-major key order, so offset (dy, dx) has index dy * R1 + dx."""
    r0, r1 = resolution
    y, x = np.divmod(np.arange(r0 * r1), r1)
    return np.abs(y[:, None] - y[None, :]) * r1 + np.abs(x[:, None] - x[None, :])


class Attention(nn.Module):
    """Windowed multi-head attention with offset biases (official `tiny_vit_sam.Attention`, attn_ratio 1):
    (B, N, C) -> (B, N, C), N = ws * ws tokens of one window.

    `norm` (LayerNorm) first; `qkv` packs each head's q, k, v together: (N, heads, [q | k | v]).
    Logits are q.k * head_dim^-0.5 plus `attention_biases[head, offset(query, key)]`."""

    num_heads: int
    resolution: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, dim = x.shape
        nh = self.num_heads
        hd = dim // nh
        acc = accum_dtype(self.dtype)
        x = LayerNorm(LN_EPS, name="norm")(x)
        qkv = dense(3 * dim, ("embed", "qkv"), dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, n, nh, 3, hd).transpose(3, 0, 2, 1, 4)  # (3, B, nh, N, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        idxs = attention_bias_idxs(self.resolution)
        init = nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None))
        biases = self.param("attention_biases", init, (nh, int(idxs.max()) + 1), jnp.float32)
        attn = jnp.einsum("bnqc,bnkc->bnqk", q, k, preferred_element_type=acc) * (hd**-0.5)
        attn = jax.nn.softmax(attn + biases[:, idxs].astype(acc), axis=-1).astype(self.dtype)
        out = jnp.einsum("bnqk,bnkc->bqnc", attn, v).reshape(b, n, dim)
        return dense(dim, ("qkv", "embed"), dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
    """(..., C) -> (..., C): `norm` (LayerNorm), `fc1`, GELU, `fc2`."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = LayerNorm(LN_EPS, name="norm")(x)
        h = gelu(dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(h))
        return dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class TinyViTBlock(DropPathBlock):
    """(B, H, W, C) -> (B, H, W, C): x + attn(windows of x), then a 3x3 depthwise `local_conv`, then
    x + mlp(x). The grid is zero-padded at the bottom and right to multiples of `window_size`;
    the padding is dropped after the attention."""

    num_heads: int
    window_size: int
    mlp_ratio: float = 4.0
    local_conv_size: int = 3
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        b, h, w, c = x.shape
        ws = self.window_size
        windows, pad_hw = window_partition(x, ws)
        y = Attention(self.num_heads, (ws, ws), dtype=self.dtype, name="attn")(windows.reshape(-1, ws * ws, c))
        y = window_unpartition(y.reshape(-1, ws, ws, c), ws, pad_hw, (h, w))
        x = x + self._drop_path(y, deterministic)
        k = self.local_conv_size
        x = Conv2dBN(c, k, 1, k // 2, depthwise=True, dtype=self.dtype, name="local_conv")(x)
        mlp = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, name="mlp")
        return x + self._drop_path(mlp(x), deterministic)


# The blocks with their activations recomputed in the backward pass (`TinyViTConfig.remat`);
# same names, same params. `deterministic` (argument 2, counting `self`) picks Python branches.
RematMBConv = nn.remat(MBConv, static_argnums=(2,))
RematTinyViTBlock = nn.remat(TinyViTBlock, static_argnums=(2,))


class ConvLayer(nn.Module):
    """Stage 0 (`layers_0`): MBConv `blocks_j`, then the `downsample` (B, H, W, C) -> (B, H', W', out_dim)."""

    config: TinyViTConfig
    drop_path: tuple[float, ...]
    out_dim: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        block_cls = RematMBConv if self.config.remat else MBConv
        for j, rate in enumerate(self.drop_path):
            x = block_cls(self.config.mbconv_expand_ratio, rate, dtype=self.dtype, name=f"blocks_{j}")(x, deterministic)
        return PatchMerging(self.out_dim, self.stride, dtype=self.dtype, name="downsample")(x)


class BasicLayer(nn.Module):
    """Stage i >= 1 (`layers_i`): TinyViT `blocks_j`, then (all stages but the last) the `downsample`."""

    config: TinyViTConfig
    index: int
    drop_path: tuple[float, ...]
    out_dim: int | None = None
    stride: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg, i = self.config, self.index
        block_cls = RematTinyViTBlock if cfg.remat else TinyViTBlock
        for j, rate in enumerate(self.drop_path):
            x = block_cls(
                cfg.num_heads[i],
                cfg.window_sizes[i],
                cfg.mlp_ratio,
                cfg.local_conv_size,
                rate,
                dtype=self.dtype,
                name=f"blocks_{j}",
            )(x, deterministic)
        if self.out_dim is None:
            return x
        return PatchMerging(self.out_dim, self.stride, dtype=self.dtype, name="downsample")(x)


class TinyViT(nn.Module):
    """images (B, S, S, 3) -> image embeddings (B, S/16, S/16, out_chans) (see the module docstring);
    with `interm`, `ImageEmbeddings` that also hold stage 1's output (B, S/16, S/16,
    `config.interm_dim`) (Light HQ-SAM's early features).

    Stage i is `layers_i` with `blocks_j` and, except the last, a `downsample` to stage i + 1's
    width with stride `config.merge_strides[i]`. Stage 0 is convolutional (MBConv), the others
    windowed attention."""

    config: TinyViTConfig
    out_chans: int = 256
    dtype: Any = jnp.float32
    interm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array | ImageEmbeddings:
        """`deterministic=False` turns on drop path (`config.drop_path_rate`; needs a "drop_path" rng)."""
        cfg = self.config
        interm = None
        x = PatchEmbed(cfg.embed_dims[0], dtype=self.dtype, name="patch_embed")(x.astype(self.dtype))
        rates, start = cfg.drop_path_rates, 0
        last = len(cfg.embed_dims) - 1
        for i, depth in enumerate(cfg.depths):
            stage_rates, start = rates[start : start + depth], start + depth
            out_dim = cfg.embed_dims[i + 1] if i < last else None
            stride = cfg.merge_strides[i] if i < last else 1
            if i == 0:
                layer = ConvLayer(cfg, stage_rates, out_dim, stride, dtype=self.dtype, name="layers_0")
            else:
                layer = BasicLayer(cfg, i, stage_rates, out_dim, stride, dtype=self.dtype, name=f"layers_{i}")
            x = layer(x, deterministic)
            if self.interm and i == 1:
                interm = x
        if self.is_initializing():  # the unused ImageNet classifier (see the module docstring)
            pooled = LayerNorm(LN_EPS, name="norm_head")(jnp.zeros((1, cfg.embed_dims[-1]), jnp.float32))
            if cfg.num_classes:
                dense(cfg.num_classes, ("embed", None), dtype=jnp.float32, name="head")(pooled)
        x = conv(self.out_chans, 1, use_bias=False, dtype=self.dtype, name="neck_0")(x)
        x = LayerNorm(NECK_EPS, name="neck_1")(x)
        x = conv(self.out_chans, 3, padding=1, use_bias=False, dtype=self.dtype, name="neck_2")(x)
        x = LayerNorm(NECK_EPS, name="neck_3")(x)
        return ImageEmbeddings(x, interm=interm) if self.interm else x
