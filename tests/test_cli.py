"""The `sam-jax segment` and `sam-jax auto` commands end to end on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.checkpoint import save_params
from sam_jax.cli import main
from sam_jax.model import SamModel
from sam_jax.predictor import SamPredictor


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_params, tiny_config, photo):
    root = tmp_path_factory.mktemp("cli")
    ckpt = save_params(root / "tiny", tiny_params, tiny_config)
    Image.fromarray(photo).save(root / "cat.png")
    (root / "dir").mkdir()
    Image.fromarray(photo[:200, :260]).save(root / "dir" / "a.png")
    Image.fromarray(photo[50:, 100:]).save(root / "dir" / "b.jpg", quality=95)
    return root, ckpt


def test_segment(workspace, tiny_params, tiny_config, photo, capsys):
    root, ckpt = workspace
    out = root / "seg"
    argv = [
        "segment",
        str(root / "cat.png"),
        "--checkpoint",
        str(ckpt),
        "--point",
        "200,150",
        "--point",
        "50,40,0",
        "--box",
        "100,60,400,280",
        "--multimask",
        "--out",
        str(out),
        "--cache-dir",
        str(root / "cache"),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    shown = json.loads(printed[printed.index("scores ") + 7 : printed.index(" ->")])
    assert all(round(v, 3) == v and len(repr(abs(v))) <= 5 for v in shown), printed  # 0.775, not 0.7749999761581421
    result = json.loads((out / "cat_scores.json").read_text())
    assert len(result["scores"]) == 3 and result["labels"] == [1, 0]
    predictor = SamPredictor(SamModel(tiny_config, tiny_params))
    predictor.set_image(photo)
    masks, scores, _ = predictor.predict(
        point_coords=np.array([[200.0, 150.0], [50.0, 40.0]]),
        point_labels=np.array([1, 0]),
        box=np.array([100.0, 60, 400, 280]),
    )
    np.testing.assert_allclose(result["scores"], scores, atol=1e-5)
    for i, name in enumerate(result["masks"]):
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)) > 0, masks[i])
    assert Image.open(out / "cat_overlay.png").size == (451, 300)
    assert any((root / "cache").iterdir()), "the persistent compilation cache was not written"


def test_auto(workspace, tiny_params, tiny_config):
    root, ckpt = workspace
    out = root / "auto"
    opts = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    assert (
        main(["auto", str(root / "dir"), str(root / "cat.png"), "--checkpoint", str(ckpt), "--out", str(out), *opts])
        == 0
    )
    gen = SamAutomaticMaskGenerator(
        SamModel(tiny_config, tiny_params), points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0
    )
    for stem, path in (("a", root / "dir" / "a.png"), ("b", root / "dir" / "b.jpg"), ("cat", root / "cat.png")):
        doc = json.loads((out / f"{stem}.json").read_text())
        image = np.asarray(Image.open(path).convert("RGB"))
        assert (doc["image"]["height"], doc["image"]["width"]) == image.shape[:2]
        expected = gen.generate(image)
        assert len(doc["annotations"]) == len(expected) > 0
        for ann, rec in zip(doc["annotations"], expected):
            np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), rec["segmentation"])
            assert ann["area"] == rec["area"] and ann["bbox"] == rec["bbox"]
        assert Image.open(out / f"{stem}_overlay.png").size == image.shape[1::-1]


def _one_line_error(argv, capsys, code=1) -> str:
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("sam-jax"), err
    return err


def test_bad_inputs(workspace, capsys):
    root, ckpt = workspace
    (root / "broken.png").write_bytes(b"not an image")
    seg = ["segment", "--checkpoint", str(ckpt), "--out", str(root / "x")]
    assert "no such image file" in _one_line_error(
        [*seg[:1], str(root / "nope.png"), *seg[1:], "--point", "1,2"], capsys
    )
    assert "is a folder, not an image file" in _one_line_error(
        [*seg[:1], str(root / "dir"), *seg[1:], "--point", "1,2"], capsys
    )
    assert "unreadable image" in _one_line_error(
        [*seg[:1], str(root / "broken.png"), *seg[1:], "--point", "1,2"], capsys
    )
    assert "invalid point '1;2'" in _one_line_error(
        [*seg[:1], str(root / "cat.png"), *seg[1:], "--point", "1;2"], capsys, 2
    )
    assert "invalid point '1,2,5'" in _one_line_error(
        [*seg[:1], str(root / "cat.png"), *seg[1:], "--point", "1,2,5"], capsys, 2
    )
    assert "invalid box" in _one_line_error([*seg[:1], str(root / "cat.png"), *seg[1:], "--box", "1,2,3"], capsys, 2)
    assert "x1 >= x0" in _one_line_error([*seg[:1], str(root / "cat.png"), *seg[1:], "--box", "9,2,3,4"], capsys)
    assert "at least one --point" in _one_line_error([*seg[:1], str(root / "cat.png"), *seg[1:]], capsys)
    assert "no such file" in _one_line_error(
        ["auto", str(root / "missing"), "--checkpoint", str(ckpt), "--out", str(root / "y")], capsys
    )
    assert "no such file" in _one_line_error(
        [*seg[:1], str(root / "cat.png"), "--checkpoint", str(root / "none.pth"), "--out", "x", "--point", "1,2"],
        capsys,
    )


def test_make_shapes(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert (
        main(
            [
                "make-shapes",
                str(out),
                "--n",
                "2",
                "--height",
                "64",
                "--width",
                "96",
                "--min-size",
                "0.3",
                "--max-size",
                "0.5",
            ]
        )
        == 0
    )
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert len(records) == 2 and all(r["image"]["height"] == 64 and r["image"]["width"] == 96 for r in records)
    assert (
        np.median([max(a["bbox"][2:]) for r in records for a in r["annotations"]]) >= 0.3 * 64 * 0.7
    )  # rectangles: 0.7 r
    assert "size_range" in _one_line_error(
        ["make-shapes", str(tmp_path / "bad"), "--min-size", "0.5", "--max-size", "0.2"], capsys
    )
    assert "size_range" in _one_line_error(["make-shapes", str(tmp_path / "bad"), "--min-size", "0"], capsys)
    assert (
        main(
            [
                "make-shapes",
                str(tmp_path / "rings"),
                "--n",
                "1",
                "--height",
                "64",
                "--width",
                "96",
                "--categories",
                "ring",
            ]
        )
        == 0
    )
    assert {
        a["category"] for a in json.loads(next((tmp_path / "rings").glob("*.json")).read_text())["annotations"]
    } == {"ring"}
    assert "blob" in _one_line_error(["make-shapes", str(tmp_path / "bad"), "--categories", "circle,blob"], capsys)
    # --colour-by-category: the same shapes, each painted its kind's colour.
    coded = tmp_path / "coded"
    assert (
        main(
            [
                "make-shapes",
                str(coded),
                "--n",
                "2",
                "--height",
                "64",
                "--width",
                "96",
                "--min-size",
                "0.3",
                "--max-size",
                "0.5",
                "--colour-by-category",
            ]
        )
        == 0
    )
    assert [json.loads(p.read_text()) for p in sorted(coded.glob("*.json"))] == records
    assert (coded / "shapes_000000.jpg").read_bytes() != (out / "shapes_000000.jpg").read_bytes()


def test_pretrain_kinds_bad_inputs(tmp_path, capsys):
    """`sam-jax pretrain-kinds` errors, in one line, before any training."""
    data = tmp_path / "shapes"
    assert main(["make-shapes", str(data), "--n", "2", "--height", "64", "--width", "96"]) == 0
    (tmp_path / "exists").mkdir()
    assert "already exists" in _one_line_error(["pretrain-kinds", str(data), str(tmp_path / "exists")], capsys)
    assert "warmup_steps < steps" in _one_line_error(
        ["pretrain-kinds", str(data), str(tmp_path / "a"), "--steps", "20"], capsys
    )
    assert "no such config file (nor a recipe" in _one_line_error(
        ["pretrain-kinds", str(data), str(tmp_path / "a"), "--recipe", "nope"], capsys
    )
    missing = tmp_path / "missing"  # DATA may be several folders
    assert f"not a folder: {missing}" in _one_line_error(
        ["pretrain-kinds", str(data), str(missing), str(tmp_path / "a")], capsys
    )
    for p in data.glob("*.json"):  # the same records without categories
        record = json.loads(p.read_text())
        for ann in record["annotations"]:
            del ann["category"]
        p.write_text(json.dumps(record))
    assert "no annotation has a 'category'" in _one_line_error(
        ["pretrain-kinds", str(data), str(tmp_path / "a")], capsys
    )


def test_make_shapes_help_states_the_library_defaults(capsys):
    """The help text writes the size defaults out (argparse does not import the data module):
    they must be `SIZE_RANGE`'s."""
    from sam_jax.train.shapes import SIZE_RANGE

    with pytest.raises(SystemExit) as e:
        main(["make-shapes", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {SIZE_RANGE[0]})" in text and f"(default {SIZE_RANGE[1]})" in text


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "sam_jax.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "segment" in proc.stdout and "auto" in proc.stdout


def test_export_gets_the_usual_file_mode(workspace, tmp_path, capsys):
    import os

    root, ckpt = workspace
    umask = os.umask(0o022)
    try:
        assert main(["export", str(ckpt), str(tmp_path / "tiny.safetensors")]) == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "tiny.safetensors").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.safetensors"]  # no temporary file left


def test_cache_dir_takes_effect_in_a_process_that_used_another(tmp_path):
    """JAX opens its compilation cache directory once, at the first compile that uses it: a
    directory given later (a notebook, a test run) must still be the one written."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.compilation_cache import compilation_cache

    from sam_jax.cli import enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    first, second = tmp_path / "first", tmp_path / "second"
    try:
        enable_compilation_cache(str(first))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()
        assert any(first.iterdir())
        enable_compilation_cache(str(second))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(5)).block_until_ready()
        assert any(second.iterdir()), "the second cache directory was not written"
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        compilation_cache.reset_cache()
