"""HQ-SAM (vit_*_hq: SAM with the HQ token and early-feature fusion) and Light HQ-SAM (vit_tiny_hq:
MobileSAM's TinyViT with the HQ decoder, fusing the TinyViT's stage-1 output) against the official
`segment_anything_hq` package: the decoder for every prompt kind, the predictor end to end on the
photo (small configs and the full-size vit_b_hq and vit_tiny_hq, every parameter randomized), the
generator, the converter's round trip, its model-type detection and its refusals."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load_safetensors

from bench.official import randomize_, sharpen_, state_dict_numpy
from bench.official_hq import build_official_hq, official_mask_generator, official_predictor, segment_anything_hq
from bench.official_mobile_sam import build_official_mobile_sam
from sam_jax.config import SamConfig, TinyViTConfig, get_config, tiny, vit_b_hq, vit_t, vit_tiny_hq
from sam_jax.convert.errors import CheckpointError
from sam_jax.convert.state_dict import infer_model_type, to_flax, to_official
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.model import SamModel, abstract_params, decode
from sam_jax.predictor import SamPredictor
from sam_jax.prompts import make_prompts
from tests.test_automatic_mask_generator import assert_records_match
from tests.test_mobile_sam import small_config as small_mobile_sam_config

ATOL = 1e-4


def with_hq(config: SamConfig) -> SamConfig:
    """`config` with the HQ decoder, named with the suffix _hq."""
    return dataclasses.replace(
        config, name=f"{config.name}_hq", mask_decoder=dataclasses.replace(config.mask_decoder, hq_token=True)
    )


def small_config() -> SamConfig:
    """The tiny SAM (256 px, 16 x 16 grid, width 64, global blocks 1 and 3) with the HQ decoder."""
    return with_hq(tiny())


def small_light_config() -> SamConfig:
    """A small Light HQ-SAM: the small MobileSAM of test_mobile_sam (1024 px, the official TinyViT's
    fixed grids; stage 1's output 64 x 64 x 24) with the HQ decoder."""
    return with_hq(small_mobile_sam_config())


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


def close(ours, ref, atol=ATOL) -> float:
    """Assert equal shapes and values within `atol`; return the largest difference."""
    ours, ref = np.asarray(ours), np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)
    return float(np.max(np.abs(ours - ref), initial=0.0))


def randomized(config: SamConfig, seed: int = 0):
    """The official HQ-SAM with every tensor random (the HQ layers included)."""
    return randomize_(build_official_hq(config), seed=seed)


def sharpened(config: SamConfig, seed: int, logit_scale: float = 100.0):
    """`randomized`, with confident masks (`sharpen_`), the HQ token's hypernetwork scaled as SAM's."""
    ref = sharpen_(randomized(config, seed), logit_scale=logit_scale)
    with torch.no_grad():
        ref.mask_decoder.hf_mlp.layers[2].weight.mul_(logit_scale)
    return ref


@pytest.fixture(scope="module")
def small():
    config = small_config()
    ref = randomized(config)
    return config, ref, to_flax(state_dict_numpy(ref), config)


# ----------------------------------------------------------------------------- decoder

PROMPT_CASES = {
    "points": dict(points=[[50.0, 80.0], [120.0, 30.5]], labels=[1, 0]),
    "box": dict(box=[30.0, 40.0, 180.0, 150.0]),
    "box_points": dict(points=[[60.0, 70.0]], labels=[1], box=[30.0, 40.0, 180.0, 150.0]),
    "mask": dict(mask=True),
    "points_mask": dict(points=[[60.0, 70.0], [10.0, 150.0]], labels=[1, 0], mask=True),
}


@pytest.fixture(scope="module")
def features(small):
    """Random image embeddings (1, h, w, C), early ViT features (1, h, w, D) and a mask prompt."""
    config = small[0]
    rng = np.random.default_rng(5)
    e, m = config.embedding_size, config.low_res_mask_size
    emb = rng.normal(size=(1, e, e, config.prompt_embed_dim)).astype(np.float32)
    interm = rng.normal(size=(1, e, e, config.image_encoder.interm_dim)).astype(np.float32)
    return emb, interm, (3 * rng.normal(size=(1, 1, m, m))).astype(np.float32)


