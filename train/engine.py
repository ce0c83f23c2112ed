"""The SAM data engine (Kirillov et al. 2023, section 4, the fully automatic stage), in rounds.

    rows = run_engine(cfg, workdir)     # cfg: a training config with an `engine` section
    print(format_table(rows))

Round r (0-based):
  1. the current model segments every image of `engine.unlabeled_dir` automatically
     (`SamAutomaticMaskGenerator`, a grid of point prompts);
  2. the masks are filtered as in the paper: predicted IoU, stability, box NMS, holes and
     islands under `min_mask_region_area` removed (all in the generator), then the area
     bounds `min_area` <= area < `max_area_fraction` x the image;
  3. the pseudo-labels are written in the SA-1B format, each annotation with its
     provenance `{"round": r, "step": the generating model's step}`;
  4. the model trains `steps_per_round` steps on the labeled records (each
     `labeled_oversample` times) plus the pseudo-labeled ones;
  5. the trained model is evaluated on `engine.eval_dir` (`sam_jax.train.evaluate`).

The current model of round 0 is the config's `init` ("scratch" or a checkpoint); from
scratch its pseudo-labels are few or none, and round 0 amounts to training on the labeled
data. Round r > 0 uses the model exported by round r - 1 and trains on from it
(`init = "checkpoint:PATH"`) with a fresh optimizer (the schedule restarts each round) and
the seed `cfg.seed + r`. Model steps (provenance, the table) count the steps trained by
this engine: the model trained in round r is at step (r + 1) x steps_per_round.

Work directory, one folder a round:
  round_{r}/pseudo/       NAME.jpg (a link to the unlabeled image) + NAME.json: {"image":
                          {image_id, file_name, height, width}, "annotations": [{id,
                          segmentation (COCO RLE, counts a str), bbox (XYWH), area,
                          predicted_iou, stability_score, point_coords, crop_box,
                          provenance}]}; an image without masks has an empty list
  round_{r}/train_data/   links: labeled{k}_NAME.* for k < labeled_oversample, and
                          pseudo_NAME.* for the pseudo-labeled images with masks
  round_{r}/train/        the Trainer's work directory (checkpoints/, metrics.jsonl, model/)
  round_{r}/report.json   the round's row of the table plus the full evaluation

Resumable: every file is written atomically (a temporary name, then `os.replace`); a round
whose report.json exists is skipped; within a round, images already pseudo-labeled are not
labeled again, a complete train_data/ is kept, and the Trainer resumes from its last
checkpoint. One process only (the generator and the file writes are not distributed).

Pseudo-label quality, where ground truth exists (a JSON of the same name in
`engine.unlabeled_gt_dir`, or else in `engine.unlabeled_dir`; never trained on): the mean
over pseudo masks of their best IoU with a ground-truth mask (precision-like), and the
fraction of ground-truth masks (non-empty, <= 90% of the image, as in evaluation) that some
pseudo mask matches with IoU >= 0.5 (recall-like).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from pycocotools import mask as mask_utils

from sam_jax.files import IMAGE_SUFFIXES, FileFormatError, read_image, read_json, write_json
from sam_jax.train.sa1b import DataError, list_records, load_record
from sam_jax.train.trainer import METRICS_FILE, MODEL_DIR, TrainingError

REPORT_FILE = "report.json"
PSEUDO_DIR = "pseudo"
TRAIN_DATA_DIR = "train_data"
TRAIN_DIR = "train"
RECALL_IOU = 0.5  # a ground-truth mask counts as recovered at this IoU

# The generator's options, read from the `engine` section under the same names.
GENERATOR_KEYS = (
    "points_per_side",
    "points_per_batch",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "crop_n_layers",
    "crop_nms_thresh",
    "crop_n_points_downscale_factor",
    "min_mask_region_area",
)

# The table: (column title, report key, format).
COLUMNS = (
    ("round", "round", "d"),
    ("step", "model_step", "d"),
    ("images", "num_images", "d"),
    ("masks/img", "masks_per_image", ".2f"),
    ("pseudo IoU", "pseudo_mean_best_iou", ".3f"),
    ("GT recall@.5", "gt_recall", ".3f"),
    ("train recs", "num_train_records", "d"),
    ("loss", "train_loss", ".4f"),
    ("mIoU 1 click", "miou_1click", ".4f"),
    ("mIoU last click", "miou_last_click", ".4f"),
)


# ----------------------------------------------------------------------------- config


def _folder(e: ml_collections.ConfigDict, key: str, *, required: bool = True) -> Path | None:
    value = str(e.get(key) or "")
    if not value:
        if required:
            raise TrainingError(f"engine.{key} is not set")
        return None
    if not Path(value).is_dir():
        raise TrainingError(f"engine.{key}: {value} is not a folder")
    return Path(value).absolute()


def _int(e: ml_collections.ConfigDict, key: str, low: int) -> int:
    value = e.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainingError(f"engine.{key} must be an integer >= {low}, got {value!r}")
    return value


def check_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validate the `engine` section of `cfg` (the folders must exist and hold data) -> it.

    Raises TrainingError naming the key."""
    e = cfg.get("engine")
    if not isinstance(e, ml_collections.ConfigDict):
        raise TrainingError("the config has no engine section (see train/configs/engine_shapes_tiny.py)")
    missing = [
        k
        for k in (
            "rounds",
            "steps_per_round",
            "labeled_oversample",
            "min_area",
            "max_area_fraction",
            "eval_clicks",
            *GENERATOR_KEYS,
        )
        if k not in e
    ]
    if missing:
        raise TrainingError(f"the engine section lacks {', '.join('engine.' + k for k in missing)}")
    for key, low in (
        ("rounds", 1),
        ("steps_per_round", 1),
        ("labeled_oversample", 0),
        ("min_area", 0),
        ("eval_clicks", 1),
        ("max_unlabeled_images", 0),
        ("eval_max_images", 0),
    ):
        if key in e:  # the last two are optional (0: all)
            _int(e, key, low)
    if not 0.0 < float(e.max_area_fraction) <= 1.0:
        raise TrainingError(f"engine.max_area_fraction must be in (0, 1], got {e.max_area_fraction!r}")
    labeled = _folder(e, "labeled_dir", required=e.labeled_oversample > 0)
    if labeled is not None and e.labeled_oversample > 0 and not list_records(labeled):
        raise TrainingError(f"engine.labeled_dir: no (image, json) records in {labeled}")
    if not unlabeled_images(cfg):
        raise TrainingError(f"engine.unlabeled_dir: no images ({', '.join(IMAGE_SUFFIXES)}) in {e.unlabeled_dir}")
    _folder(e, "unlabeled_gt_dir", required=False)
    if not list_records(_folder(e, "eval_dir")):
        raise TrainingError(f"engine.eval_dir: no (image, json) records in {e.eval_dir}")
    return e


