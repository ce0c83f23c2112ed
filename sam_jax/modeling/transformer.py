"""The two-way transformer of the mask decoder (official `modeling/transformer.py`).

Tokens (B, N, C) attend to the image (B, HW, C) and the image attends back.
`token_mask` (B, N) removes padding tokens from every attention in which tokens
are keys, so padded prompts give the same result as unpadded ones.

The image may come with batch 1 for B prompts (one image, no mask prompts): the first
layer's image-side projections then run once, not once per prompt, and the image side
becomes per-prompt where the tokens first update it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sam_jax.modeling.common import LayerNorm, MLPBlock, accum_dtype, dense


class Attention(nn.Module):
    """Attention with an optional downscaled internal width (official `Attention`)."""

    num_heads: int
    downsample_rate: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        """q (B, Nq, C), k and v (B, Nk, C), key_mask (B, Nk) bool or None -> (B, Nq, C).

        q or k/v may have batch 1 for all B rows (then projected once and broadcast)."""
        dim = q.shape[-1]
        internal = dim // self.downsample_rate
        assert internal % self.num_heads == 0, "num_heads must divide embedding_dim // downsample_rate"
        hd = internal // self.num_heads
        q = dense(internal, ("embed", "qkv"), dtype=self.dtype, name="q_proj")(q)
        k = dense(internal, ("embed", "qkv"), dtype=self.dtype, name="k_proj")(k)
        v = dense(internal, ("embed", "qkv"), dtype=self.dtype, name="v_proj")(v)
        split = lambda x: x.reshape(*x.shape[:2], self.num_heads, hd)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        attn = jnp.einsum("...qnc,...knc->...nqk", q, k, preferred_element_type=accum_dtype(self.dtype)) / np.sqrt(hd)
        if key_mask is not None:
            attn = jnp.where(key_mask[:, None, None, :], attn, -jnp.inf)
        attn = jax.nn.softmax(attn, axis=-1).astype(self.dtype)
        out = jnp.einsum("...nqk,...knc->...qnc", attn, v).reshape(*attn.shape[:1], attn.shape[2], internal)
        return dense(dim, ("qkv", "embed"), dtype=self.dtype, name="out_proj")(out)


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, tokens -> image, MLP on tokens, image -> tokens."""

    num_heads: int
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    skip_first_layer_pe: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array, key_pe: jax.Array, token_mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """queries (B, N, C), keys (B, HW, C), their PEs, token_mask (B, N) -> (queries, keys)."""
        ds = self.attention_downsample_rate
        if self.skip_first_layer_pe:
            queries = Attention(self.num_heads, dtype=self.dtype, name="self_attn")(
                queries, queries, queries, token_mask
            )
        else:
            q = queries + query_pe
            attn_out = Attention(self.num_heads, dtype=self.dtype, name="self_attn")(q, q, queries, token_mask)
            queries = queries + attn_out
        queries = LayerNorm(1e-5, name="norm1")(queries)

        q, k = queries + query_pe, keys + key_pe
        attn_out = Attention(self.num_heads, ds, dtype=self.dtype, name="cross_attn_token_to_image")(q, k, keys)
        queries = LayerNorm(1e-5, name="norm2")(queries + attn_out)

        mlp_out = MLPBlock(self.mlp_dim, act="relu", dtype=self.dtype, name="mlp")(queries)
        queries = LayerNorm(1e-5, name="norm3")(queries + mlp_out)

        q, k = queries + query_pe, keys + key_pe
        attn_out = Attention(self.num_heads, ds, dtype=self.dtype, name="cross_attn_image_to_token")(
            k, q, queries, token_mask
        )
        keys = LayerNorm(1e-5, name="norm4")(keys + attn_out)
        return queries, keys


class TwoWayTransformer(nn.Module):
    depth: int
    num_heads: int
    mlp_dim: int
    attention_downsample_rate: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, image_embedding: jax.Array, image_pe: jax.Array, point_embedding: jax.Array, token_mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """image_embedding and image_pe (B, h, w, C), point_embedding (B, N, C), token_mask (B, N)
        -> processed tokens (B, N, C) and image (B, hw, C)."""
        b, h, w, c = image_embedding.shape  # b: 1 (shared by every prompt) or B
        keys = image_embedding.reshape(b, h * w, c)
        key_pe = image_pe.reshape(image_pe.shape[0], h * w, c)
        queries = point_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.num_heads,
                self.mlp_dim,
                self.attention_downsample_rate,
                skip_first_layer_pe=i == 0,
                dtype=self.dtype,
                name=f"layers_{i}",
            )(queries, keys, point_embedding, key_pe, token_mask)
        q, k = queries + point_embedding, keys + key_pe
        attn_out = Attention(
            self.num_heads, self.attention_downsample_rate, dtype=self.dtype, name="final_attn_token_to_image"
        )(q, k, keys)
        queries = LayerNorm(1e-5, name="norm_final_attn")(queries + attn_out)
        return queries, keys
