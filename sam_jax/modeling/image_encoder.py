"""The ViT image encoder (official `modeling/image_encoder.py`), channels-last.

images (B, S, S, 3) normalized and padded, S = img_size -> `ImageEmbeddings` with the embedding
(B, S/16, S/16, C), C = prompt_embed_dim (256). Blocks use windowed attention (window 14, the 64x64
grid zero-padded to 70x70 after `norm1`, padded tokens not masked) except the
`global_attn_indexes`, which attend over the whole grid. Every attention adds
decomposed relative positions.

Two training-only options (`ImageEncoderConfig`): stochastic depth on each
block's two residual branches (`drop_path_rate`, active only when the caller
passes `deterministic=False` and a "drop_path" rng), and rematerialization of
the blocks (`remat`). Neither changes the params or the deterministic output.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sam_jax.config import ImageEncoderConfig
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.modeling.common import LayerNorm, MLPBlock, accum_dtype, conv, dense, gelu
from sam_jax.transforms import linear_resize_matrix


def resize_linear(x: jax.Array, out_size: int) -> jax.Array:
    """(L, C) -> (out_size, C) along axis 0: `F.interpolate(mode="linear", align_corners=False)`,
    with PyTorch's float32 source indices and weights (`transforms.linear_resize_matrix`)."""
    return jnp.asarray(linear_resize_matrix(x.shape[0], out_size)) @ x


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative position embeddings for every (query, key) pair along one axis.

    rel_pos (L, C) -> (q_size, k_size, C). When L != 2 * max(q, k) - 1 the table
    is resized linearly first (only then; as the official code does).
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = resize_linear(rel_pos, max_rel_dist)
    q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.astype(np.int64)]


def window_partition(x: jax.Array, window_size: int) -> tuple[jax.Array, tuple[int, int]]:
    """(B, H, W, C) -> (B * nH * nW, ws, ws, C), zero-padding H and W up to multiples of ws.

    Returns the windows and the padded size (Hp, Wp).
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(windows: jax.Array, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`: (B * nH * nW, ws, ws, C) -> (B, H, W, C), padding dropped."""
    hp, wp = pad_hw
    h, w = hw
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return x[:, :h, :w, :]


def query_rows(h: int, w: int, query_block: int) -> int:
    """Grid rows per query chunk: the largest divisor of h with rows * w <= query_block (at least 1)."""
    fits = [r for r in range(1, h + 1) if h % r == 0 and r * w <= query_block]
    return max(fits, default=1)


