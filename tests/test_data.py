"""The synthetic shapes data set and the SA-1B reader / grain pipeline (sam_jax.train)."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam_jax.train.sa1b import DataError, SA1BSource, list_records, load_record, make_dataset
from sam_jax.train.shapes import CATEGORIES, MIN_VISIBLE_AREA, _shape_window, make_shapes

# pycocotools 2.0.x under numpy 2 warns on every decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

N = 12
SIZE = (96, 128)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, N, seed=0, image_size=SIZE)
    return out


def _decode(seg: dict) -> np.ndarray:
    return mask_utils.decode(seg).astype(bool)


# --------------------------------------------------------------------------- make_shapes


def test_make_shapes_writes_valid_sa1b_records(shapes_dir):
    h, w = SIZE
    jsons = sorted(shapes_dir.glob("*.json"))
    assert [p.stem for p in jsons] == [f"shapes_{i:06d}" for i in range(N)]
    n_anns, ids = 0, set()
    for i, path in enumerate(jsons):
        data = json.loads(path.read_text())
        assert data["image"] == {"image_id": i, "file_name": f"{path.stem}.jpg", "height": h, "width": w}
        with Image.open(shapes_dir / data["image"]["file_name"]) as img:
            assert img.format == "JPEG" and img.size == (w, h) and img.mode == "RGB"
        anns = data["annotations"]
        assert len(anns) >= 1
        union = np.zeros((h, w), np.int32)
        for ann in anns:
            assert ann["id"] not in ids
            ids.add(ann["id"])
            seg = ann["segmentation"]
            assert seg["size"] == [h, w] and isinstance(seg["counts"], str)
            mask = _decode(seg)
            assert mask.sum() == ann["area"] >= MIN_VISIBLE_AREA
            ys, xs = np.nonzero(mask)
            x0, y0 = xs.min(), ys.min()
            assert ann["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
            np.testing.assert_allclose(mask_utils.toBbox(seg), ann["bbox"])
            [[px, py]] = ann["point_coords"]
            assert mask[int(py), int(px)]
            assert ann["category"] in CATEGORIES
            assert ann["crop_box"] == [0, 0, w, h]
            assert ann["predicted_iou"] == 1.0 and ann["stability_score"] == 1.0
            union += mask
        assert union.max() <= 1, "masks of one image overlap"
        n_anns += len(anns)
    assert n_anns >= 2 * N  # min_shapes=2: placements can fail, but rarely


def test_make_shapes_masks_match_pixels(shapes_dir):
    """Each visible shape is painted with its own colours: its pixels differ from just outside."""
    from scipy import ndimage

    data = json.loads((shapes_dir / "shapes_000000.json").read_text())
    image = np.asarray(Image.open(shapes_dir / "shapes_000000.jpg"), np.float32)
    for ann in data["annotations"]:
        mask = _decode(ann["segmentation"])
        inner = ndimage.binary_erosion(mask, iterations=2)
        ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask, iterations=1)
        if inner.sum() < 10 or ring.sum() < 10:
            continue
        gap = np.linalg.norm(image[inner].mean(0) - image[ring].mean(0))
        assert gap > 20, (ann["category"], gap)


def test_make_shapes_is_deterministic(tmp_path):
    a = make_shapes(tmp_path / "a", 3, seed=7, image_size=SIZE)
    b = make_shapes(tmp_path / "b", 3, seed=7, image_size=SIZE)
    c = make_shapes(tmp_path / "c", 1, seed=8, image_size=SIZE)
    short = make_shapes(tmp_path / "short", 1, seed=7, image_size=SIZE)  # image i does not depend on n
    assert [p.name for p in a] == [f"shapes_{i:06d}.json" for i in range(3)]
    for pa, pb in zip(a, b):
        assert json.loads(pa.read_text()) == json.loads(pb.read_text())
        assert pa.with_suffix(".jpg").read_bytes() == pb.with_suffix(".jpg").read_bytes()
    assert short[0].read_bytes() == a[0].read_bytes()
    assert short[0].with_suffix(".jpg").read_bytes() == a[0].with_suffix(".jpg").read_bytes()
    assert c[0].with_suffix(".jpg").read_bytes() != a[0].with_suffix(".jpg").read_bytes()


@pytest.mark.parametrize("category", CATEGORIES)
def test_shape_fits_its_window(category):
    """Each shape lies within radius r of its centre, so the window around it never cuts it
    (rectangles once reached 1.41 r and came out as octagons)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[-40:41, -40:41].astype(np.float32) + np.float32(0.5)
    for _ in range(50):
        r = float(rng.uniform(5, 35))
        mask = _shape_window(rng, x, y, category, r, float(rng.uniform(0, 2 * np.pi)))
        assert mask.any() and np.sqrt(x[mask] ** 2 + y[mask] ** 2).max() <= r + 1e-3


