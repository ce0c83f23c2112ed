"""The official PyTorch SAM (PyPI `segment-anything==1.0`): the reference of the parity tests and benchmarks.

Shared by `tests/` and `bench/`; it imports torch, so `bench/` imports it only inside the functions
that run the official side. `segment_anything/__init__.py` imports the predictor and the mask
generator, which need torchvision: the test extras pin torch 2.14.1 with torchvision 0.29.1, a
matching pair (see pyproject.toml). If the package is missing the import fails, and so do the
tests: the reference is never skipped.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import segment_anything
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, modeling

from sam_jax.config import TinyViTConfig


def build_official(config) -> modeling.Sam:
    """The official `Sam` built with a sam-jax config's hyperparameters (as `build_sam._build_sam`);
    for an HQ-SAM config HQ-SAM's (`bench.official_hq`), for a TinyViT config MobileSAM's
    (`bench.official_mobile_sam`)."""
    enc = config.image_encoder
    if config.mask_decoder.hq_token:
        from bench.official_hq import build_official_hq

        return build_official_hq(config)
    if isinstance(enc, TinyViTConfig):
        from bench.official_mobile_sam import build_official_mobile_sam

        return build_official_mobile_sam(config)
    return build_sam_around(modeling, official_vit(modeling, config), config)


def official_vit(package_modeling, config) -> torch.nn.Module:
    """`package_modeling.ImageEncoderViT` (segment_anything's, or HQ-SAM's, which also returns the early
    features) with a sam-jax ViT config's hyperparameters, as `build_sam._build_sam` makes it."""
    enc = config.image_encoder
    return package_modeling.ImageEncoderViT(
        depth=enc.depth,
        embed_dim=enc.embed_dim,
        img_size=enc.img_size,
        mlp_ratio=enc.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=enc.num_heads,
        patch_size=enc.patch_size,
        qkv_bias=enc.qkv_bias,
        use_abs_pos=enc.use_abs_pos,
        use_rel_pos=enc.use_rel_pos,
        global_attn_indexes=list(enc.global_attn_indexes),
        window_size=enc.window_size,
        out_chans=config.prompt_embed_dim,
    )


def build_sam_around(package_modeling, image_encoder: torch.nn.Module, config) -> torch.nn.Module:
    """`package_modeling.Sam` (segment_anything's or a family member's `modeling`) with this image
    encoder and the prompt encoder and mask decoder of a sam-jax config, in eval mode."""
    dec, e = config.mask_decoder, config.embedding_size
    m = package_modeling
    sam = m.Sam(
        image_encoder=image_encoder,
        prompt_encoder=m.PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(e, e),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.prompt_encoder.mask_in_chans,
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=dec.num_multimask_outputs,
            transformer=m.TwoWayTransformer(
                depth=dec.transformer_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=dec.transformer_mlp_dim,
                num_heads=dec.transformer_num_heads,
                attention_downsample_rate=dec.attention_downsample_rate,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=dec.iou_head_depth,
            iou_head_hidden_dim=dec.iou_head_hidden_dim,
        ),
        pixel_mean=list(config.pixel_mean),
        pixel_std=list(config.pixel_std),
    )
    return sam.eval()


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and persistent buffer a random value, in place.

    The official init leaves `pos_embed` and `rel_pos_*` at zero, which would hide
    bugs there; here nothing stays at its init. Norm scales stay near 1 and
    weights near PyTorch's default scale, so activations keep sane magnitudes.
    """
    g = torch.Generator().manual_seed(seed)
    tables = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, torch.nn.Embedding)}
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("positional_encoding_gaussian_matrix"):
                t.copy_(noise)
            elif leaf == "bias" or "rel_pos" in leaf or leaf == "pos_embed":
                t.copy_(0.1 * noise)
            elif leaf == "attention_biases":  # TinyViT's per-offset biases: large enough that a misplaced one shows
                t.copy_(noise)
            elif t.ndim == 1:  # norm weights
                t.copy_(1.0 + 0.1 * noise)
            elif name in tables:  # nn.Embedding tables
                t.copy_(noise)
            else:  # linear / conv weights: about PyTorch's default scale (std 0.58 / sqrt(fan_in))
                fan_in = t[0].numel() if t.ndim > 1 else t.numel()
                if name.startswith("mask_decoder.output_upscaling"):
                    fan_in = t.shape[0]  # ConvTranspose2d is (in, out, kH, kW)
                t.copy_(0.5 * noise / np.sqrt(fan_in))
    if not module.training:
        module.eval()  # refreshes what eval mode caches from the weights (TinyViT's gathered attention biases)
    return module


def sharpen_(
    model: modeling.Sam, pe_scale: float = 8.0, logit_scale: float = 100.0, iou_offset: float = 0.0
) -> modeling.Sam:
    """Make a randomized model's masks confident, in place.

    Random weights give near-zero, image-dominated logits: every point yields about the
    same mask, with stability ~0, so the mask generator keeps nothing. Sharper logits (the
    hypernetwork outputs x `logit_scale`) and higher-frequency positional encodings
    (x `pe_scale`) give confident, point-dependent masks; `iou_offset`, added to the
    predicted IoUs (the IoU head's last bias), lifts them over the generator's threshold.
    """
    with torch.no_grad():
        model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(pe_scale)
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[2].weight.mul_(logit_scale)
        model.mask_decoder.iou_prediction_head.layers[-1].bias.add_(iou_offset)
    return model


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def official_predictor(model: modeling.Sam) -> SamPredictor:
    return SamPredictor(model)


def official_mask_generator(model: modeling.Sam, **kwargs) -> SamAutomaticMaskGenerator:
    return SamAutomaticMaskGenerator(model, **kwargs)


__all__ = [
    "segment_anything",
    "modeling",
    "build_official",
    "build_sam_around",
    "randomize_",
    "sharpen_",
    "state_dict_numpy",
    "official_predictor",
    "official_mask_generator",
]
