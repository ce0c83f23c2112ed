"""Pretraining the image encoder to tell the annotations' categories apart, token by token.

A caption selects every shape of its kind, and SAM's decoder never mixes image tokens with each
other: the kind of a shape must already be in every token of it in the image embedding. An
encoder trained from scratch through SAM's losses does not learn that in thousands of steps
(docs/text-training.md), while the same encoder trained on it directly does, in a few
thousand steps of 8 images with a convolutional stem (`ImageEncoderConfig.conv_stem`).

The task: every token of the encoder's output (the embedding the decoder reads) goes through a
linear head that classifies its cell as background or one of `categories`, against the share
of the cell each covers (a soft cross-entropy; cells of masks without one of the categories do
not count). `sam-jax pretrain-kinds DATA OUT` writes a checkpoint; text training then starts
from its image encoder with `--config.init=encoder:OUT` (`train/configs/shapes_text_p8.py`).

It is a second objective of the one training loop (`kinds_objective`, a `step.Objective`: the batch
`KindsBatch`, the loss `kinds_loss`, the head at params["head"]) run by `trainer.Trainer` in the work
directory `OUT.work` (`work_dir`): the optimizer, sharding, checkpoints, SIGINT/SIGTERM handling and
resumption of `sam-jax train`. A rerun with the same OUT resumes from the newest checkpoint there; once
OUT is written the work directory is removed.

The records are decoded once and kept in memory at the model's size (the synthetic shapes:
~200 MB for 1000 images); batches are drawn with replacement (`kinds_dataset`) and run data parallel
over the local devices.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from PIL import Image

from sam_jax.config import SamConfig
from sam_jax.model import encode
from sam_jax.train import sharding as shd
from sam_jax.train.data import resize_masks
from sam_jax.train.sa1b import DataError, list_records, load_record
from sam_jax.train.step import HEAD, Objective
from sam_jax.transforms import get_preprocess_shape, preprocess

BATCH_FIELDS = ("images", "targets", "weight")


def kind_targets(record: dict, categories: list[str], config: SamConfig) -> tuple[np.ndarray, np.ndarray]:
    """One record -> (targets (g, g, 1 + K), weight (g, g)) float32 on the encoder's grid (g =
    `config.embedding_size`): the share of each cell covered by each of the K `categories`
    (background first, what is left), normalised over the classes; the weight is the share of
    the cell not covered by a mask outside the categories (0 on the padding too)."""
    s, g = config.image_size, config.embedding_size
    h, w = record["image"].shape[:2]
    nh, nw = get_preprocess_shape(h, w, s)
    cover = np.zeros((1 + len(categories) + 1, s, s), np.float32)  # background, the K kinds, other masks
    cover[0, :nh, :nw] = 1.0
    masks = np.asarray(record["masks"], bool)
    if len(masks):
        resized = resize_masks(masks, (nh, nw))
        for mask, category in zip(resized, record["categories"]):
            c = 1 + categories.index(category) if category in categories else len(categories) + 1
            cover[c, :nh, :nw] = np.maximum(cover[c, :nh, :nw], mask)
    shapes = np.minimum(cover[1:].sum(0), 1.0)
    cover[0] *= 1.0 - shapes
    cells = cover.reshape(len(cover), g, s // g, g, s // g).mean((2, 4))  # (1 + K + 1, g, g)
    kinds, other = cells[:-1], cells[-1]
    total = kinds.sum(0)
    weight = np.where(total > 0, total / np.maximum(total + other, 1e-6), 0.0)
    targets = kinds / np.maximum(total, 1e-6)
    return targets.transpose(1, 2, 0).astype(np.float32), weight.astype(np.float32)


def load_kinds(
    data_dir: str | Path | Sequence[str | Path], categories: list[str], config: SamConfig
) -> dict[str, np.ndarray]:
    """Every record of an SA-1B-layout folder (or of several, in their order) -> images (N, S, S, 3) float32
    normalised and padded, targets (N, g, g, 1 + K), weight (N, g, g), and for scoring whole masks: masks
    (N, M, g, g) float32 cell covers of up to M categorised masks, labels (N, M) int32 (-1: none).
    Unreadable records are skipped with a warning, as in training."""
    import warnings

    images, targets, weights, covers, labels = [], [], [], [], []
    s, g = config.image_size, config.embedding_size
    dirs = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
    for image_path, json_path in (r for d in dirs for r in list_records(d)):
        try:
            record = load_record(image_path, json_path)
        except DataError as e:
            warnings.warn(f"skipped: {e}", stacklevel=2)
            continue
        h, w = record["image"].shape[:2]
        nh, nw = get_preprocess_shape(h, w, s)
        images.append(
            preprocess(np.asarray(Image.fromarray(record["image"]).resize((nw, nh), Image.BILINEAR))[None], config)[0]
        )
        t, wt = kind_targets(record, categories, config)
        targets.append(t)
        weights.append(wt)
        keep = [i for i, c in enumerate(record["categories"]) if c in categories]
        frame = np.zeros((len(keep), s, s), np.float32)
        if keep:
            frame[:, :nh, :nw] = resize_masks(np.asarray(record["masks"], bool)[keep], (nh, nw))
        covers.append(frame.reshape(len(keep), g, s // g, g, s // g).mean((2, 4)))
        labels.append([categories.index(record["categories"][i]) for i in keep])
    if not images:
        raise DataError(f"{', '.join(map(str, dirs))}: no readable records")
    m = max(1, max(len(x) for x in labels))
    mask_arr = np.zeros((len(images), m, g, g), np.float32)
    label_arr = np.full((len(images), m), -1, np.int32)
    for i, (c, lab) in enumerate(zip(covers, labels)):
        mask_arr[i, : len(lab)], label_arr[i, : len(lab)] = c, lab
    return {
        "images": np.stack(images),
        "targets": np.stack(targets),
        "weight": np.stack(weights),
        "masks": mask_arr,
        "labels": label_arr,
    }


@struct.dataclass(kw_only=True)
class KindsBatch:
    """B images with their per-token kind targets (`load_kinds`)."""

    images: jax.Array  # (B, S, S, 3) float32, normalised and zero-padded
    targets: jax.Array  # (B, g, g, 1 + K) float32: each cell's share of background and of each kind
    weight: jax.Array  # (B, g, g) float32: how much each cell counts


def _model(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != HEAD}


def token_logits(params: dict, images: jax.Array, config: SamConfig) -> jax.Array:
    """images (B, S, S, 3) -> per-token class logits (B, g, g, 1 + K) of the linear head params["head"]."""
    feats = encode(_model(params), images, config=config).embedding
    return feats @ params[HEAD]["kernel"] + params[HEAD]["bias"]


def kinds_loss(
    params: dict, batch: KindsBatch, rng: jax.Array, *, config: SamConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted soft cross-entropy over tokens -> (loss, metrics: loss, token_accuracy of
    the tokens mostly inside a categorised mask). `rng` is unused (no randomness)."""
    del rng
    logits = token_logits(params, batch.images, config)
    per_token = optax.softmax_cross_entropy(logits, batch.targets)
    w = batch.weight
    loss = (per_token * w).sum() / jnp.maximum(w.sum(), 1.0)
    shape = (batch.targets[..., 1:].sum(-1) > 0.5) & (w > 0.5)
    hit = jnp.argmax(logits[..., 1:], -1) == jnp.argmax(batch.targets[..., 1:], -1)
    return loss, {"loss": loss, "token_accuracy": (hit & shape).sum() / jnp.maximum(shape.sum(), 1)}