def test_make_shapes_size_range(tmp_path):
    """`size_range` bounds each shape's extent (a fraction of the shorter side)."""
    side = min(SIZE)

    def extents(size_range):
        paths = make_shapes(tmp_path / str(size_range), 6, seed=3, image_size=SIZE, size_range=size_range)
        return np.array([max(a["bbox"][2:]) for p in paths for a in json.loads(p.read_text())["annotations"]])

    small, large = extents((0.05, 0.1)), extents((0.3, 0.4))
    assert small.max() <= 0.1 * side + 2 and large.max() <= 0.4 * side + 2
    assert np.median(large) > 2 * np.median(small)
    for bad in ((0.0, 0.1), (0.3, 0.2), (0.1, 1.5)):
        with pytest.raises(ValueError, match="size_range"):
            make_shapes(tmp_path / "bad", 1, size_range=bad)


def test_make_shapes_categories(tmp_path):
    """`categories` restricts the kinds drawn; the default is every kind; bad names are errors."""
    paths = make_shapes(tmp_path / "two", 6, seed=3, image_size=SIZE, categories=("circle", "triangle"))
    kinds = {a["category"] for p in paths for a in json.loads(p.read_text())["annotations"]}
    assert kinds == {"circle", "triangle"}
    every = make_shapes(tmp_path / "all", 30, seed=3, image_size=SIZE)
    assert {a["category"] for p in every for a in json.loads(p.read_text())["annotations"]} == set(CATEGORIES)
    for bad in ((), ("circle", "blob"), ("circle", "circle")):
        with pytest.raises(ValueError, match="categories"):
            make_shapes(tmp_path / "bad", 1, categories=bad)


def test_make_shapes_colour_by_category(shapes_dir, tmp_path):
    """`colour_by_category`: the same images' geometry and annotations, each shape's visible
    pixels in its kind's flat colour (up to JPEG); the default output is unchanged by it."""
    from scipy import ndimage

    from sam_jax.train.shapes import CATEGORY_COLOURS

    assert set(CATEGORY_COLOURS) == set(CATEGORIES)
    paths = make_shapes(tmp_path / "coded", N, seed=0, image_size=SIZE, colour_by_category=True)
    seen = set()
    for path in paths:
        coded, plain = json.loads(path.read_text()), json.loads((shapes_dir / path.name).read_text())
        assert coded["annotations"] == plain["annotations"]
        image = np.asarray(Image.open(path.with_suffix(".jpg")), np.float32)
        assert not np.array_equal(image, np.asarray(Image.open(shapes_dir / f"{path.stem}.jpg"), np.float32))
        for ann in coded["annotations"]:
            inner = ndimage.binary_erosion(_decode(ann["segmentation"]), iterations=2)
            if inner.sum() >= 10:
                error = np.abs(np.median(image[inner], axis=0) - CATEGORY_COLOURS[ann["category"]]).max()
                assert error < 12, (path.name, ann["category"], error)
                seen.add(ann["category"])
    assert len(seen) >= 6, seen


# --------------------------------------------------------------------------- load_record


def test_list_records_pairs_sorted(shapes_dir, tmp_path):
    recs = list_records(shapes_dir)
    assert [(i.name, j.name) for i, j in recs] == [(f"shapes_{k:06d}.jpg", f"shapes_{k:06d}.json") for k in range(N)]
    shutil.copy(recs[1][0], tmp_path / "b.png")  # suffix only matters for pairing
    shutil.copy(recs[1][1], tmp_path / "b.json")
    shutil.copy(recs[0][0], tmp_path / "a.jpeg")
    shutil.copy(recs[0][1], tmp_path / "a.json")
    shutil.copy(recs[2][0], tmp_path / "lonely.jpg")  # no JSON: left out
    (tmp_path / "orphan.json").write_text("{}")
    assert [(i.name, j.name) for i, j in list_records(tmp_path)] == [("a.jpeg", "a.json"), ("b.png", "b.json")]


