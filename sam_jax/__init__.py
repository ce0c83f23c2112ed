"""Segment Anything in JAX/Flax.

from sam_jax import sam_model_registry
sam = sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")
"""

from sam_jax.build_sam import build_sam, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l, sam_model_registry
from sam_jax.config import SamConfig, get_config
from sam_jax.model import SamModel, decode, encode, init_params
from sam_jax.prompts import Prompts, make_prompts

__all__ = [
    "Prompts",
    "SamConfig",
    "SamModel",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "decode",
    "encode",
    "get_config",
    "init_params",
    "make_prompts",
    "sam_model_registry",
]
