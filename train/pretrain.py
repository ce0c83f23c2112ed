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

The records are decoded once and kept in memory at the model's size (the synthetic shapes:
~200 MB for 1000 images); batches are drawn with replacement from a seeded generator and run
data parallel over the local devices.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from sam_jax.config import SamConfig
from sam_jax.model import encode, init_params
from sam_jax.train import sharding as shd
from sam_jax.train.data import resize_masks
from sam_jax.train.sa1b import DataError, list_records, load_record
from sam_jax.transforms import get_preprocess_shape, preprocess


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


def token_logits(params: dict, images: jax.Array, config: SamConfig) -> jax.Array:
    """images (B, S, S, 3) -> per-token class logits (B, g, g, 1 + K) of the linear head."""
    feats = encode(params["sam"], images, config=config).embedding
    return feats @ params["head"]["kernel"] + params["head"]["bias"]


def kinds_loss(params: dict, batch: dict[str, jax.Array], config: SamConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted soft cross-entropy over tokens -> (loss, metrics: loss, token_accuracy of
    the tokens mostly inside a categorised mask)."""
    logits = token_logits(params, batch["images"], config)
    per_token = optax.softmax_cross_entropy(logits, batch["targets"])
    w = batch["weight"]
    loss = (per_token * w).sum() / jnp.maximum(w.sum(), 1.0)
    shape = (batch["targets"][..., 1:].sum(-1) > 0.5) & (w > 0.5)
    hit = jnp.argmax(logits[..., 1:], -1) == jnp.argmax(batch["targets"][..., 1:], -1)
    return loss, {"loss": loss, "token_accuracy": (hit & shape).sum() / jnp.maximum(shape.sum(), 1)}


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
    """Train the image encoder of the model `config` on the kinds task, on the records of `data_dir` (a folder or
    several); write the SAM params (the encoder
    trained, the rest at their init) to `out` with `checkpoint.save_params`, for
    `init = "encoder:OUT"`. At each log before the last, the params are also written to
    `OUT.step_N` (the previous one removed; the last removed once `out` is written), so a
    crash keeps the latest. Returns {"steps", "seconds", "loss", "token_accuracy" (the means
    since the previous log, at the end), "heldout_mask_accuracy" (with `heldout_dir`, at the
    end), "history" (each log's)}. AdamW, linear warmup then
    cosine decay to 0, batches of `batch_size` split over the local devices."""
    from sam_jax.checkpoint import save_params

    out = Path(out)
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
    data = load_kinds(data_dir, categories, config)
    heldout = load_kinds(heldout_dir, categories, config) if heldout_dir else None
    log(
        f"pretrain-kinds: {len(data['images'])} images, categories {categories}, model {config.name}, {n_dev} device(s)"
    )

    mesh = shd.make_mesh(n_dev, 1, devices=jax.local_devices())
    replicated, split = NamedSharding(mesh, P()), shd.batch_sharding(mesh)
    key_sam, key_head = jax.random.split(jax.random.key(seed))
    head = {
        "kernel": jax.random.normal(key_head, (config.prompt_embed_dim, 1 + len(categories))) * 0.01,
        "bias": jnp.zeros((1 + len(categories),)),
    }
    params = jax.device_put({"sam": init_params(config, key_sam), "head": head}, replicated)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.cosine_decay_schedule(lr, steps - warmup_steps)],
        [warmup_steps],
    )
    train_only = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731  the encoder and the head
        lambda path, _: "train" if path[0].key == "head" or path[1].key == "image_encoder" else "frozen", p
    )
    tx = optax.multi_transform(
        {"train": optax.adamw(schedule, weight_decay=weight_decay), "frozen": optax.set_to_zero()}, train_only(params)
    )
    opt_state = jax.device_put(tx.init(params), replicated)

    @jax.jit
    def step(params, opt_state, batch):
        (_, metrics), grads = jax.value_and_grad(kinds_loss, has_aux=True)(params, batch, config)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    rng = np.random.default_rng(seed)
    t0, acc, losses, result, history, last_snapshot = time.perf_counter(), [], [], {}, [], None
    for i in range(steps):
        idx = rng.integers(0, len(data["images"]), batch_size)
        batch = jax.device_put({k: data[k][idx] for k in ("images", "targets", "weight")}, split)
        params, opt_state, metrics = step(params, opt_state, batch)
        acc.append(metrics["token_accuracy"])
        losses.append(metrics["loss"])
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            result = {"step": i + 1, "loss": float(np.mean(losses)), "token_accuracy": float(np.mean(acc))}
            acc, losses = [], []
            line = f"step {i + 1}: loss {result['loss']:.4f} token accuracy {result['token_accuracy']:.3f}"
            if heldout is not None:
                result["heldout_mask_accuracy"] = mask_accuracy(params, heldout, config)
                line += f" held-out mask accuracy {result['heldout_mask_accuracy']:.3f}"
            history.append(result)
            log(f"{line} ({time.perf_counter() - t0:.0f} s)")
            if i + 1 < steps:  # a crash keeps the last snapshot, a checkpoint `init = "encoder:PATH"` takes
                snapshot = save_params(out.with_name(f"{out.name}.step_{i + 1}"), jax.device_get(params["sam"]), config)
                if last_snapshot is not None:
                    shutil.rmtree(last_snapshot)
                last_snapshot = snapshot
    save_params(out, jax.device_get(params["sam"]), config)
    if last_snapshot is not None:
        shutil.rmtree(last_snapshot)
    return {"steps": steps, "seconds": time.perf_counter() - t0, **result, "history": history}