def unlabeled_images(cfg: ml_collections.ConfigDict) -> list[Path]:
    """The images of `engine.unlabeled_dir`, sorted by name (the first `max_unlabeled_images`)."""
    root = _folder(cfg.engine, "unlabeled_dir")
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise TrainingError(f"engine.unlabeled_dir: several images named {dup[0]}.* (pseudo-labels go to NAME.json)")
    return images[: cfg.engine.get("max_unlabeled_images") or None]


# ----------------------------------------------------------------------------- files


def _link(src: Path, dst: Path) -> None:
    """Make dst an (absolute) symbolic link to src, or a copy where links are unsupported;
    atomically, replacing dst."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(src.resolve(), tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ----------------------------------------------------------------------------- 1-3: pseudo-labels


def make_generator(model, e: ml_collections.ConfigDict):
    """The `SamAutomaticMaskGenerator` of the engine's options (COCO RLE output)."""
    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(model, output_mode="coco_rle", **{k: e[k] for k in GENERATOR_KEYS})


def within_area_bounds(
    records: list[dict], hw: tuple[int, int], *, min_area: int, max_area_fraction: float
) -> list[dict]:
    """The generator's records whose area is >= min_area and < max_area_fraction x H x W."""
    limit = max_area_fraction * hw[0] * hw[1]
    return [r for r in records if min_area <= r["area"] < limit and r["area"] > 0]


