"""HQ-SAM trains as its official training does, through SAM's trainer and train step: its HQ mask
alone (`multimask_output=False, hq_token_only=True`) in every interactive iteration, the mask
losses on it without an IoU term, and only the HQ layers updated (SAM frozen, no optimizer state
for it). Small configs: the tiny SAM with the HQ decoder."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sam_jax.config import tiny, with_overrides
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.model import abstract_params, decode
from sam_jax.modeling.hq import HQ_LAYERS, is_hq_param
from sam_jax.prompts import Prompts
from sam_jax.train import losses
from sam_jax.train import prompt_simulation as sim
from tests.train_worker import small_config as small_train_config

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# The tiny SAM with the HQ decoder (test_hq_sam's `small_config()`), as a training recipe's model overrides.
HQ_OVERRIDES = {"name": "tiny_hq", "mask_decoder": {"hq_token": True}}


def small_config():
    return with_overrides(tiny(), HQ_OVERRIDES)


def _flat(params) -> dict[tuple[str, ...], np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {tuple(k.key for k in path): np.asarray(v) for path, v in leaves}


def random_params(config, seed: int = 0):
    """Every param of `config` drawn from a normal (std 0.1; norm scales about 1), without compiling an init."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        x = rng.normal(scale=0.1, size=shape.shape).astype(shape.dtype)
        return x + 1 if path[-1].key == "scale" else x

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))


def test_is_hq_param_names_the_hq_layers_alone():
    names = {path[1] for path in _flat(random_params(small_config())) if is_hq_param(path)}
    assert {n.rpartition("_")[0] if n[-1].isdigit() else n for n in names} == set(HQ_LAYERS)
    assert not is_hq_param(("mask_decoder", "output_hypernetworks_mlps_0", "layers_0", "kernel"))
    assert not is_hq_param(("image_encoder", "hf_token", "embedding"))


def test_one_step_trains_the_hq_layers_alone(monkeypatch):
    """One train step of the interactive recipe on an HQ model, on a frozen encoder's outputs (a
    fixed first prompt, then an iteration with the mask fed back): a finite loss equal to focal +
    dice (as configured, no IoU term) of `decode(..., multimask_output=False, hq_token_only=True)`
    in both iterations, the second prompted with the first's HQ mask; every HQ tensor changed,
    every other bit-identical; the optimizer's state two moments of the HQ layers alone. Ten more
    steps lower the loss."""
    from sam_jax.train.optim import make_optimizer
    from sam_jax.train.step import TrainBatch, init_state, train_step

    config = small_config()
    params = random_params(config)
    rng = np.random.default_rng(1)
    e = config.embedding_size
    emb = ImageEmbeddings(
        embedding=rng.normal(size=(1, e, e, config.prompt_embed_dim)).astype(np.float32),
        interm=rng.normal(size=(1, e, e, config.image_encoder.interm_dim)).astype(np.float32),
    )
    masks = np.zeros((1, 2, 64, 64), bool)
    masks[0, 0, 20:40, 10:30] = True
    masks[0, 1, 5:15, 40:60] = True
    batch = TrainBatch(embeddings=emb, masks=masks, valid=np.ones((1, 2), bool), ids=np.zeros((1,), np.int32))
    overrides = {"loss.num_point_iters": 0, "loss.num_no_point_iters": 1, "optim.warmup_steps": 0}
    cfg = small_train_config("unused", **overrides)  # the loss and optimizer recipe of the tests
    assert cfg.loss.iou_weight > 0 and cfg.loss.focal_weight > 0 and cfg.loss.dice_weight > 0
    n = sim.num_slots(0, cfg.loss.points_per_iter)
    points = np.zeros((2, n, 2), np.float32)
    labels = np.full((2, n), -1, np.int32)
    points[0, :2], labels[0, :2] = [[40.5, 120.5], [120.5, 160.5]], [sim.LABEL_BOX_TOP_LEFT, sim.LABEL_BOX_BOTTOM_RIGHT]
    points[1, 0], labels[1, 0] = [200.5, 40.5], 1
    monkeypatch.setattr(sim, "initial_prompt", lambda *a, **k: (jnp.asarray(points), jnp.asarray(labels)))

    tx, schedule = make_optimizer(params, config, cfg.optim)
    step = jax.jit(functools.partial(train_step, tx=tx, schedule=schedule, model_config=config, cfg=cfg.loss))
    state, metrics = step(init_state(params, tx, seed=0), batch)
    assert np.isfinite(metrics["loss"]) and metrics["finite"] == 1.0

    @jax.jit
    def hq_masks(params, prompts):  # the first prompt's HQ mask, then the one with it fed back
        decode_hq = functools.partial(decode, params, emb, config=config, multimask_output=False, hq_token_only=True)
        first = decode_hq(prompts)[0][:, 0]
        return first, decode_hq(prompts.replace(mask_input=first, has_mask=jnp.ones((2,), bool)))[0][:, 0]

    targets = masks[0].astype(np.float32)
    expected = []
    for logits in hq_masks(params, Prompts(points=points, labels=labels, mask_input=None, has_mask=None)):
        focal = losses.sigmoid_focal_loss(logits, targets, alpha=cfg.loss.focal_alpha, gamma=cfg.loss.focal_gamma)
        expected.append(
            np.mean(cfg.loss.focal_weight * focal + cfg.loss.dice_weight * losses.dice_loss(logits, targets))
        )
    np.testing.assert_allclose(metrics["loss"], np.mean(expected), rtol=1e-5)

    before, after = _flat(params), _flat(state.params)
    hq = [path for path in before if is_hq_param(path)]
    for path in before:
        if is_hq_param(path):
            assert np.any(before[path] != after[path]), path
        else:
            np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))
    state_sizes = [x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(state_sizes) == 2 * sum(before[path].size for path in hq)  # Adam's moments, HQ layers only

    history = [float(metrics["loss"])]
    for _ in range(10):  # more steps on the same masks: the HQ layers alone fit them better
        state, metrics = step(state, batch)
        history.append(float(metrics["loss"]))
    assert history[-1] < 0.8 * history[0], history


def test_lora_on_an_hq_model_is_refused(tmp_path):
    from sam_jax.train.finetune import FinetuneError, finetune_config
    from sam_jax.train.trainer import Trainer, TrainingError

    with pytest.raises(FinetuneError, match="--mode lora: tiny_hq is an HQ-SAM model"):
        finetune_config(small_config(), tmp_path / "ckpt", tmp_path / "train.json", mode="lora")
    cfg = small_train_config(str(tmp_path))
    cfg.model_overrides = HQ_OVERRIDES  # on the recipe's model, tiny
    cfg.lora = ml_collections.ConfigDict({"rank": 2})
    with pytest.raises(TrainingError, match="lora.rank=2: tiny_hq is an HQ-SAM model"):
        Trainer(cfg, tmp_path / "work", quiet=True)
    assert not (tmp_path / "work").exists()  # refused before anything is written
