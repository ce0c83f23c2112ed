"""The benchmark cases. Each takes the `Context` and returns `Row`s (bench.harness).

In-process cases (encoder, predict, amg) alternate ours and the official package after a
warm-up and keep the last outputs of both to check they agree. The memory and compile
cases run each side once in fresh processes (bench.child). Training has no official
counterpart (the official package has no training code): its rows give ours only, with
the achieved fraction of the measured matrix-product rate.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import models
from bench.child import RESULT
from bench.harness import PAUSE_S, Row, median, rate_extra, time_call, time_pair, timed_row, xla_flops
from bench.models import Pair
from sam_jax.config import ImageEncoderConfig

ROOT = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """A case could not run (a child process failed, a bad setting)."""


@dataclasses.dataclass
class Context:
    model: str
    pair: Pair
    photo: np.ndarray  # (H, W, 3) uint8
    matmul: dict[str, float]  # bench.harness.matmul_rates
    workdir: Path  # scratch space: weights for the children, caches, training data
    repeats: int = 3
    warmup: int = 1
    encoder_batches: tuple[int, ...] = (1, 4)
    amg_points_per_side: int = 32  # the official default
    weights_path: Path | None = None  # set by `weights()` on first use

    @property
    def config(self):
        return self.pair.config

    def weights(self) -> Path:
        """The official state dict as .npz, written once, for the child processes."""
        if self.weights_path is None:
            self.weights_path = models.save_weights(self.pair.state_dict, self.workdir / "weights.npz")
        return self.weights_path

    def time_both(
        self, ours: Callable[[], Any], official: Callable[[], Any]
    ) -> tuple[list[float], list[float], dict[str, Any]]:
        """`time_pair` with the context's repeats and warm-up -> (ours runs, official runs,
        {"ours": last output, "official": last output})."""
        out: dict[str, Any] = {}
        runs = time_pair(
            lambda: out.__setitem__("ours", ours()),
            lambda: out.__setitem__("official", official()),
            self.repeats,
            self.warmup,
        )
        return *runs, out


# ----------------------------------------------------------------------------- checks


def close_check(ours: np.ndarray, ref: np.ndarray, atol: float) -> dict[str, Any]:
    """Max abs difference of two arrays of the same shape, ok when <= atol."""
    if ours.shape != ref.shape:
        return {"ok": False, "shape": f"{ours.shape} vs {ref.shape}"}
    err = float(np.max(np.abs(ours.astype(np.float64) - ref))) if ref.size else 0.0
    return {"ok": err <= atol, "max_abs_diff": err, "ref_max_abs": float(np.max(np.abs(ref)))}


def masks_check(ours: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Masks (..., H, W) bool and scores (...): ok when >= 99.9% of the mask pixels are equal
    and the predicted IoUs agree within 1e-4 (with equal weights they agree to ~1e-7; a 1%
    change of one encoder weight already moves them by 2e-4)."""
    if ours[0].shape != ref[0].shape:
        return {"ok": False, "shape": f"{ours[0].shape} vs {ref[0].shape}"}
    agree = float(np.mean(ours[0] == ref[0]))
    iou_diff = float(np.max(np.abs(ours[1] - ref[1])))
    return {"ok": agree >= 0.999 and iou_diff <= 1e-4, "mask_agreement": agree, "iou_max_diff": iou_diff}


