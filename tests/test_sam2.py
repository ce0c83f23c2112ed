"""SAM 2.1 for images (sam2.1_hiera_*) against the official `sam2` package (1.1.0): the prompt encoder
and mask decoder with SAM 2's options (object-score token, sigmoid IoU head, dynamic multimask via
stability, boxes as points with the padding point), the predictor end to end on the photo (the full-size
sam2.1_hiera_tiny from an official-format `.pt`: embedding, high-res features, every prompt kind), its batches,
the automatic mask generator's records, the converter's round trip through the official strict loader,
model-type detection and refusals. Every official parameter is randomized (`bench.official.randomize_`)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sam2.build_sam import _load_checkpoint

from bench.official import randomize_, state_dict_numpy
from bench.official_sam2 import OFFICIAL_CONFIGS, OfficialHeads, build_official_sam2
from bench.official_sam2 import SAM2AutomaticMaskGenerator as OfficialSAM2AutomaticMaskGenerator
from bench.official_sam2 import SAM2ImagePredictor as OfficialSAM2ImagePredictor
from sam_jax.build_sam import sam_model_registry
from sam_jax.checkpoint import export_torch, load_state_dict
from sam_jax.config import (
    ImageEncoderConfig,
    MaskDecoderConfig,
    PromptEncoderConfig,
    SamConfig,
    _sam2,
    get_config,
    tiny,
)
from sam_jax.convert.errors import CheckpointError, set_path
from sam_jax.convert.keys import key_table
from sam_jax.convert.keys_sam2 import heads_rows, is_video_key
from sam_jax.convert.state_dict import infer_model_type, shape_check, to_flax
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.model import SamModel, decode
from sam_jax.prompts import make_prompts
from sam_jax.sam2_automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam_jax.sam2_predictor import SAM2ImagePredictor
from tests.test_hq_sam import close, t
from tests.test_sam2_encoder import official_sam2, on_meta, randomized, small_hiera

SAM2_DECODER = MaskDecoderConfig(
    pred_obj_scores=True,
    pred_obj_scores_mlp=True,
    iou_prediction_use_sigmoid=True,
    dynamic_multimask_via_stability=True,
)


def heads_config(base: SamConfig, **decoder) -> SamConfig:
    """`base`'s sizes with SAM 2's prompt encoder and decoder options; a ViT with high-res features stands
    in for the Hiera encoder (the decoder tests feed the official features)."""
    enc = (
        dataclasses.replace(base.image_encoder, high_res_channels=8)
        if isinstance(base.image_encoder, ImageEncoderConfig)
        else base.image_encoder
    )
    return dataclasses.replace(
        base,
        name=f"{base.name}_sam2_heads",
        image_encoder=enc,
        prompt_encoder=dataclasses.replace(base.prompt_encoder, box_corners_as_points=True),
        mask_decoder=dataclasses.replace(base.mask_decoder, **dataclasses.asdict(SAM2_DECODER), **decoder),
    )


def heads_params(ref: torch.nn.Module, config: SamConfig) -> dict:
    """The prompt encoder's and mask decoder's params of `config` from the official heads (all that
    `decode` reads)."""
    params, state = {}, state_dict_numpy(ref)
    for row in heads_rows(config):
        set_path(params, row.flax, row.transform(state[row.official]))
    return params


def official_prompts(spec: dict):
    """As `SAM2ImagePredictor._predict`: the box's corners (labels 2, 3) first, then the points."""
    coords, labels = [], []
    if "box" in spec:
        coords += [spec["box"][:2], spec["box"][2:]]
        labels += [2, 3]
    if "points" in spec:
        coords += spec["points"]
        labels += spec["labels"]
    return (np.array([coords], np.float32), np.array([labels], np.int32)) if labels else (None, None)


# ----------------------------------------------------------------------------- decoder

PROMPT_CASES = {
    "points": dict(points=[[50.0, 80.0], [120.0, 30.5]], labels=[1, 0]),
    "point": dict(points=[[100.0, 140.0]], labels=[1]),
    "box": dict(box=[30.0, 40.0, 180.0, 150.0]),
    "box_points": dict(points=[[60.0, 70.0]], labels=[1], box=[30.0, 40.0, 180.0, 150.0]),
    "mask": dict(mask=True),
    "points_mask": dict(points=[[60.0, 70.0], [10.0, 150.0]], labels=[1, 0], mask=True),
}


