"""Utilities of the automatic mask generator, as the official `segment_anything/utils/amg.py`.

Same semantics as the official functions; where they run:

- Device (JAX, fixed shapes, jittable): `calculate_stability_score`,
  `batched_mask_to_box` (and `box_from_projections`), `batched_nms`.
- Either: `is_box_near_crop_edge`, `uncrop_boxes_xyxy`, `uncrop_points`, `uncrop_masks` return the kind of
  array they are given (numpy in, numpy out; a JAX array or tracer in, JAX out).
- Host (numpy / python, building the output records): point grids, crop boxes,
  `box_xyxy_to_xywh`, `mask_to_box_np`, RLE encoding (also of a transposed mask,
  `transposed_mask_to_rle`) and decoding, `remove_small_regions`, and
  `nms_indices` (the kept indices of `batched_nms`, in torchvision's order).

Boxes are XYXY (x0, y0, x1, y1) in pixels; a mask box is inclusive of its last
pixel (official convention: a one-pixel mask at (x, y) has box (x, y, x, y)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from itertools import product
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

# --------------------------------------------------------------------------- grids and crops


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n_per_side**2, 2) float64 (x, y) points evenly spaced in [0, 1]^2, x fastest."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(side, side)  # xs[i, j] = side[j], ys[i, j] = side[i]
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer 0..n_layers: layer i has int(n_per_side / scale_per_layer**i) points a side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """XYXY crop boxes of an (h, w) image and their layer indices.

    Layer 0 is the whole image; layer i >= 1 has (2**i)**2 overlapping crops,
    listed column by column (x0 outer, y0 inner), as the official.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes: list[list[int]] = [[0, 0, im_w, im_h]]
    layer_idxs: list[int] = [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)
        xs0 = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
        ys0 = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
        for x0, y0 in product(xs0, ys0):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


# --------------------------------------------------------------------------- device-side scores and boxes


def calculate_stability_score(masks: ArrayLike, mask_threshold: float, threshold_offset: float) -> jax.Array:
    """Stability score: IoU of the masks thresholded at threshold +- offset.

    masks: (..., H, W) logits -> (...) float32. The pixel counts are exact int32
    sums (the official counts with int16 rows summed in int32); the high mask is
    inside the low one, so IoU = count(high) / count(low). 0 / 0 gives nan, as the official.
    """
    masks = jnp.asarray(masks)
    high = jnp.sum(masks > (mask_threshold + threshold_offset), axis=(-2, -1), dtype=jnp.int32)
    low = jnp.sum(masks > (mask_threshold - threshold_offset), axis=(-2, -1), dtype=jnp.int32)
    return high.astype(jnp.float32) / low.astype(jnp.float32)


def batched_mask_to_box(masks: ArrayLike) -> jax.Array:
    """Inclusive XYXY boxes around masks: bool (..., H, W) -> int32 (..., 4); empty masks give [0, 0, 0, 0]."""
    masks = jnp.asarray(masks).astype(bool)
    return box_from_projections(jnp.any(masks, axis=-1), jnp.any(masks, axis=-2))


def box_from_projections(rows: ArrayLike, cols: ArrayLike) -> jax.Array:
    """`batched_mask_to_box` from a mask's projections: rows (..., H) bool (any pixel set in
    each row) and cols (..., W) bool (in each column) -> int32 (..., 4) XYXY; empty gives zeros."""
    rows, cols = jnp.asarray(rows), jnp.asarray(cols)
    h, w = rows.shape[-1], cols.shape[-1]
    ys = jnp.arange(h, dtype=jnp.int32)
    xs = jnp.arange(w, dtype=jnp.int32)
    top = jnp.min(jnp.where(rows, ys, h), axis=-1, initial=h)
    bottom = jnp.max(jnp.where(rows, ys, 0), axis=-1, initial=0)
    left = jnp.min(jnp.where(cols, xs, w), axis=-1, initial=w)
    right = jnp.max(jnp.where(cols, xs, 0), axis=-1, initial=0)
    boxes = jnp.stack([left, top, right, bottom], axis=-1)
    return jnp.where(jnp.any(rows, axis=-1)[..., None], boxes, 0)


def mask_to_box_np(mask: np.ndarray) -> np.ndarray:
    """`batched_mask_to_box` of one (H, W) bool mask on the host -> int64 (4,) XYXY (zeros when empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4, np.int64)
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.int64)


def is_box_near_crop_edge(
    boxes: ArrayLike, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> jax.Array:
    """Whether a box (in crop coordinates) touches an edge of its crop that is not an edge of the image.

    boxes: (..., 4) XYXY in the crop's frame -> (...) bool. Each coordinate is
    uncropped to the image frame and compared, within `atol` pixels (float32), to
    the same coordinate of `crop_box` and of `orig_box` (both XYXY in the image frame).
    numpy in, numpy out; a JAX array (or tracer) in, JAX out.
    """
    xp = jnp if isinstance(boxes, jax.Array) else np
    crop = xp.asarray(crop_box, xp.float32)
    orig = xp.asarray(orig_box, xp.float32)
    boxes = uncrop_boxes_xyxy(xp.asarray(boxes), crop_box).astype(xp.float32)
    near_crop_edge = xp.isclose(boxes, crop, rtol=0.0, atol=atol)
    near_image_edge = xp.isclose(boxes, orig, rtol=0.0, atol=atol)
    return xp.any(near_crop_edge & ~near_image_edge, axis=-1)


# --------------------------------------------------------------------------- uncropping


def uncrop_boxes_xyxy(boxes: Any, crop_box: Sequence[int]) -> Any:
    """(..., 4) XYXY in the crop's frame -> the image frame (same array kind and dtype)."""
    x0, y0, _, _ = crop_box
    return boxes + np.asarray([x0, y0, x0, y0], dtype=boxes.dtype)


