"""`sam_jax.amg` against the official `segment_anything/utils/amg.py` and direct references.

The official module needs only torch (and pycocotools for `coco_encode_rle`);
`bench.official` registers the bare `segment_anything` package so that importing
it does not run the package `__init__` (which needs torchvision). Two references
are written here: greedy NMS as torchvision's CPU kernel computes it, and
`remove_small_regions` with an 8-connected flood fill in place of cv2.
"""

from __future__ import annotations

from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import segment_anything.utils.amg as official_amg
import torch
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp
from pycocotools import mask as mask_utils

import bench.official  # noqa: F401  (registers the bare `segment_anything` package)
from sam_jax import amg

# --------------------------------------------------------------------------- grids and crops


@pytest.mark.parametrize("n", [1, 2, 3, 16, 32, 64])
def test_build_point_grid(n):
    ours = amg.build_point_grid(n)
    assert ours.shape == (n * n, 2)
    np.testing.assert_array_equal(ours, official_amg.build_point_grid(n))


@pytest.mark.parametrize("n_per_side, n_layers, scale", [(32, 0, 1), (32, 1, 2), (32, 2, 2), (16, 2, 3), (7, 2, 2)])
def test_build_all_layer_point_grids(n_per_side, n_layers, scale):
    ours = amg.build_all_layer_point_grids(n_per_side, n_layers, scale)
    ref = official_amg.build_all_layer_point_grids(n_per_side, n_layers, scale)
    assert len(ours) == len(ref) == n_layers + 1
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("im_size", [(1024, 1024), (300, 451), (451, 300), (7, 13), (1, 1)])
@pytest.mark.parametrize("n_layers", [0, 1, 2])
@pytest.mark.parametrize("overlap_ratio", [512 / 1500, 0.0, 0.5])
def test_generate_crop_boxes(im_size, n_layers, overlap_ratio):
    ours = amg.generate_crop_boxes(im_size, n_layers, overlap_ratio)
    assert ours == official_amg.generate_crop_boxes(im_size, n_layers, overlap_ratio)
    boxes, layers = ours
    assert len(boxes) == sum(4**i for i in range(n_layers + 1)) and layers[-1] == n_layers


# --------------------------------------------------------------------------- device-side scores and boxes


@pytest.mark.parametrize("threshold, offset", [(0.0, 1.0), (0.3, 0.25), (-0.1, 0.1)])
def test_calculate_stability_score(threshold, offset):
    rng = np.random.default_rng(0)
    logits = (3.0 * rng.standard_normal((3, 5, 37, 53))).astype(np.float32)
    logits[0, 0] = -10.0  # empty low mask: 0 / 0
    logits[0, 1] = 10.0  # full masks: score 1
    logits[1, 2, :5, :7] = threshold + offset  # on the high threshold: not counted
    ref = official_amg.calculate_stability_score(torch.from_numpy(logits), threshold, offset).numpy()
    ours = jax.jit(amg.calculate_stability_score)(logits, threshold, offset)
    assert ours.shape == (3, 5) and ours.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ours), ref)  # nan == nan here
    assert np.isnan(ours[0, 0]) and ours[0, 1] == 1.0


def _random_masks(rng, shape, empty_every=4):
    """Bool masks of varied density, some empty, one full, some single pixels (a 2-D shape: one sparse mask)."""
    if len(shape) == 2:
        return rng.random(shape) < 0.05
    masks = rng.random(shape) < rng.random(shape[:-2] + (1, 1)) ** 4
    flat = masks.reshape(-1, *shape[-2:])
    flat[::empty_every] = False
    flat[1] = True
    flat[2] = False
    flat[2, shape[-2] - 1, 0] = True
    return masks


