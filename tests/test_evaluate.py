"""The interactive point / box evaluation (sam_jax.train.evaluate) on the tiny model."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from scipy import ndimage

from sam_jax.config import tiny
from sam_jax.model import init_params
from sam_jax.predictor import PROMPT_BATCH_BUCKETS
from sam_jax.prompts import bucket_size
from sam_jax.train import evaluate as ev
from sam_jax.train.sa1b import list_records, load_record
from sam_jax.train.shapes import make_shapes

SIZE = (48, 64)  # small originals: postprocessing and click placement stay cheap
NUM_CLICKS = 3


@pytest.fixture(scope="module")
def config():
    # Its own name: a fresh entry in evaluate's cache of jitted functions, so the
    # compilation counts below are this module's alone.
    return dataclasses.replace(tiny(), name="tiny-evaluate-test")


@pytest.fixture(scope="module")
def params(config):
    return init_params(config, jax.random.key(0))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, 3, seed=0, image_size=SIZE, min_shapes=3, max_shapes=4)
    return out


@pytest.fixture(scope="module")
def results(params, config, data_dir):
    return ev.evaluate(params, config, data_dir, num_clicks=NUM_CLICKS)


# --------------------------------------------------------------------------- host helpers


def test_mask_iou_known_values():
    gt = np.zeros((4, 5), bool)
    gt[1, 1:4] = True  # 3 pixels
    pred = np.zeros((4, 5), bool)
    pred[1, 3:5] = True  # 2 pixels, 1 shared
    np.testing.assert_allclose(ev.mask_iou(pred, gt), 0.25)
    np.testing.assert_allclose(ev.mask_iou(gt, gt), 1.0)
    np.testing.assert_allclose(ev.mask_iou(np.zeros_like(gt), np.zeros_like(gt)), 1.0)  # both empty
    stacked = ev.mask_iou(np.stack([pred, gt, ~gt])[None], gt[None, None])  # (1, 3, H, W) vs (1, 1, H, W)
    np.testing.assert_allclose(stacked, [[0.25, 1.0, 0.0]])


def test_usable_masks_drops_empty_and_large_keeps_order():
    masks = np.zeros((4, 10, 10), bool)
    masks[0, :5] = True  # 50%
    masks[2, :] = True  # 100%: dropped
    masks[3, 0, 0] = True  # 1 pixel
    # masks[1] is empty: dropped
    np.testing.assert_array_equal(ev.usable_masks(masks), masks[[0, 3]])
    np.testing.assert_array_equal(ev.usable_masks(masks, 1), masks[[0]])
    masks[2, 0] = False  # exactly 90%: kept
    assert len(ev.usable_masks(masks)) == 3


def test_first_click_is_the_centre_of_a_square():
    mask = np.zeros((30, 40), bool)
    mask[5:16, 8:19] = True  # 11 x 11: rows 5..15, cols 8..18
    np.testing.assert_array_equal(ev.farthest_point(mask), [13, 10])  # (x, y)


def test_first_click_is_inside_and_at_the_distance_maximum(data_dir):
    record = load_record(*list_records(data_dir)[0])
    for mask in record["masks"]:
        x, y = ev.farthest_point(mask).astype(int)
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        assert mask[y, x]
        assert dist[y, x] == dist.max()


def test_correction_click_on_a_false_negative_region():
    gt = np.zeros((40, 60), bool)
    gt[10:30, 10:30] = True
    pred = gt.copy()
    pred[10:19, 10:19] = False  # 81 px missed: the largest error
    pred[35:38, 50:53] = True  # 9 px false positive
    xy, label = ev.correction_click(pred, gt)
    assert label == 1
    x, y = xy.astype(int)
    assert gt[y, x] and not pred[y, x]


def test_correction_click_on_a_false_positive_region():
    gt = np.zeros((40, 60), bool)
    gt[10:30, 10:30] = True
    pred = gt.copy()
    pred[11:20, 41:50] = True  # 9 x 9 false positive, centre (45, 15)
    pred[12:14, 12:14] = False  # 4 px missed
    xy, label = ev.correction_click(pred, gt)
    assert label == 0
    np.testing.assert_array_equal(xy, [45, 15])


def test_correction_click_ties_go_to_false_negatives_and_none_without_error():
    gt = np.zeros((20, 20), bool)
    gt[2:8, 2:8] = True
    assert ev.correction_click(gt.copy(), gt) is None
    pred = gt.copy()
    pred[2:4, 2:4] = False  # 4 px missed
    pred[15:17, 15:17] = True  # 4 px extra
    assert ev.correction_click(pred, gt)[1] == 1


def test_corrections_append_per_mask_and_skip_masks_without_error():
    gt = np.zeros((2, 12, 12), bool)
    gt[:, 2:9, 2:9] = True
    pred = gt.copy()
    pred[1, 2:5, 2:5] = False  # only mask 1 has an error
    coords = np.zeros((2, 3, 2), np.float32)
    labels = np.array([[1, -1, -1], [1, 0, -1]], np.int32)
    counts = np.array([1, 2])
    ev._add_corrections(pred, gt, coords, labels, counts)
    np.testing.assert_array_equal(counts, [1, 3])
    np.testing.assert_array_equal(labels, [[1, -1, -1], [1, 0, 1]])
    np.testing.assert_array_equal(coords[1, 2], [3, 3])  # centre of the 3 x 3 missed block


def test_tight_boxes_are_inclusive_pixel_extents():
    masks = np.zeros((2, 10, 12), bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7, 11] = True
    np.testing.assert_array_equal(ev.tight_boxes(masks), [[3, 2, 8, 4], [11, 7, 11, 7]])


# --------------------------------------------------------------------------- evaluate


def test_evaluate_keys_counts_and_ranges(results, data_dir):
    records = [load_record(*r) for r in list_records(data_dir)]
    assert results["num_images"] == 3
    assert results["num_masks"] == sum(len(ev.usable_masks(r["masks"])) for r in records)
    assert results["num_clicks"] == NUM_CLICKS
    keys = ["miou_1click_oracle", "miou_1click_predicted", "miou_box"]
    keys += [f"miou_{k}click" for k in range(1, NUM_CLICKS + 1)]
    for key in keys:
        assert 0.0 <= results[key] <= 1.0, key
    assert results["per_click"] == [results[f"miou_{k}click"] for k in range(1, NUM_CLICKS + 1)]
    assert results["miou_1click"] == results["miou_1click_oracle"]
    assert results["miou_1click_oracle"] >= results["miou_1click_predicted"]
    table = ev.format_table(results)
    assert "1 click (oracle)" in table and f"{NUM_CLICKS} clicks" in table and "box" in table


def test_evaluate_is_deterministic(results, params, config, data_dir):
    assert ev.evaluate(params, config, data_dir, num_clicks=NUM_CLICKS) == results


def test_decode_compiles_once_per_bucket(results, params, config, data_dir):
    counts = [len(ev.usable_masks(load_record(*r)["masks"])) for r in list_records(data_dir)]
    assert len(set(counts)) > 1 and {bucket_size(c, PROMPT_BATCH_BUCKETS) for c in counts} == {4}
    encode_fn, decode_fn = ev.jitted_model(config)
    # One encoder (all images share a size); decoders: multimask (click 1), single (later clicks, box).
    assert (encode_fn._cache_size(), decode_fn._cache_size()) == (1, 2)
    limited = ev.evaluate(params, config, data_dir, num_clicks=1, max_images=2, max_masks_per_image=3)
    assert (limited["num_images"], limited["num_masks"]) == (2, 6)
    assert (encode_fn._cache_size(), decode_fn._cache_size()) == (1, 2)  # 3 masks: the same bucket, same N


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_clicks": 0}, "num_clicks"),
        ({"num_clicks": 2.0}, "num_clicks"),
        ({"max_images": 0}, "max_images"),
        ({"max_masks_per_image": -1}, "max_masks_per_image"),
    ],
)
def test_evaluate_rejects_bad_counts(data_dir, kwargs, name):
    with pytest.raises(ValueError, match=name):
        ev.evaluate(None, tiny(), data_dir, **kwargs)


def test_evaluate_rejects_missing_or_empty_data_dir(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        ev.evaluate(None, tiny(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="data_dir"):
        ev.evaluate(None, tiny(), tmp_path)
