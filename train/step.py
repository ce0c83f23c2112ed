"""The training step: pure, jitted, sharded by the caller (`sam_jax.train.sharding`).

    state, metrics = train_step(state, batch, model_config=..., cfg=..., tx=...)
    state, metrics = train_step(state, batch, objective=..., tx=...)   # another objective

What a step minimises is an `Objective`: the batch type, the loss of (params, batch, rng) and
any extra trainable head params (`params["head"]`, beside the model's). The default is SAM's
interactive loss (`sam_objective`, the rest of this module); `train.pretrain` plugs in another.

SAM's batch:
  images (B, S, S, 3) float32, normalized and zero-padded (`transforms.preprocess`); or, with a
         frozen encoder, embeddings: the encoder's cached outputs (`train.embedding_cache`)
  masks  (B, K, m, m) bool ground-truth masks on the loss grid: the decoder's low-res grid
         (m = 4 x embedding side), or a finer one (`loss.mask_size`, e.g. the input size), where
         the logits are upsampled bilinearly (as at inference) before the losses and the
         choice of correction points
  valid  (B, K) bool  which of the K mask slots hold a real mask
  ids    (B,) int32   a unique id per example (its position in the data stream)
  text, text_valid, text_masks (optional: text prompts on, `sam_jax.train.text`):
         (B, K, Dt) CLIP embeddings, (B, K) bool, (B, K, m, m) bool the masks the texts ask for

The random prompts of a mask depend only on (seed, step, example id, mask slot), never on
where the example sits in the batch or on which device: the same examples give the same
loss however the batch is split over devices and processes.

Each image is encoded once; each of its masks runs the interactive simulation
(`prompt_simulation`): the first prompt with multimask output (the lowest-loss of the 3
masks trained), then correction iterations with the single-mask output, each feeding back
the previous low-res logits (without gradient) as the mask prompt. The loss is the mean
over iterations of `losses.sam_loss`.

An HQ-SAM model (`mask_decoder.hq_token`) trains as HQ-SAM's official training does: every
iteration decodes its HQ mask alone (`multimask_output=False, hq_token_only=True`: one output,
the one fed back as the next mask prompt), the losses are the mask losses on it, without the IoU
term (the IoU head is SAM's, frozen), and only the HQ layers train (`optim.trainable_labels`), so
no gradient reaches the image encoder.

Losses at the input resolution (SAM 2's training computes them so) rather than on the
low-res grid bound what small objects can reach: a 20 px shape is 5 cells of a 4x coarser
grid, and the best binary low-res targets, upsampled, reach only mIoU 0.80 on the synthetic
shapes (`train.evaluate.grid_ceiling`). On the demo's short runs they were not better yet.

With text in the batch, a captioned mask is prompted by its text with probability
`cfg.text_prob`: the first prompt is the text token alone, the target is `text_masks` (all
shapes of that category), and the correction points that follow keep the text token. The
metrics then include `text_iou`: the first output's IoU over the text-prompted masks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from sam_jax.config import SamConfig
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.model import Sam, decode, encode
from sam_jax.prompts import Prompts
from sam_jax.train import prompt_simulation as sim
from sam_jax.train.lora import merge_adapters
from sam_jax.train.losses import sam_loss
from sam_jax.transforms import linear_resize_matrix


def upsample_logits(logits: jax.Array, size: int) -> jax.Array:
    """(..., m, m) -> (..., size, size) float32, bilinear as `F.interpolate(align_corners=False)`
    (the first step of `postprocess_masks`); the identity when m == size."""
    m = logits.shape[-1]
    if m == size:
        return logits
    r = jnp.asarray(linear_resize_matrix(m, size))
    return jnp.einsum("yi,...ij,xj->...yx", r, logits.astype(jnp.float32), r)


@struct.dataclass(kw_only=True)
class TrainBatch:
    """One training batch: B images with K mask slots each (global shapes; each process holds its rows).

    The data pipeline yields these fields as a dict of numpy arrays; `TrainBatch(**example)` wraps them."""

    images: jax.Array | None = None  # (B, S, S, 3) float32, normalised and zero-padded (`transforms.preprocess`)
    # Instead of images (a frozen encoder): its cached outputs, `ImageEmbeddings` with leaves (B, ...).
    embeddings: ImageEmbeddings | None = None
    masks: jax.Array  # (B, K, m, m) bool targets on the loss grid
    valid: jax.Array  # (B, K) bool: the slot holds a mask (else padding)
    ids: jax.Array  # (B,) int32: each example's index in the data stream (its prompts' random keys)
    text: jax.Array | None = None  # (B, K, D) float32: a caption or crop embedding per slot (text prompts)
    text_valid: jax.Array | None = None  # (B, K) bool: the slot has a text prompt
    text_masks: jax.Array | None = None  # (B, K, m, m) bool: what the slot's text selects


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


HEAD = "head"  # params[HEAD]: an objective's extra trainable params (never exported with the model)

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a training step minimises, on what data.

    batch:    the batch type: a pytree class whose fields are the data's arrays, leading axis B
              (`TrainBatch(**example)` wraps the data pipeline's dict)
    loss:     (params, batch, rng) -> (scalar loss, metrics: scalars, "loss" among them); params are
              the model's with the head (if any) at params["head"]
    head:     key -> the extra trainable params at params["head"] (None: none); trained with the
              model, checkpointed, left out of the exported model
    log_line: logged metrics (floats) -> the objective's part of a log line ("loss 0.1234 ...")
    dataset:  the training config -> this process's batched data (a grain IterDataset of dicts of
              `batch`'s fields, checkpointable); None: SAM's record pipeline (`trainer.make_dataset`)
    evaluate: the params (numpy, with the head) -> held-out metrics ("eval_..." floats); None: SAM's
              held-out mIoU on data.eval_dir
    trains:   the model's top-level modules the loss reaches (e.g. ("image_encoder",)); the others
              are frozen by the optimizer (`optim.trainable_labels`: no state, no weight decay);
              None: every module. The head always trains.
    """

    name: str
    batch: type
    loss: LossFn
    head: Callable[[jax.Array], Any] | None = None
    log_line: Callable[[dict[str, float]], str] = lambda m: f"loss {m['loss']:.4f}"
    dataset: Callable[[Any], Any] | None = None
    evaluate: Callable[[Any], dict[str, float]] | None = None
    trains: tuple[str, ...] | None = None