@pytest.mark.parametrize("shape", [(4, 3, 17, 23), (6, 31, 8), (13, 9), (0, 5, 6), (3, 0, 4)])
def test_batched_mask_to_box(shape):
    rng = np.random.default_rng(1)
    masks = _random_masks(rng, shape) if 0 not in shape else np.zeros(shape, dtype=bool)
    ours = jax.jit(amg.batched_mask_to_box)(masks)
    ref = official_amg.batched_mask_to_box(torch.from_numpy(masks)).numpy()
    assert ours.shape == (*shape[:-2], 4) and ours.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_batched_mask_to_box_known():
    masks = np.zeros((3, 5, 7), dtype=bool)
    masks[1, 2, 3] = True
    masks[2, 1:4, 2:6] = True
    masks[2, 4, 0] = True
    np.testing.assert_array_equal(amg.batched_mask_to_box(masks), [[0, 0, 0, 0], [3, 2, 3, 2], [0, 1, 5, 4]])


@pytest.mark.parametrize(
    "crop_box, orig_box",
    [
        ([0, 0, 1024, 768], [0, 0, 1024, 768]),
        ([0, 0, 600, 450], [0, 0, 1024, 768]),
        ([424, 318, 1024, 768], [0, 0, 1024, 768]),
    ],
)
@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_is_box_near_crop_edge(crop_box, orig_box, dtype):
    rng = np.random.default_rng(2)
    cw, ch = crop_box[2] - crop_box[0], crop_box[3] - crop_box[1]
    xs = np.sort(rng.integers(0, cw, (200, 2)), axis=1)
    ys = np.sort(rng.integers(0, ch, (200, 2)), axis=1)
    xs[:50] = np.sort(rng.integers(cw - 40, cw, (50, 2)), axis=1)  # many near the right / bottom edges
    ys[50:100] = rng.integers(0, 40, (50, 2))
    xs[100, :] = [20, cw - 21]  # exactly atol / just past it
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=-1).astype(dtype)
    if dtype == np.float32:
        boxes += rng.random(boxes.shape).astype(np.float32)
    ref = official_amg.is_box_near_crop_edge(torch.from_numpy(boxes), crop_box, orig_box).numpy()
    ours = amg.is_box_near_crop_edge(boxes, crop_box, orig_box)
    assert ours.shape == (200,) and ours.dtype == bool
    np.testing.assert_array_equal(np.asarray(ours), ref)
    near_edge = jax.jit(amg.is_box_near_crop_edge, static_argnums=(1, 2))
    np.testing.assert_array_equal(np.asarray(near_edge(boxes, tuple(crop_box), tuple(orig_box))), ref)
    assert 0 < ref.sum() < 200 or crop_box == orig_box


# --------------------------------------------------------------------------- uncropping


def test_uncrop_boxes_and_points():
    rng = np.random.default_rng(3)
    crop_box = [37, 12, 500, 400]
    for shape in [(9, 4), (2, 5, 4)]:
        boxes = rng.integers(0, 300, shape)
        ref = official_amg.uncrop_boxes_xyxy(torch.from_numpy(boxes), crop_box).numpy()
        ours = amg.uncrop_boxes_xyxy(boxes, crop_box)
        assert isinstance(ours, np.ndarray) and ours.dtype == boxes.dtype
        np.testing.assert_array_equal(ours, ref)
        ours_jax = jax.jit(amg.uncrop_boxes_xyxy, static_argnums=1)(jnp.asarray(boxes, jnp.int32), tuple(crop_box))
        np.testing.assert_array_equal(np.asarray(ours_jax), ref)
    for shape in [(9, 2), (2, 5, 2)]:
        points = rng.random(shape).astype(np.float32) * 300
        ref = official_amg.uncrop_points(torch.from_numpy(points), crop_box).numpy()
        ours = amg.uncrop_points(points, crop_box)
        assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref)
        np.testing.assert_array_equal(np.asarray(amg.uncrop_points(jnp.asarray(points), crop_box)), ref)


@pytest.mark.parametrize("crop_box", [[0, 0, 31, 20], [5, 0, 31, 20], [0, 7, 18, 16], [10, 4, 25, 13]])
def test_uncrop_masks(crop_box):
    orig_h, orig_w = 20, 31
    rng = np.random.default_rng(4)
    masks = rng.random((3, crop_box[3] - crop_box[1], crop_box[2] - crop_box[0])) < 0.5
    ref = official_amg.uncrop_masks(torch.from_numpy(masks), crop_box, orig_h, orig_w).numpy()
    ours = amg.uncrop_masks(masks, crop_box, orig_h, orig_w)
    assert isinstance(ours, np.ndarray) and ours.shape == (3, orig_h, orig_w)
    np.testing.assert_array_equal(ours, ref)
    uncrop = jax.jit(amg.uncrop_masks, static_argnums=(1, 2, 3))
    np.testing.assert_array_equal(np.asarray(uncrop(jnp.asarray(masks), tuple(crop_box), orig_h, orig_w)), ref)
    if crop_box == [0, 0, orig_w, orig_h]:
        assert ours is masks