@pytest.mark.parametrize("hq_token_only", [False, True])
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_decoder(small, features, case, multimask, hq_token_only):
    config, ref, params = small
    emb, interm, mask = features
    spec = PROMPT_CASES[case]
    points = (t([spec["points"]]).float(), t([spec["labels"]])) if "points" in spec else None
    box = t([spec["box"]]).float() if "box" in spec else None
    with torch.no_grad():
        sparse, dense = ref.prompt_encoder(points, box, t(mask) if spec.get("mask") else None)
        ref_masks, ref_iou = ref.mask_decoder(
            t(emb).permute(0, 3, 1, 2),
            ref.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output=multimask,
            hq_token_only=hq_token_only,
            interm_embeddings=t(interm)[None],
        )
    prompts = make_prompts(
        batch_size=1,
        mask_size=config.low_res_mask_size,
        point_coords=np.array([spec["points"]]) if "points" in spec else None,
        point_labels=np.array([spec["labels"]]) if "points" in spec else None,
        boxes=np.array([spec["box"]]) if "box" in spec else None,
        mask_input=mask[:, 0] if spec.get("mask") else None,
    )
    embeddings = ImageEmbeddings(jnp.asarray(emb), interm=jnp.asarray(interm))
    masks, iou = decode(
        params, embeddings, prompts, config=config, multimask_output=multimask, hq_token_only=hq_token_only
    )
    assert masks.shape == (1, 1, *mask.shape[2:]) and iou.shape == (1, 1)
    close(masks, ref_masks)
    close(iou, ref_iou)


def test_decoder_checks_its_inputs(small, features):
    config, _, params = small
    emb, interm, _ = features
    prompts = make_prompts(batch_size=1, mask_size=config.low_res_mask_size, boxes=np.array([[10.0, 20, 90, 100]]))
    with pytest.raises(ValueError, match="come with early ViT features"):
        decode(params, ImageEmbeddings(jnp.asarray(emb)), prompts, config=config)
    with pytest.raises(ValueError, match="this model's 64 channels"):  # a TinyViT's 24-wide stage-1 output
        decode(params, ImageEmbeddings(jnp.asarray(emb), interm=jnp.asarray(interm[..., :24])), prompts, config=config)
    with pytest.raises(ValueError, match="multimask_output must be True or False"):
        decode(
            params,
            ImageEmbeddings(jnp.asarray(emb), interm=jnp.asarray(interm)),
            prompts,
            config=config,
            multimask_output=None,
        )
    with pytest.raises(ValueError, match="hq_token_only needs an HQ-SAM model"):
        decode(params, ImageEmbeddings(jnp.asarray(emb)), prompts, config=tiny(), hq_token_only=True)


# ----------------------------------------------------------------------------- end to end


def run_predictor(ref, params, config: SamConfig, photo: np.ndarray, cases) -> dict[str, float]:
    """The official HQ `SamPredictor` against ours on one photo, for each (name, kwargs): the image
    embedding, the early ViT features and the low-res logits within 1e-4, IoUs within 1e-4, and
    equal masks wherever the official logit is not within rounding of the threshold."""
    official = official_predictor(ref)
    official.set_image(photo)
    ours = SamPredictor(SamModel(config, params))
    ours.set_image(photo)
    errors = {"embedding": close(ours.get_image_embedding(), official.get_image_embedding())}
    errors["interm"] = close(ours.features.interm, official.interm_features[0])
    for name, kwargs in cases:
        masks, iou, low = ours.predict(**kwargs)
        ref_masks, ref_iou, ref_low = official.predict(**kwargs)
        ref_logits = official.predict(**kwargs, return_logits=True)[0]
        errors[name] = close(low, ref_low)
        close(iou, ref_iou)
        assert masks.shape == ref_masks.shape and masks.dtype == bool
        sure = np.abs(ref_logits) > 1e-3
        np.testing.assert_array_equal(masks[sure], ref_masks[sure])
        assert sure.mean() > 0.99  # the comparison covers nearly every pixel
    return errors


def photo_cases(photo: np.ndarray, low_res: np.ndarray | None):
    h, w = photo.shape[:2]
    points = np.array([[0.3 * w, 0.4 * h], [0.75 * w, 0.6 * h]])
    box = np.array([0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h])
    cases = [
        ("points", dict(point_coords=points, point_labels=np.array([1, 0]))),
        ("points_hq_only", dict(point_coords=points, point_labels=np.array([1, 0]), hq_token_only=True)),
        ("box_single", dict(box=box, multimask_output=False)),
        ("box_single_hq_only", dict(box=box, multimask_output=False, hq_token_only=True)),
        ("box_points", dict(point_coords=points[:1], point_labels=np.array([0]), box=box)),
    ]
    if low_res is not None:
        cases.append(("mask", dict(point_coords=points, point_labels=np.array([1, 1]), mask_input=low_res)))
    return cases


