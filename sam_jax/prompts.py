"""The one fixed-shape prompt batch every decoder call takes.

A batch of B prompts, each any mix of points, a box and a mask:

  points    (B, N, 2) float32  (x, y) in the padded model-input frame (pixels of the
                               resized image, before the +0.5 the encoder adds)
  labels    (B, N)    int32    1 foreground, 0 background, 2 / 3 box top-left /
                               bottom-right corner, -1 padding
  mask_input (B, S, S) float32 low-resolution mask logits (S = 4 x embedding side, 256)
  has_mask  (B,)      bool     whether mask_input is used (else the no-mask embedding)
                               (mask_input and has_mask may both be None: no row has a mask
                               prompt, and the decoder shares the image side between rows)
  text      (B, M, Dt) float32 optional: CLIP embeddings used as text prompts (M per
                               prompt, Dt the CLIP projection width), or None
  text_mask (B, M)    bool     which of the M text slots are used (others are padding)

This is the convention of the official decoder-only ONNX export, with one
addition that keeps any padding exact: only the first -1 of a row with points
and no box is a token (the official padding point); other -1 slots are masked
out of attention. N is rounded up to a bucket (`POINT_BUCKETS`), so one compiled
decoder serves every mix of prompts and a handful of point counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import struct

LABEL_PAD = -1
LABEL_BACKGROUND = 0
LABEL_FOREGROUND = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3

POINT_BUCKETS = (4, 8, 16, 32, 64)


def bucket_size(n: int, buckets: Sequence[int] = POINT_BUCKETS) -> int:
    """The smallest bucket >= n (beyond the last bucket: the next multiple of it)."""
    for b in buckets:
        if n <= b:
            return b
    last = buckets[-1]
    return -(-n // last) * last


@struct.dataclass
class Prompts:
    points: jax.Array | np.ndarray
    labels: jax.Array | np.ndarray
    mask_input: jax.Array | np.ndarray | None
    has_mask: jax.Array | np.ndarray | None
    text: jax.Array | np.ndarray | None = None
    text_mask: jax.Array | np.ndarray | None = None

    def without_masks(self) -> Prompts:
        """The same prompts with mask_input and has_mask None, when no row has a mask prompt
        (the decoder then runs the image side once for all rows): host arrays only."""
        if self.has_mask is not None and np.any(np.asarray(self.has_mask)):
            raise ValueError("without_masks: some prompts have a mask input")
        return self.replace(mask_input=None, has_mask=None)

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    @property
    def num_points(self) -> int:
        return self.labels.shape[1]


def make_prompts(
    *,
    batch_size: int,
    mask_size: int,
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    mask_input: np.ndarray | None = None,
    num_points: int | None = None,
    text: np.ndarray | None = None,
    text_mask: np.ndarray | None = None,
) -> Prompts:
    """Build a padded `Prompts` batch on the host from official-style arguments.

    point_coords (B, n, 2) and point_labels (B, n) in the model-input frame; boxes
    (B, 4) as x0, y0, x1, y1; mask_input (B, S, S) or (B, 1, S, S); text (B, Dt) or
    (B, M, Dt) CLIP embeddings, with text_mask (B, M) (default: all used). Each is optional.
    The point axis is padded with -1 to `num_points` (default: the bucket for the
    slots used: n points, 2 box corners, and the official padding point when there
    are points without a box).
    """
    parts_xy, parts_lab = [], []
    if point_coords is not None:
        pc = np.asarray(point_coords, np.float32).reshape(batch_size, -1, 2)
        pl = np.asarray(point_labels, np.int32).reshape(batch_size, -1)
        parts_xy.append(pc)
        parts_lab.append(pl)
    if boxes is not None:
        bx = np.asarray(boxes, np.float32).reshape(batch_size, 2, 2)
        parts_xy.append(bx)
        parts_lab.append(
            np.broadcast_to(np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], np.int32), (batch_size, 2))
        )
    xy = np.concatenate(parts_xy, axis=1) if parts_xy else np.zeros((batch_size, 0, 2), np.float32)
    lab = np.concatenate(parts_lab, axis=1) if parts_lab else np.zeros((batch_size, 0), np.int32)
    used = lab.shape[1] + int(point_coords is not None and boxes is None)
    n = bucket_size(max(used, 1)) if num_points is None else num_points
    if n < used:
        raise ValueError(f"num_points={n} is smaller than the {used} prompt slots needed")
    pad = n - lab.shape[1]
    xy = np.pad(xy, ((0, 0), (0, pad), (0, 0)))
    lab = np.pad(lab, ((0, 0), (0, pad)), constant_values=LABEL_PAD)
    if mask_input is None:
        masks = np.zeros((batch_size, mask_size, mask_size), np.float32)
        has_mask = np.zeros((batch_size,), bool)
    else:
        masks = np.asarray(mask_input, np.float32).reshape(batch_size, mask_size, mask_size)
        has_mask = np.ones((batch_size,), bool)
    if text is not None:
        text = np.asarray(text, np.float32)
        text = text[:, None] if text.ndim == 2 else text
        if text.ndim != 3 or text.shape[0] != batch_size:
            raise ValueError(
                f"text must be (B, Dt) or (B, M, Dt) CLIP embeddings with B={batch_size}, got shape {text.shape}"
            )
        text_mask = (
            np.ones(text.shape[:2], bool) if text_mask is None else np.asarray(text_mask, bool).reshape(text.shape[:2])
        )
    elif text_mask is not None:
        raise ValueError("text_mask was given without text")
    return Prompts(points=xy, labels=lab, mask_input=masks, has_mask=has_mask, text=text, text_mask=text_mask)
