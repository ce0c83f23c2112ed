"""`sam-jax finetune`: a released SAM and one's own annotations in, a fine-tuned model and a
before/after report out.

    report = finetune("sam_vit_b.pth", "annotations/instances.json", "ft", mode="decoder", steps=500)

The data is anything `train.sources.open_source` recognises (a COCO instances file, an images/ +
masks/ folder, an SA-1B-layout folder); the model type and the initial params come from the
checkpoint (any form `sam_jax.load_model` reads). The recipe is `train/configs/finetune.py`, and
training is the one `Trainer` and train step of `sam-jax train` in every mode:

* ``decoder``: the image encoder is frozen. Each training image is encoded once and its
  encoder output cached on disk (`train.embedding_cache`); the batches then carry the cached
  embeddings instead of images, and the step runs the prompt encoder and mask decoder only.
* ``lora``: low-rank adapters (`train.lora`) on the frozen encoder, plus the prompt encoder and
  decoder; `model/` holds the adapters merged, a plain SAM checkpoint.
* ``full``: every parameter trains, with the paper's drop path and layer decay.

An HQ-SAM checkpoint (vit_*_hq) trains its HQ layers alone in every mode, SAM frozen, as HQ-SAM's
own training (`optim.trainable_labels`): ``decoder`` (the encoder's outputs cached) is the fast one,
``full`` runs the frozen encoder every step, ``lora`` is refused (its adapters would never train).
A plain SAM checkpoint trains as HQ-SAM, as HQ-SAM's training begins, with its HQ variant named
(`hq_variant`): ``--config.model=vit_b_hq`` on a vit_b checkpoint starts vit_b_hq from its weights
and new HQ layers; its ``before`` scores are the SAM checkpoint's own.

The held-out set (``val``, else a fixed-seed split of the training images) is scored with the
interactive protocol of `train.evaluate` (1 click, 3 clicks, box) before training, every
``eval_every`` steps and at the end.

Work directory:
  embeddings/     decoder mode: the frozen encoder's output per training image
  checkpoints/, checkpoint_manifests/, metrics.jsonl, model/   as `sam-jax train` (a rerun resumes)
  before.json     the held-out scores of the checkpoint (a resumed run reads them back)
  report.json     {"before", "after", "data": {"images", "masks", "skipped"}, "mode", "steps", "seconds"}
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from sam_jax.config import CONFIGS, SamConfig
from sam_jax.files import FileFormatError, read_json, write_json
from sam_jax.train.coco import EMPTY_MASK, NO_MASKS
from sam_jax.train.sa1b import mask_areas
from sam_jax.train.trainer import TrainingError, apply_overrides, load_config_file, model_config

MODES = ("decoder", "lora", "full")
RECIPE = "finetune"
EMBEDDINGS_DIR = "embeddings"
BEFORE_FILE = "before.json"
REPORT_FILE = "report.json"
# The report's metric names -> the keys of `train.evaluate.evaluate`'s results.
METRICS = {
    "1-click": "miou_1click",
    "1-click-predicted": "miou_1click_predicted",
    "3-click": "miou_3click",
    "box": "miou_box",
}
# The paper's drop path and layer-wise lr decay per model (appendix A), for full mode.
PAPER_REGULARISATION = {"vit_b": (0.6, 0.6), "vit_l": (0.4, 0.8), "vit_h": (0.4, 0.8)}
TOO_LARGE = "mask over data.max_mask_fraction of the image"


class FinetuneError(TrainingError):
    """A fine-tune that cannot start (a bad mode, step count or data set); the message is one line."""


# ----------------------------------------------------------------------------- config


def check_arguments(mode: str, steps: int | None) -> None:
    """Refuse an unknown mode or a step count below 1, before anything is loaded."""
    if mode not in MODES:
        raise FinetuneError(f"--mode {mode!r} is not a fine-tuning mode; expected one of {', '.join(MODES)}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise FinetuneError(f"--steps {steps!r} must be a positive number of optimizer steps")


def finetune_config(
    model: SamConfig,
    checkpoint: str | Path,
    train: str | Path,
    *,
    train_images: str | Path | None = None,
    mode: str = "decoder",
    steps: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> ml_collections.ConfigDict:
    """The training config of a fine-tune: the `finetune` recipe with `overrides`, its model the
    checkpoint's (`model`; a `model=` override may name its HQ-SAM variant, `hq_variant`), its
    params from `checkpoint`, then the mode's settings."""
    check_arguments(mode, steps)
    cfg = apply_overrides(load_config_file(RECIPE), list(overrides))
    if any(item.partition("=")[0] == "model" for item in overrides):  # --config.model=NAME
        model = hq_variant(model, cfg.model)
    if mode == "lora" and model.mask_decoder.hq_token:
        raise FinetuneError(
            f"--mode lora: {model.name} is an HQ-SAM model, which trains its HQ layers alone with SAM frozen; "
            "use --mode decoder"
        )
    cfg.mode = mode
    if steps is not None:
        cfg.steps = steps
    check_arguments(cfg.mode, cfg.steps)
    cfg.model = model.name if model.name in CONFIGS else "vit_b"  # every field is overridden below
    cfg.model_overrides = ml_collections.ConfigDict({k: v for k, v in model.to_dict().items() if k != "dtype"})
    cfg.init = f"checkpoint:{Path(checkpoint).absolute()}"
    cfg.data.train_dir = str(Path(train).absolute())
    cfg.data.train_images = str(Path(train_images).absolute()) if train_images else ""
    if cfg.optim.warmup_steps < 0:
        cfg.optim.warmup_steps = round(0.05 * cfg.steps)
    drop_path, layer_decay = PAPER_REGULARISATION.get(model.name, (0.0, 1.0)) if mode == "full" else (0.0, 1.0)
    if cfg.drop_path_rate < 0:
        cfg.drop_path_rate = drop_path
    if cfg.optim.layer_decay < 0:
        cfg.optim.layer_decay = layer_decay
    cfg.optim.freeze_image_encoder = mode == "decoder"
    if mode == "lora" and cfg.lora.rank < 1:
        raise FinetuneError(f"--mode lora needs lora.rank >= 1, got {cfg.lora.rank}")
    if mode != "lora":
        cfg.lora.rank = 0  # no adapters
    return cfg