def test_predictor_small_photo(small, photo):
    config, ref, params = small
    low_res = (3 * np.random.default_rng(8).normal(size=(1, 64, 64))).astype(np.float32)
    errors = run_predictor(ref, params, config, photo, photo_cases(photo, low_res))
    print("max errors (small HQ-SAM, float32):", errors)


@pytest.mark.slow
def test_predictor_vit_b_hq_photo(photo):
    """The full-size HQ-SAM ViT-B, every parameter randomized, on the photo."""
    config = vit_b_hq()
    ref = sharpened(config, seed=9, logit_scale=20.0)
    params = to_flax(state_dict_numpy(ref), config)
    cases = photo_cases(photo, None)
    errors = run_predictor(ref, params, config, photo, [cases[0], cases[3]])
    print("max errors (vit_b_hq, float32):", errors)


@pytest.mark.slow
def test_predictor_vit_tiny_hq_photo(photo):
    """The full-size Light HQ-SAM (TinyViT-5M, its 160-wide stage-1 output as `interm`), every parameter
    randomized, on the photo: points with a mask input (multimask: the best SAM mask plus the HQ mask),
    a box (one mask, the HQ mask alone)."""
    config = vit_tiny_hq()
    ref = sharpened(config, seed=9, logit_scale=20.0)
    params = to_flax(state_dict_numpy(ref), config)
    low_res = (3 * np.random.default_rng(8).normal(size=(1, 256, 256))).astype(np.float32)
    cases = dict(photo_cases(photo, low_res))
    errors = run_predictor(ref, params, config, photo, [(name, cases[name]) for name in ("mask", "box_single_hq_only")])
    print("max errors (vit_tiny_hq, float32):", errors)


def test_generator_matches_official(photo):
    """The generator gives HQ masks (per point: the best SAM mask plus the HQ mask), as the official one."""
    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator

    config = small_config()
    ref = sharpened(config, seed=10)
    model = SamModel(config, to_flax(state_dict_numpy(ref), config))
    settings = dict(points_per_side=5, pred_iou_thresh=0.0, stability_score_thresh=0.2, box_nms_thresh=1.0)
    ours = SamAutomaticMaskGenerator(model, **settings).generate(photo)
    expected = official_mask_generator(ref, **settings).generate(photo)
    assert_records_match(ours, expected)


# ----------------------------------------------------------------------------- config and converter


def test_config_round_trips():
    for name in ("vit_b_hq", "vit_l_hq", "vit_h_hq", "vit_tiny_hq"):
        config = get_config(name)
        assert config.mask_decoder.hq_token and config.name == name
        assert SamConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert get_config("vit_tiny_hq").image_encoder == vit_t().image_encoder
    assert (get_config("vit_tiny_hq").image_encoder.interm_dim, vit_b_hq().image_encoder.interm_dim) == (160, 768)
    with pytest.raises(ValueError, match=r"merge_strides \(2, 2, 2\) downsample after stage 1"):
        with_hq(dataclasses.replace(vit_t(), image_encoder=TinyViTConfig(merge_strides=(2, 2, 2))))


def test_light_hq_matches_the_official_builder():
    """vit_tiny_hq has the tensors of `segment_anything_hq`'s own vit_tiny (`build_sam_vit_t`: TinyViT-5M,
    `MaskDecoderHQ(vit_dim=160)`), each with its shape, and is detected as such (vit_t: test_mobile_sam)."""
    official = {k: tuple(v.shape) for k, v in segment_anything_hq.sam_model_registry["vit_tiny"]().state_dict().items()}
    config = vit_tiny_hq()
    zeros = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), abstract_params(config))
    state_dict = to_official(zeros, config)
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == official
    assert infer_model_type(state_dict) == "vit_tiny_hq"


