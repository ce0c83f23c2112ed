"""SamAutomaticMaskGenerator against the official generator (same random weights, the photo)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bench.official import official_mask_generator
from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.model import SamModel

# Random weights give near-zero, image-dominated logits: every point yields about the same
# mask, with stability ~0; `sharpen_` makes them confident. With NMS at 1.0 every surviving
# mask is compared.
SETTINGS = [
    dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.8, box_nms_thresh=1.0),
    dict(
        points_per_side=6,
        points_per_batch=16,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.5,
        crop_n_layers=1,
        box_nms_thresh=1.0,
        crop_nms_thresh=1.0,
    ),
    dict(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.8, box_nms_thresh=1.0, min_mask_region_area=200
    ),
]


@pytest.fixture(scope="module")
def sharp_models(tiny_config):
    from sam_jax.convert.state_dict import to_flax

    from bench.official import build_official, randomize_, sharpen_, state_dict_numpy

    ref = sharpen_(randomize_(build_official(tiny_config), seed=0))
    return ref, SamModel(tiny_config, to_flax(state_dict_numpy(ref), tiny_config))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.mark.parametrize("settings", SETTINGS, ids=["grid", "crops", "small_regions"])
def test_matches_official_generator(sharp_models, photo, settings):
    ours = SamAutomaticMaskGenerator(sharp_models[1], **settings).generate(photo)
    ref = official_mask_generator(sharp_models[0], **settings).generate(photo)
    assert len(ref) >= 5, "the setting must produce masks to compare"
    assert abs(len(ours) - len(ref)) <= max(1, len(ref) // 50), (len(ours), len(ref))
    ours_masks = np.stack([r["segmentation"] for r in ours])
    for r in ref:
        # Candidates from the same prompt point when there are any (many masks look alike here).
        same_point = [i for i, o in enumerate(ours) if np.allclose(o["point_coords"], r["point_coords"])]
        best = max(same_point or range(len(ours)), key=lambda i: _iou(ours_masks[i], r["segmentation"]))
        assert _iou(ours_masks[best], r["segmentation"]) >= 0.95
        o = ours[best]
        assert o["crop_box"] == r["crop_box"]
        assert abs(o["predicted_iou"] - r["predicted_iou"]) < 1e-3
        assert abs(o["stability_score"] - r["stability_score"]) < 2e-2
        np.testing.assert_allclose(o["bbox"], r["bbox"], atol=2)
    # Same keys and types as the official records.
    assert set(ours[0]) == set(ref[0])
    assert isinstance(ours[0]["area"], int) and ours[0]["segmentation"].dtype == bool


def test_output_modes_and_records(sharp_models, photo):
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.5)
    model = sharp_models[1]
    binary = SamAutomaticMaskGenerator(model, **kw).generate(photo)
    coco = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **kw).generate(photo)
    rle = SamAutomaticMaskGenerator(model, output_mode="uncompressed_rle", **kw).generate(photo)
    assert len(binary) == len(coco) == len(rle) > 0
    for b, c, r in zip(binary, coco, rle):
        decoded = mask_utils.decode(c["segmentation"]).astype(bool)
        np.testing.assert_array_equal(decoded, b["segmentation"])
        assert b["area"] == int(b["segmentation"].sum()) == int(mask_utils.area(c["segmentation"]))
        assert r["segmentation"]["size"] == [300, 451]
        x, y, w, h = b["bbox"]
        ys, xs = np.nonzero(b["segmentation"])
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_batch_and_progress(tiny_params, tiny_config, photo):
    calls = []
    gen = SamAutomaticMaskGenerator(
        SamModel(tiny_config, tiny_params),
        points_per_side=4,
        points_per_batch=5,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.5,
    )
    out = gen.generate_batch(
        [photo, photo[:200, :150].copy()], progress=lambda done, total: calls.append((done, total))
    )
    assert len(out) == 2 and calls[-1] == (4, 4)  # 16 points in batches of 5, per image
    assert all(r["segmentation"].shape == (200, 150) for r in out[1])


def test_bad_arguments(tiny_params, tiny_config):
    model = SamModel(tiny_config, tiny_params)
    with pytest.raises(ValueError, match="Exactly one of points_per_side or point_grids"):
        SamAutomaticMaskGenerator(model, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        SamAutomaticMaskGenerator(model, output_mode="png")
    with pytest.raises(ValueError, match="dtype uint8"):
        SamAutomaticMaskGenerator(model, points_per_side=2).generate(np.zeros((8, 8, 3)))
