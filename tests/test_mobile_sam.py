"""MobileSAM (vit_t, the TinyViT encoder) against the official `mobile_sam` package: per module on
non-square grids, the encoder and the predictor end to end on the photo (a small config and the
full-size vit_t, every parameter randomized), the converter's round trip and refusals, the
generator, and one training step."""

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
from bench.official_mobile_sam import build_official_mobile_sam, modeling, official_mask_generator, official_predictor
from sam_jax.config import MaskDecoderConfig, SamConfig, TinyViTConfig, get_config, vit_t
from sam_jax.convert.errors import CheckpointError
from sam_jax.convert.keys import key_table
from sam_jax.convert.state_dict import infer_model_type, to_flax, to_official
from sam_jax.model import SamModel, abstract_params
from sam_jax.modeling import tiny_vit
from sam_jax.predictor import SamPredictor
from tests.test_automatic_mask_generator import assert_records_match

ATOL = 1e-4
otv = modeling.tiny_vit_sam


def small_config() -> SamConfig:
    """A small MobileSAM the official code builds: its TinyViT fixes a 1024-px input, a 64 x 64 x 256
    output and stride 1 into width 320. Windows of 5, 9 and 6 pad the 128, 64 and 64 grids."""
    return SamConfig(
        name="vit_t_small",
        image_encoder=TinyViTConfig(
            embed_dims=(8, 16, 24, 320),
            depths=(1, 2, 1, 1),
            num_heads=(1, 2, 3, 10),
            window_sizes=(1, 5, 9, 6),
            mlp_ratio=2.0,
            mbconv_expand_ratio=3.0,
            num_classes=10,
        ),
        mask_decoder=MaskDecoderConfig(iou_head_hidden_dim=32, transformer_mlp_dim=64, transformer_num_heads=4),
    )


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


def close(ours, ref, atol=ATOL) -> float:
    """Assert equal shapes and values within `atol`; return the largest difference."""
    ours, ref = np.asarray(ours), np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)
    return float(np.max(np.abs(ours - ref), initial=0.0))


def randomized(config: SamConfig, seed: int = 0) -> modeling.Sam:
    """The official model with every tensor random (`randomize_` also refreshes the attention biases
    that the official TinyViT caches, gathered by offset, in eval mode)."""
    return randomize_(build_official_mobile_sam(config), seed=seed)


@pytest.fixture(scope="module")
def small():
    """The small config, its official model and our params. Random weights give logits of ~0.05
    whose signs a rounding can flip; `sharpen_` scales them to ~1 (x 20) so masks are decided."""
    config = small_config()
    ref = sharpen_(randomized(config), logit_scale=20.0)
    return config, ref, to_flax(state_dict_numpy(ref), config)


# ----------------------------------------------------------------------------- modules


def module_params(ref: torch.nn.Module, build) -> dict:
    """Flax params of an official submodule, by the key table's rows for a model holding it:
    `build(prefix)` gives (config, official prefix, Flax path) of that submodule in the table."""
    config, prefix, path = build
    sd = state_dict_numpy(ref)
    params: dict = {}
    for row in key_table(config):
        if row.official.startswith(prefix + ".") and row.flax[: len(path)] == path:
            node = params
            for part in row.flax[len(path) : -1]:
                node = node.setdefault(part, {})
            node[row.flax[-1]] = row.transform(sd[row.official[len(prefix) + 1 :]])
    assert params, prefix
    return params


def nchw(x: np.ndarray) -> torch.Tensor:
    return t(x).permute(0, 3, 1, 2)


@pytest.mark.parametrize("hw", [(10, 7), (6, 13)])
def test_mbconv_non_square(hw):
    config = small_config()
    ref = randomize_(otv.MBConv(8, 8, 3.0, torch.nn.GELU, 0.0), seed=1).eval()
    params = module_params(ref, (config, "image_encoder.layers.0.blocks.0", ("image_encoder", "layers_0", "blocks_0")))
    x = np.random.default_rng(2).normal(size=(2, *hw, 8)).astype(np.float32)
    with torch.no_grad():
        expected = ref(nchw(x)).permute(0, 2, 3, 1)
    close(tiny_vit.MBConv(3.0).apply({"params": params}, jnp.asarray(x)), expected)


