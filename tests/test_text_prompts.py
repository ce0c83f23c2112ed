"""Text prompts in the model: CLIP embeddings as extra sparse tokens of the prompt encoder."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.checkpoint import load_model, save_params
from sam_jax.config import PromptEncoderConfig, get_config
from sam_jax.model import decode, encode, init_params
from sam_jax.prompts import make_prompts

TEXT_DIM = 24


@pytest.fixture(scope="module")
def text_config():
    cfg = get_config("tiny")
    return dataclasses.replace(cfg, prompt_encoder=dataclasses.replace(cfg.prompt_encoder, text_embed_dim=TEXT_DIM))


@pytest.fixture(scope="module")
def text_params(text_config):
    return init_params(text_config, jax.random.key(0))


@pytest.fixture(scope="module")
def embeddings(text_config, text_params):
    images = jax.random.normal(jax.random.key(1), (3, text_config.image_size, text_config.image_size, 3))
    return encode(text_params, images, config=text_config)


def _prompts(cfg, **kw):
    return jax.tree.map(jnp.asarray, make_prompts(batch_size=3, mask_size=cfg.low_res_mask_size, **kw))


def test_text_layers_exist_only_with_text_embed_dim(text_params, tiny_config, tiny_params):
    pe = text_params["prompt_encoder"]
    assert pe["text_proj_0"]["kernel"].shape == (
        TEXT_DIM,
        text_params["prompt_encoder"]["text_embed"]["embedding"].shape[-1],
    )
    assert "text_embed" in pe and not any(k.startswith("text") for k in tiny_params["prompt_encoder"])
    tokens = text_params["mask_decoder"]["text_mask_tokens"]["embedding"]
    assert tokens.shape == text_params["mask_decoder"]["mask_tokens"]["embedding"].shape
    assert "text_mask_tokens" not in tiny_params["mask_decoder"]
    with pytest.raises(ValueError, match="text_embed_dim must be"):
        PromptEncoderConfig(text_embed_dim=0)


def test_text_tokens_change_the_masks_and_padding_slots_do_not(text_config, text_params, embeddings):
    rng = np.random.default_rng(0)
    points = dict(point_coords=rng.uniform(0, text_config.image_size, (3, 2, 2)), point_labels=np.array([[1, 0]] * 3))
    text = rng.normal(size=(3, 2, TEXT_DIM)).astype(np.float32)
    f = jax.jit(lambda p, e, pr: decode(p, e, pr, config=text_config))
    base, base_iou = f(text_params, embeddings, _prompts(text_config, **points))
    with_text, _ = f(text_params, embeddings, _prompts(text_config, **points, text=text))
    assert np.abs(np.asarray(with_text) - np.asarray(base)).max() > 1e-3
    # Unused text slots are masked out: the masks are those without text.
    unused, unused_iou = f(
        text_params, embeddings, _prompts(text_config, **points, text=text, text_mask=np.zeros((3, 2), bool))
    )
    np.testing.assert_allclose(unused, base, atol=1e-5)
    np.testing.assert_allclose(unused_iou, base_iou, atol=1e-6)
    # One slot used, one padding == the used one alone.
    one, _ = f(text_params, embeddings, _prompts(text_config, **points, text=text[:, :1]))
    padded, _ = f(
        text_params, embeddings, _prompts(text_config, **points, text=text, text_mask=np.array([[True, False]] * 3))
    )
    np.testing.assert_allclose(padded, one, atol=1e-5)


def test_text_rows_have_their_own_mask_tokens(text_config, text_params, embeddings):
    """A row with text takes its mask tokens from `text_mask_tokens`, a row without from
    `mask_tokens`: the union targets of captions never train the outputs of points and boxes."""
    rng = np.random.default_rng(2)
    coords = rng.uniform(0, text_config.image_size, (3, 1, 2))
    text = rng.normal(size=(3, 1, TEXT_DIM)).astype(np.float32)
    rows = _prompts(
        text_config,
        point_coords=coords,
        point_labels=np.ones((3, 1)),
        text=text,
        text_mask=np.array([[True], [False], [True]]),
    )
    f = jax.jit(lambda p: decode(p, embeddings, rows, config=text_config, multimask_output=None))
    base, _ = f(text_params)

    def moved(name):
        dec = text_params["mask_decoder"]
        shifted = {**dec, name: {"embedding": dec[name]["embedding"] + 1.0}}
        masks, _ = f({**text_params, "mask_decoder": shifted})
        return np.abs(np.asarray(masks) - np.asarray(base)).max(axis=(1, 2, 3))  # per row

    text_moved, point_moved = moved("text_mask_tokens"), moved("mask_tokens")
    assert text_moved[0] > 1e-3 and text_moved[2] > 1e-3 and text_moved[1] == 0.0, text_moved
    assert point_moved[1] > 1e-3 and point_moved[0] == 0.0 and point_moved[2] == 0.0, point_moved


def test_text_only_and_mixed_prompts_in_one_compiled_decoder(text_config, text_params, embeddings):
    """Rows with text alone, text + points and points alone share one decoder call (one shape)."""
    rng = np.random.default_rng(1)
    text = rng.normal(size=(3, 1, TEXT_DIM)).astype(np.float32)
    coords = rng.uniform(0, text_config.image_size, (3, 1, 2))
    labels = np.array([[-1], [1], [1]])  # row 0: no point (text only)
    text_mask = np.array([[True], [True], [False]])  # row 2: no text (points only)
    mixed = _prompts(text_config, point_coords=coords, point_labels=labels, text=text, text_mask=text_mask)
    masks, iou = jax.jit(lambda p, e, pr: decode(p, e, pr, config=text_config))(text_params, embeddings, mixed)
    # Each row equals the same prompt decoded alone.
    alone = [
        _prompts(text_config, text=text),
        _prompts(text_config, point_coords=coords, point_labels=np.ones((3, 1)), text=text),
        _prompts(text_config, point_coords=coords, point_labels=np.ones((3, 1))),
    ]
    for row, prompts in enumerate(alone):
        ref, ref_iou = decode(text_params, embeddings, prompts, config=text_config)
        np.testing.assert_allclose(masks[row], ref[row], atol=1e-4)
        np.testing.assert_allclose(iou[row], ref_iou[row], atol=1e-5)


def test_text_gets_clear_errors(tiny_config, tiny_params, text_config, text_params, embeddings):
    text = np.ones((3, TEXT_DIM), np.float32)
    tiny_emb = encode(
        tiny_params, jnp.zeros((3, tiny_config.image_size, tiny_config.image_size, 3)), config=tiny_config
    )
    with pytest.raises(ValueError, match="no text projection"):
        decode(tiny_params, tiny_emb, _prompts(tiny_config, text=text), config=tiny_config)
    with pytest.raises(ValueError, match="width 7"):
        decode(text_params, embeddings, _prompts(text_config, text=np.ones((3, 7))), config=text_config)
    with pytest.raises(ValueError, match="text must be"):
        make_prompts(batch_size=2, mask_size=16, text=np.ones((3, TEXT_DIM)))
    with pytest.raises(ValueError, match="without text"):
        make_prompts(batch_size=2, mask_size=16, text_mask=np.ones((2, 1), bool))


def test_text_model_checkpoint_round_trip(text_config, text_params, tmp_path):
    """The text layers are saved and restored with the rest (and exported under their own names)."""
    from sam_jax.convert.state_dict import to_flax, to_official

    path = save_params(tmp_path / "ckpt", text_params, text_config)
    model = load_model(path)
    assert model.config.prompt_encoder.text_embed_dim == TEXT_DIM
    jax.tree.map(
        np.testing.assert_array_equal, model.params["prompt_encoder"], jax.device_get(text_params["prompt_encoder"])
    )
    state = to_official(text_params, text_config)
    assert {k for k in state if "text" in k} == {
        "prompt_encoder.text_proj.0.weight",
        "prompt_encoder.text_proj.0.bias",
        "prompt_encoder.text_proj.1.weight",
        "prompt_encoder.text_proj.1.bias",
        "prompt_encoder.text_embed.weight",
        "mask_decoder.text_mask_tokens.weight",
    }
    jax.tree.map(np.testing.assert_array_equal, to_flax(state, text_config), jax.device_get(text_params))
