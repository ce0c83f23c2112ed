"""`shapes_tiny` with text prompts (caption mode): the shapes' categories are the captions.

The CLIP folder (`text.clip`) is set by the caller: the tests write a small random-weight CLIP
with `sam_jax.clip_folder.make_random_clip` (no CLIP weights are bundled; a random CLIP still
gives each caption its own fixed embedding). With real CLIP weights the same recipe trains
against real text embeddings.
"""

from __future__ import annotations

from sam_jax.train.configs import shapes_tiny


def get_config():
    c = shapes_tiny.get_config()
    c.text.mode = "caption"
    c.text.clip = ""  # set by the caller
    c.text.captions = "circle,rectangle,triangle"
    c.text.template = "a {}"
    c.loss.text_prob = 0.5
    return c
