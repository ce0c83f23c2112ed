"""`SAM2AutomaticMaskGenerator`: SAM 2.1's "segment everything" (`sam2.automatic_mask_generator`), the
options, defaults and records of upstream's, on `SamAutomaticMaskGenerator`'s pipeline.

What differs from `SamAutomaticMaskGenerator` (everything else is its):
- crops are encoded and decoded by `SAM2ImagePredictor` (the crop resized to the square input, the
  grid's points scaled by 1024 / w and 1024 / h, masks upsampled straight to the crop's size);
- defaults: pred_iou_thresh 0.8; mask_threshold (0.0), multimask_output (True) and use_m2m (False:
  with it, each mask is decoded again from its point with its own low-res logits as the mask prompt)
  are arguments;
- the records' `point_coords` are the grid's points in float32, as upstream rounds them;
- min_mask_region_area: upstream fills holes and removes sprinkles in the low-res masks with its
  CUDA extension; it must be 0 here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.model import SamModel
from sam_jax.sam2_predictor import SAM2ImagePredictor


class SAM2AutomaticMaskGenerator(SamAutomaticMaskGenerator):
    points_dtype: Any = np.float32

    def __init__(
        self,
        model: SamModel,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        mask_threshold: float = 0.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        use_m2m: bool = False,
        multimask_output: bool = True,
    ) -> None:
        if min_mask_region_area > 0:
            raise ValueError("min_mask_region_area > 0 is not supported for SAM 2.1: give 0 (the default)")
        super().__init__(
            model,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers,
            crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            point_grids=point_grids,
            output_mode=output_mode,
            mask_threshold=mask_threshold,
            multimask_output=multimask_output,
            use_m2m=use_m2m,
        )

    @staticmethod
    def _make_predictor(model: SamModel, mask_threshold: float | None) -> SAM2ImagePredictor:
        return SAM2ImagePredictor(model, mask_threshold=0.0 if mask_threshold is None else mask_threshold)
