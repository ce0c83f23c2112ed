"""Training with text prompts (caption mode): the data's caption targets, the config checks, and
a short training run that moves the text-prompt mIoU up."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import pytest

from sam_jax.clip_folder import make_random_clip
from sam_jax.config import get_config
from sam_jax.train.configs import shapes_text_tiny
from sam_jax.train.data import prepare_example
from sam_jax.train.shapes import make_shapes
from sam_jax.train.text import (
    CaptionPrompts,
    CropPrompts,
    caption_embeddings,
    check_text_config,
    dataset_categories,
    mask_crop,
    with_text_projection,
)
from sam_jax.train.trainer import TrainingError, model_config
from tests.train_worker import set_keys

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CATEGORIES = ["circle", "rectangle", "triangle"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_random_clip(tmp_path_factory.mktemp("clip"), [f"a {c}" for c in CATEGORIES] + ["a ring", "a star"])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text_shapes")
    make_shapes(out, 12, seed=0, image_size=(96, 128))
    return out


def _record() -> dict:
    """A 64 x 64 image with two circles, a triangle and a mask without a category."""
    masks = np.zeros((4, 64, 64), bool)
    masks[0, 4:20, 4:20] = True  # circle
    masks[1, 40:60, 40:60] = True  # circle
    masks[2, 4:30, 36:60] = True  # triangle
    masks[3, 30:40, 4:14] = True  # no category
    return {
        "image": np.zeros((64, 64, 3), np.uint8),
        "masks": masks,
        "categories": ["circle", "circle", "triangle", ""],
    }


def _targets(prompts, record, chosen, cfg, k):
    usable = np.arange(len(record["masks"]))
    s = cfg.image_size
    return prompts(
        record, chosen=np.asarray(chosen), usable=usable, config=cfg, k=k, hw=(s, s), rng=np.random.default_rng(0)
    )


def test_caption_targets_are_the_union_of_the_category():
    cfg = get_config("tiny")
    captions = {"circle": np.full(5, 1.0, np.float32), "triangle": np.full(5, 2.0, np.float32)}
    prompts = CaptionPrompts(captions)
    record = _record()
    ex = prepare_example(
        record, cfg, masks_per_image=6, max_mask_fraction=0.9, rng=np.random.default_rng(0), text_prompts=prompts
    )
    assert ex["text"].shape == (6, 5) and ex["text_valid"].shape == (6,) and ex["text_masks"].shape == ex["masks"].shape
    plain = prepare_example(record, cfg, masks_per_image=6, max_mask_fraction=0.9, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(plain["masks"], ex["masks"])  # the text path changes nothing else
    assert ex["text_valid"].sum() == 3  # 3 of the 4 masks have a caption; 2 slots are padding
    low = _targets(prompts, record, [0, 1, 2, 3], cfg, 4)
    both_circles = low["text_masks"][0]
    assert np.array_equal(both_circles, low["text_masks"][1]) and both_circles.any() and low["text_masks"][2].any()
    np.testing.assert_array_equal(low["text_valid"], [True, True, True, False])
    np.testing.assert_array_equal(low["text"][0], captions["circle"])
    np.testing.assert_array_equal(low["text"][2], captions["triangle"])
    assert not low["text_masks"][3].any() and not low["text"][3].any()
    # The union is exactly the two circles' cells.
    first = _targets(prompts, {**record, "categories": ["circle", "x", "x", "x"]}, [0], cfg, 1)
    second = _targets(prompts, {**record, "categories": ["x", "circle", "x", "x"]}, [1], cfg, 1)
    np.testing.assert_array_equal(both_circles, first["text_masks"][0] | second["text_masks"][0])


def test_mask_crop_is_the_enlarged_square_box():
    image = np.full((64, 80, 3), 200, np.uint8)
    mask = np.zeros((64, 80), bool)
    mask[10:20, 30:50] = True  # 10 x 20 box, centre (40, 15)
    sides, zeroed = [], 0
    for seed in range(40):
        crop = mask_crop(image, mask, np.random.default_rng(seed))
        assert crop.shape[0] == crop.shape[1] and 20 <= crop.shape[0] <= 40
        c = crop.shape[0]
        centre = crop[c // 2 - 2 : c // 2 + 2, c // 2 - 4 : c // 2 + 4]
        assert (centre == 200).all()  # the mask's middle is kept
        zeroed += bool((crop[0, c // 2] == 0).all())  # above the mask: background, zeroed or not
        sides.append(c)
    assert 5 < zeroed < 35 and max(sides) - min(sides) > 8  # background zeroed about half the time; random enlargement
    # Near the border the crop is zero-padded, the mask stays centred.
    corner = np.zeros((64, 80), bool)
    corner[:6, :6] = True
    crop = mask_crop(image, corner, np.random.default_rng(1))
    assert crop.shape[0] >= 6 and (crop[0, 0] == 0).all()


def test_crop_prompts_embed_large_masks_only():
    cfg = get_config("tiny")
    record = _record()
    seen = []

    def embed(crops):
        seen.extend(crops)
        return np.stack([np.full(3, c.shape[0], np.float32) for c in crops])

    out = _targets(CropPrompts(embed, 3, min_area=300), record, [0, 1, 2, 3], cfg, 5)
    areas = record["masks"].reshape(4, -1).sum(1)  # 256, 400, 624, 100
    np.testing.assert_array_equal(out["text_valid"], list(areas >= 300) + [False])
    assert len(seen) == 2 and all(c.dtype == np.uint8 and c.ndim == 3 for c in seen)
    np.testing.assert_array_equal(out["text"][1], np.full(3, seen[0].shape[0]))
    low = _targets(
        CaptionPrompts({"circle": np.ones(3, np.float32)}),
        {**record, "categories": ["x", "circle", "x", "x"]},
        [1],
        cfg,
        1,
    )
    np.testing.assert_array_equal(out["text_masks"][1], low["text_masks"][0])  # the target is the mask itself


def test_text_config_checks_and_model(clip, shapes):
    cfg = shapes_text_tiny.get_config()
    cfg.data.train_dir = str(shapes)
    with pytest.raises(ValueError, match="needs text.clip"):
        check_text_config(cfg)
    with pytest.raises(TrainingError, match="needs text.clip"):
        model_config(cfg)
    cfg.text.clip = str(clip)
    mc = model_config(cfg)
    assert mc.prompt_encoder.text_embed_dim == 64
    bad = ml_collections.ConfigDict(cfg.to_dict())
    bad.text.mode = "pictures"
    with pytest.raises(ValueError, match="text.mode must be"):
        check_text_config(bad)
    off = ml_collections.ConfigDict(cfg.to_dict())
    off.text.mode = ""
    assert with_text_projection(get_config("tiny"), off).prompt_encoder.text_embed_dim is None


def test_caption_embeddings(clip, shapes):
    from sam_jax.text import TextEncoder

    cfg = shapes_text_tiny.get_config()
    cfg.data.train_dir, cfg.text.clip = str(shapes), str(clip)
    encoder = TextEncoder.from_folder(clip)
    table = caption_embeddings(cfg, encoder)
    assert sorted(table) == CATEGORIES
    np.testing.assert_allclose(table["circle"], encoder.embed_text("a circle")[0], atol=1e-6)
    assert not np.allclose(table["circle"], table["triangle"])
    cfg.text.captions = ""
    assert sorted(caption_embeddings(cfg, encoder)) == dataset_categories(shapes)
    assert set(dataset_categories(shapes)) <= {
        "circle",
        "ellipse",
        "rectangle",
        "triangle",
        "star",
        "pentagon",
        "hexagon",
        "ring",
    }


def _text_config(shapes: Path, clip: Path, **overrides) -> ml_collections.ConfigDict:
    """The text recipe shrunk: text prompts only (no correction iterations), short warmup."""
    cfg = shapes_text_tiny.get_config()
    cfg.data.train_dir, cfg.text.clip = str(shapes), str(clip)
    cfg.data.masks_per_image = 4
    cfg.loss.num_point_iters = cfg.loss.num_no_point_iters = 0
    cfg.loss.text_prob = 1.0
    cfg.optim.warmup_steps = 5
    cfg.steps = cfg.checkpoint.every = 10**6
    return set_keys(cfg, overrides)


@pytest.mark.optimized
def test_training_with_text_moves_the_text_miou_up(clip, tmp_path):
    """300 steps of text prompts on 48 shape images painted by kind (`colour_by_category`: a
    pixel shows its shape's kind, so the tiny encoder need not learn to recognise outlines,
    docs/text-training.md): on 8 held-out images, what "a circle", "a rectangle" and "a triangle" alone select
    (against all shapes of that kind) goes from chance to well above the text-blind level, the
    union of all the image's shapes, which is where a model that ignores the text stops."""
    from sam_jax.train import sharding as shd
    from sam_jax.train.text import evaluate_text
    from sam_jax.train.trainer import Trainer

    coded = dict(image_size=(96, 128), size_range=(0.15, 0.45), colour_by_category=True)
    make_shapes(tmp_path / "train", 48, seed=0, **coded)
    make_shapes(tmp_path / "heldout", 8, seed=1, **coded)
    trainer = Trainer(_text_config(tmp_path / "train", clip), tmp_path / "run", quiet=True)

    def text_miou(data=tmp_path / "heldout") -> dict:
        params = shd.fetch(trainer.state.params, trainer.mesh)
        return evaluate_text(params, trainer.model_config, data, trainer.text_prompts.captions)

    first = text_miou()
    before, blind = first["miou_text"], first["miou_all_shapes"]
    # The text-blind reference (all of an image's shapes as every answer) is 1 where every shape is a circle.
    make_shapes(tmp_path / "circles", 2, seed=0, image_size=(96, 128), categories=("circle",))
    assert text_miou(tmp_path / "circles")["miou_all_shapes"] == 1.0 and 0.0 < blind < 0.5
    logged = [trainer.run_step() for _ in range(300)]
    after = text_miou()
    trainer.close()
    assert bool(logged[-1]["finite"])
    assert before < 0.1 and after["miou_text"] > blind + 0.15, (before, after, blind)
    assert min(after["per_category"].values()) > 0.25, after  # each caption selects its own kind
    # The training metric of the text-prompted masks climbs with it.
    text_iou = np.array([float(m["text_iou"]) for m in logged])
    assert ((text_iou >= 0.0) & (text_iou <= 1.0)).all() and text_iou[-40:].mean() > text_iou[:40].mean() + 0.1, (
        text_iou
    )