def _mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of bool masks a (n, H, W) and b (m, H, W) -> (n, m)."""
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def amg_check(ours: list[dict], ref: list[dict]) -> dict[str, Any]:
    """Mask records of the two generators: ok when the counts are within 2% (at least 1) and
    each official mask has one of ours at IoU >= 0.95 (the generator tests' criteria)."""
    n, m = len(ours), len(ref)
    count_ok = abs(n - m) <= max(1, m // 50)
    if n and m:
        iou = _mask_iou(np.stack([r["segmentation"] for r in ref]), np.stack([r["segmentation"] for r in ours]))
        matched = float(np.mean(iou.max(axis=1) >= 0.95))
    else:
        matched = 1.0 if n == m else 0.0
    return {"ok": count_ok and matched >= 0.95, "masks_ours": n, "masks_official": m, "official_matched": matched}


# ----------------------------------------------------------------------------- encoder


def encoder_input(ctx: Context, batch: int) -> np.ndarray:
    """The photo (and flips of it) resized, normalized and padded: (batch, S, S, 3) float32."""
    from sam_jax.transforms import ResizeLongestSide, preprocess

    views = [ctx.photo, ctx.photo[:, ::-1], ctx.photo[::-1], ctx.photo[::-1, ::-1]]
    resize = ResizeLongestSide(ctx.config.image_size)
    images = [resize.apply_image(np.ascontiguousarray(views[i % len(views)])) for i in range(batch)]
    return np.array(
        jnp.concatenate([preprocess(jnp.asarray(im)[None], ctx.config) for im in images])
    )  # writable, for torch


def official_encode(model, x) -> np.ndarray:
    """The official image encoder on x (B, 3, S, S) -> embeddings (B, h, w, C)."""
    import torch

    with torch.inference_mode():
        out = model.image_encoder(x.to(model.device))
    if isinstance(out, tuple):  # HQ-SAM's encoders return the early features too
        out = out[0]
    return out.permute(0, 2, 3, 1).cpu().numpy()  # on the host: a GPU's work has finished


def encoder_flops(config, batch: int) -> float:
    """FLOPs of the image encoder of `config` on `batch` images: the official model's count.

    Counted with the whole score matrix in one chunk (`attention_query_block` = grid
    size^2), as a chunk loop's body would be counted once; the other kernels do the same
    work in another shape ("cudnn" folds the relative positions into wider q and k).
    """
    from sam_jax.model import abstract_params, encode

    enc = config.image_encoder
    if isinstance(enc, ImageEncoderConfig):
        enc = dataclasses.replace(enc, attention="chunked", attention_query_block=enc.grid_size**2)
        config = dataclasses.replace(config, image_encoder=enc)
    s = config.image_size
    images = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
    return xla_flops(jax.jit(functools.partial(encode, config=config)), abstract_params(config), images)


def case_encoder(ctx: Context) -> list[Row]:
    import torch

    rows = []
    for b in ctx.encoder_batches:
        x = encoder_input(ctx, b)
        xj, xt = jnp.asarray(x), torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        a, o, out = ctx.time_both(
            lambda xj=xj: np.asarray(ctx.pair.ours.encode(xj).embedding),
            lambda xt=xt: official_encode(ctx.pair.official, xt),
        )
        flop = encoder_flops(ctx.config, b)
        rows.append(
            timed_row(
                f"encoder_b{b}",
                "encoder",
                f"image encoder, batch {b}",
                a,
                o,
                check=close_check(out["ours"], out["official"], atol=1e-3),
                extra=rate_extra(flop, median(a), median(o), ctx.matmul),
            )
        )
    return rows


# ----------------------------------------------------------------------------- predict


def _upsample_flops(ctx: Context, input_size: tuple[int, int], original_size: tuple[int, int]) -> float:
    """FLOPs of upsampling and thresholding one mask to the original size (`upsample_logits`)."""
    from sam_jax.transforms import upsample_logits

    m = ctx.config.low_res_mask_size
    fn = jax.jit(
        lambda low: upsample_logits(low, input_size, original_size, ctx.config.image_size) > ctx.config.mask_threshold
    )
    return xla_flops(fn, jax.ShapeDtypeStruct((m, m), jnp.float32))


def _predict_flops(ctx: Context, predictor, coords: np.ndarray, labels: np.ndarray) -> float:
    """FLOPs of decoding + postprocessing B prompts on one image (as the predictor's jitted steps):
    the decoder on the B prompts (counted decoding them all together, and the upsampling of each of
    the 3B masks one mask at a time: XLA's cost analysis counts a loop body once)."""
    from sam_jax.predictor import decode_prompts
    from sam_jax.prompts import make_prompts

    prompts = make_prompts(
        batch_size=len(coords),
        mask_size=ctx.config.low_res_mask_size,
        point_coords=predictor.transform.apply_coords(coords, predictor.original_size),
        point_labels=labels,
    ).without_masks()
    fn = jax.jit(
        functools.partial(decode_prompts, config=ctx.config, max_batch=len(coords)), static_argnames="multimask_output"
    )
    decoder = xla_flops(fn, ctx.pair.ours.params, predictor.features, prompts, multimask_output=True)
    return decoder + 3 * len(coords) * _upsample_flops(ctx, predictor.input_size, predictor.original_size)


def case_predict(ctx: Context) -> list[Row]:
    """`predict` with 1 and with 64 single-point prompts on the photo, postprocessing (upsampling
    to the photo's size, thresholding) included; the image embedding is computed beforehand."""
    ours, ref = models.predictor("ours", ctx.pair.ours), models.predictor("official", ctx.pair.official)
    ours.set_image(ctx.photo)
    ref.set_image(ctx.photo)
    rows = []
    for n in (1, 64):
        coords = models.prompt_points(ctx.photo, n)
        labels = np.ones((n, 1), np.int64)
        if n == 1:  # the plain official call: (N, 2) and (N,) for one prompt
            run_ours = lambda c=coords, lb=labels: ours.predict(point_coords=c[0], point_labels=lb[0])[:2]  # noqa: E731
            run_ref = lambda c=coords, lb=labels: ref.predict(point_coords=c[0], point_labels=lb[0])[:2]  # noqa: E731
        else:
            run_ours = lambda c=coords, lb=labels: ours.predict(point_coords=c, point_labels=lb)[:2]  # noqa: E731
            run_ref = lambda c=coords, lb=labels: models.official_predict_many(ref, c, lb)  # noqa: E731
        a, o, out = ctx.time_both(run_ours, run_ref)
        flop = _predict_flops(ctx, ours, coords, labels)
        rows.append(
            timed_row(
                f"predict_{n}",
                "predict",
                f"predict, {n} point prompt{'s' * (n > 1)}",
                a,
                o,
                check=masks_check(out["ours"], out["official"]),
                extra=rate_extra(flop, median(a), median(o), ctx.matmul),
            )
        )
    return rows


# ----------------------------------------------------------------------------- automatic masks


def _amg_flops(ctx: Context, gen, image: np.ndarray) -> float:
    """FLOPs of one `generate` with one crop (the default): the encoder on the image, the decoder
    on each point batch (its points decoded together) and the upsampling of each of its 3 masks per
    point (all of them: the predicted-IoU filter, before the upsampling, only lowers the count)."""
    from sam_jax.automatic_mask_generator import decode_point_batch
    from sam_jax.model import encode
    from sam_jax.transforms import get_preprocess_shape

    cfg, params = ctx.config, ctx.pair.ours.params
    s = cfg.image_size
    h, w = image.shape[:2]
    p = gen.points_per_batch
    decoder = xla_flops(
        jax.jit(functools.partial(decode_point_batch, config=cfg, max_batch=p)),
        params,
        jax.eval_shape(functools.partial(encode, config=cfg), params, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)),
        jax.ShapeDtypeStruct((p, 2), jnp.float32),
    )
    batches = math.ceil(len(gen.point_grids[0]) / p)
    masks = 3 * len(gen.point_grids[0])
    return (
        encoder_flops(cfg, 1) + batches * decoder + masks * _upsample_flops(ctx, get_preprocess_shape(h, w, s), (h, w))
    )


def case_amg(ctx: Context) -> list[Row]:
    """The automatic mask generator with default settings (but `points_per_side`) on the photo."""
    kw = dict(points_per_side=ctx.amg_points_per_side)
    ours, ref = (
        models.mask_generator("ours", ctx.pair.ours, **kw),
        models.mask_generator("official", ctx.pair.official, **kw),
    )
    if ours.crop_n_layers:
        raise BenchError("the amg case assumes the default crop_n_layers=0")
    a, o, out = ctx.time_both(lambda: ours.generate(ctx.photo), lambda: ref.generate(ctx.photo))
    flop = _amg_flops(ctx, ours, ctx.photo)
    h, w = ctx.photo.shape[:2]
    return [
        timed_row(
            "amg",
            "amg",
            f"automatic masks, {h}x{w} photo",
            a,
            o,
            check=amg_check(out["ours"], out["official"]),
            extra=rate_extra(flop, median(a), median(o), ctx.matmul),
        )
    ]


# ----------------------------------------------------------------------------- fresh processes


def run_child(
    ctx: Context, mode: str, side: str, cache_dir: Path | None = None, timeout: float = 1800
) -> dict[str, Any]:
    """Run `python -m bench.child` -> its RESULT dict, plus `process_s` (the child's whole wall time)."""
    cmd = [
        sys.executable,
        "-m",
        "bench.child",
        mode,
        "--side",
        side,
        "--model",
        ctx.model,
        "--weights",
        str(ctx.weights()),
    ]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    if mode == "amg":
        cmd += ["--points-per-side", str(ctx.amg_points_per_side)]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"{' '.join(cmd[2:6])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][len(RESULT) :]), "process_s": wall}


def case_memory(ctx: Context) -> list[Row]:
    """Peak RSS of a fresh process that loads the model and runs the mask generator once."""
    ours, ref = run_child(ctx, "amg", "ours"), run_child(ctx, "amg", "official")
    check = {
        "ok": not ours["torch_loaded"] and abs(ours["masks"] - ref["masks"]) <= max(1, ref["masks"] // 50),
        "masks_ours": ours["masks"],
        "masks_official": ref["masks"],
    }
    return [
        Row(
            "memory",
            "memory",
            "peak memory, automatic masks (process)",
            "MB",
            ours["peak_mb"],
            ref["peak_mb"],
            [ours["peak_mb"]],
            [ref["peak_mb"]],
            check=check,
            extra={"ours": ours, "official": ref},
        )
    ]


def _first_call_check(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    area_diff = abs(ours["best_area"] - ref["best_area"]) / max(ref["best_area"], 1)
    score_diff = abs(ours["best_score"] - ref["best_score"])
    return {"ok": area_diff <= 0.01 and score_diff <= 1e-3, "area_rel_diff": area_diff, "score_diff": score_diff}


def case_compile(ctx: Context) -> list[Row]:
    """Wall time to the first result of a new predictor (set_image + predict) in a fresh process:
    ours with an empty persistent compilation cache (cold), then again with the cache that run
    filled (warm); the official model (no compilation) once, for comparison."""
    cache = ctx.workdir / "jax_cache"  # empty: the work directory is new for each run
    cold = run_child(ctx, "first-call", "ours", cache_dir=cache)
    warm = run_child(ctx, "first-call", "ours", cache_dir=cache)
    ref = run_child(ctx, "first-call", "official")
    rows = []
    for name, ours in (("cold", cold), ("warm", warm)):
        extra = {
            "ours_second_call_s": ours["second_call_s"],
            "ours_compile_s": ours["first_call_s"] - ours["second_call_s"],
            "official_second_call_s": ref["second_call_s"],
            "ours_process_s": ours["process_s"],
            "official_process_s": ref["process_s"],
        }
        rows.append(
            Row(
                f"compile_{name}",
                "compile",
                f"first predict, new process, {name} cache",
                "s",
                ours["first_call_s"],
                ref["first_call_s"],
                [ours["first_call_s"]],
                [ref["first_call_s"]],
                check=_first_call_check(ours, ref),
                extra=extra,
            )
        )
    return rows


# ----------------------------------------------------------------------------- training


# Timed steps of a full-size model's recipe at most (a vit_b step takes about 30 s on 2 cores).
FULL_SIZE_TRAIN_STEPS = 2


def train_configs(model: str, data_dir: Path) -> dict[str, Any]:
    """The training recipes to time: the small one (`shapes_tiny`), and for a full-size
    --model its paper recipe (base.py) cut to the smallest step that still has every part:
    batch 1, 4 masks per image, one correction point and one iteration without a new point."""
    from sam_jax.train.configs import base, shapes_tiny

    small = shapes_tiny.get_config()
    small.data.train_dir = str(data_dir)
    out = {"shapes_tiny": small}
    if model != "tiny":
        big = base.get_config()
        big.model = model
        big.batch_size = 1
        big.data.masks_per_image = 4
        big.loss.num_point_iters = 1
        big.loss.num_no_point_iters = 1
        big.data.train_dir = str(data_dir)
        out[model] = big
    return out


def _train_flops(trainer, batch: dict[str, np.ndarray]) -> float:
    from sam_jax.train.step import TrainBatch, train_step

    cfg = trainer.cfg
    fn = jax.jit(
        functools.partial(
            train_step, model_config=trainer.model_config, cfg=cfg.loss, tx=trainer.tx, schedule=trainer.schedule
        )
    )
    shapes = TrainBatch(**{k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()})
    return xla_flops(fn, trainer.state, shapes)


def time_training(ctx: Context, name: str, cfg, workdir: Path, steps: int) -> Row:
    """Steps of `Trainer.run_step` (data loading included): the first compiles, `warmup - 1`
    more are untimed, then `steps` are timed one by one."""
    from sam_jax.train.trainer import Trainer

    trainer = Trainer(cfg, workdir, quiet=True)
    losses: list[float] = []

    def step() -> None:
        metrics = jax.block_until_ready(trainer.run_step())
        losses.append(float(metrics["loss"]))

    compile_s = time_call(step)
    for _ in range(ctx.warmup - 1):
        step()
    runs = [time_call(step, PAUSE_S) for _ in range(steps)]
    flop = _train_flops(trainer, next(trainer.data_iter))
    t = median(runs)
    extra = {
        "steps_per_s": 1.0 / t,
        "examples_per_s": cfg.batch_size / t,
        "batch_size": cfg.batch_size,
        "masks_per_image": cfg.data.masks_per_image,
        "first_step_s": compile_s,
        **rate_extra(flop, t, None, ctx.matmul),
    }
    check = {"ok": bool(np.all(np.isfinite(losses))), "last_loss": losses[-1]}
    return Row(
        f"train_{name}",
        "train",
        f"train step, {name} (batch {cfg.batch_size})",
        "s",
        t,
        None,
        runs,
        [],
        check=check,
        extra=extra,
    )


def case_train(ctx: Context) -> list[Row]:
    from sam_jax.train.shapes import make_shapes

    data = ctx.workdir / "shapes"
    if not data.exists():
        make_shapes(data, 32, seed=0, image_size=(96, 128))
    return [
        time_training(
            ctx,
            name,
            cfg,
            ctx.workdir / f"train_{name}",
            ctx.repeats if name == "shapes_tiny" else min(ctx.repeats, FULL_SIZE_TRAIN_STEPS),
        )
        for name, cfg in train_configs(ctx.model, data).items()
    ]


CASES: dict[str, Callable[[Context], list[Row]]] = {
    "encoder": case_encoder,
    "predict": case_predict,
    "amg": case_amg,
    "memory": case_memory,
    "compile": case_compile,
    "train": case_train,
}
