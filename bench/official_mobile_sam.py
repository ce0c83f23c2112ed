"""The official MobileSAM (PyPI `mobilesam-mirror==1.0.0`, package `mobile_sam`, needs timm): the
reference of the vit_t parity tests and benchmark.

Like `bench.official`, it imports torch and the reference at import: `bench/` imports it only inside
the functions that run the official side, and a missing package fails the tests, never skips them.
"""

from __future__ import annotations

import warnings

import torch

from bench.official import build_sam_around

with warnings.catch_warnings():  # timm's deprecated import paths and its model registry's renames
    warnings.simplefilter("ignore")
    import mobile_sam
    from mobile_sam import SamAutomaticMaskGenerator, SamPredictor, modeling


def official_merge_strides(embed_dims) -> tuple[int, ...]:
    """The strides of the official `PatchMerging`: 1 into widths 320, 448 and 576, else 2."""
    return tuple(1 if d in (320, 448, 576) else 2 for d in embed_dims[1:])


def official_tiny_vit(package_modeling, config) -> torch.nn.Module:
    """`package_modeling.TinyViT` (mobile_sam's, or segment_anything_hq's that also returns stage 1's
    output) with a sam-jax config's encoder hyperparameters (as `mobile_sam.build_sam_vit_t`).

    The official TinyViT fixes what sam-jax's config makes data: the merging strides (by width),
    each stage's grid (stage i at 1/2^i of the stem's, the last stage at the one before it), the
    64 x 64 grid of its output and the 256 channels of its neck. A config outside those is refused."""
    enc = config.image_encoder
    if enc.merge_strides != official_merge_strides(enc.embed_dims):
        raise ValueError(
            f"merge_strides {enc.merge_strides}: the official TinyViT takes {official_merge_strides(enc.embed_dims)} "
            f"for widths {enc.embed_dims}"
        )
    if len(enc.embed_dims) != 4 or enc.grid_size != 64 or config.prompt_embed_dim != 256:
        raise ValueError(
            "the official TinyViT has 4 stages, a 64 x 64 output grid and 256 output channels; got "
            f"{len(enc.embed_dims)} stages, grid {enc.grid_size}, {config.prompt_embed_dim} channels"
        )
    return package_modeling.TinyViT(
        img_size=enc.img_size,
        in_chans=3,
        num_classes=enc.num_classes,
        embed_dims=list(enc.embed_dims),
        depths=list(enc.depths),
        num_heads=list(enc.num_heads),
        window_sizes=list(enc.window_sizes),
        mlp_ratio=enc.mlp_ratio,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=enc.mbconv_expand_ratio,
        local_conv_size=enc.local_conv_size,
        layer_lr_decay=0.8,
    )


def build_official_mobile_sam(config) -> modeling.Sam:
    """MobileSAM's `Sam` with a sam-jax config's hyperparameters (as `mobile_sam.build_sam_vit_t`;
    the encoder as `official_tiny_vit` allows)."""
    return build_sam_around(modeling, official_tiny_vit(modeling, config), config)


def official_predictor(model: modeling.Sam) -> SamPredictor:
    return SamPredictor(model)


def official_mask_generator(model: modeling.Sam, **kwargs) -> SamAutomaticMaskGenerator:
    return SamAutomaticMaskGenerator(model, **kwargs)


__all__ = [
    "mobile_sam",
    "modeling",
    "official_merge_strides",
    "official_tiny_vit",
    "build_official_mobile_sam",
    "official_predictor",
    "official_mask_generator",
]
