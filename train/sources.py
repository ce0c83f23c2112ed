"""The training data a user brings, recognised by what it is, as a grain random-access source.

source = open_source("annotations/instances_train.json")      # COCO instances  -> CocoSource
source = open_source("my_data")      # my_data/images/ + my_data/masks/        -> MaskFolderSource
source = open_source("sa1b_folder")  # NAME.jpg + NAME.json pairs (SA-1B)       -> SA1BSource

Every source reads records in the format of :func:`sam_jax.train.sa1b.load_record`:
``{"image": (H, W, 3) uint8, "masks": (M, H, W) bool, "categories": [str] * M, "boxes": (M, 4)
float32 XYWH, "path": str}``, the masks of SA-1B and COCO records as an
:class:`~sam_jax.train.sa1b.RleMasks` (an (M, H, W) bool container decoded on demand:
``np.asarray`` decodes all, ``mask_areas`` none). ``source[i]`` is ``None`` for a record that
cannot be read (a warning once per file, counted in ``num_skipped``), so training goes on.
"""

from __future__ import annotations

from pathlib import Path

from sam_jax.train.sa1b import DataError, RecordSource

__all__ = ["RecordSource", "open_source"]

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
