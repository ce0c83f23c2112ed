"""The measurements that need a fresh process: `python -m bench.child MODE --side ours|official ...`.

Modes:
  amg          the automatic mask generator (default settings but --points-per-side) on
               the photo, once: its time, the number of masks, the RSS before it and the
               peak RSS of the whole process. The peak is VmHWM (/proc/self/status), the
               high-water mark of this process's own address space. `getrusage`'s
               ru_maxrss is not: Linux carries it over from the parent through fork/vfork
               and exec, so every child of a big parent reports at least the parent's RSS;
  first-call   wall time to the first result of a new predictor (set_image + predict with
               one point), then of a second call (steady state, no compilation). With
               --cache-dir, ours uses JAX's persistent compilation cache there, as the CLI
               does (`sam_jax.cli.enable_compilation_cache`).
  photo        one task of `bench.photo_sizes` (--task amg16|amg32|predict64) on the coffee
               photo resized to --size HxW: its seconds, what it produced, the RSS before it
               and the peak RSS of the process.

Prints one line `RESULT {json}` at the end. The side `ours` never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from bench import models
from bench.harness import process_memory_mb
from sam_jax.config import get_config

RESULT = "RESULT "


def amg(side: str, model, image: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    rss_before = process_memory_mb("VmRSS")
    gen = models.mask_generator(side, model, points_per_side=args.points_per_side)
    t = time.perf_counter()
    records = gen.generate(image)
    seconds = time.perf_counter() - t
    return {"generate_s": seconds, "masks": len(records), "rss_before_mb": rss_before, "peak_mb": process_memory_mb()}


def _predict_once(side: str, model, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A new predictor, set_image, predict with one foreground point at the image centre
    -> (masks (3, H, W) bool, scores (3,))."""
    point = np.array([[image.shape[1] / 2, image.shape[0] / 2]])
    predictor = models.predictor(side, model)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=point, point_labels=np.array([1]))
    return np.asarray(masks), np.asarray(scores)


def first_call(side: str, model, image: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    masks, scores = _predict_once(side, model, image)
    first = time.perf_counter() - t
    t = time.perf_counter()
    _predict_once(side, model, image)
    second = time.perf_counter() - t
    best = int(np.argmax(scores))
    return {
        "first_call_s": first,
        "second_call_s": second,
        "best_score": float(scores[best]),
        "best_area": int(masks[best].sum()),
    }


def photo(side: str, model, image: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    from bench.photo_sizes import photo_at, run_task

    h, w = (int(v) for v in args.size.split("x"))
    image = photo_at((h, w))
    rss_before = process_memory_mb("VmRSS")
    result = run_task(side, model, args.task, image)
    return {**result, "rss_before_mb": rss_before, "peak_mb": process_memory_mb()}


MODES = {"amg": amg, "first-call": first_call, "photo": photo}


def _load(side: str, model: str, weights: str, cache_dir: str | None):
    config = get_config(model)
    if side == "official":
        models.set_torch_threads()
        return models.official_from_weights(weights, config)
    if cache_dir is not None:
        from sam_jax.cli import enable_compilation_cache

        enable_compilation_cache(cache_dir)
    return models.ours_from_weights(weights, config)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.child")
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--side", choices=("ours", "official"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--weights", required=True, help=".npz of the official state dict (bench.models.save_weights)")
    p.add_argument("--cache-dir", default=None, help="ours: JAX persistent compilation cache directory")
    p.add_argument(
        "--points-per-side", type=int, default=32, help="amg: the generator's point grid (official default 32)"
    )
    p.add_argument("--task", default="amg16", help="photo: the bench.photo_sizes task")
    p.add_argument("--size", default="400x600", help="photo: the photo's HxW")
    args = p.parse_args(argv)
    start = time.perf_counter()
    model = _load(args.side, args.model, args.weights, args.cache_dir)
    load_s = time.perf_counter() - start
    result = MODES[args.mode](args.side, model, models.photo(), args)
    result.update(load_s=load_s, torch_loaded="torch" in sys.modules)
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
