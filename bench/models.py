"""The two models on the same weights, and the photo every case runs on.

The official model gets random weights (`bench.official.randomize_`: every parameter,
as in the parity tests) made confident with `sharpen_` (`SHARPEN`): random weights give
masks of stability ~0.7 and predicted IoU ~0, so with the default settings the automatic
mask generator would keep no mask and never reach its RLE, NMS and record steps; these
settings make most masks pass its filters, as a trained model's do. Ours is converted from its state dict with
`sam_jax.convert` exactly as a checkpoint is loaded. Child processes get the same
weights through an `.npz` of the official state dict.

torch is imported only where the official side needs it, so a child process timing
ours never loads it (its memory is ours alone).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from sam_jax.config import SamConfig, get_config
from sam_jax.model import SamModel

SHARPEN = dict(pe_scale=8.0, logit_scale=1000.0, iou_offset=1.0)


def photo() -> np.ndarray:
    """scikit-image's astronaut: a real 512 x 512 x 3 uint8 RGB photo."""
    from skimage import data

    return data.astronaut()


def cpu_count() -> int:
    """The CPUs this process may run on (what torch is given as threads)."""
    return len(os.sched_getaffinity(0))


def set_torch_threads() -> int:
    import torch

    n = cpu_count()
    torch.set_num_threads(n)
    return n


def ours_from_state_dict(state_dict: dict[str, np.ndarray], config: SamConfig) -> SamModel:
    """Our model from an official state dict, as `sam_jax.checkpoint.load_model` builds it."""
    from sam_jax.convert.state_dict import to_flax

    return SamModel(config, to_flax(state_dict, config))


@dataclasses.dataclass
class Pair:
    """The official `Sam` (eval mode) and our `SamModel` with the same weights."""

    config: SamConfig
    official: Any  # segment_anything.modeling.Sam
    ours: SamModel
    state_dict: dict[str, np.ndarray]


def official_state_dict(model: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The state dict of `build_pair`'s weights alone (no model kept)."""
    from bench.official import build_official, randomize_, sharpen_, state_dict_numpy

    return state_dict_numpy(sharpen_(randomize_(build_official(get_config(model)), seed=seed), **SHARPEN))


def build_pair(model: str, seed: int = 0) -> Pair:
    from bench.official import build_official, randomize_, sharpen_, state_dict_numpy

    config = get_config(model)
    official = sharpen_(randomize_(build_official(config), seed=seed), **SHARPEN)
    state_dict = state_dict_numpy(official)
    return Pair(config, official, ours_from_state_dict(state_dict, config), state_dict)


def save_weights(state_dict: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """The official state dict as an uncompressed .npz (what the child processes load)."""
    path = Path(path)
    np.savez(path, **state_dict)
    return path


def load_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def official_from_weights(path: str | os.PathLike, config: SamConfig):
    import torch

    from bench.official import build_official

    model = build_official(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(path).items()}, strict=True)
    return model.eval()


def ours_from_weights(path: str | os.PathLike, config: SamConfig) -> SamModel:
    return ours_from_state_dict(load_weights(path), config)


def predictor(side: str, model):
    """A new predictor of `side` ("ours" or "official") over its model."""
    if side == "official":
        from bench.official import official_predictor

        return official_predictor(model)
    from sam_jax.predictor import SamPredictor

    return SamPredictor(model)


def mask_generator(side: str, model, **kwargs):
    """A new automatic mask generator of `side` ("ours" or "official"); kwargs as officially."""
    if side == "official":
        from bench.official import official_mask_generator

        return official_mask_generator(model, **kwargs)
    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(model, **kwargs)


def prompt_points(image: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n single-point prompts inside the image: (n, 1, 2) as (x, y) pixels."""
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], axis=-1)[:, None, :]


def official_predict_many(predictor, coords: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The official `predict_torch` with B prompts (coords (B, N, 2) in image pixels, labels (B, N))
    -> masks (B, 3, H, W), IoU (B, 3)."""
    import torch

    pts = torch.as_tensor(predictor.transform.apply_coords(coords, predictor.original_size), dtype=torch.float)
    lbl = torch.as_tensor(labels, dtype=torch.int)
    with torch.inference_mode():
        masks, iou, _ = predictor.predict_torch(
            pts.to(predictor.device), lbl.to(predictor.device), multimask_output=True
        )
    return masks.cpu().numpy(), iou.cpu().numpy()
