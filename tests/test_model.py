"""The functional core and its wrappers: prompts, buckets and compilation, dtypes, checkpoints, demo."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.checkpoint import load_model, load_params, save_params
from sam_jax.config import SamConfig, get_config, with_overrides
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.model import SamModel, init_params
from sam_jax.modeling.prompt_encoder import token_mask
from sam_jax.prompts import bucket_size, make_prompts
from sam_jax.train.trainer import load_config_file, recipe_model

# The demo recipe's model (`tiny_p8`: 8-px patches, high-res features, click maps).
P8_MODEL = recipe_model(load_config_file("shapes_p8"))


def test_token_mask_matches_official_padding_rule():
    labels = jnp.array(
        [
            [1, 0, -1, -1],  # points, no box: one padding token (the first -1)
            [2, 3, -1, -1],  # box only: no padding token
            [1, 2, 3, -1],  # points and box: no padding token
            [-1, -1, -1, -1],  # nothing (mask only): no tokens
        ]
    )
    expected = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(token_mask(labels), np.array(expected, bool))


def test_buckets_and_prompt_layout():
    assert [bucket_size(n) for n in (1, 4, 5, 64, 65, 130)] == [4, 4, 8, 64, 128, 192]
    p = make_prompts(
        batch_size=2,
        mask_size=16,
        point_coords=np.ones((2, 3, 2)),
        point_labels=np.ones((2, 3)),
        boxes=np.zeros((2, 4)),
    )
    assert p.points.shape == (2, 8, 2) and p.labels.shape == (2, 8)  # 3 points + 2 corners -> bucket 8
    np.testing.assert_array_equal(p.labels[0], [1, 1, 1, 2, 3, -1, -1, -1])
    assert p.mask_input.shape == (2, 16, 16) and not p.has_mask.any()
    with pytest.raises(ValueError, match="num_points=2"):
        make_prompts(
            batch_size=1, mask_size=16, point_coords=np.ones((1, 2, 2)), point_labels=np.ones((1, 2)), num_points=2
        )


def test_one_compile_per_bucket(tiny_params, tiny_config):
    """Every point count and prompt mix within a bucket reuses one compiled decoder."""
    model = SamModel(tiny_config, tiny_params)
    e, c = tiny_config.embedding_size, tiny_config.prompt_embed_dim
    emb = ImageEmbeddings(jnp.zeros((1, e, e, c)))
    kw = dict(batch_size=1, mask_size=tiny_config.low_res_mask_size)
    for n in (1, 2, 3):
        model.decode(emb, make_prompts(**kw, point_coords=np.ones((1, n, 2)), point_labels=np.ones((1, n))))
    model.decode(emb, make_prompts(**kw, boxes=np.array([[1.0, 2, 30, 40]])))
    model.decode(
        emb,
        make_prompts(
            **kw,
            boxes=np.array([[1.0, 2, 30, 40]]),
            mask_input=np.zeros((1, tiny_config.low_res_mask_size, tiny_config.low_res_mask_size)),
        ),
    )
    assert model._decode._cache_size() == 1
    model.decode(emb, make_prompts(**kw, point_coords=np.ones((1, 5, 2)), point_labels=np.ones((1, 5))))
    assert model._decode._cache_size() == 2


def test_bfloat16_compute_keeps_float32_params(tiny_params, tiny_config, photo):
    from sam_jax.transforms import ResizeLongestSide, preprocess

    f32 = SamModel(tiny_config, tiny_params)
    bf16 = f32.with_dtype("bfloat16")
    assert bf16.config.dtype == "bfloat16" and all(a.dtype == np.float32 for a in jax.tree.leaves(bf16.params))
    image = ResizeLongestSide(tiny_config.image_size).apply_image(photo)
    x = preprocess(jnp.asarray(image)[None], tiny_config)
    prompts = make_prompts(
        batch_size=1, mask_size=64, point_coords=np.array([[[100.0, 80.0]]]), point_labels=np.ones((1, 1))
    )
    outs = [m.decode(m.encode(x), prompts) for m in (f32, bf16)]
    assert outs[1][0].dtype == jnp.float32  # logits accumulate in float32
    a, b = np.asarray(outs[0][0]) > 0, np.asarray(outs[1][0]) > 0
    assert (a == b).mean() > 0.95


def test_config_round_trip():
    for cfg in [get_config(name) for name in ("vit_b", "vit_l", "vit_h", "tiny")] + [P8_MODEL]:
        assert SamConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        hash(cfg)  # frozen and hashable: a static argument of jitted functions
    p8 = P8_MODEL  # the demo model: a 32x32 grid, 128x128 logits, windowed attention only
    assert (p8.embedding_size, p8.low_res_mask_size, p8.image_encoder.global_attn_indexes) == (32, 128, ())
    with pytest.raises(ValueError, match="unknown model type 'vit_x'"):
        get_config("vit_x")


def test_a_recipe_defines_its_variant_with_overrides():
    """A variant is a registry model plus nested overrides (`with_overrides`), not a registry entry."""
    tiny = get_config("tiny")
    p8 = with_overrides(tiny, {"name": "p8", "image_encoder": {"patch_size": 8, "global_attn_indexes": [0]}})
    assert (p8.name, p8.image_encoder.patch_size, p8.image_encoder.global_attn_indexes) == ("p8", 8, (0,))
    assert p8.mask_decoder == tiny.mask_decoder and tiny.image_encoder.patch_size == 16  # the rest untouched
    assert "tiny_p8" not in __import__("sam_jax.config", fromlist=["CONFIGS"]).CONFIGS
    with pytest.raises(ValueError, match="model override 'depthh'"):
        with_overrides(tiny, {"image_encoder": {"depthh": 2}})
    with pytest.raises(ValueError, match="'image_encoder' must be a mapping"):
        with_overrides(tiny, {"image_encoder": 3})


def test_conv_stem_replaces_the_patch_projection():
    """`ImageEncoderConfig.conv_stem`: 3x3 convolutions (LayerNorm, GELU), the first log2(patch)
    of stride 2, then a 1x1 projection, checked against the same computation written out with
    lax convolutions; no patch projection in the params; a config round trip; bad widths."""
    from sam_jax.config import ImageEncoderConfig
    from sam_jax.modeling.image_encoder import ConvStem

    base = P8_MODEL
    cfg = dataclasses.replace(base, image_encoder=dataclasses.replace(base.image_encoder, conv_stem=(8, 16, 16, 12)))
    assert SamConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    params = init_params(cfg, jax.random.key(0))["image_encoder"]
    assert "patch_embed" not in params
    assert sorted(params["conv_stem"]) == [
        "conv_0",
        "conv_1",
        "conv_2",
        "conv_3",
        "norm_0",
        "norm_1",
        "norm_2",
        "norm_3",
        "proj",
    ]
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3), jnp.float32)
    stem = params["conv_stem"]
    out = ConvStem((8, 16, 16, 12), 8, 64).apply({"params": stem}, images)
    x = images
    for i, stride in enumerate((2, 2, 2, 1)):
        p = stem[f"conv_{i}"]
        x = jax.lax.conv_general_dilated(
            x, p["kernel"], (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = x + p["bias"]
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        x = (x - mu) / jnp.sqrt(var + 1e-6) * stem[f"norm_{i}"]["scale"] + stem[f"norm_{i}"]["bias"]
        x = jax.nn.gelu(x, approximate=False)
    want = x @ stem["proj"]["kernel"][0, 0] + stem["proj"]["bias"]
    assert out.shape == (2, 8, 8, 64)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-4, atol=1e-4)
    model = SamModel(cfg, init_params(cfg, jax.random.key(0)))
    assert model.encode(np.zeros((1, cfg.image_size, cfg.image_size, 3), np.float32)).embedding.shape[1:3] == (32, 32)
    for bad in (
        dict(patch_size=8, conv_stem=(8, 8)),
        dict(patch_size=12, conv_stem=(8, 8, 8, 8)),
        dict(patch_size=8, conv_stem=(8, 0, 8)),
    ):
        with pytest.raises(ValueError, match="conv_stem"):
            ImageEncoderConfig(**bad)
    from sam_jax.convert.keys import key_table

    plain = get_config("tiny")  # no high-res features either: only the stem stops the official key names
    with pytest.raises(ValueError, match="convolutional stem"):
        key_table(
            dataclasses.replace(plain, image_encoder=dataclasses.replace(plain.image_encoder, conv_stem=(8, 8, 8, 8)))
        )


def test_high_res_features_land_on_their_pixels():
    """SAM 2-style high-res features (`tiny_p8`): in the decoder's sub-pixel layout each stem
    pixel's stride-2 feature reaches exactly its own logit, through `decode`; embeddings of a
    model with or without them are refused by the other."""
    from sam_jax.config import ImageEncoderConfig
    from sam_jax.convert.keys import key_table
    from sam_jax.model import decode, encode
    from sam_jax.modeling.mask_decoder import subpixel_high_res

    rng = np.random.default_rng(0)
    s1, s0 = rng.normal(size=(2, 6, 8, 3)).astype(np.float32), rng.normal(size=(2, 12, 16, 5)).astype(np.float32)
    t1, t0 = map(np.asarray, subpixel_high_res(jnp.asarray(s1), jnp.asarray(s0)))
    assert t1.shape == (2, 3, 4, 2, 2, 3) and t0.shape == (2, 3, 4, 2, 2, 2, 2, 5)
    # The layout: s1's pixel (2i + a, 2j + b) and s0's (4i + 2a + x, 4j + 2b + y) in cell (i, j).
    np.testing.assert_array_equal(t1[1, 2, 3, 1, 0], s1[1, 5, 6])
    np.testing.assert_array_equal(t0[1, 2, 1, 1, 0, 1, 1], s0[1, 11, 5])

    config = P8_MODEL
    c = config.prompt_embed_dim
    params = init_params(config, jax.random.key(0))
    emb = encode(params, jax.random.normal(jax.random.key(1), (1, 256, 256, 3)), config=config)
    h1, h0 = emb.high_res
    assert (
        emb.embedding.shape == (1, 32, 32, c) and h1.shape == (1, 64, 64, c // 4) and h0.shape == (1, 128, 128, c // 8)
    )
    one = make_prompts(batch_size=1, mask_size=128, point_coords=np.zeros((1, 1, 2)), point_labels=np.ones((1, 1)))
    with pytest.raises(ValueError, match="come with high-res features.*computed by another model"):
        decode(params, ImageEmbeddings(emb.embedding), one, config=config)
    tiny = get_config("tiny")
    with pytest.raises(ValueError, match=r"this model's are \(B, 16, 16, 32\).*computed by another model"):
        decode(init_params(tiny, jax.random.key(0)), emb, one, config=tiny)
    prompts = make_prompts(
        batch_size=1, mask_size=128, point_coords=np.array([[[100.0, 80.0]]]), point_labels=np.ones((1, 1))
    )
    base = np.asarray(decode(params, emb, prompts, config=config)[0])
    # Nudge the stride-2 feature of logit pixel (22, 29).
    bumped = emb.replace(high_res=(h1, h0.at[0, 22, 29, 0].add(5.0)))
    diff = np.abs(np.asarray(decode(params, bumped, prompts, config=config)[0]) - base).max(axis=1)[0]
    assert diff[22, 29] > 0 and np.count_nonzero(diff) == 1
    from sam_jax.predictor import SamPredictor

    predictor = SamPredictor(SamModel(config, params))
    predictor.set_image(np.zeros((192, 256, 3), np.uint8))
    assert predictor.features.high_res[1].shape == (1, 128, 128, c // 8)  # the decoder's input, high-res included
    assert predictor.get_image_embedding().shape == (1, c, 32, 32)  # the official view

    with pytest.raises(ValueError, match="patch_size divisible by 4"):
        ImageEncoderConfig(patch_size=6, high_res_channels=8)
    with pytest.raises(ValueError, match="cannot be converted"):
        key_table(config)


def test_click_maps_are_drawn_around_the_prompts():
    """`click_maps`: Gaussians around the nearest positive and negative point and the box's
    inside, on the logits' grid, points at their pixel's centre; padding ignored."""
    from sam_jax.modeling.prompt_encoder import click_maps

    points = jnp.array([[[40.0, 50.0], [100.0, 10.0], [10.0, 20.0], [60.0, 80.0]], [[0.0, 0.0]] * 4])
    labels = jnp.array([[1, 0, 2, 3], [-1, -1, -1, -1]])
    maps = np.asarray(click_maps(points, labels, 256, 128, (4.0, 8.0)))
    assert maps.shape == (2, 128, 128, 5)
    ys, xs = (np.arange(128) + 0.5) * 2.0, (np.arange(128) + 0.5) * 2.0
    d2 = (ys[:, None] - 50.5) ** 2 + (xs[None, :] - 40.5) ** 2
    np.testing.assert_allclose(maps[0, ..., 0], np.exp(-d2 / 32.0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps[0, ..., 1], np.exp(-d2 / 128.0), rtol=1e-5, atol=1e-7)
    d2 = (ys[:, None] - 10.5) ** 2 + (xs[None, :] - 100.5) ** 2
    np.testing.assert_allclose(maps[0, ..., 3], np.exp(-d2 / 128.0), rtol=1e-5, atol=1e-7)
    inside = ((ys >= 20.5) & (ys <= 80.5))[:, None] & ((xs >= 10.5) & (xs <= 60.5))[None, :]
    np.testing.assert_array_equal(maps[0, ..., 4], inside)
    assert inside.sum() == 30 * 25
    np.testing.assert_array_equal(maps[1], 0.0)  # no prompt: no clicks, no box
    # Two positive points: the nearest one counts, so two points on one pixel draw one bump.
    two = np.asarray(
        click_maps(jnp.array([[[20.0, 20.0], [200.0, 200.0], [20.0, 20.0]]]), jnp.array([[1, 1, 1]]), 256, 128, (4.0,))
    )
    assert two[0, 10, 10, 0] == two[0, 100, 100, 0] == two.max() and two.max() < 1.0 and two[0, 55, 55, 0] < 1e-6


def test_click_maps_start_at_zero_and_move_the_clicked_logits():
    """A decoder with `click_map_sigmas` starts as the same decoder without them (zero-initialised
    click weights); with weights, its logits move around the click; it refuses the official
    conversion and round-trips its config."""
    from sam_jax.config import MaskDecoderConfig
    from sam_jax.convert.keys import key_table
    from sam_jax.model import decode, encode

    p8 = P8_MODEL
    plain = dataclasses.replace(p8, mask_decoder=dataclasses.replace(p8.mask_decoder, click_map_sigmas=()))
    config = dataclasses.replace(p8, mask_decoder=dataclasses.replace(p8.mask_decoder, click_map_sigmas=(4.0, 16.0)))
    assert config.mask_decoder.num_click_maps == 5 and plain.mask_decoder.num_click_maps == 0
    assert SamConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    params = init_params(config, jax.random.key(0))
    dec = params["mask_decoder"]
    weights = {k for k in dec if k.startswith("output_click_weights_")}
    assert weights == {f"output_click_weights_{i}" for i in range(4)}
    plain_params = {**params, "mask_decoder": {k: v for k, v in dec.items() if k not in weights}}
    emb = encode(params, jax.random.normal(jax.random.key(1), (1, 256, 256, 3)), config=config)
    prompts = make_prompts(
        batch_size=1, mask_size=128, point_coords=np.array([[[100.0, 80.0]]]), point_labels=np.ones((1, 1))
    )
    masks, iou = decode(params, emb, prompts, config=config)
    plain_masks, plain_iou = decode(plain_params, emb, prompts, config=plain)
    np.testing.assert_array_equal(masks, plain_masks)
    np.testing.assert_array_equal(iou, plain_iou)
    # Weigh the narrow positive map by 10 in every mask token (bias only): +10 at the click.
    bias = jnp.zeros(5).at[0].set(10.0)
    bumped = {**params, "mask_decoder": {**dec, **{k: {**dec[k], "bias": bias} for k in weights}}}
    diff = np.asarray(decode(bumped, emb, prompts, config=config)[0] - masks)[0]  # (3, 128, 128)
    np.testing.assert_allclose(
        diff[:, 40, 50], 10.0 * np.exp(-((81.0 - 80.5) ** 2 + (101.0 - 100.5) ** 2) / 32.0), rtol=1e-4
    )
    assert np.abs(diff[:, :20]).max() < 1e-3  # 40+ px from the click
    with pytest.raises(ValueError, match="takes 5 click maps"):
        from sam_jax.modeling.mask_decoder import MaskDecoder

        MaskDecoder(config.mask_decoder, transformer_dim=32).init(
            jax.random.key(0),
            jnp.zeros((1, 4, 4, 32)),
            jnp.zeros((1, 4, 4, 32)),
            jnp.zeros((1, 1, 32)),
            jnp.zeros((1, 4, 4, 32)),
            jnp.ones((1, 1), bool),
            True,
        )
    with pytest.raises(ValueError, match="click_map_sigmas must be positive"):
        MaskDecoderConfig(click_map_sigmas=(4.0, 0.0))
    tiny = get_config("tiny")  # no high-res features or stem: only the click maps stop the official key names
    with pytest.raises(ValueError, match="has click maps"):
        key_table(
            dataclasses.replace(tiny, mask_decoder=dataclasses.replace(tiny.mask_decoder, click_map_sigmas=(4.0,)))
        )


def test_checkpoint_directory_round_trip(tiny_params, tiny_config, tmp_path):
    path = save_params(tmp_path / "ckpt", tiny_params, tiny_config)
    config, params = load_params(path)
    assert config == tiny_config
    jax.tree.map(np.testing.assert_array_equal, params, tiny_params)
    with pytest.raises(FileExistsError):
        save_params(path, tiny_params, tiny_config)  # never overwrites a written checkpoint
    assert load_model(path, dtype="bfloat16").config == dataclasses.replace(tiny_config, dtype="bfloat16")


def test_random_init_has_every_param(tiny_config):
    params = init_params(tiny_config, jax.random.key(0))
    from sam_jax.convert.keys import key_table

    flat = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert flat == {row.flax for row in key_table(tiny_config)}


def test_demo_writes_mask_and_overlay(tiny_params, tiny_config, tmp_path):
    from PIL import Image

    from sam_jax.demo import main

    ckpt = save_params(tmp_path / "tiny", tiny_params, tiny_config)
    main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--point", "200,150", "--cache-dir", ""])
    mask = np.asarray(Image.open(tmp_path / "out" / "mask.png"))
    assert mask.shape == (300, 451) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(tmp_path / "out" / "overlay.png").size == (451, 300)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert len(result["scores"]) == 3 and result["mask_area"] == int((mask > 0).sum())


def test_demo_trains_evaluates_and_segments(tmp_path):
    """`make demo` without a checkpoint, shortened: shapes data, 2 training steps, held-out
    evaluation, point-prompt and automatic overlays, a 2-step decoder fine-tune on the shifted
    domain with its report, result.json."""
    from PIL import Image

    from sam_jax.demo import main

    out = tmp_path / "demo"
    args = ["--out", str(out), "--steps", "2", "--train-images", "8", "--eval-images", "2", "--cache-dir", ""]
    main([*args, "--finetune-steps", "2"])
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and result["model"] == "tiny_p8"
    finetuned = result["finetune"]
    assert finetuned["steps"] == 2 and set(finetuned["before"]) == set(finetuned["after"]) >= {"1-click", "box"}
    report = json.loads((out / "finetune" / "report.json").read_text())
    assert report["mode"] == "decoder" and report["data"]["images"] > 0
    assert result["heldout"]["num_images"] == 2 and 0.0 <= result["heldout"]["miou_1click"] <= 1.0
    auto = result["heldout_auto"]
    assert auto["num_images"] == 2 and auto["gt_per_image"] > 0 and auto["masks_per_image"] >= 0
    assert 0.0 <= auto["gt_recall"] <= 1.0 and 0.0 <= auto["precision"] <= 1.0
    work = out / "train" / "shapes_p8"  # the recipe's own work directory
    assert (work / "model").is_dir() and (work / "metrics.jsonl").is_file()
    for i in range(2):
        for kind in ("points", "auto"):
            assert Image.open(out / f"{kind}_{i}.png").size == (256, 192)


def test_demo_scores_segment_everything_against_ground_truth(tmp_path):
    """`score_auto_masks`: each image's ground-truth masks plus one empty-of-shapes mask find
    every shape (recall 1) and match all but that one."""
    from sam_jax.demo import score_auto_masks
    from sam_jax.train.evaluate import usable_masks
    from sam_jax.train.sa1b import list_records, load_record
    from sam_jax.train.shapes import make_shapes

    make_shapes(tmp_path, 3, seed=0, image_size=(64, 96))
    loaded = [load_record(*r) for r in list_records(tmp_path)]
    stray = np.zeros((64, 96), bool)
    stray[:2, :2] = True
    got = score_auto_masks([([*usable_masks(r["masks"]), stray], r["masks"]) for r in loaded])
    num_gt = sum(len(usable_masks(r["masks"])) for r in loaded)
    assert got["num_images"] == 3 and got["gt_per_image"] == pytest.approx(num_gt / 3)
    assert got["masks_per_image"] == pytest.approx((num_gt + 3) / 3)
    assert got["gt_recall"] == 1.0 and got["precision"] == pytest.approx(num_gt / (num_gt + 3))


def test_demo_with_text_prompts(tmp_path):
    """`python -m sam_jax.demo --text`, shortened: a random CLIP, the kinds pretraining, the
    text recipe from its encoder, the text mIoU of each caption on the held-out images,
    text-prompted overlays."""
    from PIL import Image

    from sam_jax.demo import main

    out = tmp_path / "demo"
    main(
        [
            "--text",
            "--out",
            str(out),
            "--train-images",
            "8",
            "--eval-images",
            "2",
            "--kinds-images",
            "4",
            "--steps",
            "2",
            "--pretrain-steps",
            "2",
            "--cache-dir",
            "",
        ]
    )
    assert len(list((out / "data" / "text_kinds").glob("*.json"))) == 4
    config, trained = load_params(out / "train" / "shapes_text_p8" / "model")
    _, kinds = load_params(out / "train" / "kinds")
    stem = lambda p: p["image_encoder"]["conv_stem"]["conv_0"]["kernel"]  # noqa: E731
    # Text training started from the pretrained encoder (2 small steps away from it; a random
    # init of these 3x3x3 kernels, std ~0.19, would differ from it by ~0.27 an element).
    assert config.image_encoder.conv_stem and np.abs(stem(kinds)).max() > 0.1
    np.testing.assert_allclose(stem(trained), stem(kinds), atol=1e-2)
    result = json.loads((out / "result.json").read_text())
    text = result["heldout_text"]
    assert set(text["per_category"]) <= {"circle", "rectangle", "triangle"} and 0.0 <= text["miou_text"] <= 1.0
    assert (out / "clip" / "tokenizer.json").is_file() and (out / "clip" / "model.safetensors").is_file()
    for i in range(2):
        assert Image.open(out / f"text_{i}.png").size == (256, 192)
        assert set(result["images"][i]["text_masks"]) == {"a circle", "a rectangle", "a triangle"}
    with pytest.raises(SystemExit):
        main(["--text", "--checkpoint", str(out / "train" / "shapes_text_p8" / "model")])


@pytest.mark.parametrize("use_rel_pos", [True, False])
def test_attention_query_chunks_give_the_same_result(use_rel_pos):
    """Global attention over a large grid runs in chunks of query rows; any chunking
    (including none) gives the same output and the same gradients."""
    from sam_jax.modeling.image_encoder import Attention, query_rows

    assert query_rows(64, 64, 256) == 4 and query_rows(14, 14, 256) == 14 and query_rows(7, 9, 10) == 1
    x = jax.random.normal(jax.random.key(0), (2, 12, 10, 32))
    whole = Attention(4, use_rel_pos=use_rel_pos, input_size=(12, 10), query_block=10_000)
    params = whole.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)  # non-zero rel pos
    ref = whole.apply(params, x)
    loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x)))  # noqa: E731
    ref_grad = jax.grad(loss(whole))(params)
    for block in (10, 30, 60):  # 1, 3 and 6 rows per chunk
        chunked = Attention(4, use_rel_pos=use_rel_pos, input_size=(12, 10), query_block=block)
        np.testing.assert_allclose(chunked.apply(params, x), ref, atol=2e-6, rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
            jax.grad(loss(chunked))(params),
            ref_grad,
        )
    # The same attention through `jax.nn.dot_product_attention`, relative positions folded into q and k.
    fused = Attention(4, use_rel_pos=use_rel_pos, input_size=(12, 10), impl="xla")
    np.testing.assert_allclose(fused.apply(params, x), ref, atol=2e-6, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), jax.grad(loss(fused))(params), ref_grad
    )


def test_fold_rel_pos_gives_the_official_logits():
    """q'.k' of the folded form is q.k / sqrt(hd) plus the row and column terms of each key."""
    from sam_jax.modeling.image_encoder import fold_rel_pos

    b, nh, h, w, hd = 1, 2, 3, 4, 8
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, nh, h, w, hd))
    k = jax.random.normal(ks[1], (b, nh, h * w, hd))
    rel_h, rel_w = jax.random.normal(ks[2], (b, nh, h, w, h)), jax.random.normal(ks[3], (b, nh, h, w, w))
    qf, kf = fold_rel_pos(q, k, rel_h, rel_w)
    logits = jnp.einsum("bnqc,bnkc->bnqk", qf, kf).reshape(b, nh, h, w, h, w)
    ref = jnp.einsum("bnhwc,bnyxc->bnhwyx", q, k.reshape(b, nh, h, w, hd)) / np.sqrt(hd)
    ref = ref + rel_h[..., :, None] + rel_w[..., None, :]
    np.testing.assert_allclose(logits, ref, atol=1e-5)


def test_attention_impl_is_checked():
    from sam_jax.config import ImageEncoderConfig
    from sam_jax.modeling.image_encoder import Attention

    with pytest.raises(ValueError, match="attention must be one of"):
        ImageEncoderConfig(attention="flash")
    x = jnp.zeros((1, 4, 4, 16))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        Attention(2, input_size=(4, 4), impl="cudnn").init(jax.random.key(0), x)


def test_encoder_with_xla_attention_matches_chunked(tiny_config, tiny_params, photo):
    """The whole encoder with `attention="xla"` (the folded form) equals the default."""
    from sam_jax.model import encode

    cfg = dataclasses.replace(
        tiny_config, image_encoder=dataclasses.replace(tiny_config.image_encoder, attention="xla")
    )
    images = jax.random.normal(jax.random.key(3), (1, cfg.image_size, cfg.image_size, 3))
    np.testing.assert_allclose(
        encode(tiny_params, images, config=cfg).embedding,
        encode(tiny_params, images, config=tiny_config).embedding,
        atol=2e-5,
        rtol=1e-4,
    )


def test_shared_embedding_without_masks_equals_one_copy_per_prompt(tiny_config, tiny_params):
    """One image's embedding for B prompts without mask inputs (the image side of the decoder's
    first layer run once) gives the masks of B copies with has_mask False."""
    from sam_jax.model import decode, encode

    emb = encode(
        tiny_params,
        jax.random.normal(jax.random.key(0), (1, tiny_config.image_size, tiny_config.image_size, 3)),
        config=tiny_config,
    )
    rng = np.random.default_rng(0)
    prompts = make_prompts(
        batch_size=5,
        mask_size=tiny_config.low_res_mask_size,
        point_coords=rng.uniform(0, tiny_config.image_size, (5, 2, 2)),
        point_labels=np.array([[1, 0]] * 5),
    )
    copies = emb.broadcast_to(5)
    for multimask in (True, False):
        ref_masks, ref_iou = decode(
            tiny_params, copies, jax.tree.map(jnp.asarray, prompts), config=tiny_config, multimask_output=multimask
        )
        masks, iou = decode(
            tiny_params,
            emb,
            jax.tree.map(jnp.asarray, prompts.without_masks()),
            config=tiny_config,
            multimask_output=multimask,
        )
        np.testing.assert_allclose(masks, ref_masks, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(iou, ref_iou, atol=2e-6)
    with_mask = make_prompts(
        batch_size=1,
        mask_size=tiny_config.low_res_mask_size,
        mask_input=np.zeros((1, tiny_config.low_res_mask_size, tiny_config.low_res_mask_size)),
    )
    with pytest.raises(ValueError, match="have a mask input"):
        with_mask.without_masks()


def test_grouped_images_equal_one_copy_per_row():
    """G images for G groups of prompt rows (the training step's K masks an image) give the
    masks of one embedding copy per row, the high-res features included."""
    from sam_jax.model import decode, encode

    config = P8_MODEL
    params = init_params(config, jax.random.key(0))
    s, low = config.image_size, config.low_res_mask_size
    emb = encode(params, jax.random.normal(jax.random.key(1), (2, s, s, 3)), config=config)
    rng = np.random.default_rng(0)
    prompts = make_prompts(
        batch_size=6,
        mask_size=low,
        point_coords=rng.uniform(0, s, (6, 2, 2)),
        point_labels=np.array([[1, 0]] * 6),
        mask_input=rng.normal(size=(6, low, low)),
    )
    prompts = jax.tree.map(jnp.asarray, prompts.replace(has_mask=np.array([True, False, True, True, False, False])))
    copies = jax.tree.map(lambda x: jnp.repeat(x, 3, axis=0), emb)
    ref_masks, ref_iou = decode(params, copies, prompts, config=config, multimask_output=None)
    masks, iou = decode(params, emb, prompts, config=config, multimask_output=None)
    np.testing.assert_allclose(masks, ref_masks, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(iou, ref_iou, atol=2e-6)
    with pytest.raises(ValueError, match="5 prompt rows cannot be split evenly over 2 images"):
        decode(params, emb, jax.tree.map(lambda x: x[:5], prompts), config=config)