def hq_variant(model: SamConfig, name: str) -> SamConfig:
    """The model `name` (a `model=` override) names for a checkpoint of `model`: the checkpoint's own,
    or its HQ-SAM variant (vit_b -> vit_b_hq, vit_l -> vit_l_hq, vit_h -> vit_h_hq, vit_t -> vit_tiny_hq;
    another model's NAME_hq), which starts from the checkpoint with new HQ layers (`trainer.initial_params`)."""
    hq_name = "vit_tiny_hq" if model.name == "vit_t" else f"{model.name}_hq"
    if name == model.name:
        return model
    if model.mask_decoder.hq_token or name != hq_name:
        allowed = model.name if model.mask_decoder.hq_token else f"{model.name} or its HQ-SAM variant {hq_name}"
        raise FinetuneError(f"--config.model={name}: the checkpoint is {model.name}; fine-tune it as {allowed}")
    try:
        return dataclasses.replace(
            model, name=name, mask_decoder=dataclasses.replace(model.mask_decoder, hq_token=True)
        )
    except ValueError as e:
        raise FinetuneError(f"--config.model={name}: {e}") from None


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class SubsetSource:
    """The records `indices` of a record source (`train.sources`), as a grain random-access source;
    its skip counts are the whole source's."""

    source: Any
    indices: list[int]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.source[self.indices[index]]

    @property
    def skipped(self) -> dict[str, int]:
        return self.source.skipped

    @property
    def num_skipped(self) -> int:
        return self.source.num_skipped

    @property
    def root(self) -> Path:
        return self.source.root


