"""HQ-SAM's additions to the mask decoder (official `segment_anything_hq/modeling/mask_decoder_hq.py`).

HQ-SAM keeps SAM's weights and adds an HQ output token (`hf_token`, after the mask tokens) with
its hypernetwork MLP (`hf_mlp`), and HQ features at the mask logits' resolution:
  hq_features = embedding_encoder(image embedding) + compress_vit_feat(early ViT features)
    (two 2x2 transposed convolutions each, LayerNorm2d and GELU between them; the early features,
    `ImageEmbeddings.interm`, are the output of the ViT's first global-attention block, or of
    TinyViT's stage 1 for Light HQ-SAM: `compress_vit_feat` takes their width, the official
    `vit_dim`, `config.image_encoder.interm_dim`)
  upscaled_hq = embedding_maskfeature(upscaled SAM features) + hq_features
    (two 3x3 convolutions, LayerNorm2d and GELU between them)
The HQ mask is `hf_mlp(HQ token) . upscaled_hq`. The decoder (`MaskDecoder` with
`MaskDecoderConfig.hq_token`) adds it to the SAM mask, or returns it alone (`hq_token_only`).

The functions here create their layers in the calling module's scope (`MaskDecoder`), under the
official attribute names (`compress_vit_feat_0` for `compress_vit_feat.0`, ...).

HQ-SAM's training (its official `train/train.py`, and `sam_jax.train`) updates the HQ layers alone
(`HQ_LAYERS`, `is_hq_param`); SAM's weights, encoder, prompt encoder and decoder, stay frozen.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sam_jax.modeling.common import MLP, LayerNorm, accum_dtype, conv, conv_transpose_2x2, gelu

# The layers HQ-SAM adds to SAM's mask decoder, by their names in params["mask_decoder"] (a
# sequential's layers suffixed _0, _1, _3): the only params HQ-SAM's training updates.
HQ_LAYERS = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")


def is_hq_param(names: tuple[str, ...]) -> bool:
    """Whether the param at path `names` (e.g. ("mask_decoder", "compress_vit_feat_0", "kernel")) belongs
    to an HQ layer (`HQ_LAYERS`)."""
    if len(names) < 2 or names[0] != "mask_decoder":
        return False
    base, _, index = names[1].rpartition("_")
    return names[1] in HQ_LAYERS or (index.isdigit() and base in HQ_LAYERS)


def interleave(x: jax.Array) -> jax.Array:
    """Features in the decoder's sub-pixel layout (B, h, w, 2, 2, 2, 2, C) (pixel (4i + 2a + x,
    4j + 2b + y) at [i, j, a, b, x, y]) -> the (B, 4h, 4w, C) grid."""
    b, h, w = x.shape[:3]
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, 4 * h, 4 * w, x.shape[-1])


def _upscale_4x(x: jax.Array, hidden: int, out: int, name: str, dtype: Any) -> jax.Array:
    """`name`.0 (2x2 transposed conv to `hidden`), .1 (LayerNorm2d), GELU, .3 (2x2 transposed conv to
    `out`): (G, h, w, C) -> (G, 4h, 4w, out)."""
    x = conv_transpose_2x2(hidden, dtype=dtype, name=f"{name}_0")(x)
    x = gelu(LayerNorm(1e-6, name=f"{name}_1")(x))
    return interleave(conv_transpose_2x2(out, dtype=dtype, name=f"{name}_3")(x))


def hq_features(image_embeddings: jax.Array, interm: jax.Array, dtype: Any) -> jax.Array:
    """image_embeddings (G, h, w, C), interm (G, h, w, D) (the encoder's early features) -> the HQ
    features (G, 4h, 4w, C/8), one per image."""
    c = image_embeddings.shape[-1]
    emb = _upscale_4x(image_embeddings.astype(dtype), c // 4, c // 8, "embedding_encoder", dtype)
    vit = _upscale_4x(interm.astype(dtype), c, c // 8, "compress_vit_feat", dtype)
    return emb + vit


def mask_features(upscaled: jax.Array, dtype: Any) -> jax.Array:
    """The upscaled SAM features in the sub-pixel layout (B, h, w, 2, 2, 2, 2, C/8) ->
    `embedding_maskfeature` of them (B, 4h, 4w, C/8), to which the caller adds the HQ features."""
    c8 = upscaled.shape[-1]
    x = conv(2 * c8, 3, padding=1, dtype=dtype, name="embedding_maskfeature_0")(interleave(upscaled))
    x = gelu(LayerNorm(1e-6, name="embedding_maskfeature_1")(x))
    return conv(c8, 3, padding=1, dtype=dtype, name="embedding_maskfeature_3")(x)


def hq_mask(hq_token_out: jax.Array, upscaled_hq: jax.Array, dtype: Any) -> jax.Array:
    """The HQ token after the transformer (B, C) and the HQ features (B, 4h, 4w, C/8) -> the HQ
    mask logits (B, 1, 4h, 4w)."""
    c = hq_token_out.shape[-1]
    hyper = MLP((c, c, c // 8), dtype=dtype, name="hf_mlp")(hq_token_out)
    return jnp.einsum("nc,nhwc->nhw", hyper, upscaled_hq.astype(dtype), preferred_element_type=accum_dtype(dtype))[
        :, None
    ]


def select_sam_mask(hyper_in: jax.Array, iou_pred: jax.Array, multimask_output: bool) -> tuple[jax.Array, jax.Array]:
    """The SAM output HQ-SAM returns beside its HQ mask: hyper_in (B, M, C/8) and IoU predictions
    (B, M) of SAM's M mask tokens -> the chosen token's (B, 1, C/8) and IoU (B, 1). With
    `multimask_output`, the token of masks 1.. with the highest predicted IoU (as officially,
    `torch.max`: the first on ties); without, mask 0."""
    if not multimask_output:
        return hyper_in[:, :1], iou_pred[:, :1]
    best = jnp.argmax(iou_pred[:, 1:], axis=1)[:, None] + 1  # (B, 1)
    return jnp.take_along_axis(hyper_in, best[..., None], axis=1), jnp.take_along_axis(iou_pred, best, axis=1)
