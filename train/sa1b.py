"""Reading SA-1B-layout folders: ``NAME.jpg`` + ``NAME.json`` pairs, COCO RLE masks.

* :func:`list_records` pairs the images and JSON files of a folder.
* :func:`load_record` decodes one pair into numpy arrays, raising :class:`DataError`
  (naming the file) on anything corrupt.
* :class:`RleMasks` holds a record's masks as RLE runs and decodes only the masks, and the
  pixels, that are asked for (what the sources read: a training example uses 64 of an SA-1B
  image's ~100 masks, at the model's resolution).
* :class:`SA1BSource` is a grain ``RandomAccessDataSource`` over a folder; a corrupt record
  reads as ``None`` (with one warning per file) instead of stopping training.
* :func:`make_dataset` is the grain pipeline: a deterministic per-seed shuffle (reshuffled
  each epoch), sharded by process, ``None`` records dropped, and a checkpointable iterator
  (``it.get_state()`` / ``it.set_state(state)``). Elements are the raw dicts of
  :func:`load_record` (masks as :class:`RleMasks`); resizing and batching belong to the
  model-specific preprocessing.

Uses grain's dataset API (grain >= 0.2.x): ``grain.MapDataset.source(...).shuffle(seed)
[shard::count].repeat(epochs).to_iter_dataset(grain.ReadOptions(...))``.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam_jax.files import IMAGE_SUFFIXES, FileFormatError, read_image, read_json


class DataError(FileFormatError):
    """A record (image or JSON) of the data set is unreadable or inconsistent."""


# --------------------------------------------------------------------------- files


def list_records(root: str | Path) -> list[tuple[Path, Path]]:
    """The ``(image, json)`` pairs of the folder ``root`` (not recursive), sorted by name.

    An image is paired with the JSON file of the same stem; images without one (and JSON
    files without an image) are left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    jsons = {p.stem: p for p in root.iterdir() if p.suffix.lower() == ".json" and p.is_file()}
    pairs = [
        (p, jsons[p.stem])
        for p in root.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.stem in jsons
    ]
    return sorted(pairs, key=lambda pair: pair[0].name)


