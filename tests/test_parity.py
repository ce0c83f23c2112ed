"""Parity with the official PyTorch SAM, module by module and end to end (tiny config, every
parameter randomized), on a non-square photo and on non-square grids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bench.official import build_official, modeling, randomize_, state_dict_numpy
from sam_jax.convert.keys import key_table
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.model import decode, encode
from sam_jax.modeling.image_encoder import Block, get_rel_pos, window_partition, window_unpartition
from sam_jax.prompts import make_prompts
from sam_jax.transforms import ResizeLongestSide, postprocess_masks, preprocess

ATOL = 1e-4
oie = modeling.image_encoder


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


def close(ours, ref, atol=ATOL):
    if isinstance(ref, torch.Tensor):
        ref = ref.detach().numpy()
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    assert err <= atol, f"max abs diff {err:.3g} > {atol}"


def sub_params(module: torch.nn.Module, config, official_prefix: str, flax_prefix: tuple[str, ...]):
    """Flax params of one submodule, converted with the rows of the full key table under a prefix."""
    sd = state_dict_numpy(module)
    params: dict = {}
    for row in key_table(config):
        if not row.official.startswith(official_prefix + "."):
            continue
        assert row.flax[: len(flax_prefix)] == flax_prefix
        node = params
        path = row.flax[len(flax_prefix) :]
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = row.transform(sd[row.official[len(official_prefix) + 1 :]])
    return params


# ----------------------------------------------------------------------------- encoder pieces


@pytest.mark.parametrize("hw", [(10, 7), (7, 12), (14, 14)])
def test_window_partition_non_square(hw):
    x = np.random.default_rng(0).normal(size=(2, *hw, 5)).astype(np.float32)
    ref, ref_pad = oie.window_partition(t(x), 4)
    ours, pad = window_partition(jnp.asarray(x), 4)
    assert pad == ref_pad
    close(ours, ref.numpy(), 0)
    close(window_unpartition(ours, 4, pad, hw), oie.window_unpartition(ref, 4, ref_pad, hw).numpy(), 0)


@pytest.mark.parametrize("q,k,length", [(14, 14, 27), (64, 64, 127), (10, 10, 27), (20, 20, 27), (6, 9, 17)])
def test_get_rel_pos_including_resize(q, k, length):
    rel = np.random.default_rng(1).normal(size=(length, 8)).astype(np.float32)
    close(get_rel_pos(q, k, jnp.asarray(rel)), oie.get_rel_pos(q, k, t(rel)).numpy(), 1e-5)


@pytest.mark.parametrize("window_size,hw", [(0, (6, 10)), (4, (6, 10)), (4, (11, 5))])
def test_block_non_square(tiny_config, window_size, hw):
    """One encoder block on a non-square grid, windowed (with H and W padded differently) and global."""
    dim, heads = 32, 4
    ref = oie.Block(
        dim,
        heads,
        use_rel_pos=True,
        rel_pos_zero_init=False,
        window_size=window_size,
        input_size=hw,
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
    )
    randomize_(ref, seed=3)
    sd = state_dict_numpy(ref)
    from sam_jax.convert import keys

    params = {
        "norm1": {"scale": sd["norm1.weight"], "bias": sd["norm1.bias"]},
        "norm2": {"scale": sd["norm2.weight"], "bias": sd["norm2.bias"]},
        "attn": {
            "qkv": {"kernel": keys.linear(sd["attn.qkv.weight"]), "bias": sd["attn.qkv.bias"]},
            "proj": {"kernel": keys.linear(sd["attn.proj.weight"]), "bias": sd["attn.proj.bias"]},
            "rel_pos_h": sd["attn.rel_pos_h"],
            "rel_pos_w": sd["attn.rel_pos_w"],
        },
        "mlp": {
            "lin1": {"kernel": keys.linear(sd["mlp.lin1.weight"]), "bias": sd["mlp.lin1.bias"]},
            "lin2": {"kernel": keys.linear(sd["mlp.lin2.weight"]), "bias": sd["mlp.lin2.bias"]},
        },
    }
    x = np.random.default_rng(2).normal(size=(2, *hw, dim)).astype(np.float32)
    with torch.no_grad():
        expected = ref(t(x)).numpy()
    # The default chunking (none at these sizes) and one grid row of queries per chunk.
    for query_block in (256, hw[1]):
        ours = Block(heads, window_size=window_size, input_size=hw, query_block=query_block).apply(
            {"params": params}, jnp.asarray(x)
        )
        close(ours, expected)


def test_image_encoder(official_tiny, tiny_params, tiny_config):
    s = tiny_config.image_size
    x = np.random.default_rng(4).normal(size=(2, s, s, 3)).astype(np.float32)
    with torch.no_grad():
        ref = official_tiny.image_encoder(t(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    close(encode(tiny_params, jnp.asarray(x), config=tiny_config).embedding, ref)


# ----------------------------------------------------------------------------- prompts + decoder

PROMPT_CASES = {
    "points": dict(points=[[50.0, 80.0], [120.0, 30.5]], labels=[1, 0]),
    "one_point": dict(points=[[200.0, 100.0]], labels=[1]),
    "box": dict(box=[30.0, 40.0, 180.0, 150.0]),
    "box_points": dict(points=[[60.0, 70.0]], labels=[1], box=[30.0, 40.0, 180.0, 150.0]),
    "mask": dict(mask=True),
    "points_mask": dict(points=[[60.0, 70.0], [10.0, 150.0]], labels=[1, 0], mask=True),
}


def _official_prompts(case, mask):
    pts = (
        (t(np.array([case["points"]], np.float32)), t(np.array([case["labels"]], np.int64)))
        if "points" in case
        else None
    )
    box = t(np.array([case["box"]], np.float32)) if "box" in case else None
    return pts, box, (t(mask) if case.get("mask") else None)


def _our_prompts(case, mask, config, num_points=None):
    return make_prompts(
        batch_size=1,
        mask_size=config.low_res_mask_size,
        point_coords=np.array([case["points"]]) if "points" in case else None,
        point_labels=np.array([case["labels"]]) if "points" in case else None,
        boxes=np.array([case["box"]]) if "box" in case else None,
        mask_input=mask[:, 0] if case.get("mask") else None,
        num_points=num_points,
    )


@pytest.fixture(scope="module")
def embedding_and_mask(tiny_config):
    rng = np.random.default_rng(5)
    e, m = tiny_config.embedding_size, tiny_config.low_res_mask_size
    emb = rng.normal(size=(1, tiny_config.prompt_embed_dim, e, e)).astype(np.float32)
    mask = (3 * rng.normal(size=(1, 1, m, m))).astype(np.float32)
    return emb, mask


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_prompt_encoder(official_tiny, tiny_params, tiny_config, embedding_and_mask, case):
    from sam_jax.modeling.prompt_encoder import PromptEncoder

    _, mask = embedding_and_mask
    spec = PROMPT_CASES[case]
    with torch.no_grad():
        ref_sparse, ref_dense = official_tiny.prompt_encoder(*_official_prompts(spec, mask))
    pr = _our_prompts(spec, mask, tiny_config)
    e = tiny_config.embedding_size
    enc = PromptEncoder(
        tiny_config.prompt_embed_dim, (e, e), (tiny_config.image_size,) * 2, tiny_config.prompt_encoder.mask_in_chans
    )
    sparse, dense, token_mask = enc.apply(
        {"params": tiny_params["prompt_encoder"]}, pr.points, pr.labels, pr.mask_input, pr.has_mask
    )
    close(np.asarray(sparse)[np.asarray(token_mask)][None], ref_sparse.numpy())
    close(np.asarray(dense), ref_dense.permute(0, 2, 3, 1))


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_decoder(official_tiny, tiny_params, tiny_config, embedding_and_mask, case, multimask):
    emb, mask = embedding_and_mask
    spec = PROMPT_CASES[case]
    with torch.no_grad():
        sparse, dense = official_tiny.prompt_encoder(*_official_prompts(spec, mask))
        ref_masks, ref_iou = official_tiny.mask_decoder(
            t(emb), official_tiny.prompt_encoder.get_dense_pe(), sparse, dense, multimask
        )
    pr = _our_prompts(spec, mask, tiny_config)
    masks, iou = decode(
        tiny_params,
        ImageEmbeddings(jnp.asarray(emb).transpose(0, 2, 3, 1)),
        pr,
        config=tiny_config,
        multimask_output=multimask,
    )
    close(masks, ref_masks.numpy())
    close(iou, ref_iou.numpy())


@pytest.mark.parametrize("case", ["points", "box", "box_points", "mask"])
def test_padding_does_not_change_results(tiny_params, tiny_config, embedding_and_mask, case):
    """Any padding length (bucket) gives the same masks: padded tokens are masked out."""
    emb, mask = embedding_and_mask
    emb = ImageEmbeddings(jnp.asarray(emb).transpose(0, 2, 3, 1))
    outs = [
        decode(tiny_params, emb, _our_prompts(PROMPT_CASES[case], mask, tiny_config, n), config=tiny_config)
        for n in (4, 16)
    ]
    close(outs[0][0], outs[1][0], 1e-5)
    close(outs[0][1], outs[1][1], 1e-5)


# ----------------------------------------------------------------------------- end to end


def run_end_to_end(official, params, config, photo, case, multimask):
    """Official `Sam.forward` vs preprocess -> encode -> decode -> postprocess on one photo."""
    transform = ResizeLongestSide(config.image_size)
    image = transform.apply_image(photo)
    orig = photo.shape[:2]
    spec = dict(PROMPT_CASES[case])
    if "points" in spec:
        spec["points"] = transform.apply_coords(np.array(spec["points"]), orig).tolist()
    if "box" in spec:
        spec["box"] = transform.apply_boxes(np.array(spec["box"]), orig)[0].tolist()
    m = config.low_res_mask_size
    mask = (3 * np.random.default_rng(6).normal(size=(1, 1, m, m))).astype(np.float32)
    pts, box, mask_t = _official_prompts(spec, mask)
    record = {"image": t(image).permute(2, 0, 1).float(), "original_size": orig}
    if pts is not None:
        record["point_coords"], record["point_labels"] = pts
    if box is not None:
        record["boxes"] = box
    if mask_t is not None:
        record["mask_inputs"] = mask_t
    with torch.no_grad():
        ref = official([record], multimask_output=multimask)[0]
        ref_up = official.postprocess_masks(ref["low_res_logits"], image.shape[:2], orig).numpy()
        ref_emb = official.image_encoder(official.preprocess(record["image"][None])).numpy()

    x = preprocess(jnp.asarray(image)[None], config)
    emb = encode(params, x, config=config)
    low, iou = decode(params, emb, _our_prompts(spec, mask, config), config=config, multimask_output=multimask)
    up = postprocess_masks(low, image.shape[:2], orig, config.image_size)
    close(emb.embedding, ref_emb.transpose(0, 2, 3, 1))
    close(low, ref["low_res_logits"].numpy())
    close(iou, ref["iou_predictions"].numpy())
    close(up, ref_up)
    # Thresholded masks agree except where a logit sits within rounding of 0.
    agree = np.mean((np.asarray(up) > config.mask_threshold) == ref["masks"].numpy())
    assert agree > 0.9999, agree


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_end_to_end_photo(official_tiny, tiny_params, tiny_config, photo, case, multimask):
    run_end_to_end(official_tiny, tiny_params, tiny_config, photo, case, multimask)


@pytest.mark.slow
def test_end_to_end_vit_b(photo):
    """The full-size vit_b, every parameter randomized, on the photo, with points and a box."""
    from sam_jax.config import vit_b
    from sam_jax.convert.state_dict import to_flax

    config = vit_b()
    official = randomize_(build_official(config), seed=7)
    params = to_flax(state_dict_numpy(official), config)
    run_end_to_end(official, params, config, photo, "box_points", True)


@pytest.mark.parametrize("multimask", [True, False])
def test_float64_is_exact(official_tiny, tiny_params, tiny_config, multimask):
    """In float64 the image encoder and the mask decoder agree to ~1e-12 with the official ones:
    the float32 gaps above are rounding only. (The official prompt encoder casts to float32,
    so the decoder gets the same random float64 prompt embeddings on both sides.)"""
    import copy
    import dataclasses

    from sam_jax.modeling.mask_decoder import MaskDecoder

    ref = copy.deepcopy(official_tiny).double()
    cfg = dataclasses.replace(tiny_config, dtype="float64")
    rng = np.random.default_rng(8)
    s, e, c = tiny_config.image_size, tiny_config.embedding_size, tiny_config.prompt_embed_dim
    x = rng.normal(size=(1, s, s, 3))
    emb, sparse, dense = rng.normal(size=(1, e, e, c)), rng.normal(size=(1, 3, c)), rng.normal(size=(1, e, e, c))
    grid = (np.arange(e) + 0.5) / e
    with torch.no_grad():
        ref_emb = ref.image_encoder(t(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        pe = ref.prompt_encoder.pe_layer._pe_encoding(t(np.stack(np.meshgrid(grid, grid), -1)))
        ref_masks, ref_iou = ref.mask_decoder(
            t(emb).permute(0, 3, 1, 2), pe.permute(2, 0, 1)[None], t(sparse), t(dense).permute(0, 3, 1, 2), multimask
        )
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tiny_params)
        close(encode(params, jnp.asarray(x), config=cfg).embedding, ref_emb, 1e-9)
        masks, iou = MaskDecoder(cfg.mask_decoder, c, dtype=jnp.float64).apply(
            {"params": params["mask_decoder"]}, emb, pe.numpy()[None], sparse, dense, np.ones((1, 3), bool), multimask
        )
        assert masks.dtype == jnp.float64
        close(masks, ref_masks, 1e-9)
        close(iou, ref_iou, 1e-9)
