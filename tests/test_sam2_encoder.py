"""SAM 2.1's image encoder (`modeling.hiera`: Hiera trunk + FPN neck) against the official `sam2`
package, every official parameter randomized (the zero-initialized `pos_embed`, `pos_embed_window`,
`no_mem_embed` and biases too): the bicubic pos-embed resize, single blocks (windows padded, queries
pooled in windows and globally), the trunk's stages and the neck's levels on small configs at
256 px, the whole encoder against `SAM2Base.forward_image` + `_prepare_backbone_features` +
`no_mem_embed` (what `SAM2ImagePredictor.set_image` keeps) on a small config (the full-size
sam2.1_hiera_t at 1024 px: `tests.test_sam2`'s predictor test), the presets against the yaml files, and
the key table."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sam2  # noqa: F401  (the reference; initializes hydra's config module)
import torch
import torch.nn.functional as F
from flax import linen as nn
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sam2.build_sam import build_sam2
from sam2.modeling.backbones.hieradet import Hiera as OfficialHiera
from sam2.modeling.backbones.hieradet import MultiScaleBlock as OfficialBlock
from sam2.modeling.backbones.image_encoder import FpnNeck as OfficialFpnNeck
from sam2.modeling.position_encoding import PositionEmbeddingSine

from bench.official import randomize_, state_dict_numpy
from sam_jax.config import (
    HieraConfig,
    MaskDecoderConfig,
    SamConfig,
    hiera_base_plus,
    hiera_large,
    hiera_small,
    hiera_tiny,
)
from sam_jax.convert.keys_hiera import hiera_rows
from sam_jax.model import SamModel, abstract_params
from sam_jax.modeling import hiera
from sam_jax.modeling.sam import check_embeddings

ATOL = 1e-4
YAML = {
    "t": ("configs/sam2.1/sam2.1_hiera_t.yaml", hiera_tiny),
    "s": ("configs/sam2.1/sam2.1_hiera_s.yaml", hiera_small),
    "b+": ("configs/sam2.1/sam2.1_hiera_b+.yaml", hiera_base_plus),
    "l": ("configs/sam2.1/sam2.1_hiera_l.yaml", hiera_large),
}


def small_hiera(**changes) -> HieraConfig:
    """A small SAM 2 encoder at 256 px (levels 64, 32, 16, 8): windows of 6 pad the 32 grid
    (36, pooled to 3 / 18), of 5 the 16 grid (20) and of 3 the 8 grid (9); block 3 pools its queries
    in padded windows of 6, block 6 in windows of 5 (pooled to 2), block 4 attends globally."""
    fields = dict(
        img_size=256,
        embed_dim=16,
        num_heads=1,
        stages=(1, 2, 3, 2),
        global_att_blocks=(4,),
        window_pos_embed_bkg_spatial_size=(7, 5),
        window_spec=(8, 6, 5, 3),
        backbone_channel_list=(128, 64, 32, 16),
    )
    return HieraConfig(**{**fields, **changes})


def sam_config(enc: HieraConfig, name: str = "sam2_test") -> SamConfig:
    return SamConfig(
        name=name,
        image_encoder=enc,
        mask_decoder=MaskDecoderConfig(iou_head_hidden_dim=32, transformer_mlp_dim=64, transformer_num_heads=4),
        prompt_embed_dim=enc.d_model,
    )


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


def nchw(x) -> torch.Tensor:
    return t(x).permute(0, 3, 1, 2)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()


def close(ours, ref, atol=ATOL) -> float:
    """Assert equal shapes and values within `atol`; return the largest difference."""
    ours = np.asarray(ours)
    ref = np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)
    return float(np.max(np.abs(ours - ref), initial=0.0))


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor random (`bench.official.randomize_`), and the zero-initialized embeddings that
    `randomize_` scales as weights (`pos_embed_window`, `no_mem_embed`) at std 0.1."""
    randomize_(module, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.rsplit(".", 1)[-1] in ("pos_embed", "pos_embed_window", "no_mem_embed"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def load_params(sd: dict[str, np.ndarray], rows, official_prefix: str = "", flax_prefix: tuple = ()) -> dict:
    """Flax params from an official state dict by the key table's rows: those under `flax_prefix`
    (stripped), their official keys less `official_prefix` (a submodule's own state dict)."""
    params: dict = {}
    n = len(official_prefix)
    for row in rows:
        if row.flax[: len(flax_prefix)] != flax_prefix:
            continue
        assert row.official.startswith(official_prefix), row
        node = params
        for part in row.flax[len(flax_prefix) : -1]:
            node = node.setdefault(part, {})
        node[row.flax[-1]] = row.transform(sd[row.official[n:]])
    assert params, flax_prefix
    return params


def official_sam2(enc: HieraConfig, seed: int = 0) -> torch.nn.Module:
    """The official `SAM2Base` of sam2.1_hiera_t.yaml with `enc`'s image side (hydra overrides),
    every tensor randomized."""
    assert enc.q_stride == (2, 2)  # Hiera's default (hydra would pass a list, which MaxPool2d refuses)
    lst = lambda v: "[" + ",".join(str(x) for x in v) + "]"  # noqa: E731
    trunk, neck = "++model.image_encoder.trunk", "++model.image_encoder.neck"
    overrides = [
        f"++model.image_size={enc.img_size}",
        f"++model.image_encoder.scalp={enc.scalp}",
        f"{trunk}.embed_dim={enc.embed_dim}",
        f"{trunk}.num_heads={enc.num_heads}",
        f"{trunk}.stages={lst(enc.stages)}",
        f"{trunk}.q_pool={enc.q_pool}",
        f"{trunk}.dim_mul={enc.dim_mul}",
        f"{trunk}.head_mul={enc.head_mul}",
        f"{trunk}.window_pos_embed_bkg_spatial_size={lst(enc.window_pos_embed_bkg_spatial_size)}",
        f"{trunk}.window_spec={lst(enc.window_spec)}",
        f"{trunk}.global_att_blocks={lst(enc.global_att_blocks)}",
        f"{neck}.d_model={enc.d_model}",
        f"{neck}.backbone_channel_list={lst(enc.backbone_channel_list)}",
        f"{neck}.fpn_top_down_levels={lst(enc.fpn_top_down_levels)}",
        f"{neck}.fpn_interp_model={enc.fpn_interp_model}",
    ]
    model = build_sam2(YAML["t"][0], ckpt_path=None, device="cpu", hydra_overrides_extra=overrides)
    return randomized(model, seed)


def official_embeddings(model: torch.nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What `SAM2ImagePredictor.set_image` computes from normalized images x (B, S, S, 3): (image_embed,
    s1, s0), NHWC."""
    with torch.no_grad():
        backbone_out = model.forward_image(nchw(x))
        _, feats, _, sizes = model._prepare_backbone_features(backbone_out)
        feats[-1] = feats[-1] + model.no_mem_embed
        b = x.shape[0]
        maps = [f.permute(1, 2, 0).reshape(b, -1, *s) for f, s in zip(feats, sizes)]  # (B, C, h, w)
    s0, s1, embed = (nhwc(m) for m in maps)
    return embed, s1, s0


def on_meta(build):
    """`build()` with tensors on the meta device (shapes only, no init cost); `Hiera.__init__` reads
    its drop path rates with `.item()`, so `torch.linspace` stays on the CPU."""
    linspace = torch.linspace
    try:
        torch.linspace = lambda *a, **kw: linspace(*a, **{**kw, "device": "cpu"})
        with torch.device("meta"):
            return build()
    finally:
        torch.linspace = linspace


def images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- config


def test_presets_match_the_yaml_files():
    """Every trunk and neck value of the four SAM 2.1 yaml files (with `Hiera`'s defaults where a file
    leaves one out), and the official trunk's per-block windows, strides, widths and heads."""
    for size, (path, preset) in YAML.items():
        enc = preset()
        model = compose(config_name=path).model
        trunk = OmegaConf.to_container(model.image_encoder.trunk)
        neck = OmegaConf.to_container(model.image_encoder.neck)
        trunk.pop("_target_"), neck.pop("_target_"), neck.pop("position_encoding")
        for k, v in trunk.items():
            assert getattr(enc, k) == (tuple(v) if isinstance(v, list) else v), (size, k)
        for k, v in neck.items():
            assert getattr(enc, k) == (tuple(v) if isinstance(v, list) else v), (size, k)
        assert enc.scalp == model.image_encoder.scalp and enc.img_size == model.image_size
        assert model.use_high_res_features_in_sam and model.directly_add_no_mem_embed
        official = on_meta(lambda: instantiate(model.image_encoder.trunk))  # noqa: B023
        specs = [
            (b.dim, b.dim_out, b.attn.num_heads, b.window_size, b.q_stride[0] if b.q_stride else 0)
            for b in official.blocks
        ]
        assert tuple(specs) == enc.block_specs, size
        assert tuple(official.channel_list) == enc.channel_list == enc.backbone_channel_list
        assert (enc.grid_size, enc.depth, enc.level_sizes) == (64, len(official.blocks), (256, 128, 64, 32))
        assert enc.high_res_channels > 0
        assert len(enc.drop_path_rates) == enc.depth


def test_config_round_trips_and_checks():
    config = sam_config(dataclasses.replace(hiera_tiny(), drop_path_rate=0.2, remat=True), "sam2.1_hiera_tiny_test")
    d = json.loads(json.dumps(config.to_dict()))  # as a checkpoint's config.json holds it
    assert SamConfig.from_dict(d) == config
    assert config.embedding_size == 64 and config.image_size == 1024
    with pytest.raises(ValueError, match="backbone_channel_list"):
        HieraConfig(embed_dim=112)
    with pytest.raises(ValueError, match="3 feature levels"):
        dataclasses.replace(hiera_tiny(), scalp=0)
    with pytest.raises(ValueError, match="window_spec"):
        dataclasses.replace(hiera_tiny(), window_spec=(8, 4, 14))
    with pytest.raises(ValueError, match="global attention"):  # the official block divides by its window 0
        small_hiera(global_att_blocks=(3,))
    with pytest.raises(ValueError, match="do not tile"):  # 4 windows of 5 on 20, pooled: 5 windows of 2 on 10
        small_hiera(img_size=320, window_spec=(8, 6, 5, 3), backbone_channel_list=(128, 64, 32, 16))
    with pytest.raises(ValueError, match="prompt_embed_dim"):
        SamConfig(image_encoder=hiera_tiny(), prompt_embed_dim=128)
    with pytest.raises(ValueError, match="hq_token"):
        SamConfig(image_encoder=hiera_tiny(), mask_decoder=MaskDecoderConfig(hq_token=True))


# ----------------------------------------------------------------------------- modules


@pytest.mark.parametrize("sizes", [(7, 256), (14, 256), (7, 64), (5, 9), (7, 7), (14, 10), (3, 1)])
def test_bicubic_matrix_is_torchs(sizes):
    """`F.interpolate(mode="bicubic", align_corners=False)` (A = -0.75; jax.image.resize's cubic is
    A = -0.5), upsampling, same size and downsampling."""
    n, m = sizes
    x = np.random.default_rng(n * m).normal(size=(3, n, n + 2)).astype(np.float32)
    expected = F.interpolate(t(x)[None], size=(m, m + 1), mode="bicubic", align_corners=False)[0]
    ours = np.einsum("hi,wj,cij->chw", hiera.bicubic_resize_matrix(n, m), hiera.bicubic_resize_matrix(n + 2, m + 1), x)
    print(f"bicubic {n} -> {m}: max abs error {close(ours, expected, 1e-5):.2e}")


BLOCK_CASES = {  # dim, dim_out, heads, window, q_stride, (H, W)
    "window_padded": (16, 16, 2, 4, 0, (10, 13)),
    "global": (16, 16, 2, 0, 0, (6, 7)),
    "pool_window": (16, 32, 2, 8, 2, (16, 16)),
    "pool_window_padded": (16, 32, 2, 6, 2, (14, 14)),
    "pool_window_odd": (16, 32, 4, 5, 2, (16, 16)),  # windows of 5 (padded to 20) pooled to 2
}


@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
def test_block(case):
    dim, dim_out, heads, window, q_stride, hw = BLOCK_CASES[case]
    ref = OfficialBlock(dim, dim_out, heads, q_stride=(q_stride,) * 2 if q_stride else None, window_size=window)
    ref = randomized(ref, seed=3)
    # The rows of a block (its own keys) from a config whose block 0 keeps / block 1 changes the width.
    enc = hiera_tiny()
    i = 1 if dim != dim_out else 0
    params = load_params(
        state_dict_numpy(ref),
        hiera_rows(sam_config(enc)),
        f"image_encoder.trunk.blocks.{i}.",
        ("image_encoder", "trunk", f"blocks_{i}"),
    )
    x = np.random.default_rng(4).normal(size=(2, *hw, dim)).astype(np.float32)
    with torch.no_grad():
        expected = ref(t(x))
    ours = jax.jit(hiera.MultiScaleBlock(dim_out, heads, window_size=window, q_stride=q_stride).apply)(
        {"params": params}, jnp.asarray(x)
    )
    print(f"block {case}: max abs error {close(ours, expected):.2e}")


def test_float64_is_exact():
    """In float64 a pooling block with padded windows agrees with the official one to ~1e-12: the
    float32 gaps are rounding."""
    dim, dim_out, heads, window, q_stride, hw = BLOCK_CASES["pool_window_padded"]
    ref = randomized(OfficialBlock(dim, dim_out, heads, q_stride=(2, 2), window_size=window), seed=5).double()
    params = load_params(
        state_dict_numpy(ref),
        hiera_rows(sam_config(hiera_tiny())),
        "image_encoder.trunk.blocks.1.",
        ("image_encoder", "trunk", "blocks_1"),
    )
    x = np.random.default_rng(6).normal(size=(2, *hw, dim))
    with torch.no_grad():
        expected = ref(t(x))
    with jax.enable_x64(True):
        block = hiera.MultiScaleBlock(dim_out, heads, window_size=window, q_stride=q_stride, dtype=jnp.float64)
        out = block.apply({"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)}, jnp.asarray(x))
        assert out.dtype == jnp.float64
        print(f"float64 block: max abs error {close(out, expected, 1e-10):.2e}")


def official_trunk(enc: HieraConfig, seed: int) -> torch.nn.Module:
    ref = OfficialHiera(
        embed_dim=enc.embed_dim,
        num_heads=enc.num_heads,
        q_pool=enc.q_pool,
        q_stride=enc.q_stride,
        stages=enc.stages,
        dim_mul=enc.dim_mul,
        head_mul=enc.head_mul,
        window_pos_embed_bkg_spatial_size=enc.window_pos_embed_bkg_spatial_size,
        window_spec=enc.window_spec,
        global_att_blocks=enc.global_att_blocks,
    )
    return randomized(ref, seed)


TRUNKS = {
    "small": small_hiera(),
    "global_stage_1": small_hiera(
        global_att_blocks=(2, 5), window_pos_embed_bkg_spatial_size=(14, 14), window_spec=(8, 4, 6, 4)
    ),
}


@pytest.mark.parametrize("name", sorted(TRUNKS))
def test_trunk(name):
    """Each stage's output."""
    enc = TRUNKS[name]
    ref = official_trunk(enc, seed=7)
    params = load_params(
        state_dict_numpy(ref), hiera_rows(sam_config(enc)), "image_encoder.trunk.", ("image_encoder", "trunk")
    )
    x = images(enc.img_size, seed=8)
    with torch.no_grad():
        expected = ref(nchw(x))
    ours = jax.jit(hiera.Hiera(enc).apply)({"params": params}, jnp.asarray(x))
    assert len(ours) == len(expected) == 4
    errors = [close(o, nhwc(e)) for o, e in zip(ours, expected)]
    print(f"trunk {name}: max abs error per stage {errors}")


@pytest.mark.parametrize("interp", ["nearest", "bilinear"])
def test_neck(interp):
    """Every level (the scalped one too) of the official `FpnNeck`, top-down on levels 2 and 3 only."""
    enc = small_hiera(fpn_interp_model=interp)
    ref = OfficialFpnNeck(
        PositionEmbeddingSine(enc.d_model),
        enc.d_model,
        list(enc.backbone_channel_list),
        fpn_interp_model=interp,
        fpn_top_down_levels=list(enc.fpn_top_down_levels),
    )
    ref = randomized(ref, seed=9)
    params = load_params(
        state_dict_numpy(ref), hiera_rows(sam_config(enc)), "image_encoder.neck.", ("image_encoder", "neck")
    )
    rng = np.random.default_rng(10)
    xs = [rng.normal(size=(2, s, s, c)).astype(np.float32) for s, c in zip(enc.level_sizes, enc.channel_list[::-1])]
    with torch.no_grad():
        expected, _ = ref([nchw(x) for x in xs])
    ours = hiera.FpnNeck(enc).apply({"params": params}, [jnp.asarray(x) for x in xs])
    errors = [close(o, nhwc(e)) for o, e in zip(ours, expected, strict=True)]
    print(f"neck {interp}: max abs error per level {errors}")


# ----------------------------------------------------------------------------- the whole encoder


def check_encoder(enc: HieraConfig, x: np.ndarray, seed: int) -> dict[str, float]:
    """Ours (through `SamModel.encode`, params loaded by the key table) against the official
    forward_image + _prepare_backbone_features + no_mem_embed."""
    config = sam_config(enc)
    ref = official_sam2(enc, seed)
    rows = hiera_rows(config)
    # The prompt encoder and decoder are not run: zeros of their shapes (no init to compile).
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_params(config))
    params["image_encoder"] = load_params(state_dict_numpy(ref), rows, "", ("image_encoder",))
    out = SamModel(config, params).encode(jnp.asarray(x))
    check_embeddings(out, config)
    embed, s1, s0 = official_embeddings(ref, x)
    return {
        "embedding": close(out.embedding, embed),
        "s1": close(out.high_res[0], s1),
        "s0": close(out.high_res[1], s0),
    }


def test_encoder_small():
    enc = small_hiera(d_model=256)
    errors = check_encoder(enc, images(enc.img_size, seed=11), seed=12)
    print(f"encoder small: max abs errors {errors}")


# ----------------------------------------------------------------------------- key table


def image_side_keys(path: str) -> dict[str, tuple[int, ...]]:
    """The official image-side tensors of a yaml's model (built on the meta device: shapes only)."""
    cfg = compose(config_name=path)
    OmegaConf.resolve(cfg)
    model = on_meta(lambda: instantiate(cfg.model, _recursive_=True))
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if k.startswith("image_encoder.") or k == "no_mem_embed" or k.startswith("sam_mask_decoder.conv_s")
    }


@pytest.mark.parametrize("size", sorted(YAML))
def test_key_table(size):
    """Every official image-side key once, every param of our encoder once, the shapes carried over."""
    path, preset = YAML[size]
    config = sam_config(preset())
    official = image_side_keys(path)
    rows = hiera_rows(config)
    keys = [r.official for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == set(official)
    assert all(r.hf is None for r in rows)
    enc = hiera.Sam2ImageEncoder(config.image_encoder, config.prompt_embed_dim)
    s = config.image_size
    shapes = jax.eval_shape(lambda: enc.init(jax.random.key(0), jnp.zeros((1, s, s, 3))))["params"]
    flat = {
        tuple(k.key for k in p): v.value.shape
        for p, v in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda v: hasattr(v, "value"))[0]
    }
    paths = [r.flax[1:] for r in rows]
    assert len(paths) == len(set(paths)) and set(paths) == set(flat)
    for r in rows:
        assert r.transform(np.empty(official[r.official], np.float32)).shape == flat[r.flax[1:]], r
        assert r.inverse(np.empty(flat[r.flax[1:]], np.float32)).shape == official[r.official], r


# ----------------------------------------------------------------------------- training options


def test_drop_path_and_remat():
    """Drop path changes the output only with deterministic=False, and then by the key; remat keeps the
    params and the outputs."""
    enc = HieraConfig(
        img_size=128,
        embed_dim=8,
        stages=(1, 1, 1, 1),
        global_att_blocks=(),
        window_spec=(8, 4, 4, 2),
        backbone_channel_list=(64, 32, 16, 8),
        d_model=16,
        drop_path_rate=0.5,
    )
    x = jnp.asarray(images(enc.img_size, seed=15))
    model = hiera.Sam2ImageEncoder(enc, enc.d_model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(16)
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype), nn.unbox(shapes))

    def runner(m, deterministic):
        f = jax.jit(lambda p, key: m.apply({"params": p}, x, deterministic, rngs={"drop_path": key}))
        return lambda key=1: f(params, jax.random.key(key))

    ref = runner(model, True)()
    dropped = runner(model, False)
    d1 = dropped()
    assert not np.array_equal(d1.embedding, ref.embedding)
    jax.tree.map(np.testing.assert_array_equal, dropped(), d1)
    assert not np.array_equal(dropped(2).embedding, d1.embedding)
    remat = hiera.Sam2ImageEncoder(dataclasses.replace(enc, remat=True), enc.d_model)
    remat_shapes = jax.eval_shape(remat.init, jax.random.key(0), x)["params"]
    assert jax.tree.structure(remat_shapes) == jax.tree.structure(shapes)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), runner(remat, False)(), d1)


