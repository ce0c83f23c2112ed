"""SAM 2's image encoder: the Hiera trunk and the FPN neck (official `sam2.modeling.backbones`:
`hieradet.Hiera`, `image_encoder.FpnNeck`, `image_encoder.ImageEncoder`), channels-last.

images (B, S, S, 3) normalized and padded -> `ImageEmbeddings`, what `SAM2ImagePredictor.set_image`
keeps for an image. For SAM 2.1 (S = 1024, `config.HieraConfig`, e.g. Hiera-T):

  trunk        7x7 stride-4 patch embedding + pos embed                  (B, 256, 256, 96)
               stage 0 (windows of 8)                                   (B, 256, 256, 96)
               stage 1 (q pooled 2x2 in its first block)                (B, 128, 128, 192)
               stage 2 (windows of 14 and global blocks)                (B, 64, 64, 384)
               stage 3                                                  (B, 32, 32, 768)
  neck         1x1 lateral convolutions to d_model (256); levels 2 and 3 (`fpn_top_down_levels`)
               add the next lower level upsampled x2 (nearest, in float32); `scalp` 1 drops
               level 3 (it still feeds level 2)
  embedding    level 2 + `no_mem_embed` (SAM 2's `directly_add_no_mem_embed`)  (B, 64, 64, 256)
  high_res     (s1 = conv_s1(level 1) (B, 128, 128, 64), s0 = conv_s0(level 0) (B, 256, 256, 32)),
               the mask decoder's 1x1 projections, which `SAM2Base.forward_image` applies once
               per image (`use_high_res_features_in_sam`)

A `MultiScaleBlock`: x = shortcut + attn(windows of norm1(x)), x = x + mlp(norm2(x)). Windows are
zero-padded at the bottom and right after `norm1` (padded tokens are keys, not masked); a block
that widens the stream projects the residual (`proj`, from norm1(x)). At a stage transition the
first block max-pools (2x2, floor) the queries inside each window, and the residual after its
projection, so the output grid and the windows halve. The `pos_embed` background (7x7 or 14x14)
is resized to the first grid by PyTorch's bicubic interpolation (A = -0.75, align_corners=False,
no antialias; fixed matrices here, as PyTorch computes the taps in float32), plus the window
embed `pos_embed_window` tiled over the grid. LayerNorms use eps 1e-6, GELUs are exact (erf).

The params, under the `Sam` model's `image_encoder` (official key -> path, see
`convert/keys_hiera.py`; every conv kernel HWIO, every linear kernel (in, out)):

  image_encoder.trunk.patch_embed.proj.{weight,bias}   trunk/patch_embed/proj/{kernel,bias}
  image_encoder.trunk.pos_embed                         trunk/pos_embed        (1, C, bh, bw), as officially
  image_encoder.trunk.pos_embed_window                  trunk/pos_embed_window (1, C, w, w), as officially
  image_encoder.trunk.blocks.{i}.norm1 / norm2          trunk/blocks_{i}/norm1 / norm2/{scale,bias}
  image_encoder.trunk.blocks.{i}.attn.qkv / attn.proj   trunk/blocks_{i}/attn/qkv / attn/proj
  image_encoder.trunk.blocks.{i}.mlp.layers.{j}         trunk/blocks_{i}/mlp/layers_{j}
  image_encoder.trunk.blocks.{i}.proj (width changes)   trunk/blocks_{i}/proj
  image_encoder.neck.convs.{j}.conv.{weight,bias}       neck/convs_{j}/{kernel,bias}  (j = 0: lowest resolution)
  no_mem_embed                                          no_mem_embed  (1, 1, d_model), as officially
  sam_mask_decoder.conv_s0.{weight,bias}                conv_s0/{kernel,bias}
  sam_mask_decoder.conv_s1.{weight,bias}                conv_s1/{kernel,bias}

The neck's sine position encodings are not computed: for images the mask decoder takes the
prompt encoder's dense positional encoding. Training options as the other encoders': drop path
per block (`HieraConfig.drop_path_rate`, only with `deterministic=False` and a "drop_path" rng)
and `remat`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sam_jax.config import HieraConfig
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.modeling.common import LayerNorm, accum_dtype, conv, dense, gelu
from sam_jax.modeling.image_encoder import DropPathBlock, window_partition, window_unpartition
from sam_jax.transforms import linear_resize_matrix

LN_EPS = 1e-6  # `MultiScaleBlock`'s norm_layer: LayerNorm(eps=1e-6)
CUBIC_A = -0.75  # PyTorch's bicubic coefficient


@functools.lru_cache(maxsize=32)
def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The (out_size, in_size) float32 matrix of 1-D cubic interpolation,
    `F.interpolate(mode="bicubic", align_corners=False)` without antialiasing (PyTorch's CPU
    kernel, `HelperInterpCubic`): src = scale * (i + 0.5) - 0.5 (not clamped), t = src - floor(src),
    the four taps floor(src) - 1 .. floor(src) + 2 clamped to the edges, Keys' cubic with A = -0.75;
    all in float32 as PyTorch computes them for float32 inputs. Not jax.image.resize's cubic (A = -0.5).
    """
    f32 = np.float32
    a = f32(CUBIC_A)
    scale = f32(in_size) / f32(out_size)
    src = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))

    def near(x):  # |x| <= 1
        return ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)

    def far(x):  # 1 < |x| < 2
        return ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a

    one = f32(1.0)
    weights = (far(t + one), near(t), near(one - t), far(one - t + one))
    m = np.zeros((out_size, in_size), f32)
    rows = np.arange(out_size)
    for j, w in enumerate(weights):
        np.add.at(m, (rows, np.clip(i0 - 1 + j, 0, in_size - 1)), w.astype(f32))
    return m