def test_box_xyxy_to_xywh():
    box = np.array([3, 7, 10, 20])
    assert amg.box_xyxy_to_xywh(box).tolist() == official_amg.box_xyxy_to_xywh(torch.from_numpy(box)).tolist()
    assert box.tolist() == [3, 7, 10, 20]  # not modified in place
    boxes = np.array([[0.5, 1.0, 2.5, 4.0], [1, 1, 1, 1]], dtype=np.float32)
    np.testing.assert_array_equal(amg.box_xyxy_to_xywh(boxes), [[0.5, 1.0, 2.0, 3.0], [1, 1, 0, 0]])


# --------------------------------------------------------------------------- run-length encoding


def _rle_test_masks() -> np.ndarray:
    """Non-square masks: random densities, all-zero, all-one, first / last pixel alone, a checkerboard."""
    rng = np.random.default_rng(5)
    masks = rng.random((10, 37, 23)) < rng.random((10, 1, 1))
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, 0, 0] = True
    masks[3] = False
    masks[3, -1, -1] = True
    masks[4] = np.indices((37, 23)).sum(0) % 2 == 0
    masks[5] = ~masks[4]
    return masks


def test_mask_to_rle_matches_official():
    masks = _rle_test_masks()
    ours = amg.mask_to_rle(masks)
    ref = official_amg.mask_to_rle_pytorch(torch.from_numpy(masks))
    assert ours == ref
    assert all(type(c) is int for rle in ours for c in rle["counts"])
    assert ours[0]["counts"] == [37 * 23] and ours[1]["counts"] == [0, 37 * 23]
    assert amg.mask_to_rle(np.zeros((0, 4, 5), dtype=bool)) == []


def test_transposed_mask_to_rle():
    """The RLE of a mask given transposed (the generator's layout) == `mask_to_rle` of the mask, as a list or
    as an int32 array that decodes, measures and converts the same."""
    masks = _rle_test_masks()
    for mask, ref in zip(masks, amg.mask_to_rle(masks)):
        assert amg.transposed_mask_to_rle(np.ascontiguousarray(mask.T)) == ref
        packed = amg.transposed_mask_to_rle(mask.T, as_list=False)
        assert packed["counts"].dtype == np.int32 and amg.rle_counts_to_list(packed) == ref
        np.testing.assert_array_equal(amg.rle_to_mask(packed), mask)
        assert amg.area_from_rle(packed) == amg.area_from_rle(ref) == int(mask.sum())


def test_rle_round_trip_and_area():
    masks = _rle_test_masks()
    for mask, rle in zip(masks, amg.mask_to_rle(masks)):
        decoded = amg.rle_to_mask(rle)
        assert decoded.dtype == bool and decoded.shape == mask.shape
        np.testing.assert_array_equal(decoded, mask)
        np.testing.assert_array_equal(decoded, official_amg.rle_to_mask(rle))
        assert amg.area_from_rle(rle) == official_amg.area_from_rle(rle) == int(mask.sum())


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(bool, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=9)))
def test_rle_round_trip_property(masks):
    rles = amg.mask_to_rle(masks)
    assert len(rles) == masks.shape[0]
    for mask, rle in zip(masks, rles):
        assert rle["size"] == list(mask.shape) and sum(rle["counts"]) == mask.size
        assert all(c > 0 for c in rle["counts"][1:])
        np.testing.assert_array_equal(amg.rle_to_mask(rle), mask)
        assert amg.area_from_rle(rle) == int(mask.sum())


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_coco_encode_rle():
    masks = _rle_test_masks()
    for mask, rle in zip(masks, amg.mask_to_rle(masks)):
        coco = amg.coco_encode_rle(rle)
        assert isinstance(coco["counts"], str) and coco["size"] == [37, 23]
        assert coco == official_amg.coco_encode_rle(rle)
        compressed = {"size": coco["size"], "counts": coco["counts"].encode("utf-8")}
        np.testing.assert_array_equal(mask_utils.decode(compressed).astype(bool), mask)
        assert int(mask_utils.area(compressed)) == amg.area_from_rle(rle)