def test_load_record_round_trip(shapes_dir):
    image_path, json_path = list_records(shapes_dir)[3]
    rec = load_record(image_path, json_path)
    data = json.loads(json_path.read_text())
    anns = data["annotations"]
    h, w = SIZE
    assert rec["image"].shape == (h, w, 3) and rec["image"].dtype == np.uint8
    np.testing.assert_array_equal(rec["image"], np.asarray(Image.open(image_path)))
    assert rec["masks"].shape == (len(anns), h, w) and rec["masks"].dtype == bool
    for m, ann in zip(rec["masks"], anns):
        np.testing.assert_array_equal(m, _decode(ann["segmentation"]))
    assert rec["categories"] == [a["category"] for a in anns]
    assert rec["boxes"].dtype == np.float32
    np.testing.assert_array_equal(rec["boxes"], np.asarray([a["bbox"] for a in anns], np.float32))
    assert rec["path"] == str(image_path)


def _copy_record(src: tuple[Path, Path], dst_dir: Path, name: str) -> tuple[Path, Path]:
    dst_dir.mkdir(parents=True, exist_ok=True)
    img, js = dst_dir / f"{name}.jpg", dst_dir / f"{name}.json"
    shutil.copy(src[0], img)
    shutil.copy(src[1], js)
    return img, js


def test_load_record_uncompressed_rle_and_missing_optional_fields(shapes_dir, tmp_path):
    img, js = _copy_record(list_records(shapes_dir)[0], tmp_path, "u")
    data = json.loads(js.read_text())
    masks = [_decode(a["segmentation"]) for a in data["annotations"]]
    for ann, m in zip(data["annotations"], masks):
        flat = m.T.ravel().astype(np.int8)  # column-major, as COCO
        edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]]))).tolist()
        ann["segmentation"]["counts"] = np.diff([0, *edges]).tolist()  # starts with a 0-run
        del ann["category"], ann["bbox"]
    js.write_text(json.dumps(data))
    rec = load_record(img, js)
    np.testing.assert_array_equal(rec["masks"], np.stack(masks))
    assert rec["categories"] == [""] * len(masks)
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    np.testing.assert_allclose(rec["boxes"], mask_utils.toBbox(rles))