@pytest.mark.parametrize("hw,out_dim,stride", [((11, 6), 16, 2), ((7, 10), 320, 1)])
def test_patch_merging_non_square(hw, out_dim, stride):
    """Stride 2 (odd sizes round up) and the official stride 1 into width 320."""
    config = small_config()
    config = dataclasses.replace(
        config, image_encoder=dataclasses.replace(config.image_encoder, embed_dims=(8, out_dim, 24, 320))
    )
    ref = randomize_(otv.PatchMerging(hw, 8, out_dim, torch.nn.GELU), seed=3).eval()
    path = ("image_encoder", "layers_0", "downsample")
    params = module_params(ref, (config, "image_encoder.layers.0.downsample", path))
    x = np.random.default_rng(4).normal(size=(2, *hw, 8)).astype(np.float32)
    with torch.no_grad():
        expected = ref(nchw(x))  # (B, H'W', C)
    ours = tiny_vit.PatchMerging(out_dim, stride).apply({"params": params}, jnp.asarray(x))
    assert ours.shape[1:3] == (-(-hw[0] // stride), -(-hw[1] // stride))
    close(ours.reshape(2, -1, out_dim), expected)


@pytest.mark.parametrize("resolution", [(7, 7), (14, 14), (3, 5)])
def test_attention_bias_idxs(resolution):
    ref = otv.Attention(8, 4, num_heads=2, attn_ratio=1, resolution=resolution)
    np.testing.assert_array_equal(tiny_vit.attention_bias_idxs(resolution), ref.attention_bias_idxs.numpy())


@pytest.mark.parametrize("hw,window", [((9, 14), 4), ((14, 9), 4), ((5, 5), 5), ((6, 10), 7)])
def test_tiny_vit_block_non_square(hw, window):
    """One block on non-square grids padded differently in H and W, and on a grid of one window
    (the official code then skips the partition)."""
    dim, heads = 16, 2
    ref = randomize_(otv.TinyViTBlock(dim, hw, heads, window_size=window, mlp_ratio=2.0), seed=5).eval()
    cfg = small_config()
    enc = dataclasses.replace(cfg.image_encoder, window_sizes=(1, window, 9, 6))
    build = (dataclasses.replace(cfg, image_encoder=enc), "image_encoder.layers.1.blocks.0")
    params = module_params(ref, (*build, ("image_encoder", "layers_1", "blocks_0")))
    x = np.random.default_rng(6).normal(size=(2, *hw, dim)).astype(np.float32)
    with torch.no_grad():
        expected = ref(t(x).reshape(2, -1, dim)).reshape(2, *hw, dim)
    ours = tiny_vit.TinyViTBlock(heads, window, mlp_ratio=2.0).apply({"params": params}, jnp.asarray(x))
    close(ours, expected)


def test_encoder_small(small):
    config, ref, params = small
    x = np.random.default_rng(7).normal(size=(2, 1024, 1024, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref.image_encoder(nchw(x)).permute(0, 2, 3, 1)
    model = SamModel(config, params)
    close(model.encode(jnp.asarray(x)).embedding, expected)


def test_float64_is_exact():
    """In float64 an MBConv and a TinyViT block (9 x 14 grid, windows of 5) agree with the official
    ones to ~1e-12: the float32 gaps above are rounding."""
    config, f64 = small_config(), jnp.float64
    cases = [  # official module, its place in the key table, ours, whether it takes (B, C, H, W)
        (otv.MBConv(8, 8, 3.0, torch.nn.GELU, 0.0), "layers.0.blocks.0", tiny_vit.MBConv(3.0, dtype=f64), True),
        (
            otv.TinyViTBlock(16, (9, 14), 2, 5, 2.0),
            "layers.1.blocks.0",
            tiny_vit.TinyViTBlock(2, 5, 2.0, dtype=f64),
            False,
        ),
    ]
    for ref, where, ours, channels_first in cases:
        ref = randomize_(ref, seed=13).double().eval()
        i, j = where.split(".")[1::2]
        params = module_params(ref, (config, f"image_encoder.{where}", ("image_encoder", f"layers_{i}", f"blocks_{j}")))
        c = params["conv1"]["c"]["kernel"].shape[2] if channels_first else params["attn"]["norm"]["scale"].shape[0]
        x = np.random.default_rng(12).normal(size=(2, 9, 14, c))
        with torch.no_grad():
            expected = ref(nchw(x)).permute(0, 2, 3, 1) if channels_first else ref(t(x).reshape(2, -1, c))
        with jax.enable_x64(True):
            out = ours.apply({"params": jax.tree.map(lambda a: jnp.asarray(a, f64), params)}, jnp.asarray(x))
            assert out.dtype == f64
            close(out.reshape(expected.shape), expected, 1e-9)


# ----------------------------------------------------------------------------- end to end


def run_predictor(ref: modeling.Sam, params, config: SamConfig, photo: np.ndarray, cases) -> dict[str, float]:
    """The official `SamPredictor` against ours on one photo, for each (name, kwargs): the image
    embedding and the low-res logits within 1e-4, equal IoUs, and equal masks wherever the official
    logit is not within rounding of the threshold. Returns the largest errors."""
    official = official_predictor(ref)
    official.set_image(photo)
    ours = SamPredictor(SamModel(config, params))
    ours.set_image(photo)
    errors = {"embedding": close(ours.get_image_embedding(), official.get_image_embedding())}  # (1, C, h, w)
    for name, kwargs in cases:
        masks, iou, low = ours.predict(**kwargs)
        ref_logits, ref_iou, ref_low = official.predict(**kwargs, return_logits=True)
        errors[name] = close(low, ref_low)
        close(iou, ref_iou)
        assert masks.shape == ref_logits.shape and masks.dtype == bool
        sure = np.abs(ref_logits) > 1e-3  # the official masks are its logits > 0
        np.testing.assert_array_equal(masks[sure], ref_logits[sure] > official.model.mask_threshold)
        assert sure.mean() > 0.99  # the comparison covers nearly every pixel
    return errors


def photo_cases(photo: np.ndarray, low_res: np.ndarray):
    h, w = photo.shape[:2]
    points = np.array([[0.3 * w, 0.4 * h], [0.75 * w, 0.6 * h]])
    box = np.array([0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h])
    return [
        ("points", dict(point_coords=points, point_labels=np.array([1, 0]))),
        ("points_single", dict(point_coords=points[:1], point_labels=np.array([1]), multimask_output=False)),
        ("box", dict(box=box, multimask_output=False)),
        ("box_points", dict(point_coords=points[:1], point_labels=np.array([0]), box=box)),
        ("mask", dict(point_coords=points, point_labels=np.array([1, 1]), mask_input=low_res)),
    ]


def test_predictor_small_photo(small, photo):
    config, ref, params = small
    low_res = (3 * np.random.default_rng(8).normal(size=(1, 256, 256))).astype(np.float32)
    run_predictor(ref, params, config, photo, photo_cases(photo, low_res))


@pytest.mark.slow
def test_predictor_vit_t_photo(photo):
    """The full-size MobileSAM (TinyViT-5M), every parameter randomized, on the photo."""
    config = vit_t()
    ref = sharpen_(randomized(config, seed=9), logit_scale=20.0)
    params = to_flax(state_dict_numpy(ref), config)
    cases = photo_cases(photo, None)
    run_predictor(ref, params, config, photo, [cases[0], cases[3]])


def test_batch_matches_single_images(small, photo):
    config, _, params = small
    predictor = SamPredictor(SamModel(config, params))
    crop = photo[40:240, 100:400].copy()
    boxes = [np.array([[20.0, 30.0, 200.0, 250.0]]), np.array([[10.0, 10.0, 120.0, 150.0]])]
    predictor.set_image_batch([photo, crop])
    batch = predictor.predict_batch(box_batch=boxes, multimask_output=False)
    for image, box, (_, iou, low) in zip([photo, crop], boxes, zip(*batch)):
        predictor.set_image(image)
        single = predictor.predict(box=box, multimask_output=False)
        close(low, single[2], 1e-5)
        close(iou, single[1], 1e-5)


def test_generator_matches_official(small, photo):
    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator

    config = small[0]
    ref = sharpen_(randomized(config, seed=10))
    model = SamModel(config, to_flax(state_dict_numpy(ref), config))
    settings = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.5, box_nms_thresh=1.0)
    ours = SamAutomaticMaskGenerator(model, **settings).generate(photo)
    expected = official_mask_generator(ref, **settings).generate(photo)
    assert_records_match(ours, expected)


# ----------------------------------------------------------------------------- config and converter


def test_config_round_trips():
    for config in (vit_t(), small_config(), dataclasses.replace(vit_t(), dtype="bfloat16")):
        again = SamConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config
    assert get_config("vit_t").embedding_size == 64 and get_config("vit_t").image_encoder.stride == 16
    with pytest.raises(ValueError, match="merge_strides has 2"):
        TinyViTConfig(merge_strides=(2, 2))
    with pytest.raises(ValueError, match="not divisible into 3 heads"):
        TinyViTConfig(num_heads=(2, 3, 5, 10))


def test_infer_model_type_vit_t():
    config = vit_t()
    zeros = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), abstract_params(config))
    state_dict = to_official(zeros, config)
    assert infer_model_type(state_dict) == "vit_t"
    official = set(build_official_mobile_sam(config).state_dict())
    assert set(state_dict) == official  # the table covers every official tensor, counters included


def test_round_trip_to_the_official_model(small, tmp_path):
    """official .pth -> sam-jax directory -> exported .safetensors -> official strict load: the same
    tensors bit for bit and the same outputs."""
    from sam_jax.checkpoint import convert_checkpoint, export_safetensors, load_params

    config, ref, _ = small
    torch.save(ref.state_dict(), tmp_path / "mobile_sam.pth")
    assert convert_checkpoint(tmp_path / "mobile_sam.pth", tmp_path / "converted", config) == config
    loaded_config, params = load_params(tmp_path / "converted")
    assert loaded_config == config
    export_safetensors(params, config, tmp_path / "exported.safetensors")
    reloaded = build_official_mobile_sam(config)
    reloaded.load_state_dict(torch_load_safetensors(str(tmp_path / "exported.safetensors")), strict=True)
    reloaded.eval()
    for (name, a), b in zip(ref.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_array_equal(ref.image_encoder(x).numpy(), reloaded.image_encoder(x).numpy())


def test_cli_converts_vit_t_by_its_shapes(tmp_path, capsys):
    """`sam-jax convert` detects vit_t; `sam-jax export` writes MobileSAM's key names back."""
    from sam_jax.cli import main

    config = vit_t()
    ref = randomized(config, seed=11)
    torch.save(ref.state_dict(), tmp_path / "mobile_sam.pt")
    assert main(["convert", str(tmp_path / "mobile_sam.pt"), str(tmp_path / "converted")]) == 0
    assert main(["export", str(tmp_path / "converted"), str(tmp_path / "mobile_sam.safetensors")]) == 0
    reloaded = build_official_mobile_sam(config)
    reloaded.load_state_dict(torch_load_safetensors(str(tmp_path / "mobile_sam.safetensors")), strict=True)
    for (name, a), b in zip(ref.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name

    from sam_jax import sam_model_registry

    model = sam_model_registry["vit_t"](checkpoint=tmp_path / "mobile_sam.pt")
    assert model.config == config


def _cli_error(args, capsys) -> str:
    from sam_jax.cli import main

    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sam-jax: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_wrong_variants_are_refused(small, official_tiny, tmp_path, capsys):
    """A SAM checkpoint as vit_t, a MobileSAM one as vit_b, and a TinyViT of unknown widths."""
    from sam_jax import sam_model_registry

    config, ref, _ = small
    torch.save(official_tiny.state_dict(), tmp_path / "sam.pth")
    torch.save(ref.state_dict(), tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match="does not match the vit_t model"):
        sam_model_registry["vit_t"](checkpoint=tmp_path / "sam.pth")
    err = _cli_error(["convert", str(tmp_path / "small.pth"), str(tmp_path / "o"), "--model-type", "vit_b"], capsys)
    assert "does not match the vit_b model" in err and "image_encoder.neck.0.weight (256, 320, 1, 1)" in err
    err = _cli_error(["convert", str(tmp_path / "small.pth"), str(tmp_path / "o")], capsys)
    assert "cannot infer the model type: a TinyViT image encoder (MobileSAM) of widths (8, 16, 24, 320)" in err
    assert not (tmp_path / "o").exists()

    sd = ref.state_dict()
    sd["image_encoder.layers.1.blocks.0.attn.attention_biases"] = torch.zeros(2, 24)
    sd["image_encoder.layers.0.blocks.0.conv1.bn.num_batches_tracked"] = torch.zeros(3, dtype=torch.int64)
    del sd["image_encoder.neck.1.bias"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="mis-shaped") as info:
        from sam_jax.checkpoint import load_model

        load_model(tmp_path / "broken.pth", config)
    assert "attention_biases (2, 24)" in str(info.value) and "num_batches_tracked (3,)" in str(info.value)


# ----------------------------------------------------------------------------- training


def test_one_training_step(tmp_path):
    """The trainer builds a small TinyViT SAM from vit_t and overrides, takes a step with drop
    path and rematerialised blocks: finite loss, the encoder trained, its BatchNorm statistics
    unchanged."""
    from sam_jax.train.shapes import make_shapes
    from sam_jax.train.trainer import Trainer
    from tests.train_worker import small_config as small_train_config

    make_shapes(tmp_path / "shapes", 8, seed=0)
    overrides = {
        "checkpoint.async_save": False,
        "batch_size": 2,
        "optim.warmup_steps": 0,
        "loss.num_point_iters": 0,
        "loss.num_no_point_iters": 0,
    }
    cfg = small_train_config(str(tmp_path / "shapes"), **overrides)
    cfg.model = "vit_t"
    cfg.model_overrides = {  # two stages: MBConv, then TinyViT blocks, 16 px a cell
        "name": "vit_t_train",
        "image_encoder": {
            "img_size": 256,
            "embed_dims": [8, 16],
            "depths": [1, 1],
            "num_heads": [1, 2],
            "window_sizes": [1, 5],
            "merge_strides": [4],
            "num_classes": 4,
        },
        "prompt_embed_dim": 32,
        "mask_decoder": {"iou_head_hidden_dim": 32, "transformer_mlp_dim": 64, "transformer_num_heads": 4},
    }
    cfg.drop_path_rate = 0.1
    cfg.remat = True
    trainer = Trainer(cfg, tmp_path / "work", quiet=True)
    enc = trainer.model_config.image_encoder
    assert isinstance(enc, TinyViTConfig) and enc.remat and enc.drop_path_rate == 0.1 and enc.grid_size == 16
    before = jax.device_get(trainer.state.params["image_encoder"])
    last = trainer.train(steps=1)
    after = jax.device_get(trainer.state.params["image_encoder"])
    trainer.close()
    assert np.isfinite(last["loss"])
    qkv = (
        before["layers_1"]["blocks_0"]["attn"]["qkv"]["kernel"],
        after["layers_1"]["blocks_0"]["attn"]["qkv"]["kernel"],
    )
    assert np.any(qkv[0] != qkv[1])
    assert np.any(before["patch_embed"]["seq_0"]["bn"]["scale"] != after["patch_embed"]["seq_0"]["bn"]["scale"])
    for path in (("patch_embed", "seq_0", "bn", "mean"), ("layers_0", "blocks_0", "conv2", "bn", "var")):
        a, b = before, after
        for p in path:
            a, b = a[p], b[p]
        np.testing.assert_array_equal(a, b, err_msg=str(path))


def test_with_attention_is_refused_with_the_encoder_named():
    """TinyViT has one attention kernel: choosing another is a clear error, not a TypeError."""
    from sam_jax.model import SamModel, abstract_params

    config = get_config("vit_t")
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(config))
    with pytest.raises(ValueError, match="TinyViTConfig"):
        SamModel(config, zeros).with_attention("cudnn")
