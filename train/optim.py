"""The optimizer of the SAM recipe: AdamW, linear warmup then step decay (or a cosine decay), layer-wise lr decay
for the ViT blocks, gradient clipping, weight decay on kernels only, frozen parts.

Frozen always: the positional-encoding Gaussian matrix (a fixed buffer in the official
model) and SAM 2's video-only tensors (params["video"], carried unused by the image model).
Optionally frozen: the whole image encoder (`freeze_image_encoder`, fine-tuning the prompt
encoder and decoder only). An HQ-SAM model (`mask_decoder.hq_token`) trains its HQ layers alone
(`modeling.hq.HQ_LAYERS`: the HQ token, its MLP and the feature fusion), every SAM weight frozen, as
HQ-SAM's official training. With low-rank adapters (`train.lora`, params["lora"]),
the modules holding adapters are frozen and the adapters train (at their module's layer decay).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_jax.config import SamConfig
from sam_jax.modeling.hq import is_hq_param
from sam_jax.train.lora import LORA, frozen_modules
from sam_jax.train.step import HEAD


def learning_rate_schedule(
    peak: float, warmup_steps: int, decay_steps: tuple[int, ...], decay_factor: float = 0.1, cosine_end: int = 0
) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then x`decay_factor` at each of `decay_steps`;
    or, with `cosine_end` > 0, a cosine decay from `peak` after the warmup to 0 at step `cosine_end`."""
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    if cosine_end > 0:
        after = optax.cosine_decay_schedule(peak, max(cosine_end - warmup_steps, 1))
    else:
        after = optax.piecewise_constant_schedule(peak, {int(s) - warmup_steps: decay_factor for s in decay_steps})
    return optax.join_schedules([warmup, after], [warmup_steps])


def _path_names(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def layer_id(names: tuple[str, ...], depth: int) -> int:
    """MAE-style layer index: patch embedding / pos_embed 0, block i -> i + 1, the rest depth + 1
    (an adapter, params["lora"][module path], that of its module). SAM 2's Hiera keeps its blocks
    under `image_encoder/trunk` (as `Hiera.get_layer_id` counts them: `pos_embed_window` 0 too; the
    neck, `no_mem_embed` and the high-res projections depth + 1)."""
    if names[0] == LORA:
        names = names[1:]
    if names[0] != "image_encoder":
        return depth + 1
    if len(names) > 2 and names[1] == "trunk":
        names = names[1:]
    if names[1] in ("patch_embed", "pos_embed", "pos_embed_window"):
        return 0
    if names[1].startswith("blocks_"):
        return int(names[1].split("_")[1]) + 1
    return depth + 1


def scale_by_layer(depth: int, decay: float) -> optax.GradientTransformation:
    """Layer-wise lr decay: multiply each update by decay ** (depth + 1 - layer_id)."""

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, u: u * jnp.asarray(decay ** (depth + 1 - layer_id(_path_names(path), depth)), u.dtype), updates
        )
        return scaled, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def trainable_labels(
    params: Any, freeze_image_encoder: bool, hq_only: bool = False, trains: tuple[str, ...] | None = None
) -> Any:
    """params -> the same tree of "train" / "frozen". `hq_only` (an HQ-SAM model): of the model's
    params only the HQ layers train (`is_hq_param`); `trains` (an objective's `Objective.trains`):
    only these top-level modules do. An objective's head (params["head"]) always trains."""
    adapted = frozen_modules(params)  # a LoRA's base

    def label(path, _):
        names = _path_names(path)
        if names[-1] == "positional_encoding_gaussian_matrix" or names[0] == "video":
            return "frozen"  # a fixed buffer officially; SAM 2's video-only tensors, unused by the image model
        if hq_only and names[0] != HEAD and not is_hq_param(names):
            return "frozen"  # HQ-SAM: SAM's weights stay as released
        if trains is not None and names[0] not in (*trains, HEAD):
            return "frozen"  # a module the objective's loss never reaches
        if (freeze_image_encoder and names[0] == "image_encoder") or names[0] in adapted:
            return "frozen"
        return "train"

    return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params: Any) -> Any:
    """Weight decay on kernels (matrices and convs) only: not on biases, norms, embeddings, positions."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _path_names(path)[-1] == "kernel", params)


def param_labels(params: Any, model_config: SamConfig, cfg: Any, trains: tuple[str, ...] | None = None) -> Any:
    """params -> the same tree of "train" / "frozen": which params `make_optimizer` trains."""
    return trainable_labels(params, cfg.freeze_image_encoder, hq_only=model_config.mask_decoder.hq_token, trains=trains)


def make_optimizer(
    params: Any, model_config: SamConfig, cfg: Any, trains: tuple[str, ...] | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule, Any]:
    """(the optimizer, its learning-rate schedule, the tree of "train" / "frozen" labels it applies)
    for `params` (a pytree of arrays or shapes) from a training config's `optim` fields; `trains`:
    the top-level modules that train (`Objective.trains`; None: all). `train_step(..., labels=)`
    takes the labels to stop the gradient of the frozen params."""
    schedule = learning_rate_schedule(
        cfg.lr, cfg.warmup_steps, tuple(cfg.decay_steps), cfg.decay_factor, cfg.cosine_decay_end
    )
    train = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
        scale_by_layer(model_config.image_encoder.depth, cfg.layer_decay),
    )
    labels = param_labels(params, model_config, cfg, trains)
    tx = optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx, schedule, labels