def init_head(key: jax.Array, *, config: SamConfig, num_kinds: int) -> dict[str, jax.Array]:
    """The linear per-token head: kernel (C, 1 + num_kinds) ~ N(0, 0.01^2), bias (1 + num_kinds,) zeros."""
    return {
        "kernel": jax.random.normal(key, (config.prompt_embed_dim, 1 + num_kinds)) * 0.01,
        "bias": jnp.zeros((1 + num_kinds,)),
    }


@functools.partial(jax.jit, static_argnames="config")  # module level: compiled once, not at every log
def _mask_hits(
    params: dict, images: jax.Array, masks: jax.Array, labels: jax.Array, config: SamConfig
) -> tuple[jax.Array, jax.Array]:
    kinds = token_logits(params, images, config)[..., 1:]
    cells = (masks > 0.25).astype(jnp.float32)
    mean = jnp.einsum("bmhw,bhwk->bmk", cells, kinds) / jnp.maximum(cells.sum((2, 3)), 1.0)[..., None]
    counted = (labels >= 0) & (cells.sum((2, 3)) > 0)
    return ((jnp.argmax(mean, -1) == labels) & counted).sum(), counted.sum()


def mask_accuracy(params: dict, data: dict[str, np.ndarray], config: SamConfig, batch_size: int = 25) -> float:
    """The share of the categorised masks whose kind logits, averaged over the cells they mostly
    cover (at least a quarter), pick their category: what a decoder that reads every pixel sees."""
    right = total = 0
    for i in range(0, len(data["images"]), batch_size):
        r, t = _mask_hits(
            params,
            data["images"][i : i + batch_size],
            data["masks"][i : i + batch_size],
            data["labels"][i : i + batch_size],
            config,
        )
        right, total = right + int(r), total + int(t)
    return right / max(total, 1)


