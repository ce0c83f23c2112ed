"""A synthetic data set in the SA-1B layout: textured backgrounds with overlapping shapes.

``make_shapes(out_dir, n)`` writes ``shapes_000000.jpg`` + ``shapes_000000.json`` ... in the
SA-1B format (one JSON per image, COCO compressed RLE masks), so the same reader
(:mod:`sam_jax.train.sa1b`) serves the real data set and this one.

Every shape is rasterised exactly once into a boolean mask (numpy geometry on pixel
centres) and that same mask paints the image, so masks and pixels agree exactly (before
JPEG compression). Later shapes occlude earlier ones; each annotation is the *visible*
part of its shape. A placement that would leave an earlier shape with fewer than
``MIN_VISIBLE_AREA`` pixels (or under a quarter of its own area) visible is re-drawn, so
every painted shape is annotated.

Each image is generated from its own ``np.random.default_rng([seed, index])``: the output
is byte-for-byte deterministic for a seed, and image ``i`` does not depend on ``n``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from sam_jax.files import write_json

CATEGORIES = ("circle", "ellipse", "rectangle", "triangle", "star", "pentagon", "hexagon", "ring")
# `colour_by_category`: each kind painted one flat colour (a data set whose categories a single
# pixel shows; see `make_shapes`).
CATEGORY_COLOURS = {
    "circle": (230, 25, 25),
    "ellipse": (245, 130, 20),
    "rectangle": (25, 190, 40),
    "triangle": (30, 50, 235),
    "star": (250, 230, 30),
    "pentagon": (200, 30, 210),
    "hexagon": (20, 220, 220),
    "ring": (250, 250, 250),
}
SIZE_RANGE = (0.04, 0.4)  # a shape's extent, as fractions of the image's shorter side
MIN_VISIBLE_AREA = 40  # pixels: a shape whose visible part is smaller is not kept
MIN_VISIBLE_FRACTION = 0.25  # of the shape's own (unoccluded, in-image) area
_PLACEMENT_TRIES = 12
_NAME = "shapes_{:06d}"


def make_shapes(
    out_dir: str | Path,
    n: int,
    *,
    seed: int = 0,
    image_size: tuple[int, int] = (192, 256),
    min_shapes: int = 2,
    max_shapes: int = 6,
    size_range: tuple[float, float] = SIZE_RANGE,
    categories: tuple[str, ...] = CATEGORIES,
    colour_by_category: bool = False,
) -> list[Path]:
    """Write ``n`` synthetic images (``NAME.jpg`` + SA-1B ``NAME.json``) to ``out_dir``.

    Returns the JSON paths, in order. ``image_size`` is ``(H, W)``. A shape's extent is
    log-uniform in ``size_range``, as fractions of the image's shorter side. Each shape's
    category is drawn uniformly from ``categories`` (a subset of ``CATEGORIES``, in any order).

    ``colour_by_category`` paints each shape the flat colour of its kind
    (``CATEGORY_COLOURS``) instead of a textured random one, with the same geometry and
    backgrounds. A pixel then tells its shape's kind, where normally only the outline does: a
    control for text prompts, which separates what the text path learns from how fast an
    encoder learns to recognise shapes (docs/text-training.md).
    """
    h, w = (int(v) for v in image_size)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if h < 16 or w < 16:
        raise ValueError(f"image_size must be at least 16 x 16, got {image_size}")
    if not 1 <= min_shapes <= max_shapes <= 999:
        raise ValueError(f"need 1 <= min_shapes <= max_shapes <= 999, got {min_shapes}, {max_shapes}")
    lo, hi = (float(v) for v in size_range)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(
            f"size_range must satisfy 0 < low <= high <= 1 (fractions of the shorter side), got {size_range}"
        )
    categories = tuple(categories)
    unknown = sorted(set(categories) - set(CATEGORIES))
    if not categories or unknown or len(set(categories)) != len(categories):
        raise ValueError(f"categories must be distinct names from {CATEGORIES}, got {categories}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = _Grid(h, w)
    paths = []
    for i in range(n):
        rng = np.random.default_rng([int(seed), i])
        image, shapes = _make_image(rng, grid, min_shapes, max_shapes, (lo, hi), categories, colour_by_category)
        name = _NAME.format(i)
        Image.fromarray(image).save(out / f"{name}.jpg", format="JPEG", quality=95)
        record = {
            "image": {"image_id": i, "file_name": f"{name}.jpg", "height": h, "width": w},
            "annotations": [
                _annotation(i * 1000 + k, mask, category, w, h) for k, (mask, category) in enumerate(shapes)
            ],
        }
        path = out / f"{name}.json"
        write_json(path, record)  # atomic, and after the image: a crash leaves no record half-written
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- annotations


def _annotation(ann_id: int, mask: np.ndarray, category: str, w: int, h: int) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return {
        "id": ann_id,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
        "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
        "area": int(mask.sum()),
        "predicted_iou": 1.0,
        "stability_score": 1.0,
        "point_coords": [inner_point(mask, x0, x1, y0, y1)],
        "crop_box": [0, 0, w, h],
        "category": category,
    }


def inner_point(mask: np.ndarray, x0: int, x1: int, y0: int, y1: int) -> list[float]:
    """The mask pixel farthest from the mask's boundary, as ``[x, y]`` (pixel indices)."""
    crop = np.pad(mask[y0 : y1 + 1, x0 : x1 + 1], 1)
    dist = ndimage.distance_transform_edt(crop)
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return [float(c - 1 + x0), float(r - 1 + y0)]


