"""Segment Anything in JAX/Flax, with the official package's names.

    from sam_jax import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

    sam = sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")
    predictor = SamPredictor(sam)

SAM 2.1 for images: `SAM2ImagePredictor(sam_model_registry["sam2.1_hiera_tiny"](checkpoint=...))`,
`SAM2AutomaticMaskGenerator`, as the official `sam2`'s.

`load_model(path)` loads any checkpoint this project reads or writes (an official `.pth`, a
`.safetensors`, a converted or trained sam-jax directory) with the model type it holds.
"""

from sam_jax.build_sam import (
    build_sam,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    build_sam_vit_t,
    sam_model_registry,
)
from sam_jax.config import SamConfig, get_config
from sam_jax.model import SamModel, decode, encode, init_params, predict_masks
from sam_jax.prompts import Prompts, make_prompts

# The predictor, the mask generator and the checkpoint reader load on first use.
_LAZY = {
    "SamPredictor": "sam_jax.predictor",
    "SamAutomaticMaskGenerator": "sam_jax.automatic_mask_generator",
    "SAM2ImagePredictor": "sam_jax.sam2_predictor",
    "SAM2AutomaticMaskGenerator": "sam_jax.sam2_automatic_mask_generator",
    "load_model": "sam_jax.checkpoint",
    "save_model": "sam_jax.checkpoint",
}

__all__ = [
    "Prompts",
    "SAM2AutomaticMaskGenerator",
    "SAM2ImagePredictor",
    "SamAutomaticMaskGenerator",
    "SamConfig",
    "SamModel",
    "SamPredictor",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_t",
    "decode",
    "encode",
    "get_config",
    "init_params",
    "load_model",
    "make_prompts",
    "predict_masks",
    "sam_model_registry",
    "save_model",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sam_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