def uncrop_points(points: Any, crop_box: Sequence[int]) -> Any:
    """(..., 2) (x, y) in the crop's frame -> the image frame (same array kind and dtype)."""
    x0, y0, _, _ = crop_box
    return points + np.asarray([x0, y0], dtype=points.dtype)


def uncrop_masks(masks: Any, crop_box: Sequence[int], orig_h: int, orig_w: int) -> Any:
    """(..., h, w) masks of a crop -> (..., orig_h, orig_w), zero outside the crop.

    numpy in, numpy out; a JAX array (or tracer) in, JAX out (the padding is
    static, so this is jittable). A full-image crop returns `masks` itself.
    """
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    pad_width = [(0, 0)] * (masks.ndim - 2) + [(y0, pad_y - y0), (x0, pad_x - x0)]
    xp = jnp if isinstance(masks, jax.Array) else np
    return xp.pad(masks, pad_width)


def box_xyxy_to_xywh(box_xyxy: ArrayLike) -> np.ndarray:
    """(..., 4) XYXY -> (..., 4) XYWH (w = x1 - x0, h = y1 - y0), a new numpy array of the same dtype."""
    box = np.asarray(box_xyxy)
    out = box.copy()
    out[..., 2:] = box[..., 2:] - box[..., :2]
    return out


# --------------------------------------------------------------------------- run-length encoding


def mask_to_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """Uncompressed COCO RLEs of bool masks (B, H, W), as the official `mask_to_rle_pytorch`.

    Each is {"size": [H, W], "counts": [int, ...]}: run lengths of the mask
    flattened in column-major (Fortran) order, alternating 0-runs and 1-runs and
    starting with a 0-run (a leading 0 when the first pixel is set).
    """
    masks = np.asarray(masks, dtype=bool)
    b, h, w = masks.shape
    if b == 0:
        return []
    hw = h * w
    # Run boundaries: column-major flat indices p (0 < p < h * w) where pixel p differs from
    # pixel p - 1, found without transposing the masks: within a column, pixel (y, x) vs
    # (y - 1, x) at p = x * h + y; across columns, the top of column x vs the bottom of x - 1 at p = x * h.
    i_in, yx = np.divmod(np.flatnonzero(masks[:, 1:, :] != masks[:, :-1, :]), max((h - 1) * w, 1))
    y, x = np.divmod(yx, w)
    i_across, x_across = np.divmod(np.flatnonzero(masks[:, 0, 1:] != masks[:, -1, :-1]), max(w - 1, 1))
    keys = np.sort(np.concatenate([i_in * hw + x * h + y + 1, i_across * hw + (x_across + 1) * h]))
    which, boundaries = np.divmod(keys, hw)
    out = []
    for i, ends in enumerate(np.split(boundaries, np.cumsum(np.bincount(which, minlength=b))[:-1])):
        counts = np.diff(np.concatenate(([0], ends, [hw]))).tolist()
        if masks[i, 0, 0]:
            counts.insert(0, 0)
        out.append({"size": [h, w], "counts": counts})
    return out


def transposed_mask_to_rle(mask_t: np.ndarray, as_list: bool = True) -> dict[str, Any]:
    """`mask_to_rle` of one mask given transposed: mask_t (W, H) bool is the (H, W) mask's
    transpose, so its C order is the RLE's column-major order -> {"size": [H, W], "counts": [...]}.

    With `as_list=False` the counts are an int32 numpy array (4 bytes a run instead of a Python
    int's ~36: what the generator keeps until its records are made); `rle_to_mask`,
    `area_from_rle` and `rle_counts_to_list` take either.
    """
    w, h = mask_t.shape
    flat = np.ascontiguousarray(mask_t).reshape(-1)
    ends = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(ends, prepend=0, append=flat.size)
    if flat.size and flat[0]:
        counts = np.concatenate([[0], counts])
    counts = counts.astype(np.int32)
    return {"size": [h, w], "counts": counts.tolist() if as_list else counts}


