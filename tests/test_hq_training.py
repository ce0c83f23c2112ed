"""HQ-SAM trains as its official training does, through SAM's trainer and train step: its HQ mask
alone (`multimask_output=False, hq_token_only=True`) in every interactive iteration, the mask
losses on it without an IoU term, and only the HQ layers updated (SAM frozen, no optimizer state
for it), from a plain SAM checkpoint with new HQ layers as its training begins (`init`, `finetune
--config.model=NAME_hq`). Small configs: the tiny SAM with the HQ decoder."""

from __future__ import annotations

import functools
import re

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
from tests.test_sam2_encoder import random_params as random_sam2_params
from tests.train_worker import flat_params
from tests.train_worker import small_config as small_train_config

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# The tiny SAM with the HQ decoder (test_hq_sam's `small_config()`), as a training recipe's model overrides.
HQ_OVERRIDES = {"name": "tiny_hq", "mask_decoder": {"hq_token": True}}


def small_config():
    return with_overrides(tiny(), HQ_OVERRIDES)


def random_params(config, seed: int = 0):
    """Every param of `config` random (std 0.1, norm scales about 1), without compiling an init."""
    return random_sam2_params(config, seed, scale=0.1, unit_norms=True)


def test_is_hq_param_names_the_hq_layers_alone():
    names = {path[1] for path in flat_params(random_params(small_config())) if is_hq_param(path)}
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

    tx, schedule, frozen = make_optimizer(params, config, cfg.optim)
    unstopped = functools.partial(train_step, tx=tx, schedule=schedule, model_config=config, cfg=cfg.loss)
    step = jax.jit(functools.partial(unstopped, labels=frozen))
    # The frozen SAM weights get no gradient: their weight-gradient products are never computed.
    flops = lambda f: f.lower(init_state(params, tx, seed=0), batch).cost_analysis()["flops"]  # noqa: E731
    assert flops(step) < 0.95 * flops(jax.jit(unstopped))  # 0.88x on this config
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

    before, after = flat_params(params), flat_params(state.params)
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


# ----------------------------------------------------------------------------- from a plain SAM


def drawn_init(config, key):
    """A stand-in for `model.init_params` that compiles in seconds: its shapes, every tensor drawn from `key`."""
    leaves, treedef = jax.tree.flatten(abstract_params(config))
    drawn = jnp.split(jax.random.normal(key, (sum(x.size for x in leaves),)), np.cumsum([x.size for x in leaves])[:-1])
    return jax.tree.unflatten(treedef, [d.reshape(x.shape).astype(x.dtype) for d, x in zip(drawn, leaves)])


def test_an_hq_model_starts_from_a_plain_sam_with_new_hq_layers(tmp_path, monkeypatch):
    """HQ-SAM's training begins from SAM's weights: `init = "checkpoint:PATH"` of a plain SAM into an
    HQ model takes every SAM tensor from the checkpoint bit for bit and the HQ layers (`HQ_LAYERS`)
    from the seed's fresh init; a checkpoint of another encoder is refused as before."""
    from sam_jax.checkpoint import save_params
    from sam_jax.train import sharding as shd
    from sam_jax.train import trainer
    from sam_jax.train.trainer import TrainingError, initial_params, model_config

    monkeypatch.setattr(trainer, "init_params", drawn_init)
    cfg = small_train_config(str(tmp_path))
    cfg.model_overrides = HQ_OVERRIDES
    mc = model_config(cfg)
    shardings = shd.logical_shardings(abstract_params(mc, boxed=True), shd.make_mesh(1, 1, devices=jax.devices()[:1]))
    fresh = flat_params(initial_params(cfg, mc, shardings))  # cfg.init: scratch
    sam = random_params(tiny())
    cfg.init = f"checkpoint:{save_params(tmp_path / 'sam', sam, tiny())}"
    got, sam = flat_params(initial_params(cfg, mc, shardings)), flat_params(sam)
    assert got.keys() == fresh.keys() and set(sam) == {path for path in got if not is_hq_param(path)}
    for path, x in got.items():
        np.testing.assert_array_equal(x, fresh[path] if is_hq_param(path) else sam[path], err_msg=str(path))

    other = with_overrides(tiny(), {"image_encoder": {"embed_dim": 96}})  # another encoder, no HQ layers
    cfg.init = f"checkpoint:{save_params(tmp_path / 'other', random_params(other), other)}"
    with pytest.raises(TrainingError, match="does not match model 'tiny_hq' \\(different shapes\\)"):
        initial_params(cfg, mc, shardings)


