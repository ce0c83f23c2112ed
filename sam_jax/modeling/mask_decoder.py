"""The mask decoder (official `modeling/mask_decoder.py`).

An IoU token and `num_multimask_outputs + 1` mask tokens are prepended to the
prompt tokens; the two-way transformer runs over them and the image; the image
is upscaled 4x and each mask token's hypernetwork MLP gives the weights of one
output mask. Masks (B, M, 4h, 4w) and IoU predictions (B, M), M = 1 + multimask.
A decoder with `click_map_sigmas` (not the official SAM) also adds to each mask a
token-weighted sum of maps drawn around the row's clicks (`PromptEncoder.click_maps`).
HQ-SAM's decoder (`MaskDecoderConfig.hq_token`) adds an HQ token and returns one mask
(`sam_jax.modeling.hq`). SAM 2's (`sam2/modeling/sam/mask_decoder.py`) puts an object-score token
first, may pass the IoU head through a sigmoid and, for a single mask at inference, falls back to
the best multimask output when mask 0 is unstable (`MaskDecoderConfig`'s SAM 2 options).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sam_jax.config import MaskDecoderConfig
from sam_jax.modeling import hq
from sam_jax.modeling.common import MLP, LayerNorm, accum_dtype, conv_transpose_2x2, dense, embedding, gelu
from sam_jax.modeling.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    config: MaskDecoderConfig
    transformer_dim: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        token_mask: jax.Array,
        multimask_output: bool | None,
        high_res: Any = None,
        text_rows: jax.Array | None = None,
        click_maps: jax.Array | None = None,
        interm: jax.Array | None = None,
        hq_token_only: bool = False,
        return_object_scores: bool = False,
    ) -> tuple[jax.Array, ...]:
        """Predict masks.

        image_embeddings (G, h, w, C) of G images for B prompt rows in G groups of B / G
        consecutive rows (G = 1: one image for every row); image_pe (1, h, w, C); sparse
        (B, N, C) with token_mask (B, N); dense (B or 1, h, w, C); high_res: None, or SAM 2's
        high-res features (s1 (G, 2h, 2w, C/4), s0 (G, 4h, 4w, C/8), `ImageEmbeddings.high_res`),
        added after each transposed conv of the upscaling, before its activation, without a
        copy per row. Returns masks (B, M, 4h, 4w) logits and
        IoU predictions (B, M): M = num_multimask_outputs masks 1.. if multimask_output,
        the single mask 0 if False, every output (mask 0 first) if None (training).

        text_rows (B,) bool, given by a model with text prompts (never by the official ones):
        the rows prompted by text take their mask tokens from `text_mask_tokens` instead. A
        caption's target is every shape of its kind, a point's or a box's one object; with
        shared tokens, text training pulled the point and box outputs towards the kind's union
        (docs/text-training.md, "Text rows have their own mask tokens").

        click_maps (B, 4h, 4w, K), given exactly when `config.click_map_sigmas` is set
        (`PromptEncoder.click_maps`): each mask token's `output_click_weights_i` (a zero-initialised
        linear layer) weighs the K maps, and the weighted sum is added to its mask logits.

        interm (G, h, w, D), given exactly when `config.hq_token` is set (HQ-SAM): the early ViT
        features (`ImageEmbeddings.interm`). The decoder then returns one mask, M = 1: the SAM
        mask (mask 0; with `multimask_output` the one of masks 1.. with the highest predicted IoU,
        and that IoU) plus the HQ mask, or the HQ mask alone with `hq_token_only`.

        SAM 2's options (`config.pred_obj_scores`, ...): with `return_object_scores` the decoder also
        returns the object score logits (B, 1) (10 without the object-score token, as SAM 2). With
        `dynamic_multimask_via_stability` and multimask_output False, a row whose mask 0 is unstable
        gets the best of masks 1.. (by predicted IoU) and its IoU instead.
        """
        cfg = self.config
        c = self.transformer_dim
        num_mask_tokens = cfg.num_multimask_outputs + 1
        iou_token = embedding(1, c, name="iou_token").embedding
        mask_tokens = embedding(num_mask_tokens, c, name="mask_tokens").embedding
        if (interm is None) == cfg.hq_token:
            raise ValueError(
                f"this decoder {'takes' if cfg.hq_token else 'takes no'} early ViT features (hq_token={cfg.hq_token}); "
                f"got {'none' if interm is None else tuple(interm.shape)}"
            )
        if hq_token_only and not cfg.hq_token:
            raise ValueError("hq_token_only needs an HQ-SAM model (a decoder with the HQ token)")
        if cfg.hq_token and return_object_scores:
            raise ValueError("the HQ-SAM decoder gives no object scores (return_object_scores is SAM 2's)")
        if cfg.hq_token and multimask_output is None:
            raise ValueError("the HQ-SAM decoder returns one mask: multimask_output must be True or False")
        # HQ-SAM's HQ token follows the mask tokens (`hf_token`).
        extra = [embedding(1, c, name="hf_token").embedding] if cfg.hq_token else []
        # SAM 2's object-score token comes first (`obj_score_token`): the others are shifted by s.
        head = [embedding(1, c, name="obj_score_token").embedding] if cfg.pred_obj_scores else []
        s = len(head)
        num_out = s + 1 + num_mask_tokens + len(extra)
        b, g = sparse_prompt_embeddings.shape[0], image_embeddings.shape[0]
        if b % g:
            raise ValueError(
                f"{b} prompt rows cannot be split evenly over {g} images "
                f"(image embeddings {tuple(image_embeddings.shape)})"
            )
        output_tokens = jnp.concatenate([*head, iou_token, mask_tokens, *extra])[None]
        output_tokens = jnp.broadcast_to(output_tokens, (b, num_out, c))
        if text_rows is not None:
            text_mask_tokens = embedding(num_mask_tokens, c, name="text_mask_tokens").embedding
            text_tokens = jnp.concatenate([*head, iou_token, text_mask_tokens, *extra])[None]
            output_tokens = jnp.where(text_rows.reshape(b, 1, 1), text_tokens, output_tokens)
        tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(output_tokens.dtype)], axis=1)
        mask = jnp.concatenate([jnp.ones((b, num_out), bool), token_mask], axis=1)

        features_hq = hq.hq_features(image_embeddings, interm, self.dtype) if cfg.hq_token else None
        if g not in (1, b):  # the transformer takes one image for all rows or one per row
            image_embeddings = jnp.repeat(image_embeddings, b // g, axis=0)
        src = (image_embeddings + dense_prompt_embeddings).astype(self.dtype)
        hs, src = TwoWayTransformer(
            cfg.transformer_depth,
            cfg.transformer_num_heads,
            cfg.transformer_mlp_dim,
            cfg.attention_downsample_rate,
            dtype=self.dtype,
            name="transformer",
        )(src, image_pe.astype(self.dtype), tokens.astype(self.dtype), mask)
        iou_token_out = hs[:, s, :]
        mask_tokens_out = hs[:, s + 1 : s + 1 + num_mask_tokens, :]

        # Output upscaling in the sub-pixel layout: each embedding cell keeps its 2x2 and then
        # 4x4 sub-pixels as extra axes (the transposed convs do not overlap and the norm and
        # GELU act per pixel), and only the final masks, not the c/8-channel features, are
        # interleaved into the (4h, 4w) grid. Same values as upscaling in place.
        h, w = image_embeddings.shape[1:3]
        x = src.reshape(b, h, w, c)
        x = conv_transpose_2x2(c // 4, dtype=self.dtype, name="output_upscaling_0")(x)  # (B, h, w, 2, 2, c/4)
        if high_res is not None:
            high_res = subpixel_high_res(*high_res)
            x = add_per_image(x, high_res[0])
        x = gelu(LayerNorm(1e-6, name="output_upscaling_1")(x))
        x = conv_transpose_2x2(c // 8, dtype=self.dtype, name="output_upscaling_3")(x)  # (B, h, w, 2, 2, 2, 2, c/8)
        if high_res is not None:
            x = add_per_image(x, high_res[1])
        x = gelu(x)

        hyper_in = jnp.stack(
            [
                MLP((c, c, c // 8), dtype=self.dtype, name=f"output_hypernetworks_mlps_{i}")(mask_tokens_out[:, i, :])
                for i in range(num_mask_tokens)
            ],
            axis=1,
        )  # (B, num_mask_tokens, c/8)
        hidden = (cfg.iou_head_hidden_dim,) * (cfg.iou_head_depth - 1)
        iou_pred = MLP((*hidden, num_mask_tokens), dtype=self.dtype, name="iou_prediction_head")(iou_token_out)
        iou_pred = iou_pred.astype(accum_dtype(self.dtype))
        if cfg.iou_prediction_use_sigmoid:
            iou_pred = jax.nn.sigmoid(iou_pred)
        # SAM 2's object score logits (B, 1): `pred_obj_score_head` on the object-score token, or 10.
        object_scores = jnp.full((b, 1), 10.0, iou_pred.dtype)
        if cfg.pred_obj_scores and cfg.pred_obj_scores_mlp:
            object_scores = MLP((c, c, 1), dtype=self.dtype, name="pred_obj_score_head")(hs[:, 0, :])
        elif cfg.pred_obj_scores:
            object_scores = dense(1, ("embed", None), dtype=self.dtype, name="pred_obj_score_head")(hs[:, 0, :])
        object_scores = object_scores.astype(iou_pred.dtype)
        # SAM 2's fallback for a single mask needs every output; it picks among them at the end.
        dynamic = multimask_output is False and cfg.dynamic_multimask_via_stability
        sl = slice(None) if multimask_output is None or dynamic else slice(1, None) if multimask_output else slice(0, 1)
        if cfg.hq_token:
            upscaled_hq = add_per_image(hq.mask_features(x, self.dtype), features_hq)
            masks_hq = hq.hq_mask(hs[:, 1 + num_mask_tokens, :], upscaled_hq, self.dtype)
            hyper_in, iou_pred = hq.select_sam_mask(hyper_in, iou_pred, multimask_output)
            if hq_token_only:
                return masks_hq, iou_pred
            sl = slice(None)
        # Only the returned masks are computed. Row 4i + 2a + a', column 4j + 2b + b'.
        masks = jnp.einsum("nmc,nhwabxyc->nmhaxwby", hyper_in[:, sl], x, preferred_element_type=accum_dtype(self.dtype))
        masks = masks.reshape(b, masks.shape[1], 4 * h, 4 * w)
        if (click_maps is None) != (cfg.num_click_maps == 0):
            raise ValueError(
                f"this decoder takes {cfg.num_click_maps} click maps (click_map_sigmas={cfg.click_map_sigmas}); "
                f"got {'none' if click_maps is None else tuple(click_maps.shape)}"
            )
        if click_maps is not None:
            if click_maps.shape != (b, 4 * h, 4 * w, cfg.num_click_maps):
                raise ValueError(
                    f"click maps {tuple(click_maps.shape)}, expected {(b, 4 * h, 4 * w, cfg.num_click_maps)}"
                )
            zeros = nn.initializers.zeros_init()
            click_weights = jnp.stack(
                [
                    dense(
                        cfg.num_click_maps,
                        ("embed", None),
                        dtype=self.dtype,
                        kernel_init=zeros,
                        name=f"output_click_weights_{i}",
                    )(mask_tokens_out[:, i, :])
                    for i in range(num_mask_tokens)
                ],
                axis=1,
            )  # (B, num_mask_tokens, K)
            masks = masks + jnp.einsum(
                "nmk,nhwk->nmhw",
                click_weights[:, sl],
                click_maps.astype(self.dtype),
                preferred_element_type=masks.dtype,
            )
        if cfg.hq_token:
            return masks + masks_hq, iou_pred
        iou_pred = iou_pred[:, sl]
        if dynamic:
            masks, iou_pred = dynamic_multimask_via_stability(
                masks, iou_pred, cfg.dynamic_multimask_stability_delta, cfg.dynamic_multimask_stability_thresh
            )
        return (masks, iou_pred, object_scores) if return_object_scores else (masks, iou_pred)


def stability_scores(mask_logits: jax.Array, delta: float) -> jax.Array:
    """SAM 2's stability of mask logits (..., H, W) -> (...,): pixels > delta over pixels > -delta
    (1 where none is > -delta)."""
    area_i = jnp.sum(mask_logits > delta, axis=(-2, -1)).astype(jnp.float32)
    area_u = jnp.sum(mask_logits > -delta, axis=(-2, -1)).astype(jnp.float32)
    return jnp.where(area_u > 0, area_i / jnp.maximum(area_u, 1.0), 1.0)


def dynamic_multimask_via_stability(
    masks: jax.Array, iou_pred: jax.Array, delta: float, thresh: float
) -> tuple[jax.Array, jax.Array]:
    """All outputs (B, M, H, W), (B, M) (mask 0 first) -> one mask (B, 1, H, W), (B, 1): mask 0 where its
    stability score is >= thresh, else the one of masks 1.. with the highest predicted IoU (SAM 2's
    `_dynamic_multimask_via_stability`)."""
    best = jnp.argmax(iou_pred[:, 1:], axis=-1) + 1  # (B,)
    best_masks = jnp.take_along_axis(masks, best[:, None, None, None], axis=1)
    best_iou = jnp.take_along_axis(iou_pred, best[:, None], axis=1)
    stable = stability_scores(masks[:, 0], delta) >= thresh  # (B,)
    return (
        jnp.where(stable[:, None, None, None], masks[:, :1], best_masks),
        jnp.where(stable[:, None], iou_pred[:, :1], best_iou),
    )


def subpixel_high_res(s1: jax.Array, s0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """High-res features in the upscaling's sub-pixel layout, one row per grid cell: s1 (G, 2h, 2w, C1)
    -> (G, h, w, a, b, C1), pixel (2i + a, 2j + b); s0 (G, 4h, 4w, C0) -> (G, h, w, a, b, x, y, C0),
    pixel (4i + 2a + x, 4j + 2b + y), as `conv_transpose_2x2` places its outputs."""
    g, h2, w2, c1 = s1.shape
    h, w = h2 // 2, w2 // 2
    s1 = s1.reshape(g, h, 2, w, 2, c1).transpose(0, 1, 3, 2, 4, 5)
    s0 = s0.reshape(g, h, 2, 2, w, 2, 2, s0.shape[-1]).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return s1, s0


def add_per_image(x: jax.Array, y: jax.Array) -> jax.Array:
    """x (B, ...) per prompt row plus y (G, ...) per image, rows in G groups of B / G: row r
    gets y[r // (B / G)], broadcast rather than copied (so its gradient is one sum per image)."""
    g = y.shape[0]
    return (x.reshape(g, x.shape[0] // g, *x.shape[1:]) + y[:, None].astype(x.dtype)).reshape(x.shape)