class Attention(nn.Module):
    """Multi-head attention with decomposed relative positions over an (H, W) grid.

    Queries are processed in chunks of whole grid rows (at most `query_block` queries,
    `jax.lax.map`) when the grid holds more: the score matrix of a global block (12 x 4096
    x 4096 in vit_b) then never exists at once, and its relative-position terms, softmax
    and product with v run over a chunk while it is hot. The result is the same.

    `impl` picks the kernel: "chunked" (the above; fastest on CPUs) or "cudnn" / "xla":
    `jax.nn.dot_product_attention` with that implementation on relative positions folded
    into q and k (`fold_rel_pos`), so no bias tensor is ever made. "cudnn" is cuDNN's
    flash attention (NVIDIA GPUs, bfloat16/float16 compute only); "xla" is the same
    formulation through XLA, on any backend.
    """

    num_heads: int
    qkv_bias: bool = True
    use_rel_pos: bool = True
    input_size: tuple[int, int] | None = None
    query_block: int = 64
    impl: str = "chunked"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, D) -> (B, H, W, D)."""
        b, h, w, dim = x.shape
        nh = self.num_heads
        hd = dim // nh
        acc = accum_dtype(self.dtype)
        qkv = dense(3 * dim, ("embed", "qkv"), use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
        # Head-major layouts, made once: every product below is a plain batched matmul.
        qkv = qkv.reshape(b, h, w, 3, nh, hd).transpose(3, 0, 4, 1, 2, 5)  # (3, B, nh, H, W, hd)
        q = qkv[0]
        k, v = qkv[1].reshape(b, nh, h * w, hd), qkv[2].reshape(b, nh, h * w, hd)
        rel_h = rel_w = None
        if self.use_rel_pos:
            assert self.input_size is not None, "input_size is required with use_rel_pos"
            init = nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None))
            rel_pos_h = self.param("rel_pos_h", init, (2 * self.input_size[0] - 1, hd), jnp.float32)
            rel_pos_w = self.param("rel_pos_w", init, (2 * self.input_size[1] - 1, hd), jnp.float32)
            rh = get_rel_pos(h, h, rel_pos_h).astype(self.dtype)  # (H, H, hd)
            rw = get_rel_pos(w, w, rel_pos_w).astype(self.dtype)  # (W, W, hd)
            rel_h = jnp.einsum("bnhwc,hkc->bnhwk", q, rh, preferred_element_type=acc)  # (B, nh, H, W, H)
            rel_w = jnp.einsum("bnhwc,wkc->bnhwk", q, rw, preferred_element_type=acc)  # (B, nh, H, W, W)

        if self.impl != "chunked":
            out = fused_attention(q, k, v, rel_h, rel_w, impl=self.impl).reshape(b, nh, h, w, hd)
            out = out.transpose(0, 2, 3, 1, 4).reshape(b, h, w, dim)
            return dense(dim, ("qkv", "embed"), dtype=self.dtype, name="proj")(out)

        def attend(qc: jax.Array, rel_hc: jax.Array | None, rel_wc: jax.Array | None) -> jax.Array:
            """Queries of R grid rows (B, nh, R, W, hd), their relative-position terms
            (B, nh, R, W, H) and (B, nh, R, W, W) -> (B, nh, R, W, hd)."""
            r = qc.shape[2]
            attn = jnp.einsum(
                "bnqc,bnkc->bnqk", qc.reshape(b, nh, r * w, hd) * (hd**-0.5), k, preferred_element_type=acc
            )
            if rel_hc is not None:
                attn = attn.reshape(b, nh, r, w, h, w) + rel_hc[..., :, None] + rel_wc[..., None, :]
                attn = attn.reshape(b, nh, r * w, h * w)
            attn = jax.nn.softmax(attn, axis=-1).astype(self.dtype)
            return jnp.einsum("bnqk,bnkc->bnqc", attn, v).reshape(b, nh, r, w, hd)

        rows = query_rows(h, w, self.query_block)
        if rows == h:
            out = attend(q, rel_h, rel_w)
        else:
            # (B, nh, H, ...) -> (H/R, B, nh, R, ...): chunks of R grid rows along a leading axis.
            split = lambda a: jnp.moveaxis(a.reshape(b, nh, h // rows, rows, *a.shape[3:]), 2, 0)  # noqa: E731
            chunks = (split(q),) + ((split(rel_h), split(rel_w)) if self.use_rel_pos else (None, None))
            out = jax.lax.map(lambda c: attend(*c), chunks)  # (H/R, B, nh, R, W, hd)
            out = jnp.moveaxis(out, 0, 2).reshape(b, nh, h, w, hd)
        out = out.transpose(0, 2, 3, 1, 4).reshape(b, h, w, dim)
        return dense(dim, ("qkv", "embed"), dtype=self.dtype, name="proj")(out)


def fold_rel_pos(q: jax.Array, k: jax.Array, rel_h: jax.Array, rel_w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Relative positions folded into the queries and keys of a plain attention.

    q (B, nh, H, W, hd) and k (B, nh, H*W, hd), with the decomposed relative-position
    terms rel_h (B, nh, H, W, H) and rel_w (B, nh, H, W, W) of each query, become
    q' = [q / sqrt(hd), rel_h, rel_w] and k' = [k, onehot(key row), onehot(key column)],
    both (B, nh, H*W, hd + H + W): q' . k' = q . k / sqrt(hd) + rel_h[key row] +
    rel_w[key column], exactly the official logits, with no (H*W, H*W) bias made.
    """
    b, nh, h, w, hd = q.shape
    rows = jnp.repeat(jnp.eye(h, dtype=k.dtype), w, axis=0)  # (H*W, H): key j -> its row j // W
    cols = jnp.tile(jnp.eye(w, dtype=k.dtype), (h, 1))  # (H*W, W): key j -> its column j % W
    qf = jnp.concatenate([q * jnp.asarray(hd**-0.5, q.dtype), rel_h.astype(q.dtype), rel_w.astype(q.dtype)], axis=-1)
    kf = jnp.concatenate(
        [k, jnp.broadcast_to(rows, (b, nh, h * w, h)), jnp.broadcast_to(cols, (b, nh, h * w, w))], axis=-1
    )
    return qf.reshape(b, nh, h * w, hd + h + w), kf


