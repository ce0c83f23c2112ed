"""Interactive prompt simulation (Kirillov et al. 2023, appendix A), in fixed shapes so it jits.

Per mask: the first prompt is a random foreground point or a noisy box (each with
probability 1/2; box noise std 10% of the side, at most 20 px in the 1024 frame). Then
`num_point_iters` iterations each add a point drawn uniformly from the error region of
the previous prediction (a false-negative pixel gives a positive point, a false-positive
pixel a negative one), and `num_no_point_iters` iterations add none (one at a random place,
one last); every iteration after the first feeds back the previous unthresholded low-res
logits as the mask prompt. With `points_per_iter` k > 1 (not the paper's), a point iteration
adds 1 to k points from the same error region: a short simulation still shows the decoder
prompts of as many points as a user's clicks.

Prompt slots: points (B, N, 2), labels (B, N), N = bucket(2 + num_point_iters x k): slot 0
holds the first point (or slots 0-1 the box corners), later slots the correction points, -1
elsewhere.
Masks here live on the low-res grid (B, m, m), m = 4 x embedding side; one low-res pixel is
`image_size / m` input pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sam_jax.prompts import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, bucket_size


def num_slots(num_point_iters: int, points_per_iter: int = 1) -> int:
    """Point slots for the first prompt (a box takes 2) and every correction point."""
    return bucket_size(2 + num_point_iters * points_per_iter)


def sample_pixels(keys: jax.Array, region: jax.Array, count: int = 1) -> tuple[jax.Array, jax.Array]:
    """`count` distinct uniform random pixels of each region (B, m, m) bool, one key per row
    (B,) -> (x, y) (B, count, 2) int32, and found (B, count) (False past the region's size)."""
    b, m, _ = region.shape
    u = jax.vmap(lambda k: jax.random.uniform(k, (m, m)))(keys)
    flat = jnp.where(region, u, -1.0).reshape(b, m * m)
    if count == 1:  # argmax: the same pixel as top_k's first, cheaper
        idx = jnp.argmax(flat, axis=1)[:, None]
        val = jnp.take_along_axis(flat, idx, axis=1)
    else:
        val, idx = jax.lax.top_k(flat, count)
    return jnp.stack([idx % m, idx // m], axis=-1).astype(jnp.int32), val >= 0


def sample_pixel(keys: jax.Array, region: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A uniform random pixel of each region (B, m, m) bool, one key per row (B,)
    -> (x, y) (B, 2) int32, and found (B,)."""
    xy, found = sample_pixels(keys, region)
    return xy[:, 0], found[:, 0]


def to_input_frame(xy: jax.Array, scale: float) -> jax.Array:
    """Low-res pixel indices (..., 2) -> pixel coordinates in the model input (the cell centre)."""
    return xy.astype(jnp.float32) * scale + (scale - 1) / 2


def mask_boxes(masks: jax.Array) -> jax.Array:
    """(B, m, m) bool -> (B, 4) x0, y0, x1, y1 in low-res pixels (inclusive); zeros if empty."""
    m = masks.shape[-1]
    ar = jnp.arange(m)
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    big = m + 1
    y0 = jnp.where(rows, ar, big).min(1)
    y1 = jnp.where(rows, ar, -1).max(1)
    x0 = jnp.where(cols, ar, big).min(1)
    x1 = jnp.where(cols, ar, -1).max(1)
    box = jnp.stack([x0, y0, x1, y1], axis=1)
    return jnp.where(masks.any(axis=(1, 2))[:, None], box, 0)


def initial_prompt(
    keys: jax.Array, gt: jax.Array, *, image_size: int, num_slots: int, box_prob: float = 0.5
) -> tuple[jax.Array, jax.Array]:
    """First prompt per mask: gt (B, m, m) bool, one key per row (B,) -> points (B, N, 2), labels (B, N)."""
    b, m, _ = gt.shape
    scale = image_size / m
    split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
    k_choice, k_point, k_noise = split[:, 0], split[:, 1], split[:, 2]
    use_box = jax.vmap(jax.random.uniform)(k_choice) < box_prob
    xy, _ = sample_pixel(k_point, gt)
    point = to_input_frame(xy, scale)
    box = mask_boxes(gt).astype(jnp.float32) * scale
    box = box.at[:, 2:].add(scale - 1)  # inclusive low-res cell -> its last input pixel
    side = jnp.concatenate([box[:, 2:3] - box[:, 0:1], box[:, 3:4] - box[:, 1:2]], axis=1)  # (B, 2) w, h
    std = jnp.minimum(0.1 * jnp.tile(side, (1, 2)), 20.0 * image_size / 1024)
    noisy = box + std * jax.vmap(lambda k: jax.random.normal(k, (4,)))(k_noise)
    noisy = jnp.clip(noisy, 0, image_size - 1)
    noisy = jnp.concatenate([jnp.minimum(noisy[:, :2], noisy[:, 2:]), jnp.maximum(noisy[:, :2], noisy[:, 2:])], axis=1)

    points = jnp.zeros((b, num_slots, 2), jnp.float32)
    labels = jnp.full((b, num_slots), -1, jnp.int32)
    points = points.at[:, 0].set(jnp.where(use_box[:, None], noisy[:, :2], point))
    points = points.at[:, 1].set(jnp.where(use_box[:, None], noisy[:, 2:], 0.0))
    labels = labels.at[:, 0].set(jnp.where(use_box, LABEL_BOX_TOP_LEFT, 1))
    labels = labels.at[:, 1].set(jnp.where(use_box, LABEL_BOX_BOTTOM_RIGHT, -1))
    return points, labels


def correction_points(
    keys: jax.Array, logits: jax.Array, gt: jax.Array, *, image_size: int, count: int = 1
) -> tuple[jax.Array, jax.Array]:
    """`count` distinct points from the error region of the previous prediction.

    logits (B, m, m), gt (B, m, m) bool, one key per row (B,) -> points (B, count, 2) in the
    input frame, labels (B, count): 1 on a false negative, 0 on a false positive, -1 (no point)
    when the error region has fewer pixels.
    """
    pred = logits > 0
    fn, fp = gt & ~pred, pred & ~gt
    xy, found = sample_pixels(keys, fn | fp, count)
    is_fn = jax.vmap(lambda f, p: f[p[:, 1], p[:, 0]])(fn, xy)
    label = jnp.where(found, jnp.where(is_fn, 1, 0), -1)
    return to_input_frame(xy, image_size / gt.shape[-1]), label.astype(jnp.int32)


def correction_point(
    keys: jax.Array, logits: jax.Array, gt: jax.Array, *, image_size: int
) -> tuple[jax.Array, jax.Array]:
    """A point from the error region of the previous prediction: logits (B, m, m), gt (B, m, m)
    bool, one key per row (B,) -> point (B, 2) in the input frame, label (B,) (as
    `correction_points`)."""
    points, labels = correction_points(keys, logits, gt, image_size=image_size)
    return points[:, 0], labels[:, 0]


def iteration_points(
    keys: jax.Array, logits: jax.Array, gt: jax.Array, *, image_size: int, points_per_iter: int
) -> tuple[jax.Array, jax.Array]:
    """What one point iteration adds: 1 to `points_per_iter` distinct error-region points (each
    row draws how many; the first is `correction_point`'s) -> points (B, P, 2), labels (B, P),
    P = points_per_iter, -1 past the row's count."""
    points, labels = correction_points(keys, logits, gt, image_size=image_size, count=points_per_iter)
    if points_per_iter == 1:
        return points, labels
    count = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 1, points_per_iter + 1))(keys)
    return points, jnp.where(jnp.arange(points_per_iter) < count[:, None], labels, -1)


def iteration_schedule(rng: jax.Array, num_point_iters: int, num_no_point_iters: int) -> jax.Array:
    """(num_point_iters + num_no_point_iters,) bool: whether each later iteration adds a point.
    The last iteration adds none; the other no-point iterations sit at random places."""
    total = num_point_iters + num_no_point_iters
    if num_no_point_iters == 0:
        return jnp.ones((total,), bool)
    body = jnp.concatenate([jnp.ones((num_point_iters,), bool), jnp.zeros((num_no_point_iters - 1,), bool)])
    return jnp.concatenate([jax.random.permutation(rng, body), jnp.zeros((1,), bool)])
