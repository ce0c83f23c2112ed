"""Pretraining the image encoder on the annotations' kinds (`train.pretrain`, `sam-jax
pretrain-kinds`): the per-token targets, a short run that learns colour-coded kinds, and the
checkpoint starting text training as `init = "encoder:PATH"`."""

from __future__ import annotations

import numpy as np
import pytest

from sam_jax.train.configs import shapes_text_p8
from sam_jax.train.pretrain import kind_targets, pretrain_kinds
from sam_jax.train.trainer import recipe_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# The text recipe's model (`tiny_p8_conv`: 8-px cells, a convolutional stem).
CONV_MODEL = recipe_model(shapes_text_p8.get_config())


def test_kind_targets_cover_weight_and_padding():
    """A 64 x 32 image in tiny_p8_conv's frame (256 x 128 of 256 x 256, cells of 8 px: 2 px
    of the original): shares of each cell, background first; cells of a mask outside the
    categories and of the padding weigh 0."""
    config = CONV_MODEL
    masks = np.zeros((3, 64, 32), bool)
    masks[0, 0:4, 0:4] = True  # circle: cells (0..1, 0..1)
    masks[1, 4:5, 0:2] = True  # triangle: the top half of cell (2, 0)
    masks[2, 8:10, 8:10] = True  # a ring, not asked for: cell (4, 4)
    record = {"image": np.zeros((64, 32, 3), np.uint8), "masks": masks, "categories": ["circle", "triangle", "ring"]}
    t, w = kind_targets(record, ["circle", "triangle"], config)
    assert t.shape == (32, 32, 3) and w.shape == (32, 32)
    np.testing.assert_allclose(t[0, 0], [0, 1, 0])
    np.testing.assert_allclose(t[2, 0], [0.5, 0, 0.5])
    np.testing.assert_allclose(t[10, 10], [1, 0, 0])
    assert w[0, 0] == w[2, 0] == w[10, 10] == 1.0
    assert w[4, 4] == 0.0 and w[:, 16:].max() == 0.0  # the ring; the padding right of the 128-px frame


def test_pretrain_kinds_trains_and_starts_text_training(tmp_path):
    """On 8 colour-coded shape images (a pixel shows its kind), 100 steps at least halve the
    per-token loss and raise the token accuracy; the held-out scoring counts every
    categorised mask; the checkpoint's encoder is what `init = "encoder:PATH"` loads for
    `shapes_text_p8`. (How well the kinds are learnt on real outlines, over thousands of
    steps: docs/text-training.md.)"""
    import jax

    from sam_jax.checkpoint import load_model
    from sam_jax.clip_folder import make_random_clip
    from sam_jax.model import abstract_params
    from sam_jax.train import sharding as shd
    from sam_jax.train.configs import shapes_text_p8
    from sam_jax.train.pretrain import load_kinds
    from sam_jax.train.shapes import make_shapes
    from sam_jax.train.trainer import initial_params, model_config

    kinds = ["circle", "rectangle", "triangle"]
    make_shapes(tmp_path / "train", 8, seed=0, categories=tuple(kinds), size_range=(0.2, 0.45), colour_by_category=True)
    logs = []
    result = pretrain_kinds(
        tmp_path / "train",
        tmp_path / "enc",
        categories=kinds,
        config=CONV_MODEL,
        steps=100,
        lr=4e-3,
        warmup_steps=10,
        heldout_dir=tmp_path / "train",
        eval_every=20,
        log=logs.append,
    )
    first, last = result["history"][0], result["history"][-1]
    assert len(logs) == 6 and result["steps"] == 100 and last["step"] == 100
    assert last["loss"] < 0.5 * first["loss"], result["history"]
    assert last["token_accuracy"] > first["token_accuracy"] + 0.15, result["history"]
    data = load_kinds(tmp_path / "train", kinds, CONV_MODEL)
    assert (data["labels"] >= 0).sum() == sum(len(r) for r in _categories(tmp_path / "train"))
    assert 0.0 <= last["heldout_mask_accuracy"] <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc", "train"]  # the snapshots, removed

    cfg = shapes_text_p8.get_config()
    cfg.data.train_dir = str(tmp_path / "train")
    cfg.text.clip = str(make_random_clip(tmp_path / "clip", [f"a {k}" for k in kinds]))
    cfg.init = f"encoder:{tmp_path / 'enc'}"
    mc = model_config(cfg)
    mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
    params = jax.device_get(initial_params(cfg, mc, shd.logical_shardings(abstract_params(mc, boxed=True), mesh)))
    saved = load_model(tmp_path / "enc").params["image_encoder"]
    for a, b in zip(jax.tree.leaves(params["image_encoder"]), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    with pytest.raises(FileExistsError):
        pretrain_kinds(tmp_path / "train", tmp_path / "enc", categories=kinds, config=CONV_MODEL, steps=1)

    # A crash after a log keeps that log's snapshot, a whole checkpoint.
    from unittest import mock

    with (
        mock.patch("sam_jax.train.pretrain.mask_accuracy", side_effect=[0.5, RuntimeError("killed")]),
        pytest.raises(RuntimeError, match="killed"),
    ):
        pretrain_kinds(
            tmp_path / "train",
            tmp_path / "crashed",
            categories=kinds,
            config=CONV_MODEL,
            steps=4,
            warmup_steps=1,
            heldout_dir=tmp_path / "train",
            eval_every=2,
        )
    assert not (tmp_path / "crashed").exists()
    assert load_model(tmp_path / "crashed.step_2").config.name == "tiny_p8_conv"
    with pytest.raises(ValueError, match="batch_size"):
        pretrain_kinds(
            tmp_path / "train", tmp_path / "enc2", categories=kinds, config=CONV_MODEL, steps=10, warmup_steps=10
        )


def _categories(folder):
    import json

    return [[a["category"] for a in json.loads(p.read_text())["annotations"]] for p in sorted(folder.glob("*.json"))]