def _sam_log_line(m: dict[str, float]) -> str:
    text = f"loss {m['loss']:.4f} first-iou {m['first_iou']:.3f} last-iou {m['last_iou']:.3f}"
    return text + (f" text-iou {m['text_iou']:.3f}" if "text_iou" in m else "")


def _sam_loss(
    params: Any,
    batch: TrainBatch,
    rng: jax.Array,
    *,
    model_config: SamConfig,
    cfg: Any,
    train_image_encoder: bool,
    lora_scale: float,
):
    params = merge_adapters(params, lora_scale)
    return simulate_and_loss(
        params, batch, rng, model_config=model_config, cfg=cfg, train_image_encoder=train_image_encoder
    )


def sam_objective(
    model_config: SamConfig, cfg: Any, train_image_encoder: bool = True, lora_scale: float = 1.0
) -> Objective:
    """SAM's interactive loss (`simulate_and_loss`, `cfg` a training config's `loss` fields) on `TrainBatch`es.
    `train_image_encoder=False` goes with an optimizer that freezes the encoder (`optim.freeze_image_encoder`):
    its gradient, which the optimizer would discard, is then not computed at all; so for an HQ-SAM model,
    whose encoder is always frozen. Params with low-rank adapters (`train.lora`) run merged
    (W + lora_scale * a @ b), their base frozen."""
    loss = functools.partial(
        _sam_loss,
        model_config=model_config,
        cfg=cfg,
        train_image_encoder=train_image_encoder and not model_config.mask_decoder.hq_token,
        lora_scale=lora_scale,
    )
    return Objective(name="sam", batch=TrainBatch, loss=loss, log_line=_sam_log_line)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The step-0 state of `params`: a fresh optimizer state and the seed's RNG."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def simulate_and_loss(
    params: Any,
    batch: TrainBatch,
    rng: jax.Array,
    *,
    model_config: SamConfig,
    cfg: Any,
    train_image_encoder: bool = True,
):
    """The interactive-simulation loss of one batch -> (loss, metrics). With
    `train_image_encoder=False` (a frozen encoder) no gradient flows into the embeddings, so
    the encoder's backward pass is never computed, and the encoder runs as at inference (no drop path).

    Memory (`cfg.remat_decoder`, `cfg.mask_chunk`): with `remat_decoder` each decoder pass
    (the first decode and every later iteration) is rematerialised, its activations recomputed
    in the backward pass instead of stored, so only the iterations' carries (prompts and the
    low-res mask prompt) are kept; `mask_chunk` runs the simulation for at most that many masks of
    each image at a time (the largest divisor of K not above it; a `lax.map` over the chunks), so
    the backward pass of one decoder pass holds the activations of one chunk of masks. Neither
    changes the loss or the gradients. A batch of cached `embeddings` skips the encoder."""
    if batch.embeddings is not None:  # a frozen encoder's outputs, computed once
        emb = jax.lax.stop_gradient(batch.embeddings)
    else:
        drop_path_rng = jax.random.split(rng, 3)[2] if train_image_encoder else None
        emb = encode(params, batch.images, config=model_config, drop_path_rng=drop_path_rng)
    if not train_image_encoder:
        emb = jax.lax.stop_gradient(emb)
    return interactive_loss(params, emb, batch, rng, model_config=model_config, cfg=cfg)


