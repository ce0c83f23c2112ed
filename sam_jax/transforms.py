"""Pre- and post-processing, as the official `Sam` and `ResizeLongestSide` do them.

- `ResizeLongestSide`: the longest side to `target_length` (1024) with `int(x + 0.5)`
  rounding; images resized with PIL bilinear (what torchvision does on a PIL image),
  coordinates and boxes rescaled.
- `preprocess`: (x - pixel_mean) / pixel_std, then zero-pad bottom/right to a square.
- `postprocess_masks`: bilinear (align_corners=False, no antialias) to the padded
  input size, crop to the resized image, bilinear to the original size; optionally
  thresholded in the same pass, a few masks at a time (memory bounded by
  `CHUNK_PIXELS`, not by the number of masks x the image's pixels).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sam_jax.config import SamConfig


def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
    """The (h, w) of an (oldh, oldw) image resized so its longest side is `long_side_length`."""
    scale = long_side_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    return int(newh + 0.5), int(neww + 0.5)


class ResizeLongestSide:
    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8."""
        h, w = get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) (x, y) in the original image -> the resized image's frame (float32)."""
        old_h, old_w = original_size
        new_h, new_w = get_preprocess_shape(old_h, old_w, self.target_length)
        coords = np.array(coords, dtype=np.float64, copy=True)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords.astype(np.float32)

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 4) x0, y0, x1, y1 -> the resized image's frame."""
        boxes = self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size)
        return boxes.reshape(-1, 4)


def preprocess(images: jax.Array | np.ndarray, config: SamConfig) -> jax.Array | np.ndarray:
    """(B, h, w, 3) resized RGB in [0, 255] -> (B, S, S, 3) float32 normalized and zero-padded.

    A numpy array gives a numpy array (the data pipeline's host workers), anything else a jax.Array."""
    xp = np if isinstance(images, np.ndarray) else jnp
    mean = xp.asarray(config.pixel_mean, np.float32)
    std = xp.asarray(config.pixel_std, np.float32)
    x = (images.astype(np.float32) - mean) / std
    h, w = x.shape[1:3]
    s = config.image_size
    return xp.pad(x, ((0, 0), (0, s - h), (0, s - w), (0, 0)))


def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The (out_size, in_size) float32 matrix of 1-D linear interpolation,
    `F.interpolate(mode="linear"/"bilinear", align_corners=False)` without antialiasing.

    Source positions and weights are computed in float32 as PyTorch's CPU kernel computes
    them: src = max(scale * (i + 0.5) - 0.5, 0), taps floor(src) and the next (clamped).
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
    m = np.zeros((out_size, in_size), f32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), f32(1.0) - w1)
    np.add.at(m, (rows, i1), w1)
    return m


@functools.lru_cache(maxsize=16)
def antialias_linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The (out_size, in_size) float32 matrix of 1-D linear interpolation with antialiasing,
    `F.interpolate(mode="bilinear", align_corners=False, antialias=True)` (torchvision's `Resize` of
    a float tensor): a triangle filter widened by the scale when shrinking, its taps normalised.

    Weights are computed in float32 as PyTorch's CPU kernel computes them
    (`_compute_indices_min_size_weights_aa`); enlarging, they equal `linear_resize_matrix`'s.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    support = scale if scale >= 1.0 else f32(1.0)
    invscale = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
    m = np.zeros((out_size, in_size), f32)
    for i in range(out_size):
        center = scale * f32(i + 0.5)
        xmin = max(int(center - support + f32(0.5)), 0)
        xsize = min(int(center + support + f32(0.5)), in_size) - xmin
        w = np.zeros(xsize, f32)
        total = f32(0.0)
        for j in range(xsize):
            x = abs((f32(j + xmin) - center + f32(0.5)) * invscale)
            w[j] = f32(1.0) - x if x < 1.0 else f32(0.0)
            total = f32(total + w[j])
        m[i, xmin : xmin + xsize] = w / total if total != 0.0 else w
    return m


