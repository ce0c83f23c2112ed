"""`Sam`: image encoder + prompt encoder + mask decoder (official `modeling/sam.py`).

The Flax module has two entry points, used through `Sam.apply(..., method=...)`:
  encode(images (B, S, S, 3) normalized and padded) -> `ImageEmbeddings` (embedding (B, h, w, C))
  decode(`ImageEmbeddings` of B images, prompts with batch B) -> masks (B, M, 4h, 4w), iou (B, M)
HQ-SAM (`MaskDecoderConfig.hq_token`): the encoder (ViT or TinyViT) also returns its early features
(`ImageEmbeddings.interm`) and the decoder fuses them (`modeling.hq`).
Pre- and post-processing (normalize, pad, upsample) are plain functions in
`sam_jax.transforms`; the jitted functional core is `sam_jax.model`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from sam_jax.config import HieraConfig, SamConfig, TinyViTConfig
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.modeling.common import accum_dtype
from sam_jax.modeling.hiera import Sam2ImageEncoder
from sam_jax.modeling.image_encoder import ImageEncoderViT
from sam_jax.modeling.mask_decoder import MaskDecoder
from sam_jax.modeling.prompt_encoder import PromptEncoder
from sam_jax.modeling.sam2_video import VideoTensors
from sam_jax.modeling.tiny_vit import TinyViT
from sam_jax.prompts import Prompts


class Sam(nn.Module):
    config: SamConfig

    def setup(self) -> None:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        e = cfg.embedding_size
        if isinstance(cfg.image_encoder, HieraConfig):  # SAM 2: Hiera + FPN neck
            encoder_cls = Sam2ImageEncoder
        elif isinstance(cfg.image_encoder, TinyViTConfig):  # MobileSAM
            encoder_cls = TinyViT
        else:
            encoder_cls = ImageEncoderViT
        hq = {"interm": True} if cfg.mask_decoder.hq_token else {}  # HQ-SAM's early ViT features
        self.image_encoder = encoder_cls(cfg.image_encoder, out_chans=cfg.prompt_embed_dim, dtype=dtype, **hq)
        self.prompt_encoder = PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(e, e),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.prompt_encoder.mask_in_chans,
            pe_scale=cfg.prompt_encoder.pe_scale,
            text_embed_dim=cfg.prompt_encoder.text_embed_dim,
            box_corners_as_points=cfg.prompt_encoder.box_corners_as_points,
            dtype=dtype,
        )
        self.mask_decoder = MaskDecoder(cfg.mask_decoder, transformer_dim=cfg.prompt_embed_dim, dtype=dtype)
        if cfg.video_tensors:  # SAM 2's video-only tensors, unused here (`modeling.sam2_video`)
            self.video = VideoTensors()

    def encode(self, images: jax.Array, deterministic: bool = True) -> ImageEmbeddings:
        """images (B, S, S, 3), normalized and padded -> `ImageEmbeddings`, float32 (the embedding
        (B, h, w, C)). An image encoder returns `ImageEmbeddings`, or its embedding alone.

        `deterministic=False` applies the encoder's drop path (training; needs a "drop_path" rng).
        """
        out = self.image_encoder(images, deterministic)
        out = out if isinstance(out, ImageEmbeddings) else ImageEmbeddings(out)
        return out.astype(accum_dtype(self.image_encoder.dtype))

    def decode(
        self,
        embeddings: ImageEmbeddings,
        prompts: Prompts,
        multimask_output: bool | None = True,
        hq_token_only: bool = False,
        return_object_scores: bool = False,
    ) -> tuple[jax.Array, ...]:
        """`ImageEmbeddings` of G images and a prompt batch of size B -> masks (B, M, 4h, 4w),
        iou (B, M). The B rows are G groups of B / G consecutive rows, group g prompting image g
        (G = 1: one image for every row). HQ-SAM returns M = 1 mask, the HQ mask alone with
        `hq_token_only` (`MaskDecoder`). `return_object_scores` adds SAM 2's object score logits (B, 1)."""
        sparse, dense, mask = self.prompt_encoder(
            prompts.points, prompts.labels, prompts.mask_input, prompts.has_mask, prompts.text, prompts.text_mask
        )
        image_pe = self.prompt_encoder.get_dense_pe()[None]
        check_embeddings(embeddings, self.config)
        text_rows = None
        if self.config.prompt_encoder.text_embed_dim is not None:  # a text model: text rows have their own mask tokens
            # The token mask (B, N + M) lists the N point tokens, then the M text tokens (M = 0: no text).
            text_rows = mask[:, prompts.points.shape[1] :].any(axis=-1)
        maps = None
        if self.config.mask_decoder.click_map_sigmas:
            maps = self.prompt_encoder.click_maps(
                prompts.points, prompts.labels, self.config.mask_decoder.click_map_sigmas
            )
        return self.mask_decoder(
            embeddings.embedding,
            image_pe,
            sparse,
            dense,
            mask,
            multimask_output,
            embeddings.high_res,
            text_rows,
            maps,
            interm=embeddings.interm,
            hq_token_only=hq_token_only,
            return_object_scores=return_object_scores,
        )

    def __call__(
        self, images: jax.Array, prompts: Prompts, multimask_output: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Encode then decode one prompt per image (used to initialize every parameter)."""
        if self.config.video_tensors:
            self.video()
        return self.decode(self.encode(images), prompts, multimask_output)


def check_embeddings(embeddings: ImageEmbeddings, config: SamConfig) -> None:
    """Raise a ValueError naming the mismatch when `embeddings` were not made by a model of `config`."""
    if not isinstance(embeddings, ImageEmbeddings):
        raise TypeError(f"the decoder takes ImageEmbeddings (from encode), got {type(embeddings).__name__}")
    c, e = config.prompt_embed_dim, config.embedding_size
    if tuple(embeddings.embedding.shape[1:]) != (e, e, c):
        raise ValueError(
            f"image embeddings of shape {tuple(embeddings.embedding.shape)}: this model's are (B, {e}, {e}, {c}); "
            "were they computed by another model?"
        )
    high_res = config.image_encoder.high_res_channels > 0
    if (embeddings.high_res is not None) != high_res:
        want = "with" if high_res else "without"
        raise ValueError(
            f"this model's image embeddings come {want} high-res features; were they computed by another model?"
        )
    hq = config.mask_decoder.hq_token
    if (embeddings.interm is not None) != hq:
        want = "with" if hq else "without"
        raise ValueError(
            f"this model's image embeddings come {want} early ViT features (HQ-SAM's interm); were they computed "
            "by another model?"
        )
    if hq and tuple(embeddings.interm.shape) != (*embeddings.embedding.shape[:3], config.image_encoder.interm_dim):
        raise ValueError(
            f"early ViT features of shape {tuple(embeddings.interm.shape)} for image embeddings of shape "
            f"{tuple(embeddings.embedding.shape)}: they must have the same batch and grid, and this model's "
            f"{config.image_encoder.interm_dim} channels"
        )
