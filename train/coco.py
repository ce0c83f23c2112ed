"""COCO instances files as training data, and writing masks as one.

source = CocoSource("annotations/instances_train2017.json", "train2017")
record = source[0]    # the sam_jax.train.sa1b.load_record format, or None (see RecordSource)
write_coco(records, "out/instances.json")    # images written beside it, masks as compressed RLE

* :class:`CocoSource` is a grain ``RandomAccessDataSource``: one record per image with at
  least one usable annotation, its masks in annotation order, ``categories`` the category
  names. The three segmentation forms of real COCO files are read exactly as pycocotools'
  ``COCO.annToMask`` reads them: polygons of one or several parts (``frPyObjects`` +
  ``merge``), uncompressed RLE (``counts`` a list, the crowd annotations) and compressed RLE
  (``counts`` a string). Crowd annotations are left out unless ``include_crowd``.
  Opening indexes the annotations per image without decoding any mask (a large file opens
  as fast as its JSON parses); a record's masks are RLEs, decoded when they are used.
* :func:`write_coco` writes an SA-1B-layout folder, or ``(image, masks)`` pairs, as a COCO
  instances file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam_jax.files import FileFormatError, read_image, read_json, write_atomic, write_json
from sam_jax.train.sa1b import DataError, RleMasks, checked_rle, list_records, parse_counts
from sam_jax.train.sources import RecordSource

COCO_KEYS = ("images", "annotations", "categories")

# Why an annotation or image is left out (the keys of CocoSource.skipped).
# Found when the file is opened:
CROWD = "crowd annotation (include_crowd=False)"
UNKNOWN_IMAGE = "annotation of an unknown image id"
UNKNOWN_CATEGORY = "annotation of an unknown category id"
NO_SEGMENTATION = "annotation without segmentation (bbox only)"
SHORT_POLYGON = "polygon with fewer than 3 points"
RLE_SIZE = "RLE size differs from the image's"
MALFORMED_ANNOTATION = "malformed annotation"
MALFORMED_IMAGE = "malformed image entry"
DUPLICATE_IMAGE = "duplicate image id"
NO_ANNOTATIONS = "image without usable annotations"
# Found when a record is read:
IMAGE_UNREADABLE = "image missing or unreadable"
IMAGE_SIZE = "image size differs from the JSON's"
BROKEN_RLE = "broken RLE"
EMPTY_MASK = "zero-area or out-of-image mask"
NO_MASKS = "image without usable masks"


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class CocoSource(RecordSource):
    """A grain ``RandomAccessDataSource`` over the images of a COCO instances file.

    ``source[i]`` is the ``i``-th usable image (in the file's order) as ``{"image": (H, W, 3)
    uint8, "masks": (M, H, W) bool as an :class:`~sam_jax.train.sa1b.RleMasks` (decoded on demand),
    "categories": [name] * M, "boxes": (M, 4) float32 XYWH
    (the tight boxes of the decoded masks), "path": str}``, or ``None`` when its image file is
    missing, unreadable or of another size than the JSON says, or none of its masks decodes to
    a non-empty mask (warned about once per file; see :class:`RecordSource` for ``skipped``
    and ``num_skipped``).

    Images are found as ``images_dir / file_name`` (default: the JSON's folder). Raises
    :class:`DataError` (one line, naming the file) for a file that is not COCO instances, a
    malformed category list, or no usable image (the message counts what was left out, per
    reason).

    Polygon parts with fewer than 3 points are dropped (an annotation left with none is
    skipped); an odd number of coordinates is malformed.
    """

    def __init__(
        self,
        json_path: str | Path,
        images_dir: str | Path | None = None,
        *,
        include_crowd: bool = False,
        cache: bool = False,
    ):
        super().__init__(cache)
        self.json_path = self.root = Path(json_path)
        self.images_dir = self.json_path.parent if images_dir is None else Path(images_dir)
        self.include_crowd = include_crowd
        try:
            data = read_json(self.json_path)
        except FileFormatError as e:
            raise DataError(str(e)) from None
        _check_coco_keys(data, self.json_path)
        names = _category_names(data["categories"], self.json_path)

        images: dict[Any, tuple[str, int, int]] = {}
        order: list[Any] = []
        for entry in data["images"]:
            parsed = _image_entry(entry)
            if parsed is None:
                self._count(MALFORMED_IMAGE)
            elif parsed[0] in images:
                self._count(DUPLICATE_IMAGE)
            else:
                images[parsed[0]] = parsed[1:]
                order.append(parsed[0])

        per_image: dict[Any, list[tuple[Any, str, Any]]] = {}
        for k, ann in enumerate(data["annotations"]):
            try:
                image_id, entry = self._index_annotation(k, ann, images, names)
            except _Skip as s:
                self._count(s.reason)
                continue
            per_image.setdefault(image_id, []).append(entry)

        self.image_ids = [i for i in order if i in per_image]
        self._count(NO_ANNOTATIONS, len(order) - len(self.image_ids))
        self._images = [images[i] for i in self.image_ids]
        self._annotations = [per_image[i] for i in self.image_ids]
        if not self.image_ids:
            raise self._empty_error("images")

    def _index_annotation(self, k: int, ann: Any, images: dict, names: dict) -> tuple[Any, tuple[Any, str, Any]]:
        """(image id, (annotation id, category name, segmentation)) of a usable annotation, or _Skip."""
        if not isinstance(ann, dict):
            raise _Skip(MALFORMED_ANNOTATION, "not an object")
        image_id = ann.get("image_id")
        if not _hashable(image_id) or image_id not in images:
            raise _Skip(UNKNOWN_IMAGE, str(image_id))
        if ann.get("iscrowd") and not self.include_crowd:
            raise _Skip(CROWD, "")
        category = ann.get("category_id")
        if not _hashable(category) or category not in names:
            raise _Skip(UNKNOWN_CATEGORY, str(category))
        seg = ann.get("segmentation")
        if seg is None or (isinstance(seg, (list, dict)) and not seg):
            raise _Skip(NO_SEGMENTATION, "")
        _, h, w = images[image_id]
        if isinstance(seg, list):
            if all(isinstance(v, Real) for v in seg):
                seg = [seg]  # one part written flat
            if not all(isinstance(p, list) for p in seg) or any(len(p) % 2 for p in seg):
                raise _Skip(MALFORMED_ANNOTATION, "polygon parts are not lists of x, y pairs")
            seg = [p for p in seg if len(p) >= 6]
            if not seg:
                raise _Skip(SHORT_POLYGON, "")
        elif isinstance(seg, dict):
            size, counts = seg.get("size"), seg.get("counts")
            if not isinstance(counts, (list, str)) or not isinstance(size, list) or len(size) != 2:
                raise _Skip(MALFORMED_ANNOTATION, "RLE without size or counts")
            if size != [h, w]:
                raise _Skip(RLE_SIZE, f"{size} vs {[h, w]}")
        else:
            raise _Skip(MALFORMED_ANNOTATION, f"segmentation is {type(seg).__name__}")
        return image_id, (ann.get("id", f"#{k}"), names[category], seg)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _load(self, index: int) -> dict[str, Any] | None:
        file_name, h, w = self._images[index]
        path = self.images_dir / file_name
        try:
            image = read_image(path)
        except FileFormatError as e:
            self._skip(IMAGE_UNREADABLE, str(path), str(e))
            return None
        if image.shape[:2] != (h, w):
            self._skip(
                IMAGE_SIZE, str(path), f"{path} is {image.shape[0]}x{image.shape[1]}, {self.json_path} says {h}x{w}"
            )
            return None
        rles, runs, categories = [], [], []
        for ann_id, name, seg in self._annotations[index]:
            key = f"{self.json_path}: annotation {ann_id}"
            try:
                rle, mask_runs = _to_rle(seg, h, w, key)
            except _Skip as s:
                self._skip(s.reason, key, str(s))
                continue
            if not mask_runs[1::2].any():
                self._skip(EMPTY_MASK, key, f"{key} (image {file_name})")
                continue
            rles.append(rle)
            runs.append(mask_runs)
            categories.append(name)
        if not rles:
            self._skip(NO_MASKS, str(path), str(path))
            return None
        return {
            "image": image,
            "masks": RleMasks(runs, h, w),
            "categories": categories,
            "boxes": mask_utils.toBbox(rles).astype(np.float32).reshape(len(rles), 4),
            "path": str(path),
        }

    def __repr__(self) -> str:
        return f"CocoSource(json_path={str(self.json_path)!r}, images_dir={str(self.images_dir)!r}, images={len(self)})"


def _check_coco_keys(data: dict, path: Path) -> None:
    missing = [k for k in COCO_KEYS if k not in data]
    if missing:
        hint = " (it looks like one SA-1B record: pass its folder)" if "image" in data and "images" not in data else ""
        raise DataError(f"{path}: not a COCO instances file: no {', '.join(repr(k) for k in missing)}{hint}")
    for k in COCO_KEYS:
        if not isinstance(data[k], list):
            raise DataError(f"{path}: not a COCO instances file: {k!r} is {type(data[k]).__name__}, not a list")


def _category_names(categories: list, path: Path) -> dict[Any, str]:
    names: dict[Any, str] = {}
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c or not _hashable(c["id"]) or not isinstance(c.get("name"), str):
            raise DataError(f"{path}: categories[{i}] is not an object with an id and a name")
        if c["id"] in names:
            raise DataError(f"{path}: category id {c['id']!r} appears twice in 'categories'")
        names[c["id"]] = c["name"]
    return names


def _image_entry(entry: Any) -> tuple[Any, str, int, int] | None:
    """(id, file_name, height, width) of a well-formed ``images`` entry, else None."""
    if not isinstance(entry, dict) or not _hashable(entry.get("id")) or entry.get("id") is None:
        return None
    file_name, h, w = entry.get("file_name"), entry.get("height"), entry.get("width")
    if not isinstance(file_name, str) or not file_name:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        return None
    return entry["id"], file_name, h, w


def _hashable(v: Any) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _to_rle(seg: Any, h: int, w: int, where: str) -> tuple[dict, np.ndarray]:
    """The RLE of an indexed segmentation, as ``COCO.annToRLE`` makes it, and its run lengths
    (R,) int64 (:class:`RleMasks`), or _Skip."""
    if isinstance(seg, list):  # polygon parts, each >= 3 points (checked when indexed)
        for part in seg:
            try:
                xy = np.asarray(part, np.float64)
            except (TypeError, ValueError):
                raise _Skip(MALFORMED_ANNOTATION, f"{where}: polygon coordinates are not numbers") from None
            if not np.isfinite(xy).all():
                raise _Skip(MALFORMED_ANNOTATION, f"{where}: polygon coordinates are not finite")
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        return rle, parse_counts(rle["counts"], where)
    try:  # uncompressed or compressed RLE, its size checked when indexed
        return checked_rle(seg, h, w, where)
    except DataError as e:
        raise _Skip(BROKEN_RLE, str(e)) from None


# --------------------------------------------------------------------------- writing


def write_coco(
    data: str | os.PathLike | Iterable[Any],
    json_path: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    categories: Sequence[str] = (),
    image_suffix: str = ".jpg",
) -> Path:
    """Write ``data`` as a COCO instances file at ``json_path`` (atomically); returns its path.

    ``data`` is either

    * an SA-1B-layout folder (``NAME.jpg`` + ``NAME.json``): its images stay where they are
      (``file_name`` relative to ``images_dir``) and its RLEs are copied; or
    * an iterable of records: ``(image, masks)``, ``(image, masks, categories)`` or dicts with
      ``image``, ``masks`` and optionally ``categories`` and ``file_name`` (or ``path``, whose
      stem names the file). ``image`` is (H, W, 3) uint8, ``masks`` (M, H, W) bool. Each image
      is written into ``images_dir`` (as ``file_name``, else ``NAME`` + ``image_suffix``:
      ``.jpg`` at quality 95 or ``.png``).

    ``images_dir`` defaults to the JSON's folder (where :class:`CocoSource` looks). Masks are
    written as compressed RLE with ``area`` and ``bbox``, ``iscrowd`` 0; empty masks are left
    out. Category ids count from 1, first the names in ``categories``, then the other names in
    the order met; a mask without a name (``""``) gets the category ``"object"``.
    """
    json_path = Path(json_path)
    images_dir = json_path.parent if images_dir is None else Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    category_ids: dict[str, int] = {}

    def category_id(name: str) -> int:
        return category_ids.setdefault(str(name) or "object", len(category_ids) + 1)

    for name in categories:
        category_id(name)
    images: list[dict] = []
    annotations: list[dict] = []

    def add(file_name: str, h: int, w: int, rles: list[dict], names: Sequence[str]) -> None:
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "height": int(h), "width": int(w)})
        areas = mask_utils.area(rles) if rles else []
        boxes = mask_utils.toBbox(rles) if rles else []
        for rle, area, box, name in zip(rles, areas, boxes, names):
            if area == 0:
                continue
            counts = rle["counts"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id(name),
                    "segmentation": {
                        "size": [int(h), int(w)],
                        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                    },
                    "area": int(area),
                    "bbox": [float(v) for v in box],
                    "iscrowd": 0,
                }
            )

    if isinstance(data, (str, os.PathLike)):
        for image_path, record_path in list_records(data):
            h, w, rles, names = _sa1b_annotations(image_path, record_path)
            add(Path(os.path.relpath(image_path, images_dir)).as_posix(), h, w, rles, names)
    else:
        if image_suffix.lower() not in (".jpg", ".jpeg", ".png"):
            raise ValueError(f"image_suffix must be .jpg, .jpeg or .png, not {image_suffix!r}")
        used: set[str] = set()
        for i, item in enumerate(data):
            image, masks, names, file_name = _record_parts(item, i, image_suffix)
            if file_name in used:
                raise ValueError(f"records: two images named {file_name!r}")
            used.add(file_name)
            _write_image(images_dir / file_name, image)
            h, w = image.shape[:2]
            rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))) if len(masks) else []
            add(file_name, h, w, rles, names)

    coco = {
        "info": {"description": "written by sam-jax (sam_jax.train.coco.write_coco)", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in category_ids.items()],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(json_path, coco)


def _sa1b_annotations(image_path: Path, record_path: Path) -> tuple[int, int, list[dict], list[str]]:
    """(height, width, checked RLEs, category names) of an SA-1B record, without decoding its image."""
    from PIL import Image

    record = read_json(record_path)
    info = record.get("image")
    if isinstance(info, dict) and "height" in info and "width" in info:
        h, w = int(info["height"]), int(info["width"])
    else:
        try:
            with Image.open(image_path) as img:
                w, h = img.size
        except OSError as e:
            raise DataError(f"{image_path}: unreadable image: {e}") from None
    try:
        anns = record["annotations"]
        rles = [checked_rle(a["segmentation"], h, w, f"{record_path}: annotation {i}")[0] for i, a in enumerate(anns)]
        names = [str(a.get("category", "")) for a in anns]
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{record_path}: malformed record: {e!r}") from None
    return h, w, rles, names


def _record_parts(item: Any, i: int, suffix: str) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    if isinstance(item, dict):
        image, masks, names = item.get("image"), item.get("masks"), item.get("categories")
        file_name = item.get("file_name") or (Path(item["path"]).stem + suffix if item.get("path") else None)
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        image, masks, names = item[0], item[1], (item[2] if len(item) == 3 else None)
        file_name = None
    else:
        raise ValueError(f"records[{i}]: expected (image, masks[, categories]) or a dict, got {type(item).__name__}")
    image, masks = np.asarray(image), np.asarray(masks)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"records[{i}]: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"records[{i}]: masks must be (M, {image.shape[0]}, {image.shape[1]}), got {masks.shape}")
    names = [""] * len(masks) if names is None else [str(n) for n in names]
    if len(names) != len(masks):
        raise ValueError(f"records[{i}]: {len(names)} categories for {len(masks)} masks")
    return image, masks.astype(bool), names, file_name or f"{i:06d}{suffix}"


def _write_image(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    suffix = path.suffix.lower()
    if suffix not in (".jpg", ".jpeg", ".png"):
        raise ValueError(f"{path.name}: images are written as .jpg, .jpeg or .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        write_atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    else:
        write_atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format="JPEG", quality=95))