def test_image_mode_trains_on_crop_embeddings(clip, shapes, tmp_path):
    """The paper's mode: large masks are prompted by the CLIP embedding of a crop around them."""
    from sam_jax.train.text import CropPrompts
    from sam_jax.train.trainer import Trainer

    cfg = _text_config(shapes, clip, **{"text.mode": "image", "text.min_mask_area": 150})
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    assert isinstance(trainer.text_prompts, CropPrompts) and trainer.model_config.prompt_encoder.text_embed_dim == 64
    batch = next(iter(trainer.dataset))
    assert batch["text_valid"].any() and (batch["text_valid"] <= batch["valid"]).all()
    np.testing.assert_array_equal(batch["text_masks"][batch["text_valid"]], batch["masks"][batch["text_valid"]])
    assert np.abs(batch["text"][batch["text_valid"]]).sum(-1).min() > 0
    for _ in range(2):
        metrics = trainer.run_step()
    trainer.close()
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))


def test_fine_tuning_a_checkpoint_without_text_layers(clip, shapes, tmp_path, tiny_params, tiny_config):
    """`init = checkpoint:PATH` of a model without text layers (an official SAM): its params,
    plus new text layers."""
    from sam_jax.checkpoint import save_params
    from sam_jax.train import sharding as shd
    from sam_jax.train.trainer import Trainer

    path = save_params(tmp_path / "plain", tiny_params, tiny_config)
    trainer = Trainer(_text_config(shapes, clip, init=f"checkpoint:{path}"), tmp_path / "run", quiet=True)
    params = shd.fetch(trainer.state.params, trainer.mesh)
    trainer.close()
    assert "text_embed" in params["prompt_encoder"]
    np.testing.assert_array_equal(
        params["mask_decoder"]["iou_token"]["embedding"], tiny_params["mask_decoder"]["iou_token"]["embedding"]
    )
    # Text rows start from the checkpoint's mask tokens.
    for name in ("mask_tokens", "text_mask_tokens"):
        np.testing.assert_array_equal(
            params["mask_decoder"][name]["embedding"], tiny_params["mask_decoder"]["mask_tokens"]["embedding"]
        )
    np.testing.assert_array_equal(
        params["image_encoder"]["patch_embed"]["proj"]["kernel"],
        tiny_params["image_encoder"]["patch_embed"]["proj"]["kernel"],
    )


