"""From SA-1B records to model-ready training examples (host side, numpy).

An example: the image resized (longest side to `image_size`, as at inference), normalized
and zero-padded; up to K of its masks (masks covering more than `max_mask_fraction` of
the image dropped, as in the paper), resized the same way and reduced to the loss grid by
block averaging (a cell is inside when at least half of it is): by default the decoder's
low-res grid (m = 4 x embedding side), or a finer one (`loss.mask_size`, up to the input
size) where the losses are computed on upsampled logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from sam_jax.config import SamConfig
from sam_jax.train.sa1b import RleMasks, mask_areas
from sam_jax.transforms import get_preprocess_shape, preprocess


def nearest_grid(size: tuple[int, int], hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The rows (h,) and columns (w,) of an (H, W) = `size` image that nearest-neighbour
    resizing to (h, w) = `hw` samples: pixel (i, j) of the result is pixel (rows[i], cols[j])."""
    (big_h, big_w), (h, w) = size, hw
    ys = np.minimum(((np.arange(h) + 0.5) * big_h / h).astype(np.int64), big_h - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * big_w / w).astype(np.int64), big_w - 1)
    return ys, xs


def resize_masks(masks: np.ndarray | RleMasks, hw: tuple[int, int], indices: np.ndarray | None = None) -> np.ndarray:
    """(M, H, W) bool -> (n, h, w) bool with nearest-neighbour sampling: the masks of `indices`
    (default all, n = M). An :class:`RleMasks` decodes only the sampled pixels of those masks."""
    if isinstance(masks, RleMasks):
        ys, xs = nearest_grid(masks.shape[1:], hw)
        return masks.sample(np.arange(len(masks)) if indices is None else indices, ys, xs)
    masks = np.asarray(masks, bool)
    ys, xs = nearest_grid(masks.shape[1:], hw)
    if indices is not None:
        masks = masks[indices]
    return masks[:, ys][:, :, xs]