def pseudo_label(
    generator,
    image: np.ndarray,
    e: ml_collections.ConfigDict,
    *,
    image_id: int,
    file_name: str,
    round_index: int,
    step: int,
) -> dict:
    """One image (H, W, 3) uint8 -> its SA-1B record of filtered pseudo-labels with provenance."""
    h, w = image.shape[:2]
    records = within_area_bounds(
        generator.generate(image), (h, w), min_area=int(e.min_area), max_area_fraction=float(e.max_area_fraction)
    )
    provenance = {"round": round_index, "step": step}
    return {
        "image": {"image_id": image_id, "file_name": file_name, "height": h, "width": w},
        "annotations": [{"id": i, **r, "provenance": provenance} for i, r in enumerate(records)],
    }


def label_pool(
    get_model, cfg: ml_collections.ConfigDict, out_dir: Path, *, round_index: int, step: int, log=print
) -> int:
    """Pseudo-label the unlabeled images into out_dir (NAME.* linked + NAME.json) with the
    model `get_model()` (called once, only if an image is left to label); images already
    labeled there are skipped, corrupt ones skipped with a warning -> number skipped."""
    e = cfg.engine
    out_dir.mkdir(parents=True, exist_ok=True)
    generator, skipped = None, 0
    images = unlabeled_images(cfg)
    for image_id, path in enumerate(images):
        target = out_dir / f"{path.stem}.json"
        if target.exists():
            continue
        try:
            image = read_image(path)
        except FileFormatError as err:
            warnings.warn(f"skipping unreadable unlabeled image: {err}", RuntimeWarning, stacklevel=2)
            skipped += 1
            continue
        if generator is None:
            generator = make_generator(get_model(), e)
        record = pseudo_label(
            generator, image, e, image_id=image_id, file_name=path.name, round_index=round_index, step=step
        )
        _link(path, out_dir / path.name)  # the image first: a JSON never stands without it
        write_json(target, record)
        log(
            f"round {round_index}: {path.name}: {len(record['annotations'])} pseudo masks "
            f"({image_id + 1}/{len(images)})"
        )
    return skipped


