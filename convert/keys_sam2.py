"""SAM 2.1's key table (official `sam2`'s `SAM2Base` state dict, the `"model"` entry of its `.pt`).

`sam2_rows(config)`: the image side (`keys_hiera.hiera_rows`: the Hiera trunk, the FPN neck,
`no_mem_embed`, the decoder's `conv_s0` / `conv_s1`), SAM's prompt encoder and mask decoder under
SAM 2's names (`sam_prompt_encoder.*`, `sam_mask_decoder.*`; the two-way transformer's MLPs are
`mlp.layers.0` / `mlp.layers.1`), SAM 2's decoder additions (`obj_score_token`,
`pred_obj_score_head`), then the video-only tensors (`VIDEO_KEY_PATTERNS`), kept under their
official names as the Flax params `video/<official key>` (`modeling.sam2_video`) so that an export
loads in `build_sam2` (which refuses missing keys). SAM 2 has no Hugging Face `SamModel` names here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterator

from sam_jax.config import SamConfig
from sam_jax.convert.keys import Row, _mask_decoder, _prompt_encoder, identity, linear
from sam_jax.modeling.sam2_video import video_tensors

# The video-only tensors of a SAM 2.1 checkpoint, by name pattern (`modeling.sam2_video.video_tensors`
# lists each with its shape): read by video tracking only, carried unused.
VIDEO_KEY_PATTERNS = (
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
    "mask_downsample.*",
    "memory_attention.*",
    "memory_encoder.*",
    "obj_ptr_proj.*",
    "obj_ptr_tpos_proj.*",
)
# Keys only a SAM 2 checkpoint has (its Hiera trunk), and only a SAM 2.1 one among those.
SAM2_TRUNK_KEY = "image_encoder.trunk.patch_embed.proj.weight"
SAM2_1_KEY = "no_obj_embed_spatial"


def is_video_key(key: str) -> bool:
    """Whether an official SAM 2.1 key is one of the video-only tensors."""
    return any(fnmatch.fnmatchcase(key, p) for p in VIDEO_KEY_PATTERNS)


def _decoder_additions(config: SamConfig) -> Iterator[Row]:
    dec, o, f = config.mask_decoder, "sam_mask_decoder", ("mask_decoder",)
    if dec.pred_obj_scores:
        yield Row(f"{o}.obj_score_token.weight", None, (*f, "obj_score_token", "embedding"), identity)
    if dec.pred_obj_scores and dec.pred_obj_scores_mlp:
        for j in range(3):
            yield Row(
                f"{o}.pred_obj_score_head.layers.{j}.weight",
                None,
                (*f, "pred_obj_score_head", f"layers_{j}", "kernel"),
                linear,
            )
            yield Row(
                f"{o}.pred_obj_score_head.layers.{j}.bias",
                None,
                (*f, "pred_obj_score_head", f"layers_{j}", "bias"),
                identity,
            )
    elif dec.pred_obj_scores:
        yield Row(f"{o}.pred_obj_score_head.weight", None, (*f, "pred_obj_score_head", "kernel"), linear)
        yield Row(f"{o}.pred_obj_score_head.bias", None, (*f, "pred_obj_score_head", "bias"), identity)


def _video_rows() -> Iterator[Row]:
    for key, _ in video_tensors():
        assert is_video_key(key), key
        yield Row(key, None, ("video", key), identity)


def heads_rows(config: SamConfig) -> list[Row]:
    """The prompt encoder and mask decoder of SAM 2 (without the encoder's `conv_s0` / `conv_s1`)."""
    rows = [
        *_prompt_encoder(config, "sam_prompt_encoder"),
        *_mask_decoder(config, "sam_mask_decoder", ("layers.0", "layers.1")),
        *_decoder_additions(config),
    ]
    return [dataclasses.replace(r, hf=None) for r in rows]


def sam2_rows(config: SamConfig) -> list[Row]:
    """Every tensor of a SAM 2.1 checkpoint for `config` (a `HieraConfig` encoder), in the official module order
    of each part; the video-only tensors when `config.video_tensors`."""
    from sam_jax.convert.keys_hiera import hiera_rows  # the image side (Hiera trunk, neck, conv_s0 / conv_s1)

    rows = [*hiera_rows(config), *heads_rows(config)]
    if config.video_tensors:
        rows += _video_rows()
    return rows