def heldout_split(n: int, fraction: float, seed: int, cap: int) -> tuple[list[int], list[int]]:
    """n images -> (training indices, held-out indices): a fixed-seed random `fraction` of them (at
    least 1, at most `cap` when cap > 0) held out, both lists sorted."""
    if n < 2:
        raise FinetuneError(f"the training data has {n} usable image(s): too few to hold out a split; pass --val")
    if not 0.0 < fraction < 1.0:
        raise FinetuneError(f"val_fraction={fraction} must lie strictly between 0 and 1")
    k = max(1, round(fraction * n))
    k = min(k, cap, n - 1) if cap > 0 else min(k, n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in order[k:]), sorted(int(i) for i in order[:k])


def scan_training_data(source: Any, indices: list[int], max_mask_fraction: float, cache: Any, quiet: bool) -> tuple:
    """Read every training record once: count its usable masks (non-empty, at most
    `max_mask_fraction` of the image; the others counted as skips) and, with an embedding `cache`,
    encode it unless cached. -> (indices of the records that train, {"images", "masks", "encoded"},
    {skip reason: count} of this scan)."""
    from tqdm import tqdm

    keep, skipped = [], {}
    masks = encoded = 0
    desc = "encoding training images" if cache is not None else "reading training images"
    for i in tqdm(indices, desc=desc, unit="img", disable=quiet or not sys.stderr.isatty()):
        record = source[i]
        if record is None:  # counted by the source, per reason
            continue
        h, w = record["masks"].shape[1:]
        area = mask_areas(record["masks"])  # an RleMasks' without decoding
        usable = int(((area > 0) & (area <= max_mask_fraction * h * w)).sum())
        _add(skipped, EMPTY_MASK, int((area == 0).sum()))
        _add(skipped, TOO_LARGE, int((area > max_mask_fraction * h * w).sum()))
        if not usable:
            _add(skipped, NO_MASKS, 1)
            continue
        if cache is not None:
            encoded += cache.ensure(record["image"])
        keep.append(i)
        masks += usable
    return keep, {"images": len(keep), "masks": masks, "encoded": encoded}, skipped


def _add(counts: dict[str, int], reason: str, n: int) -> None:
    if n:
        counts[reason] = counts.get(reason, 0) + n