def to_low_res(masks: np.ndarray, image_size: int, low_res: int) -> np.ndarray:
    """(M, h, w) bool in the resized frame -> (M, m, m) bool on the padded low-res grid: a cell
    is inside when at least half of its f x f pixels are (f = image_size / m; the padding is
    outside). The counts are integer sums of strided slices (rows, then columns), not float
    averages; the rule is symmetric in h and w, so a transposed view (what
    :meth:`RleMasks.sample` returns) is reduced in its memory order."""
    if not masks.flags.c_contiguous and masks.transpose(0, 2, 1).flags.c_contiguous:
        return to_low_res(masks.transpose(0, 2, 1), image_size, low_res).transpose(0, 2, 1)
    m_count, h, w = masks.shape
    f = image_size // low_res
    hc, wc = min(-(-h // f), low_res), min(-(-w // f), low_res)  # the cells the frame touches
    frame = np.zeros((m_count, hc * f, wc * f), np.uint8)
    frame[:, :h, :w] = masks[:, : hc * f, : wc * f]
    rows = frame.reshape(m_count, hc, f, wc * f)
    row_sums = rows[:, :, 0].astype(np.uint16 if f * f < 2**16 else np.int64)  # (M, hc, wc * f), each <= f
    for i in range(1, f):
        row_sums += rows[:, :, i]
    counts = row_sums[:, :, 0::f].copy()  # (M, hc, wc), each <= f * f
    for j in range(1, f):
        counts += row_sums[:, :, j::f]
    out = np.zeros((m_count, low_res, low_res), bool)
    out[:, :hc, :wc] = 2 * counts.astype(np.int32) >= f * f
    return out


def target_masks(
    masks: np.ndarray | RleMasks,
    hw: tuple[int, int],
    image_size: int,
    mask_size: int,
    indices: np.ndarray | None = None,
) -> np.ndarray:
    """(M, H, W) bool at the original size -> (n, mask_size, mask_size) bool targets of the masks
    of `indices` (default all): resized to the model's frame (h, w) = `hw`, zero-padded to
    `image_size` and block-averaged."""
    if mask_size <= 0 or image_size % mask_size:
        raise ValueError(f"mask size {mask_size} must divide the image size {image_size}")
    return to_low_res(resize_masks(masks, hw, indices), image_size, mask_size)


def model_input(image: np.ndarray, config: SamConfig) -> np.ndarray:
    """image (H, W, 3) uint8 -> the encoder's input (S, S, 3) float32: resized (longest side S,
    bilinear), normalized and zero-padded."""
    nh, nw = get_preprocess_shape(*image.shape[:2], config.image_size)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    return preprocess(resized[None], config)[0]


def prepare_example(
    record: dict,
    config: SamConfig,
    *,
    masks_per_image: int,
    max_mask_fraction: float,
    rng: np.random.Generator,
    text_prompts: Callable[..., dict[str, np.ndarray]] | None = None,
    mask_size: int | None = None,
    embed: Callable[[dict], Any] | None = None,
) -> dict[str, np.ndarray]:
    """record (`image` (H, W, 3) uint8, `masks` (M, H, W) bool, `categories` [str] * M) ->
    images (S, S, 3) float32, masks (K, m, m) bool, valid (K,) bool, with m = `mask_size`
    (default: the decoder's low-res size). The masks may be an array or an `RleMasks` (what the
    record sources read), from which only the K chosen masks are decoded, at the pixels the resize
    samples: the same example either way; with `embed` (a frozen encoder's outputs read from a
    cache, `train.embedding_cache`), embeddings = embed(record) instead of images; with `text_prompts`
    (`sam_jax.train.text.CaptionPrompts` or `CropPrompts`) also the text prompt of each mask
    slot: text (K, Dt) float32 CLIP embeddings, text_valid (K,) bool and text_masks (K, m, m)
    bool, what each text asks for."""
    image, masks = record["image"], record["masks"]
    h, w = image.shape[:2]
    area = mask_areas(masks)
    usable = np.flatnonzero((area > 0) & (area <= max_mask_fraction * h * w))
    chosen = rng.permutation(usable)[:masks_per_image]
    nh, nw = get_preprocess_shape(h, w, config.image_size)
    k, m = masks_per_image, mask_size or config.low_res_mask_size
    out_masks = np.zeros((k, m, m), bool)
    valid = np.zeros((k,), bool)
    if len(chosen):
        low = target_masks(masks, (nh, nw), config.image_size, m, indices=chosen)
        out_masks[: len(chosen)] = low
        valid[: len(chosen)] = low.reshape(len(chosen), -1).any(1)  # a mask lost on the grid is not trained
    inputs = {"embeddings": embed(record)} if embed is not None else {"images": model_input(image, config)}
    out = {**inputs, "masks": out_masks, "valid": valid}
    if text_prompts is not None:
        out.update(
            text_prompts(
                record,
                chosen=chosen,
                usable=usable,
                config=config,
                k=masks_per_image,
                hw=(nh, nw),
                rng=rng,
                mask_size=m,
            )
        )
    return out


def make_train_dataset(
    source,
    config: SamConfig,
    *,
    seed: int,
    batch_size: int,
    masks_per_image: int,
    max_mask_fraction: float,
    shard_index: int,
    shard_count: int,
    num_threads: int = 2,
    text_prompts: Callable[..., dict[str, np.ndarray]] | None = None,
    mask_size: int | None = None,
    embed: Callable[[dict], Any] | None = None,
):
    """The training pipeline of one process over `source` (an SA-1B folder, or a record source of
    `train.sources`: SA-1B, COCO, mask folders): a grain ``IterDataset`` of batches ``images (b, S, S, 3)``,
    ``masks (b, K, m, m)`` (m = ``mask_size``, default the low-res size), ``valid (b, K)``, ``ids (b,)``.

    Process ``shard_index`` of ``shard_count`` reads every ``shard_count``-th record of the
    shuffled stream, ``b = batch_size`` at a time (with ``text_prompts``, also
    ``text``, ``text_valid`` and ``text_masks``; with ``embed``, ``embeddings`` (leaves (b, ...)) instead of
    ``images``: see `prepare_example`), so step ``s`` of all processes together
    covers records ``[s * B, (s + 1) * B)`` of the stream (``B = b * shard_count``): the same
    examples as one process reading ``B`` at a time. An example's id is its position in the
    stream and seeds its mask sampling, so nothing depends on how the batch is split.
    Corrupt records are skipped (with a warning, counted by the source). The iterator of the
    returned dataset is checkpointable (grain ``get_state`` / ``set_state``).
    """
    import grain

    from sam_jax.train.sa1b import make_map_dataset

    ds = make_map_dataset(source, seed=seed, shard_index=shard_index, shard_count=shard_count)

    def prepare(index: int, record):
        if record is None:
            return None
        example_id = shard_index + shard_count * index
        rng = np.random.default_rng([seed, example_id])
        ex = prepare_example(
            record,
            config,
            masks_per_image=masks_per_image,
            max_mask_fraction=max_mask_fraction,
            rng=rng,
            text_prompts=text_prompts,
            mask_size=mask_size,
            embed=embed,
        )
        ex["ids"] = np.int32(example_id % np.iinfo(np.int32).max)
        return ex

    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * batch_size)
    return ds.map_with_index(prepare).to_iter_dataset(read, allow_nones=False).batch(batch_size, drop_remainder=True)
