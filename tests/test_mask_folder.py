"""Folders of images and mask PNGs (sam_jax.train.mask_folder), and recognising a data set (sam_jax.train.sources)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_jax.train import mask_folder
from sam_jax.train.coco import CocoSource, write_coco
from sam_jax.train.mask_folder import MaskFolderSource, mask_boxes
from sam_jax.train.sa1b import DataError, SA1BSource
from sam_jax.train.sources import open_source

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 36, 48


def _image(rng, h=H, w=W) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _instances(ids: list[int], h=H, w=W) -> np.ndarray:
    """An id map with one rectangle per id, each in its own column band."""
    out = np.zeros((h, w), np.int64)
    band = w // max(len(ids), 1)
    for k, v in enumerate(ids):
        out[4 + k : h - 4, k * band + 1 : (k + 1) * band - 1] = v
    return out


def _folder(tmp_path) -> Path:
    """a: 8-bit id PNG, b: 16-bit id PNG (ids over 255), c: a folder of binary PNGs (one grey, one RGBA)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks" / "c").mkdir(parents=True)
    for name in "abc":
        Image.fromarray(_image(rng)).save(root / "images" / f"{name}.png")
    Image.fromarray(_instances([3, 1, 7]).astype(np.uint8)).save(root / "masks" / "a.png")
    Image.fromarray(_instances([300, 1000]).astype(np.uint16)).save(root / "masks" / "b.png")
    first = np.zeros((H, W), np.uint8)
    first[2:10, 3:20] = 255
    Image.fromarray(first).save(root / "masks" / "c" / "0.png")
    second = np.zeros((H, W, 4), np.uint8)
    second[..., 3] = 255  # opaque everywhere: alpha is no part of the mask
    second[20:30, 10:40, 0] = 1
    Image.fromarray(second, "RGBA").save(root / "masks" / "c" / "1.png")
    return root


def test_mask_folder_forms(tmp_path):
    root = _folder(tmp_path)
    assert Image.open(root / "masks" / "a.png").mode == "L" and Image.open(root / "masks" / "b.png").mode.startswith(
        "I"
    )
    source = MaskFolderSource(root)
    assert len(source) == 3 and source.skipped == {}
    a, b, c = source[0], source[1], source[2]
    ids_a = _instances([3, 1, 7])
    np.testing.assert_array_equal(a["masks"], np.stack([ids_a == v for v in (1, 3, 7)]))  # increasing id order
    ids_b = _instances([300, 1000])
    np.testing.assert_array_equal(b["masks"], np.stack([ids_b == 300, ids_b == 1000]))
    assert c["masks"].shape == (2, H, W)
    assert c["masks"][0].sum() == 8 * 17 and c["masks"][1].sum() == 10 * 30
    for record, name in zip((a, b, c), "abc"):
        assert record["image"].shape == (H, W, 3) and record["image"].dtype == np.uint8
        assert record["masks"].dtype == bool
        assert record["categories"] == [""] * len(record["masks"])
        assert record["path"] == str(root / "images" / f"{name}.png")
        assert record["boxes"].dtype == np.float32 and record["boxes"].shape == (len(record["masks"]), 4)
    np.testing.assert_array_equal(c["boxes"], [[3, 2, 17, 8], [10, 20, 30, 10]])
    clone = pickle.loads(pickle.dumps(MaskFolderSource(root, cache=True)))
    np.testing.assert_array_equal(clone[0]["masks"], a["masks"])


def test_mask_boxes_match_pycocotools():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(2)
    masks = rng.random((5, 20, 30)) < 0.05
    masks[3] = False
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    np.testing.assert_array_equal(mask_boxes(masks), mask_utils.toBbox(rles))


