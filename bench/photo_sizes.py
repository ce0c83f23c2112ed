"""Photo sizes: the generator and many-prompt predict on 0.24, 3.4 and 12 MP photos, both sides.

    python -m bench.photo_sizes --model vit_b                       # every row (about an hour on 2 cores)
    python -m bench.photo_sizes --sizes 12MP --tasks amg16 --sides ours  # a subset

Rows (time in seconds and peak memory in MB, ours and official, each side in its own fresh
process, `python -m bench.child photo`, one measurement at a time):

- `amg16`, `amg32`: `SamAutomaticMaskGenerator(points_per_side=16 / 32)`, the official
  defaults otherwise (points_per_batch 64, pred_iou_thresh 0.88, stability_score_thresh
  0.95, binary_mask output), one `generate` on the photo;
- `predict64`: `predict` with 64 single-point prompts (multimask, bool masks), the image
  embedding computed beforehand (the official side calls `predict_torch`, as `bench.cases`).

The photo is scikit-image's coffee (400 x 600), resized (PIL bicubic) to 1500 x 2250 (3.4 MP,
about an SA-1B image) and 3000 x 4000 (12 MP, a phone photo). Weights as `bench.models`
(random, sharpened so that masks pass the default filters).

Time: ours runs the task twice in its process and reports the second call (the first
compiles; it is in the JSON as `first_s`); the official side runs it once. Memory: the
process's peak resident set (VmHWM, `bench.child`), which includes the model and the
interpreter (`rss_before_mb`: the resident set after loading the model). The check compares
what both sides produced: the number of masks (within 2%, at least 1) and their areas for the
generator; the masks' areas (within 1% each) and predicted IoUs (1e-3) for predict.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = {"0.24MP": (400, 600), "3.4MP": (1500, 2250), "12MP": (3000, 4000)}
TASKS = ("amg16", "predict64", "amg32")
DEFAULT_OUT = Path(__file__).resolve().parent / "results_photo_sizes.json"


def photo_at(size: tuple[int, int]) -> np.ndarray:
    """scikit-image's coffee photo (400 x 600 x 3 uint8) resized to (H, W) = size."""
    from PIL import Image
    from skimage import data

    image = data.coffee()
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.BICUBIC))


def run_task(side: str, model, task: str, image: np.ndarray) -> dict[str, Any]:
    """One task on one side (in a `bench.child` process) -> seconds and what it produced."""
    from bench import models

    calls = 2 if side == "ours" else 1  # ours: the first call compiles
    out: dict[str, Any] = {}
    if task.startswith("amg"):
        gen = models.mask_generator(side, model, points_per_side=int(task[3:]))
        times = []
        for _ in range(calls):
            records = None  # the previous call's records are freed before the next call
            t = time.perf_counter()
            records = gen.generate(image)
            times.append(time.perf_counter() - t)
        areas = sorted((int(r["area"]) for r in records), reverse=True)
        out.update(masks=len(records), areas=areas)
    elif task == "predict64":
        coords = models.prompt_points(image, 64)
        labels = np.ones((64, 1), np.int64)
        predictor = models.predictor(side, model)
        t = time.perf_counter()
        predictor.set_image(image)
        out["set_image_s"] = time.perf_counter() - t
        times = []
        for _ in range(calls):
            masks = None
            t = time.perf_counter()
            if side == "ours":
                masks, iou, _ = predictor.predict(point_coords=coords, point_labels=labels)
            else:
                masks, iou = models.official_predict_many(predictor, coords, labels)
            times.append(time.perf_counter() - t)
        out.update(
            masks_shape=list(masks.shape),
            masks_dtype=str(masks.dtype),
            output_mb=masks.nbytes / 2**20,
            areas=masks.sum(axis=(-2, -1)).reshape(-1).tolist(),
            iou=np.asarray(iou).reshape(-1).tolist(),
        )
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return {"seconds": times[-1], "first_s": times[0], **out}


def _check(task: str, ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    if task.startswith("amg"):
        n, m = ours["masks"], ref["masks"]
        k = min(n, m)
        area_diff = max((abs(a - b) / max(b, 1) for a, b in zip(ours["areas"][:k], ref["areas"][:k])), default=0.0)
        return {"ok": abs(n - m) <= max(1, m // 50), "masks_ours": n, "masks_official": m, "area_rel_diff": area_diff}
    a, b = np.asarray(ours["areas"], np.float64), np.asarray(ref["areas"], np.float64)
    area_diff = float(np.max(np.abs(a - b) / np.maximum(b, 1)))
    iou_diff = float(np.max(np.abs(np.asarray(ours["iou"]) - np.asarray(ref["iou"]))))
    same = ours["masks_shape"] == ref["masks_shape"] and ours["masks_dtype"] == ref["masks_dtype"]
    return {"ok": same and area_diff <= 0.01 and iou_diff <= 1e-3, "area_rel_diff": area_diff, "iou_diff": iou_diff}


def run_child(model: str, weights: Path, side: str, task: str, size: str, timeout: float = 7200) -> dict[str, Any]:
    """`python -m bench.child photo ...` -> its RESULT dict (with `process_s`)."""
    from bench.child import RESULT

    h, w = SIZES[size]
    cmd = [sys.executable, "-m", "bench.child", "photo", "--side", side, "--model", model, "--weights", str(weights)]
    cmd += ["--task", task, "--size", f"{h}x{w}"]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    t = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=timeout
    )
    wall = time.perf_counter() - t
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} {task} {size} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][len(RESULT) :]), "process_s": wall}