# --------------------------------------------------------------------------- image


class _Grid:
    """Pixel-centre coordinates of an ``h x w`` image."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.y, self.x = np.mgrid[0:h, 0:w].astype(np.float32) + np.float32(0.5)


def _make_image(
    rng: np.random.Generator,
    grid: _Grid,
    min_shapes: int,
    max_shapes: int,
    size_range: tuple[float, float],
    kinds: tuple[str, ...],
    colour_by_category: bool = False,
):
    canvas = _background(rng, grid)
    owner = np.full((grid.h, grid.w), -1, np.int16)  # which kept shape each pixel shows
    full_area: list[int] = []  # each kept shape's own area
    visible: list[int] = []  # each kept shape's visible area so far
    categories: list[str] = []
    centres: list[tuple[float, float]] = []
    for _ in range(int(rng.integers(min_shapes, max_shapes + 1))):
        for _ in range(_PLACEMENT_TRIES):
            category = kinds[int(rng.integers(len(kinds)))]
            # Four times in ten, aim at a kept shape: plenty of occlusion.
            near = centres[int(rng.integers(len(centres)))] if centres and rng.random() < 0.4 else None
            win, mask, centre = _shape_mask(rng, grid, category, size_range, near)  # mask: the shape on canvas[win]
            area = int(np.count_nonzero(mask))
            if area < MIN_VISIBLE_AREA:
                continue
            under = owner[win][mask]
            covered = np.bincount(under[under >= 0], minlength=len(visible))
            left = np.asarray(visible, np.int64) - covered
            need = np.maximum(MIN_VISIBLE_AREA, np.ceil(MIN_VISIBLE_FRACTION * np.asarray(full_area)))
            if np.any(left < need):
                continue
            _paint(rng, canvas, grid, win, mask)  # draws from rng either way: the same geometry with colour_by_category
            if colour_by_category:
                canvas[win][mask] = np.asarray(CATEGORY_COLOURS[category], np.float32)
            owner[win][mask] = len(visible)
            visible = [*left.tolist(), area]
            full_area.append(area)
            categories.append(category)
            centres.append(centre)
            break
    masks = [(owner == k, categories[k]) for k in range(len(visible))]
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, masks


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], (h, w, channels): a coarse random grid, bicubic-upsampled."""
    gh = max(2, int(round(cells * h / max(h, w))))
    gw = max(2, int(round(cells * w / max(h, w))))
    coarse = rng.integers(0, 256, size=(gh, gw, channels), dtype=np.uint8)
    img = Image.fromarray(coarse if channels == 3 else coarse[..., 0])
    fine = np.asarray(img.resize((w, h), Image.BICUBIC), np.float32).reshape(h, w, channels)
    return fine / np.float32(127.5) - np.float32(1.0)


_LOW = 4  # the smooth parts of the background are drawn at 1/_LOW resolution, then upsampled


