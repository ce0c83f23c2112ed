"""Overlays: masks tinted over the image, with prompt points and boxes drawn."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

BLUE = (30, 144, 255)


def mask_colors(n: int, seed: int = 0) -> np.ndarray:
    """n distinct bright colours (n, 3) uint8; the first is blue."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(40, 256, size=(n, 3)).astype(np.uint8)
    if n:
        colors[0] = BLUE
    return colors


def overlay(
    image: np.ndarray,
    masks: Iterable[np.ndarray] | np.ndarray,
    colors: np.ndarray | None = None,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    alpha: float = 0.55,
) -> Image.Image:
    """image (H, W, 3) uint8 with each mask (H, W) bool tinted in its colour; foreground
    points green, background points red, the box yellow. `masks` may be an iterator (one mask in
    memory at a time), then with `colors` given."""
    out = image.astype(np.float32)
    if colors is None:
        masks = list(masks)
        colors = mask_colors(len(masks))
    for mask, color in zip(masks, colors):
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
    img = Image.fromarray(out.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = max(3, round(max(image.shape[:2]) / 120))
    if box is not None:
        draw.rectangle([float(v) for v in box], outline=(255, 220, 0), width=max(2, r // 2))
    if points is not None:
        for (x, y), lab in zip(points, labels if labels is not None else np.ones(len(points))):
            fill = (0, 220, 0) if lab == 1 else (230, 0, 0)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255))
    return img