def _corrupt(kind: str, src: tuple[Path, Path], dst_dir: Path, name: str) -> tuple[Path, Path]:
    img, js = _copy_record(src, dst_dir, name)
    data = json.loads(js.read_text())
    if kind == "truncated_jpg":
        raw = img.read_bytes()
        img.write_bytes(raw[: len(raw) // 2])
    elif kind == "not_an_image":
        img.write_bytes(b"this is no JPEG")
    elif kind == "bad_json":
        js.write_text(js.read_text()[:-20])
    elif kind == "rle_counts":  # runs no longer cover the image
        seg = data["annotations"][0]["segmentation"]
        seg["counts"] = seg["counts"][: len(seg["counts"]) // 2]
        js.write_text(json.dumps(data))
    elif kind == "rle_chars":
        data["annotations"][0]["segmentation"]["counts"] = "\x01\x02 ~~~"
        js.write_text(json.dumps(data))
    elif kind == "rle_size":
        h, w = data["annotations"][0]["segmentation"]["size"]
        data["annotations"][0]["segmentation"]["size"] = [h + 1, w]
        js.write_text(json.dumps(data))
    elif kind == "missing_key":
        del data["annotations"][0]["segmentation"]
        js.write_text(json.dumps(data))
    elif kind == "no_annotations":
        del data["annotations"]
        js.write_text(json.dumps(data))
    else:
        raise AssertionError(kind)
    return img, js


CORRUPTIONS = {
    "truncated_jpg": "jpg",
    "not_an_image": "jpg",
    "bad_json": "json",
    "rle_counts": "json",
    "rle_chars": "json",
    "rle_size": "json",
    "missing_key": "json",
    "no_annotations": "json",
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_load_record_corrupt_raises_data_error_naming_the_file(kind, shapes_dir, tmp_path):
    img, js = _corrupt(kind, list_records(shapes_dir)[0], tmp_path, f"bad_{kind}")
    with pytest.raises(DataError, match=f"bad_{kind}\\.{CORRUPTIONS[kind]}"):
        load_record(img, js)
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- grain


@pytest.fixture(scope="module")
def mixed_dir(shapes_dir, tmp_path_factory) -> Path:
    """4 good records and 3 corrupt ones."""
    out = tmp_path_factory.mktemp("mixed")
    recs = list_records(shapes_dir)
    for k in range(4):
        _copy_record(recs[k], out, f"good_{k}")
    for k, kind in enumerate(["truncated_jpg", "bad_json", "rle_counts"]):
        _corrupt(kind, recs[4 + k], out, f"zbad_{k}")
    return out


def test_source_skips_corrupt_records_with_a_warning(mixed_dir):
    src = SA1BSource(mixed_dir)
    assert len(src) == 7
    names = [i.name for i, _ in src.records]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # good records warn about nothing
        assert all(src[k]["path"].endswith(f"good_{k}.jpg") for k in range(4))
    assert src.num_skipped == 0
    for k in range(4, 7):
        with pytest.warns(RuntimeWarning, match=names[k]):
            assert src[k] is None
    assert src.num_skipped == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # one warning per file
        assert src[4] is None
    assert src.num_skipped == 4
    clone = pickle.loads(pickle.dumps(src))  # grain worker processes pickle the source
    assert len(clone) == 7 and clone[0] is not None


def test_source_cache_keeps_decoded_records(mixed_dir):
    """cache=True: a record is decoded once and shared read-only; corrupt records still count
    at every read; a pickled source (a grain worker) starts with an empty cache."""
    src = SA1BSource(mixed_dir, cache=True)
    first = src[0]
    assert src[0] is first and not first["image"].flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        first["image"][0, 0] = 0
    np.testing.assert_array_equal(first["image"], SA1BSource(mixed_dir)[0]["image"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert src[4] is None and src[4] is None
    assert src.num_skipped == 2
    clone = pickle.loads(pickle.dumps(src))
    assert clone.cache and clone[0] is not first


def test_dataset_drops_corrupt_records(mixed_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = [r["path"] for r in make_dataset(mixed_dir, seed=0, shard_index=0, shard_count=1, num_epochs=2)]
    assert len(got) == 8
    assert sorted(Path(p).name for p in got) == sorted([f"good_{k}.jpg" for k in range(4)] * 2)


def _paths(ds) -> list[str]:
    return [Path(r["path"]).name for r in ds]


def test_dataset_is_deterministic_per_seed(shapes_dir):
    kw = dict(shard_index=0, shard_count=1, num_epochs=2)
    a = _paths(make_dataset(shapes_dir, seed=3, **kw))
    b = _paths(make_dataset(shapes_dir, seed=3, **kw))
    c = _paths(make_dataset(shapes_dir, seed=4, **kw))
    assert a == b
    assert a != c
    names = sorted(i.name for i, _ in list_records(shapes_dir))
    assert sorted(a[:N]) == names and sorted(a[N:]) == names  # each epoch is a permutation
    assert a[:N] != a[N:]  # reshuffled each epoch
    assert a[:N] != names  # shuffled at all


def test_dataset_shards_are_disjoint_and_cover(shapes_dir):
    shards = [_paths(make_dataset(shapes_dir, seed=1, shard_index=k, shard_count=2, num_epochs=1)) for k in range(2)]
    assert len(shards[0]) == len(shards[1]) == N // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(i.name for i, _ in list_records(shapes_dir))
    with pytest.raises(ValueError):
        make_dataset(shapes_dir, seed=1, shard_index=2, shard_count=2)


def test_dataset_iterator_state_restores_exactly(shapes_dir):
    ds = make_dataset(shapes_dir, seed=5, shard_index=1, shard_count=2)  # infinite
    it = iter(ds)
    for _ in range(N // 2 + 2):  # into the second epoch
        next(it)
    state = it.get_state()
    state = json.loads(json.dumps(state))  # small and serialisable for checkpoints
    expected = [next(it) for _ in range(5)]

    fresh = iter(make_dataset(shapes_dir, seed=5, shard_index=1, shard_count=2))
    fresh.set_state(state)
    for want, got in zip(expected, (next(fresh) for _ in range(5))):
        assert got["path"] == want["path"]
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["masks"], want["masks"])
        np.testing.assert_array_equal(got["boxes"], want["boxes"])
        assert got["categories"] == want["categories"]
    it.close()  # stop the read-ahead threads of these infinite iterators
    fresh.close()


# --------------------------------------------------------------------------- RLE masks, examples


def _sa1b_like(folder: Path, h: int, w: int, seed: int) -> tuple[Path, Path, np.ndarray]:
    """An SA-1B-like record: ellipses of many sizes, plus masks that are empty, over 90% of the
    image, or a few pixels (lost on the low-res grid); two stored as uncompressed RLE. -> (image
    path, JSON path, the masks (M, H, W) bool)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:h, :w]
    masks = []
    for _ in range(36):
        r = np.exp(rng.uniform(np.log(2), np.log(0.4 * min(h, w))))
        cy, cx, e = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.3, 1)
        masks.append(((yy - cy) / r) ** 2 + ((xx - cx) / (r * e)) ** 2 <= 1)
    full = np.ones((h, w), bool)
    nearly_full = full.copy()
    nearly_full[: h // 20] = False
    specks = [np.zeros((h, w), bool) for _ in range(4)]
    for s in specks:
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        s[y : y + 2, x : x + rng.integers(1, 3)] = True
    masks += [np.zeros((h, w), bool), full, nearly_full, *specks]
    masks = np.stack([masks[i] for i in rng.permutation(len(masks))])
    anns = []
    for k, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        counts = rle["counts"].decode()
        if k < 2:  # uncompressed: the run lengths themselves (column-major, from a 0-run)
            flat = m.T.ravel().astype(np.int8)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]]))).tolist()
            counts = np.diff([0, *edges]).tolist()
        anns.append({"segmentation": {"size": [h, w], "counts": counts}, "category": "abc"[k % 3]})
    image = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
    image_path, json_path = folder / f"r{seed}.jpg", folder / f"r{seed}.json"
    Image.fromarray(image).resize((w, h), Image.BILINEAR).save(image_path, quality=90)
    json_path.write_text(json.dumps({"image": {"height": h, "width": w}, "annotations": anns}))
    return image_path, json_path, masks


def test_rle_masks_decode_as_pycocotools(tmp_path):
    """Areas without decoding, every way of decoding, and sampling rows and columns (sorted or
    not, repeated or not) agree with pycocotools and numpy indexing."""
    from sam_jax.train.sa1b import RleMasks, mask_areas

    h, w = 90, 130
    image_path, json_path, masks = _sa1b_like(tmp_path, h, w, seed=0)
    lazy = load_record(image_path, json_path, decode_masks=False)["masks"]
    assert isinstance(lazy, RleMasks) and lazy.shape == masks.shape and len(lazy) == len(masks)
    segs = [a["segmentation"] for a in json.loads(json_path.read_text())["annotations"]]
    rles = [mask_utils.frPyObjects(s, h, w) if isinstance(s["counts"], list) else s for s in segs]
    np.testing.assert_array_equal(lazy.areas, mask_utils.area(rles))
    np.testing.assert_array_equal(mask_areas(lazy), masks.reshape(len(masks), -1).sum(1))
    assert lazy.areas.min() == 0 and lazy.areas.max() == h * w
    np.testing.assert_array_equal(np.asarray(lazy), masks)
    np.testing.assert_array_equal(load_record(image_path, json_path)["masks"], masks)
    np.testing.assert_array_equal(lazy[3], masks[3])
    np.testing.assert_array_equal(lazy[-1], masks[-1])
    np.testing.assert_array_equal(lazy[[5, 1, 5]], masks[[5, 1, 5]])
    np.testing.assert_array_equal(lazy[2:9:3], masks[2:9:3])
    np.testing.assert_array_equal(lazy[masks.any((1, 2))], masks[masks.any((1, 2))])
    np.testing.assert_array_equal(np.stack(list(lazy)), masks)
    with pytest.raises(IndexError):
        lazy[len(masks)]
    rng = np.random.default_rng(1)
    for rows, cols in [
        (np.arange(0, h, 3), np.arange(1, w, 2)),
        (np.sort(rng.integers(0, h, 150)), np.sort(rng.integers(0, w, 40))),  # repeats: upsampling
        (rng.integers(0, h, 20), rng.integers(0, w, 70)),
    ]:
        picked = np.array([7, 0, 7, len(masks) - 1])
        np.testing.assert_array_equal(lazy.sample(picked, rows, cols), masks[picked][:, rows][:, :, cols])
    assert lazy.sample([], rows, cols).shape == (0, len(rows), len(cols))
    empty = RleMasks([], h, w)
    assert np.asarray(empty).shape == (0, h, w) and len(mask_areas(empty)) == 0
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(lazy))), masks)


@pytest.mark.parametrize("size", [(1100, 1400), (700, 450)])  # downsampled / upsampled to 1024
def test_examples_from_rle_masks_equal_full_decode(size, tmp_path, monkeypatch):
    """`prepare_example` on a source's record (masks as RLE, only the chosen ones decoded, at
    the resize's pixels) gives exactly the examples of fully decoded masks, text prompts too."""
    from sam_jax.config import get_config
    from sam_jax.train.data import prepare_example
    from sam_jax.train.sa1b import RleMasks
    from sam_jax.train.text import CaptionPrompts, CropPrompts

    h, w = size
    image_path, json_path, masks = _sa1b_like(tmp_path, h, w, seed=2)
    source = SA1BSource(tmp_path, cache=True)
    lazy = source[0]
    assert isinstance(lazy["masks"], RleMasks) and source[0] is lazy
    segs = [a["segmentation"] for a in json.loads(json_path.read_text())["annotations"]]
    rles = [mask_utils.frPyObjects(s, h, w) if isinstance(s["counts"], list) else s for s in segs]
    full_masks = np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)).view(bool)
    np.testing.assert_array_equal(full_masks, masks)
    full = {**lazy, "masks": full_masks}

    decoded: list[int] = []  # mask indices decoded, wholly or sampled
    real_decode, real_sample = RleMasks._decode, RleMasks.sample
    monkeypatch.setattr(RleMasks, "_decode", lambda self, i: decoded.extend(map(int, i)) or real_decode(self, i))
    monkeypatch.setattr(
        RleMasks, "sample", lambda self, i, r, c: decoded.extend(map(int, i)) or real_sample(self, i, r, c)
    )

    config = get_config("vit_b")
    area = masks.reshape(len(masks), -1).sum(1)
    usable = np.flatnonzero((area > 0) & (area <= 0.9 * h * w))
    assert len(usable) < len(masks) - 2  # the empty and the too-large ones are left out
    captions = CaptionPrompts({"a": np.ones(4, np.float32), "b": np.full(4, 2.0, np.float32)})

    def embed_images(crops):  # a function of every crop pixel
        return np.array(
            [[c.shape[0], c.sum(dtype=np.int64) % 9973, (c[..., 0] > 100).sum()] for c in crops], np.float32
        )

    crops = CropPrompts(embed_images, dim=3, min_area=40 * 40)
    lost = 0
    for seed in range(3):
        kw = dict(masks_per_image=16, max_mask_fraction=0.9, rng=np.random.default_rng(seed))
        want = prepare_example(full, config, **kw)
        decoded.clear()
        got = prepare_example(lazy, config, **{**kw, "rng": np.random.default_rng(seed)})
        chosen = np.random.default_rng(seed).permutation(usable)[:16]
        assert decoded == list(chosen)  # the chosen masks alone, once each
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        lost += int((~want["valid"]).sum())
        for text in (captions, crops):
            want = prepare_example(full, config, **{**kw, "rng": np.random.default_rng(seed)}, text_prompts=text)
            got = prepare_example(lazy, config, **{**kw, "rng": np.random.default_rng(seed)}, text_prompts=text)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)
            assert want["text_valid"].any()
    assert lost  # some chosen masks vanish on the low-res grid
