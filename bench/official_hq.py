"""The official HQ-SAM (PyPI `segment-anything-hq==0.3`, package `segment_anything_hq`): the reference
of the vit_*_hq parity tests.

Like `bench.official`, it imports torch and the reference at import: `bench/` imports it only inside
the functions that run the official side, and a missing package fails the tests, never skips them.
"""

from __future__ import annotations

import warnings

from bench.official import build_sam_around, official_vit
from sam_jax.config import TinyViTConfig

with warnings.catch_warnings():  # its TinyViT's timm imports and model registry names (shared with mobile_sam)
    warnings.simplefilter("ignore")
    import segment_anything_hq
    from segment_anything_hq import SamAutomaticMaskGenerator, SamPredictor, modeling


def build_official_hq(config) -> modeling.Sam:
    """HQ-SAM's `Sam` with a sam-jax config's hyperparameters (as `segment_anything_hq.build_sam._build_sam`;
    Light HQ-SAM for a TinyViT config, as its `build_sam_vit_t`), in eval mode. Its image encoder returns
    (embedding, early features: the ViT's global-attention blocks' outputs, or TinyViT's stage-1 output)."""
    enc, dec = config.image_encoder, config.mask_decoder
    if not dec.hq_token:
        raise ValueError(f"{config.name} is not an HQ-SAM config (mask_decoder.hq_token is False)")
    if isinstance(enc, TinyViTConfig):  # Light HQ-SAM (as `segment_anything_hq.build_sam.build_sam_vit_t`)
        from bench.official_mobile_sam import official_tiny_vit

        image_encoder = official_tiny_vit(modeling, config)
    else:
        image_encoder = official_vit(modeling, config)
    sam = build_sam_around(modeling, image_encoder, config)  # with SAM's decoder, replaced by the HQ one
    sam.mask_decoder = modeling.MaskDecoderHQ(
        transformer=sam.mask_decoder.transformer,
        transformer_dim=config.prompt_embed_dim,
        num_multimask_outputs=dec.num_multimask_outputs,
        iou_head_depth=dec.iou_head_depth,
        iou_head_hidden_dim=dec.iou_head_hidden_dim,
        vit_dim=enc.interm_dim,
    )
    return sam.eval()


def official_predictor(model: modeling.Sam) -> SamPredictor:
    return SamPredictor(model)


def official_mask_generator(model: modeling.Sam, **kwargs) -> SamAutomaticMaskGenerator:
    return SamAutomaticMaskGenerator(model, **kwargs)


__all__ = [
    "segment_anything_hq",
    "modeling",
    "build_official_hq",
    "official_predictor",
    "official_mask_generator",
]