@pytest.fixture(scope="module")
def heads():
    config = heads_config(tiny())
    ref = randomize_(OfficialHeads(config), seed=3)
    return config, ref, heads_params(ref, config)


@pytest.fixture(scope="module")
def features(heads):
    """Random image embeddings (1, h, w, C), high-res features s1 (1, 2h, 2w, C/4), s0 (1, 4h, 4w, C/8)
    and a mask prompt (1, 1, 4h, 4w)."""
    config = heads[0]
    rng = np.random.default_rng(5)
    e, c = config.embedding_size, config.prompt_embed_dim
    emb = rng.normal(size=(1, e, e, c)).astype(np.float32)
    s1 = rng.normal(size=(1, 2 * e, 2 * e, c // 4)).astype(np.float32)
    s0 = rng.normal(size=(1, 4 * e, 4 * e, c // 8)).astype(np.float32)
    return emb, (s1, s0), (3 * rng.normal(size=(1, 1, 4 * e, 4 * e))).astype(np.float32)


def run_official_heads(ref, emb, high_res, coords, labels, mask, multimask):
    s1, s0 = high_res
    with torch.no_grad():
        sparse, dense = ref.sam_prompt_encoder(
            None if coords is None else (t(coords), t(labels)), None, None if mask is None else t(mask)
        )
        return ref.sam_mask_decoder(
            image_embeddings=t(emb).permute(0, 3, 1, 2),
            image_pe=ref.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=coords is not None and coords.shape[0] > 1,
            high_res_features=[t(s0).permute(0, 3, 1, 2), t(s1).permute(0, 3, 1, 2)],
        )


@functools.cache
def jitted_decode(config: SamConfig):
    return jax.jit(
        functools.partial(decode, config=config, return_object_scores=True), static_argnames="multimask_output"
    )


def run_ours(config, params, emb, high_res, coords, labels, mask, multimask):
    b = 1 if coords is None else coords.shape[0]
    prompts = make_prompts(
        batch_size=b,
        mask_size=config.low_res_mask_size,
        point_coords=coords,
        point_labels=labels,
        mask_input=None if mask is None else mask[:, 0],
    )
    if mask is None:
        prompts = prompts.without_masks()
    embeddings = ImageEmbeddings(jnp.asarray(emb), high_res=tuple(jnp.asarray(x) for x in high_res))
    return jitted_decode(config)(params, embeddings, prompts, multimask_output=multimask)


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_decoder(heads, features, case, multimask):
    config, ref, params = heads
    emb, high_res, mask = features
    spec = PROMPT_CASES[case]
    coords, labels = official_prompts(spec)
    mask = mask if spec.get("mask") else None
    ref_masks, ref_iou, _, ref_obj = run_official_heads(ref, emb, high_res, coords, labels, mask, multimask)
    masks, iou, obj = run_ours(config, params, emb, high_res, coords, labels, mask, multimask)
    assert masks.shape == (1, 3 if multimask else 1, *mask_shape(config))
    close(masks, ref_masks)
    close(iou, ref_iou)
    close(obj, ref_obj)


def mask_shape(config: SamConfig) -> tuple[int, int]:
    return (config.low_res_mask_size, config.low_res_mask_size)


def test_dynamic_multimask_fallback(heads, features):
    """Single-mask output for 16 single clicks at once (the image shared by the rows), with the stability
    threshold at the median of the rows' mask-0 stability: the unstable rows take their best multimask
    output, as officially (both kinds of row occur)."""
    config, ref, params = heads
    emb, high_res, _ = features
    rng = np.random.default_rng(11)
    coords = rng.uniform(0, config.image_size, size=(16, 1, 2)).astype(np.float32)
    labels = np.ones((16, 1), np.int32)
    dec = ref.sam_mask_decoder
    dec.dynamic_multimask_via_stability = False  # every output, to read mask 0's stability
    try:
        all_masks = run_official_heads(ref, emb, high_res, coords, labels, None, False)[0]  # mask 0
        thresh = float(torch.median(dec._get_stability_scores(all_masks[:, :1])))
        dec.dynamic_multimask_via_stability, dec.dynamic_multimask_stability_thresh = True, thresh
        ref_masks, ref_iou, _, _ = run_official_heads(ref, emb, high_res, coords, labels, None, False)
    finally:
        dec.dynamic_multimask_via_stability = True
        dec.dynamic_multimask_stability_thresh = SAM2_DECODER.dynamic_multimask_stability_thresh
    config = dataclasses.replace(
        config, mask_decoder=dataclasses.replace(config.mask_decoder, dynamic_multimask_stability_thresh=thresh)
    )
    masks, iou, _ = run_ours(config, params, emb, high_res, coords, labels, None, False)
    close(masks, ref_masks)
    close(iou, ref_iou)
    kept = [np.array_equal(ref_masks[i, 0], all_masks[i, 0]) for i in range(16)]
    assert 0 < sum(kept) < 16, "both stable and unstable single masks must occur"


def test_sam_decoder_is_unchanged_by_default():
    """The SAM 2 options default to off: SAM's configs, token layout and outputs are as before."""
    assert MaskDecoderConfig() == dataclasses.replace(
        MaskDecoderConfig(),
        pred_obj_scores=False,
        pred_obj_scores_mlp=False,
        iou_prediction_use_sigmoid=False,
        dynamic_multimask_via_stability=False,
    )
    assert not PromptEncoderConfig().box_corners_as_points
    with pytest.raises(ValueError, match="pred_obj_scores_mlp needs"):
        MaskDecoderConfig(pred_obj_scores_mlp=True)


# ----------------------------------------------------------------------------- predictor, end to end


@pytest.mark.parametrize("hw", [(300, 451), (1024, 1024), (1500, 2250), (3000, 4000), (1371, 997)])
def test_resize_square_is_sam2_transforms(photo, hw):
    """The square input (antialiased bilinear on each axis's taps, then normalised) against
    `SAM2Transforms`, enlarging and shrinking a photo-like image up to 12 MP."""
    from PIL import Image
    from sam2.utils.transforms import SAM2Transforms

    from sam_jax.sam2_predictor import resize_square

    h, w = hw
    image = np.asarray(Image.fromarray(photo).resize((w, h), Image.BICUBIC))
    ref = SAM2Transforms(resolution=1024, mask_threshold=0.0)(image).permute(1, 2, 0).numpy()
    ours = np.asarray(jax.jit(functools.partial(resize_square, size=1024))(image))
    assert ours.shape == ref.shape == (1024, 1024, 3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)
    print(f"resize {h}x{w}: max abs error {np.abs(ours - ref).max():.2e}")


def small_sam2() -> SamConfig:
    """SAM 2.1 with a small Hiera at 1024 px (the official predictor's feature sizes are fixed: levels
    256, 128, 64; stage widths 16 .. 128) and the official 256-wide prompt encoder and decoder."""
    return _sam2("sam2.1_small_test", small_hiera(img_size=1024, d_model=256, window_spec=(8, 4, 14, 7)))


@pytest.fixture(scope="module")
def small_model():
    """The small SAM 2.1 config, the official `SAM2Base` with every tensor random (decided masks:
    `sharpen_sam2_`), and our `SamModel` of its state dict (converted by the key table)."""
    config = small_sam2()
    ref = sharpen_sam2_(official_sam2(config.image_encoder, seed=21))
    return config, ref, SamModel(config, to_flax(state_dict_numpy(ref), config))


def predictor_cases(photo: np.ndarray, low_res: np.ndarray):
    h, w = photo.shape[:2]
    points = np.array([[0.3 * w, 0.4 * h], [0.75 * w, 0.6 * h]])
    box = np.array([0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h])
    boxes = np.array([box, [0.5 * w, 0.1 * h, 0.95 * w, 0.7 * h], [0.0, 0.0, w - 1.0, h - 1.0]])
    return [
        ("points", dict(point_coords=points, point_labels=np.array([1, 0]))),
        ("point_single", dict(point_coords=points[:1], point_labels=np.array([1]), multimask_output=False)),
        ("box", dict(box=box, multimask_output=False)),
        ("box_points", dict(point_coords=points[:1], point_labels=np.array([0]), box=box)),
        ("mask_points", dict(point_coords=points, point_labels=np.array([1, 1]), mask_input=low_res)),
        ("mask_only", dict(mask_input=low_res, multimask_output=False)),
        ("normalized", dict(point_coords=points / [w, h], point_labels=np.array([1, 0]), normalize_coords=False)),
        ("boxes", dict(box=boxes, multimask_output=False)),
        ("points_batch", dict(point_coords=points[:, None], point_labels=np.ones((2, 1), np.int32))),
    ]


def run_predictor(ref, model: SamModel, photo: np.ndarray, cases) -> dict[str, float]:
    """The official `SAM2ImagePredictor` against ours on one photo, for each (name, kwargs): the image
    features and the low-res logits within 1e-4, IoUs within 1e-4, and equal masks wherever the official
    logit is not within 1e-3 of the threshold. Returns the largest errors and the pixels compared."""
    official = OfficialSAM2ImagePredictor(ref)
    official.set_image(photo)
    ours = SAM2ImagePredictor(model)
    ours.set_image(photo)
    feats = official._features
    errors = {
        "embedding": close(ours.get_image_embedding(), feats["image_embed"]),
        "s1": close(ours.features.high_res[0], feats["high_res_feats"][1].permute(0, 2, 3, 1)),
        "s0": close(ours.features.high_res[1], feats["high_res_feats"][0].permute(0, 2, 3, 1)),
    }
    undecided, first_logits = 0, None
    for name, kwargs in cases:
        masks, iou, low = ours.predict(**kwargs)
        ref_logits, ref_iou, ref_low = official.predict(**kwargs, return_logits=True)
        first_logits = ref_logits if first_logits is None else first_logits
        ref_masks = official.predict(**kwargs)[0]
        errors[name] = close(low, ref_low)
        close(iou, ref_iou)
        assert masks.shape == ref_masks.shape and masks.dtype == bool
        sure = np.abs(ref_logits) > 1e-3
        np.testing.assert_array_equal(masks[sure], ref_masks[sure])
        undecided += int(np.sum(masks != ref_masks))
        assert 0.01 < masks.mean() < 0.99 and sure.mean() > 0.99  # decided masks, compared nearly everywhere
    logits = ours.predict(**cases[0][1], return_logits=True)[0]
    np.testing.assert_allclose(logits, first_logits, rtol=1e-5, atol=1e-4)
    errors["masks_differing_pixels"] = undecided
    return errors


@pytest.mark.slow
def test_predictor_hiera_tiny_full_size_photo(photo, tmp_path):
    """The full-size sam2.1_hiera_tiny (every tensor random, masks decided: `sharpen_sam2_`) saved as an
    official `.pt` ({"model": state_dict}) and loaded as a user does, `sam_model_registry[...](checkpoint=)`:
    the embedding, both high-res levels and every prompt case on the photo against the official predictor."""
    ref = sharpen_sam2_(randomized(build_official_sam2("sam2.1_hiera_tiny"), seed=21))
    torch.save({"model": ref.state_dict()}, tmp_path / "sam2.1_hiera_tiny.pt")
    model = sam_model_registry["sam2.1_hiera_tiny"](checkpoint=tmp_path / "sam2.1_hiera_tiny.pt")
    assert model.config == get_config("sam2.1_hiera_tiny")
    low_res = (3 * np.random.default_rng(8).normal(size=(1, 256, 256))).astype(np.float32)
    errors = run_predictor(ref, model, photo, predictor_cases(photo, low_res))
    print(f"predictor (sam2.1_hiera_tiny, {photo.shape[1]}x{photo.shape[0]} photo): max abs errors {errors}")


def sharpen_sam2_(model: torch.nn.Module, pe_scale: float = 8.0, logit_scale: float = 100.0) -> torch.nn.Module:
    """Confident, point-dependent masks from a randomized SAM 2 (as `bench.official.sharpen_` for SAM):
    higher-frequency positional encodings and sharper hypernetwork outputs, in place."""
    with torch.no_grad():
        model.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(pe_scale)
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[2].weight.mul_(logit_scale)
    return model


def test_predictor_batch_matches_single_images(small_model, photo):
    config, _, model = small_model
    predictor = SAM2ImagePredictor(model)
    crop = photo[40:240, 100:400].copy()
    boxes = [np.array([[20.0, 30.0, 200.0, 250.0]]), np.array([[10.0, 10.0, 120.0, 150.0]])]
    predictor.set_image_batch([photo, crop])
    batch = predictor.predict_batch(box_batch=boxes, multimask_output=False)
    for image, box, (_, iou, low) in zip([photo, crop], boxes, zip(*batch)):
        predictor.set_image(image)
        single = predictor.predict(box=box, multimask_output=False)
        close(low, single[2])
        close(iou, single[1])


@pytest.mark.parametrize(
    "settings",
    [
        dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.5, box_nms_thresh=1.0),
        dict(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, use_m2m=True),
    ],
    ids=["grid", "m2m"],
)
def test_generator_matches_official(small_model, photo, settings):
    """Our records against upstream's `SAM2AutomaticMaskGenerator` on the photo: the same masks (pixels
    at the threshold apart), boxes, areas, points, crop boxes, predicted IoUs and stability scores."""
    _, ref, model = small_model
    ours = SAM2AutomaticMaskGenerator(model, **settings).generate(photo)
    expected = OfficialSAM2AutomaticMaskGenerator(ref, **settings).generate(photo)
    assert len(expected) >= 5, "the setting must produce masks to compare"
    assert len(ours) == len(expected)
    key = lambda r: (*r["crop_box"], *r["point_coords"][0], round(r["predicted_iou"], 3))  # noqa: E731
    for o, r in zip(sorted(ours, key=key), sorted(expected, key=key)):
        assert o["point_coords"] == r["point_coords"] and o["crop_box"] == r["crop_box"]
        differ = int(np.sum(o["segmentation"] != r["segmentation"]))
        assert differ <= 10, differ
        assert abs(o["area"] - r["area"]) <= differ and np.abs(np.subtract(o["bbox"], r["bbox"])).max() <= 1
        assert abs(o["predicted_iou"] - r["predicted_iou"]) < 1e-4
        assert abs(o["stability_score"] - r["stability_score"]) < 1e-3


# ----------------------------------------------------------------------------- converter


def official_keys_and_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The state dict shapes of a registered SAM 2.1 model's official `SAM2Base` (built on the meta
    device: no init cost)."""
    cfg = compose(config_name=OFFICIAL_CONFIGS[name])
    OmegaConf.resolve(cfg)
    model = on_meta(lambda: instantiate(cfg.model, _recursive_=True))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def views(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {k: np.broadcast_to(np.empty((), np.float32), s) for k, s in shapes.items()}


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_key_table_and_detection(name):
    """Each size's key table is exactly the official state dict (shapes included), and the model type is
    detected from the shapes; the video-only tensors are the listed patterns."""
    shapes = official_keys_and_shapes(name)
    config = get_config(name)
    assert infer_model_type(views(shapes)) == name
    shape_check("auto")(shapes)  # every tensor has the shape the table gives it (the model's, in its layout)
    table = key_table(config)
    assert [r.official for r in table if is_video_key(r.official)] == [k for k in shapes if is_video_key(k)]
    assert sorted(r.official for r in table) == sorted(shapes)


def test_round_trip_to_the_official_model(small_model, tmp_path):
    """official state dict -> sam-jax -> export (.pt) -> the official strict loader, bit for bit."""
    config, ref, model = small_model
    path = export_torch(model.params, config, tmp_path / "sam2.pt")
    fresh = official_sam2(config.image_encoder, seed=99)
    _load_checkpoint(fresh, str(path))  # raises on a missing or unexpected key
    for key, value in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_cli_converts_and_exports_sam2_1_hiera_tiny(tmp_path, capsys):
    """`sam-jax convert` detects sam2.1_hiera_tiny in an official .pt ({"model": state_dict}); `sam-jax
    export` writes a .pt that `build_sam2(cfg, ckpt_path=...)` loads (strictly) with the same tensors."""
    from sam_jax.cli import main

    ref = randomize_(build_official_sam2("sam2.1_hiera_tiny"), seed=31)
    torch.save({"model": ref.state_dict()}, tmp_path / "in.pt")
    main(["convert", str(tmp_path / "in.pt"), str(tmp_path / "converted")])
    assert "sam2.1_hiera_tiny" in capsys.readouterr().out
    main(["export", str(tmp_path / "converted"), str(tmp_path / "out.pt")])
    back = build_official_sam2("sam2.1_hiera_tiny", ckpt_path=str(tmp_path / "out.pt"))
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_wrong_variants_are_refused(small_model, tmp_path):
    shapes = official_keys_and_shapes("sam2.1_hiera_tiny")
    with pytest.raises(CheckpointError, match="does not match the sam2.1_hiera_large model"):
        shape_check("sam2.1_hiera_large")(shapes)
    with pytest.raises(CheckpointError, match="a SAM 2 checkpoint .* given as the SAM model vit_b"):
        shape_check("vit_b")(shapes)
    sam_shapes = {
        "image_encoder.patch_embed.proj.weight": (768, 3, 16, 16),
        "image_encoder.pos_embed": (1, 64, 64, 768),
    }
    with pytest.raises(CheckpointError, match="without SAM 2's Hiera trunk .* as the SAM 2.1 model"):
        shape_check("sam2.1_hiera_tiny")(sam_shapes)
    sam2_0 = {k: s for k, s in shapes.items() if k != "no_obj_embed_spatial" and not k.startswith("obj_ptr_tpos")}
    with pytest.raises(CheckpointError, match="SAM 2.0"):
        infer_model_type(views(sam2_0))
    with pytest.raises(CheckpointError, match="SAM 2.0"):
        shape_check("sam2.1_hiera_tiny")(sam2_0)
    # A video-only tensor of the wrong shape, or an unknown tensor, in a real file.
    config, ref, _ = small_model
    state = ref.state_dict()
    bad = {**state, "memory_attention.norm.weight": torch.zeros(3)}
    torch.save({"model": bad}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="memory_attention.norm.weight"):
        to_flax(load_state_dict(tmp_path / "bad.pt"), config)
    torch.save({"model": {**state, "memory_attention.extra": torch.zeros(3)}}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="memory_attention.extra"):
        to_flax(load_state_dict(tmp_path / "extra.pt"), config)


def test_one_training_step(tmp_path):
    """The trainer builds a small SAM 2.1 from sam2.1_hiera_tiny and overrides and takes a step of the
    interactive recipe with drop path: a finite loss, the encoder and decoder trained, the video-only
    tensors frozen (`train.optim`: never updated, no weight decay)."""
    from sam_jax.train.shapes import make_shapes
    from sam_jax.train.trainer import Trainer
    from tests.train_worker import small_config as small_train_config

    make_shapes(tmp_path / "shapes", 4, seed=0)
    overrides = {"checkpoint.async_save": False, "batch_size": 2, "optim.warmup_steps": 0}
    cfg = small_train_config(str(tmp_path / "shapes"), **overrides, **{"loss.num_no_point_iters": 0})
    cfg.model = "sam2.1_hiera_tiny"
    small = small_hiera(d_model=32)
    cfg.model_overrides = {
        "name": "sam2_train",
        "image_encoder": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(small).items()},
        "prompt_embed_dim": 32,
        "mask_decoder": {"iou_head_hidden_dim": 32, "transformer_mlp_dim": 64, "transformer_num_heads": 4},
    }
    cfg.drop_path_rate = 0.1
    trainer = Trainer(cfg, tmp_path / "work", quiet=True)
    assert trainer.model_config.image_encoder == dataclasses.replace(small, drop_path_rate=0.1)
    before = jax.device_get(trainer.state.params)
    last = trainer.train(steps=1)
    after = jax.device_get(trainer.state.params)
    trainer.close()
    assert np.isfinite(last["loss"])
    changed = {
        k: [bool(np.any(a != b)) for a, b in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k]))] for k in before
    }
    assert all(changed["image_encoder"]) and sum(changed["mask_decoder"]) > 0.9 * len(changed["mask_decoder"])
    assert len(changed["video"]) == 160 and not any(changed["video"])
