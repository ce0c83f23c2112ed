"""The training data a user brings, recognised by what it is, as a grain random-access source.

source = open_source("annotations/instances_train.json")      # COCO instances  -> CocoSource
source = open_source("my_data")      # my_data/images/ + my_data/masks/        -> MaskFolderSource
source = open_source("sa1b_folder")  # NAME.jpg + NAME.json pairs (SA-1B)       -> SA1BSource

Every source reads records in the format of :func:`sam_jax.train.sa1b.load_record`:
``{"image": (H, W, 3) uint8, "masks": (M, H, W) bool, "categories": [str] * M, "boxes": (M, 4)
float32 XYWH, "path": str}``; ``source[i]`` is ``None`` for a record that cannot be read
(a warning once per file, counted in ``num_skipped``), so training goes on.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from sam_jax.train.sa1b import DataError

EXPECTED = (
    "expected a COCO instances .json file, a folder with images/ and masks/ subfolders, "
    "or a folder of NAME.jpg + NAME.json pairs (SA-1B layout)"
)


def open_source(
    path: str | Path,
    images_dir: str | Path | None = None,
    *,
    cache: bool = False,
    include_crowd: bool = False,
):
    """The random-access source of the data at ``path``:

    * a ``.json`` file: COCO instances (:class:`sam_jax.train.coco.CocoSource`; images under
      ``images_dir``, default the JSON's folder; crowd annotations only with ``include_crowd``);
    * a folder with ``images/`` and ``masks/``: :class:`sam_jax.train.mask_folder.MaskFolderSource`;
    * a folder of ``NAME.jpg`` + ``NAME.json`` pairs: :class:`sam_jax.train.sa1b.SA1BSource`.

    ``cache=True`` keeps decoded records in memory (for data sets that fit). Anything else
    raises :class:`DataError` with a one-line message saying what was expected.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise DataError(f"{path}: not a data set: {EXPECTED}")
        from sam_jax.train.coco import CocoSource

        return CocoSource(path, images_dir, include_crowd=include_crowd, cache=cache)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; {EXPECTED}")
    if not path.is_dir():
        raise DataError(f"{path}: not a data set: {EXPECTED}")
    if images_dir is not None:
        raise DataError(f"{path}: images_dir applies to a COCO .json file only, not to a folder")
    if (path / "images").is_dir() and (path / "masks").is_dir():
        from sam_jax.train.mask_folder import MaskFolderSource

        return MaskFolderSource(path, cache=cache)
    from sam_jax.train.sa1b import SA1BSource, list_records

    if list_records(path):
        return SA1BSource(path, cache=cache)
    jsons = sorted(p.name for p in path.glob("*.json"))
    hint = f" (it holds {jsons[0]}: pass a COCO file itself)" if len(jsons) == 1 else ""
    if (path / "images").is_dir() != (path / "masks").is_dir():
        have, lack = ("images", "masks") if (path / "images").is_dir() else ("masks", "images")
        hint = f" (it has {have}/ but no {lack}/)"
    raise DataError(f"{path}: no data set recognised{hint}; {EXPECTED}")


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
