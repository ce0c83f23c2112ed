"""Hugging Face CLIP (`CLIPModel` folder: config.json + model.safetensors) -> sam-jax CLIP params.

    config, params = load_clip("clip-vit-large-patch14-336/")

`clip_key_table(config)` lists one `ClipRow` per tensor: the HF state-dict key, the Flax
param path (`sam_jax.modeling.clip.CLIP`) and the named layout transform (`keys.linear`,
`keys.conv`, `keys.identity`). It is generated from the config by walking the modules in HF's
order; no key is ever derived by string substitution. `clip_to_flax` converts strictly: every
missing, unexpected (besides the non-persistent `position_ids` buffers older transformers
saved) or mis-shaped tensor is reported, by name, in one `CheckpointError`.

Precision is never changed here: each array keeps the dtype it was stored with (a float16
checkpoint gives float16 params, read with `np.asarray`). The model casts every param to the
config's compute `dtype` where it uses it, so such params run as they are; cast them yourself
(`jax.tree.map(lambda x: x.astype(np.float32), params)`) to train or to hold float32 copies.
Files are read with `safetensors.numpy` (no torch); bfloat16 arrives as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from sam_jax.convert.errors import CheckpointError, check_keys, set_path
from sam_jax.convert.keys import conv, identity, linear
from sam_jax.modeling.clip import CLIPConfig, abstract_clip_params

Path = tuple[str, ...]
# Non-persistent buffers (arange) that transformers before 4.31 wrote into checkpoints.
IGNORED_KEYS = frozenset({"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"})

# The HF (PyTorch) shape each transform expects, from the Flax shape: for error messages.
_HF_SHAPE: dict[Callable, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    identity: lambda s: s,
    linear: lambda s: s[::-1],  # kernel (in, out) <- weight (out, in)
    conv: lambda s: (s[3], s[2], s[0], s[1]),  # kernel (kH, kW, I, O) <- weight (O, I, kH, kW)
}


@dataclasses.dataclass(frozen=True)
class ClipRow:
    hf: str  # Hugging Face transformers CLIPModel state-dict key
    flax: Path  # path in the Flax params tree
    transform: Callable[[np.ndarray], np.ndarray]  # HF layout -> Flax layout


def _linear(h: str, f: Path, bias: bool = True) -> Iterator[ClipRow]:
    yield ClipRow(f"{h}.weight", (*f, "kernel"), linear)
    if bias:
        yield ClipRow(f"{h}.bias", (*f, "bias"), identity)


def _norm(h: str, f: Path) -> Iterator[ClipRow]:
    yield ClipRow(f"{h}.weight", (*f, "scale"), identity)
    yield ClipRow(f"{h}.bias", (*f, "bias"), identity)


def _embedding(h: str, f: Path) -> Iterator[ClipRow]:
    yield ClipRow(f"{h}.weight", (*f, "embedding"), identity)


def _encoder(h: str, f: Path, num_layers: int) -> Iterator[ClipRow]:
    for i in range(num_layers):
        hl, fl = f"{h}.layers.{i}", (*f, f"layers_{i}")
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            yield from _linear(f"{hl}.self_attn.{proj}", (*fl, "self_attn", proj))
        yield from _norm(f"{hl}.layer_norm1", (*fl, "layer_norm1"))
        yield from _linear(f"{hl}.mlp.fc1", (*fl, "mlp", "fc1"))
        yield from _linear(f"{hl}.mlp.fc2", (*fl, "mlp", "fc2"))
        yield from _norm(f"{hl}.layer_norm2", (*fl, "layer_norm2"))


def _text_model(config: CLIPConfig) -> Iterator[ClipRow]:
    h, f = "text_model", ("text_model",)
    yield from _embedding(f"{h}.embeddings.token_embedding", (*f, "embeddings", "token_embedding"))
    yield from _embedding(f"{h}.embeddings.position_embedding", (*f, "embeddings", "position_embedding"))
    yield from _encoder(f"{h}.encoder", (*f, "encoder"), config.text_config.num_hidden_layers)
    yield from _norm(f"{h}.final_layer_norm", (*f, "final_layer_norm"))


def _vision_model(config: CLIPConfig) -> Iterator[ClipRow]:
    h, f = "vision_model", ("vision_model",)
    yield ClipRow(f"{h}.embeddings.class_embedding", (*f, "embeddings", "class_embedding"), identity)
    yield ClipRow(f"{h}.embeddings.patch_embedding.weight", (*f, "embeddings", "patch_embedding", "kernel"), conv)
    yield from _embedding(f"{h}.embeddings.position_embedding", (*f, "embeddings", "position_embedding"))
    yield from _norm(f"{h}.pre_layrnorm", (*f, "pre_layrnorm"))
    yield from _encoder(f"{h}.encoder", (*f, "encoder"), config.vision_config.num_hidden_layers)
    yield from _norm(f"{h}.post_layernorm", (*f, "post_layernorm"))


def clip_key_table(config: CLIPConfig) -> list[ClipRow]:
    """Every tensor of a `CLIPModel` with this config, in HF's module order."""
    return [
        *_text_model(config),
        *_vision_model(config),
        *_linear("visual_projection", ("visual_projection",), bias=False),
        *_linear("text_projection", ("text_projection",), bias=False),
        ClipRow("logit_scale", ("logit_scale",), identity),
    ]


