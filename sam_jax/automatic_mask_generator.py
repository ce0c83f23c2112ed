"""`SamAutomaticMaskGenerator`: "segment everything", with the official options, defaults and records.

For each crop (the whole image, plus zoomed crops with `crop_n_layers`), the crop is
encoded once and a grid of single-point prompts is decoded `points_per_batch` at a time.
Each batch runs as one jitted, fixed-shape step on the device: decode, upsample to the
crop, predicted-IoU and stability filters, mask -> box, the crop-edge filter. Only the
surviving masks leave the device, as RLE. Box NMS (jitted) runs within each crop, then
across crops; `min_mask_region_area` removes small holes and islands as officially.

Records: `segmentation` (per `output_mode`: "binary_mask", "uncompressed_rle" or
"coco_rle"), `area`, `bbox` (XYWH), `predicted_iou`, `point_coords`, `stability_score`,
`crop_box` (XYWH).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import amg
from sam_jax.config import SamConfig
from sam_jax.model import Params, SamModel, decode
from sam_jax.predictor import SamPredictor, check_image
from sam_jax.prompts import make_prompts
from sam_jax.transforms import postprocess_masks

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def process_point_batch(
    params: Params,
    embedding: jax.Array,
    points: jax.Array,
    valid: jax.Array,
    *,
    config: SamConfig,
    input_size: tuple[int, int],
    crop_box: tuple[int, int, int, int],
    orig_size: tuple[int, int],
    pred_iou_thresh: float,
    stability_score_thresh: float,
    stability_score_offset: float,
) -> dict[str, jax.Array]:
    """One batch of P single-point prompts on one crop, in fixed shapes.

    embedding (1, h, w, C); points (P, 2) in the resized crop's frame; valid (P,) bool
    (False for padding). Returns, for the 3P multimask outputs (point-major, as officially):
    masks (3P, Hc, Wc) bool at the crop size, iou_preds (3P,), stability_score (3P,),
    boxes (3P, 4) int32 XYXY in the crop, keep (3P,) bool.
    """
    p = points.shape[0]
    prompts = make_prompts(batch_size=p, mask_size=config.low_res_mask_size, num_points=2).without_masks()
    prompts = prompts.replace(
        points=jnp.zeros((p, 2, 2), jnp.float32).at[:, 0].set(points),
        labels=jnp.asarray(prompts.labels).at[:, 0].set(1),
    )
    # No mask prompts: the (1, h, w, C) embedding is shared by the P prompts (`TwoWayTransformer`).
    low_res, iou = decode(params, embedding, prompts, config=config, multimask_output=True)
    crop_hw = (crop_box[3] - crop_box[1], crop_box[2] - crop_box[0])
    logits = postprocess_masks(low_res, input_size, crop_hw, config.image_size)
    m = logits.shape[1]
    logits = logits.reshape(p * m, *crop_hw)
    iou = iou.reshape(p * m)
    keep = jnp.repeat(valid, m)
    if pred_iou_thresh > 0.0:
        keep &= iou > pred_iou_thresh
    stability = amg.calculate_stability_score(logits, config.mask_threshold, stability_score_offset)
    if stability_score_thresh > 0.0:
        keep &= stability >= stability_score_thresh
    masks = logits > config.mask_threshold
    boxes = amg.batched_mask_to_box(masks)
    keep &= ~amg.is_box_near_crop_edge(boxes, list(crop_box), [0, 0, orig_size[1], orig_size[0]])
    return {"masks": masks, "iou_preds": iou, "stability_score": stability, "boxes": boxes, "keep": keep}


class SamAutomaticMaskGenerator:
    def __init__(
        self,
        model: SamModel,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        if points_per_side is not None:
            self.point_grids = amg.build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = [np.asarray(g, np.float64) for g in point_grids]
            if len(self.point_grids) < crop_n_layers + 1:
                raise ValueError(
                    f"point_grids needs one grid per crop layer ({crop_n_layers + 1}), got {len(point_grids)}"
                )
        self.predictor = SamPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self._process = jax.jit(
            functools.partial(
                process_point_batch,
                config=model.config,
                pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh,
                stability_score_offset=stability_score_offset,
            ),
            static_argnames=("input_size", "crop_box", "orig_size"),
        )

    # ------------------------------------------------------------------ public

    def generate(self, image: np.ndarray, progress: Any = None) -> list[dict[str, Any]]:
        """All masks of one HxWx3 uint8 image, as a list of records (see the module docstring).

        progress: optional callable(done, total) called after each point batch.
        """
        image = check_image(image)
        data = self._generate_masks(image, progress)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        return self._records(data)

    def generate_batch(self, images: Sequence[np.ndarray], progress: Any = None) -> list[list[dict[str, Any]]]:
        """`generate` for each image; returns one record list per image."""
        return [self.generate(im, progress) for im in images]

    # ------------------------------------------------------------------ internals

    def _generate_masks(self, image: np.ndarray, progress: Any) -> dict[str, Any]:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = amg.generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        total = sum(-(-len(self.point_grids[i]) // self.points_per_batch) for i in layer_idxs)
        counter = [0, total, progress]
        parts = [self._process_crop(image, box, idx, orig_size, counter) for box, idx in zip(crop_boxes, layer_idxs)]
        data = _cat(parts)
        if len(crop_boxes) > 1 and len(data["rles"]):
            cb = data["crop_boxes"].astype(np.float64)
            scores = 1.0 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
            data = _take(data, amg.nms_indices(data["boxes"].astype(np.float32), scores, self.crop_nms_thresh))
        return data

    def _process_crop(self, image, crop_box, layer_idx, orig_size, counter) -> dict[str, Any]:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_hw = crop.shape[:2]
        self.predictor.set_image(crop)
        points_for_image = self.point_grids[layer_idx] * np.array(crop_hw)[None, ::-1]
        batches = []
        pb = self.points_per_batch
        for start in range(0, len(points_for_image), pb):
            points = points_for_image[start : start + pb]
            batches.append(self._process_batch(points, crop_hw, tuple(crop_box), orig_size))
            counter[0] += 1
            if counter[2] is not None:
                counter[2](counter[0], counter[1])
        self.predictor.reset_image()
        data = _cat(batches)
        if len(data["rles"]):
            data = _take(
                data, amg.nms_indices(data["boxes"].astype(np.float32), data["iou_preds"], self.box_nms_thresh)
            )
        data["boxes"] = amg.uncrop_boxes_xyxy(data["boxes"], list(crop_box))
        data["points"] = amg.uncrop_points(data["points"], list(crop_box))
        data["crop_boxes"] = np.tile(np.asarray(crop_box, np.int64), (len(data["rles"]), 1))
        return data

    def _process_batch(self, points: np.ndarray, crop_hw, crop_box, orig_size) -> dict[str, Any]:
        n, pb = len(points), self.points_per_batch
        transformed = self.predictor.transform.apply_coords(points, crop_hw)
        padded = np.zeros((pb, 2), np.float32)
        padded[:n] = transformed
        valid = np.arange(pb) < n
        out = self._process(
            self.model_params,
            self.predictor.features,
            padded,
            valid,
            input_size=tuple(self.predictor.input_size),
            crop_box=crop_box,
            orig_size=tuple(orig_size),
        )
        idx = np.flatnonzero(np.asarray(out["keep"]))
        masks = np.asarray(jnp.take(out["masks"], idx, axis=0)) if len(idx) else np.zeros((0, *crop_hw), bool)
        masks = amg.uncrop_masks(masks, list(crop_box), *orig_size)
        m = out["iou_preds"].shape[0] // pb
        return {
            "rles": amg.mask_to_rle(masks),
            "boxes": np.asarray(out["boxes"])[idx],
            "iou_preds": np.asarray(out["iou_preds"])[idx],
            "stability_score": np.asarray(out["stability_score"])[idx],
            "points": np.repeat(points, m, axis=0)[idx] if len(idx) else np.zeros((0, 2)),
        }

    @property
    def model_params(self) -> Params:
        return self.predictor.model.params

    @staticmethod
    def postprocess_small_regions(data: dict[str, Any], min_area: int, nms_thresh: float) -> dict[str, Any]:
        """Remove holes and islands under `min_area` px, then rerun box NMS preferring unchanged masks."""
        if len(data["rles"]) == 0:
            return data
        new_masks, scores = [], []
        for rle in data["rles"]:
            mask = amg.rle_to_mask(rle)
            mask, changed = amg.remove_small_regions(mask, min_area, mode="holes")
            unchanged = not changed
            mask, changed = amg.remove_small_regions(mask, min_area, mode="islands")
            new_masks.append(mask)
            scores.append(float(unchanged and not changed))
        masks = np.stack(new_masks)
        boxes = np.asarray(amg.batched_mask_to_box(jnp.asarray(masks)))
        keep = amg.nms_indices(boxes.astype(np.float32), np.asarray(scores), nms_thresh)
        data = {k: (list(v) if k == "rles" else v.copy()) for k, v in data.items()}
        for i in keep:
            if scores[i] == 0.0:
                data["rles"][i] = amg.mask_to_rle(masks[i][None])[0]
                data["boxes"][i] = boxes[i]
        return _take(data, keep)

    def _records(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        if self.output_mode == "coco_rle":
            segs = [amg.coco_encode_rle(rle) for rle in data["rles"]]
        elif self.output_mode == "binary_mask":
            segs = [amg.rle_to_mask(rle) for rle in data["rles"]]
        else:
            segs = data["rles"]
        return [
            {
                "segmentation": segs[i],
                "area": amg.area_from_rle(data["rles"][i]),
                "bbox": amg.box_xyxy_to_xywh(data["boxes"][i]).tolist(),
                "predicted_iou": float(data["iou_preds"][i]),
                "point_coords": [data["points"][i].tolist()],
                "stability_score": float(data["stability_score"][i]),
                "crop_box": amg.box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
            }
            for i in range(len(segs))
        ]


def _cat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in parts[0]:
        if key == "rles":
            out[key] = [r for p in parts for r in p[key]]
        else:
            out[key] = np.concatenate([p[key] for p in parts])
    return out


def _take(data: dict[str, Any], idx: np.ndarray) -> dict[str, Any]:
    return {k: ([v[i] for i in idx] if k == "rles" else v[idx]) for k, v in data.items()}
