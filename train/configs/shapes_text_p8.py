"""Text prompts (caption mode) on the `tiny_p8_conv` model, from an encoder pretrained to tell the kinds apart
(`sam-jax pretrain-kinds`); the captions are the shapes' categories.

`tiny_p8_conv` is `shapes_p8`'s `tiny_p8` with a convolutional stem instead of the 8-px patch projection (six 3x3
convolutions, 32, 64, 64, 64, 64, 64 wide, strides 2, 2, 2, 1, 1, 1: a 63-px receptive field that sees the corners
and curves telling shapes apart) and no click maps (a caption has no click to draw).

SAM's decoder never mixes image tokens, so a caption can select every shape of its kind only where the image
embedding carries the kind in every token. Trained from scratch through SAM's losses, a small encoder does not
learn that (captions stay at or below the text-blind level). So:
1. `sam-jax pretrain-kinds DATA ENCODER --heldout HELDOUT --steps 6000` trains `tiny_p8_conv`'s encoder on the
   per-token kinds (a convolutional stem; steps of 8 images, ~0.3 s each on 2 CPU cores);
2. `sam-jax train --config shapes_text_p8 --config.init=encoder:ENCODER ...` trains SAM with text from it (this
   recipe), `loss.dense_text_weight` keeping each token's kind aligned with its caption's text token
   (`train.step.dense_text_loss`).

The CLIP folder (`text.clip`), the data and `init` are set by the caller; `python -m sam_jax.demo --text` runs
both stages on 3-kind shapes (captions alone: held-out mIoU 0.791, text-blind level 0.429; docs/text-training.md).
"""

from __future__ import annotations

import copy

import ml_collections

from sam_jax.train.configs import shapes_p8

MODEL_OVERRIDES = copy.deepcopy(shapes_p8.MODEL_OVERRIDES)
MODEL_OVERRIDES["name"] = "tiny_p8_conv"
MODEL_OVERRIDES["image_encoder"]["conv_stem"] = (32, 64, 64, 64, 64, 64)
MODEL_OVERRIDES["mask_decoder"]["click_map_sigmas"] = ()


def get_config():
    c = shapes_p8.get_config()
    c.model_overrides = ml_collections.ConfigDict(MODEL_OVERRIDES)
    c.init = ""  # set by the caller: "encoder:PATH" of `sam-jax pretrain-kinds`
    c.steps = 2000
    c.optim.decay_steps = (1600, 1880)
    c.text.mode = "caption"
    c.text.clip = ""  # set by the caller
    c.text.captions = "circle,rectangle,triangle"
    c.text.template = "a {}"
    c.loss.text_prob = 0.5
    c.loss.dense_text_weight = 1.0
    return c
