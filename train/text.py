"""Text prompts in training and evaluation (paper, section 7.5).

The training config's `text` block (train/configs/base.py) turns them on, in one of two modes:

* "image", the paper's: a mask of at least `text.min_mask_area` pixels (100 x 100) is
  prompted by the CLIP *image* embedding of a crop around it (its box made square, enlarged
  by a random 1-2x, the background zeroed half the time; `CropPrompts`); the target is the
  mask. At inference a CLIP *text* embedding takes its place, which works through CLIP's
  joint space, so only with real CLIP weights.
* "caption": each annotation's `category` is a caption, `text.template.format(category)`,
  whose CLIP text embedding is the prompt (`CaptionPrompts`); the target is the union of the
  image's masks of that category (a text names a kind of thing, not one instance).

    text.mode = "caption"                   # or "image"
    text.clip = "path/to/clip-folder"       # a Hugging Face CLIP folder (`TextEncoder.from_folder`)
    text.captions = "circle,triangle"       # caption mode: which categories ("": every category in the data)
    text.template = "a {}"                  # caption mode: category -> the text CLIP embeds

The model gets a text projection of the CLIP's width (`PromptEncoderConfig.text_embed_dim`).
The data pipeline attaches each mask's text prompt (`prepare_example(text_prompts=...)`), and
the step prompts a share of the masks by their text (`loss.text_prob`). `evaluate_text`
measures what a caption alone selects on held-out images.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sam_jax.config import SamConfig
from sam_jax.model import Params, predict_masks
from sam_jax.prompts import make_prompts
from sam_jax.train.data import resize_masks, target_masks, to_low_res
from sam_jax.train.evaluate import eval_records, jitted_model, pad_rows, usable_indices
from sam_jax.train.losses import mask_iou
from sam_jax.train.sa1b import list_records, load_record, mask_areas
from sam_jax.transforms import ResizeLongestSide

MODES = ("", "caption", "image")


def check_text_config(cfg: ml_collections.ConfigDict) -> str:
    """The text mode of a training config ("" when the config has no `text` block)."""
    text = cfg.get("text")
    mode = "" if text is None else str(text.mode)
    if mode not in MODES:
        raise ValueError(f"text.mode must be one of {MODES}, got {mode!r}")
    if mode and not text.clip:
        raise ValueError(f"text.mode={mode!r} needs text.clip: a Hugging Face CLIP folder")
    return mode


def with_text_projection(mc: SamConfig, cfg: ml_collections.ConfigDict) -> SamConfig:
    """`mc` with a text projection of the CLIP's width when the config trains text prompts."""
    if not check_text_config(cfg):
        return mc
    from sam_jax.convert.clip import load_clip_config

    width = load_clip_config(cfg.text.clip).projection_dim
    return dataclasses.replace(mc, prompt_encoder=dataclasses.replace(mc.prompt_encoder, text_embed_dim=width))


def dataset_categories(data_dir: str | Path) -> list[str]:
    """The sorted, non-empty `category` values of the annotations of an SA-1B-layout folder."""
    found: set[str] = set()
    for _, json_path in list_records(data_dir):
        try:
            anns = json.loads(Path(json_path).read_text()).get("annotations") or []
        except (OSError, ValueError):
            continue  # a corrupt record: the data pipeline skips it and counts it
        found.update(str(a.get("category", "")) for a in anns if isinstance(a, dict))
    return sorted(c for c in found if c)


def caption_embeddings(cfg: ml_collections.ConfigDict, text_encoder) -> dict[str, np.ndarray]:
    """category -> CLIP text embedding (Dt,) of `text.template.format(category)`, for the
    categories of `text.captions` (or all categories of `data.train_dir`)."""
    categories = [c.strip() for c in str(cfg.text.captions).split(",") if c.strip()] or dataset_categories(
        cfg.data.train_dir
    )
    if not categories:
        raise ValueError(
            f"text.mode='caption': no categories ({cfg.data.train_dir} has no annotation with a 'category')"
        )
    return embed_captions(categories, str(cfg.text.template), text_encoder)