def test_finetune_trains_a_plain_sam_as_its_hq_variant_alone(tmp_path, capsys):
    """`finetune --config.model=NAME` on a SAM checkpoint: NAME its HQ-SAM variant (vit_b -> vit_b_hq,
    ..., vit_t -> vit_tiny_hq, tiny -> tiny_hq) trains that HQ model from the checkpoint (`init`); any
    other model, or another model for an HQ checkpoint, is refused in one line before anything loads."""
    from sam_jax.checkpoint import save_params
    from sam_jax.cli import main
    from sam_jax.config import get_config
    from sam_jax.train.embedding_cache import encoder_key
    from sam_jax.train.finetune import FinetuneError, finetune_config
    from sam_jax.train.trainer import model_config

    sam = random_params(tiny())
    ckpt = save_params(tmp_path / "sam", sam, tiny())
    cfg = finetune_config(tiny(), ckpt, tmp_path / "train.json", overrides=["model=tiny_hq"])
    mc = model_config(cfg)
    assert (mc.name, mc.mask_decoder, mc.image_encoder.embed_dim) == ("tiny_hq", small_config().mask_decoder, 64)
    assert cfg.init == f"checkpoint:{ckpt}" and cfg.optim.freeze_image_encoder
    # The same encoder's cached outputs: the HQ model's also hold its early features, in a folder of their own.
    assert encoder_key(sam, tiny()) != encoder_key(sam, mc) == encoder_key(sam, small_config())
    for sam, hq in [("vit_b", "vit_b_hq"), ("vit_l", "vit_l_hq"), ("vit_h", "vit_h_hq"), ("vit_t", "vit_tiny_hq")]:
        as_hq = finetune_config(get_config(sam), ckpt, "t.json", overrides=[f"model={hq}"])
        assert model_config(as_hq) == get_config(hq)  # the registry's HQ model, whole
        assert finetune_config(get_config(hq), ckpt, "t.json", overrides=[f"model={hq}"]).model == hq
    refused = [
        ("vit_b", "vit_l_hq", "the checkpoint is vit_b; fine-tune it as vit_b or its HQ-SAM variant vit_b_hq"),
        ("vit_b_hq", "vit_b", "the checkpoint is vit_b_hq; fine-tune it as vit_b_hq"),
        ("sam2.1_hiera_tiny", "sam2.1_hiera_tiny_hq", "the HQ-SAM decoder (hq_token) takes none of SAM 2's"),
    ]
    for sam, name, message in refused:
        with pytest.raises(FinetuneError, match=re.escape(f"--config.model={name}: {message}")):
            finetune_config(get_config(sam), ckpt, "t.json", overrides=[f"model={name}"])
    with pytest.raises(FinetuneError, match="--mode lora: tiny_hq is an HQ-SAM model"):
        finetune_config(tiny(), ckpt, "t.json", mode="lora", overrides=["model=tiny_hq"])
    args = ["--checkpoint", str(ckpt), "--train", str(tmp_path / "none"), "--workdir", str(tmp_path / "w")]
    assert main(["finetune", *args, "--cache-dir", "", "--config.model=vit_b_hq"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "--config.model=vit_b_hq: the checkpoint is tiny; fine-tune it as tiny or its HQ-SAM variant tiny_hq"
    ), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "w").exists()
