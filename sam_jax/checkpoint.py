"""Reading and writing model checkpoints.

Three forms load (`load_model`):
- a sam-jax checkpoint directory (orbax): items `params` (float32 arrays) and `config` (JSON);
- an official PyTorch `.pth` (read without torch or pickle code execution);
- a `.safetensors` file with official or Hugging Face (`facebook/sam-vit-*`) key names.
`save_params` writes the first form; `export_safetensors` writes official key names
that `segment_anything`'s `Sam.load_state_dict` accepts; `export_torch` writes a PyTorch file
(without torch) that the official builders load: a plain state dict for SAM, HQ-SAM and MobileSAM
(`sam_model_registry[...](checkpoint=...)`), `{"model": state_dict}` for SAM 2.1
(`build_sam2(cfg, ckpt_path=...)`, strict), video-only tensors included.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sam_jax.config import SamConfig
from sam_jax.convert.errors import CheckpointError
from sam_jax.files import write_atomic
from sam_jax.manifest import verify_manifest, write_manifest
from sam_jax.model import Params, SamModel

PARAMS_ITEM = "params"
CONFIG_ITEM = "config"
# A config is a few kB of JSON; a larger file is not one this project wrote.
MAX_CONFIG_BYTES = 1 << 20
# Orbax stores arrays compressed and weights barely compress: params declaring more than this
# many times the bytes on disk (beyond the first 64 MiB) are refused before any is read.
_MAX_PARAMS_RATIO = 16
_RATIO_FREE_BYTES = 64 << 20


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_params(directory: str | os.PathLike, params: Params, config: SamConfig) -> Path:
    """Write params and config as an orbax checkpoint directory (atomically: orbax writes to a
    temporary directory and renames it). Refuses to overwrite an existing path."""
    path = Path(directory).absolute()
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new output path")
    ocp, ckptr = _checkpointer()
    ckptr.save(
        path,
        args=ocp.args.Composite(
            **{PARAMS_ITEM: ocp.args.StandardSave(params), CONFIG_ITEM: ocp.args.JsonSave(config.to_dict())}
        ),
    )
    import jax

    if jax.process_index() == 0:
        write_manifest(path)  # what load_params checks before reading
    return path


def load_params(directory: str | os.PathLike) -> tuple[SamConfig, Params]:
    """Read a checkpoint directory written by `save_params` -> (config, params as numpy arrays)."""
    path = Path(directory).absolute()
    if not (path / PARAMS_ITEM).is_dir() or not (path / CONFIG_ITEM).is_dir():
        raise CheckpointError(
            f"{path} is not a sam-jax checkpoint directory (no '{PARAMS_ITEM}' and '{CONFIG_ITEM}' items)"
        )
    verify_manifest(path)
    config_bytes = sum(f.stat().st_size for f in (path / CONFIG_ITEM).rglob("*") if f.is_file())
    if config_bytes > MAX_CONFIG_BYTES:
        raise CheckpointError(
            f"{path}: its '{CONFIG_ITEM}' item holds {config_bytes} bytes, more than {MAX_CONFIG_BYTES}"
        )
    stored = _stored_shapes(path / PARAMS_ITEM)
    ocp, ckptr = _checkpointer()
    try:
        config = SamConfig.from_dict(
            ckptr.restore(path, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM]
        )
    except Exception as error:  # orbax's and tensorstore's errors for a broken file vary
        raise CheckpointError(f"{path}: its config is unreadable ({_one_line(error)})") from None
    from sam_jax.model import abstract_params

    target = abstract_params(config)
    misshaped = [
        f"{'.'.join(name)} {stored[name]} (the {config.name} model has {tuple(leaf.shape)})"
        for name, leaf in _flat(target).items()
        if name in stored and stored[name] != tuple(leaf.shape)
    ]
    if misshaped:
        raise CheckpointError(f"{path}: {len(misshaped)} of its params do not match its config ({misshaped[0]}, ...)")
    try:
        params = ckptr.restore(path, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}))
    except Exception as error:
        raise CheckpointError(f"{path}: its params are unreadable ({_one_line(error)})") from None
    return config, params[PARAMS_ITEM]


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    import jax

    return {tuple(str(k.key) for k in keys): leaf for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _stored_shapes(directory: Path) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The shapes of the arrays in an orbax params item, from their metadata alone (orbax restores
    an array at its stored shape, and tensorstore fills a missing chunk): refuses arrays that
    declare far more bytes than the item holds."""
    import orbax.checkpoint as ocp

    try:
        arrays = _flat(ocp.StandardCheckpointHandler().metadata(directory))
    except Exception as error:
        raise CheckpointError(f"{directory}: its array metadata is unreadable ({_one_line(error)})") from None
    declared = sum(int(np.prod(a.shape, dtype=object)) * np.dtype(a.dtype).itemsize for a in arrays.values())
    on_disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    if declared > max(_MAX_PARAMS_RATIO * on_disk, _RATIO_FREE_BYTES):
        raise CheckpointError(f"{directory}: its arrays declare {declared} bytes, but it holds {on_disk} bytes")
    return {name: tuple(a.shape) for name, a in arrays.items()}


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_state_dict(
    path: str | os.PathLike, *, check_shapes: Callable[[Mapping[str, tuple[int, ...]]], None] | None = None
) -> dict[str, np.ndarray]:
    """A flat state dict from an official `.pth` or a `.safetensors` file.

    check_shapes: called with `{name: shape}` from the file's metadata before any tensor is read
    (e.g. `convert.state_dict.shape_check`); it raises `CheckpointError` to refuse the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.numpy import load_file

        try:
            if check_shapes is not None:
                with safe_open(str(path), "numpy") as f:
                    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
                check_shapes(shapes)
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    from sam_jax.convert.torch_pickle import load_torch_checkpoint

    return load_torch_checkpoint(path, check_shapes=check_shapes)


def load_model(
    checkpoint: str | os.PathLike, model_type: str | SamConfig = "auto", dtype: str | None = None
) -> SamModel:
    """Load any supported checkpoint as a `SamModel`.

    model_type: "auto" (from the checkpoint), a registry name, or a config; a checkpoint
    of another variant is refused. dtype: the compute dtype (params stay float32).
    """
    from sam_jax.convert.state_dict import resolve_config, shape_check, to_flax

    path = Path(checkpoint)
    if path.is_dir():
        config, params = load_params(path)
        wanted = model_type.name if isinstance(model_type, SamConfig) else model_type
        if wanted not in ("auto", config.name):
            raise CheckpointError(
                f"{path} holds a {config.name} model, not {wanted}; sam_jax.load_model(path) loads any checkpoint "
                "with the model type it holds"
            )
    else:
        state_dict = load_state_dict(path, check_shapes=shape_check(model_type))
        config = resolve_config(state_dict, model_type)
        params = _on_device_float32(to_flax(state_dict, config, consume=True))
    model = SamModel(config, params)
    return model.with_dtype(dtype) if dtype else model


def _on_device_float32(params: dict[str, Any]) -> dict[str, Any]:
    """Numpy params -> float32 device arrays, leaf by leaf in place, each host copy dropped as soon
    as it is on the device (loading stays near 1x the params' bytes). Params are float32 by
    convention: a half-precision checkpoint is widened (losslessly); the compute dtype is separate."""
    import jax

    for key, value in params.items():
        if isinstance(value, dict):
            _on_device_float32(value)
        else:
            params[key] = jax.device_put(np.asarray(value, np.float32))
    return params


def export_safetensors(params: Params, config: SamConfig, path: str | os.PathLike) -> Path:
    """Write params with the official key names and layouts (loadable by `Sam.load_state_dict`)."""
    from safetensors.numpy import save_file

    from sam_jax.convert.state_dict import to_official

    tensors = {k: np.ascontiguousarray(v) for k, v in to_official(params, config).items()}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))  # never a partial file under `path`


def export_torch(params: Params, config: SamConfig, path: str | os.PathLike) -> Path:
    """Write params with the official key names and layouts as a PyTorch checkpoint (`torch.save`'s zip
    format): `{"model": state_dict}` for a SAM 2.1 model (`config.video_tensors`), else the state dict."""
    from sam_jax.convert.state_dict import to_official
    from sam_jax.convert.torch_save import save_torch_checkpoint

    tensors = {k: np.ascontiguousarray(v) for k, v in to_official(params, config).items()}
    obj = {"model": tensors} if config.video_tensors else tensors
    return write_atomic(path, lambda tmp: save_torch_checkpoint(tmp, obj))


def export_checkpoint(params: Params, config: SamConfig, path: str | os.PathLike) -> Path:
    """`export_torch` for a `.pt` / `.pth` path, `export_safetensors` for any other."""
    if Path(path).suffix in (".pt", ".pth"):
        return export_torch(params, config, path)
    return export_safetensors(params, config, path)


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, model_type: str | SamConfig = "auto"
) -> SamConfig:
    """An official `.pth` or a `.safetensors` -> a sam-jax checkpoint directory. Returns the config."""
    model = load_model(src, model_type)
    save_params(dst, model.params, model.config)
    return model.config
