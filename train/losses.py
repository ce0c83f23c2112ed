"""The SAM losses (Kirillov et al. 2023, appendix A): focal + dice on masks, MSE on predicted IoU.

With multimask output only the output with the lowest mask loss is trained (per example);
the IoU head is supervised on every output (the actual IoU of each predicted mask), or on
the chosen one only with `supervise_all_iou=False`. All losses are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
    """Mean focal loss over pixels: logits, targets (..., H, W) -> (...)."""
    logits = logits.astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))  # stable BCE
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(axis=(-2, -1))


def dice_loss(logits: jax.Array, targets: jax.Array, smooth: float = 1.0) -> jax.Array:
    """1 - soft Dice: logits, targets (..., H, W) -> (...)."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    inter = (p * targets).sum(axis=(-2, -1))
    return 1.0 - (2.0 * inter + smooth) / (p.sum(axis=(-2, -1)) + targets.sum(axis=(-2, -1)) + smooth)


def mask_iou(pred: jax.Array, gt: jax.Array) -> jax.Array:
    """pred, gt (..., H, W) bool (broadcastable) -> IoU (...,) float32; 1 where both are empty."""
    inter = jnp.sum(pred & gt, axis=(-2, -1), dtype=jnp.int32)
    union = jnp.sum(pred | gt, axis=(-2, -1), dtype=jnp.int32)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).astype(jnp.float32)


def sam_loss(
    logits: jax.Array,
    iou_pred: jax.Array,
    targets: jax.Array,
    valid: jax.Array,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    supervise_all_iou: bool = True,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    candidates: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array, jax.Array]:
    """The SAM training loss of one decoder call.

    logits (B, M, H, W) mask logits; iou_pred (B, M); targets (B, H, W) in {0, 1};
    valid (B,) bool marks real examples (padding contributes nothing). Returns the mean
    loss over valid examples, metrics (focal, dice, iou_mse, actual mIoU of the chosen masks),
    the index of the trained output per example (B,), and that output's actual IoU (B,)
    (without gradient; for metrics over a subset of the examples).
    """
    t = targets[:, None].astype(jnp.float32)
    focal = sigmoid_focal_loss(logits, t, alpha=focal_alpha, gamma=focal_gamma)  # (B, M)
    dice = dice_loss(logits, t)
    mask_loss = focal_weight * focal + dice_weight * dice
    if candidates is not None:
        mask_loss = jnp.where(candidates, mask_loss, jnp.inf)
    best = jnp.argmin(mask_loss, axis=1)  # only the lowest-loss output is trained
    pick = lambda x: jnp.take_along_axis(x, best[:, None], axis=1)[:, 0]  # noqa: E731
    actual_iou = jax.lax.stop_gradient(mask_iou(logits > 0.0, t > 0.5))  # (B, M)
    iou_se = jnp.square(iou_pred.astype(jnp.float32) - actual_iou)
    if not supervise_all_iou:
        iou_term = pick(iou_se)
    elif candidates is None:
        iou_term = iou_se.mean(axis=1)
    else:
        iou_term = (iou_se * candidates).sum(axis=1) / jnp.maximum(candidates.sum(axis=1), 1)
    per_example = pick(mask_loss) + iou_weight * iou_term
    w = valid.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    mean = lambda x: (x * w).sum() / n  # noqa: E731
    metrics = {
        "focal": mean(pick(focal)),
        "dice": mean(pick(dice)),
        "iou_mse": mean(iou_term),
        "mask_iou": mean(pick(actual_iou)),
    }
    return mean(per_example), metrics, best, pick(actual_iou)
