"""SamAutomaticMaskGenerator against the official generator (same random weights, the photo)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from bench.official import official_mask_generator
from sam_jax import automatic_mask_generator as amg_module
from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.model import SamModel

ROOT = Path(__file__).resolve().parent.parent

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
    from bench.official import build_official, randomize_, sharpen_, state_dict_numpy
    from sam_jax.convert.state_dict import to_flax

    ref = sharpen_(randomize_(build_official(tiny_config), seed=0))
    return ref, SamModel(tiny_config, to_flax(state_dict_numpy(ref), tiny_config))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _large(photo: np.ndarray) -> np.ndarray:
    """The photo at 1200 x 1804: non-square, over 1024 px (the masks are upsampled, not shrunk)."""
    return np.asarray(Image.fromarray(photo).resize((1804, 1200), Image.BICUBIC))


@pytest.mark.parametrize(
    "settings, large",
    [(s, False) for s in SETTINGS] + [(dict(SETTINGS[0], points_per_batch=16), True)],
    ids=["grid", "crops", "small_regions", "large"],
)
def test_matches_official_generator(sharp_models, photo, settings, large):
    if large:
        photo = _large(photo)
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


def assert_records_match(ours: list[dict], expected: list[dict]) -> None:
    """The same records as the official generator's, one for one: as many, and each (in the order of
    point, then predicted IoU) with a mask of IoU >= 0.99 and a predicted IoU within 1e-3."""
    assert len(expected) >= 5, "the setting must produce masks to compare"
    assert len(ours) == len(expected)
    key = lambda r: tuple(r["point_coords"][0]) + (round(r["predicted_iou"], 3),)  # noqa: E731
    for o, r in zip(sorted(ours, key=key), sorted(expected, key=key)):
        assert _iou(o["segmentation"], r["segmentation"]) >= 0.99
        assert abs(o["predicted_iou"] - r["predicted_iou"]) < 1e-3


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


def test_chunks_do_not_change_the_records(sharp_models, photo, monkeypatch):
    """One mask per upsampling step (the step of a 12 MP photo) gives the records of the default
    steps (here all the candidate masks of a point batch in one step)."""
    kw = dict(SETTINGS[1], points_per_batch=10)
    default = SamAutomaticMaskGenerator(sharp_models[1], output_mode="uncompressed_rle", **kw).generate(photo)
    monkeypatch.setattr(amg_module, "CHUNK_PIXELS", 1)
    one = SamAutomaticMaskGenerator(sharp_models[1], output_mode="uncompressed_rle", **kw).generate(photo)
    assert len(default) > 5 and one == default


def test_warns_when_every_mask_is_filtered(tiny_params, tiny_config, photo, caplog):
    """Random weights give predicted IoUs far below the default 0.88: no mask, one warning per image
    naming the threshold and the best value seen; without the IoU filter, the stability filter's."""
    model = SamModel(tiny_config, tiny_params)
    with caplog.at_level(logging.WARNING, logger=amg_module.__name__):
        assert SamAutomaticMaskGenerator(model, points_per_side=4, points_per_batch=5).generate_batch([photo] * 2) == [
            [],
            [],
        ]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # one per image, not one per batch
    assert messages[0].startswith("0 of 48 masks passed pred_iou_thresh=0.88 (highest predicted IoU ")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=amg_module.__name__):
        assert SamAutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0.0).generate(photo) == []
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("0 of 48 masks passed stability_score_thresh=0.95 (highest stability score ")
    assert message.endswith("among the 48 that passed pred_iou_thresh=0)")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=amg_module.__name__):
        assert SamAutomaticMaskGenerator(
            model, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
        ).generate(photo)
    assert not caplog.records


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
    from sam_jax.config import tiny
    from sam_jax.model import SamModel, init_params

    def hwm_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

    config = tiny()
    model = SamModel(config, init_params(config, jax.random.key(0)))
    h, w = 3000, 4000
    image = (np.indices((h, w)).sum(0) % 251).astype(np.uint8)[..., None].repeat(3, axis=2)
    out = {}
    for batch in (4, 64):
        # Every mask passes the filters: each of the 48 is upsampled, encoded and returned.
        gen = SamAutomaticMaskGenerator(
            model, points_per_side=4, points_per_batch=batch, pred_iou_thresh=0.0, stability_score_thresh=0.0,
            box_nms_thresh=1.0, output_mode="uncompressed_rle",
        )
        gen.generate(image)  # compiles
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = rss_mb()
        records = gen.generate(image)
        out[batch] = {"masks": len(records), "before": before, "peak": hwm_mb()}
    print("PEAK " + json.dumps(out))
    """
)


def test_peak_memory_does_not_grow_with_points_per_batch():
    """The generator on a 12 MP image, in a fresh process: the peak memory above what the process
    held before `generate` stays under a bound set by the upsampling step (CHUNK_PIXELS), with
    4 or 64 points per batch. (Upsampling a whole batch as float logits would take 64 x 3 x
    12e6 x 4 bytes = 9.2 GB at 64 points.)"""
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT],
        cwd=ROOT,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAK ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    peaks = json.loads(lines[-1][5:])
    for batch, got in peaks.items():
        assert got["masks"] == 48, got
        # 48 masks' RLEs and the image's copies are a few tens of MB; one step's levels, masks and
        # intermediates (CHUNK_PIXELS ~ 16.8 M pixels: 12 MP is one mask a step) about 60 MB.
        assert got["peak"] - got["before"] < 200, (batch, got)