def kinds_dataset(
    data: dict[str, np.ndarray], *, seed: int, batch_size: int, shard_index: int = 0, shard_count: int = 1
):
    """This process's batches of the in-memory `data` (`load_kinds`): a grain IterDataset of dicts of
    `BATCH_FIELDS` with leading axis `batch_size`, checkpointable. Position p of the stream is the record
    drawn by the generator seeded (seed, p), with replacement; process `shard_index` of `shard_count` reads
    every `shard_count`-th position, so all processes together read what one process would."""
    import grain

    n = len(data["images"])

    def example(position: int) -> dict[str, np.ndarray]:
        i = np.random.default_rng([seed, position]).integers(n)
        return {k: data[k][i] for k in BATCH_FIELDS}

    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * batch_size)
    positions = grain.MapDataset.range(shard_index, 2**62, shard_count)
    return positions.map(example).to_iter_dataset(read).batch(batch_size, drop_remainder=True)


def _dataset(cfg: ml_collections.ConfigDict, data: dict[str, np.ndarray]):
    return kinds_dataset(
        data,
        seed=cfg.seed,
        batch_size=cfg.batch_size // jax.process_count(),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )


def _evaluate(params: dict, heldout: dict[str, np.ndarray], config: SamConfig) -> dict[str, float]:
    return {"eval_mask_accuracy": mask_accuracy(params, heldout, config)}


def kinds_objective(
    config: SamConfig,
    categories: list[str],
    data: dict[str, np.ndarray],
    heldout: dict[str, np.ndarray] | None = None,
) -> Objective:
    """The kinds task as a training objective for `trainer.Trainer`: `kinds_loss` on `KindsBatch`es drawn from
    `data`, the linear head, and with `heldout` (`load_kinds`) the held-out mask accuracy as its evaluation."""
    return Objective(
        name="kinds",
        batch=KindsBatch,
        loss=functools.partial(kinds_loss, config=config),
        head=functools.partial(init_head, config=config, num_kinds=len(categories)),
        log_line=lambda m: f"loss {m['loss']:.4f} token-accuracy {m['token_accuracy']:.3f}",
        dataset=functools.partial(_dataset, data=data),
        evaluate=None if heldout is None else functools.partial(_evaluate, heldout=heldout, config=config),
        trains=("image_encoder",),  # the head reads the image embedding alone
    )


def kinds_config(
    data_dirs: list[str],
    config: SamConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    seed: int,
    eval_every: int,
) -> ml_collections.ConfigDict:
    """The training config of a kinds run: AdamW at `lr` after a linear warmup, then a cosine decay to 0 at
    `steps`, no layer decay nor clipping; a log, a checkpoint and an evaluation every `eval_every` steps."""
    from sam_jax.train.configs import base

    c = base.get_config()
    c.model, c.seed, c.steps, c.batch_size = config.name, seed, steps, batch_size
    c.data.train_dir = ",".join(data_dirs)
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = lr, warmup_steps, weight_decay
    c.optim.decay_steps, c.optim.cosine_decay_end = (), steps
    c.optim.layer_decay, c.optim.grad_clip = 1.0, 0.0
    c.log_every = c.eval_every = c.checkpoint.every = eval_every
    c.checkpoint.keep = 2
    return c


def work_dir(out: str | Path) -> Path:
    """The work directory of a kinds run writing `out` (checkpoints, metrics.jsonl): OUT.work beside it."""
    out = Path(out)
    return out.with_name(f"{out.name}.work")


def _history(workdir: Path) -> list[dict[str, Any]]:
    """Each logged step of metrics.jsonl (the last row of a step logged twice, across a resume):
    step, loss, token_accuracy and, where evaluated, heldout_mask_accuracy."""
    rows: dict[int, dict[str, Any]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        entry = rows.setdefault(row["step"], {"step": row["step"]})
        if "loss" in row:
            entry.update(loss=row["loss"], token_accuracy=row["token_accuracy"])
        if "eval_mask_accuracy" in row:
            entry["heldout_mask_accuracy"] = row["eval_mask_accuracy"]
    return [rows[k] for k in sorted(rows) if "loss" in rows[k]]


def _check_args(out: Path, categories: list[str], steps: int, batch_size: int, warmup_steps: int) -> None:
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output path")
    if not categories or len(set(categories)) != len(categories):
        raise ValueError(f"categories must be distinct and at least one, got {categories!r}")
    n_dev = jax.local_device_count()
    if steps < 1 or batch_size < 1 or batch_size % n_dev or not 0 <= warmup_steps < steps:
        raise ValueError(
            f"need steps >= 1, 0 <= warmup_steps < steps and a batch_size divisible by the {n_dev} local devices; "
            f"got steps={steps}, warmup_steps={warmup_steps}, batch_size={batch_size}"
        )


def pretrain_kinds(
    data_dir: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    categories: list[str],
    config: SamConfig,
    steps: int = 2500,
    batch_size: int = 8,
    lr: float = 2e-3,
    warmup_steps: int = 50,
    weight_decay: float = 0.01,
    seed: int = 0,
    heldout_dir: str | Path | None = None,
    eval_every: int = 500,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Train the image encoder of the model `config` on the kinds task, on the records of `data_dir` (a folder
    or several); write the SAM params (the encoder trained; the rest, which the loss does not use, at their
    init but for weight decay) to `out` with `checkpoint.save_params`, for `init = "encoder:OUT"`.

    Checkpoints go to `work_dir(out)` every `eval_every` steps; a crashed or interrupted run (SIGINT, SIGTERM:
    `trainer.TrainingInterrupted`) resumes there when rerun with the same `out`, and the work directory is
    removed once `out` is written. Returns {"steps", "seconds" (of this call's training), "loss",
    "token_accuracy" (at the last step), "heldout_mask_accuracy" (with `heldout_dir`, at the end), "history"
    (each log's)}. Batches of `batch_size` split over the local devices; `kinds_config` is the optimizer."""
    from sam_jax.train.trainer import Trainer

    out = Path(out)
    _check_args(out, categories, steps, batch_size, warmup_steps)
    dirs = [str(data_dir)] if isinstance(data_dir, (str, Path)) else [str(d) for d in data_dir]
    data = load_kinds(dirs, categories, config)
    heldout = load_kinds(heldout_dir, categories, config) if heldout_dir else None
    n_dev = jax.local_device_count()
    log(
        f"pretrain-kinds: {len(data['images'])} images, categories {categories}, model {config.name}, {n_dev} device(s)"
    )
    cfg = kinds_config(
        dirs,
        config,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        seed=seed,
        eval_every=eval_every,
    )
    mesh = shd.make_mesh(n_dev, 1, devices=jax.local_devices())
    objective = kinds_objective(config, categories, data, heldout)
    trainer = Trainer(cfg, work_dir(out), mesh=mesh, objective=objective, model=config, log=log)
    seconds, history = _train_and_write(trainer, out)
    return {"steps": steps, "seconds": seconds, **history[-1], "history": history}


def _train_and_write(trainer: Any, out: Path) -> tuple[float, list[dict[str, Any]]]:
    """Train to the end, move the exported model to `out` and remove the work directory -> (seconds, history)."""
    t0 = time.perf_counter()
    try:
        trainer.train()
        if not (trainer.workdir / "model").is_dir():  # a rerun of a run that ended before its export
            trainer.export()
    finally:
        trainer.close()
    seconds = time.perf_counter() - t0
    history = _history(trainer.workdir)
    os.replace(trainer.workdir / "model", out)
    shutil.rmtree(trainer.workdir)
    return seconds, history