def test_dense_text_loss():
    """`train.step.dense_text_loss`: each token's caption among its image's, from the image
    embedding alone. Hand values: zero features give ln 2 between two captions; features along
    the right text-token difference drive it to 0, the wrong one up; a repeated caption counts
    once; cells outside every caption's mask and images with a single caption do not count.
    Wired into the step by `loss.dense_text_weight`."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from sam_jax.config import tiny
    from sam_jax.embeddings import ImageEmbeddings
    from sam_jax.model import Sam, init_params
    from sam_jax.train.step import TrainBatch, dense_text_loss, simulate_and_loss

    base = tiny()
    config = dataclasses.replace(base, prompt_encoder=dataclasses.replace(base.prompt_encoder, text_embed_dim=8))
    params = init_params(config, jax.random.key(0))
    a, b = np.asarray(jax.random.normal(jax.random.key(1), (2, 8)))
    text = jnp.asarray(np.stack([a, b, a, b])[None])  # slots: A, B, A again, B (invalid)
    valid = jnp.asarray([[True, True, True, False]])
    masks = np.zeros((1, 4, 16, 16), bool)  # 4 x 4 cells of 4 x 4 pixels
    masks[0, 0, :8, :8] = masks[0, 2, :8, :8] = True  # A: the top-left 2 x 2 cells
    masks[0, 1, 8:, 8:] = True  # B: the bottom-right ones
    masks[0, 1, 8:10, 4:8] = True  # and half of cell (2, 1)
    masks = jnp.asarray(masks)
    tokens = np.asarray(
        Sam(config).apply({"params": params}, text, method=lambda m, x: m.prompt_encoder.embed_text(x))
    )[0]
    d = tokens[0] - tokens[1]  # along A's text token minus B's
    loss = lambda f, v=valid: float(dense_text_loss(params, ImageEmbeddings(jnp.asarray(f)), text, masks, v, config))  # noqa: E731

    zeros = np.zeros((1, 4, 4, 32), np.float32)
    np.testing.assert_allclose(loss(zeros), np.log(2), rtol=1e-6)
    right = zeros.copy()
    right[0, :2, :2], right[0, 2:, 2:], right[0, 2, 1] = 10 * d, -10 * d, -10 * d
    assert loss(right) < 1e-3
    assert loss(-right) > 5.0
    np.testing.assert_allclose(loss(right, jnp.asarray([[True, True, False, False]])), loss(right), rtol=1e-6)
    elsewhere = right.copy()
    elsewhere[0, 0, 3] = elsewhere[0, 3, 0] = 100 * d  # cells no caption covers
    np.testing.assert_allclose(loss(elsewhere), loss(right), rtol=1e-6)
    assert loss(right, jnp.asarray([[True, False, True, False]])) == 0.0  # one caption: nothing to tell apart

    # In the step: the metric appears, and the weight adds it to the loss.
    big = np.zeros((1, 4, 64, 64), bool)
    big[0, 0, :32, :32] = big[0, 2, :32, :32] = big[0, 1, 32:, 32:] = True
    batch = TrainBatch(
        images=jax.random.normal(jax.random.key(2), (1, 256, 256, 3)),
        masks=jnp.asarray(big),
        valid=jnp.ones((1, 4), bool),
        ids=jnp.zeros((1,), jnp.int32),
        text=text,
        text_valid=valid,
        text_masks=jnp.asarray(big),
    )
    cfg = shapes_text_tiny.get_config().loss
    cfg.num_point_iters, cfg.num_no_point_iters = 0, 0

    def run(c):
        return jax.jit(lambda p: simulate_and_loss(p, batch, jax.random.key(3), model_config=config, cfg=c))(params)

    without, m0 = run(cfg)
    cfg2 = cfg.copy_and_resolve_references()
    cfg2.dense_text_weight = 2.0
    with_, m2 = run(cfg2)
    assert "dense_text_loss" not in m0
    np.testing.assert_allclose(float(with_), float(without) + 2.0 * float(m2["dense_text_loss"]), rtol=1e-5)