def rows_for(task: str, size: str, ours: dict[str, Any] | None, ref: dict[str, Any] | None) -> list:
    """A time row and a memory row for one task and size (a side not run gives None)."""
    from bench.harness import Row

    h, w = SIZES[size]
    label = {"amg16": "generator 16x16", "amg32": "generator 32x32", "predict64": "predict, 64 prompts"}[task]
    check = _check(task, ours, ref) if ours and ref else {}
    slim = [{k: v for k, v in d.items() if k not in ("areas", "iou")} if d else None for d in (ours, ref)]
    extra = {"size": [h, w], "ours": slim[0], "official": slim[1]}

    def value(d, key):
        return None if d is None else d[key]

    return [
        Row(
            f"{task}_{size}_time",
            "photo_sizes",
            f"{label}, {h}x{w} ({size})",
            "s",
            value(ours, "seconds"),
            value(ref, "seconds"),
            [] if ours is None else [ours["seconds"]],
            [] if ref is None else [ref["seconds"]],
            check=check,
            extra=extra,
        ),
        Row(
            f"{task}_{size}_peak",
            "photo_sizes",
            f"{label}, {h}x{w} ({size}), peak",
            "MB",
            value(ours, "peak_mb"),
            value(ref, "peak_mb"),
            [] if ours is None else [ours["peak_mb"]],
            [] if ref is None else [ref["peak_mb"]],
            extra={"rss_before_mb": [value(ours, "rss_before_mb"), value(ref, "rss_before_mb")]},
        ),
    ]


def _names(text: str, allowed) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown {bad or text!r}; expected a comma-separated subset of {','.join(allowed)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    from sam_jax.config import CONFIGS

    p = argparse.ArgumentParser(prog="python -m bench.photo_sizes", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_b", choices=sorted(CONFIGS))
    p.add_argument("--sizes", type=lambda t: _names(t, SIZES), default=list(SIZES))
    p.add_argument("--tasks", type=lambda t: _names(t, TASKS), default=list(TASKS))
    p.add_argument("--sides", type=lambda t: _names(t, ("ours", "official")), default=["ours", "official"])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    from bench import models
    from bench.harness import cpu_description, format_table, matmul_rates, write_json_atomic

    result = {"meta": {"model": args.model, "sizes": args.sizes, "tasks": args.tasks, "sides": args.sides}, "rows": {}}
    result["meta"].update(cpus=models.cpu_count(), cpu=cpu_description(), matmul=matmul_rates())
    print(
        f"matrix products (float32): XLA {result['meta']['matmul']['jax_gflops']:.0f} GFLOP/s, PyTorch "
        f"{result['meta']['matmul']['torch_gflops']:.0f} GFLOP/s",
        flush=True,
    )
    rows, bad = [], []
    with tempfile.TemporaryDirectory(prefix="sam_jax_photo_sizes_") as tmp:
        weights = models.save_weights(models.official_state_dict(args.model), Path(tmp) / "weights.npz")
        for size in args.sizes:
            for task in args.tasks:
                got = {}
                for side in args.sides:  # one process at a time: never two heavy measurements at once
                    print(f"[{task} {size} {side}] ...", flush=True)
                    try:
                        got[side] = run_child(args.model, weights, side, task, size)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:  # e.g. killed for memory: go on
                        print(str(e)[-2000:], file=sys.stderr, flush=True)
                        result.setdefault("failed", {})[f"{task}_{size}_{side}"] = str(e)[-2000:]
                        bad.append(f"{task}_{size}_{side}")
                if "ours" not in got:
                    continue
                new = rows_for(task, size, got.get("ours"), got.get("official"))
                rows += new
                bad += [r.name for r in new if r.check and not r.check.get("ok")]
                result["rows"].update({r.name: r.to_json() for r in new})
                write_json_atomic(args.out, result)
                print(format_table(new).split("\n", 2)[-1], flush=True)
    print()
    print(format_table(rows))
    print(f"\nwrote {args.out}")
    if bad:
        print(f"MISMATCH between ours and the official outputs in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