def fused_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, rel_h: jax.Array | None, rel_w: jax.Array | None, *, impl: str
) -> jax.Array:
    """Attention through `jax.nn.dot_product_attention` (implementation `impl`).

    q (B, nh, H, W, hd), k and v (B, nh, H*W, hd), optional relative-position terms as in
    `fold_rel_pos` -> (B, nh, H*W, hd). Head dims are zero-padded to a multiple of 8 (what
    cuDNN asks; zeros change no product), v to the folded width of q and k (one width for
    all three, as `dot_product_attention` needs).
    """
    b, nh, h, w, hd = q.shape
    if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention 'cudnn' (flash attention) needs a bfloat16 or float16 compute dtype, got {q.dtype}"
        )
    if rel_h is None:
        qf, kf, scale = q.reshape(b, nh, h * w, hd), k, hd**-0.5
    else:
        (qf, kf), scale = fold_rel_pos(q, k, rel_h, rel_w), 1.0
    width = -(-qf.shape[-1] // 8) * 8
    pad = lambda a: jnp.pad(a, ((0, 0),) * 3 + ((0, width - a.shape[-1]),)).transpose(0, 2, 1, 3)  # noqa: E731  (B, T, nh, width)
    out = jax.nn.dot_product_attention(pad(qf), pad(kf), pad(v), scale=scale, implementation=impl)
    return out[..., :hd].transpose(0, 2, 1, 3)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Stochastic depth (timm `drop_path`): zero whole samples of a residual branch.

    x (B, ...) -> x with each sample kept with probability 1 - rate and then
    scaled by 1 / (1 - rate), else zeroed; the mask has shape (B, 1, ..., 1).
    """
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(rng, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / keep_prob, jnp.zeros((), x.dtype))


class DropPathBlock(nn.Module):
    """Base of the encoders' residual blocks (ViT, TinyViT, Hiera): stochastic depth at the block's
    `drop_path` rate on a residual branch, with `deterministic=False` and a "drop_path" rng."""

    def _drop_path(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.drop_path == 0.0:
            return x
        return drop_path(x, self.drop_path, self.make_rng("drop_path"))


class Block(DropPathBlock):
    """Transformer block with windowed (window_size > 0) or global attention.

    `drop_path` is this block's stochastic depth rate, applied to the attention
    and the MLP branch when called with `deterministic=False` (then a
    "drop_path" rng is needed); with `deterministic=True` or rate 0 the block
    is the official one, op for op.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_rel_pos: bool = True
    window_size: int = 0
    input_size: tuple[int, int] | None = None
    drop_path: float = 0.0
    query_block: int = 64  # global attention: queries per chunk (see `Attention`)
    attention: str = "chunked"  # `Attention.impl`
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """(B, H, W, D) -> (B, H, W, D)."""
        shortcut = x
        x = LayerNorm(1e-6, name="norm1")(x)
        h, w = x.shape[1], x.shape[2]
        if self.window_size > 0:
            x, pad_hw = window_partition(x, self.window_size)
        x = Attention(
            self.num_heads,
            qkv_bias=self.qkv_bias,
            use_rel_pos=self.use_rel_pos,
            input_size=self.input_size if self.window_size == 0 else (self.window_size, self.window_size),
            query_block=self.query_block,
            impl=self.attention,
            dtype=self.dtype,
            name="attn",
        )(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + self._drop_path(x, deterministic)
        mlp = MLPBlock(int(x.shape[-1] * self.mlp_ratio), act="gelu", dtype=self.dtype, name="mlp")
        return x + self._drop_path(mlp(LayerNorm(1e-6, name="norm2")(x)), deterministic)


# `Block` with its activations recomputed in the backward pass. The wrapper keeps
# the module's name, so the param tree (`blocks_3/attn/qkv/...`) is unchanged;
# `deterministic` (argument 2, counting `self`) is static as it picks Python branches.
RematBlock = nn.remat(Block, static_argnums=(2,))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, S, S, 3) -> (B, S/p, S/p, D)."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv(
            self.embed_dim,
            self.patch_size,
            stride=self.patch_size,
            dtype=self.dtype,
            axes=(None, None, None, "embed"),
            name="proj",
        )(x)


class ConvStem(nn.Module):
    """A convolutional stem in place of `PatchEmbed` (`ImageEncoderConfig.conv_stem`): images
    (B, S, S, 3) -> (B, S/p, S/p, D). 3x3 convolutions of `widths` (LayerNorm, GELU), the first
    log2(p) of stride 2, then a 1x1 projection to D."""

    widths: tuple[int, ...]
    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        strided = self.patch_size.bit_length() - 1
        for i, width in enumerate(self.widths):
            x = conv(width, 3, stride=2 if i < strided else 1, padding=1, dtype=self.dtype, name=f"conv_{i}")(x)
            x = gelu(LayerNorm(1e-6, name=f"norm_{i}")(x))
        return conv(self.embed_dim, 1, dtype=self.dtype, axes=(None, None, "conv_in", "embed"), name="proj")(x)


