"""The data engine: its helpers, its config errors, and rounds end to end through `sam-jax
engine` on a tiny setting (the tiny model from scratch, 96x128 shapes, 2 steps a round),
with resumption: a finished round is skipped, an interrupted one does not redo its work.

The training step compiles once (the other rounds hit the persistent compilation cache of
--cache-dir), so everything that trains is one test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam_jax import amg
from sam_jax.cli import main
from sam_jax.train import engine
from sam_jax.train.sa1b import list_records, load_record
from sam_jax.train.shapes import make_shapes
from sam_jax.train.trainer import TrainingError, load_config_file

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "train" / "configs" / "engine_shapes_tiny.py"
SIZE = (96, 128)

# The shipped config shrunk to seconds: 2 steps a round on batches of 2, a 4x4 grid with the
# predicted-IoU and stability filters off (a model trained for 2 steps passes neither).
TINY = [
    "--config.engine.steps_per_round=2",
    "--config.engine.points_per_side=4",
    "--config.engine.points_per_batch=16",
    "--config.engine.pred_iou_thresh=0.0",
    "--config.engine.stability_score_thresh=0.0",
    "--config.engine.min_mask_region_area=0",
    "--config.engine.eval_clicks=2",
    "--config.batch_size=2",
    "--config.data.masks_per_image=2",
    "--config.loss.num_point_iters=0",  # the first prompt only: the smallest training step to compile
    "--config.loss.num_no_point_iters=0",
    "--config.log_every=1",
    "--config.checkpoint.async_save=False",
]


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine")
    make_shapes(root / "labeled", 3, seed=0, image_size=SIZE)
    make_shapes(root / "unlabeled", 3, seed=1, image_size=SIZE)  # its JSONs only score the pseudo-labels
    make_shapes(root / "eval", 2, seed=2, image_size=SIZE)
    return root


def _argv(root: Path, workdir: Path, rounds: int) -> list[str]:
    return [
        "engine",
        "--config",
        str(CONFIG),
        "--workdir",
        str(workdir),
        "--cache-dir",
        str(root / "cache"),
        f"--config.engine.labeled_dir={root / 'labeled'}",
        f"--config.engine.unlabeled_dir={root / 'unlabeled'}",
        f"--config.engine.eval_dir={root / 'eval'}",
        f"--config.engine.rounds={rounds}",
        *TINY,
    ]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


# ----------------------------------------------------------------------------- helpers, errors


def _square(y0: int, x0: int, side: int = 10) -> np.ndarray:
    m = np.zeros(SIZE, bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def test_match_ious_area_bounds_and_table():
    a, b = _square(0, 0), _square(0, 5)  # overlap 50 px: IoU 50 / 150
    pseudo = [amg.coco_encode_rle(rle) for rle in amg.mask_to_rle(a[None])]  # the generator's coco_rle
    best_pseudo, best_gt = engine.match_ious(pseudo, np.stack([a, b]))
    np.testing.assert_allclose(best_pseudo, [1.0])
    np.testing.assert_allclose(best_gt, [1.0, 1 / 3])
    assert [v.size for v in engine.match_ious([], np.stack([a]))] == [0, 1]

    hw = (10, 10)
    records = [{"area": v} for v in (0, 5, 50, 94, 95, 100)]
    kept = engine.within_area_bounds(records, hw, min_area=5, max_area_fraction=0.95)
    assert [r["area"] for r in kept] == [5, 50, 94]  # >= 95% of the image dropped, as in the paper

    rows = [
        {
            "round": 0,
            "model_step": 2,
            "num_images": 3,
            "masks_per_image": 1.5,
            "pseudo_mean_best_iou": None,
            "gt_recall": None,
            "num_train_records": 9,
            "train_loss": 2.5,
            "miou_1click": 0.25,
            "miou_last_click": 0.5,
        }
    ]
    header, line = engine.format_table(rows).splitlines()
    assert "masks/img" in header and "mIoU last click" in header
    assert line.split() == ["0", "2", "3", "1.50", "-", "-", "9", "2.5000", "0.2500", "0.5000"]


def test_config_errors_name_the_key(pools, tmp_path, capsys):
    cfg = load_config_file(CONFIG)
    cfg.engine.labeled_dir = str(pools / "labeled")
    cfg.engine.eval_dir = str(pools / "eval")
    with pytest.raises(TrainingError, match="engine.unlabeled_dir is not set"):
        engine.run_engine(cfg, tmp_path / "w")
    (tmp_path / "empty").mkdir()
    cfg.engine.unlabeled_dir = str(tmp_path / "empty")
    with pytest.raises(TrainingError, match="engine.unlabeled_dir: no images"):
        engine.check_config(cfg)
    cfg.engine.unlabeled_dir = str(pools / "unlabeled")
    cfg.engine.steps_per_round = 0
    with pytest.raises(TrainingError, match="engine.steps_per_round must be an integer >= 1"):
        engine.check_config(cfg)
    del cfg["engine"]
    with pytest.raises(TrainingError, match="no engine section"):
        engine.check_config(cfg)

    # The CLI: one line, exit 1, before any model work.
    argv = _argv(pools, tmp_path / "w", 1)
    argv[argv.index(f"--config.engine.eval_dir={pools / 'eval'}")] = f"--config.engine.eval_dir={tmp_path / 'missing'}"
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sam-jax: error: engine.eval_dir:") and "not a folder" in err and "\n" not in err
    assert not (tmp_path / "w" / "round_0").exists()


# ----------------------------------------------------------------------------- rounds, end to end


def test_engine_round_end_to_end_and_resume(pools, tmp_path, capsys):
    work = tmp_path / "work"
    assert main(_argv(pools, work, 1)) == 0
    out = capsys.readouterr().out
    assert "masks/img" in out and "data engine: 1 round(s)" in out
    r0 = work / "round_0"

    # Pseudo-labels: valid SA-1B records of the unlabeled images, with provenance.
    unlabeled = sorted((pools / "unlabeled").glob("*.jpg"))
    pseudo = list_records(r0 / "pseudo")
    assert [img.name for img, _ in pseudo] == [p.name for p in unlabeled]
    with_masks = []
    for (img, js), original in zip(pseudo, unlabeled):
        assert img.resolve() == original.resolve()
        data = json.loads(js.read_text())
        assert data["image"]["file_name"] == original.name
        assert (data["image"]["height"], data["image"]["width"]) == SIZE
        for ann in data["annotations"]:
            assert isinstance(ann["segmentation"]["counts"], str)
            mask = mask_utils.decode(ann["segmentation"])
            assert mask.shape == SIZE and 0 < mask.sum() == ann["area"] < 0.95 * SIZE[0] * SIZE[1]
            assert ann["provenance"] == {"round": 0, "step": 0}
            assert {"bbox", "predicted_iou", "stability_score", "point_coords", "crop_box"} <= set(ann)
        assert len(load_record(img, js)["masks"]) == len(data["annotations"])  # the training reader agrees
        if data["annotations"]:
            with_masks.append(original.name)
    assert with_masks, "no pseudo-labels at all: the tiny setting no longer exercises training on them"

    # Training data: each labeled record twice (labeled_oversample 2) plus the pseudo-labeled ones.
    labeled = [img.name for img, _ in list_records(pools / "labeled")]
    names = {img.name for img, _ in list_records(r0 / "train_data")}
    assert names == {f"labeled{k}_{n}" for k in (0, 1) for n in labeled} | {f"pseudo_{n}" for n in with_masks}

    # The report: the table's row and the evaluation.
    report = json.loads((r0 / "report.json").read_text())
    for _, key, _ in engine.COLUMNS:
        assert key in report, key
    assert report["round"] == 0 and report["model_step_in"] == 0 and report["model_step"] == 2
    assert report["num_images"] == 3 and report["num_train_records"] == len(names)
    assert report["num_train_pseudo_records"] == len(with_masks)
    assert report["masks_per_image"] == report["num_pseudo_masks"] / 3 > 0
    assert 0.0 <= report["pseudo_mean_best_iou"] <= 1.0 and 0.0 <= report["gt_recall"] <= 1.0  # GT exists here
    assert np.isfinite(report["train_loss"]) and report["eval"]["num_images"] == 2
    assert 0.0 <= report["miou_1click"] <= 1.0 and report["miou_last_click"] == report["eval"]["miou_2click"]
    assert (r0 / "train" / "model").is_dir()

    # A second call: the finished round is skipped, nothing is rewritten.
    metrics = (r0 / "train" / "metrics.jsonl").read_text()
    before = {"round": _mtimes(r0), "pseudo": _mtimes(r0 / "pseudo")}
    assert main(_argv(pools, work, 1)) == 0
    out = capsys.readouterr().out
    assert "round 0: done before" in out and "masks/img" in out  # the table, read back
    assert {"round": _mtimes(r0), "pseudo": _mtimes(r0 / "pseudo")} == before

    # An interrupted round (no report yet) resumes without labeling or training again; the
    # next round starts from its model, and its pseudo-labels carry that model's step.
    (r0 / "report.json").unlink()
    assert main(_argv(pools, work, 2)) == 0
    out = capsys.readouterr().out
    assert _mtimes(r0 / "pseudo") == before["pseudo"]
    assert (r0 / "train" / "metrics.jsonl").read_text() == metrics
    assert json.loads((r0 / "report.json").read_text())["model_step"] == 2
    assert f"from checkpoint:{r0 / 'train' / 'model'}" in out
    r1 = json.loads((work / "round_1" / "report.json").read_text())
    assert r1["model_step_in"] == 2 and r1["model_step"] == 4
    for _, js in list_records(work / "round_1" / "pseudo"):
        assert all(a["provenance"] == {"round": 1, "step": 2} for a in json.loads(js.read_text())["annotations"])
    assert out.count("mIoU last click") >= 1 and "data engine: 2 round(s)" in out
