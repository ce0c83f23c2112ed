"""Text prompts (caption mode) on the `tiny_p8_conv` model, from an encoder pretrained to tell
the kinds apart (`sam-jax pretrain-kinds`); the captions are the shapes' categories.

SAM's decoder never mixes image tokens, so a caption can select every shape of its kind only
where the image embedding carries the kind in every token. Trained from scratch through SAM's
losses, the encoder does not learn that here (captions stay at or below the text-blind level,
docs/text-training.md). So:
1. `sam-jax pretrain-kinds DATA ENCODER --heldout HELDOUT --steps 6000` trains `tiny_p8_conv`'s
   encoder on the per-token kinds (a convolutional stem; steps of 8 images, ~0.27 s each on 2
   CPU cores; on the 3-kind data the kinds start after ~2000 steps: docs/text-training.md);
2. `sam-jax train --config train/configs/shapes_text_p8.py --config.init=encoder:ENCODER ...`
   trains SAM with text from it (this file), `loss.dense_text_weight` keeping each token's
   kind aligned with its caption's text token (`train.step.dense_text_loss`).

The CLIP folder (`text.clip`), the data and `init` are set by the caller;
`python -m sam_jax.demo --text` runs both stages on 3-kind shapes. Measured there: captions
0.791 on the held-out images (text-blind 0.429) from an encoder at 0.881 kind accuracy
(docs/text-training.md, "A convolutional stem pretrained on the kinds" and after).
"""

from __future__ import annotations

from sam_jax.train.configs import shapes_p8


def get_config():
    c = shapes_p8.get_config()
    c.model = "tiny_p8_conv"
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
