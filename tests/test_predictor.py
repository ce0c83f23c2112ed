"""SamPredictor: parity with the official predictor, batched prompts and images, compilation, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from bench.official import official_predictor
from sam_jax import predictor as predictor_module
from sam_jax.model import SamModel
from sam_jax.predictor import SamPredictor
from sam_jax.transforms import postprocess_masks

ATOL = 1e-4


@pytest.fixture(scope="module")
def predictors(official_tiny, tiny_params, tiny_config, photo):
    ours = SamPredictor(SamModel(tiny_config, tiny_params))
    ours.set_image(photo)
    ref = official_predictor(official_tiny)
    ref.set_image(photo)
    return ours, ref


def _close(a, b, atol=ATOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.max(np.abs(a - b)) <= atol, np.max(np.abs(a - b))


def _masks_agree(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == bool
    assert np.mean(a == b) > 0.9999


CASES = {
    "points": dict(point_coords=np.array([[120.0, 90.0], [300.0, 200.0]]), point_labels=np.array([1, 0])),
    "box": dict(box=np.array([50.0, 40.0, 320.0, 260.0])),
    "box_points": dict(
        point_coords=np.array([[150.0, 120.0]]), point_labels=np.array([1]), box=np.array([50.0, 40.0, 320.0, 260.0])
    ),
}


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_predict_matches_official(predictors, case, multimask):
    ours, ref = predictors
    a = ours.predict(**CASES[case], multimask_output=multimask)
    b = ref.predict(**CASES[case], multimask_output=multimask)
    _masks_agree(a[0], b[0])
    _close(a[1], b[1])
    _close(a[2], b[2])
    logits_a = ours.predict(**CASES[case], multimask_output=multimask, return_logits=True)[0]
    logits_b = ref.predict(**CASES[case], multimask_output=multimask, return_logits=True)[0]
    _close(logits_a, logits_b)


def test_mask_input_feedback_matches_official(predictors):
    """The official refinement loop: the best low-res logits fed back as mask_input."""
    ours, ref = predictors
    kw = CASES["points"]
    _, scores, logits = ref.predict(**kw)
    best = logits[np.argmax(scores)][None]
    a = ours.predict(**kw, mask_input=best, multimask_output=False)
    b = ref.predict(**kw, mask_input=best, multimask_output=False)
    _masks_agree(a[0], b[0])
    _close(a[1], b[1])
    _close(a[2], b[2])


def test_batched_prompts_match_one_by_one(predictors):
    """B boxes (and B point sets) in one call == B separate official calls."""
    ours, ref = predictors
    boxes = np.array([[10.0, 20.0, 200.0, 180.0], [100.0, 50.0, 440.0, 290.0], [0, 0, 450, 299]])
    points = np.array([[[60.0, 60.0]], [[250.0, 150.0]], [[400.0, 250.0]]])
    masks, scores, logits = ours.predict(point_coords=points, point_labels=np.ones((3, 1)), box=boxes)
    assert masks.shape == (3, 3, 300, 451) and scores.shape == (3, 3) and logits.shape == (3, 3, 64, 64)
    for i in range(3):
        m, s, lg = ref.predict(point_coords=points[i], point_labels=np.ones(1), box=boxes[i])
        _masks_agree(masks[i], m)
        _close(scores[i], s)
        _close(logits[i], lg)


@pytest.mark.parametrize("return_logits", [False, True])
def test_chunked_upsampling(predictors, monkeypatch, return_logits):
    """Upsampled a few masks at a time (5 prompts x 3 masks in chunks of 2, the last chunk
    overlapping) -> the masks of the whole batch at once, in a new writable array."""
    ours = predictors[0]
    points = np.array([[[60.0, 60.0]], [[250.0, 150.0]], [[400.0, 250.0]], [[10.0, 290.0]], [[200.0, 20.0]]])
    kw = dict(point_coords=points, point_labels=np.ones((5, 1)), return_logits=return_logits)
    masks, scores, low = ours.predict(**kw)
    h, w = ours.original_size
    monkeypatch.setattr(predictor_module, "CHUNK_PIXELS", 2 * h * w)
    chunked, scores_c, low_c = ours.predict(**kw)
    ref = np.asarray(postprocess_masks(low, ours.input_size, ours.original_size, ours.model.image_size))
    if not return_logits:
        ref = ref > ours.model.config.mask_threshold
    assert chunked.shape == masks.shape == (5, 3, h, w) and chunked.flags.writeable
    np.testing.assert_array_equal(chunked, masks)
    np.testing.assert_array_equal(scores_c, scores)
    np.testing.assert_array_equal(low_c, low)
    if return_logits:
        np.testing.assert_allclose(masks, ref, atol=1e-4)
    else:
        assert np.mean(masks == ref) > 0.9999


def test_predict_batch_over_images(predictors, official_tiny, tiny_params, tiny_config, photo):
    ours = SamPredictor(SamModel(tiny_config, tiny_params))
    second = np.ascontiguousarray(photo[40:260, 100:300])  # another size: 220 x 200
    ours.set_image_batch([photo, second])
    masks, scores, logits = ours.predict_batch(
        point_coords_batch=[np.array([[120.0, 90.0]]), np.array([[[50.0, 60.0]], [[150.0, 100.0]]])],
        point_labels_batch=[np.array([1]), np.ones((2, 1))],
        box_batch=[None, None],
    )
    assert masks[0].shape == (3, 300, 451) and masks[1].shape == (2, 3, 220, 200)
    ref = official_predictor(official_tiny)
    ref.set_image(second)
    m, s, _ = ref.predict(point_coords=np.array([[150.0, 100.0]]), point_labels=np.ones(1))
    _masks_agree(masks[1][1], m)
    _close(scores[1][1], s)
    _, s0, _ = predictors[1].predict(point_coords=np.array([[120.0, 90.0]]), point_labels=np.array([1]))
    _close(scores[0], s0)


def test_embedding_and_state(predictors):
    ours, ref = predictors
    _close(ours.get_image_embedding(), ref.get_image_embedding().numpy())
    fresh = SamPredictor(ours.model)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(**CASES["box"])
    fresh.set_image(np.zeros((10, 12, 3), np.uint8))
    fresh.reset_image()
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.get_image_embedding()


def test_bgr_input(predictors, photo):
    ours = SamPredictor(predictors[0].model)
    ours.set_image(np.ascontiguousarray(photo[..., ::-1]), image_format="BGR")
    _close(ours.features.embedding, predictors[0].features.embedding, 0)


def test_no_recompile_within_a_bucket(predictors):
    ours = SamPredictor(predictors[0].model)
    ours.set_image(np.zeros((300, 451, 3), np.uint8))
    for n in (1, 2, 3):  # points per prompt: bucket 4
        ours.predict(point_coords=np.full((n, 2), 10.0), point_labels=np.ones(n))
    for b in (3, 4):  # prompts per call: bucket 4
        ours.predict(point_coords=np.full((b, 1, 2), 10.0), point_labels=np.ones((b, 1)))
    assert ours._predict._cache_size() == 2 and ours._upsample._cache_size() == 2


BAD = [
    (dict(point_coords=[[1.0, np.nan]], point_labels=[1]), "point_coords contains NaN"),
    (dict(point_coords=[[1.0, np.inf]], point_labels=[1]), "point_coords contains NaN or infinite"),
    (dict(point_coords=[[1.0, 2.0]], point_labels=[2]), "point_labels must be 1"),
    (dict(point_coords=[[1.0, 2.0], [3, 4]], point_labels=[1]), "point_labels must have shape"),
    (dict(point_coords=[[1.0, 2.0]]), "given together"),
    (dict(point_coords=[1.0, 2.0], point_labels=[1]), "point_coords must have shape"),
    (dict(box=[10.0, 10.0, 5.0, 20.0]), "x1 >= x0"),
    (dict(box=[10.0, 10.0, 20.0]), "box must have shape"),
    (dict(mask_input=np.zeros((1, 32, 32))), "mask_input must have shape"),
    (dict(box=np.zeros((2, 4)), point_coords=np.zeros((3, 1, 2)), point_labels=np.ones((3, 1))), "different numbers"),
    (dict(point_coords="abc", point_labels=[1]), "point_coords must be numeric"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_prompts(predictors, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predictors[0].predict(**kwargs)


@pytest.mark.parametrize(
    "image,message",
    [
        (np.zeros((10, 10, 3), np.float32), "dtype uint8"),
        (np.zeros((10, 10), np.uint8), "shape HxWx3"),
        (np.zeros((10, 10, 4), np.uint8), "shape HxWx3"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        ([[1, 2, 3]], "numpy array"),
    ],
)
def test_bad_images(predictors, image, message):
    with pytest.raises(ValueError, match=message):
        SamPredictor(predictors[0].model).set_image(image)
    with pytest.raises(ValueError, match="image_format"):
        SamPredictor(predictors[0].model).set_image(np.zeros((4, 4, 3), np.uint8), image_format="RGBA")


def test_points_outside_the_image_are_allowed(predictors):
    masks, scores, _ = predictors[0].predict(point_coords=[[-20.0, 500.0]], point_labels=[1])
    assert masks.shape == (3, 300, 451) and np.all(np.isfinite(scores))


def test_decode_batch_follows_the_params_platform(tiny_params, monkeypatch):
    """Prompts are decoded one at a time where the params live on a CPU, DECODE_BATCH at a time on an
    accelerator; numpy params (placed by each call) follow JAX's default backend."""
    import jax

    placed = jax.device_put(tiny_params, jax.devices("cpu")[0])
    as_numpy = jax.tree.map(np.asarray, tiny_params)
    assert predictor_module.default_decode_batch(placed) == predictor_module.default_decode_batch(as_numpy) == 1
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert predictor_module.default_decode_batch(placed) == 1
    assert predictor_module.default_decode_batch(as_numpy) == predictor_module.DECODE_BATCH