def load_record(image_path: str | Path, json_path: str | Path, *, decode_masks: bool = True) -> dict[str, Any]:
    """Decode one SA-1B record.

    Returns ``{"image": (H, W, 3) uint8, "masks": (M, H, W) bool, "categories": [str] * M
    ("" where an annotation has none), "boxes": (M, 4) float32 XYWH, "path": str}``. The masks
    are decoded column-major per mask, as RLEs are (``masks[i].T`` is C-contiguous); with
    ``decode_masks=False`` they are an :class:`RleMasks` (decoded on demand; what the training
    sources read) instead of an array.

    Raises :class:`DataError` naming the file for an unreadable or corrupt image, unreadable
    JSON, missing keys, a broken RLE, or a mask whose size differs from the image's.
    """
    image_path, json_path = Path(image_path), Path(json_path)
    try:
        image = read_image(image_path)
        data = read_json(json_path)
    except FileFormatError as e:
        raise DataError(str(e)) from None
    h, w = image.shape[:2]

    try:
        anns = data["annotations"]
        if not isinstance(anns, list):
            raise TypeError("'annotations' is not a list")
        info = data.get("image")
        if (
            isinstance(info, dict)
            and "height" in info
            and "width" in info
            and (int(info["height"]), int(info["width"])) != (h, w)
        ):
            raise DataError(
                f"{json_path}: says the image is {info['height']}x{info['width']}, but {image_path.name} is {h}x{w}"
            )
        rles, runs, categories, boxes = [], [], [], []
        for i, ann in enumerate(anns):
            rle, r = checked_rle(ann["segmentation"], h, w, f"{json_path}: annotation {i}")
            rles.append(rle)
            runs.append(r)
            categories.append(str(ann.get("category", "")))
            boxes.append(ann.get("bbox"))
    except DataError:
        raise
    except KeyError as e:
        raise DataError(f"{json_path}: missing key {e}") from e
    except (TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{json_path}: malformed record: {e}") from e

    masks = RleMasks(runs, h, w)
    if decode_masks:
        masks = np.asarray(masks)

    if any(b is None for b in boxes):
        computed = mask_utils.toBbox(rles) if rles else np.zeros((0, 4))
        boxes = [computed[i] if b is None else b for i, b in enumerate(boxes)]
    try:
        boxes_arr = np.asarray(boxes, np.float32).reshape(len(rles), 4)
    except (TypeError, ValueError) as e:
        raise DataError(f"{json_path}: malformed bbox: {e}") from e
    return {
        "image": image,
        "masks": masks,
        "categories": categories,
        "boxes": boxes_arr,
        "path": str(image_path),
    }


def checked_rle(seg: dict, h: int, w: int, where: str) -> tuple[dict, np.ndarray]:
    """(a compressed RLE that pycocotools can decode safely, its run lengths (R,) int64), or
    :class:`DataError`. `seg` is a COCO segmentation in RLE form (compressed or not) of an h x w
    image; `where` names it in the error.

    pycocotools' C decoder trusts its input (counts summing past ``h * w`` write past the
    buffer; a string ending mid-number reads past it), so the counts are parsed and checked
    here first.
    """
    size = [int(v) for v in seg["size"]]
    if size != [h, w]:
        raise DataError(f"{where}: mask size {size} differs from the image's {[h, w]}")
    counts = seg["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        runs = np.asarray(counts)
        if runs.ndim != 1 or (runs.size and not np.issubdtype(runs.dtype, np.integer)):
            raise DataError(f"{where}: broken RLE: counts are not integers")
        runs = runs.astype(np.int64)
        _check_runs(runs, h, w, where)
        return mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w), runs
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: broken RLE: bad character in counts") from e
    if not isinstance(counts, bytes):
        raise DataError(f"{where}: broken RLE: counts are {type(counts).__name__}")
    runs = parse_counts(counts, where)
    _check_runs(runs, h, w, where)
    return {"size": [h, w], "counts": counts}, runs


def parse_counts(s: bytes, where: str) -> np.ndarray:
    """Run lengths of a COCO compressed RLE string (pycocotools' ``rleFrString``, vectorised)."""
    b = np.frombuffer(s, np.uint8).astype(np.int64) - 48
    if b.size == 0:
        return np.zeros(0, np.int64)
    if np.any((b < 0) | (b > 63)):
        raise DataError(f"{where}: broken RLE: bad character in counts")
    more = (b & 0x20) != 0
    if more[-1]:
        raise DataError(f"{where}: broken RLE: counts end mid-number")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    group = np.repeat(np.arange(len(ends)), ends - starts + 1)
    pos = np.arange(b.size) - starts[group]
    if pos.max() > 11:
        raise DataError(f"{where}: broken RLE: number too long")
    x = np.add.reduceat((b & 0x1F) << (5 * pos), starts)
    nbits = 5 * (pos[ends] + 1)
    x = np.where((b[ends] & 0x10) != 0, x - (np.int64(1) << nbits), x)  # sign-extend
    # Delta coding: from the fourth on, each count is stored relative to the one two back.
    runs = x.copy()
    runs[1::2] = np.cumsum(x[1::2])
    runs[2::2] = np.cumsum(x[2::2])
    return runs


def _check_runs(runs: np.ndarray, h: int, w: int, where: str) -> None:
    if runs.size and (runs.min() < 0 or runs.max() >= 2**32):
        raise DataError(f"{where}: broken RLE: run length out of range")
    total = int(runs.sum()) if runs.size else 0
    if total != h * w:
        raise DataError(f"{where}: broken RLE: runs cover {total} pixels, the image has {h * w}")


# --------------------------------------------------------------------------- masks


class RleMasks:
    """(M, H, W) bool masks held as their COCO RLE run lengths, decoded on demand.

    The training sources read masks in this form: a record's masks cost a few kB each instead
    of H * W bytes, and only the masks (and pixels) that are used get decoded.

    * ``len(masks)``, ``masks.shape`` (M, H, W), ``masks.dtype`` (bool) and ``masks.areas``
      (M,) int64, each mask's pixel count (pycocotools' ``area``), without decoding;
    * ``masks[i]`` -> (H, W) bool; ``masks[indices]`` (a slice, an integer or boolean array)
      -> (n, H, W) bool; ``np.asarray(masks)`` -> all of them, (M, H, W) bool; iterating gives
      the masks one at a time;
    * ``masks.sample(indices, rows, cols)`` -> (n, h, w) bool, ``masks[indices][:, rows][:, :,
      cols]`` read from the runs at those pixels alone (the nearest-neighbour resize of
      :func:`sam_jax.train.data.resize_masks`).

    Every array returned is a fresh (writable) one; the container itself is immutable, so a
    record cache can share it. ``runs``: one (R_i,) array per mask, COCO's run lengths in
    column-major order starting with a run of zeros, each summing to ``H * W`` (checked by the
    readers, :func:`load_record` and the COCO source; trusted here).
    """

    dtype = np.dtype(bool)
    ndim = 3

    def __init__(self, runs: list[np.ndarray], h: int, w: int):
        self._runs = [np.asarray(r, np.uint32) for r in runs]
        for r in self._runs:
            r.flags.writeable = False
        self.shape = (len(self._runs), int(h), int(w))
        self.areas = np.array([int(r[1::2].sum(dtype=np.int64)) for r in self._runs], np.int64)
        self.areas.flags.writeable = False

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"RleMasks(shape={self.shape})"

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):
            raise TypeError("RleMasks takes one index over its masks: an int, a slice or an index array")
        if isinstance(index, (int, np.integer)):
            return self._decode([range(len(self))[index]])[0]
        return self._decode(np.arange(len(self))[index])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        masks = self._decode(range(len(self)))
        return masks if dtype is None else masks.astype(dtype)

    def _decode(self, indices) -> np.ndarray:
        """Mask indices (n,) -> (n, H, W) bool, every pixel: column-major per mask, as the runs
        are (``out[k].T`` is C-contiguous), so decoding is one ``np.repeat``."""
        _, h, w = self.shape
        runs = [self._runs[int(i)] for i in indices]
        if not runs:
            return np.zeros((0, h, w), bool)
        values = np.concatenate([np.arange(len(r)) % 2 == 1 for r in runs])  # zeros first, then alternating
        return np.repeat(values, np.concatenate(runs)).reshape(len(runs), w, h).transpose(0, 2, 1)

    def sample(self, indices, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Mask indices (n,), rows (h,) in [0, H) and cols (w,) in [0, W) -> (n, h, w) bool,
        ``masks[indices][:, rows][:, :, cols]``, decoding only those pixels (a transposed view of
        a C-contiguous (n, w, h) array when rows and cols repeat no pixel)."""
        _, h_full, _ = self.shape
        uy, y_of = np.unique(np.asarray(rows, np.int64), return_inverse=True)
        ux, x_of = np.unique(np.asarray(cols, np.int64), return_inverse=True)
        # The sampled pixels' column-major positions, increasing: run k, [end_k-1, end_k), holds
        # searchsorted(end_k) - searchsorted(end_k-1) of them.
        positions = (ux[:, None] * h_full + uy[None, :]).reshape(-1)
        runs = [self._runs[int(i)] for i in np.asarray(indices, np.int64).reshape(-1)]
        if not runs:
            return np.zeros((0, len(rows), len(cols)), bool)
        values = np.concatenate([np.arange(len(r)) % 2 == 1 for r in runs])
        taken = np.concatenate(
            [np.diff(np.searchsorted(positions, np.cumsum(r, dtype=np.int64)), prepend=0) for r in runs]
        )
        out = np.repeat(values, taken).reshape(len(runs), len(ux), len(uy)).transpose(0, 2, 1)
        if len(uy) != len(rows):
            out = out[:, y_of]
        if len(ux) != len(cols):
            out = out[:, :, x_of]
        return out


def mask_areas(masks: np.ndarray | RleMasks) -> np.ndarray:
    """(M, H, W) bool masks (an array or :class:`RleMasks`) -> (M,) int64 pixel counts."""
    if isinstance(masks, RleMasks):
        return masks.areas.copy()
    masks = np.asarray(masks, bool)
    return masks.reshape(len(masks), -1).sum(1)


# --------------------------------------------------------------------------- grain


class RecordSource:
    """The shared half of the user-data sources: read-time skips, the record cache, pickling.

    A subclass sets ``root`` and implements ``__len__`` and ``_load(index)``, which returns a
    record or ``None`` after calling :meth:`_skip` for each part it leaves out.

    ``skipped`` counts what was left out, per reason: the reasons known when the source is
    opened (malformed entries, images without masks, ...) from construction on, those found
    when a record is read (a missing image file, an empty mask, ...) once per file or
    annotation as they are met (process-local: with grain worker processes each worker counts
    its own). ``num_skipped`` counts every read that returned ``None``, as in ``SA1BSource``.
    """

    root: Path

    def __init__(self, cache: bool = False):
        self.cache = cache
        self.skipped: dict[str, int] = {}
        self.num_skipped = 0
        self._seen: set[tuple[str, str]] = set()
        self._cached: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> dict[str, Any] | None:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if index in self._cached:
            return self._cached[index]
        record = self._load(index)
        if record is None:
            with self._lock:
                self.num_skipped += 1
            return None
        if self.cache:
            for v in record.values():
                if isinstance(v, np.ndarray):
                    v.flags.writeable = False  # shared by every later read
            self._cached[index] = record
        return record

    def _count(self, reason: str, n: int = 1) -> None:
        """Count ``n`` static skips (found when the source is opened)."""
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def _skip(self, reason: str, key: str, message: str) -> None:
        """A read-time skip of ``key`` (a file or an annotation): counted and warned about once."""
        with self._lock:
            first = (reason, key) not in self._seen
            if first:
                self._seen.add((reason, key))
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if first:
            warnings.warn(f"skipping {reason}: {message}", RuntimeWarning, stacklevel=4)

    def _empty_error(self, what: str) -> DataError:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
        return DataError(f"{self.root}: no usable {what}" + (f" (left out: {counts})" if counts else ""))

    # Picklable for grain's worker processes (a lock is not).
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_cached"] = {}  # each worker process fills its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class SA1BSource(RecordSource):
    """A grain ``RandomAccessDataSource`` over the records of an SA-1B-layout folder.

    ``source[i]`` is :func:`load_record` of the ``i``-th pair of :func:`list_records` with
    its masks as :class:`RleMasks` (``decode_masks=False``: only the masks a consumer uses are
    decoded), or ``None`` when that record is corrupt: a warning names the file (once per file
    and process), ``skipped["corrupt record"]`` counts the files and ``num_skipped`` every skip.

    ``cache=True`` keeps each read record in memory after its first read (read-only arrays,
    the masks as their RLE runs), so later epochs skip the JPEG decoding and the JSON parsing:
    for data sets that fit in memory (a decoded image plus a few kB per mask), where the
    decoding would take the host cores from the training step. Corrupt records are not cached
    (each read counts).
    """

    def __init__(self, root: str | Path, cache: bool = False):
        super().__init__(cache)
        self.root = Path(root)
        self.records = list_records(self.root)

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> dict[str, Any] | None:
        image_path, json_path = self.records[index]
        try:
            return load_record(image_path, json_path, decode_masks=False)
        except DataError as e:
            self._skip("corrupt record", str(image_path), f"{image_path.name}: {e}")
            return None

    def __repr__(self) -> str:
        return f"SA1BSource(root={str(self.root)!r}, records={len(self.records)})"


def make_map_dataset(
    root: str | os.PathLike | SA1BSource,
    *,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
):
    """The random-access half of :func:`make_dataset` (a ``grain.MapDataset``).

    Elements may be ``None`` (corrupt records); insert per-element work here with
    ``.map`` / ``.random_map`` (grain passes ``None`` through untouched) so that it runs in
    the read threads, then call ``.to_iter_dataset(...)``, which drops the ``None`` s.
    """
    import grain

    # A folder, or any random-access source (SA1BSource, sam_jax.train.sources.open_source).
    source = SA1BSource(root) if isinstance(root, (str, os.PathLike)) else root
    if len(source) == 0:
        raise ValueError(f"no (image, json) records in {source.root}")
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if shard_count > len(source):
        raise ValueError(f"{shard_count} shards but only {len(source)} records in {source.root}")
    # Shuffle globally, then shard: the shards of one epoch are disjoint and cover the data
    # (each shard gets len // count or one more). Repeating reshuffles each epoch, the same
    # way in every process (the epoch is folded into the shuffle seed).
    ds = grain.MapDataset.source(source).shuffle(seed=int(seed))
    ds = ds[shard_index::shard_count]
    return ds.repeat(num_epochs)


def make_dataset(
    root: str | Path | SA1BSource,
    *,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    num_threads: int = 4,
    prefetch_buffer_size: int = 8,
):
    """A grain ``IterDataset`` of this process's records of ``root``: raw :func:`load_record` dicts.

    * deterministic for ``seed``; each epoch is reshuffled (deterministically);
    * sharded: process ``shard_index`` of ``shard_count`` (default: ``jax.process_index()``
      of ``jax.process_count()``) reads every ``shard_count``-th record of the shuffled
      order, so the shards of an epoch are disjoint and cover the data set;
    * ``num_epochs=None`` repeats forever;
    * corrupt records (``None`` from :class:`SA1BSource`) are dropped;
    * ``it = iter(ds)`` is checkpointable: ``state = it.get_state()`` (a small dict) and
      later ``it.set_state(state)`` on a fresh iterator of the same pipeline gives exactly
      the same following elements.

    ``num_threads`` / ``prefetch_buffer_size`` are grain's ``ReadOptions``: a record holds
    its decoded full-size image (10 MB for SA-1B), so the buffer is kept small.
    """
    import grain

    ds = make_map_dataset(root, seed=seed, shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    return ds.to_iter_dataset(read, allow_nones=False)  # drops the None (corrupt) records
