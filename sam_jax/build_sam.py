"""`sam_model_registry`: the official entry point, returning a `SamModel`.

    from sam_jax import sam_model_registry
    sam = sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")

`vit_t` is MobileSAM (`mobile_sam`'s registry name; its `mobile_sam.pt` loads as is); `vit_b_hq`,
`vit_l_hq` and `vit_h_hq` are HQ-SAM and `vit_tiny_hq` Light HQ-SAM (`segment_anything_hq`'s vit_b,
vit_l, vit_h and vit_tiny; its sam_hq_vit_*.pth load as is); `sam2.1_hiera_tiny`, `_small`,
`_base_plus` and `_large` are SAM 2.1 for images (`sam2`'s `sam2.1_hiera_*.pt`, `{"model": state_dict}`,
load as is; use them with `SAM2ImagePredictor` and `SAM2AutomaticMaskGenerator`).
`checkpoint` may be an official `.pth`, a Hugging Face or exported `.safetensors`,
or a sam-jax checkpoint directory of that model type; `None` gives random weights (as officially).
A model trained here (any variant) loads with `sam_jax.load_model(path)`.
"""

from __future__ import annotations

import functools
import os

import jax

from sam_jax.config import get_config
from sam_jax.model import SamModel, init_params


def _build(
    name: str, checkpoint: str | os.PathLike | None = None, *, dtype: str | None = None, seed: int = 0
) -> SamModel:
    if checkpoint is None:
        config = get_config(name)
        model = SamModel(config, init_params(config, jax.random.key(seed)))
    else:
        from sam_jax.checkpoint import load_model

        model = load_model(checkpoint, model_type=name)
    return model.with_dtype(dtype) if dtype else model


build_sam_vit_h = functools.partial(_build, "vit_h")
build_sam_vit_l = functools.partial(_build, "vit_l")
build_sam_vit_b = functools.partial(_build, "vit_b")
build_sam_vit_t = functools.partial(_build, "vit_t")  # MobileSAM (TinyViT encoder), as `mobile_sam`'s registry
# HQ-SAM (`segment_anything_hq`'s vit_h/vit_l/vit_b; its sam_hq_vit_*.pth load as is)
build_sam_hq_vit_h = functools.partial(_build, "vit_h_hq")
build_sam_hq_vit_l = functools.partial(_build, "vit_l_hq")
build_sam_hq_vit_b = functools.partial(_build, "vit_b_hq")
build_sam_hq_vit_tiny = functools.partial(_build, "vit_tiny_hq")  # Light HQ-SAM (TinyViT; sam_hq_vit_tiny.pth)
# SAM 2.1 for images (`sam2`'s sam2.1_hiera_*.pt load as is; `SAM2ImagePredictor` runs them)
build_sam2_1_hiera_tiny = functools.partial(_build, "sam2.1_hiera_tiny")
build_sam2_1_hiera_small = functools.partial(_build, "sam2.1_hiera_small")
build_sam2_1_hiera_base_plus = functools.partial(_build, "sam2.1_hiera_base_plus")
build_sam2_1_hiera_large = functools.partial(_build, "sam2.1_hiera_large")
build_sam = build_sam_vit_h


class _Registry(dict):
    def __missing__(self, key: str):
        raise KeyError(
            f"{key!r} is not an official SAM model type (one of {', '.join(self)}); a checkpoint trained or "
            "converted with sam-jax loads with sam_jax.load_model(path), whatever its model type"
        )


sam_model_registry = _Registry(
    {
        "default": build_sam_vit_h,
        "vit_h": build_sam_vit_h,
        "vit_l": build_sam_vit_l,
        "vit_b": build_sam_vit_b,
        "vit_t": build_sam_vit_t,
        "vit_h_hq": build_sam_hq_vit_h,
        "vit_l_hq": build_sam_hq_vit_l,
        "vit_b_hq": build_sam_hq_vit_b,
        "vit_tiny_hq": build_sam_hq_vit_tiny,
        "sam2.1_hiera_tiny": build_sam2_1_hiera_tiny,
        "sam2.1_hiera_small": build_sam2_1_hiera_small,
        "sam2.1_hiera_base_plus": build_sam2_1_hiera_base_plus,
        "sam2.1_hiera_large": build_sam2_1_hiera_large,
    }
)
