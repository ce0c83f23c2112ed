"""`TextEncoder`: CLIP embeddings for SAM's text prompts.

    text_encoder = TextEncoder.from_folder("clip-vit-large-patch14-336")   # a Hugging Face CLIP folder
    predictor = SamPredictor(sam, text_encoder=text_encoder)
    masks, scores, _ = predictor.predict(text="a dog")

A SAM checkpoint trained with text prompts has a text projection
(`PromptEncoderConfig.text_embed_dim`, the CLIP model's `projection_dim`); the prompt encoder
takes CLIP embeddings, either of a text (`embed_text`, at inference) or of an image crop
(`embed_images`, the paper's training signal, section 7.5): both live in CLIP's joint space.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from sam_jax.clip_tokenizer import CLIPTokenizer
from sam_jax.modeling.clip import CLIPConfig, clip_image_preprocess, encode_image, encode_text


@dataclasses.dataclass
class TextEncoder:
    """A CLIP model (config, params) with its tokenizer; embeddings as float32 numpy arrays."""

    config: CLIPConfig
    params: Any
    tokenizer: CLIPTokenizer

    def __post_init__(self) -> None:
        self.params = jax.device_put(self.params)
        self._text = jax.jit(functools.partial(encode_text, config=self.config))
        self._image = jax.jit(functools.partial(encode_image, config=self.config))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, dtype: str = "float32") -> TextEncoder:
        """A Hugging Face CLIP folder: config.json, model.safetensors and tokenizer.json."""
        from sam_jax.convert.clip import load_clip

        config, params = load_clip(folder, dtype=dtype)
        tokenizer = CLIPTokenizer.from_folder(folder, context_length=config.text_config.max_position_embeddings)
        return cls(config, params, tokenizer)

    @property
    def embed_dim(self) -> int:
        """Width of the embeddings (the CLIP `projection_dim`)."""
        return self.config.projection_dim

    def embed_text(self, text: str | Sequence[str]) -> np.ndarray:
        """A text or B texts -> (B, embed_dim) float32. Texts longer than CLIP's context
        (77 tokens) are truncated with a warning, as CLIP does; empty texts are refused."""
        tokens = self.tokenizer(text)
        return np.asarray(self._text(self.params, tokens.input_ids, tokens.attention_mask))

    def embed_images(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 RGB images ((B, H, W, 3) or a list of (H, W, 3)) -> (B, embed_dim) float32."""
        pixels = clip_image_preprocess(images, self.config.vision_config.image_size)
        return np.asarray(self._image(self.params, pixels))