def max_pool(x: jax.Array, stride: int) -> jax.Array:
    """`nn.MaxPool2d(stride, stride, ceil_mode=False)` on (B, H, W, C): trailing rows/columns that
    fill no whole window are dropped."""
    b, h, w, c = x.shape
    h2, w2 = h // stride, w // stride
    x = x[:, : h2 * stride, : w2 * stride].reshape(b, h2, stride, w2, stride, c)
    return x.max(axis=(2, 4))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, dtype: Any) -> jax.Array:
    """Softmax attention, head-major: q (B, nh, Tq, hd) already scaled, k and v (B, nh, Tk, hd) ->
    (B, nh, Tq, hd).

    The logits and their exponentials are float32 (or wider); the rows are normalized after the
    product with v (one pass less over the (Tq, Tk) matrix than normalizing it first), as
    flash attention (PyTorch's `scaled_dot_product_attention` on CPUs) does."""
    acc = accum_dtype(dtype)
    logits = jnp.einsum("bnqc,bnkc->bnqk", q, k, preferred_element_type=acc)
    e = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    out = jnp.einsum("bnqk,bnkc->bnqc", e.astype(dtype), v, preferred_element_type=acc)
    return (out / e.sum(axis=-1, keepdims=True)).astype(dtype)


class MultiScaleAttention(nn.Module):
    """(B, H, W, dim) -> (B, H', W', dim_out): multi-head attention over the H * W tokens (one
    window, or the whole grid), the queries max-pooled by `q_stride` (H' = H / q_stride) when set.

    More than `query_block` queries (a global block: 4096 at 1024 px) are taken `query_block` at a
    time (`jax.lax.map`): the (queries, keys) matrix of a chunk stays in cache, ~1.5x faster on
    CPUs than the whole one, the same result."""

    dim_out: int
    num_heads: int
    q_stride: int = 0
    query_block: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        nh = self.num_heads
        hd = self.dim_out // nh
        qkv = dense(3 * self.dim_out, ("embed", "qkv"), dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, h, w, 3, nh, hd)
        q = qkv[:, :, :, 0]  # (B, H, W, nh, hd)
        if self.q_stride:
            q = max_pool(q.reshape(b, h, w, nh * hd), self.q_stride)
        ho, wo = q.shape[1], q.shape[2]
        tq, cs = ho * wo, self.query_block
        # Head-major layouts: every product below is a plain batched matmul.
        q = q.reshape(b, tq, nh, hd).transpose(0, 2, 1, 3) * jnp.asarray(hd**-0.5, q.dtype)  # (B, nh, Tq, hd)
        kv = qkv[:, :, :, 1:].reshape(b, h * w, 2, nh, hd).transpose(2, 0, 3, 1, 4)  # (2, B, nh, Tk, hd)
        k, v = kv[0], kv[1]
        if tq > cs and tq % cs == 0:
            chunks = jnp.moveaxis(q.reshape(b, nh, tq // cs, cs, hd), 2, 0)  # (Tq / cs, B, nh, cs, hd)
            out = jax.lax.map(lambda qc: attend(qc, k, v, self.dtype), chunks)
            out = jnp.moveaxis(out, 0, 2).reshape(b, nh, tq, hd)
        else:
            out = attend(q, k, v, self.dtype)
        out = out.transpose(0, 2, 1, 3).reshape(b, ho, wo, self.dim_out)
        return dense(self.dim_out, ("qkv", "embed"), dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
    """SAM 2's `MLP` with 2 layers and GELU: (..., C) -> (..., C)."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = gelu(dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="layers_0")(x))
        return dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="layers_1")(h)


class MultiScaleBlock(DropPathBlock):
    """Official `MultiScaleBlock`: (B, H, W, dim) -> (B, H', W', dim_out) (H' = H / q_stride when
    pooling). `window_size` 0: global attention. `drop_path` is this block's stochastic depth rate,
    applied to both residual branches with `deterministic=False` (needs a "drop_path" rng)."""

    dim_out: int
    num_heads: int
    window_size: int = 0
    q_stride: int = 0
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        dim = x.shape[-1]
        shortcut = x
        x = LayerNorm(LN_EPS, name="norm1")(x)
        if dim != self.dim_out:
            shortcut = dense(self.dim_out, (None, "embed"), dtype=self.dtype, name="proj")(x)
            if self.q_stride:
                shortcut = max_pool(shortcut, self.q_stride)
        ws = self.window_size
        h, w = x.shape[1], x.shape[2]
        if ws > 0:
            x, pad_hw = window_partition(x, ws)
        x = MultiScaleAttention(self.dim_out, self.num_heads, self.q_stride, dtype=self.dtype, name="attn")(x)
        if self.q_stride:  # the pooled queries' windows and grid (the residual's)
            ws = self.window_size // self.q_stride
            h, w = shortcut.shape[1], shortcut.shape[2]
            if ws > 0:
                pad_hw = (h + (ws - h % ws) % ws, w + (ws - w % ws) % ws)
        if self.window_size > 0:
            x = window_unpartition(x, ws, pad_hw, (h, w))
        x = shortcut + self._drop_path(x, deterministic)
        mlp = Mlp(int(self.dim_out * self.mlp_ratio), dtype=self.dtype, name="mlp")
        return x + self._drop_path(mlp(LayerNorm(LN_EPS, name="norm2")(x)), deterministic)


# `MultiScaleBlock` with its activations recomputed in the backward pass (`HieraConfig.remat`):
# same name, same params. `deterministic` (argument 2, counting `self`) picks Python branches.
RematMultiScaleBlock = nn.remat(MultiScaleBlock, static_argnums=(2,))


class PatchEmbed(nn.Module):
    """images (B, S, S, 3) -> (B, S/4, S/4, embed_dim): `proj`, a 7x7 convolution, stride 4, padding 3."""

    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv(
            self.embed_dim, 7, stride=4, padding=3, dtype=self.dtype, axes=(None, None, None, "embed"), name="proj"
        )(x)


class Hiera(nn.Module):
    """The trunk: images (B, S, S, 3) -> every stage's output, highest resolution first
    [(B, S/4, S/4, C), (B, S/8, S/8, 2C), ...] (official `Hiera` with `return_interm_layers`)."""

    config: HieraConfig
    dtype: Any = jnp.float32

    def pos_embed(self, h: int, w: int) -> jax.Array:
        """`Hiera._get_pos_embed`: (h, w, C) float32, the background bicubically resized to (h, w)
        plus the window embed tiled."""
        cfg = self.config
        c, bh, bw, ws = cfg.embed_dim, *cfg.window_pos_embed_bkg_spatial_size, cfg.window_spec[0]
        # Official init is zeros (always loaded from a checkpoint); from scratch small random values
        # keep the zero-padded image area from giving constant tokens (see ImageEncoderViT.pos_embed).
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed", None, None))
        background = self.param("pos_embed", init, (1, c, bh, bw), jnp.float32)
        window = self.param("pos_embed_window", init, (1, c, ws, ws), jnp.float32)
        mh, mw = jnp.asarray(bicubic_resize_matrix(bh, h)), jnp.asarray(bicubic_resize_matrix(bw, w))
        pos = jnp.einsum("hi,wj,cij->hwc", mh, mw, background[0], precision=jax.lax.Precision.HIGHEST)
        return pos + jnp.tile(window[0].transpose(1, 2, 0), (h // ws, w // ws, 1))

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> list[jax.Array]:
        """`deterministic=False` turns on drop path (`config.drop_path_rate`; needs a "drop_path" rng)."""
        cfg = self.config
        x = PatchEmbed(cfg.embed_dim, dtype=self.dtype, name="patch_embed")(x.astype(self.dtype))
        x = x + self.pos_embed(x.shape[1], x.shape[2]).astype(self.dtype)
        block_cls = RematMultiScaleBlock if cfg.remat else MultiScaleBlock
        outputs = []
        for i, ((_, dim_out, heads, window, q_stride), rate) in enumerate(
            zip(cfg.block_specs, cfg.drop_path_rates, strict=True)
        ):
            x = block_cls(
                dim_out,
                heads,
                window_size=window,
                q_stride=q_stride,
                mlp_ratio=cfg.mlp_ratio,
                drop_path=rate,
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(x, deterministic)
            if i in cfg.stage_ends:
                outputs.append(x)
        return outputs


def upsample2(x: jax.Array, mode: str) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C): `F.interpolate(scale_factor=2.0, mode=mode, align_corners=None
    (nearest) / False (bilinear), antialias=False)`."""
    if mode == "nearest":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    mh = jnp.asarray(linear_resize_matrix(x.shape[1], 2 * x.shape[1]), x.dtype)
    mw = jnp.asarray(linear_resize_matrix(x.shape[2], 2 * x.shape[2]), x.dtype)
    return jnp.einsum("hi,wj,bijc->bhwc", mh, mw, x, precision=jax.lax.Precision.HIGHEST)


class FpnNeck(nn.Module):
    """The trunk's stage outputs (highest resolution first) -> one map per level, `d_model` wide,
    same order (official `FpnNeck`, 1x1 lateral convolutions, "sum" fusion). Top-down from the
    lowest resolution: level i is its lateral `convs_{n - i}` (n = levels - 1), plus on
    `fpn_top_down_levels` the level below upsampled x2 (in float32, so those levels are float32)."""

    config: HieraConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xs: list[jax.Array]) -> list[jax.Array]:
        cfg = self.config
        n = len(xs) - 1
        out: list[Any] = [None] * len(xs)
        prev = None
        for i in range(n, -1, -1):
            lateral = conv(cfg.d_model, 1, dtype=self.dtype, name=f"convs_{n - i}")(xs[i])
            if i in cfg.fpn_top_down_levels and prev is not None:
                top_down = upsample2(prev.astype(accum_dtype(prev.dtype)), cfg.fpn_interp_model)
                prev = lateral + top_down
            else:
                prev = lateral
            out[i] = prev
        return out


class Sam2ImageEncoder(nn.Module):
    """images (B, S, S, 3) normalized and padded -> `ImageEmbeddings` as `SAM2ImagePredictor.set_image`
    computes them: the embedding (B, g, g, out_chans) (the lowest-resolution FPN level kept, plus
    `no_mem_embed`) and high_res (s1 (B, 2g, 2g, out_chans / 4), s0 (B, 4g, 4g, out_chans / 8)), the
    two higher levels through `conv_s1` / `conv_s0`. See the module docstring."""

    config: HieraConfig
    out_chans: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> ImageEmbeddings:
        """`deterministic=False` turns on drop path (`config.drop_path_rate`; needs a "drop_path" rng)."""
        cfg = self.config
        if cfg.d_model != self.out_chans:
            raise ValueError(f"Sam2ImageEncoder: the neck's width d_model {cfg.d_model} != out_chans {self.out_chans}")
        features = Hiera(cfg, dtype=self.dtype, name="trunk")(x, deterministic)
        levels = FpnNeck(cfg, dtype=self.dtype, name="neck")(features)
        if cfg.scalp:
            levels = levels[: -cfg.scalp]
        s0, s1, embedding = levels  # HieraConfig checks that 3 levels are left
        init = nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, None, "embed"))
        no_mem_embed = self.param("no_mem_embed", init, (1, 1, cfg.d_model), jnp.float32)
        embedding = embedding + no_mem_embed.astype(embedding.dtype)
        s0 = conv(self.out_chans // 8, 1, dtype=self.dtype, name="conv_s0")(s0)
        s1 = conv(self.out_chans // 4, 1, dtype=self.dtype, name="conv_s1")(s1)
        return ImageEmbeddings(embedding, (s1, s0))