def interactive_loss(
    params: Any, emb: ImageEmbeddings, batch: TrainBatch, rng: jax.Array, *, model_config: SamConfig, cfg: Any
):
    """`simulate_and_loss` given the batch's `ImageEmbeddings` `emb` (B images): the decoder's
    part of the step, whose gradient reaches `params` and `emb` (batch.images unused)."""
    b, k = batch.valid.shape
    k_sched, k_rows, _ = jax.random.split(rng, 3)  # the third key is the encoder's drop path
    # One key per mask row, from the example id and the slot: independent of the batch layout.
    row_keys = jax.vmap(
        lambda i: jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(k_rows, i), j))(jnp.arange(k))
    )(batch.ids)  # (B, K)
    schedule = sim.iteration_schedule(k_sched, cfg.num_point_iters, cfg.num_no_point_iters)
    rows = {"keys": row_keys, "gt": batch.masks, "valid": batch.valid}
    if batch.text is not None:
        rows.update(text=batch.text, text_valid=batch.text_valid, text_masks=batch.text_masks)
    run = functools.partial(_interactive_means, params, emb, schedule=schedule, model_config=model_config, cfg=cfg)
    chunk = int(cfg.mask_chunk or 0)
    if 0 < chunk < k:
        chunk = max(d for d in range(1, chunk + 1) if k % d == 0)  # the largest divisor of K not above it
    if 0 < chunk < k:
        # (B, K, ...) -> (K / chunk, B, chunk, ...): chunk c holds slots c*chunk.. of every image.
        split = lambda x: jnp.swapaxes(x.reshape(b, k // chunk, chunk, *x.shape[2:]), 0, 1)  # noqa: E731
        parts = jax.lax.map(run, jax.tree.map(split, rows))  # each chunk's means over its valid rows
        out = _pooled_means(parts, "n", [name for name in parts if name not in ("n", "text_n", "text_iou")])
        if "text_iou" in parts:
            out.update(_pooled_means(parts, "text_n", ["text_iou"]))
    else:  # one chunk: the means as computed, without a round trip through sums
        out = {name: v for name, v in run(rows).items() if name not in ("n", "text_n")}
    total = out["loss"]
    if batch.text is not None and cfg.dense_text_weight:
        dense = dense_text_loss(params, emb, batch.text, batch.text_masks, batch.text_valid & batch.valid, model_config)
        total = total + cfg.dense_text_weight * dense
        out["dense_text_loss"] = dense
    return total, out


def _pooled_means(parts: dict[str, jax.Array], count: str, names: list[str]) -> dict[str, jax.Array]:
    """Per-chunk means (C,) of `names`, each over `parts[count]` (C,) rows -> the means over all the rows."""
    n = parts[count]
    total = jnp.maximum(n.sum(), 1.0)
    return {name: (parts[name] * n).sum() / total for name in names}


def _interactive_means(
    params: Any,
    emb: ImageEmbeddings,
    rows: dict[str, jax.Array],
    *,
    schedule: jax.Array,
    model_config: SamConfig,
    cfg: Any,
) -> dict[str, jax.Array]:
    """The interactive simulation of the mask rows `rows` (each (B, k, ...): k masks of each of
    the B images of `emb`) -> the loss and metrics as means over the valid rows, with their count
    `n` (and `text_iou`, the mean over the `text_n` text-prompted rows: 0 without one)."""
    gt, valid = rows["gt"], rows["valid"]
    b, k, m, _ = gt.shape
    row_keys = rows["keys"].reshape(b * k)
    # emb (B images) serves its image's k mask rows (row i*k + j: image i), without a copy.
    gt = gt.reshape(b * k, m, m).astype(bool)
    valid = valid.reshape(b * k)
    targets = gt.astype(jnp.float32)
    loss_kw = dict(focal_weight=cfg.focal_weight, dice_weight=cfg.dice_weight, iou_weight=cfg.iou_weight)
    loss_kw.update(focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma)
    hq = model_config.mask_decoder.hq_token  # HQ-SAM: its HQ mask alone, no IoU loss (its IoU head is frozen SAM's)
    if hq:
        loss_kw["iou_weight"] = 0.0
    k_pts = cfg.points_per_iter
    n = sim.num_slots(cfg.num_point_iters, k_pts)
    s = model_config.image_size
    up = lambda x: upsample_logits(x, m)  # noqa: E731  low-res logits -> the loss grid
    remat = bool(cfg.remat_decoder)
    # Each decoder pass recomputed in the backward pass, nothing of it stored (a scan body needs
    # no CSE barrier: prevent_cse=False there, as jax.checkpoint's docs advise).
    no_remat = lambda f: f  # noqa: E731
    remat_first = jax.checkpoint if remat else no_remat
    remat_body = functools.partial(jax.checkpoint, prevent_cse=False) if remat else no_remat

    text = text_mask = None
    if "text" in rows:
        draw = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(r, 1 << 20)))(row_keys)
        use_text = rows["text_valid"].reshape(b * k) & (draw < cfg.text_prob)
        gt = jnp.where(use_text[:, None, None], rows["text_masks"].reshape(b * k, m, m), gt)
        targets = gt.astype(jnp.float32)
        text = rows["text"].reshape(b * k, 1, -1)
        text_mask = use_text[:, None]
    points, labels = sim.initial_prompt(row_keys, gt, image_size=s, num_slots=n, box_prob=cfg.box_prob)
    if text is not None:  # a text-prompted mask starts from its text alone
        labels = jnp.where(text_mask, -1, labels)

    @remat_first
    def first(params, emb, points, labels):
        # No mask prompt in the first decode: one no-mask embedding for every row.
        prompts = Prompts(points=points, labels=labels, mask_input=None, has_mask=None, text=text, text_mask=text_mask)
        if hq:
            logits, iou = decode(params, emb, prompts, config=model_config, multimask_output=False, hq_token_only=True)
            candidates = None
        elif cfg.box_single_output:
            # As SAM 2's training: a lone point (or text) is ambiguous and trains the best of the
            # multimask outputs 1..3; a box trains the single output 0, the one a box gets at inference.
            logits, iou = decode(params, emb, prompts, config=model_config, multimask_output=None)
            is_box = (labels[:, 0] == sim.LABEL_BOX_TOP_LEFT)[:, None]
            candidates = jnp.where(is_box, jnp.arange(logits.shape[1]) == 0, jnp.arange(logits.shape[1]) > 0)
        else:
            logits, iou = decode(params, emb, prompts, config=model_config, multimask_output=True)
            candidates = None
        up_logits = up(logits)
        loss0, metrics0, best, chosen_iou0 = sam_loss(up_logits, iou, targets, valid, **loss_kw, candidates=candidates)
        # The mask prompt fed forward: the trained (lowest-loss) output, without gradient; and
        # its upsampled logits, which pick the next correction point (upsampled once, here).
        pick = lambda x: jax.lax.stop_gradient(jnp.take_along_axis(x, best[:, None, None, None], axis=1)[:, 0])  # noqa: E731
        return loss0, metrics0, chosen_iou0, pick(logits), pick(up_logits)

    loss0, metrics0, chosen_iou0, prev, prev_up = first(params, emb, points, labels)
    num_later = schedule.shape[0]

    @remat_body
    def body(carry, inputs):
        points, labels, prev, prev_up, slot = carry
        add_point, it = inputs
        keys = jax.vmap(lambda r: jax.random.fold_in(r, it + 1))(row_keys)
        new_points, new_labels = sim.iteration_points(keys, prev_up, gt, image_size=s, points_per_iter=k_pts)
        for j in range(k_pts):
            point, label = new_points[:, j], jnp.where(add_point, new_labels[:, j], -1)
            # Each row writes its point into its own slot: a one-hot select, elementwise per
            # row. (An indexed scatter over the batch made the SPMD partitioner all-gather the
            # slots across the data-parallel devices, a sync inside every iteration.)
            write = (jnp.arange(n) == jnp.minimum(slot, n - 1)[:, None]) & (label >= 0)[:, None]  # (B, n)
            points = jnp.where(write[..., None], point[:, None, :], points)
            labels = jnp.where(write, label[:, None], labels)
            slot = slot + (label >= 0).astype(jnp.int32)
        prompts = Prompts(
            points=points,
            labels=labels,
            mask_input=prev,
            has_mask=jnp.ones((b * k,), bool),
            text=text,
            text_mask=text_mask,
        )
        logits, iou = decode(params, emb, prompts, config=model_config, multimask_output=False, hq_token_only=hq)
        up_logits = up(logits)
        loss, metrics, _, _ = sam_loss(up_logits, iou, targets, valid, **loss_kw)
        carry = (points, labels, jax.lax.stop_gradient(logits[:, 0]), jax.lax.stop_gradient(up_logits[:, 0]), slot)
        return carry, (loss, metrics)

    if num_later:
        # Correction points go after the first prompt: slot 1 for a point, slot 2 after a box.
        first_slot = jnp.where(
            labels[:, 1] == sim.LABEL_BOX_BOTTOM_RIGHT, 2, jnp.where(labels[:, 0] == -1, 0, 1)
        ).astype(jnp.int32)
        _, (losses, metrics) = jax.lax.scan(
            body, (points, labels, prev, prev_up, first_slot), (schedule, jnp.arange(num_later))
        )
        total = (loss0 + losses.sum()) / (1 + num_later)
        final = jax.tree.map(lambda x: x[-1], metrics)
    else:
        total, final = loss0, metrics0
    out = {
        "loss": total,
        "first_iou": metrics0["mask_iou"],
        "last_iou": final["mask_iou"],
        **{f"first_{name}": v for name, v in metrics0.items() if name != "mask_iou"},
        "n": valid.astype(jnp.float32).sum(),
    }
    if text is not None:
        # What the text alone selects: the IoU of the trained first output of the text-prompted
        # rows (0 in a batch without one).
        w = (text_mask[:, 0] & valid).astype(jnp.float32)
        out["text_iou"] = (chosen_iou0 * w).sum() / jnp.maximum(w.sum(), 1.0)
        out["text_n"] = w.sum()
    return out


