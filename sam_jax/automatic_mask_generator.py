"""`SamAutomaticMaskGenerator`: "segment everything", with the official options, defaults and records.

For each crop (the whole image, plus zoomed crops with `crop_n_layers`), the crop is
encoded once and a grid of single-point prompts is decoded `points_per_batch` at a time
(`decode_point_batch`, one jitted step: low-res logits and predicted IoUs). The masks
that pass the predicted-IoU filter are then upsampled to the crop a few at a time
(`mask_levels`: about `CHUNK_PIXELS` output pixels per step, fused with the three
thresholds of the stability score, so no float logits at the crop's size are stored) and
reduced (`level_stats`, `level_boxes`: bool mask, stability score, box). Only the
surviving masks are run-length encoded on the host, chunk by chunk while the next chunk
is computed: the memory does not grow with points_per_batch x the image's pixels. Box
NMS runs within each crop, then across crops; `min_mask_region_area` removes small holes
and islands as officially.

Records: `segmentation` (per `output_mode`: "binary_mask", "uncompressed_rle" or
"coco_rle"), `area`, `bbox` (XYWH), `predicted_iou`, `point_coords`, `stability_score`,
`crop_box` (XYWH). When the filters leave no mask in an image, one warning (`logging`)
names the filter and the best value it saw.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import amg
from sam_jax.config import SamConfig
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.model import Params, SamModel
from sam_jax.predictor import SamPredictor, check_image, decode_prompts, default_decode_batch
from sam_jax.prompts import make_prompts
from sam_jax.transforms import CHUNK_PIXELS, upsample_logits

logger = logging.getLogger(__name__)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def decode_point_batch(
    params: Params,
    embedding: ImageEmbeddings,
    points: jax.Array,
    *,
    config: SamConfig,
    multimask_output: bool = True,
    use_m2m: bool = False,
    max_batch: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """P single-point prompts on one crop -> the 3P multimask outputs (point-major, as officially):
    low-res logits (3P, s, s) and predicted IoUs (3P,); HQ-SAM's P outputs, as `segment_anything_hq`'s
    generator (each the best SAM mask plus the HQ mask); P single masks without `multimask_output`.

    `use_m2m` (SAM 2's one-step refinement): each output is decoded again, a single mask, from its point
    and its own low-res logits (clamped to [-32, 32]) as the mask prompt.

    embedding: one crop's `ImageEmbeddings` (batch 1); points (P, 2) in the resized crop's frame;
    max_batch: prompts decoded together (`decode_prompts`).
    """
    p = points.shape[0]
    prompts = make_prompts(batch_size=p, mask_size=config.low_res_mask_size, num_points=2).without_masks()
    prompts = prompts.replace(
        points=jnp.zeros((p, 2, 2), jnp.float32).at[:, 0].set(points),
        labels=jnp.asarray(prompts.labels).at[:, 0].set(1),
    )
    # No mask prompts: the crop's embeddings are shared by the prompts (`TwoWayTransformer`),
    # decoded a sub-batch at a time (`decode_prompts`).
    low_res, iou = decode_prompts(
        params, embedding, prompts, config=config, multimask_output=multimask_output, max_batch=max_batch
    )
    low_res, iou = low_res.reshape(-1, *low_res.shape[2:]), iou.reshape(-1)
    if use_m2m:
        m = low_res.shape[0] // p
        refine = jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), m, axis=0), prompts)
        refine = refine.replace(mask_input=jnp.clip(low_res, -32.0, 32.0), has_mask=jnp.ones((p * m,), bool))
        low_res, iou = decode_prompts(
            params, embedding, refine, config=config, multimask_output=False, max_batch=max_batch
        )
        low_res, iou = low_res.reshape(-1, *low_res.shape[2:]), iou.reshape(-1)
    return low_res, iou


def mask_levels(
    low_res: jax.Array,
    index: jax.Array,
    *,
    input_size: tuple[int, int],
    crop_size: tuple[int, int],
    image_size: int,
    thresholds: tuple[float, float, float],
) -> jax.Array:
    """Masks `index` (k,) of low-res logits (N, s, s) -> their levels at the crop size, transposed:
    (k, Wc, Hp) int8, bit 0 logits > thresholds[0], bit 1 > thresholds[1], bit 2 > thresholds[2];
    Hp is Hc rounded up to a multiple of 4, the extra columns 0.

    The logits are upsampled as `postprocess_masks` does (to (Hc, Wc) = crop_size), transposed
    (the column-major order of the official RLE) and compared in one pass: only the int8 levels
    are stored.
    """
    lo, mid, hi = thresholds
    pad = -crop_size[0] % 4

    def one(low: jax.Array) -> jax.Array:
        logits_t = upsample_logits(low.T, input_size[::-1], crop_size[::-1], image_size, pad_width=pad)
        return (
            (logits_t > lo).astype(jnp.int8)
            | ((logits_t > mid).astype(jnp.int8) << 1)
            | ((logits_t > hi).astype(jnp.int8) << 2)
        )

    return jax.vmap(one)(low_res[index])


def level_stats(levels: jax.Array, *, height: int) -> dict[str, jax.Array]:
    """Levels (k, Wc, Hp) of `mask_levels` (thresholds: mask - offset, mask, mask + offset; the
    crop's height Hc = `height`) -> masks_t (k, Wc, Hc) bool (the transposed masks) and
    stability_score (k,) float32 (IoU of the masks at the two offset thresholds, as
    `amg.calculate_stability_score`).

    The two pixel counts are exact: each 4 levels are read as one uint32 word, whose bits 0
    and 2 are counted (`population_count`); a row's two counts share one int32 sum (16 bits
    each, so Hp < 2**15), then the rows are summed. XLA:CPU runs this one reduction about ten
    times faster than two sums of converted booleans.
    """
    k, w, hp = levels.shape
    words = jax.lax.bitcast_convert_type(levels.reshape(k, w, hp // 4, 4), jnp.uint32)
    if hp < 2**15:
        both = jax.lax.population_count(words & 0x01010101) + (jax.lax.population_count(words & 0x04040404) << 16)
        rows = jnp.sum(both.astype(jnp.int32), axis=2)  # (k, Wc): low count + high count << 16
        low = jnp.sum(rows & 0xFFFF, axis=1)
        high = jnp.sum(rows >> 16, axis=1)
    else:
        low = jnp.sum(jax.lax.population_count(words & 0x01010101).astype(jnp.int32), axis=(1, 2))
        high = jnp.sum(jax.lax.population_count(words & 0x04040404).astype(jnp.int32), axis=(1, 2))
    return {
        "masks_t": (levels[:, :, :height] & 2) != 0,
        "stability_score": high.astype(jnp.float32) / low.astype(jnp.float32),
    }


def level_boxes(levels: jax.Array, *, height: int) -> jax.Array:
    """Levels (k, Wc, Hp) of `mask_levels` -> the boxes of their masks (bit 1), (k, 4) int32 XYXY
    in the crop (`amg.batched_mask_to_box`), from OR-reductions of uint32 words of 4 levels.
    (A separate step: XLA:CPU fuses it with `level_stats` into a much slower kernel.)"""
    k, w, hp = levels.shape
    mask_bits = jax.lax.bitcast_convert_type(levels.reshape(k, w, hp // 4, 4), jnp.uint32) & 0x02020202
    cols = jnp.max(mask_bits, axis=2) != 0  # (k, Wc): any pixel in column x
    row_words = jax.lax.reduce(mask_bits, np.uint32(0), jax.lax.bitwise_or, (1,))  # (k, Hp / 4): OR over x
    rows = jax.lax.bitcast_convert_type(row_words, jnp.int8).reshape(k, hp)[:, :height] != 0
    return amg.box_from_projections(rows, cols)


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
        *,
        mask_threshold: float | None = None,
        multimask_output: bool = True,
        use_m2m: bool = False,
    ) -> None:
        """The official arguments, and: mask_threshold (None: the model's), multimask_output (False: one
        mask per point), use_m2m (SAM 2's refinement of each mask with itself as the mask prompt)."""
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
        self.predictor = self._make_predictor(model, mask_threshold)
        self.mask_threshold = self.predictor.mask_threshold
        self.multimask_output = bool(multimask_output)
        self.use_m2m = bool(use_m2m)
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
        config = model.config
        self._decode = jax.jit(
            functools.partial(
                decode_point_batch,
                config=config,
                multimask_output=self.multimask_output,
                use_m2m=self.use_m2m,
                max_batch=default_decode_batch(model.params),
            )
        )
        self._levels = jax.jit(
            functools.partial(
                mask_levels,
                image_size=self.predictor.postprocess_size,
                thresholds=(
                    self.mask_threshold - stability_score_offset,
                    self.mask_threshold,
                    self.mask_threshold + stability_score_offset,
                ),
            ),
            static_argnames=("input_size", "crop_size"),
        )
        self._stats = jax.jit(level_stats, static_argnames="height")
        self._boxes = jax.jit(level_boxes, static_argnames="height")

    # Points as the records give them (`point_coords`): the grid's float64 values, as officially.
    points_dtype: Any = np.float64

    @staticmethod
    def _make_predictor(model: SamModel, mask_threshold: float | None) -> SamPredictor:
        predictor = SamPredictor(model)
        if mask_threshold is not None:
            predictor.mask_threshold = float(mask_threshold)
        return predictor

    # ------------------------------------------------------------------ public

    def generate(self, image: np.ndarray, progress: Any = None) -> list[dict[str, Any]]:
        """All masks of one HxWx3 uint8 image, as a list of records (see the module docstring).

        progress: optional callable(done, total) called after each point batch.
        """
        image = check_image(image)
        filters = _FilterCounts()
        data = self._generate_masks(image, progress, filters)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        if not data["rles"]:
            filters.warn(self.pred_iou_thresh, self.stability_score_thresh)
        return self._records(data)

    def generate_batch(self, images: Sequence[np.ndarray], progress: Any = None) -> list[list[dict[str, Any]]]:
        """`generate` for each image; returns one record list per image."""
        return [self.generate(im, progress) for im in images]

    # ------------------------------------------------------------------ internals

    def _generate_masks(self, image: np.ndarray, progress: Any, filters: _FilterCounts) -> dict[str, Any]:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = amg.generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        total = sum(-(-len(self.point_grids[i]) // self.points_per_batch) for i in layer_idxs)
        counter = [0, total, progress]
        parts = [
            self._process_crop(image, box, idx, orig_size, counter, filters) for box, idx in zip(crop_boxes, layer_idxs)
        ]
        data = _cat(parts)
        if len(crop_boxes) > 1 and len(data["rles"]):
            cb = data["crop_boxes"].astype(np.float64)
            scores = 1.0 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
            data = _take(data, amg.nms_indices(data["boxes"].astype(np.float32), scores, self.crop_nms_thresh))
        return data

    def _process_crop(self, image, crop_box, layer_idx, orig_size, counter, filters) -> dict[str, Any]:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_hw = crop.shape[:2]
        self.predictor.set_image(crop)
        points_for_image = (self.point_grids[layer_idx] * np.array(crop_hw)[None, ::-1]).astype(self.points_dtype)
        out = _CropMasks(tuple(crop_box), tuple(orig_size), self.stability_score_thresh, filters)
        pb = self.points_per_batch
        # One chunk of masks per step: about CHUNK_PIXELS pixels at the crop's size.
        k = max(1, min(3 * pb, CHUNK_PIXELS // (crop_hw[0] * crop_hw[1])))
        pending = None  # a chunk dispatched to the device, read back after the next one is dispatched
        for start in range(0, len(points_for_image), pb):
            points = points_for_image[start : start + pb]
            for chunk in self._point_batch_chunks(points, crop_hw, k, filters):
                if pending is not None:
                    out.add(*pending)
                pending = chunk
            counter[0] += 1
            if counter[2] is not None:
                counter[2](counter[0], counter[1])
        if pending is not None:
            out.add(*pending)
        self.predictor.reset_image()
        data = out.data()
        if len(data["rles"]):
            data = _take(
                data, amg.nms_indices(data["boxes"].astype(np.float32), data["iou_preds"], self.box_nms_thresh)
            )
        data["boxes"] = amg.uncrop_boxes_xyxy(data["boxes"], list(crop_box))
        data["points"] = amg.uncrop_points(data["points"], list(crop_box))
        data["crop_boxes"] = np.tile(np.asarray(crop_box, np.int64), (len(data["rles"]), 1))
        return data

    def _point_batch_chunks(self, points: np.ndarray, crop_hw, k: int, filters: _FilterCounts):
        """Decode one batch of points, then yield its masks that pass the predicted-IoU filter in
        chunks of k, each as (points (n, 2), predicted IoUs (n,), the chunk's device results), with
        its device work dispatched (not finished)."""
        n, pb = len(points), self.points_per_batch
        padded = np.zeros((pb, 2), np.float32)
        padded[:n] = self.predictor.transform.apply_coords(points, crop_hw)
        low_res, iou = self._decode(self.model_params, self.predictor.features, padded)
        m = iou.shape[0] // pb
        iou = np.asarray(iou)[: n * m]  # the padding points' masks are dropped here
        candidates = np.flatnonzero(iou > self.pred_iou_thresh) if self.pred_iou_thresh > 0.0 else np.arange(n * m)
        filters.decoded(iou, len(candidates))
        for first in range(0, len(candidates), k):
            idx = candidates[first : first + k]
            index = np.full(k, idx[-1], np.int32)
            index[: len(idx)] = idx
            levels = self._levels(low_res, index, input_size=tuple(self.predictor.input_size), crop_size=tuple(crop_hw))
            stats = {**self._stats(levels, height=crop_hw[0]), "boxes": self._boxes(levels, height=crop_hw[0])}
            yield points[idx // m], iou[idx], stats

    @property
    def model_params(self) -> Params:
        return self.predictor.model.params

    @staticmethod
    def postprocess_small_regions(data: dict[str, Any], min_area: int, nms_thresh: float) -> dict[str, Any]:
        """Remove holes and islands under `min_area` px, then rerun box NMS preferring unchanged masks."""
        if len(data["rles"]) == 0:
            return data
        # One mask at a time (never all of them decoded at once); as officially, NMS runs on the
        # boxes of the new masks, and the RLE and box of a changed mask are replaced.
        rles, boxes, new_boxes, scores = list(data["rles"]), data["boxes"].copy(), [], []
        for i, rle in enumerate(data["rles"]):
            mask = amg.rle_to_mask(rle)
            mask, changed = amg.remove_small_regions(mask, min_area, mode="holes")
            unchanged = not changed
            mask, changed = amg.remove_small_regions(mask, min_area, mode="islands")
            unchanged = unchanged and not changed
            new_boxes.append(amg.mask_to_box_np(mask))
            scores.append(float(unchanged))
            if not unchanged:
                rles[i] = amg.transposed_mask_to_rle(mask.T, as_list=False)
                boxes[i] = new_boxes[-1]
        keep = amg.nms_indices(np.stack(new_boxes).astype(np.float32), np.asarray(scores), nms_thresh)
        return _take({**data, "rles": rles, "boxes": boxes}, keep)

    def _records(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        data = {**data, "rles": [amg.rle_counts_to_list(rle) for rle in data["rles"]]}
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


class _CropMasks:
    """The surviving masks of one crop, gathered chunk by chunk: RLEs of the masks that pass the
    stability and crop-edge filters (in the image's frame), and their boxes, scores and points."""

    def __init__(
        self, crop_box: tuple[int, int, int, int], orig_size: tuple[int, int], thresh: float, filters: _FilterCounts
    ) -> None:
        self.crop_box, self.orig_size, self.thresh, self.filters = crop_box, orig_size, thresh, filters
        x0, y0, x1, y1 = crop_box
        h, w = orig_size
        # A crop's masks are placed in a zero (W, H) image to encode them in the image's frame.
        self._canvas = None if (x0, y0, x1, y1) == (0, 0, w, h) else np.zeros((w, h), bool)
        self.rles: list[dict[str, Any]] = []
        self.boxes, self.iou_preds, self.stability, self.points = [], [], [], []

    def add(self, points: np.ndarray, iou: np.ndarray, stats: dict[str, jax.Array]) -> None:
        n = len(iou)
        boxes = np.asarray(stats["boxes"])[:n]
        keep = ~amg.is_box_near_crop_edge(boxes, list(self.crop_box), [0, 0, self.orig_size[1], self.orig_size[0]])
        stability = np.asarray(stats["stability_score"])[:n]
        self.filters.stability(stability, self.thresh)
        if self.thresh > 0.0:
            keep &= stability >= self.thresh
        idx = np.flatnonzero(keep)
        if not len(idx):
            return
        masks_t = np.asarray(stats["masks_t"])
        x0, y0, x1, y1 = self.crop_box
        for i in idx:
            if self._canvas is None:
                self.rles.append(amg.transposed_mask_to_rle(masks_t[i], as_list=False))
            else:
                self._canvas[x0:x1, y0:y1] = masks_t[i]
                self.rles.append(amg.transposed_mask_to_rle(self._canvas, as_list=False))
        self.boxes.append(boxes[idx])
        self.iou_preds.append(iou[idx])
        self.stability.append(stability[idx])
        self.points.append(points[idx])

    def data(self) -> dict[str, Any]:
        def cat(parts: list[np.ndarray], shape: tuple[int, ...], dtype) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(shape, dtype)

        return {
            "rles": self.rles,
            "boxes": cat(self.boxes, (0, 4), np.int32),
            "iou_preds": cat(self.iou_preds, (0,), np.float32),
            "stability_score": cat(self.stability, (0,), np.float32),
            "points": cat(self.points, (0, 2), np.float64),
        }


class _FilterCounts:
    """What the filters of one image saw: the masks decoded, those passing the predicted-IoU
    filter, the best predicted IoU and the best stability score among those."""

    def __init__(self) -> None:
        self.masks = self.passed_iou = self.passed_stability = 0
        self.best_iou = self.best_stability = -np.inf

    def decoded(self, iou: np.ndarray, passed: int) -> None:
        self.masks += len(iou)
        self.passed_iou += passed
        if len(iou):
            self.best_iou = max(self.best_iou, float(np.max(iou)))

    def stability(self, scores: np.ndarray, thresh: float) -> None:
        finite = scores[np.isfinite(scores)]
        if len(finite):
            self.best_stability = max(self.best_stability, float(np.max(finite)))
        self.passed_stability += int(np.sum(scores >= thresh)) if thresh > 0.0 else len(scores)

    def warn(self, pred_iou_thresh: float, stability_score_thresh: float) -> None:
        """Log why no mask of the image is left (nothing when no mask was decoded)."""
        if self.masks == 0:
            return
        if self.passed_iou == 0:
            logger.warning(
                "0 of %d masks passed pred_iou_thresh=%g (highest predicted IoU %.3g)",
                self.masks,
                pred_iou_thresh,
                self.best_iou,
            )
        elif self.passed_stability == 0:
            logger.warning(
                "0 of %d masks passed stability_score_thresh=%g (highest stability score %.3g among the %d "
                "that passed pred_iou_thresh=%g)",
                self.masks,
                stability_score_thresh,
                self.best_stability,
                self.passed_iou,
                pred_iou_thresh,
            )
        else:
            logger.warning(
                "0 of %d masks kept: the %d that passed pred_iou_thresh=%g and stability_score_thresh=%g all "
                "touch a crop edge",
                self.masks,
                self.passed_stability,
                pred_iou_thresh,
                stability_score_thresh,
            )