def match_ious(pseudo_rles: list[dict], gt_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO RLEs of P pseudo masks, gt_masks (G, H, W) bool -> (each pseudo mask's best IoU
    with a gt mask (P,), each gt mask's best IoU with a pseudo mask (G,)); 0 where the other side is empty."""
    p, g = len(pseudo_rles), len(gt_masks)
    if p == 0 or g == 0:
        return np.zeros(p), np.zeros(g)
    gt_rles = mask_utils.encode(np.asfortranarray(gt_masks.transpose(1, 2, 0).astype(np.uint8)))
    iou = np.asarray(mask_utils.iou(pseudo_rles, gt_rles, [0] * g), np.float64).reshape(p, g)
    return iou.max(axis=1), iou.max(axis=0)


def pool_stats(cfg: ml_collections.ConfigDict, pseudo_dir: Path) -> dict[str, Any]:
    """Masks per image and, where ground truth exists, the pseudo-labels' quality."""
    from sam_jax.train.evaluate import usable_masks

    e = cfg.engine
    gt_dir = _folder(e, "unlabeled_gt_dir", required=False) or _folder(e, "unlabeled_dir")
    counts, best_pseudo, best_gt = [], [], []
    for path in unlabeled_images(cfg):
        pseudo_json = pseudo_dir / f"{path.stem}.json"
        if not pseudo_json.exists():
            continue  # unreadable image
        anns = read_json(pseudo_json)["annotations"]
        counts.append(len(anns))
        gt_json = gt_dir / f"{path.stem}.json"
        if gt_json.is_file():
            try:
                gt = usable_masks(load_record(path, gt_json)["masks"])
            except DataError as err:
                warnings.warn(f"not scoring {path.name} against its ground truth: {err}", RuntimeWarning, stacklevel=2)
                continue
            bp, bg = match_ious([a["segmentation"] for a in anns], gt)
            best_pseudo.append(bp)
            best_gt.append(bg)
    pseudo_ious = np.concatenate(best_pseudo) if best_pseudo else np.zeros(0)
    gt_ious = np.concatenate(best_gt) if best_gt else np.zeros(0)
    return {
        "num_images": len(counts),
        "num_pseudo_masks": int(sum(counts)),
        "masks_per_image": float(np.mean(counts)) if counts else 0.0,
        "num_images_with_gt": len(best_gt),
        "num_gt_masks": int(gt_ious.size),
        "pseudo_mean_best_iou": float(pseudo_ious.mean()) if pseudo_ious.size else None,
        "gt_recall": float((gt_ious >= RECALL_IOU).mean()) if gt_ious.size else None,
    }


# ----------------------------------------------------------------------------- 4: training data, training


def build_train_dir(out: Path, labeled_dir: Path | None, pseudo_dir: Path, oversample: int) -> None:
    """Link the labeled records (each `oversample` times, as labeled{k}_NAME.*) and the
    pseudo-labeled records with at least one mask (pseudo_NAME.*) into the new folder `out`
    (built aside, then renamed)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    labeled = list_records(labeled_dir) if labeled_dir is not None and oversample > 0 else []
    for k in range(oversample):
        for image, js in labeled:
            _link(image, tmp / f"labeled{k}_{image.name}")
            _link(js, tmp / f"labeled{k}_{js.name}")
    pseudo = [(image, js) for image, js in list_records(pseudo_dir) if read_json(js)["annotations"]]
    for image, js in pseudo:
        _link(image, tmp / f"pseudo_{image.name}")
        _link(js, tmp / f"pseudo_{js.name}")
    if not labeled and not pseudo:
        shutil.rmtree(tmp)
        raise TrainingError(
            "nothing to train on: no labeled records (engine.labeled_oversample 0) and no pseudo-labels"
        )
    os.replace(tmp, out)


def _last_logged(workdir: Path) -> dict[str, Any]:
    """The last line of the Trainer's metrics.jsonl ({} when there is none)."""
    path = workdir / METRICS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def train_round(
    cfg: ml_collections.ConfigDict, train_data: Path, workdir: Path, init: str, seed: int, quiet: bool
) -> dict:
    """Train (or resume) cfg.engine.steps_per_round steps on train_data from `init` -> the last logged metrics."""
    from sam_jax.train.trainer import Trainer

    tc = ml_collections.ConfigDict(cfg.to_dict())
    tc.data.train_dir = str(train_data)
    tc.steps = int(cfg.engine.steps_per_round)
    tc.init = init
    tc.seed = seed
    trainer = Trainer(tc, workdir, quiet=quiet)
    try:
        trainer.train()
    finally:
        trainer.close()
    return _last_logged(workdir)


# ----------------------------------------------------------------------------- rounds


def _model_step(workdir: Path, r: int) -> int:
    """The step of round r's current model (steps trained by this engine)."""
    return 0 if r == 0 else int(read_json(workdir / f"round_{r - 1}" / REPORT_FILE)["model_step"])


def current_model(cfg: ml_collections.ConfigDict, workdir: Path, r: int):
    """Round r's current model: a SamModel in the config's compute dtype."""
    from sam_jax.checkpoint import load_model

    if r == 0:
        from sam_jax.model import SamModel, abstract_params
        from sam_jax.train import sharding as shd
        from sam_jax.train.trainer import initial_params, model_config

        # Placed as the Trainer places them, so that its own init of the same params is a
        # hit in the persistent compilation cache (compiling the random init is slow).
        mc = model_config(cfg)
        shardings = shd.logical_shardings(abstract_params(mc, boxed=True), shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp))
        return SamModel(mc, initial_params(cfg, mc, shardings))
    return load_model(workdir / f"round_{r - 1}" / TRAIN_DIR / MODEL_DIR, dtype=cfg.dtype)


def run_round(cfg: ml_collections.ConfigDict, workdir: Path, r: int, *, quiet: bool = False) -> dict[str, Any]:
    """Run (or finish) round r -> its report (also written to round_{r}/report.json)."""
    from sam_jax.checkpoint import load_model
    from sam_jax.train.evaluate import evaluate

    e = cfg.engine
    log = (lambda *_: None) if quiet else (lambda text: print(text, flush=True))
    rdir = workdir / f"round_{r}"
    rdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    step = _model_step(workdir, r)
    get_model = lambda: current_model(cfg, workdir, r)  # noqa: E731
    skipped = label_pool(get_model, cfg, rdir / PSEUDO_DIR, round_index=r, step=step, log=log)
    stats = pool_stats(cfg, rdir / PSEUDO_DIR)
    t1 = time.perf_counter()

    train_data = rdir / TRAIN_DATA_DIR
    if not train_data.is_dir():
        build_train_dir(
            train_data, _folder(e, "labeled_dir", required=False), rdir / PSEUDO_DIR, int(e.labeled_oversample)
        )
    names = [image.name for image, _ in list_records(train_data)]
    num_records = len(names)
    init = cfg.init if r == 0 else f"checkpoint:{workdir / f'round_{r - 1}' / TRAIN_DIR / MODEL_DIR}"
    log(f"round {r}: training {e.steps_per_round} steps on {num_records} records from {init}")
    last = train_round(cfg, train_data, rdir / TRAIN_DIR, init, int(cfg.seed) + r, quiet)
    t2 = time.perf_counter()

    trained = load_model(rdir / TRAIN_DIR / MODEL_DIR, dtype=cfg.dtype)
    results = evaluate(
        trained.params,
        trained.config,
        _folder(e, "eval_dir"),
        num_clicks=int(e.eval_clicks),
        max_images=e.get("eval_max_images") or None,
    )
    report = {
        "round": r,
        "model_step_in": step,
        "model_step": step + int(e.steps_per_round),
        **stats,
        "num_skipped_images": skipped,
        "num_train_records": num_records,
        "num_train_pseudo_records": sum(n.startswith("pseudo_") for n in names),
        "train_loss": last.get("loss"),
        "miou_1click": results["miou_1click"],
        "miou_last_click": results["per_click"][-1],
        "eval": results,
        "seconds": {"pseudo_label": t1 - t0, "train": t2 - t1, "eval": time.perf_counter() - t2},
        "engine": e.to_dict(),
    }
    write_json(rdir / REPORT_FILE, report)
    return report


def run_engine(
    cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, quiet: bool = False
) -> list[dict[str, Any]]:
    """Run (or resume) the `cfg.engine.rounds` rounds in workdir -> one report a round.

    Rounds whose report.json exists are skipped (their report is read back). Unless
    `quiet`, the table of the rounds so far is printed after each round run (and at the
    end when the last round was done before)."""
    import jax

    if jax.process_count() > 1:
        raise TrainingError(f"the data engine runs in one process (got {jax.process_count()})")
    e = check_config(cfg)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    rows, printed = [], False
    for r in range(int(e.rounds)):
        report_path = workdir / f"round_{r}" / REPORT_FILE
        if report_path.exists():
            rows.append(read_json(report_path))
            printed = False
            if not quiet:
                print(f"round {r}: done before ({report_path}), skipped", flush=True)
            continue
        rows.append(run_round(cfg, workdir, r, quiet=quiet))
        printed = not quiet
        if printed:
            print(format_table(rows), flush=True)
    if not quiet and not printed:
        print(format_table(rows), flush=True)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line a round: the model's step after it, images and pseudo masks per image, the
    pseudo-labels' quality ("-" without ground truth), training records and last loss,
    held-out mIoU after 1 and after the last click."""

    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key)
        return "-" if value is None else format(value, fmt)

    table = [[title for title, _, _ in COLUMNS]] + [[cell(row, key, fmt) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table)
