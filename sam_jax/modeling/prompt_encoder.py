"""The prompt encoder (official `modeling/prompt_encoder.py`) on fixed-shape prompts.

Points and box corners arrive as one padded array (see `sam_jax.prompts`):
labels 1 / 0 are foreground / background points, 2 / 3 a box's top-left /
bottom-right corner, -1 padding. As in the official encoder, a prompt with
points but no box carries exactly one "not a point" token; the first -1 of
such a row becomes that token and every other -1 is masked out of attention
(`token_mask`), so any padding length gives the official result. SAM 2's predictor gives a box
as two such points, first in the row, so there a row with any point or corner has the padding
token (`box_corners_as_points`).

Text prompts (an addition: the paper's section 7.5, never released) are CLIP embeddings,
(B, M, Dt): each is L2-normalized (CLIP's joint space is one of directions, so an image
embedding at training and a text embedding at inference are interchangeable), scaled by
sqrt(Dt), projected to the prompt width by a 2-layer MLP, and given a learned text type
embedding. They follow the point and box tokens; unused slots are masked out like padding.
A model whose config has no `text_embed_dim` has no such layers and refuses text.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sam_jax.modeling.common import LayerNorm, conv, dense, embedding, gelu
from sam_jax.prompts import LABEL_BACKGROUND, LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, LABEL_FOREGROUND


def pixel_centres(points: jax.Array) -> jax.Array:
    """Pixel coordinates (x, y) -> the centres of those pixels, where the official encoder places points."""
    return points + 0.5


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (a stored, loaded buffer).

    The frequencies are a buffer in the official model (`register_buffer`): stored in the
    params but never trained, so no gradient flows into them (`frequencies`)."""

    num_pos_feats: int = 64
    scale: float = 1.0  # std of the frequencies at init

    def setup(self) -> None:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.scale), (None, None))
        self.positional_encoding_gaussian_matrix = self.param(
            "positional_encoding_gaussian_matrix", init, (2, self.num_pos_feats), jnp.float32
        )

    @property
    def frequencies(self) -> jax.Array:
        """The (2, num_pos_feats) matrix, without gradient: a training step then never
        computes the gradient of the dense encoding (summed over every prompt row)."""
        return jax.lax.stop_gradient(self.positional_encoding_gaussian_matrix)

    def _pe_encoding(self, coords: jax.Array) -> jax.Array:
        """Coordinates in [0, 1] (..., 2) as (x, y) -> (..., 2 * num_pos_feats)."""
        coords = 2 * coords - 1
        coords = coords @ self.frequencies
        coords = 2 * np.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def __call__(self, size: tuple[int, int]) -> jax.Array:
        """Dense positional encoding of an (h, w) grid -> (h, w, C)."""
        h, w = size
        dtype = self.positional_encoding_gaussian_matrix.dtype
        y = (jnp.arange(h, dtype=dtype) + 0.5) / h
        x = (jnp.arange(w, dtype=dtype) + 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        return self._pe_encoding(grid)

    def forward_with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """Pixel coordinates (..., 2) as (x, y) in an image of (H, W) -> (..., C)."""
        coords = coords / jnp.array([image_size[1], image_size[0]], coords.dtype)
        return self._pe_encoding(coords)


def token_mask(labels: jax.Array, box_corners_as_points: bool = False) -> jax.Array:
    """Which sparse tokens exist in the official model: (B, N) int labels -> (B, N) bool.

    Points (0, 1) and box corners (2, 3) always; the first -1 of a row that has
    points and no box (the official padding point); no other -1. With
    `box_corners_as_points` (SAM 2), the first -1 of a row with any point or corner.
    """
    is_pad = labels == -1
    first_pad = is_pad & (jnp.cumsum(is_pad, axis=-1) == 1)
    if box_corners_as_points:
        return (labels >= 0) | (first_pad & jnp.any(labels >= 0, axis=-1, keepdims=True))
    has_point = jnp.any((labels == 0) | (labels == 1), axis=-1, keepdims=True)
    has_box = jnp.any(labels >= 2, axis=-1, keepdims=True)
    return (labels >= 0) | (first_pad & has_point & ~has_box)


class PromptEncoder(nn.Module):
    """Encodes points, boxes and masks for the mask decoder.

    embed_dim: prompt width C. image_embedding_size: (h, w) of the image embedding.
    input_image_size: the padded model input (H, W). mask_in_chans: hidden width
    of the mask downscaling CNN. pe_scale: std of the positional frequencies at init.
    box_corners_as_points: SAM 2's padding rule (`token_mask`).
    """

    embed_dim: int
    image_embedding_size: tuple[int, int]
    input_image_size: tuple[int, int]
    mask_in_chans: int
    pe_scale: float = 1.0
    text_embed_dim: int | None = None
    box_corners_as_points: bool = False
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.pe_layer = PositionEmbeddingRandom(self.embed_dim // 2, self.pe_scale)
        self.point_embeddings_0 = embedding(1, self.embed_dim)  # background point
        self.point_embeddings_1 = embedding(1, self.embed_dim)  # foreground point
        self.point_embeddings_2 = embedding(1, self.embed_dim)  # box top-left
        self.point_embeddings_3 = embedding(1, self.embed_dim)  # box bottom-right
        self.not_a_point_embed = embedding(1, self.embed_dim)
        self.no_mask_embed = embedding(1, self.embed_dim)
        c = self.mask_in_chans
        self.mask_downscaling_0 = conv(c // 4, 2, stride=2, dtype=self.dtype)
        self.mask_downscaling_1 = LayerNorm(1e-6)
        self.mask_downscaling_3 = conv(c, 2, stride=2, dtype=self.dtype)
        self.mask_downscaling_4 = LayerNorm(1e-6)
        self.mask_downscaling_6 = conv(self.embed_dim, 1, dtype=self.dtype)
        if self.text_embed_dim is not None:
            self.text_proj_0 = dense(self.embed_dim, (None, "embed"), dtype=self.dtype)
            self.text_proj_1 = dense(self.embed_dim, (None, "embed"), dtype=self.dtype)
            self.text_embed = embedding(1, self.embed_dim)

    def click_maps(self, points: jax.Array, labels: jax.Array, sigmas: tuple[float, ...]) -> jax.Array:
        """The click maps of a prompt batch on the mask logits' grid (4x the embedding's): `click_maps`."""
        return click_maps(points, labels, self.input_image_size[0], 4 * self.image_embedding_size[0], sigmas)

    def get_dense_pe(self) -> jax.Array:
        """Positional encoding of the image embedding grid: (h, w, C)."""
        return self.pe_layer(self.image_embedding_size)

    def embed_points(self, points: jax.Array, labels: jax.Array) -> jax.Array:
        """points (B, N, 2) in input-image pixels (x, y), labels (B, N) -> (B, N, C)."""
        pe = self.pe_layer.forward_with_coords(pixel_centres(points), self.input_image_size)
        table = jnp.concatenate(
            [
                self.not_a_point_embed.embedding,
                self.point_embeddings_0.embedding,
                self.point_embeddings_1.embedding,
                self.point_embeddings_2.embedding,
                self.point_embeddings_3.embedding,
            ]
        )  # row = label + 1
        pe = jnp.where((labels == -1)[..., None], 0.0, pe)
        return pe + table[jnp.clip(labels + 1, 0, 4)]

    def embed_text(self, text: jax.Array) -> jax.Array:
        """CLIP embeddings (B, M, Dt) -> text tokens (B, M, C)."""
        if self.text_embed_dim is None:
            raise ValueError(
                "this model has no text projection (prompt_encoder.text_embed_dim is None): its checkpoint was "
                "not trained with text prompts"
            )
        if text.shape[-1] != self.text_embed_dim:
            raise ValueError(
                f"text embeddings have width {text.shape[-1]}; "
                f"this model takes CLIP embeddings of width {self.text_embed_dim}"
            )
        x = text.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12)) * np.sqrt(self.text_embed_dim)
        x = self.text_proj_1(gelu(self.text_proj_0(x.astype(self.dtype))))
        return x + self.text_embed.embedding.astype(x.dtype)

    def embed_masks(self, masks: jax.Array) -> jax.Array:
        """masks (B, 4h, 4w) logits -> (B, h, w, C)."""
        x = masks[..., None].astype(self.dtype)
        x = gelu(self.mask_downscaling_1(self.mask_downscaling_0(x)))
        x = gelu(self.mask_downscaling_4(self.mask_downscaling_3(x)))
        return self.mask_downscaling_6(x)

    def __call__(
        self,
        points: jax.Array,
        labels: jax.Array,
        mask_input: jax.Array,
        has_mask: jax.Array,
        text: jax.Array | None = None,
        text_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Embed one fixed-shape prompt batch.

        points (B, N, 2), labels (B, N), mask_input (B, 4h, 4w), has_mask (B,), optional
        text (B, M, Dt) with text_mask (B, M) -> sparse (B, N + M, C), dense (B, h, w, C),
        and the token mask (B, N + M) bool. mask_input and has_mask None (no row has a mask
        prompt) give dense (1, h, w, C), the no-mask embedding shared by all rows.
        """
        sparse = self.embed_points(points, labels)
        mask = token_mask(labels, self.box_corners_as_points)
        if text is not None and text.shape[1] > 0:
            text_mask = jnp.ones(text.shape[:2], bool) if text_mask is None else text_mask.astype(bool)
            sparse = jnp.concatenate([sparse, self.embed_text(text).astype(sparse.dtype)], axis=1)
            mask = jnp.concatenate([mask, text_mask], axis=1)
        elif self.text_embed_dim is not None and self.is_initializing():
            self.embed_text(jnp.zeros((1, 1, self.text_embed_dim), jnp.float32))  # create the text layers
        no_mask = self.no_mask_embed.embedding.reshape(1, 1, 1, -1)
        if mask_input is None:  # no mask prompt in the batch: one dense embedding for all rows
            h, w = self.image_embedding_size
            return sparse, jnp.broadcast_to(no_mask, (1, h, w, no_mask.shape[-1])), mask
        dense = jnp.where(has_mask[:, None, None, None], self.embed_masks(mask_input), no_mask)
        return sparse, dense, mask


def click_maps(
    points: jax.Array, labels: jax.Array, image_size: int, grid: int, sigmas: tuple[float, ...]
) -> jax.Array:
    """The maps a decoder with `click_map_sigmas` weighs into its masks.

    points (B, N, 2) (x, y) in model-input pixels and labels (B, N) (1 positive, 0 negative,
    2 / 3 box corners, -1 padding) of a prompt batch, on the square input of side image_size
    -> (B, grid, grid, 2S + 1) float32 on the mask logits' grid, S = len(sigmas): for each
    width s, exp(-d^2 / 2s^2) with d the distance from a logit cell's centre to the nearest
    positive point (0 without one), the same for the negative points, then 1 inside the row's
    box (0 without one). The nearest point, not a sum over the points: more clicks never make
    a map larger than the one or two points of training (summed Gaussians gave 5-click mIoU
    0.655 against 0.816 in the demo recipe). Points are taken at their pixel's centre (+0.5),
    as the prompt encoder does. No gradient flows into the prompts.
    """
    points = pixel_centres(jax.lax.stop_gradient(points).astype(jnp.float32))
    centres = (jnp.arange(grid, dtype=jnp.float32) + 0.5) * (image_size / grid)
    dx2 = jnp.square(centres[None, None, :] - points[..., 0:1])  # (B, N, grid) along x
    dy2 = jnp.square(centres[None, None, :] - points[..., 1:2])  # (B, N, grid) along y
    maps = []
    for label in (LABEL_FOREGROUND, LABEL_BACKGROUND):
        # +inf for the points of other labels, added to the distances rather than selected, so
        # that a batch with a constant label pattern does not fold a (B, N, grid, grid) constant.
        far = jnp.where(labels == label, 0.0, jnp.inf)[:, :, None, None]
        nearest = jnp.min(dy2[:, :, :, None] + dx2[:, :, None, :] + far, axis=1)  # (B, grid, grid)
        maps += [jnp.exp(-nearest / (2.0 * s * s)) for s in sigmas]

    def corner(label: int) -> jax.Array:  # (B, 2)
        return jnp.max(jnp.where((labels == label)[..., None], points, -jnp.inf), axis=1)

    top_left, bottom_right = corner(LABEL_BOX_TOP_LEFT), corner(LABEL_BOX_BOTTOM_RIGHT)
    inside_x = (centres[None] >= top_left[:, 0:1]) & (centres[None] <= bottom_right[:, 0:1])  # (B, grid)
    inside_y = (centres[None] >= top_left[:, 1:2]) & (centres[None] <= bottom_right[:, 1:2])
    maps.append((inside_y[:, :, None] & inside_x[:, None, :]).astype(jnp.float32))
    return jnp.stack(maps, axis=-1)
