"""State dicts (flat `{key: numpy array}`) <-> Flax params, strictly, through the key table.

- `to_flax(state_dict, config)`: official or Hugging Face keys -> Flax params. Every
  missing, unexpected or mis-shaped tensor is reported in one `CheckpointError`.
- `to_official(params, config)`: Flax params -> official keys (for export).
- `infer_model_type(state_dict)`: vit_b / vit_l / vit_h / vit_t from the tensors' shapes, or the
  HQ-SAM model on that encoder (vit_*_hq, vit_tiny_hq) for a checkpoint with the HQ token; a SAM 2.1
  `.pt` (a Hiera trunk) as sam2.1_hiera_tiny / _small / _base_plus / _large from its trunk's width and depth.
Precision is never changed here: tensors keep the dtype they were stored with,
except that the loader casts to the float32 params when a checkpoint is half precision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import numpy as np

from sam_jax.config import CONFIGS, HieraConfig, SamConfig, TinyViTConfig, get_config
from sam_jax.convert.errors import CheckpointError, check_keys, set_path
from sam_jax.convert.keys import Row, ignored_buffers, key_table
from sam_jax.convert.keys_hq import HQ_TOKEN_KEY
from sam_jax.convert.keys_sam2 import SAM2_1_KEY, SAM2_TRUNK_KEY

KeyStyle = Literal["official", "hf"]
# Hugging Face ties the positional-encoding matrix to a second name; some files hold both.
HF_PE_KEY = "shared_image_embedding.positional_embedding"
HF_PE_ALIAS = "prompt_encoder.shared_embedding.positional_embedding"


def key_style(state_dict: Mapping[str, Any]) -> KeyStyle:
    """Whether a state dict uses the official or the Hugging Face key names."""
    if any(k.startswith("vision_encoder.") for k in state_dict):
        return "hf"
    if any(k.startswith("image_encoder.") for k in state_dict):
        return "official"
    raise CheckpointError(
        "not a SAM checkpoint: no 'image_encoder.*' (official) or 'vision_encoder.*' (Hugging Face) tensors"
    )


def _row_key(row: Row, style: KeyStyle) -> str:
    if style == "hf" and row.hf is None:
        raise CheckpointError(
            f"a checkpoint with Hugging Face key names, but {row.official} has none: this model's checkpoints "
            "use the official key names"
        )
    return row.hf if style == "hf" else row.official


# The first convolution of TinyViT's stem (MobileSAM), where the ViT has `patch_embed.proj`.
TINY_VIT_STEM = "image_encoder.patch_embed.seq.0.c.weight"


def _infer_tiny_vit(state_dict: Mapping[str, np.ndarray]) -> str:
    """The registered TinyViT SAM model (vit_t) whose stage widths and depths a state dict has."""

    def width(key: str) -> int | None:
        return int(np.shape(state_dict[key])[0]) if key in state_dict else None

    found_depths, found_widths, i = [], [width("image_encoder.patch_embed.seq.2.c.weight")], 0
    while any(k.startswith(f"image_encoder.layers.{i}.") for k in state_dict):
        prefix = f"image_encoder.layers.{i}.blocks."
        found_depths.append(len({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)}))
        found_widths.append(width(f"image_encoder.layers.{i}.downsample.conv1.c.weight"))
        i += 1
    found = (tuple(found_widths[: len(found_depths)]), tuple(found_depths))
    known = {}
    for name, make in CONFIGS.items():
        config = make()
        enc = config.image_encoder
        if isinstance(enc, TinyViTConfig) and not config.mask_decoder.hq_token:  # HQ: `infer_model_type`
            known[name] = (enc.embed_dims, enc.depths)
            if known[name] == found:
                return name
    raise CheckpointError(
        f"cannot infer the model type: a TinyViT image encoder (MobileSAM) of widths {found[0]} and depths "
        f"{found[1]} matches none of {', '.join(f'{n} {w} {d}' for n, (w, d) in known.items())}; pass the config "
        "explicitly"
    )


def registered_variant(config: SamConfig, hq_token: bool) -> str | None:
    """The registered model with `config`'s image encoder and, with `hq_token`, HQ-SAM's decoder
    (vit_t <-> vit_tiny_hq, vit_b <-> vit_b_hq, ...); None if there is none."""
    for name, make in CONFIGS.items():
        other = make()
        if other.mask_decoder.hq_token == hq_token and other.image_encoder == config.image_encoder:
            return name
    return None


def infer_model_type(state_dict: Mapping[str, np.ndarray]) -> str:
    """The official variant (vit_b, vit_l, vit_h, MobileSAM's vit_t, HQ-SAM's vit_b_hq, vit_l_hq,
    vit_h_hq, Light HQ-SAM's vit_tiny_hq) whose shapes a state dict has."""
    name = _infer_sam_type(state_dict)
    if HQ_TOKEN_KEY not in state_dict:
        return name
    hq = registered_variant(get_config(name), hq_token=True)
    if hq is None:
        raise CheckpointError(
            f"an HQ-SAM checkpoint ({HQ_TOKEN_KEY}) on a {name} image encoder, for which no HQ-SAM model is "
            "registered; pass the config explicitly"
        )
    return hq


def check_hq_variant(keys, config: SamConfig) -> None:
    """Raise a CheckpointError naming the mix-up when a SAM checkpoint (no HQ token) is loaded as an
    HQ-SAM model or an HQ-SAM checkpoint as a SAM model (`keys`: the checkpoint's tensor names)."""
    has_hq = HQ_TOKEN_KEY in keys
    if has_hq == config.mask_decoder.hq_token:
        return
    if config.mask_decoder.hq_token:
        other = registered_variant(config, hq_token=False) or config.name.removesuffix("_hq")
        raise CheckpointError(
            f"a SAM checkpoint without HQ-SAM's HQ token ({HQ_TOKEN_KEY}) given as the HQ-SAM model {config.name}: "
            f"load it as {other}, or give an HQ-SAM checkpoint (sam_hq_vit_*.pth)"
        )
    other = registered_variant(config, hq_token=True) or f"{config.name}_hq"
    raise CheckpointError(
        f"an HQ-SAM checkpoint (it has {HQ_TOKEN_KEY}) given as the SAM model {config.name}: load it as "
        f"{other} (or --model-type auto)"
    )


def _infer_sam2(state_dict: Mapping[str, np.ndarray]) -> str:
    """The registered SAM 2.1 model whose Hiera trunk (width of its patch embedding, number of blocks)
    a state dict has."""
    if SAM2_1_KEY not in state_dict:
        raise CheckpointError(
            f"a SAM 2 checkpoint without {SAM2_1_KEY}: SAM 2.0 (sam2_hiera_*.pt) is not supported; "
            "use a SAM 2.1 checkpoint (sam2.1_hiera_*.pt)"
        )
    width = int(np.shape(state_dict[SAM2_TRUNK_KEY])[0])
    prefix = "image_encoder.trunk.blocks."
    depth = len({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)})
    known = {}
    for name, make in CONFIGS.items():
        enc = make().image_encoder
        if isinstance(enc, HieraConfig):
            known[name] = (enc.embed_dim, enc.depth)
            if known[name] == (width, depth):
                return name
    raise CheckpointError(
        f"cannot infer the model type: a SAM 2 Hiera trunk of width {width} and {depth} blocks matches none of "
        f"{', '.join(f'{n} {w, d}' for n, (w, d) in known.items())}; pass the config explicitly"
    )