class HighResFeatures(nn.Module):
    """A pixel stem for the mask decoder's high-res features (SAM 2's `conv_s0`, `conv_s1` on
    its backbone's first stages): images (B, S, S, 3) -> (s1 (B, 2S/p, 2S/p, out_chans/4),
    s0 (B, 4S/p, 4S/p, out_chans/8)), p = patch_size. f0 = GELU(k x k conv, stride p/4, k = max(3, p/2 - 1)) at
    the mask logits' resolution, f1 = GELU(3x3 conv of f0, stride 2); s0, s1 their 1x1
    projections to the upscaling's widths out_chans/8 and out_chans/4."""

    channels: int
    out_chans: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        s = self.patch_size // 4
        k = max(3, 2 * s - 1)  # 3x3 at stride 2 (8-px patches), 7x7 at stride 4 (16-px)
        f0 = gelu(conv(self.channels, k, stride=s, padding=k // 2, dtype=self.dtype, name="conv_0")(images))
        f1 = gelu(conv(2 * self.channels, 3, stride=2, padding=1, dtype=self.dtype, name="conv_1")(f0))
        s0 = conv(self.out_chans // 8, 1, dtype=self.dtype, name="conv_s0")(f0)
        s1 = conv(self.out_chans // 4, 1, dtype=self.dtype, name="conv_s1")(f1)
        return s1, s0


class ImageEncoderViT(nn.Module):
    """images (B, S, S, 3) -> `ImageEmbeddings`: the embedding (B, S/16, S/16, out_chans), with
    `config.high_res_channels` the high-res features (`HighResFeatures`), and with `interm` the
    output of the first global-attention block (B, S/16, S/16, embed_dim) (HQ-SAM's early features)."""

    config: ImageEncoderConfig
    out_chans: int = 256
    dtype: Any = jnp.float32
    interm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> ImageEmbeddings:
        """`deterministic=False` turns on drop path (`config.drop_path_rate`; needs a "drop_path" rng)."""
        cfg = self.config
        g = cfg.grid_size
        images = x.astype(self.dtype)
        if cfg.conv_stem:
            x = ConvStem(cfg.conv_stem, cfg.patch_size, cfg.embed_dim, dtype=self.dtype, name="conv_stem")(images)
        else:
            x = PatchEmbed(cfg.patch_size, cfg.embed_dim, dtype=self.dtype, name="patch_embed")(images)
        if cfg.use_abs_pos:
            # The official model starts at zeros because it always loads pretrained weights. From
            # scratch, zeros make every token of the zero-padded image area exactly 0 before
            # `norm1`, a LayerNorm of zero variance whose gradient is 1/sqrt(eps) = 1000 per token:
            # the patch-embedding gradient then dwarfs all others and global-norm clipping stalls
            # training. A small random init (std 0.02, as in ViT) avoids it.
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, None, "embed"))
            pos_embed = self.param("pos_embed", init, (1, g, g, cfg.embed_dim), jnp.float32)
            x = x + pos_embed.astype(self.dtype)
        block_cls = RematBlock if cfg.remat else Block
        if self.interm and not cfg.global_attn_indexes:
            raise ValueError("early ViT features (HQ-SAM) are the output of a global-attention block: there is none")
        interm = None
        for i, rate in enumerate(cfg.drop_path_rates):
            x = block_cls(
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                use_rel_pos=cfg.use_rel_pos,
                window_size=0 if i in cfg.global_attn_indexes else cfg.window_size,
                input_size=(g, g),
                drop_path=rate,
                attention=cfg.attention,
                query_block=cfg.attention_query_block,
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(x, deterministic)
            if self.interm and i == min(cfg.global_attn_indexes):
                interm = x
        x = conv(self.out_chans, 1, use_bias=False, dtype=self.dtype, name="neck_0")(x)
        x = LayerNorm(1e-6, name="neck_1")(x)
        x = conv(self.out_chans, 3, padding=1, use_bias=False, dtype=self.dtype, name="neck_2")(x)
        x = LayerNorm(1e-6, name="neck_3")(x)
        if not cfg.high_res_channels:
            return ImageEmbeddings(x, interm=interm)
        high_res = HighResFeatures(
            cfg.high_res_channels, self.out_chans, cfg.patch_size, dtype=self.dtype, name="high_res"
        )(images)
        return ImageEmbeddings(x, high_res, interm)
