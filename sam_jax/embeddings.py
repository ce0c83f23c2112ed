"""What the image encoder hands the mask decoder: `ImageEmbeddings`, a pytree.

  embedding  (B, h, w, C) float32  the image embedding (C = prompt_embed_dim, h = w = 64 for
                                   the official models)
  high_res   None, or (s1 (B, 2h, 2w, C/4), s0 (B, 4h, 4w, C/8)) float32: features at twice
                                   and four times the grid's resolution, added in the mask
                                   decoder's upscaling (SAM 2's `use_high_res_features_in_sam`;
                                   `ImageEncoderConfig.high_res_channels`)
  interm     None, or (B, h, w, D) float32: the output of the ViT's first global-attention block
                                   (or of TinyViT's stage 1; D = `image_encoder.interm_dim`), the
                                   early features HQ-SAM's decoder fuses with the embedding
                                   (`MaskDecoderConfig.hq_token`)

Being a pytree, it passes through `jax.jit`, `jax.tree.map` (slicing, stacking, caching on
disk) and shardings like an array; its leaves all have the batch axis first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ImageEmbeddings:
    embedding: jax.Array
    high_res: tuple[jax.Array, jax.Array] | None = None
    interm: jax.Array | None = None

    @property
    def batch_size(self) -> int:
        return self.embedding.shape[0]

    def select(self, start: int, stop: int | None = None) -> ImageEmbeddings:
        """Images start..stop-1 (stop None: image `start` alone), batch axis kept."""
        stop = start + 1 if stop is None else stop
        return jax.tree.map(lambda x: x[start:stop], self)

    def broadcast_to(self, batch_size: int) -> ImageEmbeddings:
        """One image's embeddings (batch 1) repeated for `batch_size` rows (no copy under jit)."""
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch_size, *x.shape[1:])), self)

    def astype(self, dtype) -> ImageEmbeddings:
        return jax.tree.map(lambda x: x.astype(dtype), self)