def rle_counts_to_list(rle: dict[str, Any]) -> dict[str, Any]:
    """An uncompressed RLE with "counts" as a list of Python ints (the official form)."""
    counts = rle["counts"]
    return rle if isinstance(counts, list) else {"size": list(rle["size"]), "counts": counts.tolist()}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """An uncompressed RLE -> bool (H, W) mask (a Fortran-ordered array, as the official's transposed view)."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T


def area_from_rle(rle: dict[str, Any]) -> int:
    """The number of set pixels of an uncompressed RLE."""
    return int(np.sum(np.asarray(rle["counts"][1::2], dtype=np.int64)))


def coco_encode_rle(uncompressed_rle: dict[str, Any]) -> dict[str, Any]:
    """An uncompressed RLE -> pycocotools' compressed RLE, with "counts" as a utf-8 str (JSON-serializable)."""
    from pycocotools import mask as mask_utils

    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


# --------------------------------------------------------------------------- post-processing


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes ("holes") or drop islands ("islands") smaller than `area_thresh` pixels.

    mask: (H, W) bool. Returns (mask, modified); an unmodified mask is returned
    as is. Regions are 8-connected (the official uses cv2's
    connectedComponentsWithStats(..., 8); here scipy.ndimage.label with a 3x3
    structure). When every island is small the largest is kept (the first in
    raster order on a tie: cv2's label order may differ there).
    """
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working_mask = (correct_holes ^ mask) != 0
    regions, n_regions = ndimage.label(working_mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)[1:]  # label 0 is the background
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if correct_holes:
        fill_labels = np.concatenate(([0], np.flatnonzero(small) + 1))
    else:
        fill_labels = np.flatnonzero(~small) + 1
        if fill_labels.size == 0:
            fill_labels = np.array([np.argmax(sizes) + 1])
    return np.isin(regions, fill_labels), True


def _largest_below(x: float, dtype: np.dtype) -> np.ndarray:
    """The largest `dtype` value <= x: for v of that dtype, v > x  <=>  v > _largest_below(x, dtype)."""
    t = np.asarray(x, dtype=dtype)
    if float(t) > x:
        t = np.nextafter(t, np.asarray(-np.inf, dtype=dtype))
    return t


@partial(jax.jit, static_argnames="iou_threshold")
def _nms(
    boxes: jax.Array, scores: jax.Array, iou_threshold: float, valid: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """(keep (N,) bool, order (N,) int32: indices by descending score, ties by index)."""
    n = boxes.shape[0]
    if n == 0:
        return jnp.zeros(0, dtype=bool), jnp.zeros(0, dtype=jnp.int32)
    if not jnp.issubdtype(boxes.dtype, jnp.floating):
        boxes = boxes.astype(jnp.float32)
    order = jnp.argsort(-scores, stable=True)
    alive = jnp.ones(n, dtype=bool) if valid is None else valid.astype(bool)
    alive = alive[order]
    x0, y0, x1, y1 = jnp.moveaxis(boxes[order], -1, 0)
    areas = (x1 - x0) * (y1 - y0)
    # torchvision compares the IoU (boxes' dtype) with the threshold as a double.
    threshold = _largest_below(iou_threshold, boxes.dtype)

    def iou_with(i: jax.Array) -> jax.Array:
        w = jnp.maximum(0, jnp.minimum(x1[i], x1) - jnp.maximum(x0[i], x0))
        h = jnp.maximum(0, jnp.minimum(y1[i], y1) - jnp.maximum(y0[i], y0))
        inter = w * h
        return inter / (areas[i] + areas - inter)

    def step(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        keep, alive = state
        i = jnp.argmax(alive)  # the best-scored box neither kept nor suppressed yet
        keep = keep.at[i].set(True)
        alive = (alive & ~(iou_with(i) > threshold)).at[i].set(False)
        return keep, alive

    keep_sorted, _ = jax.lax.while_loop(lambda s: jnp.any(s[1]), step, (jnp.zeros(n, dtype=bool), alive))
    return jnp.zeros(n, dtype=bool).at[order].set(keep_sorted), order


def batched_nms(boxes: ArrayLike, scores: ArrayLike, iou_threshold: float, valid: ArrayLike | None = None) -> jax.Array:
    """Greedy non-maximum suppression with `torchvision.ops.nms` semantics, in fixed shapes.

    boxes (N, 4) XYXY float, scores (N,), valid (N,) bool or None (all valid) ->
    keep (N,) bool. Boxes are visited by descending score (ties: lower index
    first); a visited box that is not suppressed is kept and suppresses every
    later box whose IoU with it is > iou_threshold (IoU as torchvision's
    `box_iou`: area = (x1 - x0) * (y1 - y0), no +1). Invalid (padding) entries
    are never kept and suppress nothing. Jittable; `iou_threshold` is static (a
    python float, compared exactly as torchvision compares it, in double).
    The loop runs once per kept box.
    """
    return _nms(boxes, scores, iou_threshold, valid)[0]


def nms_indices(
    boxes: ArrayLike, scores: ArrayLike, iou_threshold: float, valid: ArrayLike | None = None
) -> np.ndarray:
    """The indices `torchvision.ops.nms` returns: those `batched_nms` keeps, by descending score (ties by index).

    Same arguments as `batched_nms`; -> (K,) int64 numpy array.
    """
    keep, order = jax.device_get(_nms(boxes, scores, iou_threshold, valid))
    return order[keep[order]].astype(np.int64)