def _expected_shapes(config: CLIPConfig) -> dict[Path, tuple[int, ...]]:
    import jax  # deferred: the key table itself needs no JAX

    flat = jax.tree_util.tree_flatten_with_path(abstract_clip_params(config))[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def expected_hf_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """{HF key: the shape HF stores it in} for every tensor of a `CLIPModel` with this config."""
    expected = _expected_shapes(config)
    return {row.hf: _HF_SHAPE[row.transform](expected[row.flax]) for row in clip_key_table(config)}


def clip_to_flax(state_dict: Mapping[str, Any], config: CLIPConfig) -> dict[str, Any]:
    """A HF `CLIPModel` state dict ({key: array}) -> Flax params for `config`, strictly.

    Raises `CheckpointError` naming the missing, unexpected and mis-shaped keys (all of them
    counted, the first few listed). Arrays keep their dtype.
    """
    table = clip_key_table(config)
    expected = _expected_shapes(config)
    table_paths = {row.flax for row in table}
    if table_paths != set(expected):  # the table and the model must describe the same tensors
        raise AssertionError(f"CLIP key table out of sync with the model: {sorted(table_paths ^ set(expected))[:5]}")

    known = {row.hf for row in table}
    missing = [row.hf for row in table if row.hf not in state_dict]
    unexpected = [k for k in state_dict if k not in known and k not in IGNORED_KEYS]
    misshaped: list[str] = []
    params: dict[str, Any] = {}
    for row in table:
        if row.hf not in state_dict:
            continue
        value = np.asarray(state_dict[row.hf])
        want = _HF_SHAPE[row.transform](expected[row.flax])  # the HF layout of the model's shape
        if value.shape != want:
            misshaped.append(f"{row.hf} {value.shape} != expected {want}")
            continue
        set_path(params, row.flax, row.transform(value))
    check_keys(f"CLIP checkpoint does not match the {config.name} config", missing, unexpected, misshaped)
    return params


def read_safetensors(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a HF folder: model.safetensors, or the shards a model.safetensors.index.json names."""
    from safetensors.numpy import load_file

    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(single):
        shards = [single]
    elif os.path.exists(index):
        with open(index) as f:
            shards = [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        raise CheckpointError(
            f"{folder}: no model.safetensors (or model.safetensors.index.json); save the model with safetensors"
        )
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        try:
            tensors.update(load_file(shard))
        except Exception as e:  # truncated or not a safetensors file
            raise CheckpointError(f"{shard}: cannot read as safetensors: {e}") from e
    return tensors


def load_clip_config(folder: str | os.PathLike, *, dtype: str = "float32") -> CLIPConfig:
    """A HF CLIP folder's config.json -> `CLIPConfig` (compute dtype `dtype`)."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face CLIPModel folder)")
    with open(path) as f:
        raw = json.load(f)
    try:
        return CLIPConfig.from_hf_dict(raw, dtype=dtype, name=os.path.basename(os.path.normpath(folder)) or "clip")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def load_clip(folder: str | os.PathLike, *, dtype: str = "float32") -> tuple[CLIPConfig, dict[str, Any]]:
    """A HF `CLIPModel` folder (config.json + model.safetensors) -> (config, params).

    `dtype` is the config's compute dtype; the params keep the checkpoint's dtype (see the
    module docstring).
    """
    config = load_clip_config(folder, dtype=dtype)
    return config, clip_to_flax(read_safetensors(folder), config)