def _background(rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    h, w = grid.h, grid.w
    lh, lw = -(-h // _LOW), -(-w // _LOW)
    ly = (np.arange(lh, dtype=np.float32) + 0.5) * _LOW
    lx = (np.arange(lw, dtype=np.float32) + 0.5) * _LOW
    # A linear gradient between two colours at a random angle.
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    proj = np.float32(np.cos(theta) / w) * lx[None, :] + np.float32(np.sin(theta) / h) * ly[:, None]
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    low = c0 + (c1 - c0) * t[..., None]
    # Coloured low-frequency noise.
    low += np.float32(rng.uniform(10, 35)) * _smooth_noise(rng, lh, lw, int(rng.integers(3, 9)), 3)
    # Soft blobs of colour (separable Gaussians).
    for _ in range(int(rng.integers(0, 5))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sigma = rng.uniform(0.05, 0.25) * min(h, w)
        gx = np.exp(-((lx - cx) ** 2) / (2 * sigma**2))
        gy = np.exp(-((ly - cy) ** 2) / (2 * sigma**2))
        alpha = (rng.uniform(0.3, 0.8) * np.outer(gy, gx)).astype(np.float32)
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        low += alpha[..., None] * (colour - low)
    channels = [Image.fromarray(np.ascontiguousarray(low[..., c])) for c in range(3)]  # float "F" images
    canvas = np.stack([np.asarray(ch.resize((w, h), Image.BILINEAR)) for ch in channels], axis=-1)
    # Stripes, each over a soft random region (sin(a x + b y), separably).
    for _ in range(int(rng.integers(0, 3))):
        phi = rng.uniform(0, np.pi)
        k = 2 * np.pi / rng.uniform(6, 30)
        ax = (k * np.cos(phi) * grid.x[0]).astype(np.float32)
        by = (k * np.sin(phi) * grid.y[:, 0]).astype(np.float32)
        wave = np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))
        region = np.clip(_smooth_noise(rng, h, w, 3, 1)[..., 0] * 3, 0, 1)
        colour = (rng.uniform(15, 40) * rng.uniform(-1, 1, size=3)).astype(np.float32)
        canvas += (wave * region)[..., None] * colour
    # Pixel noise.
    canvas += np.float32(rng.uniform(2, 6)) * rng.standard_normal(size=canvas.shape, dtype=np.float32)
    return canvas


def _paint(rng: np.random.Generator, canvas: np.ndarray, grid: _Grid, win: tuple, mask: np.ndarray) -> None:
    """Fill ``canvas[win][mask]`` with a textured colour far from what lies under and around it."""
    (ys, xs) = win
    around = canvas[max(0, ys.start - 3) : ys.stop + 3, max(0, xs.start - 3) : xs.stop + 3].reshape(-1, 3)
    around = around[:: max(1, len(around) // 512)]  # a sample is plenty
    candidates = rng.uniform(0, 255, size=(32, 3)).astype(np.float32)
    dist = ((around[None, :, :] - candidates[:, None, :]) ** 2).sum(-1)  # (32, P), squared
    kth = len(around) // 20
    base = candidates[int(np.argmax(np.partition(dist, kth, axis=1)[:, kth]))]  # best 5th percentile

    yy, xx = grid.y[win][mask], grid.x[win][mask]
    delta = rng.uniform(-1, 1, size=3).astype(np.float32)
    delta *= rng.uniform(15, 30) / max(float(np.abs(delta).max()), 1e-6)
    texture = int(rng.integers(5))
    if texture == 0:  # solid
        pattern = np.zeros_like(yy)
    elif texture == 1:  # stripes
        phi, period = rng.uniform(0, np.pi), rng.uniform(4, 14)
        pattern = np.sign(np.sin(2 * np.pi * (np.cos(phi) * xx + np.sin(phi) * yy) / period))
    elif texture == 2:  # checker
        cell = rng.uniform(3, 10)
        pattern = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2) * 2 - 1
    elif texture == 3:  # gradient across the shape
        phi = rng.uniform(0, 2 * np.pi)
        proj = np.cos(phi) * xx + np.sin(phi) * yy
        pattern = 2 * (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6) - 1
    else:  # smooth noise
        hw = (ys.stop - ys.start, xs.stop - xs.start)
        pattern = _smooth_noise(rng, *hw, max(2, int(rng.integers(4, 12)) * max(hw) // max(grid.h, grid.w)), 1)
        pattern = pattern[..., 0][mask]
    pixels = base + pattern[:, None].astype(np.float32) * delta
    pixels += np.float32(3) * rng.standard_normal(size=pixels.shape, dtype=np.float32)
    canvas[win][mask] = pixels


# --------------------------------------------------------------------------- geometry


def _shape_mask(
    rng: np.random.Generator,
    grid: _Grid,
    category: str,
    size_range: tuple[float, float],
    near: tuple[float, float] | None = None,
):
    """A random shape: ``(win, mask, (cx, cy))``, ``mask`` its pixels within the window ``win``.

    With ``near``, the centre lies within about a shape's size of that point.
    """
    h, w = grid.h, grid.w
    side = min(h, w)
    size = float(np.exp(rng.uniform(np.log(size_range[0]), np.log(size_range[1])))) * side  # log-uniform extent
    r = size / 2
    if near is None:
        cx = rng.uniform(0.05 * w, 0.95 * w)
        cy = rng.uniform(0.05 * h, 0.95 * h)
    else:
        cx = float(np.clip(near[0] + rng.uniform(-size, size), 0, w))
        cy = float(np.clip(near[1] + rng.uniform(-size, size), 0, h))
    angle = rng.uniform(0, 2 * np.pi)
    # Every shape fits in the disc of radius r around (cx, cy): evaluate only that window.
    y0, y1 = max(0, int(cy - r) - 1), min(h, int(cy + r) + 2)
    x0, x1 = max(0, int(cx - r) - 1), min(w, int(cx + r) + 2)
    x = grid.x[y0:y1, x0:x1] - np.float32(cx)
    y = grid.y[y0:y1, x0:x1] - np.float32(cy)
    return (slice(y0, y1), slice(x0, x1)), _shape_window(rng, x, y, category, r, angle), (cx, cy)


def _shape_window(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, category: str, r: float, angle: float
) -> np.ndarray:
    """The shape on pixel-centre offsets ``x``, ``y`` from its centre; it fits in radius ``r``."""
    if category == "circle":
        return x * x + y * y <= r * r
    if category == "ring":
        d2 = x * x + y * y
        return (d2 <= r * r) & (d2 > (r * rng.uniform(0.4, 0.65)) ** 2)
    if category == "ellipse":
        b = r * rng.uniform(0.35, 0.8)
        u = np.cos(angle) * x + np.sin(angle) * y
        v = -np.sin(angle) * x + np.cos(angle) * y
        return (u / r) ** 2 + (v / b) ** 2 <= 1
    if category == "rectangle":
        # Half-diagonal r: the corners stay inside the window (a half-width of r put them at up
        # to 1.41 r, where the window cut them off: octagons labelled "rectangle").
        aspect = rng.uniform(0.35, 1.0)
        hw = r / np.sqrt(1.0 + aspect * aspect)
        hh = hw * aspect
        corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        return _convex(x, y, _rotate(corners, angle))
    if category == "triangle":
        # Three vertices on a circle, each gap at least 70 degrees: no sliver triangles.
        gaps = rng.dirichlet((4, 4, 4)) * (2 * np.pi - 3 * np.deg2rad(70)) + np.deg2rad(70)
        theta = angle + np.concatenate([[0.0], np.cumsum(gaps[:2])])
        return _convex(x, y, r * np.stack([np.cos(theta), np.sin(theta)], -1))
    if category in ("pentagon", "hexagon"):
        k = 5 if category == "pentagon" else 6
        theta = angle + 2 * np.pi * np.arange(k) / k
        return _convex(x, y, r * np.stack([np.cos(theta), np.sin(theta)], -1))
    if category == "star":
        k = int(rng.integers(5, 8))
        inner = r * rng.uniform(0.4, 0.55)
        theta = angle + np.pi * np.arange(2 * k) / k
        radius = np.where(np.arange(2 * k) % 2 == 0, r, inner)
        verts = np.stack([radius * np.cos(theta), radius * np.sin(theta)], -1)
        # A star is the union of the triangles (centre, v_i, v_i+1): each convex.
        out = np.zeros(x.shape, bool)
        for i in range(2 * k):
            out |= _convex(x, y, np.stack([[0.0, 0.0], verts[i], verts[(i + 1) % (2 * k)]]))
        return out
    raise ValueError(f"unknown category {category!r}")


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _convex(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Pixels inside the convex polygon ``verts`` (K, 2), either orientation, boundary included."""
    verts = np.asarray(verts, np.float64)
    nxt = np.roll(verts, -1, axis=0)
    if float(np.sum(verts[:, 0] * nxt[:, 1] - nxt[:, 0] * verts[:, 1])) < 0:  # make it counter-clockwise
        verts = verts[::-1]
        nxt = np.roll(verts, -1, axis=0)
    out = np.ones(x.shape, bool)
    for (px, py), (qx, qy) in zip(verts, nxt):
        out &= (qx - px) * (y - py) - (qy - py) * (x - px) >= 0
    return out