def test_mask_folder_skips(tmp_path):
    root = _folder(tmp_path)
    rng = np.random.default_rng(1)
    for name in ("d", "e", "f", "g", "h"):
        Image.fromarray(_image(rng)).save(root / "images" / f"{name}.png")
    # d: no masks at all; e: an empty mask folder; f: both forms; g: id PNG of another size; h: RGB id PNG
    (root / "masks" / "e").mkdir()
    Image.fromarray(_instances([1]).astype(np.uint8)).save(root / "masks" / "f.png")
    (root / "masks" / "f").mkdir()
    Image.fromarray(_instances([1], H + 1, W).astype(np.uint8)).save(root / "masks" / "g.png")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "masks" / "h.png")
    Image.fromarray(_instances([1]).astype(np.uint8)).save(root / "masks" / "orphan.png")
    # in the mask folder c: a mask of another size, an empty one and an unreadable one, each left out alone
    Image.fromarray(np.ones((H, W + 2), np.uint8)).save(root / "masks" / "c" / "2.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "masks" / "c" / "3.png")
    (root / "masks" / "c" / "4.png").write_bytes(b"broken")

    source = MaskFolderSource(root)
    assert [Path(p).stem for p, _ in source.records] == ["a", "b", "c", "g", "h"]
    assert source.skipped == {mask_folder.NO_MASKS: 2, mask_folder.AMBIGUOUS: 1, mask_folder.ORPHAN_MASKS: 1}
    with pytest.warns(RuntimeWarning) as caught:
        c = source[2]
        assert source[3] is None and source[4] is None
    assert c["masks"].shape == (2, H, W)
    messages = " | ".join(str(w.message) for w in caught)
    assert "g.png is 37x48, its image 36x48" in messages and "h.png is RGB" in messages
    assert source.skipped == {
        mask_folder.NO_MASKS: 2,
        mask_folder.AMBIGUOUS: 1,
        mask_folder.ORPHAN_MASKS: 1,
        mask_folder.MASK_SIZE: 2,
        mask_folder.EMPTY_MASK: 1,
        mask_folder.MASK_UNREADABLE: 1,
        mask_folder.NOT_INSTANCE_PNG: 1,
    }
    assert source.num_skipped == 2

    # an id PNG with no instance, an unreadable image: None
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "masks" / "a.png")
    (root / "images" / "b.png").write_bytes(b"broken")
    with pytest.warns(RuntimeWarning, match="image without masks.*a.png: its masks hold no instance"):
        assert source[0] is None
    with pytest.warns(RuntimeWarning, match=r"image missing or unreadable: .*b\.png: unreadable image"):
        assert source[1] is None
    assert source.skipped[mask_folder.NO_MASKS] == 3 and source.skipped[mask_folder.IMAGE_UNREADABLE] == 1


def test_mask_folder_errors(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="no masks/ folder"):
        MaskFolderSource(root)
    (root / "masks").mkdir()
    with pytest.raises(DataError, match="images: no images"):
        MaskFolderSource(root)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "images" / "a.jpg")
    with pytest.raises(DataError) as e:
        MaskFolderSource(root)
    assert str(e.value) == f"{root}: no usable images (left out: 1 image without masks)"


# --------------------------------------------------------------------------- open_source


def test_open_source_recognises_each_form(tmp_path):
    from sam_jax.train.shapes import make_shapes

    folder = _folder(tmp_path)
    assert isinstance(open_source(folder, cache=True), MaskFolderSource)
    make_shapes(tmp_path / "sa1b", 2, seed=0, image_size=(32, 48))
    sa1b = open_source(tmp_path / "sa1b")
    assert isinstance(sa1b, SA1BSource) and len(sa1b) == 2
    write_coco([(_image(np.random.default_rng(0)), _instances([1, 2])[None] == 1)], tmp_path / "coco" / "x.json")
    coco = open_source(tmp_path / "coco" / "x.json")
    assert isinstance(coco, CocoSource) and len(coco) == 1
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "coco" / "000000.jpg").rename(tmp_path / "elsewhere" / "000000.jpg")
    assert open_source(tmp_path / "coco" / "x.json", tmp_path / "elsewhere")[0] is not None


def test_open_source_errors(tmp_path):
    expected = "expected a COCO instances .json file, a folder with images/ and masks/"
    with pytest.raises(DataError, match=f"no such file or folder; {expected}"):
        open_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"empty: no data set recognised; {expected}"):
        open_source(tmp_path / "empty")
    (tmp_path / "half" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"it has images/ but no masks/"):
        open_source(tmp_path / "half")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "instances.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="holds instances.json: pass a COCO file itself"):
        open_source(tmp_path / "ann")
    with pytest.raises(DataError, match="not a COCO instances file: no 'annotations', 'categories'"):
        open_source(tmp_path / "ann" / "instances.json")
    (tmp_path / "photo.png").write_bytes(b"")
    with pytest.raises(DataError, match=f"photo.png: not a data set: {expected}"):
        open_source(tmp_path / "photo.png")
    with pytest.raises(DataError, match="images_dir applies to a COCO .json file only"):
        open_source(_folder(tmp_path), tmp_path)