def check_sam2_variant(keys, config: SamConfig) -> None:
    """Raise a CheckpointError naming the mix-up when a SAM 2 checkpoint (a Hiera trunk) is loaded as a SAM
    model or a SAM checkpoint as a SAM 2.1 model (`keys`: the checkpoint's tensor names)."""
    is_sam2 = SAM2_TRUNK_KEY in keys
    wants_sam2 = isinstance(config.image_encoder, HieraConfig)
    if is_sam2 and not wants_sam2:
        raise CheckpointError(
            f"a SAM 2 checkpoint (it has {SAM2_TRUNK_KEY}) given as the SAM model {config.name}: load it as "
            "sam2.1_hiera_tiny / _small / _base_plus / _large (or --model-type auto)"
        )
    if wants_sam2 and not is_sam2:
        raise CheckpointError(
            f"a checkpoint without SAM 2's Hiera trunk ({SAM2_TRUNK_KEY}) given as the SAM 2.1 model {config.name}: "
            "give a SAM 2.1 checkpoint (sam2.1_hiera_*.pt), or load this one as its own model type (--model-type auto)"
        )
    if is_sam2 and SAM2_1_KEY not in keys:
        raise CheckpointError(
            f"a SAM 2 checkpoint without {SAM2_1_KEY} given as {config.name}: SAM 2.0 (sam2_hiera_*.pt) is not "
            "supported; use a SAM 2.1 checkpoint (sam2.1_hiera_*.pt)"
        )


def _infer_sam_type(state_dict: Mapping[str, np.ndarray]) -> str:
    """The official SAM, MobileSAM or SAM 2.1 variant whose image encoder a state dict has."""
    style = key_style(state_dict)
    if style == "official" and SAM2_TRUNK_KEY in state_dict:
        return _infer_sam2(state_dict)
    if style == "official" and TINY_VIT_STEM in state_dict:
        return _infer_tiny_vit(state_dict)
    patch = "vision_encoder.patch_embed.projection.weight" if style == "hf" else "image_encoder.patch_embed.proj.weight"
    block = "vision_encoder.layers." if style == "hf" else "image_encoder.blocks."
    if patch not in state_dict:
        raise CheckpointError(f"cannot infer the model type: the checkpoint has no {patch!r}")
    width = int(np.shape(state_dict[patch])[0])
    depth = len({k[len(block) :].split(".")[0] for k in state_dict if k.startswith(block)})
    for name in ("vit_b", "vit_l", "vit_h"):
        enc = CONFIGS[name]().image_encoder
        if (enc.embed_dim, enc.depth) == (width, depth):
            return name
    raise CheckpointError(
        f"cannot infer the model type: image encoder width {width} and depth {depth} match none of "
        "vit_b (768, 12), vit_l (1024, 24), vit_h (1280, 32); pass the config explicitly"
    )