@functools.lru_cache(maxsize=16)
def antialias_linear_resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`antialias_linear_resize_matrix` as its band: each output's taps, in PyTorch's order ->
    (out_size, K) int32 source indices and (out_size, K) float32 weights, K the widest row's taps
    (a narrower row's extra taps: weight 0). Shrinking 4000 -> 1024, K = 10 instead of 4000."""
    m = antialias_linear_resize_matrix(in_size, out_size)
    nonzero = m != 0
    first = nonzero.argmax(1)
    last = in_size - 1 - nonzero[:, ::-1].argmax(1)
    k = int((last - first).max()) + 1
    idx = first[:, None] + np.arange(k)
    inside = idx <= last[:, None]
    idx = np.minimum(idx, in_size - 1)
    weights = np.where(inside, np.take_along_axis(m, idx, 1), np.float32(0.0))
    return idx.astype(np.int32), weights.astype(np.float32)


def antialias_linear_resize(x: jax.Array, out_size: int, axis: int) -> jax.Array:
    """x float32 resized to `out_size` along `axis` (bilinear, antialiased: `antialias_linear_resize_matrix`),
    as a sum over each output's few taps (`antialias_linear_resize_taps`), in PyTorch's order: one
    fused pass, without the dense (out_size, in_size) product."""
    idx, weights = antialias_linear_resize_taps(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    out = None
    for k in range(idx.shape[1]):
        term = jnp.take(x, jnp.asarray(idx[:, k]), axis=axis) * jnp.asarray(weights[:, k]).reshape(shape)
        out = term if out is None else out + term
    return out


def postprocess_matrix(low_res: int, input_len: int, original_len: int, image_size: int) -> np.ndarray:
    """One axis of `postprocess_masks` as a single (original_len, low_res) float32 matrix:
    resize low_res -> image_size, keep the first input_len, resize to original_len."""
    up = linear_resize_matrix(low_res, image_size)[:input_len].astype(np.float64)
    down = linear_resize_matrix(input_len, original_len).astype(np.float64)
    return (down @ up).astype(np.float32)


# Output pixels computed per step of `postprocess_masks` (and of the mask generator's
# upsampling): bounds the memory of its intermediates and outputs whatever the number of masks.
CHUNK_PIXELS = 1 << 24


@functools.lru_cache(maxsize=64)
def postprocess_band(low_res: int, input_len: int, original_len: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`postprocess_matrix` in banded form: (start (original_len,) int32, weights (original_len, taps) float32),
    row r = sum_t weights[r, t] * x[start[r] + t]. Each output row of the two composed linear
    resizes reads at most 3 consecutive low-res rows (2 taps of 2 taps); taps is that width."""
    m = postprocess_matrix(low_res, input_len, original_len, image_size)
    nz = m != 0
    first = np.where(nz.any(1), np.argmax(nz, axis=1), 0)
    last = np.where(nz.any(1), low_res - 1 - np.argmax(nz[:, ::-1], axis=1), 0)
    taps = int(min(low_res, max(1, (last - first).max() + 1)))
    start = np.minimum(first, low_res - taps)
    weights = np.take_along_axis(m, start[:, None] + np.arange(taps), axis=1)
    return start.astype(np.int32), weights.astype(np.float32)


def upsample_logits(
    low_res: jax.Array,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    image_size: int,
    *,
    pad_width: int = 0,
) -> jax.Array:
    """One mask's low-res logits (s, s) -> float32 logits (H, W), as `postprocess_masks`.

    Columns first, as one (s, s) @ (s, W) product; then each output row is a weighted sum of
    at most 3 rows of that (`postprocess_band`), which XLA fuses with whatever consumes the
    logits (a threshold), so the float (H, W) logits need not be stored. `pad_width` extra
    columns on the right are NaN or -inf (no threshold passes them).
    """
    s = low_res.shape[-1]
    mx = postprocess_matrix(s, input_size[1], original_size[1], image_size)
    start, weights = postprocess_band(s, input_size[0], original_size[0], image_size)
    u = jnp.dot(low_res.astype(jnp.float32), jnp.asarray(mx.T), precision=jax.lax.Precision.HIGHEST)
    if pad_width:
        u = jnp.concatenate([u, jnp.full((s, pad_width), -jnp.inf, u.dtype)], axis=1)
    out = weights[:, 0, None] * u[start]
    for t in range(1, weights.shape[1]):
        out = out + weights[:, t, None] * u[start + t]
    return out


def chunk_size(n: int, pixels: int, chunk_pixels: int = CHUNK_PIXELS) -> int:
    """How many masks of `pixels` pixels one step processes: the largest divisor of n with at most
    `chunk_pixels` output pixels in all (at least 1), so that n masks are an exact number of steps."""
    cap = max(1, min(n, chunk_pixels // max(pixels, 1)))
    return max(d for d in range(1, cap + 1) if n % d == 0)


def postprocess_masks(
    masks: jax.Array,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    image_size: int,
    *,
    threshold: float | None = None,
    chunk_pixels: int = CHUNK_PIXELS,
) -> jax.Array:
    """Low-res mask logits (..., s, s) -> float32 logits at the original image size (..., H, W),
    or with `threshold` the bool masks logits > threshold.

    The official bilinear upscaling to the padded input, crop to the resized image and
    bilinear resize to the original size, composed into one linear map per axis on the host
    (equal up to float32 rounding): a small matrix product per mask and at most 3 taps per
    output row (`upsample_logits`). Masks are processed `chunk_size` at a time (a `lax.map`),
    so the intermediates take memory for one chunk, not for all the masks; with `threshold`
    the float logits at full size are never stored, only the bool output.
    """
    lead, s = masks.shape[:-2], masks.shape[-1]
    n = math.prod(lead)
    h, w = original_size
    if n == 0:
        return jnp.zeros((*lead, h, w), jnp.float32 if threshold is None else bool)

    def one(low: jax.Array) -> jax.Array:
        logits = upsample_logits(low, input_size, original_size, image_size)
        return logits if threshold is None else logits > threshold

    k = chunk_size(n, h * w, chunk_pixels)
    chunks = masks.reshape(n // k, k, s, s)
    out = jax.vmap(one)(chunks[0]) if k == n else jax.lax.map(jax.vmap(one), chunks)
    return out.reshape(*lead, h, w)
