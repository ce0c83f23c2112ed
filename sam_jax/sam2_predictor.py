"""`SAM2ImagePredictor`: SAM 2.1's image predictor (`sam2.sam2_image_predictor`) on `SamPredictor`'s
jitted steps.

    sam = sam_model_registry["sam2.1_hiera_tiny"](checkpoint="sam2.1_hiera_tiny.pt")
    predictor = SAM2ImagePredictor(sam)
    predictor.set_image(image)                       # HxWx3 uint8 RGB
    masks, scores, logits = predictor.predict(point_coords=[[500, 375]], point_labels=[1])

What differs from `SamPredictor` (everything else, shapes and batches included, is its):
- the image is resized to the model's square input (1024 x 1024) without keeping its aspect ratio
  and without padding, as torchvision's `Resize` of a float tensor in [0, 1] (bilinear, antialiased:
  `ResizeSquare`), then normalised with ImageNet's mean and std;
- points are scaled by 1024 / w and 1024 / h (`normalize_coords=True`, the default) or taken in
  [0, 1] and scaled by 1024 (`normalize_coords=False`);
- a box is two points with labels 2 and 3 placed before the row's points, and a row with any point
  or box carries the padding point (the model's `PromptEncoderConfig.box_corners_as_points`);
- masks are upsampled from the low-res logits straight to the original size (bilinear,
  align_corners=False), and the returned low-res logits are clamped to [-32, 32];
- with `multimask_output=False`, an unstable single mask is replaced by the best of the three
  multimask outputs (the model's `MaskDecoderConfig.dynamic_multimask_via_stability`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sam_jax.embeddings import ImageEmbeddings
from sam_jax.model import SamModel
from sam_jax.predictor import SamPredictor
from sam_jax.prompts import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, Prompts, make_prompts
from sam_jax.transforms import antialias_linear_resize

# SAM 2's normalisation of pixels in [0, 1] (`SAM2Transforms`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_square(image: jax.Array, *, size: int) -> jax.Array:
    """(H, W, 3) uint8 -> (size, size, 3) float32 normalised: `SAM2Transforms` (ToTensor, Resize((size,
    size)) on the float tensor: bilinear, antialiased, the width first, then Normalize).

    Each axis is a sum over its taps (`antialias_linear_resize`): PyTorch's taps and weights, in
    its order (float32 rounding apart)."""
    h, w = image.shape[:2]
    x = image.astype(jnp.float32) / jnp.float32(255.0)
    if w != size:
        x = antialias_linear_resize(x, size, axis=1)
    if h != size:
        x = antialias_linear_resize(x, size, axis=0)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std


class ResizeSquare:
    """SAM 2's coordinate transform (`SAM2Transforms.transform_coords`) to a square input of side `size`."""

    def __init__(self, size: int) -> None:
        self.size = size

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int], normalize: bool = True) -> np.ndarray:
        """(..., 2) (x, y) -> the input's frame, float32 as officially: x / w * size, y / h * size
        (`normalize`), or coordinates in [0, 1] times size."""
        coords = np.array(coords, dtype=np.float32, copy=True)
        if normalize:
            h, w = original_size
            coords[..., 0] = coords[..., 0] / np.float32(w)
            coords[..., 1] = coords[..., 1] / np.float32(h)
        return coords * np.float32(self.size)


class SAM2ImagePredictor(SamPredictor):
    def __init__(
        self,
        sam_model: SamModel,
        mask_threshold: float = 0.0,
        max_hole_area: float = 0.0,
        max_sprinkle_area: float = 0.0,
    ) -> None:
        """sam_model: a SAM 2.1 `SamModel` (`sam_model_registry["sam2.1_hiera_tiny"]`, ...). mask_threshold:
        where logits become masks. max_hole_area / max_sprinkle_area (upstream's hole filling and
        sprinkle removal on the low-res masks) must be 0: not implemented here."""
        config = sam_model.config
        if not (config.prompt_encoder.box_corners_as_points and config.mask_decoder.pred_obj_scores):
            raise ValueError(
                f"SAM2ImagePredictor takes a SAM 2.1 model (sam2.1_hiera_*), not {config.name}: use SamPredictor"
            )
        if max_hole_area > 0 or max_sprinkle_area > 0:
            raise ValueError("max_hole_area and max_sprinkle_area > 0 are not supported: give 0 (the default)")
        super().__init__(sam_model)
        size = sam_model.image_size
        self.transform = ResizeSquare(size)
        self.mask_threshold = float(mask_threshold)
        self.low_res_clamp = 32.0
        self._resize = jax.jit(functools.partial(resize_square, size=size))
        self._normalize_coords = True

    @staticmethod
    def _postprocess_size(sam_model: SamModel) -> int:
        """Masks go from the low-res logits straight to the original size: upscaled to a square of their
        own side (the identity), "cropped" to all of it (`input_size`), then resized."""
        return sam_model.config.low_res_mask_size

    def _encode(self, images: Sequence[np.ndarray]) -> tuple[ImageEmbeddings, list, list]:
        batch = jnp.stack([self._resize(jnp.asarray(im)) for im in images])
        low = self.postprocess_size
        return self.model.encode(batch), [im.shape[:2] for im in images], [(low, low)] * len(images)

    def set_image(self, image: np.ndarray | Image.Image, image_format: str = "RGB") -> None:
        """Compute the features of one HxWx3 uint8 image (or a PIL image, as upstream takes it)."""
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        super().set_image(image, image_format)

    def reset_predictor(self) -> None:
        """Upstream's name of `reset_image`."""
        self.reset_image()

    def _apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        return self.transform.apply_coords(coords, original_size, self._normalize_coords)

    def _make_prompts(self, batch_size, coords, labels, boxes, masks, text) -> Prompts:
        if boxes is not None:  # two points, labels 2 and 3, before the row's points
            corners = boxes.reshape(batch_size, 2, 2)
            corner_labels = np.tile(np.array([[LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT]], np.int32), (batch_size, 1))
            coords = corners if coords is None else np.concatenate([corners, coords], axis=1)
            labels = corner_labels if labels is None else np.concatenate([corner_labels, labels], axis=1)
        return make_prompts(
            batch_size=batch_size,
            mask_size=self.model.config.low_res_mask_size,
            point_coords=coords,
            point_labels=labels,
            mask_input=masks,
        )

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks (C, H, W) (or (B, C, H, W) for B prompts), scores, low-res logits (clamped to +-32) for
        prompts on the image of `set_image`, as upstream's `predict`. normalize_coords: points and boxes
        in the image's pixels (True) or in [0, 1] (False)."""
        self._normalize_coords = bool(normalize_coords)
        return super().predict(point_coords, point_labels, box, mask_input, multimask_output, return_logits)

    def predict_batch(
        self,
        point_coords_batch: Sequence[np.ndarray | None] | None = None,
        point_labels_batch: Sequence[np.ndarray | None] | None = None,
        box_batch: Sequence[np.ndarray | None] | None = None,
        mask_input_batch: Sequence[np.ndarray | None] | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """`predict` for each image of `set_image_batch` (one entry per image in each list)."""
        self._normalize_coords = bool(normalize_coords)
        return super().predict_batch(
            point_coords_batch, point_labels_batch, box_batch, mask_input_batch, multimask_output, return_logits
        )