def test_round_trip_to_the_official_model(small, tmp_path):
    """official .pth -> sam-jax directory -> exported .safetensors -> official strict load: the same
    tensors bit for bit and the same outputs (vit_tiny_hq: `test_registry_and_cli_detect_hq`)."""
    from sam_jax.checkpoint import convert_checkpoint, export_safetensors, load_params

    config, ref, _ = small
    torch.save(ref.state_dict(), tmp_path / "sam_hq.pth")
    assert convert_checkpoint(tmp_path / "sam_hq.pth", tmp_path / "converted", config) == config
    loaded_config, params = load_params(tmp_path / "converted")
    assert loaded_config == config
    export_safetensors(params, config, tmp_path / "exported.safetensors")
    reloaded = build_official_hq(config)
    reloaded.load_state_dict(torch_load_safetensors(str(tmp_path / "exported.safetensors")), strict=True)
    reloaded.eval()
    assert list(ref.state_dict()) == list(reloaded.state_dict())
    for (name, a), b in zip(ref.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    image = torch.randn(3, 200, 256, generator=torch.Generator().manual_seed(0))
    record = {"image": image, "original_size": (200, 256), "boxes": torch.tensor([[10.0, 20.0, 150.0, 180.0]])}
    with torch.no_grad():
        a, b = ref([record], multimask_output=True)[0], reloaded([record], multimask_output=True)[0]
    np.testing.assert_array_equal(a["low_res_logits"].numpy(), b["low_res_logits"].numpy())


@pytest.mark.parametrize("name,official_name", [("vit_b_hq", "vit_b"), ("vit_tiny_hq", "vit_tiny")])
def test_registry_and_cli_detect_hq(name, official_name, tmp_path, capsys):
    """`sam-jax convert` detects vit_b_hq and vit_tiny_hq by their shapes and HQ token; `sam-jax export`
    writes HQ-SAM's key names back, which `segment_anything_hq`'s own builder loads strictly;
    `sam_model_registry[name]` loads the official .pth."""
    from sam_jax import sam_model_registry
    from sam_jax.cli import main

    build_official = segment_anything_hq.sam_model_registry[official_name]
    ref = randomize_(build_official().eval(), seed=11)
    torch.save(ref.state_dict(), tmp_path / "sam_hq.pth")
    assert main(["convert", str(tmp_path / "sam_hq.pth"), str(tmp_path / "converted")]) == 0
    assert f"({name})" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "converted"), str(tmp_path / "sam_hq.safetensors")]) == 0
    reloaded = build_official()
    reloaded.load_state_dict(torch_load_safetensors(str(tmp_path / "sam_hq.safetensors")), strict=True)
    assert list(ref.state_dict()) == list(reloaded.state_dict())
    for (key, a), b in zip(ref.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), key
    model = sam_model_registry[name](checkpoint=tmp_path / "sam_hq.pth")
    assert model.config == get_config(name)


def test_wrong_variants_are_refused(small, official_tiny, tmp_path):
    """A SAM checkpoint as an HQ-SAM model, and an HQ-SAM checkpoint as a SAM model."""
    from sam_jax.checkpoint import load_model

    config, ref, _ = small
    torch.save(official_tiny.state_dict(), tmp_path / "sam.pth")
    torch.save(ref.state_dict(), tmp_path / "sam_hq.pth")
    with pytest.raises(CheckpointError, match=r"a SAM checkpoint without HQ-SAM's HQ token .* load it as tiny"):
        load_model(tmp_path / "sam.pth", config)
    with pytest.raises(CheckpointError, match="an HQ-SAM checkpoint .* given as the SAM model tiny"):
        load_model(tmp_path / "sam_hq.pth", tiny())


def test_light_hq_wrong_variants_are_refused(tmp_path):
    """A MobileSAM checkpoint as Light HQ-SAM and the reverse, each pointed to the other; a Light HQ-SAM
    checkpoint as the ViT's HQ-SAM."""
    from sam_jax import sam_model_registry
    from sam_jax.checkpoint import load_model

    ref = randomized(small_light_config(), seed=1)
    mobile_sam = randomize_(build_official_mobile_sam(small_mobile_sam_config()), seed=2)
    torch.save(mobile_sam.state_dict(), tmp_path / "mobile_sam.pth")
    torch.save(ref.state_dict(), tmp_path / "light_hq.pth")
    with pytest.raises(CheckpointError, match=r"without HQ-SAM's HQ token .* model vit_tiny_hq: load it as vit_t,"):
        sam_model_registry["vit_tiny_hq"](checkpoint=tmp_path / "mobile_sam.pth")
    with pytest.raises(CheckpointError, match=r"given as the SAM model vit_t: load it as vit_tiny_hq "):
        sam_model_registry["vit_t"](checkpoint=tmp_path / "light_hq.pth")
    with pytest.raises(CheckpointError, match=r"load it as vit_t_small_hq "):
        load_model(tmp_path / "light_hq.pth", small_mobile_sam_config())
    with pytest.raises(CheckpointError, match="does not match the vit_b_hq model"):
        sam_model_registry["vit_b_hq"](checkpoint=tmp_path / "light_hq.pth")
