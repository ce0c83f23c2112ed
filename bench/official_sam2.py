"""The official SAM 2.1 (PyPI `sam2==1.1.0`): the reference of the sam2.1_* parity tests and benchmarks.

Like `bench.official`, it imports torch and the reference at import: `bench/` imports it only inside
the functions that run the official side, and a missing package fails the tests, never skips them.
"""

from __future__ import annotations

import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.build_sam import build_sam2
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer
from sam2.sam2_image_predictor import SAM2ImagePredictor

# sam-jax registry name -> the official config of `build_sam2`.
OFFICIAL_CONFIGS = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def build_official_sam2(name: str, ckpt_path: str | None = None) -> torch.nn.Module:
    """The official `SAM2Base` of a registered SAM 2.1 model (`build_sam2`, eval mode, on the CPU)."""
    return build_sam2(OFFICIAL_CONFIGS[name], ckpt_path=ckpt_path, device="cpu")


class OfficialHeads(torch.nn.Module):
    """SAM 2's prompt encoder and mask decoder alone, with a sam-jax config's sizes (their state dict keys
    are `SAM2Base`'s: `sam_prompt_encoder.*`, `sam_mask_decoder.*`), as `SAM2Base._build_sam_heads`
    builds them (with `build_sam2`'s dynamic multimask settings), in eval mode."""

    def __init__(self, config) -> None:
        super().__init__()
        c, e, dec = config.prompt_embed_dim, config.embedding_size, config.mask_decoder
        self.sam_prompt_encoder = PromptEncoder(
            embed_dim=c,
            image_embedding_size=(e, e),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.prompt_encoder.mask_in_chans,
        )
        self.sam_mask_decoder = MaskDecoder(
            num_multimask_outputs=dec.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=dec.transformer_depth,
                embedding_dim=c,
                mlp_dim=dec.transformer_mlp_dim,
                num_heads=dec.transformer_num_heads,
            ),
            transformer_dim=c,
            iou_head_depth=dec.iou_head_depth,
            iou_head_hidden_dim=dec.iou_head_hidden_dim,
            use_high_res_features=True,
            iou_prediction_use_sigmoid=dec.iou_prediction_use_sigmoid,
            pred_obj_scores=dec.pred_obj_scores,
            pred_obj_scores_mlp=dec.pred_obj_scores_mlp,
            dynamic_multimask_via_stability=dec.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=dec.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=dec.dynamic_multimask_stability_thresh,
        )
        self.eval()


__all__ = [
    "OFFICIAL_CONFIGS",
    "OfficialHeads",
    "SAM2AutomaticMaskGenerator",
    "SAM2ImagePredictor",
    "build_official_sam2",
]
