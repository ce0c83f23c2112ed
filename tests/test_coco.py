"""COCO instances files as training data (sam_jax.train.coco), against pycocotools' own decoding."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sam_jax.train import coco
from sam_jax.train.coco import CocoSource, write_coco
from sam_jax.train.sa1b import DataError, RleMasks, SA1BSource

# pycocotools 2.0.x under numpy 2 warns on every decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZES = {1: (48, 64), 2: (40, 50), 3: (32, 32), 4: (30, 30)}  # image id -> (height, width)


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def _uncompressed(mask: np.ndarray) -> dict:
    """A crowd annotation's RLE as COCO files hold it: counts a list, column-major, zeros first."""
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _ann(ann_id: int, image_id: int, category_id: int, seg, iscrowd: int = 0) -> dict:
    h, w = SIZES[image_id]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": seg,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": iscrowd,
    }


def _base_coco() -> dict:
    """Four images: two with polygons and RLEs, one with only a crowd annotation, one without any."""
    h2, w2 = SIZES[2]
    h3, w3 = SIZES[3]
    return {
        "info": {"description": "test set", "version": "1.0", "year": 2024, "date_created": "2024/01/01"},
        "licenses": [{"id": 1, "name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}],
        "images": [
            {"id": i, "file_name": f"img_{i}.png", "height": h, "width": w, "license": 1} for i, (h, w) in SIZES.items()
        ],
        "annotations": [
            _ann(10, 1, 1, [[10.5, 5.25, 40.75, 8.0, 30.2, 30.9, 12.4, 25.6]]),  # polygon
            _ann(11, 1, 2, [[2.0, 2.0, 12.5, 2.0, 12.5, 10.3, 2.0, 10.3], [50.5, 30.0, 60.0, 30.0, 55.2, 44.5]]),
            _ann(12, 1, 1, _compressed(_ellipse(*SIZES[1], 35, 20, 8, 12))),  # compressed RLE
            _ann(20, 2, 2, _uncompressed(_ellipse(h2, w2, 20, 25, 10, 15)), iscrowd=1),  # crowd: uncompressed RLE
            _ann(21, 2, 1, [[1.0, 1.0, 20.0, 1.0, 20.0, 15.0]]),
            _ann(30, 3, 2, _uncompressed(_ellipse(h3, w3, 16, 16, 5, 20)), iscrowd=1),
        ],
        "categories": [
            {"id": 1, "name": "cat", "supercategory": "animal"},
            {"id": 2, "name": "dog", "supercategory": "animal"},
        ],
    }


def _write(folder: Path, data: dict, *, images: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if images:
        for entry in data["images"]:
            if "height" not in entry:
                continue
            pixels = rng.integers(0, 256, (entry["height"], entry["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / entry["file_name"])
    path = folder / "instances.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco_file(tmp_path) -> Path:
    return _write(tmp_path / "coco", _base_coco())


def _mutated(tmp_path, mutate) -> Path:
    data = _base_coco()
    mutate(data)
    return _write(tmp_path / "coco", data)


# --------------------------------------------------------------------------- reading


def test_masks_match_pycocotools(coco_file):
    """Polygons (one and several parts), uncompressed and compressed RLE: exactly COCO.annToMask."""
    api = COCO(str(coco_file))
    source = CocoSource(coco_file, include_crowd=True)
    assert len(source) == 3 and source.image_ids == [1, 2, 3]
    forms = set()
    for i, image_id in enumerate(source.image_ids):
        record = source[i]
        h, w = SIZES[image_id]
        anns = api.loadAnns(api.getAnnIds(imgIds=[image_id]))
        assert record["image"].shape == (h, w, 3) and record["image"].dtype == np.uint8
        assert record["masks"].shape == (len(anns), h, w) and record["masks"].dtype == bool
        assert record["path"] == str(coco_file.parent / f"img_{image_id}.png")
        np.testing.assert_array_equal(
            record["image"], np.asarray(Image.open(coco_file.parent / f"img_{image_id}.png").convert("RGB"))
        )
        for mask, category, box, ann in zip(record["masks"], record["categories"], record["boxes"], anns):
            expected = api.annToMask(ann).astype(bool)
            assert expected.any()
            np.testing.assert_array_equal(mask, expected)
            assert category == api.loadCats(ann["category_id"])[0]["name"]
            np.testing.assert_allclose(box, mask_utils.toBbox(api.annToRLE(ann)))
            seg = ann["segmentation"]
            forms.add(("poly", len(seg)) if isinstance(seg, list) else type(seg["counts"]).__name__)
        assert record["boxes"].dtype == np.float32
    assert forms == {("poly", 1), ("poly", 2), "list", "str"}
    assert source.skipped == {coco.NO_ANNOTATIONS: 1} and source.num_skipped == 0


def test_crowd_left_out_by_default(coco_file):
    source = CocoSource(coco_file)
    assert source.image_ids == [1, 2]  # image 3 has only a crowd annotation
    assert source[1]["masks"].shape[0] == 1 and source[1]["categories"] == ["cat"]
    assert source.skipped == {coco.CROWD: 2, coco.NO_ANNOTATIONS: 2}


def test_images_dir_and_cache(tmp_path):
    data = _base_coco()
    _write(tmp_path / "images", data)
    json_path = tmp_path / "annotations" / "instances.json"
    json_path.parent.mkdir()
    json_path.write_text(json.dumps(data))
    source = CocoSource(json_path, tmp_path / "images", cache=True)
    first = source[0]
    assert source[0] is first and not first["image"].flags.writeable
    assert isinstance(first["masks"], RleMasks) and not first["masks"].areas.flags.writeable  # RLEs, immutable
    clone = pickle.loads(pickle.dumps(source))  # grain worker processes
    np.testing.assert_array_equal(clone[0]["masks"], first["masks"])
    with pytest.warns(RuntimeWarning, match="image missing or unreadable"):
        assert CocoSource(json_path)[0] is None  # images looked for beside the JSON


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "keep, missing",
    [
        (("images",), "no 'annotations', 'categories'"),
        (("annotations", "categories"), "no 'images'"),
    ],
)
def test_not_coco_instances(tmp_path, keep, missing):
    data = {k: v for k, v in _base_coco().items() if k in keep}
    path = _write(tmp_path / "coco", data, images=False)
    with pytest.raises(DataError, match=f"not a COCO instances file: {missing}") as e:
        CocoSource(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_not_coco_other_json(tmp_path):
    record = tmp_path / "rec.json"
    record.write_text(json.dumps({"image": {"image_id": 0}, "annotations": []}))
    with pytest.raises(DataError, match="one SA-1B record: pass its folder"):
        CocoSource(record)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": {}, "annotations": [], "categories": []}))
    with pytest.raises(DataError, match="'images' is dict, not a list"):
        CocoSource(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(DataError, match="unreadable JSON"):
        CocoSource(broken)


def _drop_short(data):
    data["annotations"][0]["segmentation"] = [[1.0, 1.0, 9.0, 9.0]]  # 2 points
    data["annotations"][1]["segmentation"].append([3.0, 3.0])  # a degenerate extra part: dropped


def _set(index: int, **fields):
    return lambda d: d["annotations"][index].update(fields)


@pytest.mark.parametrize(
    "mutate, reason, left_out",
    [
        pytest.param(_set(0, image_id=99), coco.UNKNOWN_IMAGE, 10, id="unknown-image"),
        pytest.param(_set(0, category_id=7), coco.UNKNOWN_CATEGORY, 10, id="unknown-category"),
        pytest.param(_drop_short, coco.SHORT_POLYGON, 10, id="short-polygon"),
        pytest.param(lambda d: d["annotations"][0].pop("segmentation"), coco.NO_SEGMENTATION, 10, id="bbox-only"),
        pytest.param(_set(0, segmentation=[]), coco.NO_SEGMENTATION, 10, id="empty-segmentation"),
        pytest.param(_set(2, segmentation={"size": [64, 48], "counts": "PPYo"}), coco.RLE_SIZE, 12, id="rle-size"),
        pytest.param(
            _set(0, segmentation=[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]), coco.MALFORMED_ANNOTATION, 10, id="odd"
        ),
        pytest.param(_set(0, segmentation="x"), coco.MALFORMED_ANNOTATION, 10, id="not-a-segmentation"),
        pytest.param(
            lambda d: d["images"].append({"id": 9, "file_name": "x.png"}), coco.MALFORMED_IMAGE, None, id="no-size"
        ),
        pytest.param(lambda d: d["images"].append(dict(d["images"][0])), coco.DUPLICATE_IMAGE, None, id="duplicate"),
    ],
)
def test_annotations_skipped_when_opened(tmp_path, mutate, reason, left_out):
    """Each malformed annotation or image entry is left out, counted under its reason; the rest reads."""
    path = _mutated(tmp_path, mutate)
    source = CocoSource(path)
    assert source.skipped.pop(reason) == 1
    assert source.skipped == {coco.CROWD: 2, coco.NO_ANNOTATIONS: 2}
    assert len(source) == 2
    record = source[0]
    api = COCO(str(path))
    good = [a for a in api.loadAnns(api.getAnnIds(imgIds=[1])) if a["id"] != left_out]
    assert len(record["masks"]) == len(good)
    for mask, ann in zip(record["masks"], good):
        seg = ann["segmentation"]
        if isinstance(seg, list):  # the degenerate parts dropped
            ann = {**ann, "segmentation": [p for p in seg if len(p) >= 6]}
        np.testing.assert_array_equal(mask, api.annToMask(ann).astype(bool))


@pytest.mark.parametrize(
    "mutate, reason",
    [
        pytest.param(_set(0, segmentation=[[5.0, 5.0, 10.0, 10.0, 20.0, 20.0]]), coco.EMPTY_MASK, id="collinear"),
        pytest.param(_set(0, segmentation=[[70.0, 50.0, 90.0, 50.0, 90.0, 60.0]]), coco.EMPTY_MASK, id="outside"),
        pytest.param(
            _set(0, segmentation=[[1.0, 1.0, float("nan"), 9.0, 9.0, 1.0]]), coco.MALFORMED_ANNOTATION, id="nan"
        ),
        pytest.param(_set(0, segmentation={"size": [48, 64], "counts": [5, 10, 20]}), coco.BROKEN_RLE, id="rle-sum"),
        pytest.param(_set(0, segmentation={"size": [48, 64], "counts": "PPYo"}), coco.BROKEN_RLE, id="rle-string"),
    ],
)
def test_masks_skipped_when_read(tmp_path, mutate, reason):
    """Masks that are empty (collinear, outside the image) or broken are found when decoded: left out alone."""
    source = CocoSource(_mutated(tmp_path, mutate))
    assert source.skipped == {coco.CROWD: 2, coco.NO_ANNOTATIONS: 2}
    with pytest.warns(RuntimeWarning, match=f"skipping {reason}.*annotation 10"):
        record = source[0]
    assert len(record["masks"]) == 2  # annotations 11 and 12
    assert source.skipped[reason] == 1
    source[0]
    assert source.skipped[reason] == 1 and source.num_skipped == 0  # counted once per annotation


def test_image_without_usable_masks_reads_as_none(tmp_path):
    def mutate(d):
        d["annotations"][4]["segmentation"] = [[60.0, 45.0, 70.0, 45.0, 70.0, 50.0]]  # image 2: outside

    source = CocoSource(_mutated(tmp_path, mutate))
    with pytest.warns(RuntimeWarning):
        assert source[1] is None
    assert source.skipped[coco.EMPTY_MASK] == 1 and source.skipped[coco.NO_MASKS] == 1
    assert source[1] is None and source.num_skipped == 2  # every None read counts (as SA1BSource)


def test_image_missing_unreadable_or_resized(coco_file):
    (coco_file.parent / "img_1.png").unlink()
    (coco_file.parent / "img_2.png").write_bytes(b"not a png")
    source = CocoSource(coco_file, include_crowd=True)
    with pytest.warns(RuntimeWarning, match=r"skipping image missing or unreadable: .*img_1\.png"):
        assert source[0] is None
    with pytest.warns(RuntimeWarning, match=r"img_2\.png: unreadable image"):
        assert source[1] is None
    Image.fromarray(np.zeros((33, 32, 3), np.uint8)).save(coco_file.parent / "img_3.png")
    with pytest.warns(RuntimeWarning, match=r"img_3\.png is 33x32, .* says 32x32"):
        assert source[2] is None
    assert source.skipped == {coco.NO_ANNOTATIONS: 1, coco.IMAGE_UNREADABLE: 2, coco.IMAGE_SIZE: 1}
    assert source.num_skipped == 3


def test_empty_after_filtering(tmp_path):
    data = _base_coco()
    data["annotations"] = [a for a in data["annotations"] if a["iscrowd"]] + [
        {**copy.deepcopy(data["annotations"][0]), "image_id": 42}
    ]
    path = _write(tmp_path / "coco", data)
    with pytest.raises(DataError) as e:
        CocoSource(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: no usable images (left out: ") and "\n" not in msg
    assert f"4 {coco.NO_ANNOTATIONS}" in msg and f"2 {coco.CROWD}" in msg and f"1 {coco.UNKNOWN_IMAGE}" in msg


def test_bad_categories(tmp_path):
    path = _mutated(tmp_path, lambda d: d["categories"].append({"id": 1, "name": "again"}))
    with pytest.raises(DataError, match="category id 1 appears twice"):
        CocoSource(path)
    path = _mutated(tmp_path, lambda d: d["categories"].append({"name": "no id"}))
    with pytest.raises(DataError, match=r"categories\[2\] is not an object with an id and a name"):
        CocoSource(path)


# --------------------------------------------------------------------------- writing


def test_write_coco_from_arrays(tmp_path):
    rng = np.random.default_rng(1)
    records = []
    for i in range(3):
        h, w = 30 + i, 40
        masks = np.stack([_ellipse(h, w, 10 + i, 12, 5, 7), _ellipse(h, w, 20, 30, 6, 4), np.zeros((h, w), bool)])
        records.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), masks, ["red", "", "blue"]))
    records.append({"image": records[0][0], "masks": records[0][1][:1], "file_name": "named.png"})
    path = write_coco(iter(records), tmp_path / "out" / "instances.json", image_suffix=".png", categories=["blue"])
    data = json.loads(path.read_text())
    assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
    assert data["categories"] == [
        {"id": 1, "name": "blue", "supercategory": ""},
        {"id": 2, "name": "red", "supercategory": ""},
        {"id": 3, "name": "object", "supercategory": ""},
    ]
    assert [im["file_name"] for im in data["images"]] == ["000000.png", "000001.png", "000002.png", "named.png"]
    assert len(data["annotations"]) == 7  # the empty masks left out
    assert all(isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0 for a in data["annotations"])
    source = CocoSource(path)
    assert len(source) == 4 and source.skipped == {}
    for i, (image, masks, *_) in enumerate(records[:3]):
        record = source[i]
        np.testing.assert_array_equal(record["image"], image)
        np.testing.assert_array_equal(record["masks"], masks[:2])
        assert record["categories"] == ["red", "object"]
    api = COCO(str(path))  # pycocotools reads it too
    assert api.annToMask(api.loadAnns([1])[0]).sum() == records[0][1][0].sum()
    with pytest.raises(ValueError, match=r"records\[0\]: masks must be \(M, 30, 40\)"):
        write_coco([(records[0][0], records[1][1])], tmp_path / "bad.json")


def test_write_coco_from_sa1b_folder(tmp_path):
    from sam_jax.train.shapes import make_shapes

    make_shapes(tmp_path / "shapes", 4, seed=0, image_size=(48, 64))
    path = write_coco(tmp_path / "shapes", tmp_path / "coco" / "instances.json")
    data = json.loads(path.read_text())
    assert data["images"][0]["file_name"] == "../shapes/shapes_000000.jpg"
    coco_source, sa1b_source = CocoSource(path), SA1BSource(tmp_path / "shapes")
    assert len(coco_source) == len(sa1b_source) == 4
    for i in range(4):
        a, b = coco_source[i], sa1b_source[i]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["masks"], b["masks"])
        assert a["categories"] == b["categories"]
        np.testing.assert_allclose(a["boxes"], b["boxes"])


# --------------------------------------------------------------------------- training pipeline


def test_coco_source_in_train_dataset(coco_file):
    from sam_jax.config import get_config
    from sam_jax.train.data import make_train_dataset

    config = get_config("tiny")
    source = CocoSource(coco_file, include_crowd=True)
    ds = make_train_dataset(
        source,
        config,
        seed=0,
        batch_size=2,
        masks_per_image=4,
        max_mask_fraction=0.9,
        shard_index=0,
        shard_count=1,
        num_threads=1,
    )
    batch = next(iter(ds))
    s, m = config.image_size, config.low_res_mask_size
    assert batch["images"].shape == (2, s, s, 3) and batch["masks"].shape == (2, 4, m, m)
    assert batch["valid"].shape == (2, 4) and batch["valid"].any(1).all()