def _expected_shapes(config: SamConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    from sam_jax.model import abstract_params  # deferred: keeps the converter's import light

    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def to_flax(state_dict: Mapping[str, np.ndarray], config: SamConfig, *, consume: bool = False) -> dict[str, Any]:
    """Convert an official or Hugging Face state dict to Flax params for `config`, strictly.

    consume: pop each tensor from `state_dict` (a dict) as it is converted, so that a layout
    copy never lives beside its source for more than one tensor (conversion in ~1x the memory)."""
    style = key_style(state_dict)
    if style == "hf" and HF_PE_ALIAS in state_dict:
        state_dict = dict(state_dict) if not consume else state_dict
        alias = state_dict.pop(HF_PE_ALIAS)
        state_dict.setdefault(HF_PE_KEY, alias)
    check_sam2_variant(state_dict, config)
    check_hq_variant(state_dict, config)
    table = key_table(config)
    expected = _expected_shapes(config)
    table_paths = {row.flax for row in table}
    if table_paths != set(expected):  # the table and the model must describe the same tensors
        raise AssertionError(f"key table out of sync with the model: {sorted(table_paths ^ set(expected))[:5]}")

    known = {_row_key(row, style) for row in table}
    buffers = set(ignored_buffers(config))  # read by no model: accepted, present or not, if scalars
    missing = [_row_key(row, style) for row in table if _row_key(row, style) not in state_dict]
    unexpected = [k for k in state_dict if k not in known and k not in buffers]
    misshaped = [f"{k} {tuple(np.shape(state_dict[k]))}" for k in buffers if k in state_dict and np.ndim(state_dict[k])]
    params = {}
    for row in table:
        key = _row_key(row, style)
        if key not in state_dict:
            continue
        source = np.asarray(state_dict.pop(key) if consume else state_dict[key])
        value = row.transform(source)
        if value.shape != expected[row.flax]:
            misshaped.append(f"{key} {tuple(source.shape)}")
            continue
        set_path(params, row.flax, value)
    check_keys(f"checkpoint does not match the {config.name} model", missing, unexpected, misshaped)
    return params


def to_official(params: Mapping[str, Any], config: SamConfig) -> dict[str, np.ndarray]:
    """Flax params -> a state dict with the official key names and layouts (with MobileSAM's BatchNorm
    counters, `keys.ignored_buffers`, at 0)."""
    out = {}
    for row in key_table(config):
        node: Any = params
        for part in row.flax:
            node = node[part]
        out[row.official] = row.inverse(np.asarray(node))
    for key in ignored_buffers(config):  # as a fresh BatchNorm2d holds them
        out[key] = np.zeros((), np.int64)
    return out


def shape_check(model_type: str | SamConfig) -> Callable[[Mapping[str, tuple[int, ...]]], None]:
    """A check of a checkpoint's tensor shapes, before any tensor is read (`load_torch_checkpoint`'s
    `check_shapes`): every tensor the model of `model_type` ("auto": the variant the shapes show)
    has must have its shape. Shapes are looked at, never allocated."""

    def check(shapes: Mapping[str, tuple[int, ...]]) -> None:
        views = {k: np.broadcast_to(np.empty((), np.uint8), s) for k, s in shapes.items()}  # no memory
        style = key_style(views)
        config = resolve_config(views, model_type)
        check_sam2_variant(views, config)
        check_hq_variant(views, config)
        expected = _expected_shapes(config)
        wrong = []
        for row in key_table(config):
            key = _row_key(row, style)
            want = _official_shape(row, expected[row.flax])
            if key in shapes and tuple(shapes[key]) != want:
                wrong.append(f"{key} {tuple(shapes[key])}, not {want}")
        wrong += [f"{k} {tuple(shapes[k])}, not ()" for k in ignored_buffers(config) if shapes.get(k, ()) != ()]
        check_keys(f"checkpoint does not match the {config.name} model", [], [], wrong)

    return check


def _official_shape(row: Row, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a tensor in the checkpoint's layout, from its Flax shape (the inverse transform's axes)."""
    probe = row.inverse(np.empty(tuple(range(2, 2 + len(flax_shape))), np.uint8))  # distinct sizes: the axis order
    return tuple(flax_shape[d - 2] for d in probe.shape)


def resolve_config(state_dict: Mapping[str, np.ndarray], model_type: str | SamConfig) -> SamConfig:
    """`model_type` may be "auto", a registry name, or a config."""
    if isinstance(model_type, SamConfig):
        return model_type
    return get_config(infer_model_type(state_dict) if model_type == "auto" else model_type)
