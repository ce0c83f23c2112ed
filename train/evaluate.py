"""Interactive point and box evaluation, the SAM paper's protocol (Kirillov et al. 2023, sec. 7.1).

    results = evaluate(params, config, "sa1b_val/", num_clicks=5)
    print(format_table(results))

Per ground-truth mask (masks that are empty or cover more than 90% of the image dropped):

* click 1 at the mask pixel farthest from its boundary, multimask output; two scores:
  the "oracle" (the best of the 3 masks by IoU with the ground truth) and the "predicted"
  (the mask with the highest predicted IoU). `miou_1click` is the oracle value, and the
  oracle mask is the prediction the following clicks correct.
* clicks 2..K: at the centre (farthest-from-boundary pixel) of the largest connected error
  region of the previous prediction, positive on a false negative, negative on a false
  positive; the previous low-res logits as the mask prompt; single-mask output. A mask
  predicted without error gets no new click (its prompt is repeated).
* box: the mask's tight box (inclusive pixel extents) alone, single-mask output.

IoU is measured at the original image size, after the official postprocessing
(`postprocess_masks`, threshold `config.mask_threshold`). Clicks are pixel indices
(x, y) in the original image, moved to the model frame by `ResizeLongestSide`, as the
official predictor receives them.

Device work: each image is encoded once; its masks are decoded together as one prompt
batch (padded to a bucket of `PROMPT_BATCH_BUCKETS`, at most 64 per call) with N =
bucket(num_clicks + 1) point slots for clicks and box alike, decoder, postprocessing and
IoU under one jit: one compilation per (prompt bucket, multimask, image size). Click
placement (distance transforms, connected components) runs on the host.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from sam_jax.config import SamConfig
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.model import Params, encode, predict_masks
from sam_jax.predictor import PROMPT_BATCH_BUCKETS
from sam_jax.prompts import LABEL_BACKGROUND, LABEL_FOREGROUND, LABEL_PAD, Prompts, bucket_size, make_prompts
from sam_jax.train.losses import mask_iou
from sam_jax.train.sa1b import RleMasks, list_records, load_record, mask_areas
from sam_jax.train.shapes import inner_point
from sam_jax.transforms import ResizeLongestSide, preprocess

MAX_MASK_FRACTION = 0.9  # masks covering more of the image are dropped, as in training (paper, appendix A)
MAX_PROMPT_BATCH = PROMPT_BATCH_BUCKETS[-1]  # masks decoded per call; more are split into chunks


# --------------------------------------------------------------------------- IoU (host or device), clicks (host)


def usable_indices(masks: np.ndarray | RleMasks, limit: int | None = None) -> np.ndarray:
    """(M, H, W) bool (an array or `RleMasks`) -> indices of the non-empty masks covering at most
    90% of the image, the first `limit` of them in file order."""
    area = mask_areas(masks)
    return np.flatnonzero((area > 0) & (area <= MAX_MASK_FRACTION * masks.shape[1] * masks.shape[2]))[:limit]


def usable_masks(masks: np.ndarray | RleMasks, limit: int | None = None) -> np.ndarray:
    """(M, H, W) bool (an array or `RleMasks`: only these decoded) -> (M', H, W) bool: the masks
    of `usable_indices`."""
    return np.asarray(masks[usable_indices(masks, limit)], bool)


def farthest_point(region: np.ndarray) -> np.ndarray:
    """(H, W) bool, non-empty -> (2,) float32 (x, y): the pixel farthest from the region's
    boundary (the image border counts as boundary); the first in row-major order on ties."""
    rows, cols = ndimage.find_objects(region.astype(np.int8))[0]
    return np.asarray(inner_point(region, cols.start, cols.stop - 1, rows.start, rows.stop - 1), np.float32)


def _largest_component(region: np.ndarray) -> tuple[np.ndarray, int]:
    """(H, W) bool -> (its largest 4-connected component (H, W) bool, that component's size)."""
    labels, n = ndimage.label(region)
    if n == 0:
        return region, 0
    sizes = np.bincount(labels.ravel())[1:]
    best = int(np.argmax(sizes))
    return labels == best + 1, int(sizes[best])


def correction_click(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, int] | None:
    """pred, gt (H, W) bool -> ((x, y) (2,) float32, label) at the centre of the largest error
    region: label 1 on false negatives, 0 on false positives (false negatives win ties);
    None when pred equals gt."""
    fn, fn_size = _largest_component(gt & ~pred)
    fp, fp_size = _largest_component(pred & ~gt)
    if max(fn_size, fp_size) == 0:
        return None
    if fn_size >= fp_size:
        return farthest_point(fn), LABEL_FOREGROUND
    return farthest_point(fp), LABEL_BACKGROUND


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """(B, H, W) bool, each non-empty -> (B, 4) float32 x0, y0, x1, y1 (inclusive pixel extents)."""
    extents = (ndimage.find_objects(m.astype(np.int8))[0] for m in masks)  # (rows, cols) slices
    boxes = [(c.start, r.start, c.stop - 1, r.stop - 1) for r, c in extents]
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    """(B, ...) -> (n, ...) with copies of row 0 appended (n >= B)."""
    return np.concatenate([x, np.repeat(x[:1], n - len(x), axis=0)])


# --------------------------------------------------------------------------- device: encode, decode + score


def _encode_image(params: Params, image: jax.Array, *, config: SamConfig) -> ImageEmbeddings:
    """image (1, h, w, 3) uint8, resized (longest side = image_size) -> its `ImageEmbeddings` (batch 1)."""
    return encode(params, preprocess(image, config), config=config)


def _decode_and_score(
    params: Params,
    embedding: ImageEmbeddings,
    prompts: Prompts,
    gt: jax.Array,
    *,
    config: SamConfig,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    multimask_output: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One image's `ImageEmbeddings` (batch 1), B prompts, gt (B, H, W) bool -> IoU with gt (B, M),
    predicted IoU (B, M), and the oracle's (best IoU) mask (B, H, W) bool and low-res logits (B, m, m)."""
    masks, iou_pred, low_res = predict_masks(
        params,
        embedding,
        prompts,
        config=config,
        input_size=input_size,
        original_size=original_size,
        multimask_output=multimask_output,
        return_logits=False,
    )
    iou_gt = mask_iou(masks, gt[:, None])
    best = jnp.argmax(iou_gt, axis=1)
    rows = jnp.arange(gt.shape[0])
    return iou_gt, iou_pred, masks[rows, best], low_res[rows, best]


@functools.cache
def jitted_model(config: SamConfig) -> tuple[Callable, Callable]:
    """The jitted (encode, decode-and-score) for `config`, kept so that each compiles once."""
    enc = jax.jit(functools.partial(_encode_image, config=config))
    dec = jax.jit(
        functools.partial(_decode_and_score, config=config),
        static_argnames=("input_size", "original_size", "multimask_output"),
    )
    return enc, dec


# --------------------------------------------------------------------------- one image


def _scorer(params: Params, config: SamConfig, embedding: ImageEmbeddings, gt: jax.Array, sizes: dict) -> Callable:
    """-> score(prompts, multimask_output): `_decode_and_score` of one image's `ImageEmbeddings`
    and padded masks gt (Bp, H, W) bool; `sizes` holds its input_size and original_size."""
    dec = jitted_model(config)[1]

    def score(prompts: Prompts, multimask_output: bool) -> tuple[jax.Array, ...]:
        prompts = jax.tree.map(jnp.asarray, prompts)  # numpy and jax arguments would key two cache entries
        return dec(params, embedding, prompts, gt, multimask_output=multimask_output, **sizes)

    return score


def _click_ious(
    score: Callable,
    gt: np.ndarray,
    *,
    num_clicks: int,
    num_points: int,
    transform: ResizeLongestSide,
    config: SamConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """gt (B, H, W) bool -> IoU after each click (B, num_clicks) (click 1: the oracle's), and
    click 1's IoU of the mask with the highest predicted IoU (B,)."""
    b, bp = len(gt), bucket_size(len(gt), PROMPT_BATCH_BUCKETS)
    coords = np.zeros((b, num_clicks, 2), np.float32)
    labels = np.full((b, num_clicks), LABEL_PAD, np.int32)
    coords[:, 0] = [farthest_point(g) for g in gt]
    labels[:, 0] = LABEL_FOREGROUND
    counts = np.ones(b, np.int64)  # clicks placed per mask, in slots 0..count-1
    ious = np.zeros((b, num_clicks), np.float32)
    pred = low_res = predicted = None
    for k in range(num_clicks):
        if k:
            _add_corrections(pred, gt, coords, labels, counts)
        prompts = make_prompts(
            batch_size=bp,
            mask_size=config.low_res_mask_size,
            num_points=num_points,
            point_coords=pad_rows(transform.apply_coords(coords[:, : k + 1], gt.shape[1:]), bp),
            point_labels=pad_rows(labels[:, : k + 1], bp),
        )
        if low_res is not None:
            prompts = prompts.replace(mask_input=low_res, has_mask=np.ones((bp,), bool))
        iou_gt, iou_pred, pred, low_res = score(prompts, multimask_output=k == 0)
        iou_gt = np.asarray(iou_gt)[:b]
        ious[:, k] = iou_gt.max(axis=1)
        if k == 0:
            predicted = iou_gt[np.arange(b), np.argmax(np.asarray(iou_pred)[:b], axis=1)]
        if k + 1 < num_clicks:
            pred = np.asarray(pred)[:b]
    return ious, predicted


def _add_corrections(
    pred: np.ndarray, gt: np.ndarray, coords: np.ndarray, labels: np.ndarray, counts: np.ndarray
) -> None:
    """pred, gt (B, H, W) bool: append each mask's correction click (if any) to coords (B, K, 2),
    labels (B, K) at slot counts (B,), in place."""
    for i in range(len(gt)):
        click = correction_click(pred[i], gt[i])
        if click is not None:
            coords[i, counts[i]], labels[i, counts[i]] = click
            counts[i] += 1


def _box_ious(
    score: Callable, gt: np.ndarray, *, num_points: int, transform: ResizeLongestSide, config: SamConfig
) -> np.ndarray:
    """gt (B, H, W) bool -> IoU (B,) of the single mask predicted from each mask's tight box."""
    b, bp = len(gt), bucket_size(len(gt), PROMPT_BATCH_BUCKETS)
    boxes = transform.apply_boxes(tight_boxes(gt), gt.shape[1:])
    prompts = make_prompts(
        batch_size=bp, mask_size=config.low_res_mask_size, num_points=num_points, boxes=pad_rows(boxes, bp)
    )
    iou_gt, *_ = score(prompts, multimask_output=False)
    return np.asarray(iou_gt)[:b, 0]


def _evaluate_image(
    params: Params, config: SamConfig, image: np.ndarray, gt: np.ndarray, num_clicks: int
) -> dict[str, np.ndarray]:
    """image (H, W, 3) uint8, gt (B, H, W) bool -> per-mask IoUs: "clicks" (B, num_clicks),
    "predicted" (B,), "box" (B,)."""
    transform = ResizeLongestSide(config.image_size)
    resized = transform.apply_image(image)
    embedding = jitted_model(config)[0](params, jnp.asarray(resized)[None])
    sizes = dict(input_size=tuple(resized.shape[:2]), original_size=tuple(image.shape[:2]))
    kw = dict(num_points=bucket_size(num_clicks + 1), transform=transform, config=config)
    out: dict[str, list] = {"clicks": [], "predicted": [], "box": []}
    for start in range(0, len(gt), MAX_PROMPT_BATCH):
        chunk = gt[start : start + MAX_PROMPT_BATCH]
        padded = jnp.asarray(pad_rows(chunk, bucket_size(len(chunk), PROMPT_BATCH_BUCKETS)))
        score = _scorer(params, config, embedding, padded, sizes)  # the masks go to the device once
        clicks, predicted = _click_ious(score, chunk, num_clicks=num_clicks, **kw)
        out["clicks"].append(clicks)
        out["predicted"].append(predicted)
        out["box"].append(_box_ious(score, chunk, **kw))
    return {k: np.concatenate(v) for k, v in out.items()}


# --------------------------------------------------------------------------- public


def check_counts(num_clicks: int, max_images: int | None, max_masks_per_image: int | None) -> None:
    """Refuse counts of `evaluate` that are not integers >= 1 (the maxima may be None)."""
    for name, value, allow_none in (
        ("num_clicks", num_clicks, False),
        ("max_images", max_images, True),
        ("max_masks_per_image", max_masks_per_image, True),
    ):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1{' or None' if allow_none else ''}, got {value!r}")


def eval_records(
    data_dir: str | Path, num_clicks: int, max_images: int | None, max_masks_per_image: int | None
) -> list:
    """Validate `evaluate`'s arguments; -> the (image, json) records to read."""
    check_counts(num_clicks, max_images, max_masks_per_image)
    if not Path(data_dir).is_dir():
        raise ValueError(f"data_dir must be a folder of SA-1B records (NAME.jpg + NAME.json), got {str(data_dir)!r}")
    records = list_records(data_dir)
    if not records:
        raise ValueError(f"data_dir {str(data_dir)!r} holds no (image, json) records")
    return records[:max_images]


def read_records(data: Any, num_clicks: int, max_images: int | None, max_masks_per_image: int | None) -> Iterator:
    """The records `evaluate` scores: those of an SA-1B-layout folder (sorted by name), or of a record
    source (`train.sources`: `source[i]` a record or None, the unreadable ones skipped); the first `max_images`."""
    if isinstance(data, (str, os.PathLike)):
        for image_path, json_path in eval_records(data, num_clicks, max_images, max_masks_per_image):
            yield load_record(image_path, json_path)
        return
    check_counts(num_clicks, max_images, max_masks_per_image)
    records = (data[i] for i in range(len(data)))
    yield from itertools.islice((r for r in records if r is not None), max_images)


def evaluate(
    params: Params,
    config: SamConfig,
    data_dir: Any,
    *,
    num_clicks: int = 5,
    max_images: int | None = None,
    max_masks_per_image: int | None = None,
) -> dict[str, Any]:
    """mIoU of the interactive point protocol and of box prompts over an SA-1B-layout folder or a
    record source (`read_records`).

    Reads the first `max_images` records (sorted by name) and the first `max_masks_per_image`
    usable masks of each. Returns {"num_images", "num_masks", "num_clicks",
    "miou_1click_oracle", "miou_1click_predicted", "miou_{k}click" for k = 1..num_clicks
    ("miou_1click" is the oracle's), "miou_box", "per_click": [mIoU after click k]}.
    Images without usable masks are skipped (not counted).
    """
    per_image = []
    for record in read_records(data_dir, num_clicks, max_images, max_masks_per_image):
        gt = usable_masks(record["masks"], max_masks_per_image)
        if len(gt):
            per_image.append(_evaluate_image(params, config, record["image"], gt, num_clicks))
    if not per_image:
        where = str(getattr(data_dir, "root", data_dir))  # a folder, or a record source's root
        raise ValueError(f"data_dir {where!r} has no usable masks (non-empty, <= 90% of the image)")
    ious = {k: np.concatenate([r[k] for r in per_image]) for k in per_image[0]}
    per_click = [float(v) for v in ious["clicks"].mean(axis=0, dtype=np.float64)]
    return {
        "num_images": len(per_image),
        "num_masks": len(ious["box"]),
        "num_clicks": num_clicks,
        "miou_1click_oracle": per_click[0],
        "miou_1click_predicted": float(ious["predicted"].mean(dtype=np.float64)),
        **{f"miou_{k + 1}click": v for k, v in enumerate(per_click)},
        "miou_box": float(ious["box"].mean(dtype=np.float64)),
        "per_click": per_click,
    }


def grid_ceiling(data_dir: str | Path, image_size: int, mask_size: int, *, max_images: int | None = None) -> float:
    """The best held-out mIoU a model trained on a `mask_size` grid can expect from binary
    targets: each usable mask, in the model's frame (longest side `image_size`), block-averaged
    to the grid (a cell is inside when at least half of it is), upsampled bilinearly as
    inference upsamples logits, thresholded, and compared with the mask itself."""
    from sam_jax.train.data import target_masks
    from sam_jax.train.step import upsample_logits
    from sam_jax.transforms import get_preprocess_shape

    ious = []
    for image_path, json_path in eval_records(data_dir, 1, max_images, None):
        masks = usable_masks(load_record(image_path, json_path)["masks"])
        if not len(masks):
            continue
        h, w = get_preprocess_shape(*masks.shape[1:], image_size)
        full = target_masks(masks, (h, w), image_size, image_size)
        coarse = target_masks(masks, (h, w), image_size, mask_size).astype(np.float32) - 0.5
        ious.append(np.asarray(mask_iou(upsample_logits(jnp.asarray(coarse), image_size) > 0, jnp.asarray(full))))
    if not ious:
        raise ValueError(f"data_dir {str(data_dir)!r} has no usable masks (non-empty, <= 90% of the image)")
    return float(np.concatenate(ious).mean(dtype=np.float64))


def format_table(results: dict[str, Any]) -> str:
    """The results of `evaluate` as a small text table, one prompt kind a row."""
    rows = [("1 click (oracle)", results["miou_1click_oracle"])]
    rows.append(("1 click (predicted)", results["miou_1click_predicted"]))
    rows += [(f"{k} clicks", v) for k, v in enumerate(results["per_click"][1:], start=2)]
    rows.append(("box", results["miou_box"]))
    width = max(len(name) for name, _ in rows)
    lines = [f"{results['num_images']} images, {results['num_masks']} masks", f"{'prompt':<{width}}  mIoU"]
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in rows]
    return "\n".join(lines)
