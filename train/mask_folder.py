"""Folders of images and mask PNGs as training data.

    root/images/NAME.jpg     any of sam_jax.files.IMAGE_SUFFIXES
    root/masks/NAME.png      one instance-id PNG: 0 background, each other value one instance
                             (8- or 16-bit grey, or palette indices)
 or root/masks/NAME/*.png    one binary PNG per instance: nonzero pixels are the mask

source = MaskFolderSource("root")
record = source[0]    # the sam_jax.train.sa1b.load_record format (categories ""), or None
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sam_jax.files import IMAGE_SUFFIXES, FileFormatError, read_image
from sam_jax.train.sa1b import DataError
from sam_jax.train.sources import RecordSource

# Why an image or mask is left out (the keys of MaskFolderSource.skipped).
# Found when the folder is opened:
NO_MASKS = "image without masks"
ORPHAN_MASKS = "masks without an image"
AMBIGUOUS = "both masks/NAME.png and masks/NAME/"
DUPLICATE_NAME = "two images of one name"
# Found when a record is read:
IMAGE_UNREADABLE = "image missing or unreadable"
MASK_UNREADABLE = "mask missing or unreadable"
NOT_INSTANCE_PNG = "instance PNG not single-channel"
MASK_SIZE = "mask size differs from the image's"
EMPTY_MASK = "empty mask"

# PIL modes of single-channel integer images: what an instance-id PNG may be.
_ID_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")


class MaskFolderSource(RecordSource):
    """A grain ``RandomAccessDataSource`` over ``root/images`` and ``root/masks``.

    One record per image (sorted by name) that has a mask PNG or a mask folder with PNGs;
    ``source[i]`` is ``{"image", "masks" (M, H, W) bool (instances in increasing id order, or
    the folder's PNGs sorted by name), "categories": [""] * M, "boxes" (M, 4) float32 XYWH,
    "path"}`` or ``None`` when the image or its instance PNG is unreadable, of another size
    than the image, or holds no instance (warned about once per file; see
    :class:`RecordSource` for ``skipped`` and ``num_skipped``). In a mask folder, a PNG that
    is unreadable, of another size or empty is left out alone.

    Raises :class:`DataError` (one line) when ``root`` lacks ``images/`` or ``masks/``, or no
    image has masks (the message counts what was left out, per reason).
    """

    def __init__(self, root: str | Path, cache: bool = False):
        super().__init__(cache)
        self.root = Path(root)
        images_dir, masks_dir = self.root / "images", self.root / "masks"
        for d in (images_dir, masks_dir):
            if not d.is_dir():
                raise DataError(f"{self.root}: no {d.name}/ folder; expected images/NAME.jpg and masks/NAME.png")
        images: dict[str, Path] = {}
        for p in sorted(images_dir.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                if p.stem in images:
                    self._count(DUPLICATE_NAME)
                else:
                    images[p.stem] = p
        pngs = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() == ".png" and p.is_file()}
        folders = {p.name: p for p in masks_dir.iterdir() if p.is_dir()}
        self._count(ORPHAN_MASKS, len((set(pngs) | set(folders)) - set(images)))

        self.records: list[tuple[Path, Path | list[Path]]] = []
        for stem, image_path in images.items():
            png, folder = pngs.get(stem), folders.get(stem)
            if png is not None and folder is not None:
                self._count(AMBIGUOUS)
            elif png is not None:
                self.records.append((image_path, png))
            elif folder is not None:
                files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
                if files:
                    self.records.append((image_path, files))
                else:
                    self._count(NO_MASKS)
            else:
                self._count(NO_MASKS)
        if not self.records:
            if not images:
                raise DataError(f"{images_dir}: no images (expected {', '.join(IMAGE_SUFFIXES)} files)")
            raise self._empty_error("images")

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> dict[str, Any] | None:
        image_path, masks_at = self.records[index]
        try:
            image = read_image(image_path)
        except FileFormatError as e:
            self._skip(IMAGE_UNREADABLE, str(image_path), str(e))
            return None
        hw = image.shape[:2]
        if isinstance(masks_at, Path):
            masks = self._instance_masks(masks_at, hw)
        else:
            masks = [m for m in (self._binary_mask(p, hw) for p in masks_at) if m is not None]
            masks = np.stack(masks) if masks else None
        if masks is None:
            return None
        if not len(masks):
            self._skip(NO_MASKS, str(image_path), f"{image_path}: its masks hold no instance")
            return None
        return {
            "image": image,
            "masks": masks,
            "categories": [""] * len(masks),
            "boxes": mask_boxes(masks),
            "path": str(image_path),
        }

    def _instance_masks(self, path: Path, hw: tuple[int, int]) -> np.ndarray | None:
        try:
            ids, mode = _read_png(path)
        except FileFormatError as e:
            self._skip(MASK_UNREADABLE, str(path), str(e))
            return None
        if mode not in _ID_MODES:
            self._skip(NOT_INSTANCE_PNG, str(path), f"{path} is {mode}; an instance-id PNG is 8- or 16-bit grey")
            return None
        if ids.shape != hw:
            self._skip(MASK_SIZE, str(path), f"{path} is {ids.shape[0]}x{ids.shape[1]}, its image {hw[0]}x{hw[1]}")
            return None
        values = np.unique(ids)
        values = values[values != 0]
        return ids[None] == values[:, None, None]

    def _binary_mask(self, path: Path, hw: tuple[int, int]) -> np.ndarray | None:
        try:
            pixels, mode = _read_png(path)
        except FileFormatError as e:
            self._skip(MASK_UNREADABLE, str(path), str(e))
            return None
        if pixels.ndim == 3:
            if mode in ("LA", "RGBA", "PA"):
                pixels = pixels[..., :-1]  # the alpha channel is no part of the mask
            pixels = pixels.any(-1)
        if pixels.shape != hw:
            self._skip(
                MASK_SIZE, str(path), f"{path} is {pixels.shape[0]}x{pixels.shape[1]}, its image {hw[0]}x{hw[1]}"
            )
            return None
        mask = pixels != 0
        if not mask.any():
            self._skip(EMPTY_MASK, str(path), str(path))
            return None
        return mask

    def __repr__(self) -> str:
        return f"MaskFolderSource(root={str(self.root)!r}, records={len(self.records)})"


def _read_png(path: Path) -> tuple[np.ndarray, str]:
    """A PNG's pixels as stored (palette indices, not colours) and its PIL mode, or FileFormatError."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img), img.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FileFormatError(f"{path}: unreadable mask: {e}") from None


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(M, H, W) bool -> (M, 4) float32 tight XYWH boxes (pycocotools' ``toBbox``; zeros for an empty mask)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    rows, cols = masks.any(2), masks.any(1)
    for i in range(len(masks)):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if ys.size:
            boxes[i] = xs[0], ys[0], xs[-1] - xs[0] + 1, ys[-1] - ys[0] + 1
    return boxes
