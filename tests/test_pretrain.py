"""Pretraining the image encoder on the annotations' kinds (`train.pretrain`, `sam-jax
pretrain-kinds`): the per-token targets, a short run that learns colour-coded kinds (and resumes
after a crash, the Trainer's), and the checkpoint starting text training as `init = "encoder:PATH"`."""

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


def test_the_kinds_objective_trains_the_encoder_and_its_head_alone():
    """Its loss reaches the image encoder and the head only: the optimizer keeps no moments for the
    prompt encoder and the decoder, and gives them no update (AdamW's weight decay would shrink them)."""
    import jax
    import jax.numpy as jnp

    from sam_jax.model import abstract_params
    from sam_jax.train.optim import make_optimizer
    from sam_jax.train.pretrain import kinds_objective

    config = recipe_model(_small_text_config())
    objective = kinds_objective(config, ["circle"], data={})
    params = jax.tree.map(jnp.ones_like, abstract_params(config))
    params["head"] = objective.head(jax.random.key(0))
    optim = shapes_text_p8.get_config().optim
    optim.warmup_steps = 0  # a full-size first update
    tx, _, _ = make_optimizer(params, config, optim, objective.trains)
    state = jax.jit(tx.init)(params)
    trained = ("image_encoder", "head")
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert moments == 2 * sum(size(params[k]) for k in trained)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    for module in params:
        moved = any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates[module]))
        assert moved == (module in trained), module


# A smaller frame for the training test: 128 px, 16 x 16 tokens (a quarter of the recipe's compute).
SMALL = {"image_encoder": {"img_size": 128}}


def _small_text_config():
    cfg = shapes_text_p8.get_config()
    cfg.model_overrides.image_encoder.img_size = SMALL["image_encoder"]["img_size"]
    return cfg


def test_pretrain_kinds_learns_resumes_and_starts_text_training(tmp_path):
    """On 6 colour-coded shape images (a pixel shows its kind), 40 steps bring the per-token loss
    well under its start and the token accuracy well above chance; the run is the Trainer's:
    killed after its step-20 checkpoint, the same command resumes there and finishes, leaving only
    the checkpoint, whose encoder is what `init = "encoder:PATH"` loads for `shapes_text_p8`. (How
    well the kinds are learnt on real outlines, over thousands of steps: docs/text-training.md.)"""
    from unittest import mock

    import jax

    from sam_jax.checkpoint import load_model
    from sam_jax.clip_folder import make_random_clip
    from sam_jax.model import abstract_params
    from sam_jax.train import pretrain
    from sam_jax.train import sharding as shd
    from sam_jax.train.pretrain import load_kinds, work_dir
    from sam_jax.train.shapes import make_shapes
    from sam_jax.train.trainer import initial_params, model_config

    kinds = ["circle", "rectangle", "triangle"]
    make_shapes(tmp_path / "train", 6, seed=0, categories=tuple(kinds), size_range=(0.2, 0.45), colour_by_category=True)
    model = recipe_model(_small_text_config())
    run = dict(
        categories=kinds, config=model, steps=40, lr=4e-3, warmup_steps=5, heldout_dir=tmp_path / "train", eval_every=10
    )
    real, calls = pretrain.mask_accuracy, []

    def dies_in_second_eval(*args):  # the process dies in its step-20 evaluation, after that step's checkpoint
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args)

    with (
        mock.patch.object(pretrain, "mask_accuracy", side_effect=dies_in_second_eval),
        pytest.raises(RuntimeError, match="killed"),
    ):
        pretrain_kinds(tmp_path / "train", tmp_path / "enc", **run)
    assert not (tmp_path / "enc").exists() and (work_dir(tmp_path / "enc") / "checkpoints" / "20").is_dir()
    logs = []
    result = pretrain_kinds(tmp_path / "train", tmp_path / "enc", **run, log=logs.append)
    assert any(line.startswith("resumed from step 20") for line in logs), logs
    history = result["history"]
    first, last = history[0], history[-1]
    assert [h["step"] for h in history] == [10, 20, 30, 40] and result["steps"] == 40
    # Untrained: a loss of ~log(4) (4 classes: background and 3 kinds) and ~1/3 of the shapes' tokens right.
    assert last["loss"] < min(first["loss"], 0.6 * np.log(4)), history
    assert last["token_accuracy"] > 0.45, history
    assert 0.0 <= last["heldout_mask_accuracy"] <= 1.0
    data = load_kinds(tmp_path / "train", kinds, model)
    assert (data["labels"] >= 0).sum() == sum(len(r) for r in _categories(tmp_path / "train"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc", "train"]  # the work directory, removed

    cfg = _small_text_config()
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
        pretrain_kinds(tmp_path / "train", tmp_path / "enc", **run)
    with pytest.raises(ValueError, match="batch_size"):
        pretrain_kinds(tmp_path / "train", tmp_path / "enc2", **{**run, "steps": 10, "warmup_steps": 10})


def _categories(folder):
    import json

    return [[a["category"] for a in json.loads(p.read_text())["annotations"]] for p in sorted(folder.glob("*.json"))]