def _merged_counts(*counts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for reason, n in c.items():
            _add(out, reason, n)
    return dict(sorted(out.items()))


def open_data(cfg: ml_collections.ConfigDict, train: str | Path, train_images, val, val_images) -> tuple:
    """(training source, training indices, held-out data): `val` opened, or a split of `train`."""
    from sam_jax.train.sources import open_source

    include_crowd = bool(cfg.data.include_crowd)
    source = open_source(train, train_images, include_crowd=include_crowd, cache=cfg.data.cache_records)
    if val is None:
        if val_images is not None:
            raise FinetuneError("--val-images needs --val (the held-out COCO file whose images it holds)")
        indices, held = heldout_split(len(source), float(cfg.val_fraction), int(cfg.val_seed), int(cfg.eval_images))
        return source, indices, SubsetSource(source, held)
    heldout = open_source(val, val_images, include_crowd=include_crowd)
    return source, list(range(len(source))), heldout


# ----------------------------------------------------------------------------- scores and report


def heldout_scores(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`train.evaluate.evaluate`'s results (keys with `prefix`, e.g. the trainer's "eval_") -> the report's metrics."""
    return {name: float(results[prefix + key]) for name, key in METRICS.items()}


def format_report(before: dict[str, float], after: dict[str, float]) -> str:
    """The before/after table: one metric a row, its change."""
    width = max(len(n) for n in METRICS)
    lines = [f"{'held-out mIoU':<{width}}  before   after  change"]
    for name in METRICS:
        lines.append(f"{name:<{width}}  {before[name]:6.4f}  {after[name]:6.4f}  {after[name] - before[name]:+.4f}")
    return "\n".join(lines)


def _data_line(counts: dict[str, int], cached: bool) -> str:
    line = f"training data: {counts['images']} images, {counts['masks']} masks"
    if cached:
        line += f"; encoded {counts['encoded']} new image(s), {counts['images'] - counts['encoded']} from the cache"
    return line


def _before_scores(workdir: Path, score) -> dict[str, float]:
    """The checkpoint's held-out scores: read back from before.json, or `score()` written there."""
    path = workdir / BEFORE_FILE
    if path.is_file():
        try:
            return {name: float(v) for name, v in read_json(path).items() if name in METRICS}
        except (FileFormatError, TypeError, ValueError):
            pass  # unreadable: score again
    before = score()
    write_json(path, before)
    return before


# ----------------------------------------------------------------------------- the command


def finetune(
    checkpoint: str | Path,
    train: str | Path,
    workdir: str | Path,
    *,
    train_images: str | Path | None = None,
    val: str | Path | None = None,
    val_images: str | Path | None = None,
    mode: str = "decoder",
    steps: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    quiet: bool = False,
) -> dict[str, Any]:
    """Fine-tune `checkpoint` on `train` in `workdir` (resuming what is there) -> the report, also
    written to workdir/report.json. Prints progress, the skips per reason and the before/after table
    unless `quiet`. Raises FinetuneError / TrainingError, DataError or CheckpointError with a one-line
    message for input it cannot use."""
    from sam_jax.checkpoint import load_model
    from sam_jax.train.evaluate import evaluate

    t0 = time.perf_counter()
    check_arguments(mode, steps)
    workdir = Path(workdir).absolute()
    loaded = load_model(checkpoint)
    cfg = finetune_config(
        loaded.config, checkpoint, train, train_images=train_images, mode=mode, steps=steps, overrides=overrides
    )
    mc = model_config(cfg)
    source, indices, heldout = open_data(cfg, train, train_images, val, val_images)
    workdir.mkdir(parents=True, exist_ok=True)
    cache = None
    if mode == "decoder":
        from sam_jax.train.embedding_cache import EmbeddingCache

        cache = EmbeddingCache(workdir / EMBEDDINGS_DIR, loaded.params, mc)
    indices, counts, scan_skips = scan_training_data(source, indices, cfg.data.max_mask_fraction, cache, quiet)
    skipped = _merged_counts(source.skipped, scan_skips)
    if not indices:
        left = ", ".join(f"{n} {r}" for r, n in skipped.items()) or "nothing readable"
        raise FinetuneError(f"{train}: no usable training image after filtering (left out: {left})")
    if cache is not None:
        cache.params = None  # every training image is encoded: from here on the cache is only read
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    say(_data_line(counts, cache is not None))
    if skipped:
        say("skipped: " + ", ".join(f"{n} {r}" for r, n in skipped.items()))

    def score(params, model) -> dict[str, float]:
        return heldout_scores(evaluate(params, model, heldout, num_clicks=3, max_images=cfg.eval_images or None))

    # The checkpoint as it is: a SAM that trains as HQ-SAM (`hq_variant`) scores as that SAM.
    as_is = mc if mc.mask_decoder.hq_token == loaded.config.mask_decoder.hq_token else loaded.config
    before = _before_scores(workdir, functools.partial(score, loaded.params, as_is))
    del loaded  # the trainer loads the checkpoint's params into its own state

    from sam_jax.train.trainer import Trainer

    embed = (lambda record: cache.load(record["image"])) if cache is not None else None
    trainer = Trainer(cfg, workdir, quiet=quiet, source=SubsetSource(source, indices), embed=embed, eval_data=heldout)
    try:
        last = trainer.train()
        after = heldout_scores(last, "eval_") if "eval_miou_1click" in last else heldout_scores_of(trainer)
    finally:
        trainer.close()
    held_skips = heldout.skipped if val is not None else {}  # a split's are the training source's
    report = {
        "before": before,
        "after": after,
        "data": {
            "images": counts["images"],
            "masks": counts["masks"],
            "skipped": _merged_counts(source.skipped, scan_skips, held_skips),
        },
        "mode": mode,
        "steps": trainer.step,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(workdir / REPORT_FILE, report, indent=1)
    say(format_report(before, after))
    say(f"model -> {workdir / 'model'}; report -> {workdir / REPORT_FILE}")
    return report


def heldout_scores_of(trainer) -> dict[str, float]:
    """The trainer's current held-out scores (`Trainer.evaluate`) as the report's metrics."""
    return heldout_scores(trainer.evaluate(), "eval_")