def dense_text_loss(
    params: Any,
    emb: ImageEmbeddings,
    text: jax.Array,
    text_masks: jax.Array,
    text_valid: jax.Array,
    model_config: SamConfig,
) -> jax.Array:
    """Which caption each image token shows, from the image embedding alone: a token's logit
    for a caption is its embedding's dot product with the caption's text token (over sqrt(C)),
    in a softmax over the captions of its image's text slots, against the share of the token's
    cell each caption's mask covers. Only cells inside some caption's mask count, so a shape
    of a kind no slot asks for is never taught as anything. Trains the encoder to put the kind
    of a shape in every pixel of it, which the decoder, which never mixes image tokens, needs
    to select by caption (docs/text-training.md).

    emb the encoder's output (its embedding (B, h, w, C)); text (B, K, Dt) CLIP embeddings, text_masks
    (B, K, m, m) what each asks for, text_valid (B, K) -> a scalar (0 without two captions)."""
    feats = emb.embedding
    b, h, w, c = feats.shape
    k, m = text_masks.shape[1], text_masks.shape[2]
    cover = text_masks.astype(jnp.float32).reshape(b, k, h, m // h, w, m // w).mean((3, 5))  # (B, K, h, w)
    same = jnp.all(text[:, :, None] == text[:, None, :], axis=-1)  # (B, K, K)
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [j, i]: i < j
    first = text_valid & ~jnp.any(same & earlier & text_valid[:, None, :], axis=-1)  # one slot per caption
    cover = cover * first[..., None, None]
    tokens = Sam(model_config).apply({"params": params}, text, method=lambda mod, x: mod.prompt_encoder.embed_text(x))
    logits = jnp.einsum("bhwc,bkc->bkhw", feats.astype(jnp.float32), tokens.astype(jnp.float32)) / np.sqrt(c)
    logp = jax.nn.log_softmax(jnp.where(first[..., None, None], logits, -1e9), axis=1)
    weight = jnp.minimum(cover.sum(1), 1.0) * (first.sum(1) >= 2)[:, None, None]  # (B, h, w)
    target = cover / jnp.maximum(cover.sum(1, keepdims=True), 1e-6)
    per_token = -jnp.sum(jnp.where(first[..., None, None], target * logp, 0.0), axis=1)
    return (per_token * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def train_step(
    state: TrainState,
    batch: Any,
    *,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    objective: Objective | None = None,
    model_config: SamConfig | None = None,
    cfg: Any = None,
    train_image_encoder: bool = True,
    lora_scale: float = 1.0,
    labels: Any = None,
):
    """One optimizer step of `objective` (default: `sam_objective(model_config, cfg, train_image_encoder,
    lora_scale)`) -> (new state, metrics: the objective's, grad_norm, param_norm, update_norm, lr, finite).
    Non-finite steps are skipped (state kept, `finite` = 0 in the metrics); the caller decides whether to stop.

    `labels` (the tree of "train" / "frozen" that `optim.make_optimizer` returns with `tx`): the params
    labelled "frozen" get no gradient (zeros), so the backward pass never computes their weight-gradient
    products, which `tx` would discard; grad_norm is then the trained params'."""
    if objective is None:
        objective = sam_objective(model_config, cfg, train_image_encoder, lora_scale)

    def frozen_stopped_loss(params, batch, rng):
        if labels is not None:
            params = jax.tree.map(lambda p, lab: jax.lax.stop_gradient(p) if lab == "frozen" else p, params, labels)
        return objective.loss(params, batch, rng)

    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, metrics), grads = jax.value_and_grad(frozen_stopped_loss, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state)
    )
    metrics = {
        **metrics,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(state.params),
        "update_norm": optax.tree.norm(updates),
        "lr": schedule(state.step),
        "finite": finite.astype(jnp.float32),
    }
    return new_state, metrics