# ----------------------------------------------------------------------------- compute dtype, the model API


def random_params(config: SamConfig, seed: int = 0, scale: float = 0.3, unit_norms: bool = False) -> dict:
    """Params of `config`'s shapes, normal(0, scale) (no init to compile); with `unit_norms` the
    norms' scales are 1 + normal(0, scale)."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        x = (scale * rng.normal(size=a.shape)).astype(a.dtype)
        return x + 1 if unit_norms and path[-1].key == "scale" else x

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))


def test_bfloat16_close_to_float32():
    """bfloat16 compute (float32 params, norms and softmaxes) stays within a few % of float32, and the
    embeddings come back float32."""
    enc = small_hiera(d_model=32)
    config = sam_config(enc)
    params = random_params(config, seed=17)
    params["image_encoder"] = jax.tree.map(lambda a: a / 2, params["image_encoder"])
    x = jnp.asarray(images(enc.img_size, seed=18))
    f32 = SamModel(config, params).encode(x)
    bf16 = SamModel(config, params).with_dtype("bfloat16").encode(x)
    for name, a, b in zip(("embedding", "s1", "s0"), jax.tree.leaves(f32), jax.tree.leaves(bf16)):
        assert b.dtype == jnp.float32 and b.shape == a.shape
        rel = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))
        print(f"bfloat16 vs float32 {name}: relative error {rel:.4f}")
        assert rel < 0.05, name


def test_predictor_runs_a_hiera_model(photo):
    """`SamModel` and `SamPredictor` take a Hiera model as any other: the embeddings (with high-res
    features) pass `check_embeddings`, and the decoder gives masks at the photo's size."""
    from sam_jax.predictor import SamPredictor

    enc = HieraConfig(
        img_size=128,
        embed_dim=8,
        stages=(1, 1, 2, 1),
        global_att_blocks=(3,),
        window_spec=(8, 4, 4, 2),
        backbone_channel_list=(64, 32, 16, 8),
        d_model=16,
    )
    config = SamConfig(
        name="sam2_predictor_test",
        image_encoder=enc,
        mask_decoder=MaskDecoderConfig(iou_head_hidden_dim=16, transformer_mlp_dim=32, transformer_num_heads=2),
        prompt_embed_dim=16,
    )
    predictor = SamPredictor(SamModel(config, random_params(config, seed=19, scale=0.1)))
    predictor.set_image(photo)
    check_embeddings(predictor.features, config)
    assert predictor.get_image_embedding().shape[-2:] == (enc.grid_size, enc.grid_size)
    masks, iou, low = predictor.predict(point_coords=np.array([[100.0, 120.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, *photo.shape[:2]) and iou.shape == (3,) and low.shape == (3, 32, 32)
    assert np.isfinite(low).all()


def test_layer_decay_ids():
    """Layer-wise lr decay counts Hiera's blocks under image_encoder/trunk (official `Hiera.get_layer_id`)."""
    from sam_jax.train.optim import layer_id

    depth = hiera_tiny().depth
    for path, expected in [
        (("image_encoder", "trunk", "patch_embed", "proj", "kernel"), 0),
        (("image_encoder", "trunk", "pos_embed"), 0),
        (("image_encoder", "trunk", "pos_embed_window"), 0),
        (("image_encoder", "trunk", "blocks_3", "attn", "qkv", "kernel"), 4),
        (("image_encoder", "neck", "convs_0", "kernel"), depth + 1),
        (("image_encoder", "no_mem_embed"), depth + 1),
        (("image_encoder", "conv_s0", "kernel"), depth + 1),
    ]:
        assert layer_id(path, depth) == expected, path