# --------------------------------------------------------------------------- remove_small_regions


def _label8(binary: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of the True pixels, labelled 1.. in raster order of their first pixel."""
    labels = np.zeros(binary.shape, dtype=np.int64)
    n = 0
    h, w = binary.shape
    for y0, x0 in zip(*np.nonzero(binary)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and binary[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        queue.append((yy, xx))
    return labels, n + 1


def _remove_small_regions_reference(mask, area_thresh, mode):
    """The official function, line for line, with the flood fill above in place of cv2."""
    correct_holes = mode == "holes"
    working_mask = (correct_holes ^ mask).astype(np.uint8)
    regions, n_labels = _label8(working_mask != 0)
    sizes = np.bincount(regions.ravel(), minlength=n_labels)[1:]
    small_regions = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if len(small_regions) == 0:
        return mask, False
    fill_labels = [0] + small_regions
    if not correct_holes:
        fill_labels = [i for i in range(n_labels) if i not in fill_labels]
        if len(fill_labels) == 0:
            fill_labels = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill_labels), True


def _draw(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


def test_remove_small_regions_holes():
    mask = _draw(
        [
            "##########",
            "#.########",  # a 1-pixel hole
            "##########",
            "###...####",  # a 3x3 hole
            "###...####",
            "###...####",
            "#######.##",  # two hole pixels touching only diagonally: one 8-connected hole of 2
            "########.#",
            "##########",
        ]
    )
    out, modified = amg.remove_small_regions(mask, 2, "holes")
    assert modified
    np.testing.assert_array_equal(out, mask | (np.arange(10)[None] == 1) & (np.arange(9)[:, None] == 1))
    out, modified = amg.remove_small_regions(mask, 3, "holes")  # the diagonal pair is filled too
    expected = mask.copy()
    expected[1, 1] = expected[6, 7] = expected[7, 8] = True
    assert modified
    np.testing.assert_array_equal(out, expected)
    out, modified = amg.remove_small_regions(mask, 1, "holes")
    assert not modified and out is mask


def test_remove_small_regions_islands():
    mask = _draw(
        [
            "..........",
            ".####.....",
            ".####...#.",  # a 1-pixel island
            ".####.....",
            ".####.....",
            "......#...",  # an island of 2 connected only diagonally
            ".......#..",
            "..........",
        ]
    )
    out, modified = amg.remove_small_regions(mask, 2, "islands")
    expected = mask.copy()
    expected[2, 8] = False
    assert modified
    np.testing.assert_array_equal(out, expected)
    out, modified = amg.remove_small_regions(mask, 3, "islands")
    expected[5, 6] = expected[6, 7] = False
    np.testing.assert_array_equal(out, expected)
    # Every island small: the largest one is kept.
    out, modified = amg.remove_small_regions(mask, 100, "islands")
    expected[1:5, 1:5] = True
    assert modified
    np.testing.assert_array_equal(out, expected)
    # Nothing to remove.
    empty = np.zeros((4, 5), dtype=bool)
    out, modified = amg.remove_small_regions(empty, 10, "islands")
    assert not modified and out is empty
    with pytest.raises(ValueError):
        amg.remove_small_regions(mask, 2, "both")


def test_remove_small_regions_random_vs_reference():
    rng = np.random.default_rng(6)
    for trial in range(40):
        shape = tuple(rng.integers(4, 16, 2))
        mask = rng.random(shape) < rng.uniform(0.2, 0.8)
        for mode in ("holes", "islands"):
            thresh = float(rng.integers(1, 12))
            out, modified = amg.remove_small_regions(mask, thresh, mode)
            ref, ref_modified = _remove_small_regions_reference(mask, thresh, mode)
            assert modified == ref_modified, (trial, mode)
            np.testing.assert_array_equal(out, ref)


# --------------------------------------------------------------------------- NMS


def _nms_reference(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """torchvision's CPU `nms` kernel in python: float32 arithmetic, IoU compared with a double threshold."""
    boxes = boxes.astype(np.float32)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties by index
    suppressed = [False] * len(scores)
    keep = []
    with np.errstate(invalid="ignore"):
        for pos, i in enumerate(order):
            if suppressed[i]:
                continue
            keep.append(i)
            for j in order[pos + 1 :]:
                if suppressed[j]:
                    continue
                w = max(np.float32(0), min(x2[i], x2[j]) - max(x1[i], x1[j]))
                h = max(np.float32(0), min(y2[i], y2[j]) - max(y1[i], y1[j]))
                inter = w * h
                if float(inter / (areas[i] + areas[j] - inter)) > iou_threshold:
                    suppressed[j] = True
    return keep


def _random_boxes(rng, n: int, integer: bool) -> np.ndarray:
    xy = rng.integers(0, 40, (n, 2)) if integer else rng.random((n, 2)) * 40
    wh = rng.integers(0, 25, (n, 2)) if integer else rng.random((n, 2)) * 25
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("iou_threshold", [0.7, 0.5, 0.3, 1 / 3, 0.0])
def test_nms_matches_reference(integer, iou_threshold):
    rng = np.random.default_rng(7)
    for n in [1, 23, 80] * 4:  # few shapes: one compilation each
        boxes = _random_boxes(rng, n, integer)
        boxes[rng.random(n) < 0.1] = boxes[0]  # duplicates
        scores = rng.integers(0, 6, n).astype(np.float32) / 5  # many ties
        ref = _nms_reference(boxes, scores, iou_threshold)
        np.testing.assert_array_equal(amg.nms_indices(boxes, scores, iou_threshold), ref)
        keep = np.asarray(amg.batched_nms(boxes, scores, iou_threshold))
        assert keep.shape == (n,) and keep.dtype == bool
        np.testing.assert_array_equal(np.flatnonzero(keep), sorted(ref))


def test_nms_threshold_compared_as_double():
    # IoU = 1/3 exactly: float32(1/3) > 1/3 as a double, so torchvision suppresses.
    boxes = np.array([[0, 0, 2, 1], [1, 0, 3, 1]], dtype=np.float32)
    scores = np.array([0.5, 0.9], dtype=np.float32)
    assert _nms_reference(boxes, scores, 1 / 3) == [1]
    assert amg.nms_indices(boxes, scores, 1 / 3).tolist() == [1]
    # IoU = 0.5 exactly with threshold 0.5: not suppressed (strictly greater).
    boxes = np.array([[0, 0, 3, 1], [1, 0, 4, 1]], dtype=np.float32)
    assert amg.nms_indices(boxes, scores, 0.5).tolist() == [1, 0]


def test_nms_valid_padding_and_jit():
    rng = np.random.default_rng(8)
    n_real, n_pad = 50, 14
    boxes = _random_boxes(rng, n_real + n_pad, integer=True)
    scores = rng.random(n_real + n_pad).astype(np.float32)
    pad = rng.permutation(n_real + n_pad)[:n_pad]
    boxes[pad] = boxes[rng.integers(0, n_real + n_pad, n_pad)]  # padding overlapping real boxes...
    scores[pad] = 2.0  # ...and scored above them all
    valid = np.ones(n_real + n_pad, dtype=bool)
    valid[pad] = False
    real = np.flatnonzero(valid)
    ref = real[_nms_reference(boxes[real], scores[real], 0.5)]
    np.testing.assert_array_equal(amg.nms_indices(boxes, scores, 0.5, valid), ref)
    keep = jax.jit(lambda b, s, v: amg.batched_nms(b, s, 0.5, v))(boxes, scores, valid)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(keep)), np.sort(ref))
    assert not np.asarray(keep)[pad].any()
    # Nothing valid / nothing at all.
    assert amg.nms_indices(boxes, scores, 0.5, np.zeros_like(valid)).size == 0
    assert amg.nms_indices(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).size == 0