def embed_captions(categories: list[str], template: str, text_encoder) -> dict[str, np.ndarray]:
    """category -> CLIP text embedding (Dt,) of `template.format(category)`."""
    return dict(zip(categories, text_encoder.embed_text([template.format(c) for c in categories])))


@dataclasses.dataclass
class CaptionPrompts:
    """Caption mode: a mask whose category has a caption gets its embedding; the target is the
    union of the image's usable masks of that category. `captions`: category -> (Dt,)."""

    captions: dict[str, np.ndarray]

    def __call__(
        self,
        record: dict,
        *,
        chosen: np.ndarray,
        usable: np.ndarray,
        config: SamConfig,
        k: int,
        hw: tuple[int, int],
        rng: np.random.Generator,
        mask_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """-> text (k, Dt) float32, text_valid (k,) bool, text_masks (k, m, m) bool."""
        m = mask_size or config.low_res_mask_size
        out = _empty(k, len(next(iter(self.captions.values()))), m)
        categories = np.asarray(record.get("categories") or [""] * len(record["masks"]), dtype=object)
        unions: dict[str, np.ndarray] = {}
        for slot, index in enumerate(chosen):
            category = categories[index]
            if category not in self.captions:
                continue
            if category not in unions:
                same = usable[categories[usable] == category]
                # Nearest-neighbour resizing commutes with the union: resize the masks, then unite.
                resized = resize_masks(record["masks"], hw, same).any(axis=0, keepdims=True)
                unions[category] = to_low_res(resized, config.image_size, m)[0]
            out["text"][slot], out["text_masks"][slot] = self.captions[category], unions[category]
            out["text_valid"][slot] = unions[category].any()
        return out


def mask_crop(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The paper's crop around a mask: its box made square, enlarged by a random factor in
    [1, 2] about its centre (zero-padded beyond the image), with the pixels outside the mask
    zeroed half the time. image (H, W, 3) uint8, mask (H, W) bool -> (s, s, 3) uint8."""
    ys, xs = np.nonzero(mask)
    side = max(int(np.ceil(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) * rng.uniform(1.0, 2.0))), 1)
    x0 = int(np.floor((xs.min() + xs.max() + 1) / 2 - side / 2))
    y0 = int(np.floor((ys.min() + ys.max() + 1) / 2 - side / 2))
    source = image * mask[..., None] if rng.uniform() < 0.5 else image
    crop = np.zeros((side, side, 3), np.uint8)
    h, w = mask.shape
    sy, sx = slice(max(y0, 0), min(y0 + side, h)), slice(max(x0, 0), min(x0 + side, w))
    crop[sy.start - y0 : sy.stop - y0, sx.start - x0 : sx.stop - x0] = source[sy, sx]
    return crop


@dataclasses.dataclass
class CropPrompts:
    """Image mode (the paper's): a mask of at least `min_area` pixels gets the CLIP image
    embedding of `mask_crop` around it; the target is the mask itself. `embed_images`: a list
    of uint8 crops -> (n, Dt) (`TextEncoder.embed_images`)."""

    embed_images: Callable[[list[np.ndarray]], np.ndarray]
    dim: int
    min_area: int = 100 * 100

    def __call__(
        self,
        record: dict,
        *,
        chosen: np.ndarray,
        usable: np.ndarray,
        config: SamConfig,
        k: int,
        hw: tuple[int, int],
        rng: np.random.Generator,
        mask_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """-> text (k, Dt) float32, text_valid (k,) bool, text_masks (k, m, m) bool."""
        m = mask_size or config.low_res_mask_size
        out = _empty(k, self.dim, m)
        masks, area = record["masks"], mask_areas(record["masks"])
        slots = np.array([s for s, i in enumerate(chosen) if area[i] >= self.min_area], np.int64)
        if len(slots):
            crops = [mask_crop(record["image"], masks[int(chosen[s])], rng) for s in slots]
            out["text"][slots] = self.embed_images(crops)
            out["text_masks"][slots] = target_masks(masks, hw, config.image_size, m, indices=chosen[slots])
            out["text_valid"][slots] = out["text_masks"][slots].reshape(len(slots), -1).any(1)
        return out


def _empty(k: int, dim: int, m: int) -> dict[str, np.ndarray]:
    return {
        "text": np.zeros((k, dim), np.float32),
        "text_valid": np.zeros((k,), bool),
        "text_masks": np.zeros((k, m, m), bool),
    }


def text_prompts(cfg: ml_collections.ConfigDict, text_encoder) -> CaptionPrompts | CropPrompts | None:
    """The data pipeline's text prompts for the config's mode (None when text is off)."""
    mode = check_text_config(cfg)
    if mode == "caption":
        return CaptionPrompts(caption_embeddings(cfg, text_encoder))
    if mode == "image":
        return CropPrompts(text_encoder.embed_images, text_encoder.embed_dim, int(cfg.text.min_mask_area))
    return None


def evaluate_text(
    params: Params,
    config: SamConfig,
    data_dir: str | Path,
    captions: dict[str, np.ndarray],
    *,
    max_images: int | None = None,
) -> dict[str, Any]:
    """mIoU of text prompts alone: for each held-out image and each captioned category in it, the
    text's mask (multimask output, the one with the highest predicted IoU) against the union of
    the image's usable masks of that category, at the original size.

    Returns {"num_images", "num_queries", "miou_text", "per_category": {category: mIoU},
    "miou_all_shapes"}: the last, the mIoU of answering every query with the union of all the
    image's usable masks, is the level a model that ignores the text can reach.
    """
    records = eval_records(data_dir, 1, max_images, None)
    encode_fn = jitted_model(config)[0]
    transform = ResizeLongestSide(config.image_size)
    ious: dict[str, list[float]] = {c: [] for c in captions}
    all_shapes: list[float] = []  # the text-blind answer's IoU per query
    images = 0
    for image_path, json_path in records:
        record = load_record(image_path, json_path)
        usable = usable_indices(record["masks"])
        categories = np.asarray(record["categories"], dtype=object)[usable]
        present = [c for c in captions if np.any(categories == c)]
        if not present:
            continue
        images += 1
        gt = np.stack([record["masks"][usable[categories == c]].any(axis=0) for c in present])
        every_shape = record["masks"][usable].any(axis=0)
        all_shapes.extend((gt & every_shape).sum((1, 2)) / (gt | every_shape).sum((1, 2)))
        resized = transform.apply_image(record["image"])
        embedding = encode_fn(params, jnp.asarray(resized)[None])
        # Rows padded to one per caption: one compiled decoder per image size, whatever is present.
        text = pad_rows(np.stack([captions[c] for c in present]), len(captions))
        prompts = make_prompts(batch_size=len(captions), mask_size=config.low_res_mask_size, text=text).without_masks()
        iou = _text_scores(
            params,
            embedding,
            jax.tree.map(jnp.asarray, prompts),
            jnp.asarray(pad_rows(gt, len(captions))),
            config=config,
            input_size=tuple(resized.shape[:2]),
            original_size=tuple(record["image"].shape[:2]),
        )
        for c, v in zip(present, np.asarray(iou)):
            ious[c].append(float(v))
    if not images:
        raise ValueError(f"{data_dir}: no held-out image has a mask of the categories {sorted(captions)}")
    per_category = {c: float(np.mean(v)) for c, v in ious.items() if v}
    every = [v for vs in ious.values() for v in vs]
    return {
        "num_images": images,
        "num_queries": len(every),
        "miou_text": float(np.mean(every)),
        "per_category": per_category,
        "miou_all_shapes": float(np.mean(all_shapes)),
    }


@functools.partial(jax.jit, static_argnames=("config", "input_size", "original_size"))
def _text_scores(params, embedding, prompts, gt, *, config, input_size, original_size):
    """B text prompts on one image -> IoU (B,) of the highest-predicted-IoU mask with gt (B, H, W)."""
    masks, iou_pred, _ = predict_masks(
        params,
        embedding,
        prompts,
        config=config,
        input_size=input_size,
        original_size=original_size,
        multimask_output=True,
        return_logits=False,
    )
    pick = jnp.argmax(iou_pred, axis=1)
    return mask_iou(masks[jnp.arange(gt.shape[0]), pick], gt)
