"""MobileSAM (vit_t, the TinyViT encoder) against the official `mobile_sam` package: per module on
non-square grids, the encoder and the predictor end to end on the photo (a small config and the
full-size vit_t, every parameter randomized), the converter's round trip and refusals, the
generator, and one training step."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bench.official import randomize_, state_dict_numpy
from bench.official_mobile_sam import build_official_mobile_sam, modeling
from sam_jax.config import MaskDecoderConfig, SamConfig, TinyViTConfig, vit_t
from sam_jax.convert.keys import key_table
from sam_jax.convert.state_dict import to_flax
from sam_jax.modeling import tiny_vit

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
    """The official model with every tensor random. `eval()` again afterwards: the official attention
    caches its biases gathered by offset (`ab`) when switched to eval mode."""
    return randomize_(build_official_mobile_sam(config), seed=seed).eval()


@pytest.fixture(scope="module")
def small():
    config = small_config()
    ref = randomized(config)
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
    params = module_params(
        ref, (config, "image_encoder.layers.0.downsample", ("image_encoder", "layers_0", "downsample"))
    )
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


def test_config_round_trips():
    for config in (vit_t(), small_config(), dataclasses.replace(vit_t(), dtype="bfloat16")):
        again = SamConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config
    assert vit_t().embedding_size == 64 and vit_t().image_encoder.stride == 16
    with pytest.raises(ValueError, match="merge_strides has 2"):
        TinyViTConfig(merge_strides=(2, 2))
    with pytest.raises(ValueError, match="not divisible into 3 heads"):
        TinyViTConfig(num_heads=(2, 3, 5, 10))
